//! The tool's `authorization` rules: CEL over `caller` and `input`, compiled
//! once per tool generation. Every rule must evaluate to `true`; an error or a
//! non-boolean result denies (fail closed).

use serde_json::Value;

use super::auth::Caller;
use crate::api::AuthorizationRule;

/// One compiled rule.
pub struct CompiledRule {
    pub expression: String,
    program: cel::Program,
    /// What the caller is told on denial.
    pub message: String,
    /// The rule looks at `input`, so it can only be decided at call time.
    pub reads_input: bool,
}

/// Why a rule does not compile, or has no boolean value for a call.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("authorization[{index}]: {source}")]
    Parse {
        index: usize,
        source: cel::ParseErrors,
    },
    #[error("the input cannot be given to CEL: {0}")]
    Input(#[from] cel::SerializationError),
    #[error("`{expression}` returned {value}, not a boolean")]
    NotBoolean { expression: String, value: String },
    #[error("`{expression}` failed: {source}")]
    Failed {
        expression: String,
        source: cel::ExecutionError,
    },
}

impl RuleError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            RuleError::Parse { .. } => "RuleInvalid",
            RuleError::Input(_) => "RuleInputUnrepresentable",
            RuleError::NotBoolean { .. } => "RuleNotBoolean",
            RuleError::Failed { .. } => "RuleFailed",
        }
    }
}

/// Compiles every rule; the error names the rule that does not parse.
pub fn compile(rules: &[AuthorizationRule]) -> Result<Vec<CompiledRule>, RuleError> {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let program = cel::Program::compile(&rule.expression)
                .map_err(|source| RuleError::Parse { index: i, source })?;
            Ok(CompiledRule {
                expression: rule.expression.clone(),
                reads_input: program.references().has_variable("input"),
                program,
                message: rule
                    .message
                    .clone()
                    .unwrap_or_else(|| "the call is not authorized".into()),
            })
        })
        .collect()
}

/// A denial: what the caller sees, and the full reason for the audit log.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied {
    pub message: String,
    pub reason: String,
}

pub fn authorize(rules: &[CompiledRule], caller: &Caller, input: &Value) -> Result<(), Denied> {
    for rule in rules {
        let reason = match holds(rule, caller, input) {
            Ok(true) => continue,
            Ok(false) => format!("`{}` is false", rule.expression),
            Err(e) => e.to_string(),
        };
        return Err(Denied {
            message: rule.message.clone(),
            reason,
        });
    }
    Ok(())
}

/// Whether `caller` passes every rule that depends on the caller alone (rules
/// that read `input` are decided at call time): listings show a caller only
/// the tools it could call. An error counts as a denial, as at call time.
pub fn may_call(rules: &[CompiledRule], caller: &Caller) -> bool {
    rules
        .iter()
        .filter(|rule| !rule.reads_input)
        .all(|rule| matches!(holds(rule, caller, &Value::Null), Ok(true)))
}

/// Evaluates one rule; an error says why it has no boolean value.
pub fn holds(rule: &CompiledRule, caller: &Caller, input: &Value) -> Result<bool, RuleError> {
    let mut context = cel::Context::default();
    let caller_value = serde_json::json!({"sub": caller.sub, "groups": caller.groups});
    context
        .add_variable("caller", &caller_value)
        .and_then(|()| context.add_variable("input", input))?;
    match rule.program.execute(&context) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(RuleError::NotBoolean {
            expression: rule.expression.clone(),
            value: format!("{other:?}"),
        }),
        Err(source) => Err(RuleError::Failed {
            expression: rule.expression.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(expressions: &[&str]) -> Vec<CompiledRule> {
        compile(
            &expressions
                .iter()
                .map(|e| AuthorizationRule {
                    expression: e.to_string(),
                    message: Some(format!("denied by {e}")),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn caller(sub: &str, groups: &[&str]) -> Caller {
        Caller {
            sub: sub.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            method: "test",
        }
    }

    #[test]
    fn own_profile_or_admin() {
        let r = rules(&[r#"caller.sub == input.userId || "admins" in caller.groups"#]);
        let input = json!({"userId": "u1"});
        assert!(authorize(&r, &caller("u1", &[]), &input).is_ok());
        assert!(authorize(&r, &caller("u2", &["admins"]), &input).is_ok());
        let denied = authorize(&r, &caller("u2", &["devs"]), &input).unwrap_err();
        assert!(denied.message.starts_with("denied by"));
        assert!(denied.reason.contains("is false"));
    }

    #[test]
    fn path_traversal_is_denied() {
        let r = rules(&[r#"!input.path.contains("..")"#]);
        let c = caller("u", &[]);
        assert!(authorize(&r, &c, &json!({"path": "/workspace/a.txt"})).is_ok());
        assert!(authorize(&r, &c, &json!({"path": "/workspace/../etc/passwd"})).is_err());
    }

    #[test]
    fn errors_and_non_booleans_deny() {
        let c = caller("u", &[]);
        let missing = authorize(&rules(&["input.nope == 1"]), &c, &json!({})).unwrap_err();
        assert!(missing.reason.contains("failed"), "{}", missing.reason);
        let not_bool = authorize(&rules(&["1 + 1"]), &c, &json!({})).unwrap_err();
        assert!(not_bool.reason.contains("not a boolean"));
        let rule = &rules(&["1 + 1"])[0];
        let e = holds(rule, &c, &json!({})).unwrap_err();
        assert_eq!(e.reason(), "RuleNotBoolean", "{e}");
    }

    #[test]
    fn listings_decide_caller_only_rules_and_leave_input_rules_to_the_call() {
        let admins = rules(&[r#""admins" in caller.groups"#]);
        assert!(may_call(&admins, &caller("a", &["admins"])));
        assert!(!may_call(&admins, &caller("b", &["devs"])));
        // Depends on the input: every caller may try, the call decides.
        let own = rules(&[r#"caller.sub == input.userId"#]);
        assert!(own[0].reads_input);
        assert!(may_call(&own, &caller("b", &[])));
        // A caller-only rule that errors hides the tool (fail closed).
        assert!(!may_call(&rules(&["caller.nope == 1"]), &caller("a", &[])));
    }

    #[test]
    fn bad_expressions_do_not_compile() {
        let bad = [AuthorizationRule {
            expression: "caller.sub ==".into(),
            message: None,
        }];
        let e = compile(&bad).err().unwrap();
        assert_eq!(e.reason(), "RuleInvalid");
        assert!(e.to_string().starts_with("authorization[0]"), "{e}");
    }
}
