//! Finds credentials written as literal values: known key formats, and
//! high-entropy tokens that look like keys nobody should paste into a manifest.

/// What a literal looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretLook {
    /// Matches a known credential format (the name says which).
    KnownFormat(&'static str),
    /// A long token of high Shannon entropy.
    HighEntropy,
}

/// Classifies `value`, or `None` when it does not look like a credential.
/// The formats and the entropy test are the `secrets` guard's rule set
/// (`src/guards/rules/secrets.yaml`).
pub fn looks_like_secret(value: &str) -> Option<SecretLook> {
    // The built-in rule set is checked by the guards' tests; should it ever
    // fail to load, every value is reported rather than none.
    let Ok(detector) = crate::guards::secrets_detector() else {
        return Some(SecretLook::KnownFormat(
            "value (the credential rule set did not load)",
        ));
    };
    if let Some(name) = detector.known_format(value) {
        return Some(SecretLook::KnownFormat(name));
    }
    detector
        .random_tokens(value)
        .next()
        .map(|_| SecretLook::HighEntropy)
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
