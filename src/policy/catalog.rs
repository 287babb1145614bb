//! The stable rule IDs: one entry per rule, with its checklist item and a
//! one-line summary. IDs never change meaning; retired rules are not reused.

use serde::Serialize;

/// The eight items of the security checklist.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ChecklistItem {
    InputValidation,
    Sanitization,
    LeastPrivilege,
    Sandboxing,
    AuditLogging,
    HumanOversight,
    RateLimiting,
    SecretManagement,
}

impl ChecklistItem {
    pub fn as_str(self) -> &'static str {
        match self {
            ChecklistItem::InputValidation => "input-validation",
            ChecklistItem::Sanitization => "sanitization",
            ChecklistItem::LeastPrivilege => "least-privilege",
            ChecklistItem::Sandboxing => "sandboxing",
            ChecklistItem::AuditLogging => "audit-logging",
            ChecklistItem::HumanOversight => "human-oversight",
            ChecklistItem::RateLimiting => "rate-limiting",
            ChecklistItem::SecretManagement => "secret-management",
        }
    }
}

/// A rule of the checklist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub id: &'static str,
    pub item: ChecklistItem,
    /// True when the rule applies with no ToolPolicy at all.
    pub baseline: bool,
    pub summary: &'static str,
}

use ChecklistItem::*;

macro_rules! rules {
    ($($name:ident = $id:literal, $item:ident, $baseline:literal, $summary:literal;)*) => {
        $(pub const $name: Rule = Rule { id: $id, item: $item, baseline: $baseline, summary: $summary };)*
        /// Every rule, in ID order.
        pub const ALL: &[Rule] = &[$($name),*];
    };
}

rules! {
    SCHEMA_COMPILES = "TW-INPUT-001", InputValidation, true, "inputSchema (and outputSchema) compile as JSON Schema 2020-12 with no remote references";
    SCHEMA_OBJECT_CLOSED = "TW-INPUT-002", InputValidation, false, "every object in the input schema is closed (additionalProperties: false)";
    SCHEMA_STRING_BOUNDED = "TW-INPUT-003", InputValidation, false, "every string is bounded by maxLength, enum, const, format or pattern";
    SCHEMA_ARRAY_BOUNDED = "TW-INPUT-004", InputValidation, false, "every array is bounded by maxItems";
    INPUT_BYTES_CAPPED = "TW-INPUT-005", InputValidation, false, "maxInputBytes is within the policy cap";
    SCHEMA_TOO_DEEP = "TW-INPUT-006", InputValidation, true, "the input schema nests at most 32 levels";
    OUTPUT_SCHEMA_FOR_RISK = "TW-INPUT-007", InputValidation, false, "tools of the policy's risk levels declare an outputSchema";
    FREE_TEXT_SANITIZED = "TW-SANITIZE-001", Sanitization, false, "free-text strings have a sanitize rule";
    SANITIZE_TARGET_EXISTS = "TW-SANITIZE-002", Sanitization, true, "each sanitize rule names a string field of the input schema";
    GUARDS_FOR_HIGH_RISK = "TW-SANITIZE-003", Sanitization, true, "tools of risk: high declare input guards";
    GUARDS_VALID = "TW-SANITIZE-004", Sanitization, true, "guards name known rules, fit their kind, and input guards name fields of the input schema";
    KUBE_VERB_ALLOWED = "TW-PRIV-001", LeastPrivilege, false, "Kubernetes verbs are within the policy's allowed verbs";
    KUBE_RESOURCE_ALLOWED = "TW-PRIV-002", LeastPrivilege, false, "Kubernetes resources are within the policy's allowed resources";
    NO_SECRET_ACCESS = "TW-PRIV-003", LeastPrivilege, false, "no Kubernetes rule reaches Secrets";
    NO_CLUSTER_SCOPE = "TW-PRIV-004", LeastPrivilege, false, "no Kubernetes rule is cluster-wide";
    WRITABLE_PATH_ALLOWED = "TW-PRIV-005", LeastPrivilege, false, "writable mounts are under the policy's allowed paths";
    IMAGE_REGISTRY_ALLOWED = "TW-PRIV-006", LeastPrivilege, false, "the image comes from an allowed registry";
    IMAGE_PINNED = "TW-PRIV-007", LeastPrivilege, false, "the image is pinned by digest";
    AUTHORIZATION_COMPILES = "TW-PRIV-008", LeastPrivilege, true, "authorization expressions are valid CEL";
    NO_HOST_PATH = "TW-PRIV-009", LeastPrivilege, true, "no hostPath mounts, except read-only under a policy's allowedHostPaths";
    IP_ALLOW_LIST_FOR_RISK = "TW-PRIV-010", LeastPrivilege, false, "tools of the policy's risk levels restrict callers with callers.ipAllowList";
    IP_ALLOW_LIST_VALID = "TW-PRIV-011", LeastPrivilege, true, "callers.ipAllowList entries are IP addresses or CIDRs";
    TIMEOUT_CAPPED = "TW-SANDBOX-001", Sandboxing, false, "timeoutMs is within the policy cap";
    MEMORY_CAPPED = "TW-SANDBOX-002", Sandboxing, false, "sandbox.memory is set and within the policy cap";
    PIDS_CAPPED = "TW-SANDBOX-003", Sandboxing, false, "pids is within the policy cap";
    EGRESS_ALLOWED = "TW-SANDBOX-004", Sandboxing, false, "egress hosts match the policy's allowed patterns";
    RUNTIME_CLASS_ALLOWED = "TW-SANDBOX-005", Sandboxing, false, "the runtime class is allowed (and present when required)";
    QUANTITIES_VALID = "TW-SANDBOX-006", Sandboxing, true, "memory, cpu, tmpSize and volume sizeLimits are valid, positive quantities";
    AUDIT_LEVEL_MINIMUM = "TW-AUDIT-001", AuditLogging, false, "audit.input records at least the policy's minimum level";
    AUDIT_NO_FULL_WITH_SECRETS = "TW-AUDIT-002", AuditLogging, false, "tools with secrets do not record full input";
    AUDIT_REDACT_USED = "TW-AUDIT-003", AuditLogging, true, "audit.redact is only set with input: redacted";
    APPROVAL_FOR_RISK = "TW-OVERSIGHT-001", HumanOversight, false, "tools of the policy's risk levels require approval";
    APPROVAL_FOR_KUBE_WRITES = "TW-OVERSIGHT-002", HumanOversight, false, "tools with Kubernetes write verbs require approval";
    APPROVAL_CONSISTENT = "TW-OVERSIGHT-003", HumanOversight, true, "approval.when is valid CEL, needs required: true, and approvers are named";
    RATE_LIMIT_PRESENT = "TW-RATE-001", RateLimiting, false, "a rate limit is declared";
    RATE_LIMIT_CAPPED = "TW-RATE-002", RateLimiting, false, "requestsPerMinute is within the policy cap";
    ANOMALY_SCORING_FOR_RISK = "TW-RATE-003", RateLimiting, false, "tools of the policy's risk levels declare anomaly scoring";
    NO_LITERAL_SECRET = "TW-SECRET-001", SecretManagement, true, "no known credential format in runtime env, args or command";
    NO_HIGH_ENTROPY_LITERAL = "TW-SECRET-002", SecretManagement, true, "no high-entropy literal in runtime env, args or command";
    SECRET_NAMED_ENV_LITERAL = "TW-SECRET-003", SecretManagement, true, "a secret-named env var (…_TOKEN, …_PASSWORD) gets its value from spec.secrets";
    SECRET_DELIVERED_ONCE = "TW-SECRET-004", SecretManagement, true, "each secret has exactly one delivery, injected hosts are in the egress list, and placeholder variables clash with no other variable";
    SECRET_INJECTED_ONLY = "TW-SECRET-005", SecretManagement, false, "secrets are injected by the egress proxy, never shown to the tool";
}

/// Looks a rule up by ID.
pub fn by_id(id: &str) -> Option<&'static Rule> {
    ALL.iter().find(|rule| rule.id == id)
}
