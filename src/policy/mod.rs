//! The security checklist as pure functions: `evaluate(tool, policies,
//! namespace labels) -> Report`. The admission webhook and `toolwarden check`
//! both call this; nothing here does I/O.

mod baseline;
pub mod catalog;
mod engine;
mod facts;
pub mod literal_secrets;
mod matching;
mod rules;
pub mod schema_shape;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::api::{AgentTool, AllowedHostPath, PolicyMode, ToolPolicy};
pub use catalog::{ChecklistItem, Rule};
pub use engine::Engine;
pub use facts::ToolFacts;
pub use matching::{granted_egress_cidrs, policy_applies, policy_grants_to};
pub use rules::WRITE_VERBS;

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    /// Stable rule ID, e.g. `TW-INPUT-002`.
    pub rule: &'static str,
    pub item: ChecklistItem,
    /// Field path in the manifest, e.g. `spec.sandbox.timeoutMs`.
    pub path: String,
    pub message: String,
    /// The ToolPolicy that demanded the rule; `None` for the built-in baseline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// What to do about it: `enforce` rejects, `warn` admits with a warning, `audit` records.
    pub mode: PolicyMode,
}

impl Violation {
    /// Who demanded the rule: `policy NAME`, or `baseline`.
    pub fn source(&self) -> String {
        self.policy
            .as_deref()
            .map_or_else(|| "baseline".into(), |p| format!("policy {p}"))
    }
}

/// Everything one tool breaks.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub violations: Vec<Violation>,
}

impl Report {
    /// True when an enforcing policy (or the baseline) rejects the tool.
    pub fn denied(&self) -> bool {
        self.violations
            .iter()
            .any(|v| v.mode == PolicyMode::Enforce)
    }

    /// Violations of one mode.
    pub fn with_mode(&self, mode: PolicyMode) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(move |v| v.mode == mode)
    }
}

/// Checks `tool` against the baseline and every policy that selects it.
/// `namespace_labels` are the labels of the tool's namespace.
pub fn evaluate(
    tool: &AgentTool,
    policies: &[ToolPolicy],
    namespace_labels: &BTreeMap<String, String>,
) -> Report {
    let facts = ToolFacts::analyze(&tool.spec);
    evaluate_with_facts(tool, &facts, policies, namespace_labels)
}

/// As [`evaluate`], with the per-tool analysis done by the caller (it depends on the
/// tool alone, so a caller checking one tool against many policy sets reuses it).
pub fn evaluate_with_facts(
    tool: &AgentTool,
    facts: &ToolFacts,
    policies: &[ToolPolicy],
    namespace_labels: &BTreeMap<String, String>,
) -> Report {
    let mut violations = Vec::new();
    let empty = BTreeMap::new();
    let tool_labels = tool.metadata.labels.as_ref().unwrap_or(&empty);
    let applying: Vec<&ToolPolicy> = policies
        .iter()
        .filter(|policy| policy_applies(policy, tool_labels, namespace_labels))
        .collect();
    // The baseline refuses hostPath mounts except where an administrator's policy allows them.
    let host_paths: Vec<&AllowedHostPath> = applying
        .iter()
        .filter_map(|p| p.spec.rules.least_privilege.as_ref())
        .flat_map(|rules| &rules.allowed_host_paths)
        .collect();
    baseline::check(&tool.spec, facts, &host_paths, &mut violations);
    for policy in applying {
        rules::check(policy, &tool.spec, facts, &mut violations);
    }
    Report { violations }
}
