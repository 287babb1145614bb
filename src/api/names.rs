//! Kubernetes object names and keys that the runner also uses as file names
//! (`VOLUMES/pvc/<claim>`, `SECRETS/<secretName>/<key>`). One pattern each,
//! used by the CRD schema (so `check` and the API server refuse bad names)
//! and again by the runner before it touches a path.

use std::sync::LazyLock;

use regex::Regex;

/// A DNS-1123 subdomain (ConfigMap, PersistentVolumeClaim and Secret names):
/// dot-separated lowercase labels, so never `.`, `..` or a `/`.
pub const DNS1123_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
pub const DNS1123_SUBDOMAIN_MAX: usize = 253;

/// A ConfigMap or Secret key: `[-._a-zA-Z0-9]+`, but not `.`, `..` nor
/// starting with `..` (Kubernetes' `IsConfigMapKey`), written without
/// look-ahead so Go (the API server) and Rust read it alike.
pub const CONFIG_KEY: &str = r"^(\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*)$";
pub const CONFIG_KEY_MAX: usize = 253;

/// An absolute host path with no `.` or `..` component and no empty one
/// (`//`), so a prefix check on the text is a check on the folder.
pub const ABSOLUTE_CLEAN_PATH: &str = r"^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+/?$|^/$";

static SUBDOMAIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(DNS1123_SUBDOMAIN).expect("valid pattern"));
static KEY: LazyLock<Regex> = LazyLock::new(|| Regex::new(CONFIG_KEY).expect("valid pattern"));
static CLEAN_PATH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(ABSOLUTE_CLEAN_PATH).expect("valid pattern"));

/// Why a name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "{0:?} is not a Kubernetes name (DNS-1123 subdomain: lowercase letters, digits, `-` and `.`, at most 253 characters)"
    )]
    NotSubdomain(String),
    #[error(
        "{0:?} is not a Kubernetes key (letters, digits, `-`, `_` and `.`, not `.`/`..`, at most 253 characters)"
    )]
    NotKey(String),
    #[error("{0:?} is not an absolute path without `.`, `..` or empty components")]
    NotCleanPath(String),
}

impl NameError {
    pub fn reason(&self) -> &'static str {
        match self {
            NameError::NotSubdomain(_) => "InvalidName",
            NameError::NotKey(_) => "InvalidKey",
            NameError::NotCleanPath(_) => "InvalidPath",
        }
    }
}

pub fn dns1123_subdomain(name: &str) -> Result<&str, NameError> {
    (name.len() <= DNS1123_SUBDOMAIN_MAX && SUBDOMAIN.is_match(name))
        .then_some(name)
        .ok_or_else(|| NameError::NotSubdomain(name.into()))
}

pub fn config_key(key: &str) -> Result<&str, NameError> {
    (key.len() <= CONFIG_KEY_MAX && KEY.is_match(key))
        .then_some(key)
        .ok_or_else(|| NameError::NotKey(key.into()))
}

pub fn absolute_clean_path(path: &str) -> Result<&str, NameError> {
    CLEAN_PATH
        .is_match(path)
        .then_some(path)
        .ok_or_else(|| NameError::NotCleanPath(path.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversing_names_are_refused() {
        for bad in [
            "..", ".", "../x", "a/b", "A", "-a", "a-", "", "a..b", "a/../b",
        ] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad}");
        }
        // Encoded and look-alike dots and slashes, and a newline for `$`.
        for bad in [
            "%2e%2e",
            "%2e%2e%2foutside",
            "\\u002e\\u002e",
            "\u{2024}\u{2024}",
            "\u{ff0e}\u{ff0e}",
            "a\u{2215}b",
            "a\u{ff0f}b",
            "outside\n",
            "a\n..",
            "a\0",
            "\u{ff41}",
            ".a",
            "a.",
        ] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad:?}");
        }
        for bad in ["\u{ff0e}\u{ff0e}", "..\n", "a\u{2215}b", "%2e%2e%2fx"] {
            assert!(config_key(bad).is_err(), "{bad:?}");
        }
        assert!(dns1123_subdomain(&"a".repeat(254)).is_err());
        for good in ["a", "agent-workspace", "a.b-c.d", "0"] {
            assert!(dns1123_subdomain(good).is_ok(), "{good}");
        }
        for bad in [".", "..", "..data", "../x", "a/b", "", "x y"] {
            assert!(config_key(bad).is_err(), "{bad}");
        }
        for good in ["token", ".dockerconfigjson", "tls.crt", "A_b-c"] {
            assert!(config_key(good).is_ok(), "{good}");
        }
        for bad in [
            "x",
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/..",
            "/a/..",
            "relative/a",
            "",
        ] {
            assert!(absolute_clean_path(bad).is_err(), "{bad}");
        }
        for good in ["/", "/srv/data", "/srv/data/", "/a/.hidden", "/a/..x"] {
            assert!(absolute_clean_path(good).is_ok(), "{good}");
        }
    }
}
