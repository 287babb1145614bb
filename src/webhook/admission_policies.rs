//! Defence in depth: the checklist rules CEL can express, as
//! ValidatingAdmissionPolicies the API server evaluates itself, so they hold
//! even while the webhook is down. One policy per ToolPolicy mode, each with
//! every ToolPolicy as a parameter (`paramKind: ToolPolicy`): a rule applies
//! when the ToolPolicy selects the tool (its selectors are evaluated in CEL
//! against the tool's and the namespace's labels) and has that mode; `enforce`
//! is bound with `Deny`, `warn` with `Warn`, `audit` with `Audit`. A baseline
//! policy without parameters carries the baseline rules CEL can express.
//!
//! Not expressible here, so held by the webhook alone: the input-schema analysis
//! (TW-INPUT-001..004, 006, TW-SANITIZE-001/002), compiling CEL
//! (TW-PRIV-008, TW-OVERSIGHT-003), host paths allowed by any policy (TW-PRIV-009),
//! path and egress pattern matching (TW-PRIV-005, TW-SANDBOX-004), quantities
//! (TW-SANDBOX-002, TW-SANDBOX-006) and the secret scanners (TW-SECRET-001..004).

use serde_json::{Value, json};

use crate::api::PolicyMode;
use crate::policy::{Rule, WRITE_VERBS, catalog};

/// One rule as CEL: `ok` is true when the tool passes; `R` stands for `params.spec.rules`.
pub struct CelRule {
    pub rule: &'static Rule,
    pub path: &'static str,
    pub ok: String,
}

const K8S: &str =
    "(has(object.spec.permissions.kubernetes) ? object.spec.permissions.kubernetes : [])";
const SECRETS: &str = "(has(object.spec.secrets) ? object.spec.secrets : [])";

/// The rules a ToolPolicy demands, in CEL.
pub fn policy_rules() -> Vec<CelRule> {
    let write_verbs = serde_json::to_string(WRITE_VERBS).expect("strings serialize");
    let cel = |rule: &'static Rule, path: &'static str, ok: String| CelRule { rule, path, ok };
    vec![
        cel(&catalog::INPUT_BYTES_CAPPED, "spec.maxInputBytes",
            "!has(R.inputValidation) || !has(R.inputValidation.maxInputBytes) || object.spec.maxInputBytes <= R.inputValidation.maxInputBytes".into()),
        cel(&catalog::KUBE_VERB_ALLOWED, "spec.permissions.kubernetes",
            format!("!has(R.leastPrivilege) || !has(R.leastPrivilege.allowedVerbs) || {K8S}.all(k, k.verbs.all(v, v in R.leastPrivilege.allowedVerbs))")),
        cel(&catalog::KUBE_RESOURCE_ALLOWED, "spec.permissions.kubernetes",
            format!("!has(R.leastPrivilege) || !has(R.leastPrivilege.allowedResources) || {K8S}.all(k, k.resources.all(r, r in R.leastPrivilege.allowedResources))")),
        cel(&catalog::NO_SECRET_ACCESS, "spec.permissions.kubernetes",
            format!("!has(R.leastPrivilege) || !R.leastPrivilege.forbidSecretAccess || !{K8S}.exists(k, k.apiGroups.exists(g, g == '' || g == '*') && k.resources.exists(r, r == 'secrets' || r == '*' || r.startsWith('secrets/')))")),
        cel(&catalog::NO_CLUSTER_SCOPE, "spec.permissions.kubernetes",
            format!("!has(R.leastPrivilege) || !R.leastPrivilege.forbidClusterScope || !{K8S}.exists(k, has(k.clusterWide) && k.clusterWide)")),
        cel(&catalog::IMAGE_REGISTRY_ALLOWED, "spec.runtime.image",
            "!has(R.leastPrivilege) || !has(R.leastPrivilege.allowedRegistries) || R.leastPrivilege.allowedRegistries.exists(p, object.spec.runtime.image.startsWith(p))".into()),
        cel(&catalog::IMAGE_PINNED, "spec.runtime.image",
            "!has(R.leastPrivilege) || !R.leastPrivilege.requireImageDigest || object.spec.runtime.image.matches('@sha256:[0-9a-fA-F]{64}$')".into()),
        cel(&catalog::TIMEOUT_CAPPED, "spec.sandbox.timeoutMs",
            "!has(R.sandboxing) || !has(R.sandboxing.maxTimeoutMs) || object.spec.sandbox.timeoutMs <= R.sandboxing.maxTimeoutMs".into()),
        cel(&catalog::PIDS_CAPPED, "spec.sandbox.pids",
            "!has(R.sandboxing) || !has(R.sandboxing.maxPids) || object.spec.sandbox.pids <= R.sandboxing.maxPids".into()),
        cel(&catalog::RUNTIME_CLASS_ALLOWED, "spec.sandbox.runtimeClassName",
            "!has(R.sandboxing) || (has(object.spec.sandbox.runtimeClassName) ? (!has(R.sandboxing.allowedRuntimeClasses) || object.spec.sandbox.runtimeClassName in R.sandboxing.allowedRuntimeClasses) : !R.sandboxing.requireRuntimeClass)".into()),
        cel(&catalog::AUDIT_LEVEL_MINIMUM, "spec.audit.input",
            "!has(R.auditLogging) || !has(R.auditLogging.minLevel) || {'none': 0, 'digest': 1, 'redacted': 2, 'full': 3}[object.spec.audit.input] >= {'none': 0, 'digest': 1, 'redacted': 2, 'full': 3}[R.auditLogging.minLevel]".into()),
        cel(&catalog::AUDIT_NO_FULL_WITH_SECRETS, "spec.audit.input",
            format!("!has(R.auditLogging) || !R.auditLogging.forbidFullWithSecrets || object.spec.audit.input != 'full' || size({SECRETS}) == 0")),
        cel(&catalog::APPROVAL_FOR_RISK, "spec.approval.required",
            "!has(R.humanOversight) || !has(R.humanOversight.requireApprovalForRisk) || (has(object.spec.approval) && object.spec.approval.required) || !(object.spec.risk in R.humanOversight.requireApprovalForRisk)".into()),
        cel(&catalog::APPROVAL_FOR_KUBE_WRITES, "spec.approval.required",
            format!("!has(R.humanOversight) || !R.humanOversight.requireApprovalForKubernetesWrites || (has(object.spec.approval) && object.spec.approval.required) || !{K8S}.exists(k, k.verbs.exists(v, v in {write_verbs}))")),
        cel(&catalog::RATE_LIMIT_PRESENT, "spec.rateLimit",
            "!has(R.rateLimiting) || !R.rateLimiting.required || has(object.spec.rateLimit)".into()),
        cel(&catalog::RATE_LIMIT_CAPPED, "spec.rateLimit.requestsPerMinute",
            "!has(R.rateLimiting) || !has(R.rateLimiting.maxRequestsPerMinute) || !has(object.spec.rateLimit) || object.spec.rateLimit.requestsPerMinute <= R.rateLimiting.maxRequestsPerMinute".into()),
        cel(&catalog::SECRET_INJECTED_ONLY, "spec.secrets",
            format!("!has(R.secretManagement) || !R.secretManagement.requireInjection || {SECRETS}.all(s, has(s.inject))")),
    ]
}

/// The baseline rules (no ToolPolicy needed) in CEL.
pub fn baseline_rules() -> Vec<CelRule> {
    vec![CelRule {
        rule: &catalog::AUDIT_REDACT_USED,
        path: "spec.audit.redact",
        ok: "!has(object.spec.audit.redact) || size(object.spec.audit.redact) == 0 || object.spec.audit.input == 'redacted'".into(),
    }]
}

/// A label selector in CEL: does `selector` (a params field) match `labels`?
fn selector_matches(selector: &str, labels: &str) -> String {
    format!(
        "(!has({s}) || ((!has({s}.matchLabels) || {s}.matchLabels.all(k, k in {l} && {l}[k] == {s}.matchLabels[k])) && \
         (!has({s}.matchExpressions) || {s}.matchExpressions.all(e, \
           e.operator == 'In' ? (e.key in {l} && has(e.values) && {l}[e.key] in e.values) : \
           e.operator == 'NotIn' ? !(e.key in {l} && has(e.values) && {l}[e.key] in e.values) : \
           e.operator == 'Exists' ? e.key in {l} : \
           e.operator == 'DoesNotExist' ? !(e.key in {l}) : true))))",
        s = selector,
        l = labels
    )
}

/// The CEL variables, in order: whether this ToolPolicy applies to the tool in `mode`.
pub fn variables(mode: PolicyMode) -> Vec<(&'static str, String)> {
    vec![
        (
            "toolLabels",
            "has(object.metadata.labels) ? object.metadata.labels : {}".into(),
        ),
        (
            "namespaceLabels",
            "has(namespaceObject.metadata.labels) ? namespaceObject.metadata.labels : {}".into(),
        ),
        (
            "applies",
            format!(
                "(has(params.spec.mode) ? params.spec.mode : 'enforce') == '{}' && {} && {}",
                mode.as_str(),
                selector_matches("params.spec.namespaceSelector", "variables.namespaceLabels"),
                selector_matches("params.spec.toolSelector", "variables.toolLabels"),
            ),
        ),
    ]
}

/// The expression of one rule inside the policy for `mode`.
pub fn validation_expression(rule: &CelRule) -> String {
    format!(
        "!variables.applies || ({})",
        rule.ok.replace("R.", "params.spec.rules.")
    )
}

/// Only creates and changes of the spec or labels are judged: metadata-only
/// updates (finalizers on deletion) of a tool a newer policy dislikes still pass.
const SPEC_OR_LABELS_CHANGED: &str = "request.operation != 'UPDATE' || object.spec != oldObject.spec || \
    (has(object.metadata.labels) ? object.metadata.labels : {}) != (has(oldObject.metadata.labels) ? oldObject.metadata.labels : {})";

fn match_constraints() -> Value {
    json!({"resourceRules": [{"apiGroups": ["toolwarden.dev"], "apiVersions": ["v1alpha1"],
                              "operations": ["CREATE", "UPDATE"], "resources": ["agenttools"]}]})
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": "toolwarden-admission-policies", "app.kubernetes.io/part-of": "toolwarden"})
}

/// Every ValidatingAdmissionPolicy and binding; `namespace` (the release) and
/// kube-system are excluded, as from the webhook.
pub fn objects(namespace: &str) -> Vec<Value> {
    let match_resources = json!({"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", namespace]}]}});
    let mut objects = Vec::new();
    for (mode, action) in [
        (PolicyMode::Enforce, "Deny"),
        (PolicyMode::Warn, "Warn"),
        (PolicyMode::Audit, "Audit"),
    ] {
        let name = format!("toolwarden-checklist-{}", mode.as_str());
        let validations: Vec<Value> = policy_rules()
            .iter()
            .map(|r| json!({
                "expression": validation_expression(r),
                "messageExpression": format!("'{} {}: {} (policy ' + params.metadata.name + ')'", r.rule.id, r.path, r.rule.summary.replace('\'', "\\'")),
                "reason": "Forbidden",
            }))
            .collect();
        objects.push(json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name, "labels": labels()},
            "spec": {"failurePolicy": "Fail",
                     "paramKind": {"apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy"},
                     "matchConstraints": match_constraints(),
                     "matchConditions": [{"name": "spec-or-labels-changed", "expression": SPEC_OR_LABELS_CHANGED}],
                     "variables": variables(mode).into_iter().map(|(n, e)| json!({"name": n, "expression": e})).collect::<Vec<_>>(),
                     "validations": validations}}));
        objects.push(json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name, "labels": labels()},
            "spec": {"policyName": name, "validationActions": [action],
                     "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"},
                     "matchResources": match_resources}}));
    }
    let validations: Vec<Value> = baseline_rules()
        .iter()
        .map(|r| json!({"expression": r.ok, "message": format!("{} {}: {} (baseline)", r.rule.id, r.path, r.rule.summary), "reason": "Forbidden"}))
        .collect();
    objects.push(json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "toolwarden-baseline", "labels": labels()},
        "spec": {"failurePolicy": "Fail", "matchConstraints": match_constraints(),
                 "matchConditions": [{"name": "spec-or-labels-changed", "expression": SPEC_OR_LABELS_CHANGED}],
                 "validations": validations}}));
    objects.push(json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "toolwarden-baseline", "labels": labels()},
        "spec": {"policyName": "toolwarden-baseline", "validationActions": ["Deny"], "matchResources": match_resources}}));
    objects
}
