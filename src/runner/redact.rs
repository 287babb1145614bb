//! Redaction: secret values out of tool output, and `audit.redact` fields out
//! of recorded inputs.
//!
//! Secrets are found by exact matching (Aho-Corasick, every needle in one
//! pass) in three views of the output: the raw bytes; the bytes with JSON
//! string escapes decoded, so `\u0073k-live` or `a\/b` is found (up to
//! [`MAX_UNESCAPE_DEPTH`] times escaped); and, when the output is JSON, every
//! decoded string and key. When output is cut, a secret the end of the
//! capture cuts short is covered from its start in any of these views.
//! Encoded forms (base64, hex, reversed, split into pieces) are beyond exact
//! matching.

use std::ops::Range;

use aho_corasick::AhoCorasick;
use serde_json::Value;

pub const REDACTED: &str = "[REDACTED]";

/// Trimmed copies of a secret shorter than this are not searched for: a
/// 1–3 byte needle matches ordinary output everywhere (mangling it, and
/// showing where the secret's bytes occur), and a value that short is guessed
/// in a few thousand tries anyway. The untrimmed value is always searched for.
pub const MIN_TRIMMED_BYTES: usize = 4;

/// How many layers of JSON escaping (`\\u0041` is two) are decoded.
const MAX_UNESCAPE_DEPTH: usize = 4;

/// Source bytes per decoded byte of the longest JSON escape: `\u0041` for `A`.
const ESCAPE_EXPANSION: usize = 6;

#[derive(Debug, thiserror::Error)]
#[error("the secret values cannot be indexed for redaction: {0}")]
pub struct RedactorError(#[from] aho_corasick::BuildError);

impl RedactorError {
    pub fn reason(&self) -> &'static str {
        "RedactorBuildFailed"
    }
}

/// Finds a tool's secrets in its output; built once per prepared tool.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// The secret values the needles come from.
    values: Vec<Vec<u8>>,
    /// The tool's needles, then (for one call) that call's own: empty when there is
    /// nothing to find.
    matchers: Vec<AhoCorasick>,
    /// What the matcher finds, for secrets cut short at the end of a capture.
    needles: Vec<Vec<u8>>,
    longest: usize,
}

impl Redactor {
    /// Needles: each non-empty value, its whitespace-trimmed form (a file
    /// secret usually ends in a newline the tool may drop) and, for a value
    /// that is not UTF-8, the lossy text an env secret is delivered as.
    pub fn new(values: Vec<Vec<u8>>) -> Result<Redactor, RedactorError> {
        Redactor::default().with_call_secrets(values)
    }

    /// This redactor and `values` too: for one call's own secrets (its Kubernetes
    /// token). The tool's automaton is shared, not rebuilt: only `values` are indexed.
    pub fn with_call_secrets(&self, values: Vec<Vec<u8>>) -> Result<Redactor, RedactorError> {
        let needles = needles_of(&values);
        let mut all = self.clone();
        if !needles.is_empty() {
            all.matchers.push(AhoCorasick::new(&needles)?);
        }
        all.longest = (needles.iter().map(Vec::len))
            .chain([self.longest])
            .max()
            .unwrap_or(0);
        all.needles.extend(needles);
        all.values.extend(values);
        Ok(all)
    }

    /// The secret values this redactor was built from.
    pub fn values(&self) -> &[Vec<u8>] {
        &self.values
    }

    /// How many bytes beyond the output cap a run must capture so that a
    /// secret starting before the cap, even JSON-escaped once, is seen whole.
    pub fn capture_margin(&self) -> usize {
        self.longest * ESCAPE_EXPANSION
    }

    /// `text` with every secret replaced, then cut to `cap` bytes; `true` when
    /// something was cut. Secrets are searched in all of `text` first, so one
    /// that crosses the cut is replaced whole and none of its bytes are kept.
    /// When `text` is longer than `cap` it may be a capture that ended inside
    /// a secret (escaped more than [`Self::capture_margin`] allows for): the
    /// start of a secret at its very end is covered too.
    pub fn redact_capped(&self, text: &[u8], cap: usize) -> (Vec<u8>, bool) {
        let (covered, cut_short) = self.covered(text, text.len() > cap);
        let (out, cut) = splice(text, &covered, cap);
        // A secret cut short was replaced by a marker, but the text goes on.
        (out, cut || cut_short)
    }

    pub fn redact_str(&self, text: &str) -> String {
        self.redacted(text).unwrap_or_else(|| text.to_owned())
    }

    /// `Some` redacted copy of `text` when it holds a secret.
    fn redacted(&self, text: &str) -> Option<String> {
        let (covered, _) = self.covered(text.as_bytes(), false);
        if covered.is_empty() {
            return None;
        }
        let (bytes, _) = splice(text.as_bytes(), &covered, usize::MAX);
        Some(match String::from_utf8(bytes) {
            Ok(text) => text,
            // A needle that is not UTF-8 may have matched inside a character.
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Redacts every string and every object key of a parsed output: the
    /// decoded text the caller will see, whatever escapes the raw bytes used.
    /// Returns whether anything was replaced.
    pub fn redact_json(&self, value: &mut Value) -> bool {
        if self.matchers.is_empty() {
            return false;
        }
        match value {
            Value::String(text) => match self.redacted(text) {
                Some(redacted) => {
                    *text = redacted;
                    true
                }
                None => false,
            },
            Value::Array(items) => items
                .iter_mut()
                .fold(false, |changed, v| self.redact_json(v) | changed),
            Value::Object(map) => {
                let values = map
                    .values_mut()
                    .fold(false, |changed, v| self.redact_json(v) | changed);
                let keys = map.keys().any(|k| self.redacted(k).is_some());
                if keys {
                    *map = std::mem::take(map)
                        .into_iter()
                        .map(|(k, v)| (self.redact_str(&k), v))
                        .collect();
                }
                values || keys
            }
            _ => false,
        }
    }

    /// Sorted, disjoint byte ranges of `text` covered by an occurrence of a
    /// needle in the raw bytes or in one of its unescaped views. Overlapping
    /// occurrences are merged: the tail of one secret that is the head of
    /// another is covered too. With `cut_short`, the start of a secret that
    /// the end of `text` cuts short, in any view, is covered to the end (and
    /// `true` returned with the ranges when there is one).
    fn covered(&self, text: &[u8], cut_short: bool) -> (Vec<Range<usize>>, bool) {
        if self.matchers.is_empty() {
            return (Vec::new(), false);
        }
        let mut found: Vec<Range<usize>> = self
            .matchers
            .iter()
            .flat_map(|matcher| matcher.find_overlapping_iter(text))
            .map(|m| m.range())
            .collect();
        let mut found_cut_short = false;
        if cut_short && let Some(at) = self.cut_short_at(text) {
            found.push(at..text.len());
            found_cut_short = true;
        }
        let mut views: Vec<Unescaped> = Vec::new();
        while views.len() < MAX_UNESCAPE_DEPTH {
            let source = views.last().map_or(text, |v| v.bytes.as_slice());
            let Some(view) = unescape(source) else {
                break;
            };
            let to_source = |range| {
                views
                    .iter()
                    .rev()
                    .fold(view.to_source(range), |r, outer| outer.to_source(r))
            };
            for matcher in &self.matchers {
                for m in matcher.find_overlapping_iter(&view.bytes) {
                    found.push(to_source(m.range()));
                }
            }
            if cut_short && let Some(at) = self.cut_short_at(&view.bytes) {
                found.push(to_source(at..view.bytes.len()));
                found_cut_short = true;
            }
            views.push(view);
        }
        found.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(found.len());
        for range in found {
            match merged.last_mut() {
                Some(last) if range.start < last.end => last.end = last.end.max(range.end),
                _ => merged.push(range),
            }
        }
        (merged, found_cut_short)
    }

    /// Where a secret cut short by the end of `view` may start: the longest
    /// suffix that is a proper prefix of a needle, where an unfinished escape
    /// at the very end counts as the needle's next byte. `None` when the end
    /// of `view` cannot be the start of a secret.
    fn cut_short_at(&self, view: &[u8]) -> Option<usize> {
        let unfinished = unfinished_escape(view);
        let body = &view[..unfinished.unwrap_or(view.len())];
        let mut earliest = unfinished;
        for needle in &self.needles {
            let longest = needle.len().saturating_sub(1).min(body.len());
            // Longest first: the earliest start for this needle.
            let prefix = (1..=longest)
                .rev()
                .find(|&k| body[body.len() - k] == needle[0] && body.ends_with(&needle[..k]));
            if let Some(k) = prefix {
                let at = body.len() - k;
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
        }
        earliest
    }
}

/// What [`Redactor::new`] searches for `values`: sorted, without duplicates or empty ones.
fn needles_of(values: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for value in values {
        needles.push(value.clone());
        let trimmed = value.trim_ascii();
        if trimmed.len() != value.len() && trimmed.len() >= MIN_TRIMMED_BYTES {
            needles.push(trimmed.to_vec());
        }
        if std::str::from_utf8(value).is_err() {
            needles.push(String::from_utf8_lossy(value).into_owned().into_bytes());
        }
    }
    needles.retain(|n| !n.is_empty());
    needles.sort();
    needles.dedup();
    needles
}

/// Where an escape that `text` ends before finishing starts: a lone `\`, a
/// `\u` with fewer than four hex digits, or a high surrogate whose low half
/// is missing or unfinished.
fn unfinished_escape(text: &[u8]) -> Option<usize> {
    /// The longest unfinished escape: `\uD83D\uDD1` (a surrogate pair less one digit).
    const LONGEST: usize = 11;
    let hex = |digits: &[u8]| digits.iter().all(u8::is_ascii_hexdigit);
    let unfinished = |tail: &[u8]| {
        if tail == b"\\" {
            return true;
        }
        if tail.get(1) != Some(&b'u') || !hex(&tail[2..tail.len().min(6)]) {
            return false;
        }
        if tail.len() < 6 {
            return true;
        }
        let high = hex4(&tail[2..6]).is_some_and(|u| (0xD800..0xDC00).contains(&u));
        let (marker, digits) = tail[6..].split_at(tail.len().min(8) - 6);
        high && b"\\u".starts_with(marker)
            && (digits.is_empty() || marker.len() == 2)
            && hex(digits)
    };
    (text.len().saturating_sub(LONGEST)..text.len())
        .find(|&i| text[i] == b'\\' && unfinished(&text[i..]))
}

/// `text` with each of the sorted, disjoint `covered` ranges replaced by
/// [`REDACTED`], cut to `cap` bytes; `true` when something was cut. Ranges
/// that start before the cap are replaced whole.
fn splice(text: &[u8], covered: &[Range<usize>], cap: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(text.len().min(cap));
    let mut at = 0;
    for range in covered {
        if range.start >= cap {
            break;
        }
        out.extend_from_slice(&text[at..range.start]);
        out.extend_from_slice(REDACTED.as_bytes());
        at = range.end;
    }
    let end = text.len().min(cap);
    if at < end {
        out.extend_from_slice(&text[at..end]);
        at = end;
    }
    let cut = at < text.len() || out.len() > cap;
    out.truncate(cap);
    (out, cut)
}

/// A text with its JSON string escapes decoded, and where each escape was.
struct Unescaped {
    bytes: Vec<u8>,
    /// In increasing order of `at`.
    escapes: Vec<Escape>,
}

#[derive(Clone, Copy)]
struct Escape {
    /// Where its decoded bytes start in the view, and how many there are.
    at: usize,
    len: usize,
    /// Where the escape sequence starts in the source, and its length.
    source_at: usize,
    source_len: usize,
}

impl Unescaped {
    /// The source bytes view byte `i` came from: a whole escape, or one byte.
    fn source_span(&self, i: usize) -> Range<usize> {
        let before = self.escapes.partition_point(|e| e.at <= i);
        match before.checked_sub(1).map(|k| self.escapes[k]) {
            Some(e) if i < e.at + e.len => e.source_at..e.source_at + e.source_len,
            Some(e) => {
                let at = e.source_at + e.source_len + (i - e.at - e.len);
                at..at + 1
            }
            None => i..i + 1,
        }
    }

    /// A non-empty range of the view as the range of the source it came from.
    fn to_source(&self, range: Range<usize>) -> Range<usize> {
        self.source_span(range.start).start..self.source_span(range.end - 1).end
    }
}

/// `text` with every valid JSON escape decoded; `None` when it has none.
/// Invalid sequences are kept as they are. Hand-written: serde_json decodes
/// escapes only inside whole, valid strings and cannot say which source bytes
/// each decoded byte came from, which redaction needs to cover them.
fn unescape(text: &[u8]) -> Option<Unescaped> {
    let first = text.iter().position(|&b| b == b'\\')?;
    let mut bytes = Vec::with_capacity(text.len());
    bytes.extend_from_slice(&text[..first]);
    let mut escapes = Vec::new();
    let mut i = first;
    while i < text.len() {
        match (text[i] == b'\\').then(|| escape_at(&text[i..])).flatten() {
            Some((c, source_len)) => {
                let mut utf8 = [0u8; 4];
                let decoded = c.encode_utf8(&mut utf8).as_bytes();
                escapes.push(Escape {
                    at: bytes.len(),
                    len: decoded.len(),
                    source_at: i,
                    source_len,
                });
                bytes.extend_from_slice(decoded);
                i += source_len;
            }
            None => {
                bytes.push(text[i]);
                i += 1;
            }
        }
    }
    (!escapes.is_empty()).then_some(Unescaped { bytes, escapes })
}

/// The character of the JSON escape at the start of `text`, and its length.
fn escape_at(text: &[u8]) -> Option<(char, usize)> {
    let c = match *text.get(1)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => {
            let unit = hex4(text.get(2..6)?)?;
            if let Some(c) = char::from_u32(unit) {
                return Some((c, 6));
            }
            // A surrogate: only a high one followed by an escaped low one is a character.
            let low = text
                .get(6..8)
                .filter(|u| *u == b"\\u")
                .and_then(|_| hex4(text.get(8..12)?))?;
            if !(0xD800..0xDC00).contains(&unit) || !(0xDC00..0xE000).contains(&low) {
                return None;
            }
            return char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                .map(|c| (c, 12));
        }
        _ => return None,
    };
    Some((c, 2))
}

fn hex4(digits: &[u8]) -> Option<u32> {
    digits
        .iter()
        .try_fold(0u32, |n, &d| char::from(d).to_digit(16).map(|v| n * 16 + v))
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

    const SECRET: &str = "sk-live/0123456789";

    fn redactor(values: &[&str]) -> Redactor {
        Redactor::new(values.iter().map(|v| v.as_bytes().to_vec()).collect()).unwrap()
    }

    fn redact(r: &Redactor, text: &str) -> String {
        r.redact_str(text)
    }

    /// `text` with every character written as a `\u` escape.
    fn u_escaped(text: &str) -> String {
        text.encode_utf16().map(|u| format!("\\u{u:04x}")).collect()
    }

    #[test]
    fn every_occurrence_of_every_secret_is_replaced() {
        let r = redactor(&["hunter2", "hunter2xyz", ""]);
        assert_eq!(
            redact(&r, "key=hunter2 again hunter2, long=hunter2xyz"),
            "key=[REDACTED] again [REDACTED], long=[REDACTED]"
        );
    }

    #[test]
    fn overlapping_secrets_are_covered_together() {
        // Leftmost-first matching would take "abcdef" and leave "ghij" of the other.
        let r = redactor(&["abcdef", "defghij"]);
        assert_eq!(redact(&r, "<abcdefghij>"), "<[REDACTED]>");
    }

    #[test]
    fn json_escaped_secrets_are_found_in_raw_text() {
        let r = redactor(&[SECRET]);
        for escaped in [
            r"sk-live\/0123456789".to_string(),
            r"\u0073k-live\/0123456789".to_string(),
            r"sk-live\u002F0123456789".to_string(),
            u_escaped(SECRET),
            // Escaped twice: a caller decoding twice would see it.
            u_escaped(SECRET).replace('\\', r"\\"),
            r"sk-live\\\/0123456789".to_string(),
        ] {
            let text = format!("{{\"t\":\"{escaped}\"}} and {escaped}");
            assert_eq!(
                redact(&r, &text),
                "{\"t\":\"[REDACTED]\"} and [REDACTED]",
                "{escaped}"
            );
        }
    }

    #[test]
    fn escaped_non_ascii_and_surrogate_pairs_are_decoded() {
        let secret = "pässwörd-🔑-key";
        let r = redactor(&[secret]);
        let escaped = u_escaped(secret);
        assert!(escaped.contains(r"\ud83d\udd11"), "{escaped}");
        assert_eq!(redact(&r, &format!("x{escaped}y")), "x[REDACTED]y");
        // A lone surrogate or a broken escape is left as it is.
        assert_eq!(redact(&r, r"\ud83d \u12 \q"), r"\ud83d \u12 \q");
    }

    #[test]
    fn parsed_json_strings_and_keys_are_redacted() {
        let r = redactor(&[SECRET]);
        let mut value: Value = serde_json::from_str(&format!(
            r#"{{"{}": ["a {} b", {{"deep": "{}"}}], "n": 1}}"#,
            u_escaped(SECRET),
            r"sk-live\/0123456789",
            u_escaped(SECRET).replace('\\', r"\\")
        ))
        .unwrap();
        r.redact_json(&mut value);
        assert_eq!(
            value,
            json!({"[REDACTED]": ["a [REDACTED] b", {"deep": "[REDACTED]"}], "n": 1})
        );
    }

    #[test]
    fn trimmed_copies_of_file_secrets_are_redacted() {
        let r = redactor(&["  hunter2-file\r\n", "ab\n"]);
        assert_eq!(
            redact(&r, "a=hunter2-file b=  hunter2-file\r\n c=ab ab\n"),
            "a=[REDACTED] b=[REDACTED] c=ab [REDACTED]"
        );
        assert_eq!(MIN_TRIMMED_BYTES, 4, "the README names this minimum");
    }

    #[test]
    fn a_secret_across_the_cut_leaves_no_prefix() {
        let r = redactor(&[SECRET]);
        let mixed = r"\u0073k-\u006cive\/01\u00323456789";
        for escaped in [
            SECRET.to_string(),
            u_escaped(SECRET),
            mixed.to_string(),
            // Escaped twice: what `json_escaped_secrets_are_found_in_raw_text` redacts whole.
            u_escaped(SECRET).replace('\\', r"\\"),
        ] {
            for before in 0..=escaped.len() {
                let cap = 256;
                let text = format!("{}{escaped}{}", "x".repeat(cap - before), "y".repeat(50));
                let captured = &text.as_bytes()[..text.len().min(cap + r.capture_margin())];
                let (out, cut) = r.redact_capped(captured, cap);
                let out = String::from_utf8(out).unwrap();
                if !cut {
                    // Redacted, all of it fits: nothing may be missing.
                    let whole = r.redact_str(std::str::from_utf8(captured).unwrap());
                    assert_eq!(out, whole, "{before} bytes before the cut");
                }
                assert!(out.len() <= cap, "{out}");
                let kept = out.trim_start_matches('x').trim_end_matches('y');
                assert!(
                    kept.is_empty() || REDACTED.starts_with(kept),
                    "{before} bytes before the cut: {out:?}"
                );
            }
        }
    }

    /// The attack on the capture margin: a secret escaped so heavily that the
    /// capture ends inside it (here every backslash of its `\u` escapes is
    /// itself `\u005c`, 11 bytes a character), wherever that end falls,
    /// including inside an escape or between the halves of a surrogate pair.
    #[test]
    fn a_secret_escaped_past_the_margin_and_cut_by_the_capture_leaves_nothing() {
        let secret = "pässwörd-🔑-key";
        let r = redactor(&[secret]);
        for escaped in [
            u_escaped(secret).replace('\\', r"\u005c"),
            u_escaped(secret).replace('\\', r"\\\\"),
            u_escaped(secret),
        ] {
            let start = 40;
            let text = format!("{}{escaped}", "x".repeat(start));
            for end in start + 1..text.len() {
                let cap = start + (end - start) / 2;
                let (out, cut) = r.redact_capped(&text.as_bytes()[..end], cap);
                let out = String::from_utf8_lossy(&out);
                let kept = out.trim_start_matches('x');
                assert!(cut, "{escaped} cut at {end}");
                assert!(
                    REDACTED.starts_with(kept),
                    "{escaped} captured to {end}, cap {cap}: {out:?}"
                );
            }
        }
        // Output that merely ends like a secret begins loses only that end.
        let (out, _) = r.redact_capped(b"a long enough line ending in p\\u00e4", 20);
        assert_eq!(out, b"a long enough line e");
    }

    #[test]
    fn output_within_the_cap_is_not_cut() {
        let r = redactor(&["hunter2"]);
        assert_eq!(
            r.redact_capped(b"a hunter2", 9),
            (b"a [REDACTED]"[..9].to_vec(), true)
        );
        assert_eq!(r.redact_capped(b"plain", 5), (b"plain".to_vec(), false));
        assert_eq!(
            Redactor::default().redact_capped(b"plain", 3),
            (b"pla".to_vec(), true)
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
