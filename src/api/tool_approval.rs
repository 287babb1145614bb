//! `ToolApproval`: one pending human decision about one call.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A call waiting for (or given) a human decision.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "toolwarden.dev",
    version = "v1alpha1",
    kind = "ToolApproval",
    namespaced,
    shortname = "ta",
    status = "ToolApprovalStatus",
    printcolumn = r#"{"name":"Tool","type":"string","jsonPath":".spec.toolRef"}"#,
    printcolumn = r#"{"name":"Caller","type":"string","jsonPath":".spec.caller"}"#,
    printcolumn = r#"{"name":"Decision","type":"string","jsonPath":".status.decision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a ToolApproval request is immutable; decide it through status"}
]))]
pub struct ToolApprovalSpec {
    /// Name of the AgentTool in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub tool_ref: String,
    #[schemars(length(min = 1, max = 128))]
    pub invocation_id: String,
    /// Authenticated subject that made the call.
    #[schemars(length(min = 1, max = 512))]
    pub caller: String,
    /// `sha256:` digest of the canonical input.
    #[schemars(length(min = 1, max = 128))]
    pub input_digest: String,
    /// What the approver is asked to allow, in plain words.
    #[schemars(length(max = 4096))]
    pub summary: String,
    pub expires_at: Time,
}

/// A human decision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Decision {
    Approved,
    Denied,
}

/// The decision, once made.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.decision) || (has(self.decidedBy) && has(self.decidedAt))",
     "message": "a decision needs decidedBy and decidedAt"},
    {"rule": "!has(oldSelf.decision) || (has(self.decision) && self.decision == oldSelf.decision)",
     "message": "a decision cannot be changed once made"}
]))]
pub struct ToolApprovalStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}
