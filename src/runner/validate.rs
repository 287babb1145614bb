//! Input validation against the tool's `inputSchema`: JSON Schema 2020-12,
//! formats asserted, compiled once per tool generation.

use jsonschema::Validator;
use serde_json::Value;

use super::problem::FieldError;

/// Compiles a tool's schema the way `toolwarden check` does.
pub fn compile(schema: &Value) -> Result<Validator, String> {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| e.to_string())
}

/// Every error, not just the first, each with the JSON pointer of the field.
/// Messages mask the offending value: it is the caller's own input and echoing
/// it back would turn error pages into a reflection channel.
pub fn validate(validator: &Validator, input: &Value) -> Result<(), Vec<FieldError>> {
    let errors: Vec<FieldError> = validator
        .iter_errors(input)
        .map(|e| FieldError {
            path: e.instance_path().to_string(),
            message: e.masked().to_string(),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn valid_input_passes() {
        let v = compile(&profile_schema()).unwrap();
        let input = json!({"userId": "6f1c2c1e-8a8e-4a53-9d0e-2b8f2f0e8c11",
                           "updates": {"name": "Ada Lovelace", "email": "ada@example.com",
                                       "site": "https://example.com", "at": "2024-01-02T03:04:05Z"}});
        validate(&v, &input).unwrap();
    }
}
