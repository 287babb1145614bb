//! Which policies select which tools.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

use crate::api::{AgentTool, EgressCidr, ToolPolicy};

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

/// True when the policy certainly selects the tool: as [`policy_applies`], but
/// a selector that cannot be parsed selects nothing. For what a policy grants
/// (such as `allowedEgressCidrs`): a broken policy must not widen access.
pub fn policy_grants_to(
    policy: &ToolPolicy,
    tool_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> bool {
    let strict = |selector: Option<&LabelSelector>, labels| match selector {
        None => true,
        Some(selector) => Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels)),
    };
    strict(policy.spec.namespace_selector.as_ref(), namespace_labels)
        && strict(policy.spec.tool_selector.as_ref(), tool_labels)
}

/// `sandboxing.allowedEgressCidrs` of every policy that selects `tool`, each once.
pub fn granted_egress_cidrs(
    tool: &AgentTool,
    policies: &[ToolPolicy],
    namespace_labels: &BTreeMap<String, String>,
) -> Vec<EgressCidr> {
    let tool_labels = tool.metadata.labels.clone().unwrap_or_default();
    let mut cidrs: Vec<EgressCidr> = Vec::new();
    for policy in policies
        .iter()
        .filter(|p| policy_grants_to(p, &tool_labels, namespace_labels))
    {
        let granted = policy
            .spec
            .rules
            .sandboxing
            .as_ref()
            .map(|s| s.allowed_egress_cidrs.as_slice())
            .unwrap_or_default();
        for cidr in granted {
            if !cidrs.contains(cidr) {
                cidrs.push(cidr.clone());
            }
        }
    }
    cidrs
}

fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        None => true,
        Some(selector) => Selector::try_from(selector.clone())
            .map(|s| s.matches(labels))
            .unwrap_or(true),
    }
}
