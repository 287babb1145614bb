//! Per-field sanitization of a validated input. Pure: returns the new input
//! and the pointers of the fields that changed (for the audit record).

use std::collections::HashSet;
use std::sync::LazyLock;

use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::api::{SanitizeRule, Transform};

/// Allows no tag at all and drops the content of script and style elements.
static STRIP_HTML: LazyLock<ammonia::Builder<'static>> = LazyLock::new(|| {
    let mut builder = ammonia::Builder::empty();
    builder.clean_content_tags(HashSet::from(["script", "style"]));
    builder
});

/// Applies every rule in order. Fields that are absent or not strings are
/// left alone (the schema decides whether they may exist).
pub fn sanitize(input: &mut Value, rules: &[SanitizeRule]) -> Vec<String> {
    let mut changed = Vec::new();
    for rule in rules {
        let segments: Vec<String> = rule
            .field
            .split('/')
            .skip(1)
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        visit(input, &segments, String::new(), &mut |path, value| {
            if let Value::String(text) = value {
                let new = rule
                    .transforms
                    .iter()
                    .fold(text.clone(), |acc, t| apply(*t, &acc));
                if new != *text {
                    *text = new;
                    if !changed.contains(&path) {
                        changed.push(path);
                    }
                }
            }
        });
    }
    changed
}

/// Calls `f` on every value matching the pointer segments (`*` = any index).
fn visit(
    value: &mut Value,
    segments: &[String],
    path: String,
    f: &mut impl FnMut(String, &mut Value),
) {
    let Some((head, rest)) = segments.split_first() else {
        f(path, value);
        return;
    };
    let escaped = head.replace('~', "~0").replace('/', "~1");
    match value {
        Value::Array(items) if head == "*" => {
            for (i, item) in items.iter_mut().enumerate() {
                visit(item, rest, format!("{path}/{i}"), f);
            }
        }
        Value::Array(items) => {
            if let Some(item) = head.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                visit(item, rest, format!("{path}/{escaped}"), f);
            }
        }
        Value::Object(map) => {
            if let Some(item) = map.get_mut(head.as_str()) {
                visit(item, rest, format!("{path}/{escaped}"), f);
            }
        }
        _ => {}
    }
}

/// One transform of one string.
pub fn apply(transform: Transform, text: &str) -> String {
    match transform {
        // The result is HTML-escaped text (`&` becomes `&amp;`), safe to embed in a page.
        Transform::StripHtml => STRIP_HTML.clean(text).to_string(),
        Transform::StripControlChars => text
            .chars()
            .filter(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r'))
            .collect(),
        Transform::Trim => text.trim().to_string(),
        Transform::NormalizeUnicode => text.nfc().collect(),
        Transform::Lowercase => text.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(field: &str, transforms: &[Transform]) -> SanitizeRule {
        SanitizeRule {
            field: field.into(),
            transforms: transforms.to_vec(),
        }
    }

    #[test]
    fn script_is_stripped_from_bio_and_hello_kept() {
        let mut input =
            json!({"updates": {"bio": "<script>alert('xss')</script>Hello", "name": "Ann"}});
        let changed = sanitize(
            &mut input,
            &[rule(
                "/updates/bio",
                &[Transform::StripHtml, Transform::Trim],
            )],
        );
        assert_eq!(input["updates"]["bio"], "Hello");
        assert_eq!(changed, ["/updates/bio"]);
    }

    #[test]
    fn html_attributes_and_event_handlers_go_with_their_tags() {
        assert_eq!(
            apply(
                Transform::StripHtml,
                r#"<img src=x onerror=alert(1)><b>bold</b> & co"#
            ),
            "bold &amp; co"
        );
    }

    #[test]
    fn control_chars_nfc_trim_lowercase() {
        assert_eq!(
            apply(Transform::StripControlChars, "a\u{0}b\u{1b}[31m\tc\n"),
            "ab[31m\tc\n"
        );
        assert_eq!(apply(Transform::NormalizeUnicode, "e\u{301}"), "\u{e9}");
        assert_eq!(apply(Transform::Trim, "  x \n"), "x");
        assert_eq!(
            apply(Transform::Lowercase, "Ada@Example.COM"),
            "ada@example.com"
        );
    }

    #[test]
    fn wildcard_reaches_every_index_and_unchanged_fields_are_not_reported() {
        let mut input = json!({"tags": [" a ", "b", {"x": 1}], "n": 5});
        let changed = sanitize(
            &mut input,
            &[
                rule("/tags/*", &[Transform::Trim]),
                rule("/n", &[Transform::Trim]),
                rule("/missing", &[Transform::Trim]),
            ],
        );
        assert_eq!(input, json!({"tags": ["a", "b", {"x": 1}], "n": 5}));
        assert_eq!(changed, ["/tags/0"]);
    }
}
