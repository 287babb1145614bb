//! Which policies select which tools.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

use crate::api::ToolPolicy;

/// True when the policy's namespace and tool selectors both match. A selector
/// that cannot be parsed selects everything: a broken policy must tighten, not
/// silently stop applying.
pub fn policy_applies(
    policy: &ToolPolicy,
    tool_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> bool {
    selects(policy.spec.namespace_selector.as_ref(), namespace_labels)
        && selects(policy.spec.tool_selector.as_ref(), tool_labels)
}

fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        None => true,
        Some(selector) => Selector::try_from(selector.clone())
            .map(|s| s.matches(labels))
            .unwrap_or(true),
    }
}
