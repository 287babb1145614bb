//! Size and shape of a call body before it is parsed: byte cap, UTF-8 only,
//! nesting depth cap. Pure functions.

use serde_json::Value;

use super::problem::{FieldError, Problem, ProblemKind};

/// Deepest nesting of arrays and objects accepted in an input. Tool inputs are
/// shallow records; anything deeper is an attack on parsers downstream.
pub const MAX_DEPTH: usize = 32;

/// Checks `body` against the tool's byte cap, UTF-8 and [`MAX_DEPTH`], then parses it.
/// The input must be a JSON object (the checklist demands `type: object` schemas).
pub fn parse_input(body: &[u8], max_bytes: u64) -> Result<Value, Problem> {
    if body.len() as u64 > max_bytes {
        return Err(too_large(max_bytes));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        invalid(
            "",
            format!(
                "the body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    if let Some(offset) = depth_exceeded(text, MAX_DEPTH) {
        return Err(invalid(
            "",
            format!("nesting deeper than {MAX_DEPTH} levels (at byte {offset})"),
        ));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        invalid(
            "",
            format!(
                "malformed JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })?;
    if !value.is_object() {
        return Err(invalid("", "the input must be a JSON object".into()));
    }
    Ok(value)
}

/// Marks a value [`bounded`] cut.
pub const TRUNCATED: &str = "...[truncated]";

/// `text` cut to at most `max` bytes on a character boundary, marked when cut:
/// for caller-chosen text (user agent, tool name) that goes into audit records.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(TRUNCATED.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATED}", &text[..end])
}

pub fn too_large(max_bytes: u64) -> Problem {
    Problem::new(
        ProblemKind::TooLarge,
        format!("the body exceeds this tool's limit of {max_bytes} bytes"),
    )
}

fn invalid(path: &str, message: String) -> Problem {
    Problem::validation(vec![FieldError {
        path: path.into(),
        message,
    }])
}

/// Byte offset where `[`/`{` nesting (outside strings) first exceeds `max`.
/// Runs before parsing so the limit is ours and the message precise, whatever
/// the parser's own recursion limit is.
fn depth_exceeded(text: &str, max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (offset, byte) in text.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(offset);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_character_boundary_and_marked() {
        assert_eq!(bounded("curl/8", 256), "curl/8");
        let cut = bounded(&"é".repeat(200_000), 256);
        assert!(cut.len() <= 256 && cut.ends_with(TRUNCATED), "{cut}");
        assert_eq!(bounded(&"a".repeat(300), 256).len(), 256);
    }

    #[test]
    fn accepts_an_object_within_limits() {
        let v = parse_input(br#"{"a":[1,{"b":"[[[{"}]}"#, 100).unwrap();
        assert_eq!(v["a"][1]["b"], "[[[{");
    }

    #[test]
    fn rejects_bodies_over_the_cap_with_the_limit() {
        let p = parse_input(&[b' '; 11], 10).unwrap_err();
        assert_eq!(p.kind, ProblemKind::TooLarge);
        assert!(p.detail.contains("10 bytes"), "{}", p.detail);
    }

    #[test]
    fn rejects_invalid_utf8_with_the_offset() {
        let p = parse_input(b"{\"a\":\"\xff\"}", 100).unwrap_err();
        assert_eq!(p.kind, ProblemKind::Validation);
        assert!(p.errors[0].message.contains("offset 6"), "{:?}", p.errors);
    }

    #[test]
    fn rejects_deep_nesting_before_parsing() {
        let body = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        let p = parse_input(body.as_bytes(), 1 << 20).unwrap_err();
        assert!(
            p.errors[0].message.contains("deeper than 32"),
            "{:?}",
            p.errors
        );
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(31), "]".repeat(31));
        parse_input(ok.as_bytes(), 1 << 20).unwrap();
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let body = format!("{{\"a\":\"{}\\\"\"}}", "[".repeat(100));
        parse_input(body.as_bytes(), 1 << 20).unwrap();
    }

    #[test]
    fn rejects_malformed_json_and_non_objects() {
        for body in [&b"{\"a\":"[..], b"[1]", b"\"x\"", b""] {
            let p = parse_input(body, 100).unwrap_err();
            assert_eq!(p.kind, ProblemKind::Validation, "{body:?}");
        }
    }
}
