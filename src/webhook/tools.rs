//! AgentTool create/update: the checklist engine `toolwarden check` uses, with
//! the ToolPolicies and the namespace's real labels from the stores.
//! `enforce` violations deny (every one named), `warn` ones come back as
//! admission warnings, `audit` ones as an audit annotation.

use std::collections::HashMap;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};

use super::cluster::ClusterView;
use super::review::{deny, typed_object};
use crate::api::{AgentTool, PolicyMode};
use crate::policy::{Engine, Violation};

/// Audit annotation key (the API server prefixes it with the webhook's name).
pub const AUDIT_ANNOTATION: &str = "violations";

pub fn admit(
    request: &AdmissionRequest<DynamicObject>,
    view: &ClusterView,
    engine: &Engine,
) -> AdmissionResponse {
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return AdmissionResponse::from(request);
    }
    let tool: AgentTool = match typed_object(request, false) {
        Ok(tool) => tool,
        Err(denied) => return *denied,
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| tool.metadata.namespace.clone())
        .unwrap_or_default();
    let Some(namespace_labels) = view.namespace_labels(&namespace) else {
        return deny(
            request,
            "NamespaceUnknown",
            format!(
                "namespace {namespace:?} is not yet known to toolwarden's webhook, so the \
                 policies that select it cannot be decided; retry in a few seconds"
            ),
        );
    };
    let report = engine.evaluate(&tool, &view.policies(), &namespace_labels);
    let name = format!("{namespace}/{}", request.name);
    let mut response = AdmissionResponse::from(request);
    let warnings: Vec<String> = report
        .with_mode(PolicyMode::Warn)
        .map(|v| format!("{} (warn, {})", line(v), v.source()))
        .collect();
    let audited: Vec<&Violation> = report.with_mode(PolicyMode::Audit).collect();
    if !audited.is_empty() {
        let record = serde_json::to_string(&audited).unwrap_or_default();
        response.audit_annotations = HashMap::from([(AUDIT_ANNOTATION.to_string(), record)]);
    }
    if report.denied() {
        let enforced: Vec<&Violation> = report.with_mode(PolicyMode::Enforce).collect();
        if is_unchanged(request, &tool) {
            // A tool a new policy made non-compliant must still take finalizer and
            // deletion updates; its spec and labels (what the verdict depends on) did not move.
            let mut warnings = warnings;
            warnings.extend(enforced.iter().map(|v| {
                format!(
                    "{} ({}; allowed: spec and labels unchanged)",
                    line(v),
                    v.source()
                )
            }));
            response.warnings = Some(warnings);
            return response;
        }
        let listed: Vec<String> = enforced
            .iter()
            .map(|v| format!("{} ({})", line(v), v.source()))
            .collect();
        let mut denied = deny(
            request,
            "PolicyViolation",
            format!(
                "AgentTool {name} violates {} enforced rule(s): {}",
                enforced.len(),
                listed.join("; ")
            ),
        );
        denied.warnings = (!warnings.is_empty()).then_some(warnings);
        denied.audit_annotations = response.audit_annotations;
        return denied;
    }
    response.warnings = (!warnings.is_empty()).then_some(warnings);
    response
}

/// `RULE path: message`, as `toolwarden check` prints it.
fn line(v: &Violation) -> String {
    format!("{} {}: {}", v.rule, v.path, v.message)
}

/// An update that leaves the spec and labels as they were (metadata only).
fn is_unchanged(request: &AdmissionRequest<DynamicObject>, tool: &AgentTool) -> bool {
    if request.operation != Operation::Update {
        return false;
    }
    match typed_object::<AgentTool>(request, true) {
        Ok(old) => old.spec == tool.spec && old.metadata.labels == tool.metadata.labels,
        Err(_) => false,
    }
}
