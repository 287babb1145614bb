//! `AgentTool`: one tool an agent may call, and everything it is allowed to do.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::agent_tool_guards::{Alerts, AnomalySpec, Callers, Guards};
use super::common::{
    AuditLevel, Risk, input_schema_document, optional_quantity, output_schema_document,
};
use super::names::{ABSOLUTE_CLEAN_PATH, CONFIG_KEY, DNS1123_SUBDOMAIN};

/// Declares a tool an AI agent may call: its input contract, what it may touch,
/// how it is sandboxed, limited, approved and audited.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "toolwarden.dev",
    version = "v1alpha1",
    kind = "AgentTool",
    namespaced,
    shortname = "at",
    status = "AgentToolStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Compliant","type":"string","jsonPath":".status.conditions[?(@.type==\"PolicyCompliant\")].status"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoints.rest"}"#,
    printcolumn = r#"{"name":"Risk","type":"string","jsonPath":".spec.risk"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.approval) || !has(self.approval.when) || self.approval.required",
     "message": "approval.when needs approval.required: true", "fieldPath": ".approval.when"}
]))]
pub struct AgentToolSpec {
    /// What the tool does, shown to agents and approvers.
    #[schemars(length(min = 1, max = 1024))]
    pub description: String,
    /// JSON Schema (2020-12) of the tool's input; the top level must be `type: object`.
    #[schemars(schema_with = "input_schema_document")]
    pub input_schema: serde_json::Value,
    /// JSON Schema (2020-12) of the tool's output; the top level must be `type: object`.
    /// When set, every answer is checked against it before the caller gets it (a
    /// mismatch is a `tool-output-invalid` error), and MCP lists it as `outputSchema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "output_schema_document")]
    pub output_schema: Option<serde_json::Value>,
    /// Calling the tool again with the same input has no further effect
    /// (shown to MCP clients as `idempotentHint`; absent means not declared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
    /// Largest accepted input body in bytes.
    #[serde(default = "default_max_input_bytes")]
    #[schemars(range(min = 2, max = 16777216))]
    pub max_input_bytes: u64,
    /// Transforms applied to input fields after validation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub sanitize: Vec<SanitizeRule>,
    /// CEL expressions over `caller` and `input`; every one must be true.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub authorization: Vec<AuthorizationRule>,
    /// What runs for each call.
    pub runtime: Runtime,
    /// Limits of the per-call sandbox.
    #[serde(default)]
    pub sandbox: SandboxLimits,
    /// Files, network and Kubernetes access; everything else is denied.
    #[serde(default)]
    pub permissions: Permissions,
    /// Secret keys the tool may use, each delivered one way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub secrets: Vec<SecretUse>,
    /// How often the tool may be called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// When a human must approve a call first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// How calls are recorded.
    #[serde(default)]
    pub audit: AuditSpec,
    /// Content guards on input and output.
    #[serde(default, skip_serializing_if = "Guards::is_empty")]
    pub guards: Guards,
    /// Per-caller anomaly scoring; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalySpec>,
    /// Who may call the tool, by network address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callers: Option<Callers>,
    /// Alerts on long or memory-hungry calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Alerts>,
    /// How much harm the tool can do.
    pub risk: Risk,
    /// How `toolwarden controller` serves the tool in a cluster (ignored by `serve`).
    #[serde(default, skip_serializing_if = "Serving::is_default")]
    pub serving: Serving,
}

/// The runner workload the controller creates for the tool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Serving {
    /// Runner pods; more than one also gets a PodDisruptionBudget.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: u32,
    /// Who may call the tool (NetworkPolicy ingress peers); empty means pods in
    /// the tool's own namespace only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub callers: Vec<Caller>,
}

fn default_replicas() -> u32 {
    1
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            replicas: default_replicas(),
            callers: Vec::new(),
        }
    }
}

impl Serving {
    fn is_default(&self) -> bool {
        *self == Serving::default()
    }
}

/// Pods allowed to call the tool: both selectors must match (a missing
/// `namespaceSelector` means the tool's namespace, a missing `podSelector` every pod).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Caller {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

fn default_max_input_bytes() -> u64 {
    64 * 1024
}

/// A transform applied to one input field.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Transform {
    /// Remove every HTML tag and the content of script/style elements.
    StripHtml,
    /// Remove C0/C1 control characters (tab, newline and carriage return kept).
    StripControlChars,
    /// Remove leading and trailing white space.
    Trim,
    /// Unicode NFC normalization.
    NormalizeUnicode,
    /// Lower-case the value.
    Lowercase,
}

/// Sanitization of one string field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SanitizeRule {
    /// JSON pointer of the field in the input, e.g. `/updates/bio`; `*` matches any array index.
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^(/[^/]+)+$"))]
    pub field: String,
    /// Transforms, applied in order.
    #[schemars(length(min = 1, max = 8))]
    pub transforms: Vec<Transform>,
}

/// One authorization check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    /// CEL over `caller` (`sub`, `groups`) and `input`, e.g. `caller.sub == input.userId || "admins" in caller.groups`.
    #[schemars(length(min = 1, max = 4096))]
    pub expression: String,
    /// Shown to the caller when the rule denies a call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub message: Option<String>,
}

/// The process run for each call. It reads the input as JSON on stdin and
/// writes its result on stdout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Runtime {
    /// OCI image reference; pin it with `@sha256:` for reproducible runs.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Entrypoint (argv[0] and following).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub command: Vec<String>,
    /// Arguments after `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub args: Vec<String>,
    /// Plain, non-secret environment. Secrets go in `spec.secrets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub env: Vec<EnvVar>,
    /// Working directory inside the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub working_dir: Option<String>,
}

/// A plain environment variable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// Limits of the sandbox every call runs in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxLimits {
    /// Wall-clock limit of one call; the whole sandbox is killed after it.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 100, max = 300000))]
    pub timeout_ms: u32,
    /// Memory (and memory+swap) limit, e.g. `128Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub memory: Option<Quantity>,
    /// CPU limit, e.g. `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub cpu: Option<Quantity>,
    /// Maximum number of processes and threads.
    #[serde(default = "default_pids")]
    #[schemars(range(min = 1, max = 4096))]
    pub pids: u32,
    /// Output beyond this many bytes is cut off.
    #[serde(default = "default_max_output_bytes")]
    #[schemars(range(min = 1, max = 67108864))]
    pub max_output_bytes: u64,
    /// Size of the tmpfs at `/tmp`, e.g. `16Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub tmp_size: Option<Quantity>,
    /// Sandboxes created ahead of calls.
    #[serde(default = "default_warm_pool")]
    #[schemars(range(min = 0, max = 64))]
    pub warm_pool: u32,
    /// RuntimeClass of the runner pod, an extra isolation layer (e.g. gVisor, Kata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
    /// Accept running with weaker isolation than the strongest (no user
    /// namespace, or rlimits instead of cgroups) where the host cannot do
    /// better. Without it (or `serve --allow-degraded`) such a tool is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_degraded: bool,
}

fn default_timeout_ms() -> u32 {
    5000
}
fn default_pids() -> u32 {
    64
}
fn default_max_output_bytes() -> u64 {
    1024 * 1024
}
fn default_warm_pool() -> u32 {
    2
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            timeout_ms: default_timeout_ms(),
            memory: None,
            cpu: None,
            pids: default_pids(),
            max_output_bytes: default_max_output_bytes(),
            tmp_size: None,
            warm_pool: default_warm_pool(),
            runtime_class_name: None,
            allow_degraded: false,
        }
    }
}

/// Everything the tool may touch. Empty means nothing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Permissions {
    /// Volumes mounted into the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub filesystem: Vec<FilesystemMount>,
    /// Outbound network; none by default.
    #[serde(default)]
    pub network: NetworkPermissions,
    /// Namespaced RBAC rules of the tool's identity; empty means no token at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub kubernetes: Vec<KubernetesRule>,
}

/// A volume mounted into the sandbox.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.configMap), has(self.persistentVolumeClaim), has(self.emptyDir), has(self.hostPath)].filter(x, x).size() == 1",
     "message": "a filesystem mount needs exactly one source: configMap, persistentVolumeClaim, emptyDir or hostPath"}
]))]
pub struct FilesystemMount {
    /// Absolute path inside the sandbox.
    #[schemars(length(min = 2, max = 1024), regex(pattern = r"^/"))]
    pub mount_path: String,
    /// Mounted read-only unless set to false.
    #[serde(default = "default_true")]
    pub read_only: bool,
    /// A ConfigMap by name (a DNS-1123 subdomain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub config_map: Option<String>,
    /// A PersistentVolumeClaim by name (a DNS-1123 subdomain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub persistent_volume_claim: Option<String>,
    /// A scratch directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDir>,
    /// A host directory: an absolute path without `.` or `..` components. Refused
    /// unless a ToolPolicy lists it in `leastPrivilege.allowedHostPaths` (TW-PRIV-009).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), regex(pattern = ABSOLUTE_CLEAN_PATH))]
    pub host_path: Option<String>,
    /// Most a writable persistentVolumeClaim or hostPath mount may hold, e.g.
    /// `512Mi` (default 256Mi); `serve` enforces it with a file system of that size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub size_limit: Option<Quantity>,
}

fn default_true() -> bool {
    true
}

/// A scratch directory.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmptyDir {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub size_limit: Option<Quantity>,
}

/// Outbound network permissions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPermissions {
    /// Hosts the tool may reach; empty means no network at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub egress: Vec<EgressRule>,
}

/// One allowed destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// Exact host name or `*.suffix`.
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"
        )
    )]
    pub host: String,
    /// Allowed TCP ports; 443 when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ports: Vec<u16>,
    /// Path prefixes (whole segments, e.g. `/v1/search`) plain-HTTP requests
    /// may use; any path when empty. A rule with paths or methods admits no
    /// `CONNECT` tunnel, where the proxy could not see them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub paths: Vec<EgressPath>,
    /// HTTP methods plain-HTTP requests may use; any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub methods: Vec<HttpMethod>,
    /// The upstream speaks plain HTTP. Without it, a tool's `http://host/...`
    /// request is sent over TLS (verified against the system roots), so the
    /// proxy can add credentials and no key crosses the network in clear.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
}

/// An absolute request path prefix: no `.`/`..`/empty segments, no `%`, `?` or `#`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct EgressPath(
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^(/([^/.%?#\\]|\.[^/.%?#\\]|\.\.[^/%?#\\])[^/%?#\\]*)*/?$")
    )]
    pub String,
);

/// An HTTP method an egress rule admits.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Options => "OPTIONS",
        }
    }
}

/// One namespaced RBAC rule for the tool's identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesRule {
    /// API groups; `""` is the core group.
    #[schemars(length(min = 1, max = 16))]
    pub api_groups: Vec<String>,
    #[schemars(length(min = 1, max = 32))]
    pub resources: Vec<String>,
    #[schemars(length(min = 1, max = 16))]
    pub verbs: Vec<String>,
    /// Restrict the rule to these object names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
    /// Grant the rule in every namespace (a ClusterRole binding). Policies usually forbid it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster_wide: bool,
}

/// One Secret key and how the tool receives it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.env), has(self.file), has(self.inject)].filter(x, x).size() == 1",
     "message": "a secret is delivered exactly one way: env, file or inject"}
]))]
pub struct SecretUse {
    /// Name of the Secret in the tool's namespace (a DNS-1123 subdomain).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub secret_name: String,
    /// Key within the Secret (letters, digits, `-`, `_`, `.`; not `.` or `..`).
    #[schemars(length(min = 1, max = 253), regex(pattern = CONFIG_KEY))]
    pub key: String,
    /// Deliver as this environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub env: Option<String>,
    /// Deliver as a read-only file at this absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 1024), regex(pattern = r"^/"))]
    pub file: Option<String>,
    /// Never show the value to the tool: the egress proxy adds it as a header for one host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<SecretInjection>,
}

/// A header the egress proxy adds for one host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretInjection {
    /// Host (as in `permissions.network.egress`) the header is added for.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Header name, e.g. `X-API-Key` or `Authorization`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub header: String,
    /// Written before the value, e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub prefix: Option<String>,
    /// Only requests under this path prefix (whole segments) get the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<EgressPath>,
    /// Environment variable in which the tool gets this call's placeholder
    /// (`twph_` and 32 hex digits) to send as `prefix` + placeholder in
    /// `header`; the proxy swaps the real value in. Without it the tool gets
    /// nothing and must not send the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub placeholder_env: Option<String>,
}

/// Whom a rate limit counts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    /// Each caller has its own budget.
    #[default]
    Caller,
    /// All callers share one budget.
    Tool,
}

/// A token-bucket rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_minute: u32,
    /// Calls allowed at once before the rate applies; defaults to `requestsPerMinute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: Option<u32>,
    #[serde(default)]
    pub per: RateLimitScope,
}

/// Human approval of calls.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Approval {
    /// Calls wait for a human decision.
    pub required: bool,
    /// CEL over `input` and `caller`: only matching calls need approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub when: Option<String>,
    #[serde(default)]
    pub approvers: Approvers,
    /// A pending call is denied after this long.
    #[serde(default = "default_approval_timeout")]
    #[schemars(range(min = 10, max = 604800))]
    pub timeout_seconds: u32,
}

fn default_approval_timeout() -> u32 {
    3600
}

/// Who may approve.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Approvers {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// How calls are written to the audit trail.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditSpec {
    /// How the input is recorded.
    #[serde(default)]
    pub input: AuditLevel,
    /// JSON pointers of input fields replaced by `[REDACTED]` when `input: redacted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub redact: Vec<String>,
    /// In a cluster: write the audit records to this PersistentVolumeClaim of the
    /// tool's namespace (one `<pod>.jsonl` file per runner pod) instead of the runner
    /// container's stdout. Ignored by `serve` (see `--audit-log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub persistent_volume_claim: Option<String>,
}

/// Observed state of an AgentTool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentToolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `PolicyCompliant` and `Degraded`, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Where agents call the tool: `rest` and `mcp` URLs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, String>,
    /// The isolation the runner pods are given, layer by layer (e.g. `rootfs: imageVolume`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub isolation: BTreeMap<String, String>,
}
