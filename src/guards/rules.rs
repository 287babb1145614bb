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
