//! Finds credentials written as literal values: known key formats, and
//! high-entropy tokens that look like keys nobody should paste into a manifest.

use std::sync::LazyLock;

use regex::RegexSet;

/// What a literal looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretLook {
    /// Matches a known credential format (the name says which).
    KnownFormat(&'static str),
    /// A long token of high Shannon entropy.
    HighEntropy,
}

const KNOWN_FORMATS: &[(&str, &str)] = &[
    ("AWS access key ID", r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("GitHub token", r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    (
        "GitHub fine-grained token",
        r"\bgithub_pat_[A-Za-z0-9_]{50,}\b",
    ),
    ("GitLab token", r"\bglpat-[A-Za-z0-9_-]{20,}\b"),
    ("Slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    ("Stripe key", r"\b[rs]k_(live|test)_[A-Za-z0-9]{16,}\b"),
    ("Google API key", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("OpenAI-style API key", r"\bsk-(proj-)?[A-Za-z0-9_-]{20,}\b"),
    ("Anthropic API key", r"\bsk-ant-[A-Za-z0-9_-]{20,}"),
    ("private key", r"-----BEGIN ([A-Z]+ )?PRIVATE KEY-----"),
    (
        "JSON Web Token",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    ),
    (
        "credentials in a URL",
        r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@",
    ),
];

static KNOWN: LazyLock<RegexSet> = LazyLock::new(|| {
    RegexSet::new(KNOWN_FORMATS.iter().map(|(_, re)| *re)).expect("credential patterns compile")
});

/// Shortest token considered for the entropy test: shorter random strings are
/// too common (ids, hashes in args) and too weak to be keys.
const MIN_ENTROPY_TOKEN: usize = 24;
/// Bits per character above which a token looks random; English text and
/// paths sit well below 4, base64 keys of this length above 4.3.
const ENTROPY_THRESHOLD: f64 = 4.3;

/// Classifies `value`, or `None` when it does not look like a credential.
pub fn looks_like_secret(value: &str) -> Option<SecretLook> {
    if let Some(index) = KNOWN.matches(value).iter().next() {
        return Some(SecretLook::KnownFormat(KNOWN_FORMATS[index].0));
    }
    let random_token = value
        .split(|c: char| !(c.is_ascii_alphanumeric() || "+/=_-".contains(c)))
        .filter(|token| token.len() >= MIN_ENTROPY_TOKEN)
        .any(|token| shannon_entropy(token) >= ENTROPY_THRESHOLD && mixes_classes(token));
    random_token.then_some(SecretLook::HighEntropy)
}

/// Env var names that say the value is a credential, matched on whole
/// `_`-separated words so `TOKENIZER_PATH` is not taken for a token.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    let words: Vec<&str> = upper.split('_').collect();
    let single = [
        "PASSWORD",
        "PASSWD",
        "SECRET",
        "TOKEN",
        "APIKEY",
        "CREDENTIAL",
        "CREDENTIALS",
    ];
    let pairs = [
        ("API", "KEY"),
        ("PRIVATE", "KEY"),
        ("ACCESS", "KEY"),
        ("SECRET", "KEY"),
    ];
    words.iter().any(|w| single.contains(w))
        || words.windows(2).any(|p| pairs.contains(&(p[0], p[1])))
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
            let p = c as f64 / len;
            -p * p.log2()
        })
        .sum()
}

/// Keys mix letters and digits; long all-letter words and hex digests of
/// images or commits are common in args and rarely secrets on their own.
fn mixes_classes(token: &str) -> bool {
    let has = |f: fn(&u8) -> bool| token.as_bytes().iter().any(f);
    let all_hex = token.bytes().all(|b| b.is_ascii_hexdigit());
    has(u8::is_ascii_digit)
        && has(u8::is_ascii_uppercase)
        && has(u8::is_ascii_lowercase)
        && !all_hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_known_credential_formats() {
        for (value, kind) in [
            ("AKIAIOSFODNN7EXAMPLE", "AWS access key ID"),
            (
                "token=ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
                "GitHub token",
            ),
            ("-----BEGIN RSA PRIVATE KEY-----", "private key"),
            ("postgres://app:hunter2@db:5432/app", "credentials in a URL"),
        ] {
            assert_eq!(
                looks_like_secret(value),
                Some(SecretLook::KnownFormat(kind)),
                "{value}"
            );
        }
    }

    #[test]
    fn finds_random_keys_but_not_ordinary_values() {
        assert_eq!(
            looks_like_secret("Zq8vT2mN4kR7wX1pL9sB3dF6hJ0yC5gA"),
            Some(SecretLook::HighEntropy)
        );
        for plain in [
            "https://api.example.com/v1/users",
            "--max-connections=100",
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "/usr/local/bin/tool-runner-with-a-long-name",
            "INFO",
        ] {
            assert_eq!(looks_like_secret(plain), None, "{plain}");
        }
    }

    #[test]
    fn secret_names() {
        assert!(
            is_secret_name("db_password")
                && is_secret_name("GITHUB_TOKEN")
                && is_secret_name("X_API_KEY")
        );
        assert!(
            !is_secret_name("LOG_LEVEL")
                && !is_secret_name("TOKENIZER_PATH")
                && !is_secret_name("KEYBOARD")
        );
    }
}
