//! Credentials: known formats by pattern, and high-entropy tokens that look
//! like keys. `toolwarden check` uses the same detector for literal secrets.

use std::ops::Range;

use regex::Regex;
use serde::Deserialize;

use super::rules::{self, RuleMask};
use super::{GuardError, Hit};

#[derive(Deserialize)]
struct Format {
    id: String,
    name: String,
    pattern: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entropy {
    min_length: usize,
    bits_per_char: f64,
}

#[derive(Deserialize)]
struct File {
    formats: Vec<Format>,
    entropy: Entropy,
}

/// The rule name of the entropy test; it comes after the formats.
pub const HIGH_ENTROPY: &str = "highEntropy";

/// One regex per format rather than a `RegexSet`: each gets the regex
/// crate's literal prefilter (`AKIA`, `ghp_`, `eyJ`...), so prose is skipped
/// at memchr speed; the set ran its automaton over every byte (7 µs per 4 KiB).
pub(crate) struct Secrets {
    formats: Vec<Format>,
    entropy: Entropy,
    each: Vec<Regex>,
}

impl Secrets {
    pub fn load() -> Result<Secrets, GuardError> {
        let (file, text) = rules::SECRETS;
        let File { formats, entropy } = rules::load(file, text)?;
        let invalid = |e: regex::Error| GuardError::RuleSet {
            file,
            reason: e.to_string(),
        };
        let each = formats
            .iter()
            .map(|f| Regex::new(&f.pattern))
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        Ok(Secrets {
            formats,
            entropy,
            each,
        })
    }

    /// Format ids, then [`HIGH_ENTROPY`].
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.formats
            .iter()
            .map(|f| f.id.as_str())
            .chain([HIGH_ENTROPY])
    }

    /// The human name of the first known format `text` contains.
    pub fn known_format(&self, text: &str) -> Option<&str> {
        self.each
            .iter()
            .position(|format| format.is_match(text))
            .map(|i| self.formats[i].name.as_str())
    }

    #[cfg(test)]
    fn scan<'a>(&'a self, text: &str, mask: RuleMask, out: &mut Vec<Hit<'a>>) {
        self.scan_text(&super::Text::new(text, super::Path::Fast), mask, out);
    }

    pub(super) fn scan_text<'a>(
        &'a self,
        text: &super::Text,
        mask: RuleMask,
        out: &mut Vec<Hit<'a>>,
    ) {
        let (path, text) = (text.path(), text.raw());
        let before = out.len();
        for (index, format) in self.each.iter().enumerate() {
            if !mask.has(index) {
                continue;
            }
            for m in format.find_iter(text) {
                out.push(Hit {
                    rule: &self.formats[index].id,
                    span: Some(m.range()),
                });
            }
        }
        // A random token is a run of token bytes; most strings have none long enough.
        let may_have_tokens = match path {
            super::Path::Fast => super::has_run(text, self.entropy.min_length, is_token_byte),
            #[cfg(test)]
            super::Path::Straightforward => true,
        };
        if mask.has(self.formats.len()) && may_have_tokens {
            let known: Vec<Range<usize>> = out[before..]
                .iter()
                .filter_map(|h| h.span.clone())
                .collect();
            for span in self.random_tokens(text) {
                // A token inside a known format is that format, reported once.
                if !known
                    .iter()
                    .any(|k| k.start <= span.start && span.end <= k.end)
                {
                    out.push(Hit {
                        rule: HIGH_ENTROPY,
                        span: Some(span),
                    });
                }
            }
        }
    }

    /// Spans of tokens that look random enough to be keys.
    pub fn random_tokens<'t>(&self, text: &'t str) -> impl Iterator<Item = Range<usize>> + 't {
        let (min_length, threshold) = (self.entropy.min_length, self.entropy.bits_per_char);
        let bytes = text.as_bytes();
        let mut start = 0;
        std::iter::from_fn(move || {
            while start < bytes.len() {
                while start < bytes.len() && !is_token_byte(bytes[start]) {
                    start += 1;
                }
                let mut end = start;
                while end < bytes.len() && is_token_byte(bytes[end]) {
                    end += 1;
                }
                let span = start..end;
                start = end;
                let token = &text[span.clone()];
                if token.len() >= min_length
                    && shannon_entropy(token) >= threshold
                    && mixes_classes(token)
                {
                    return Some(span);
                }
            }
            None
        })
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+/=_-".contains(&b)
}

fn shannon_entropy(token: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in token.bytes() {
        counts[b as usize] += 1;
    }
    let len = token.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / len;
            -p * p.log2()
        })
        .sum()
}

/// Keys mix upper case, lower case and digits; words, hex digests and UUIDs
/// (one letter case) are common in ordinary values and rarely secrets.
fn mixes_classes(token: &str) -> bool {
    let has = |f: fn(&u8) -> bool| token.as_bytes().iter().any(f);
    has(u8::is_ascii_digit) && has(u8::is_ascii_uppercase) && has(u8::is_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_hit(text: &str) -> Vec<String> {
        let secrets = Secrets::load().unwrap();
        let mut out = Vec::new();
        secrets.scan(text, RuleMask::ALL, &mut out);
        out.iter().map(|h| h.rule.to_string()).collect()
    }

    #[test]
    fn true_positives() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        for (text, rule) in [
            ("key AKIAIOSFODNN7EXAMPLE here", "awsAccessKeyId"),
            ("ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "githubToken"),
            ("xoxb-123456789012-abcdefghijkl", "slackToken"),
            ("AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW", "googleApiKey"),
            ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripeKey"),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
                "privateKey",
            ),
            (jwt, "jwt"),
            ("token Zq8vT2mN4kR7wX1pL9sB3dF6hJ0yC5gA", HIGH_ENTROPY),
        ] {
            assert_eq!(rules_hit(text), vec![rule], "{text}");
        }
    }

    #[test]
    fn uuids_digests_and_prose_are_not_secrets() {
        for text in [
            "550e8400-e29b-41d4-a716-446655440000",
            "550E8400-E29B-41D4-A716-446655440000",
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "https://api.example.com/v1/users?page=2",
            "The quick brown fox jumps over the lazy dog, twice.",
            "AKIA-not-a-key",
            "ghp_short",
        ] {
            assert!(rules_hit(text).is_empty(), "{text}: {:?}", rules_hit(text));
        }
    }
}
