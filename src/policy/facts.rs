//! The expensive, policy-independent analysis of one tool, done once per
//! evaluation: compiling the input schema and CEL expressions, and walking the
//! schema's shape.

use serde_json::Value;

use super::schema_shape::{self, SchemaShape};
use crate::api::AgentToolSpec;

/// The only JSON Schema dialect accepted in `inputSchema.$schema`.
pub const DIALECT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// What the rules need to know about a tool beyond its plain fields.
#[derive(Clone, Debug, Default)]
pub struct ToolFacts {
    /// Why the input schema does not compile, if it does not.
    pub schema_error: Option<String>,
    /// Why the output schema does not compile (or is too deep to), if one is declared.
    pub output_schema_error: Option<String>,
    pub shape: SchemaShape,
    /// `(index, error)` of each authorization expression that is not valid CEL.
    pub authorization_errors: Vec<(usize, String)>,
    /// Why `approval.when` is not valid CEL, if it is not.
    pub approval_when_error: Option<String>,
}

impl ToolFacts {
    pub fn analyze(spec: &AgentToolSpec) -> ToolFacts {
        let schema = &spec.input_schema;
        let shape = schema_shape::analyze(schema);
        ToolFacts {
            // A schema too deep to walk is reported by its own rule and not compiled.
            schema_error: if shape.too_deep.is_some() {
                None
            } else {
                compile_error(schema)
            },
            shape,
            output_schema_error: spec.output_schema.as_ref().and_then(|schema| {
                // As for the input: a schema too deep to walk is not compiled.
                match schema_shape::analyze(schema).too_deep {
                    Some(_) => Some(format!(
                        "nests deeper than {} levels",
                        schema_shape::MAX_SCHEMA_DEPTH
                    )),
                    None => compile_error(schema),
                }
            }),
            authorization_errors: spec
                .authorization
                .iter()
                .enumerate()
                .filter_map(|(i, rule)| cel_error(&rule.expression).map(|e| (i, e)))
                .collect(),
            approval_when_error: spec
                .approval
                .as_ref()
                .and_then(|a| a.when.as_deref())
                .and_then(cel_error),
        }
    }
}

/// Compiles the schema the way the runner will (2020-12, formats asserted, no
/// remote references) and returns why it fails.
fn compile_error(schema: &Value) -> Option<String> {
    if let Some(dialect) = schema.get("$schema")
        && dialect.as_str().map(|d| d.trim_end_matches('#')) != Some(DIALECT_2020_12)
    {
        return Some(format!(
            "$schema must be {DIALECT_2020_12} (JSON Schema 2020-12), found {dialect}"
        ));
    }
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .err()
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{e} (at {at})")
            }
        })
}

/// Parses a CEL expression and returns why it is not valid.
pub fn cel_error(expression: &str) -> Option<String> {
    cel::Program::compile(expression)
        .err()
        .map(|e| e.to_string().lines().next().unwrap_or_default().to_string())
}
