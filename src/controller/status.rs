//! The status phase: conditions, endpoints and isolation derived only from what was
//! admitted and applied (pure), then written by server-side apply on `/status`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::apply::FIELD_MANAGER;
use super::build::{ToolRootfs, service};
use super::runner_pods::PodTrouble;
use super::validate::Admitted;
use crate::api::{AgentTool, AgentToolStatus};

pub const READY: &str = "Ready";
pub const POLICY_COMPLIANT: &str = "PolicyCompliant";
pub const DEGRADED: &str = "Degraded";

#[derive(Debug, thiserror::Error)]
#[error("writing the status of AgentTool {name}: {source}")]
pub struct StatusError {
    name: String,
    #[source]
    source: kube::Error,
}

impl StatusError {
    /// Stable CamelCase reason for metric labels.
    pub fn reason(&self) -> &'static str {
        "StatusUpdateFailed"
    }
}

/// Why a tool could not be deployed: the reason and message of its conditions.
pub struct Refusal<'a> {
    pub reason: &'static str,
    pub message: String,
    /// The verdict, when validation got that far.
    pub admitted: Option<&'a Admitted>,
}

/// Status of an admitted, applied tool; `trouble`: why its runner pods do not run, if
/// they say so ([`super::runner_pods::trouble`]).
pub fn of_applied(
    tool: &AgentTool,
    admitted: &Admitted,
    deployment: &Deployment,
    trouble: Option<&PodTrouble>,
    now: Time,
) -> AgentToolStatus {
    let want = admitted.replicas();
    let ready_replicas = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let ready = if admitted.verdict.denied {
        (
            "False",
            "PolicyDenied",
            "an enforcing policy rejects the tool: it has no runner pods".to_string(),
        )
    } else if ready_replicas >= i32::try_from(want).unwrap_or(i32::MAX) {
        (
            "True",
            "RunnersReady",
            format!("{ready_replicas} of {want} runner pods ready"),
        )
    } else if let Some(trouble) = trouble {
        ("False", trouble.reason.as_str(), trouble.message.clone())
    } else {
        (
            "False",
            "RunnersNotReady",
            format!("{ready_replicas} of {want} runner pods ready"),
        )
    };
    // Ready pods of an earlier rollout may still serve while the new ones fail: Degraded
    // says so even then.
    let degraded = match trouble {
        Some(trouble) => ("True", trouble.reason.as_str(), trouble.message.as_str()),
        None => ("False", "AsExpected", "every child applied"),
    };
    let namespace = tool.namespace().unwrap_or_default();
    let conditions = vec![
        condition(tool, READY, ready.0, ready.1, &ready.2, &now),
        compliance(tool, admitted, &now),
        condition(tool, DEGRADED, degraded.0, degraded.1, degraded.2, &now),
    ];
    AgentToolStatus {
        observed_generation: tool.metadata.generation,
        conditions,
        endpoints: service::endpoints(&tool.name_any(), &namespace)
            .into_iter()
            .collect(),
        isolation: isolation(tool, rootfs_source(deployment)),
    }
}

/// How the applied Deployment gives the tool its root file system.
fn rootfs_source(deployment: &Deployment) -> &'static str {
    let image_volume = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|pod| pod.volumes.as_ref())
        .is_some_and(|volumes| {
            volumes
                .iter()
                .any(|v| v.name == "tool-image" && v.image.is_some())
        });
    if image_volume {
        ToolRootfs::ImageVolume.as_str()
    } else {
        ToolRootfs::Copy.as_str()
    }
}

/// Status of a tool the controller refuses to deploy (an invalid spec, a missing reference).
pub fn of_refused(tool: &AgentTool, refusal: &Refusal<'_>, now: Time) -> AgentToolStatus {
    let compliant = match refusal.admitted {
        Some(admitted) => compliance(tool, admitted, &now),
        None => condition(
            tool,
            POLICY_COMPLIANT,
            "Unknown",
            refusal.reason,
            "not evaluated: the tool cannot be deployed",
            &now,
        ),
    };
    AgentToolStatus {
        observed_generation: tool.metadata.generation,
        conditions: vec![
            condition(tool, READY, "False", refusal.reason, &refusal.message, &now),
            compliant,
            condition(
                tool,
                DEGRADED,
                "True",
                refusal.reason,
                &refusal.message,
                &now,
            ),
        ],
        endpoints: BTreeMap::new(),
        isolation: BTreeMap::new(),
    }
}

/// `PolicyCompliant`, naming every broken rule.
fn compliance(tool: &AgentTool, admitted: &Admitted, now: &Time) -> Condition {
    let violations = &admitted.verdict.violations;
    if violations.is_empty() {
        return condition(
            tool,
            POLICY_COMPLIANT,
            "True",
            "Compliant",
            "the baseline and every selecting ToolPolicy pass",
            now,
        );
    }
    let reason = if admitted.verdict.denied {
        "PolicyDenied"
    } else {
        "PolicyWarnings"
    };
    let message = violations
        .iter()
        .map(|v| {
            format!(
                "{} at {}: {} ({}, {})",
                v.rule,
                v.path,
                v.message,
                v.source(),
                v.mode.as_str()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    condition(tool, POLICY_COMPLIANT, "False", reason, &message, now)
}

/// Which mechanism enforces each limit in the runner pod, and each layer the controller
/// configures. A pod's cgroup tree is read-only, so the runner (`--allow-degraded`)
/// enforces a sandbox's memory, pids and cpu with rlimits, bounded together by the
/// runner container's cgroup; everything else is the same as on a host.
fn isolation(tool: &AgentTool, rootfs: &str) -> BTreeMap<String, String> {
    let sandbox = &tool.spec.sandbox;
    let pod_memory = super::build::RUNNER_MEMORY_LIMIT;
    let memory = match &sandbox.memory {
        Some(memory) => format!(
            "rlimit RLIMIT_AS {} per process; the runner container's cgroup memory.max {pod_memory} bounds all sandboxes",
            memory.0
        ),
        None => format!("the runner container's cgroup memory.max {pod_memory}, shared"),
    };
    let cpu = match &sandbox.cpu {
        Some(cpu) => format!(
            "rlimit RLIMIT_CPU (timeout x {}) per process, a CPU-seconds budget; the wall-clock timeout is the real bound",
            cpu.0
        ),
        None => "no per-sandbox cap; the wall-clock timeout bounds it".into(),
    };
    BTreeMap::from([
        ("podUserNamespace".into(), "hostUsers=false".into()),
        ("rootfs".into(), rootfs.into()),
        (
            "runtimeClass".into(),
            sandbox
                .runtime_class_name
                .clone()
                .unwrap_or_else(|| "default".into()),
        ),
        ("network".into(), "NetworkPolicy".into()),
        ("perCall".into(), "sandbox".into()),
        (
            "limits.timeoutMs".into(),
            format!(
                "the runner kills the whole sandbox after {} ms",
                sandbox.timeout_ms
            ),
        ),
        ("limits.memory".into(), memory),
        ("limits.cpu".into(), cpu),
        (
            "limits.pids".into(),
            format!("rlimit RLIMIT_NPROC {} per uid", sandbox.pids),
        ),
        (
            "limits.maxOutputBytes".into(),
            format!(
                "the runner cuts the output at {} bytes",
                sandbox.max_output_bytes
            ),
        ),
        (
            "limits.tmpSize".into(),
            match &sandbox.tmp_size {
                Some(size) => format!("tmpfs size={} at /tmp", size.0),
                None => "tmpfs at /tmp, 64Mi (the default)".into(),
            },
        ),
    ])
}

/// A condition that keeps its `lastTransitionTime` while its status does not change.
fn condition(
    tool: &AgentTool,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &Time,
) -> Condition {
    let previous = tool
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match previous {
        Some(previous) if previous.status == status => previous.last_transition_time.clone(),
        _ => now.clone(),
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        // The API server caps a condition message at 32768 bytes.
        message: truncate(message, 32 * 1024),
        observed_generation: tool.metadata.generation,
        last_transition_time,
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

pub async fn write(
    client: &Client,
    tool: &AgentTool,
    status: &AgentToolStatus,
) -> Result<(), StatusError> {
    let api: Api<AgentTool> =
        Api::namespaced(client.clone(), &tool.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": crate::api::API_VERSION,
        "kind": "AgentTool",
        "status": status,
    });
    api.patch_status(
        &tool.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|source| StatusError {
        name: tool.name_any(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn execute_code() -> AgentTool {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/execute-code.yaml");
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// `isolation.rootfs` says which path the applied Deployment uses.
    #[test]
    fn the_rootfs_path_comes_from_the_applied_deployment() {
        let deployment = |volume: serde_json::Value| -> Deployment {
            serde_json::from_value(json!({"spec": {"selector": {}, "template": {"spec": {
                "containers": [{"name": "runner"}], "volumes": [volume]}}}}))
            .unwrap()
        };
        let by_image =
            deployment(json!({"name": "tool-image", "image": {"reference": "busybox:1.36.1"}}));
        let copied = deployment(json!({"name": "tool-image", "emptyDir": {}}));
        assert_eq!(rootfs_source(&by_image), "imageVolume");
        assert_eq!(rootfs_source(&copied), "initContainerCopy");
    }

    /// Every limit of `spec.sandbox` names the mechanism that enforces it in the pod: a
    /// limit added to the API without one fails here.
    #[test]
    fn isolation_names_the_mechanism_of_every_limit() {
        let mut tool = execute_code();
        tool.spec.sandbox.memory = Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "128Mi".into(),
        ));
        tool.spec.sandbox.cpu = None;
        tool.spec.sandbox.timeout_ms = 2500;
        let isolation = isolation(&tool, "imageVolume");
        let limits = serde_json::to_value(&tool.spec.sandbox).unwrap();
        let not_limits = ["warmPool", "runtimeClassName", "allowDegraded"];
        for field in limits.as_object().unwrap().keys() {
            if !not_limits.contains(&field.as_str()) {
                assert!(
                    isolation.contains_key(&format!("limits.{field}")),
                    "no mechanism for {field}: {isolation:?}"
                );
            }
        }
        for optional in ["cpu", "tmpSize"] {
            assert!(isolation.contains_key(&format!("limits.{optional}")));
        }
        assert_eq!(
            isolation["limits.memory"],
            "rlimit RLIMIT_AS 128Mi per process; the runner container's cgroup memory.max \
             1Gi bounds all sandboxes"
        );
        assert_eq!(
            isolation["limits.timeoutMs"],
            "the runner kills the whole sandbox after 2500 ms"
        );
        assert!(
            isolation["limits.cpu"].starts_with("no per-sandbox cap"),
            "{isolation:?}"
        );
        assert_eq!(
            isolation["limits.pids"],
            format!("rlimit RLIMIT_NPROC {} per uid", tool.spec.sandbox.pids)
        );
    }
}
