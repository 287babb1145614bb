//! Types shared by several kinds: risk and audit levels, quantities and the
//! schema helpers that keep the generated CRDs structural.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// How much harm a tool can do; policies key approval requirements on it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Low,
    Medium,
    High,
}

impl Risk {
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
        }
    }
}

/// How a call's input is written to the audit trail, ordered from least to
/// most detail so policies can demand a minimum.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AuditLevel {
    /// The input is not recorded at all (the call itself still is).
    None,
    /// A SHA-256 digest of the canonical input.
    #[default]
    Digest,
    /// The input with the `redact` fields replaced.
    Redacted,
    /// The whole input.
    Full,
}

impl AuditLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditLevel::None => "none",
            AuditLevel::Digest => "digest",
            AuditLevel::Redacted => "redacted",
            AuditLevel::Full => "full",
        }
    }
}

/// Schema of `inputSchema`: a JSON Schema document the API server stores
/// as-is, whose top level must say `type: object`. The `type` property is
/// declared because CEL cannot see preserved unknown fields.
pub fn input_schema_document(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["object"], "description": "Must be `object`: a tool's input is a JSON object."}
        },
    })
}

/// Schema of `outputSchema`: a JSON Schema whose top level is an object, since
/// MCP's `structuredContent` is one.
pub fn output_schema_document(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["object"], "description": "Must be `object`: a tool's structured output is a JSON object."}
        },
    })
}

/// Schema for an optional Kubernetes quantity (`512Mi`, `250m`, `1`).
pub fn optional_quantity(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "nullable": true,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
    })
}

/// The API server's own quantity grammar, so a bad quantity is rejected at
/// admission time and not by the controller later.
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// Error for a quantity that does not follow the Kubernetes grammar.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a Kubernetes quantity (examples: 512Mi, 1G, 250m, 2)")]
pub struct BadQuantity(pub String);

/// Parses a quantity to its value in base units (bytes, cores), as a float so
/// that both `250m` CPUs and `64Gi` bytes fit.
///
/// Hand-written because k8s-openapi only carries quantities as strings and the
/// grammar is ten lines; pulling a crate for it would add more surface than it saves.
pub fn parse_quantity(q: &Quantity) -> Result<f64, BadQuantity> {
    let text = q.0.trim();
    let bad = || BadQuantity(q.0.clone());
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(suffix, factor)| text.strip_suffix(suffix).map(|n| (n, *factor)))
        .or_else(|| text.strip_suffix('P').map(|n| (n, 1e15)))
        .or_else(|| {
            text.strip_suffix('E')
                .filter(|n| !n.is_empty())
                .map(|n| (n, 1e18))
        })
        .unwrap_or((text, 1.0));
    if number.is_empty()
        || !number
            .chars()
            .all(|c| c.is_ascii_digit() || ".+-eE".contains(c))
    {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad());
    }
    Ok(value * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<f64, BadQuantity> {
        parse_quantity(&Quantity(s.into()))
    }

    #[test]
    fn parses_binary_decimal_and_milli_quantities() {
        assert_eq!(q("512Mi"), Ok(512.0 * 1024.0 * 1024.0));
        assert_eq!(q("1G"), Ok(1e9));
        assert_eq!(q("250m"), Ok(0.25));
        assert_eq!(q("2"), Ok(2.0));
        assert_eq!(q("1e3"), Ok(1000.0));
    }

    #[test]
    fn rejects_garbage_and_negative_quantities() {
        for bad in ["", "Mi", "12XB", "-1Gi", "ten", "1..2"] {
            assert!(q(bad).is_err(), "{bad} must be rejected");
        }
    }
}
