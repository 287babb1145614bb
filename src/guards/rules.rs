//! The built-in rule sets: versioned YAML data files compiled into the binary
//! and parsed once.

use serde::Deserialize;

use super::GuardError;

/// Loads one rule-set file; `file` names it in errors.
pub(super) fn load<T: for<'de> Deserialize<'de>>(
    file: &'static str,
    text: &'static str,
) -> Result<T, GuardError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let invalid = |reason: String| GuardError::RuleSet { file, reason };
    let head: Versioned =
        serde_yaml::from_str(text).map_err(|e| invalid(format!("no version: {e}")))?;
    if head.version != 1 {
        return Err(invalid(format!("unsupported version {}", head.version)));
    }
    serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))
}

pub(super) const PII: (&str, &str) = ("pii.yaml", include_str!("rules/pii.yaml"));
pub(super) const SECRETS: (&str, &str) = ("secrets.yaml", include_str!("rules/secrets.yaml"));
pub(super) const PROMPT_INJECTION: (&str, &str) = (
    "prompt_injection.yaml",
    include_str!("rules/prompt_injection.yaml"),
);
pub(super) const MALICIOUS: (&str, &str) = ("malicious.yaml", include_str!("rules/malicious.yaml"));

/// Bytes of which every match of some patterns contains at least one: a
/// string with none of them cannot match, and is skipped without running the
/// patterns' automaton (the pii patterns need a digit, `@` or `+`).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RequiredBytes([bool; 256]);

impl RequiredBytes {
    /// For all of `patterns`; every byte when one of them needs none
    /// (it can match without consuming a byte, or the analysis gives up).
    pub fn of<'p>(patterns: impl IntoIterator<Item = &'p str>) -> Result<RequiredBytes, String> {
        let mut union = [false; 256];
        for pattern in patterns {
            let hir = regex_syntax::parse(pattern).map_err(|e| e.to_string())?;
            match required(&hir) {
                Some(bytes) => union.iter_mut().zip(bytes).for_each(|(u, b)| *u |= b),
                None => return Ok(RequiredBytes([true; 256])),
            }
        }
        Ok(RequiredBytes(union))
    }

    pub fn found_in(&self, text: &str) -> bool {
        text.bytes().any(|b| self.0[b as usize])
    }
}

/// A set of bytes every match of `hir` contains one of: a literal's first
/// byte, a class's bytes (UTF-8 lead bytes for non-ASCII), the rarest set of
/// a concatenation's parts, the union of an alternation's branches.
fn required(hir: &regex_syntax::hir::Hir) -> Option<[bool; 256]> {
    use regex_syntax::hir::{Class, HirKind};
    let mut set = [false; 256];
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => return None,
        HirKind::Literal(literal) => set[usize::from(*literal.0.first()?)] = true,
        HirKind::Class(Class::Bytes(class)) => {
            for range in class.ranges() {
                set[usize::from(range.start())..=usize::from(range.end())].fill(true);
            }
        }
        HirKind::Class(Class::Unicode(class)) => {
            for range in class.ranges() {
                let (start, end) = (u32::from(range.start()), u32::from(range.end()));
                if start < 0x80 {
                    set[start as usize..=end.min(0x7F) as usize].fill(true);
                }
                if end >= 0x80 {
                    set[0x80..].fill(true);
                }
            }
        }
        HirKind::Repetition(repetition) if repetition.min >= 1 => return required(&repetition.sub),
        HirKind::Repetition(_) => return None,
        HirKind::Capture(capture) => return required(&capture.sub),
        HirKind::Concat(parts) => {
            return parts.iter().filter_map(required).min_by_key(|set| {
                (0..=255u8)
                    .filter(|&b| set[usize::from(b)])
                    .map(prose_weight)
                    .sum::<usize>()
            });
        }
        HirKind::Alternation(branches) => {
            for branch in branches {
                set.iter_mut()
                    .zip(required(branch)?)
                    .for_each(|(s, b)| *s |= b);
            }
        }
    }
    Some(set)
}

/// How common a byte is in prose: letters, white space, non-ASCII text and
/// sentence punctuation are everywhere, digits and other symbols are not.
fn prose_weight(byte: u8) -> usize {
    if byte.is_ascii_alphabetic()
        || byte.is_ascii_whitespace()
        || !byte.is_ascii()
        || b",.;:!?'\"()-".contains(&byte)
    {
        16
    } else {
        1
    }
}

/// A set of rule names a declaration enabled, by index into its rule set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RuleMask(u128);

impl RuleMask {
    pub const ALL: RuleMask = RuleMask(u128::MAX);
    pub const NONE: RuleMask = RuleMask(0);

    pub fn with(self, index: usize) -> RuleMask {
        RuleMask(self.0 | (1 << index))
    }

    pub fn has(self, index: usize) -> bool {
        self.0 & (1 << index) != 0
    }
}

impl RuleMask {
    pub fn union(self, other: RuleMask) -> RuleMask {
        RuleMask(self.0 | other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::RequiredBytes;

    fn bytes(patterns: &[&str]) -> Vec<u8> {
        let set = RequiredBytes::of(patterns.iter().copied()).unwrap();
        (0..=255u8).filter(|&b| set.0[usize::from(b)]).collect()
    }

    #[test]
    fn required_bytes_are_those_every_match_contains() {
        assert_eq!(bytes(&["(?i)drop"]), b"Dd");
        assert_eq!(bytes(&["x|y+", r"\bab"]), b"axy");
        assert_eq!(bytes(&["[0-9]+@x", "z{2}"]), b"@z");
        assert_eq!(bytes(&["é"]), vec![0xC3]);
        assert_eq!(bytes(&["[a-cé]"]).len(), 3 + 128);
        // A pattern that can match without a byte needs none: every byte.
        for pattern in ["a?", "x*", r"\b", "a|"] {
            assert_eq!(bytes(&["q", pattern]).len(), 256, "{pattern}");
        }
    }
}
