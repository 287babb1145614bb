//! `ToolPolicy`: the cluster's security checklist, one rule group per item.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{AuditLevel, Risk, optional_quantity};
use super::names::ABSOLUTE_CLEAN_PATH;

/// Security rules every matching AgentTool must follow.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "toolwarden.dev",
    version = "v1alpha1",
    kind = "ToolPolicy",
    shortname = "tp",
    status = "ToolPolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Violating","type":"integer","jsonPath":".status.violatingTools"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolPolicySpec {
    /// `enforce` rejects violating tools, `warn` admits them with a warning, `audit` only records.
    #[serde(default)]
    pub mode: PolicyMode,
    /// Namespaces the policy applies to; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Tools (by label) the policy applies to; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_selector: Option<LabelSelector>,
    /// The checklist.
    #[serde(default)]
    pub rules: PolicyRules,
}

/// What a policy does with a violation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Warn,
    Audit,
}

impl PolicyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Enforce => "enforce",
            PolicyMode::Warn => "warn",
            PolicyMode::Audit => "audit",
        }
    }
}

/// One optional group per checklist item; an absent group checks nothing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_validation: Option<InputValidationRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sanitization: Option<SanitizationRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub least_privilege: Option<LeastPrivilegeRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxing: Option<SandboxingRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_logging: Option<AuditLoggingRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub human_oversight: Option<HumanOversightRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiting: Option<RateLimitingRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_management: Option<SecretManagementRules>,
}

/// Checklist item 1.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InputValidationRules {
    /// Every object closed (`additionalProperties: false`), every string bounded
    /// (`maxLength`, `enum`, `const`, `format` or `pattern`), every array bounded (`maxItems`).
    #[serde(default)]
    pub require_strict_schema: bool,
    /// Largest `maxInputBytes` a tool may declare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 16777216))]
    pub max_input_bytes: Option<u64>,
    /// Tools of these risk levels must declare an `outputSchema`, so that what
    /// they answer is checked before it reaches the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_output_schema_for_risk: Vec<Risk>,
}

/// Checklist item 2.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SanitizationRules {
    /// Free-text strings (no `enum`, `const`, `format` or `pattern`) need a sanitize rule.
    #[serde(default)]
    pub require_for_free_text: bool,
}

/// Checklist item 3.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeastPrivilegeRules {
    /// Kubernetes verbs a tool may be granted; absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_verbs: Option<Vec<String>>,
    /// Kubernetes resources a tool may be granted; absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_resources: Option<Vec<String>>,
    /// No rule may reach Secrets.
    #[serde(default)]
    pub forbid_secret_access: bool,
    /// No rule may be cluster-wide.
    #[serde(default)]
    pub forbid_cluster_scope: bool,
    /// Mount paths that may be writable (prefixes); absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_writable_paths: Option<Vec<String>>,
    /// Forbid `hostPath` mounts, even those `allowedHostPaths` allows elsewhere.
    #[serde(default)]
    pub forbid_host_path: bool,
    /// Host folders tools selected by this policy may mount with `hostPath`.
    /// Without an entry covering it, a hostPath is refused (TW-PRIV-009, baseline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed_host_paths: Vec<AllowedHostPath>,
    /// Image registries (reference prefixes such as `ghcr.io/acme/`); absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_registries: Option<Vec<String>>,
    /// Images must be pinned by `@sha256:` digest.
    #[serde(default)]
    pub require_image_digest: bool,
    /// Tools of these risk levels must restrict callers with a
    /// `callers.ipAllowList` that is not open to every address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_ip_allow_list_for_risk: Vec<Risk>,
}

/// A host folder tools may mount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedHostPath {
    /// The folder; paths below it (by whole components) are allowed too.
    #[schemars(length(min = 1, max = 4096), regex(pattern = ABSOLUTE_CLEAN_PATH))]
    pub path_prefix: String,
    /// Mounts under it must be read-only (the default); `false` allows writable ones.
    #[serde(default = "default_true")]
    pub read_only: bool,
}

fn default_true() -> bool {
    true
}

/// Checklist item 4.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxingRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 300000))]
    pub max_timeout_ms: Option<u32>,
    /// Tools must set `sandbox.memory` no larger than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub max_memory: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_pids: Option<u32>,
    /// Egress host patterns (exact or `*.suffix`); absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_egress_hosts: Option<Vec<String>>,
    /// Address ranges (CIDR, e.g. `10.20.0.0/16`) the egress proxy may connect
    /// to although they are loopback, private, link-local or otherwise not
    /// public; every such address is refused otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub allowed_egress_cidrs: Vec<EgressCidr>,
    /// RuntimeClasses allowed; absent means any (including none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_runtime_classes: Option<Vec<String>>,
    /// Tools must name a RuntimeClass.
    #[serde(default)]
    pub require_runtime_class: bool,
}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct EgressCidr(
    #[schemars(
        length(min = 4, max = 43),
        regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")
    )]
    pub String,
);

/// Checklist item 5.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditLoggingRules {
    /// Least detail a tool may record its input with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_level: Option<AuditLevel>,
    /// Tools with secrets may not record full input.
    #[serde(default)]
    pub forbid_full_with_secrets: bool,
}

/// Checklist item 6.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HumanOversightRules {
    /// Tools of these risk levels must require approval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_approval_for_risk: Vec<Risk>,
    /// Tools granted Kubernetes write verbs must require approval.
    #[serde(default)]
    pub require_approval_for_kubernetes_writes: bool,
}

/// Checklist item 7.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitingRules {
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_requests_per_minute: Option<u32>,
    /// Tools of these risk levels must declare `anomaly` scoring.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_anomaly_scoring_for_risk: Vec<Risk>,
}

/// Checklist item 8. Literal secrets are always rejected (baseline); these add to it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretManagementRules {
    /// Secrets may only be injected by the egress proxy, never shown to the tool.
    #[serde(default)]
    pub require_injection: bool,
}

/// Observed state of a ToolPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// AgentTools that currently break this policy.
    #[serde(default)]
    pub violating_tools: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
