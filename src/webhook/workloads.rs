//! Runner workloads: every object the controller labels
//! `app.kubernetes.io/managed-by: toolwarden`. Only the controller's
//! ServiceAccount (and Kubernetes' own controllers, for what they own) may
//! change them, and no one may give a runner pod more than the documented
//! runner securityContext: no privileged container, no capability beyond
//! [`RUNNER_POD_CAPABILITIES`], none at all outside a user namespace, no
//! privilege escalation, no hostPath, no host namespaces or ports, no
//! Unconfined seccomp or AppArmor, no unmasked /proc. A runner Role may grant
//! only what its AgentTool declares.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{PodSpec, SecurityContext};
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use serde_json::Value;

use super::cluster::ClusterView;
use super::review::{Config, deny, operation_name};
use crate::api::AgentTool;
use crate::sandbox::RUNNER_POD_CAPABILITIES;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "toolwarden";
pub const TOOL_LABEL: &str = "toolwarden.dev/tool";

/// Kinds the controller creates for a tool (and the ones Kubernetes creates from them).
pub const WORKLOAD_KINDS: &[(&str, &str, &str)] = &[
    // (group, kind, resource)
    ("apps", "Deployment", "deployments"),
    ("apps", "ReplicaSet", "replicasets"),
    ("apps", "StatefulSet", "statefulsets"),
    ("apps", "DaemonSet", "daemonsets"),
    ("batch", "Job", "jobs"),
    ("batch", "CronJob", "cronjobs"),
    ("", "Pod", "pods"),
    ("", "Service", "services"),
    ("", "ConfigMap", "configmaps"),
    ("", "ServiceAccount", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "Role", "roles"),
    ("rbac.authorization.k8s.io", "RoleBinding", "rolebindings"),
    ("networking.k8s.io", "NetworkPolicy", "networkpolicies"),
    ("policy", "PodDisruptionBudget", "poddisruptionbudgets"),
];

/// Users who may delete any runner workload, and update its metadata only
/// (finalizers, ownerReferences), besides the controller: the garbage collector
/// (children of a deleted AgentTool) and the namespace controller.
const CLEANUP_USERS: &[&str] = &[
    "system:serviceaccount:kube-system:generic-garbage-collector",
    "system:serviceaccount:kube-system:namespace-controller",
];

/// Kubernetes controllers that create and update the objects of one kind from
/// the controller's objects (a Deployment's ReplicaSets, their Pods).
const OWNING_CONTROLLERS: &[(&str, &str)] = &[
    (
        "ReplicaSet",
        "system:serviceaccount:kube-system:deployment-controller",
    ),
    (
        "Pod",
        "system:serviceaccount:kube-system:replicaset-controller",
    ),
    (
        "Pod",
        "system:serviceaccount:kube-system:statefulset-controller",
    ),
    (
        "Pod",
        "system:serviceaccount:kube-system:daemon-set-controller",
    ),
    ("Pod", "system:serviceaccount:kube-system:job-controller"),
    (
        "Job",
        "system:serviceaccount:kube-system:cronjob-controller",
    ),
];

pub fn is_workload_kind(group: &str, kind: &str) -> bool {
    WORKLOAD_KINDS
        .iter()
        .any(|(g, k, _)| *g == group && *k == kind)
}

pub fn admit(
    request: &AdmissionRequest<DynamicObject>,
    config: &Config,
    view: &ClusterView,
) -> AdmissionResponse {
    let managed = |o: Option<&DynamicObject>| {
        o.and_then(|o| o.metadata.labels.as_ref())
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY_VALUE)
    };
    if !managed(request.object.as_ref()) && !managed(request.old_object.as_ref()) {
        // Not a runner workload (the webhook's objectSelector normally keeps these away).
        return AdmissionResponse::from(request);
    }
    let kind = request.kind.kind.as_str();
    let user = request.user_info.username.as_deref().unwrap_or("");
    if let Err(message) = writer_allowed(request, kind, user, config) {
        return deny(request, "NotTheController", message);
    }
    if request.operation == Operation::Delete {
        return AdmissionResponse::from(request);
    }
    let Some(object) = request.object.as_ref() else {
        return deny(
            request,
            "MissingObject",
            format!(
                "the {} request for {kind} carries no object",
                operation_name(request)
            ),
        );
    };
    let mut problems = Vec::new();
    if let Some((path, pod)) = pod_spec(kind, &object.data) {
        match serde_path_to_error::deserialize::<_, PodSpec>(pod.clone()) {
            Ok(spec) => pod_problems(&spec, path, &mut problems),
            Err(e) => problems.push(format!("{path}.{}: {}", e.path(), e.inner())),
        }
    }
    if kind == "Role" {
        role_problems(request, object, view, &mut problems);
    }
    if problems.is_empty() {
        return AdmissionResponse::from(request);
    }
    deny(
        request,
        "RunnerSecurityContext",
        format!(
            "runner {kind} {}/{} goes beyond the documented runner pod: {}",
            request.namespace.as_deref().unwrap_or(""),
            request.name,
            problems.join("; ")
        ),
    )
}

/// Only the controller changes runner workloads; Kubernetes' own controllers
/// for what they own and clean up; any user may delete a Pod (its ReplicaSet
/// recreates it from the controller's template, so nothing is weakened).
fn writer_allowed(
    request: &AdmissionRequest<DynamicObject>,
    kind: &str,
    user: &str,
    config: &Config,
) -> Result<(), String> {
    let cleanup = CLEANUP_USERS.contains(&user)
        && match request.operation {
            Operation::Delete => true,
            Operation::Update => metadata_only(request),
            _ => false,
        };
    let allowed = user == config.controller_user
        || cleanup
        || OWNING_CONTROLLERS
            .iter()
            .any(|(k, u)| *k == kind && *u == user)
        || (kind == "Pod" && request.operation == Operation::Delete);
    if allowed {
        return Ok(());
    }
    Err(format!(
        "{kind} {}/{} is a toolwarden runner workload; only the controller ({}) may {} it, not {:?}",
        request.namespace.as_deref().unwrap_or(""),
        request.name,
        config.controller_user,
        operation_name(request).to_lowercase(),
        user
    ))
}

/// An update that changes nothing but `metadata`.
fn metadata_only(request: &AdmissionRequest<DynamicObject>) -> bool {
    match (&request.object, &request.old_object) {
        (Some(new), Some(old)) => new.data == old.data,
        _ => false,
    }
}

/// Where a kind keeps its pod spec, and that spec.
fn pod_spec<'a>(kind: &str, data: &'a Value) -> Option<(&'static str, &'a Value)> {
    let (path, pointer) = match kind {
        "Pod" => ("spec", "/spec"),
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" => {
            ("spec.template.spec", "/spec/template/spec")
        }
        "CronJob" => (
            "spec.jobTemplate.spec.template.spec",
            "/spec/jobTemplate/spec/template/spec",
        ),
        _ => return None,
    };
    data.pointer(pointer).map(|spec| (path, spec))
}

/// Everything in a pod spec beyond the documented runner pod.
pub fn pod_problems(spec: &PodSpec, path: &str, problems: &mut Vec<String>) {
    let mut flag = |field: String, what: &str| problems.push(format!("{path}.{field}: {what}"));
    for (field, on) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ] {
        if on == Some(true) {
            flag(field.into(), "host namespaces are not allowed");
        }
    }
    for (i, volume) in spec.volumes.iter().flatten().enumerate() {
        if volume.host_path.is_some() {
            flag(
                format!("volumes[{i}].hostPath"),
                "hostPath volumes are not allowed",
            );
        }
    }
    if let Some(pod) = &spec.security_context {
        if pod
            .seccomp_profile
            .as_ref()
            .is_some_and(|p| p.type_ == "Unconfined")
        {
            flag(
                "securityContext.seccompProfile.type".into(),
                "Unconfined seccomp is not allowed",
            );
        }
        if pod
            .app_armor_profile
            .as_ref()
            .is_some_and(|p| p.type_ == "Unconfined")
        {
            flag(
                "securityContext.appArmorProfile.type".into(),
                "Unconfined AppArmor is not allowed",
            );
        }
    }
    let containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                format!("containers[{i}]"),
                c.security_context.as_ref(),
                c.ports.as_deref(),
            )
        })
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, c)| {
                    (
                        format!("initContainers[{i}]"),
                        c.security_context.as_ref(),
                        c.ports.as_deref(),
                    )
                }),
        )
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, c)| {
                    (
                        format!("ephemeralContainers[{i}]"),
                        c.security_context.as_ref(),
                        c.ports.as_deref(),
                    )
                }),
        );
    let mut adds_capabilities = false;
    for (field, context, ports) in containers {
        for (p, port) in ports.unwrap_or_default().iter().enumerate() {
            if port.host_port.is_some_and(|h| h != 0) {
                flag(
                    format!("{field}.ports[{p}].hostPort"),
                    "host ports are not allowed",
                );
            }
        }
        let Some(context) = context else { continue };
        adds_capabilities |= container_problems(context, &field, &mut flag);
    }
    if adds_capabilities && spec.host_users != Some(false) {
        flag(
            "hostUsers".into(),
            "capabilities are only allowed inside a user namespace (hostUsers: false)",
        );
    }
}

/// Flags one container's securityContext; true when it adds capabilities.
fn container_problems(
    context: &SecurityContext,
    field: &str,
    flag: &mut impl FnMut(String, &str),
) -> bool {
    if context.privileged == Some(true) {
        flag(
            format!("{field}.securityContext.privileged"),
            "privileged containers are not allowed",
        );
    }
    if context.allow_privilege_escalation == Some(true) {
        flag(
            format!("{field}.securityContext.allowPrivilegeEscalation"),
            "privilege escalation is not allowed",
        );
    }
    if context.proc_mount.as_deref() == Some("Unmasked") {
        flag(
            format!("{field}.securityContext.procMount"),
            "an unmasked /proc is not allowed",
        );
    }
    if context
        .seccomp_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        flag(
            format!("{field}.securityContext.seccompProfile.type"),
            "Unconfined seccomp is not allowed",
        );
    }
    if context
        .app_armor_profile
        .as_ref()
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        flag(
            format!("{field}.securityContext.appArmorProfile.type"),
            "Unconfined AppArmor is not allowed",
        );
    }
    let added = context
        .capabilities
        .as_ref()
        .and_then(|c| c.add.as_deref())
        .unwrap_or_default();
    let beyond: BTreeSet<&str> = added
        .iter()
        .map(|cap| cap.as_str())
        .filter(|cap| {
            let upper = cap.to_ascii_uppercase();
            let bare = upper.trim_start_matches("CAP_");
            !RUNNER_POD_CAPABILITIES.contains(&bare)
        })
        .collect();
    if !beyond.is_empty() {
        flag(
            format!("{field}.securityContext.capabilities.add"),
            &format!(
                "{} beyond the runner's documented set ({})",
                beyond.into_iter().collect::<Vec<_>>().join(", "),
                RUNNER_POD_CAPABILITIES.join(", ")
            ),
        );
    }
    !added.is_empty()
}

/// A runner Role grants only what its tool declares in `permissions.kubernetes`
/// (namespaced rules), so the controller's `escalate` on Roles reaches no further
/// than admitted tools.
fn role_problems(
    request: &AdmissionRequest<DynamicObject>,
    object: &DynamicObject,
    view: &ClusterView,
    problems: &mut Vec<String>,
) {
    let namespace = request.namespace.as_deref().unwrap_or_default();
    let Some(tool_name) = object
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(TOOL_LABEL))
    else {
        problems.push(format!(
            "metadata.labels: a runner Role needs the {TOOL_LABEL} label"
        ));
        return;
    };
    let Some(tool) = view.tool(namespace, tool_name) else {
        problems.push(format!(
            "AgentTool {namespace}/{tool_name} is not known; its Role cannot be checked"
        ));
        return;
    };
    let rules: Vec<PolicyRule> = match object.data.get("rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(rules) => match serde_json::from_value(rules.clone()) {
            Ok(rules) => rules,
            Err(e) => {
                problems.push(format!("rules: {e}"));
                return;
            }
        },
    };
    for (i, rule) in rules.iter().enumerate() {
        if !declared(&tool, rule) {
            problems.push(format!(
                "rules[{i}]: grants more than AgentTool {namespace}/{tool_name} declares in spec.permissions.kubernetes"
            ));
        }
    }
}

/// True when every (group, resource, verb, name) the rule grants is granted by
/// one namespaced rule of the tool.
fn declared(tool: &AgentTool, rule: &PolicyRule) -> bool {
    if rule
        .non_resource_urls
        .as_ref()
        .is_some_and(|u| !u.is_empty())
    {
        return false;
    }
    let groups = rule.api_groups.as_deref().unwrap_or_default();
    let resources = rule.resources.as_deref().unwrap_or_default();
    let names = rule.resource_names.as_deref().unwrap_or_default();
    groups.iter().all(|group| {
        resources.iter().all(|resource| {
            rule.verbs.iter().all(|verb| {
                tool.spec.permissions.kubernetes.iter().any(|declared| {
                    !declared.cluster_wide
                        && declared.api_groups.contains(group)
                        && declared.resources.contains(resource)
                        && declared.verbs.contains(verb)
                        && (declared.resource_names.is_empty()
                            || (!names.is_empty()
                                && names.iter().all(|n| declared.resource_names.contains(n))))
                })
            })
        })
    })
}
