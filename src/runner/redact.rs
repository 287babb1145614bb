//! Redaction: secret values out of tool output, and `audit.redact` fields out
//! of recorded inputs. Pure functions.

use serde_json::Value;

pub const REDACTED: &str = "[REDACTED]";

/// Replaces every occurrence of every secret in `text`. Longer secrets go first
/// so a secret that contains another is replaced whole. Empty values are skipped.
pub fn redact_secrets(text: &[u8], secrets: &[Vec<u8>]) -> Vec<u8> {
    let mut ordered: Vec<&Vec<u8>> = secrets.iter().filter(|s| !s.is_empty()).collect();
    ordered.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_vec();
    for secret in ordered {
        out = replace_all(&out, secret, REDACTED.as_bytes());
    }
    out
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// A copy of `input` with every field named by a JSON pointer replaced.
pub fn redact_fields(input: &Value, pointers: &[String]) -> Value {
    let mut copy = input.clone();
    for pointer in pointers {
        if let Some(field) = copy.pointer_mut(pointer) {
            *field = Value::String(REDACTED.into());
        }
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_occurrence_of_every_secret_is_replaced() {
        let out = redact_secrets(
            b"key=hunter2 again hunter2, long=hunter2xyz",
            &[b"hunter2".to_vec(), b"hunter2xyz".to_vec(), Vec::new()],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "key=[REDACTED] again [REDACTED], long=[REDACTED]"
        );
    }

    #[test]
    fn fields_are_redacted_and_missing_ones_ignored() {
        let input = json!({"updates": {"email": "a@b.c", "name": "A"}});
        let out = redact_fields(&input, &["/updates/email".into(), "/nope".into()]);
        assert_eq!(
            out,
            json!({"updates": {"email": "[REDACTED]", "name": "A"}})
        );
    }
}
