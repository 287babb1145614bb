//! ToolPolicy create/update: what the CRD schema cannot say. A selector the
//! engine cannot parse would select every tool, a malformed quantity or
//! pattern would never match: each is refused with its exact field path.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::core::{DynamicObject, Selector};

use super::review::{deny, typed_object};
use crate::api::names::{absolute_clean_path, dns1123_subdomain};
use crate::api::{ToolPolicy, ToolPolicySpec, parse_quantity};

/// Verbs of Kubernetes RBAC; anything else in `allowedVerbs` is a typo that would
/// silently allow nothing.
const RBAC_VERBS: &[&str] = &[
    "*",
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "bind",
    "escalate",
    "impersonate",
    "use",
    "approve",
    "sign",
    "proxy",
];

pub fn admit(request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return AdmissionResponse::from(request);
    }
    let policy: ToolPolicy = match typed_object(request, false) {
        Ok(policy) => policy,
        Err(denied) => return *denied,
    };
    let problems = problems(&policy.spec);
    if problems.is_empty() {
        return AdmissionResponse::from(request);
    }
    let listed: Vec<String> = problems
        .iter()
        .map(|(path, message)| format!("{path}: {message}"))
        .collect();
    deny(
        request,
        "InvalidPolicy",
        format!(
            "ToolPolicy {} has {} malformed rule(s): {}",
            request.name,
            problems.len(),
            listed.join("; ")
        ),
    )
}

/// Every malformed field of a policy, as `(path, message)`.
pub fn problems(spec: &ToolPolicySpec) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut flag = |path: String, message: String| found.push((path, message));
    for (field, selector) in [
        ("namespaceSelector", &spec.namespace_selector),
        ("toolSelector", &spec.tool_selector),
    ] {
        if let Some(error) = selector.as_ref().and_then(selector_error) {
            flag(format!("spec.{field}"), error);
        }
    }
    let rules = &spec.rules;
    if let Some(lp) = &rules.least_privilege {
        let base = "spec.rules.leastPrivilege";
        for (i, verb) in lp.allowed_verbs.iter().flatten().enumerate() {
            if !RBAC_VERBS.contains(&verb.as_str()) {
                flag(
                    format!("{base}.allowedVerbs[{i}]"),
                    format!(
                        "{verb:?} is not a Kubernetes RBAC verb (one of {})",
                        RBAC_VERBS.join(", ")
                    ),
                );
            }
        }
        for (i, resource) in lp.allowed_resources.iter().flatten().enumerate() {
            if resource.trim().is_empty() || resource.chars().any(char::is_whitespace) {
                flag(
                    format!("{base}.allowedResources[{i}]"),
                    format!("{resource:?} is not a resource name"),
                );
            }
        }
        for (i, path) in lp.allowed_writable_paths.iter().flatten().enumerate() {
            if absolute_clean_path(path).is_err() {
                flag(
                    format!("{base}.allowedWritablePaths[{i}]"),
                    format!(
                        "{path:?} is not an absolute path without `.`, `..` or empty components"
                    ),
                );
            }
        }
        for (i, registry) in lp.allowed_registries.iter().flatten().enumerate() {
            if registry.is_empty()
                || registry.contains("://")
                || registry.chars().any(char::is_whitespace)
            {
                flag(
                    format!("{base}.allowedRegistries[{i}]"),
                    format!(
                        "{registry:?} is not an image reference prefix such as `ghcr.io/acme/` (no scheme, no spaces)"
                    ),
                );
            }
        }
    }
    if let Some(sb) = &rules.sandboxing {
        let base = "spec.rules.sandboxing";
        if let Some(max) = &sb.max_memory {
            match parse_quantity(max) {
                Ok(bytes) if bytes > 0.0 => {}
                Ok(_) => flag(
                    format!("{base}.maxMemory"),
                    format!("{:?} is not positive", max.0),
                ),
                Err(e) => flag(format!("{base}.maxMemory"), e.to_string()),
            }
        }
        for (i, pattern) in sb.allowed_egress_hosts.iter().flatten().enumerate() {
            if !egress_pattern(pattern) {
                flag(
                    format!("{base}.allowedEgressHosts[{i}]"),
                    format!("{pattern:?} is neither a lowercase host name nor `*.suffix`"),
                );
            }
        }
        for (i, class) in sb.allowed_runtime_classes.iter().flatten().enumerate() {
            if dns1123_subdomain(class).is_err() {
                flag(
                    format!("{base}.allowedRuntimeClasses[{i}]"),
                    format!("{class:?} is not a RuntimeClass name (DNS-1123 subdomain)"),
                );
            }
        }
        if sb.require_runtime_class
            && sb
                .allowed_runtime_classes
                .as_ref()
                .is_some_and(Vec::is_empty)
        {
            flag(
                format!("{base}.requireRuntimeClass"),
                "requires a runtime class while allowedRuntimeClasses allows none: no tool could pass".into(),
            );
        }
    }
    found
}

fn selector_error(selector: &LabelSelector) -> Option<String> {
    Selector::try_from(selector.clone())
        .err()
        .map(|e| e.to_string())
}

/// An egress pattern as `permissions.network.egress[].host` takes it.
fn egress_pattern(pattern: &str) -> bool {
    let host = pattern.strip_prefix("*.").unwrap_or(pattern);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}
