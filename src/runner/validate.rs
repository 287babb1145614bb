//! Input validation against the tool's `inputSchema`: JSON Schema 2020-12,
//! formats asserted, compiled once per tool generation.

use jsonschema::error::ValidationErrorKind;
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::problem::FieldError;

/// A tool's `inputSchema` that is not a valid JSON Schema.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct InvalidSchema(Box<ValidationError<'static>>);

impl InvalidSchema {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        "InputSchemaInvalid"
    }
}

/// Compiles a tool's schema the way `toolwarden check` does.
pub fn compile(schema: &Value) -> Result<Validator, InvalidSchema> {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| InvalidSchema(Box::new(e)))
}

/// Every error, not just the first, each with the JSON pointer of the field.
/// Messages never echo the caller's input: not the offending value (error pages
/// would become a reflection channel) and not property names either (a secret
/// pasted as a key would reach the caller and the logs).
pub fn validate(validator: &Validator, input: &Value) -> Result<(), Vec<FieldError>> {
    let errors: Vec<FieldError> = validator
        .iter_errors(input)
        .map(|e| FieldError {
            path: e.instance_path().to_string(),
            message: message(&e),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The house wording of one error. jsonschema's masked messages hide the value but
/// still name unexpected properties and say `is not a "email"`; those kinds get
/// their own text, the others keep jsonschema's masked one (it names only schema
/// values: limits, patterns, formats, required property names).
fn message(error: &ValidationError<'_>) -> String {
    let count = |n: usize, one: &str, many: &str| {
        if n == 1 {
            format!("has an {one}")
        } else {
            format!("has {n} {many}")
        }
    };
    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected }
        | ValidationErrorKind::UnevaluatedProperties { unexpected } => count(
            unexpected.len(),
            "unexpected property",
            "unexpected properties",
        ),
        ValidationErrorKind::UnevaluatedItems { unexpected } => {
            count(unexpected.len(), "unexpected item", "unexpected items")
        }
        ValidationErrorKind::PropertyNames { .. } => {
            "has a property name the schema does not allow".into()
        }
        ValidationErrorKind::Format { format } => format!("value is not a valid {format:?}"),
        _ => error.masked().to_string(),
    }
}

/// Validation of the sanitized input: the same schema, with messages that
/// say the failing value is the one sanitizing produced (the caller sent a
/// valid one).
pub fn validate_sanitized(validator: &Validator, input: &Value) -> Result<(), Vec<FieldError>> {
    validate(validator, input).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| FieldError {
                message: format!("after sanitizing: {}", e.message),
                ..e
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SanitizeRule, Transform};
    use crate::runner::sanitize::sanitize;
    use serde_json::json;

    fn profile_schema() -> Value {
        json!({
            "type": "object", "additionalProperties": false, "required": ["userId", "updates"],
            "properties": {
                "userId": {"type": "string", "format": "uuid"},
                "updates": {"type": "object", "properties": {
                    "name": {"type": "string", "pattern": "^[a-zA-Z\\s'-]+$"},
                    "email": {"type": "string", "format": "email"},
                    "site": {"type": "string", "format": "uri"},
                    "at": {"type": "string", "format": "date-time"}
                }}
            }
        })
    }

    #[test]
    fn sql_injection_in_name_is_rejected_with_its_path() {
        let v = compile(&profile_schema()).unwrap();
        let input = json!({"userId": "6f1c2c1e-8a8e-4a53-9d0e-2b8f2f0e8c11",
                           "updates": {"name": "Robert'); DROP TABLE users;--"}});
        let errors = validate(&v, &input).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "/updates/name");
        assert!(!errors[0].message.contains("DROP"), "{}", errors[0].message);
    }

    #[test]
    fn messages_never_echo_property_names_or_values() {
        let v = compile(&json!({
            "type": "object", "additionalProperties": false,
            "properties": {"mail": {"type": "string", "format": "email"},
                           "tags": {"type": "object", "propertyNames": {"maxLength": 3}}}
        }))
        .unwrap();
        let secret = "sk-live-SECRETKEY0123456789";
        let input = json!({secret: 1, "other-secret-key": 2, "mail": secret,
                           "tags": {secret: true}});
        let errors = validate(&v, &input).unwrap_err();
        let text = serde_json::to_string(&errors).unwrap();
        assert!(
            !text.contains("SECRET") && !text.contains("other"),
            "{text}"
        );
        let by_path = |p: &str| {
            errors
                .iter()
                .find(|e| e.path == p)
                .map(|e| e.message.as_str())
                .unwrap_or_else(|| panic!("no error at {p:?} in {text}"))
        };
        assert_eq!(by_path(""), "has 2 unexpected properties");
        assert_eq!(by_path("/mail"), "value is not a valid \"email\"");
        assert_eq!(
            by_path("/tags"),
            "has a property name the schema does not allow"
        );
    }

    #[test]
    fn reports_every_error_and_asserts_formats() {
        let v = compile(&profile_schema()).unwrap();
        let input = json!({"userId": "not-a-uuid", "extra": 1,
                           "updates": {"email": "nope", "site": "not a uri", "at": "yesterday"}});
        let mut paths: Vec<String> = validate(&v, &input)
            .unwrap_err()
            .into_iter()
            .map(|e| e.path)
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "",
                "/updates/at",
                "/updates/email",
                "/updates/site",
                "/userId"
            ]
        );
    }

    /// A value the schema accepts, then the same value after `transforms`.
    fn check_after(schema: Value, value: &str, transforms: &[Transform]) -> Vec<FieldError> {
        let v = compile(&json!({"type": "object", "properties": {"cmd": schema}})).unwrap();
        let mut input = json!({ "cmd": value });
        validate(&v, &input).expect("the raw value is valid");
        let rules = [SanitizeRule {
            field: "/cmd".into(),
            transforms: transforms.to_vec(),
        }];
        assert_eq!(sanitize(&mut input, &rules), ["/cmd"]);
        validate_sanitized(&v, &input).unwrap_err()
    }

    #[test]
    fn sanitizing_cannot_turn_a_valid_value_into_one_the_schema_forbids() {
        let no_shell = json!({"type": "string", "pattern": "^[^;`|]*$"});
        let nfc = &[Transform::NormalizeUnicode];
        // NFC folds singletons: GREEK QUESTION MARK to `;`, GREEK VARIA to a backtick.
        for attack in [
            "ls\u{37e} id \u{1fef}id\u{1fef}",
            "ls\u{37e}rm -rf /",
            "echo \u{1fef}id\u{1fef}",
        ] {
            let errors = check_after(no_shell.clone(), attack, nfc);
            assert_eq!(errors.len(), 1, "{attack}");
            assert_eq!(errors[0].path, "/cmd");
            assert!(
                errors[0].message.starts_with("after sanitizing: "),
                "{errors:?}"
            );
            assert!(!errors[0].message.contains("id"), "the value is masked");
        }
        // Other confusables: KELVIN SIGN is K, OHM SIGN is omega.
        check_after(
            json!({"type": "string", "pattern": "^[^K]*$"}),
            "\u{212a}ill",
            nfc,
        );
        check_after(
            json!({"type": "string", "pattern": "^[^\\u03a9]*$"}),
            "1 \u{2126}",
            nfc,
        );
        // Escaping and case folding grow values past maxLength.
        let short = json!({"type": "string", "maxLength": 20});
        check_after(short.clone(), &"&".repeat(20), &[Transform::StripHtml]);
        check_after(short.clone(), "x < y > \"z\" & w", &[Transform::StripHtml]);
        check_after(short, &"\u{130}".repeat(20), &[Transform::Lowercase]);
        // Lowercase turning a pattern-valid value invalid.
        check_after(
            json!({"type": "string", "pattern": "^[A-Z_]+$"}),
            "DROP_ALL",
            &[Transform::Lowercase],
        );
    }

    #[test]
    fn valid_input_passes() {
        let v = compile(&profile_schema()).unwrap();
        let input = json!({"userId": "6f1c2c1e-8a8e-4a53-9d0e-2b8f2f0e8c11",
                           "updates": {"name": "Ada Lovelace", "email": "ada@example.com",
                                       "site": "https://example.com", "at": "2024-01-02T03:04:05Z"}});
        validate(&v, &input).unwrap();
    }
}
