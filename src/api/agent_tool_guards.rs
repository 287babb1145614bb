//! The parts of an AgentTool that watch calls rather than run them: content
//! guards, anomaly scoring, caller address allow-lists and resource alerts.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::optional_quantity;

/// Content guards on a call's input and, separately, on the tool's output.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Guards {
    /// Checked on the input after sanitization, before authorization.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub input: Vec<GuardDecl>,
    /// Checked on the tool's JSON output before it is returned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub output: Vec<GuardDecl>,
}

impl Guards {
    pub fn is_empty(&self) -> bool {
        self.input.is_empty() && self.output.is_empty()
    }
}

/// What a guard looks for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GuardKind {
    /// Personal information: e-mail addresses, phone numbers, payment cards
    /// (Luhn), IBANs (mod 97), US social security and UK national insurance numbers.
    Pii,
    /// Credentials: known key and token formats, private keys, JWTs, high-entropy tokens.
    Secrets,
    /// Prompt-injection phrasing, matched after Unicode folding.
    PromptInjection,
    /// SQL, shell, markup and path-traversal injection in plain-text fields.
    Malicious,
    /// An external classifier: the field is posted to `http.endpoint`.
    Http,
}

impl GuardKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardKind::Pii => "pii",
            GuardKind::Secrets => "secrets",
            GuardKind::PromptInjection => "promptInjection",
            GuardKind::Malicious => "malicious",
            GuardKind::Http => "http",
        }
    }
}

/// What happens when a guard finds something.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum GuardAction {
    /// Record the finding; the call goes on.
    Flag,
    /// Replace what was found with `[REDACTED:<rule>]`; the call goes on.
    Redact,
    /// Refuse the call with a generic problem that does not say which check fired.
    Refuse,
}

impl GuardAction {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardAction::Flag => "flag",
            GuardAction::Redact => "redact",
            GuardAction::Refuse => "refuse",
        }
    }
}

/// One guard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.kind == 'http' ? has(self.http) : !has(self.http)",
     "message": "http options go with kind: http, and kind: http needs them"},
    {"rule": "self.kind != 'http' || self.action != 'redact'",
     "message": "an http guard can refuse or flag, not redact"}
]))]
pub struct GuardDecl {
    pub kind: GuardKind,
    pub action: GuardAction,
    /// JSON pointers of the fields checked (a pointer to an object or array covers
    /// everything inside; `*` matches any one key or index). Empty: every string.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub fields: Vec<GuardField>,
    /// Only these rules of the kind's rule set (e.g. `paymentCard`, `iban` for
    /// `pii`; `sql`, `shell`, `markup`, `pathTraversal` for `malicious`). Empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub categories: Vec<GuardCategory>,
    /// The external classifier of a `kind: http` guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpGuard>,
}

/// A JSON pointer into the checked document.
pub type GuardField = String;
/// A rule or category name of a guard kind's rule set.
pub type GuardCategory = String;

/// An external classifier service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGuard {
    /// URL the field is POSTed to as `{"pointer": ..., "text": ...}`; it answers
    /// `{"verdict": "allow" | "deny", "rule": "..."}`.
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub endpoint: String,
    /// Longest wait for a verdict.
    #[serde(default = "default_http_guard_timeout_ms")]
    #[schemars(range(min = 10, max = 30000))]
    pub timeout_ms: u32,
    /// Let the call through when the classifier cannot answer; refused by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_open: bool,
}

fn default_http_guard_timeout_ms() -> u32 {
    1000
}

/// Per-caller anomaly scoring.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.flagAbove) || !has(self.threshold) || self.flagAbove <= self.threshold",
     "message": "flagAbove must not exceed threshold"}
]))]
pub struct AnomalySpec {
    /// Calls scoring above this (0 to 1) are refused as suspicious.
    #[serde(default = "default_anomaly_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub threshold: f64,
    /// Calls scoring above this but not above `threshold` run and are flagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub flag_above: Option<f64>,
    /// A caller's first calls only train its baseline; none of them is refused.
    #[serde(default = "default_cold_start_calls")]
    #[schemars(range(min = 0, max = 100000))]
    pub cold_start_calls: u32,
}

fn default_anomaly_threshold() -> f64 {
    0.8
}
fn default_cold_start_calls() -> u32 {
    20
}

impl Default for AnomalySpec {
    fn default() -> Self {
        AnomalySpec {
            threshold: default_anomaly_threshold(),
            flag_above: None,
            cold_start_calls: default_cold_start_calls(),
        }
    }
}

/// Who may call the tool, by network address.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Callers {
    /// CIDRs (IPv4 or IPv6, e.g. `10.0.0.0/8`, `2001:db8::/32`) the client
    /// address must be in. Empty: any address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub ip_allow_list: Vec<String>,
}

/// Alerts on calls that use a lot; the call itself is not failed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Alerts {
    /// Alert when a call runs longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600000))]
    pub duration_ms: Option<u32>,
    /// Alert when a call's sandbox peaks above this much memory, e.g. `100Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub memory: Option<Quantity>,
}
