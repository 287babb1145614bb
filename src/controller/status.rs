//! The status phase: conditions, endpoints and isolation derived only from what was
//! admitted and applied (pure), then written by server-side apply on `/status`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::apply::FIELD_MANAGER;
use super::build::service;
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

/// Status of an admitted, applied tool.
pub fn of_applied(
    tool: &AgentTool,
    admitted: &Admitted,
    deployment: &Deployment,
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
    } else {
        (
            "False",
            "RunnersNotReady",
            format!("{ready_replicas} of {want} runner pods ready"),
        )
    };
    let namespace = tool.namespace().unwrap_or_default();
    let conditions = vec![
        condition(tool, READY, ready.0, ready.1, &ready.2, &now),
        compliance(tool, admitted, &now),
        condition(
            tool,
            DEGRADED,
            "False",
            "AsExpected",
            "every child applied",
            &now,
        ),
    ];
    AgentToolStatus {
        observed_generation: tool.metadata.generation,
        conditions,
        endpoints: service::endpoints(&tool.name_any(), &namespace)
            .into_iter()
            .collect(),
        isolation: isolation(tool),
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

/// Which mechanism isolates the tool at each layer the controller configures.
fn isolation(tool: &AgentTool) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("podUserNamespace".into(), "hostUsers=false".into()),
        ("rootfs".into(), "imageVolume".into()),
        (
            "runtimeClass".into(),
            tool.spec
                .sandbox
                .runtime_class_name
                .clone()
                .unwrap_or_else(|| "default".into()),
        ),
        ("network".into(), "NetworkPolicy".into()),
        ("perCall".into(), "sandbox".into()),
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
