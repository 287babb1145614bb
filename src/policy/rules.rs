//! The eight checklist groups of a ToolPolicy, each checked against one tool.

use crate::api::{AgentToolSpec, ToolPolicy, parse_quantity};

use super::Violation;
use super::baseline::path_is_under;
use super::catalog::{self as rule, Rule};
use super::facts::ToolFacts;
use super::schema_shape::SchemaSite;

/// Kubernetes verbs that change state or widen access.
pub const WRITE_VERBS: &[&str] = &[
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "escalate",
    "bind",
    "impersonate",
    "*",
];

struct Ctx<'a> {
    policy: &'a ToolPolicy,
    out: &'a mut Vec<Violation>,
}

impl Ctx<'_> {
    fn flag(&mut self, rule: Rule, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Violation {
            rule: rule.id,
            item: rule.item,
            path: path.into(),
            message: message.into(),
            policy: self.policy.metadata.name.clone(),
            mode: self.policy.spec.mode,
        });
    }

    fn flag_sites(
        &mut self,
        rule: Rule,
        sites: &[SchemaSite],
        message: impl Fn(&SchemaSite) -> String,
    ) {
        for site in sites {
            self.flag(rule, site.schema_path.clone(), message(site));
        }
    }
}

pub fn check(
    policy: &ToolPolicy,
    spec: &AgentToolSpec,
    facts: &ToolFacts,
    out: &mut Vec<Violation>,
) {
    let mut ctx = Ctx { policy, out };
    input_validation(&mut ctx, spec, facts);
    sanitization(&mut ctx, spec, facts);
    least_privilege(&mut ctx, spec);
    sandboxing(&mut ctx, spec);
    audit_logging(&mut ctx, spec);
    human_oversight(&mut ctx, spec);
    rate_limiting(&mut ctx, spec);
    secret_management(&mut ctx, spec);
}

fn input_name(site: &SchemaSite) -> String {
    if site.data_path.is_empty() {
        "the input".into()
    } else {
        format!("input field `{}`", site.data_path)
    }
}

fn input_validation(ctx: &mut Ctx, spec: &AgentToolSpec, facts: &ToolFacts) {
    let policy = ctx.policy;
    let Some(rules) = &policy.spec.rules.input_validation else {
        return;
    };
    if rules.require_strict_schema {
        ctx.flag_sites(rule::SCHEMA_OBJECT_CLOSED, &facts.shape.open_objects, |s| {
            format!(
                "{} accepts unknown properties; set additionalProperties: false",
                input_name(s)
            )
        });
        ctx.flag_sites(
            rule::SCHEMA_STRING_BOUNDED,
            &facts.shape.unbounded_strings,
            |s| {
                format!(
                    "{} is an unbounded string; add maxLength, enum, format or pattern",
                    input_name(s)
                )
            },
        );
        ctx.flag_sites(
            rule::SCHEMA_ARRAY_BOUNDED,
            &facts.shape.unbounded_arrays,
            |s| format!("{} is an unbounded array; add maxItems", input_name(s)),
        );
    }
    if let Some(cap) = rules.max_input_bytes
        && spec.max_input_bytes > cap
    {
        ctx.flag(
            rule::INPUT_BYTES_CAPPED,
            "spec.maxInputBytes",
            format!(
                "maxInputBytes {} exceeds the policy cap of {cap}",
                spec.max_input_bytes
            ),
        );
    }
    if rules.require_output_schema_for_risk.contains(&spec.risk) && spec.output_schema.is_none() {
        ctx.flag(
            rule::OUTPUT_SCHEMA_FOR_RISK,
            "spec.outputSchema",
            format!(
                "{}-risk tools must declare an outputSchema, so their answers are checked before an agent sees them",
                spec.risk.as_str()
            ),
        );
    }
}

fn sanitization(ctx: &mut Ctx, spec: &AgentToolSpec, facts: &ToolFacts) {
    let policy = ctx.policy;
    let Some(rules) = &policy.spec.rules.sanitization else {
        return;
    };
    if !rules.require_for_free_text {
        return;
    }
    for site in &facts.shape.free_text {
        if !spec.sanitize.iter().any(|s| s.field == site.data_path) {
            let message = format!(
                "{} is free text with no sanitize rule; add one to spec.sanitize",
                input_name(site)
            );
            ctx.flag(rule::FREE_TEXT_SANITIZED, site.schema_path.clone(), message);
        }
    }
}

fn least_privilege(ctx: &mut Ctx, spec: &AgentToolSpec) {
    let policy = ctx.policy;
    let Some(rules) = &policy.spec.rules.least_privilege else {
        return;
    };
    for (i, k8s) in spec.permissions.kubernetes.iter().enumerate() {
        let base = format!("spec.permissions.kubernetes[{i}]");
        if let Some(allowed) = &rules.allowed_verbs {
            for (j, verb) in k8s.verbs.iter().enumerate() {
                if !allowed.contains(verb) {
                    ctx.flag(
                        rule::KUBE_VERB_ALLOWED,
                        format!("{base}.verbs[{j}]"),
                        format!(
                            "verb `{verb}` is not allowed (allowed: {})",
                            allowed.join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(allowed) = &rules.allowed_resources {
            for (j, resource) in k8s.resources.iter().enumerate() {
                if !allowed.contains(resource) {
                    ctx.flag(
                        rule::KUBE_RESOURCE_ALLOWED,
                        format!("{base}.resources[{j}]"),
                        format!(
                            "resource `{resource}` is not allowed (allowed: {})",
                            allowed.join(", ")
                        ),
                    );
                }
            }
        }
        let core_group = k8s.api_groups.iter().any(|g| g.is_empty() || g == "*");
        let secrets = k8s
            .resources
            .iter()
            .any(|r| r == "secrets" || r == "*" || r.starts_with("secrets/"));
        if rules.forbid_secret_access && core_group && secrets {
            ctx.flag(
                rule::NO_SECRET_ACCESS,
                format!("{base}.resources"),
                "rule grants access to Secrets; use spec.secrets to receive a key",
            );
        }
        if rules.forbid_cluster_scope && k8s.cluster_wide {
            ctx.flag(
                rule::NO_CLUSTER_SCOPE,
                format!("{base}.clusterWide"),
                "cluster-wide rules are forbidden; grant access in the tool's namespace",
            );
        }
    }
    for (i, mount) in spec.permissions.filesystem.iter().enumerate() {
        let base = format!("spec.permissions.filesystem[{i}]");
        if let Some(allowed) = &rules.allowed_writable_paths
            && !mount.read_only
            && !allowed
                .iter()
                .any(|prefix| path_is_under(&mount.mount_path, prefix))
        {
            ctx.flag(
                rule::WRITABLE_PATH_ALLOWED,
                format!("{base}.readOnly"),
                format!(
                    "`{}` is writable but not under an allowed path ({})",
                    mount.mount_path,
                    allowed.join(", ")
                ),
            );
        }
        if rules.forbid_host_path && mount.host_path.is_some() {
            ctx.flag(
                rule::NO_HOST_PATH,
                format!("{base}.hostPath"),
                "hostPath mounts are forbidden",
            );
        }
    }
    let image = &spec.runtime.image;
    if let Some(allowed) = &rules.allowed_registries
        && !allowed
            .iter()
            .any(|prefix| image.starts_with(prefix.as_str()))
    {
        ctx.flag(
            rule::IMAGE_REGISTRY_ALLOWED,
            "spec.runtime.image",
            format!(
                "`{image}` is not from an allowed registry ({})",
                allowed.join(", ")
            ),
        );
    }
    if rules.require_ip_allow_list_for_risk.contains(&spec.risk) {
        let list = spec
            .callers
            .as_ref()
            .map_or(&[][..], |c| c.ip_allow_list.as_slice());
        let open = list
            .iter()
            .find(|cidr| matches!(cidr.trim(), "0.0.0.0/0" | "::/0"));
        if list.is_empty() {
            ctx.flag(
                rule::IP_ALLOW_LIST_FOR_RISK,
                "spec.callers.ipAllowList",
                format!(
                    "{}-risk tools must list the networks that may call them in callers.ipAllowList",
                    spec.risk.as_str()
                ),
            );
        } else if let Some(open) = open {
            ctx.flag(
                rule::IP_ALLOW_LIST_FOR_RISK,
                "spec.callers.ipAllowList",
                format!("`{open}` allows every address; list the callers' networks"),
            );
        }
    }
    if rules.require_image_digest && !is_pinned(image) {
        ctx.flag(
            rule::IMAGE_PINNED,
            "spec.runtime.image",
            format!("`{image}` is not pinned; use name@sha256:<64 hex digits>"),
        );
    }
}

fn is_pinned(image: &str) -> bool {
    image.split_once("@sha256:").is_some_and(|(_, digest)| {
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// True when egress `host` (exact or `*.suffix`) is covered by `pattern`.
fn host_allowed(host: &str, pattern: &str) -> bool {
    match pattern.strip_prefix("*.") {
        None => host == pattern,
        Some(suffix) => {
            let host = host.strip_prefix("*.").unwrap_or(host);
            host.strip_suffix(suffix)
                .is_some_and(|rest| rest.ends_with('.'))
        }
    }
}

fn sandboxing(ctx: &mut Ctx, spec: &AgentToolSpec) {
    let policy = ctx.policy;
    let Some(rules) = &policy.spec.rules.sandboxing else {
        return;
    };
    let sandbox = &spec.sandbox;
    if let Some(max) = rules.max_timeout_ms
        && sandbox.timeout_ms > max
    {
        ctx.flag(
            rule::TIMEOUT_CAPPED,
            "spec.sandbox.timeoutMs",
            format!(
                "timeoutMs {} exceeds the policy cap of {max}",
                sandbox.timeout_ms
            ),
        );
    }
    if let Some(max) = &rules.max_memory {
        let cap = parse_quantity(max).unwrap_or(0.0);
        match sandbox.memory.as_ref().map(|m| (m, parse_quantity(m))) {
            None => ctx.flag(
                rule::MEMORY_CAPPED,
                "spec.sandbox.memory",
                format!(
                    "no memory limit; the policy requires one of at most {}",
                    max.0
                ),
            ),
            Some((m, Ok(v))) if v > cap => ctx.flag(
                rule::MEMORY_CAPPED,
                "spec.sandbox.memory",
                format!("memory {} exceeds the policy cap of {}", m.0, max.0),
            ),
            // An unparsable value is reported by the baseline.
            Some(_) => {}
        }
    }
    if let Some(max) = rules.max_pids
        && sandbox.pids > max
    {
        ctx.flag(
            rule::PIDS_CAPPED,
            "spec.sandbox.pids",
            format!("pids {} exceeds the policy cap of {max}", sandbox.pids),
        );
    }
    if let Some(allowed) = &rules.allowed_egress_hosts {
        for (i, egress) in spec.permissions.network.egress.iter().enumerate() {
            if !allowed
                .iter()
                .any(|pattern| host_allowed(&egress.host, pattern))
            {
                ctx.flag(
                    rule::EGRESS_ALLOWED,
                    format!("spec.permissions.network.egress[{i}].host"),
                    format!(
                        "egress to `{}` is not allowed (allowed: {})",
                        egress.host,
                        allowed.join(", ")
                    ),
                );
            }
        }
    }
    match (&sandbox.runtime_class_name, &rules.allowed_runtime_classes) {
        (None, _) if rules.require_runtime_class => {
            ctx.flag(
                rule::RUNTIME_CLASS_ALLOWED,
                "spec.sandbox.runtimeClassName",
                "the policy requires a runtimeClassName",
            );
        }
        (Some(class), Some(allowed)) if !allowed.contains(class) => ctx.flag(
            rule::RUNTIME_CLASS_ALLOWED,
            "spec.sandbox.runtimeClassName",
            format!(
                "runtime class `{class}` is not allowed (allowed: {})",
                allowed.join(", ")
            ),
        ),
        _ => {}
    }
}

fn audit_logging(ctx: &mut Ctx, spec: &AgentToolSpec) {
    let policy = ctx.policy;
    let Some(rules) = &policy.spec.rules.audit_logging else {
        return;
    };
    let level = spec.audit.input;
    if let Some(min) = rules.min_level
        && level < min
    {
        ctx.flag(
            rule::AUDIT_LEVEL_MINIMUM,
            "spec.audit.input",
            format!(
                "audit input `{}` records less than the policy minimum `{}`",
                level.as_str(),
                min.as_str()
            ),
        );
    }
    if rules.forbid_full_with_secrets
        && level == crate::api::AuditLevel::Full
        && !spec.secrets.is_empty()
    {
        ctx.flag(
            rule::AUDIT_NO_FULL_WITH_SECRETS,
            "spec.audit.input",
            "a tool with secrets may not record full input; use digest or redacted",
        );
    }
}

fn human_oversight(ctx: &mut Ctx, spec: &AgentToolSpec) {
    let policy = ctx.policy;
    let Some(rules) = &policy.spec.rules.human_oversight else {
        return;
    };
    let approval_required = spec.approval.as_ref().is_some_and(|a| a.required);
    if approval_required {
        return;
    }
    if rules.require_approval_for_risk.contains(&spec.risk) {
        ctx.flag(
            rule::APPROVAL_FOR_RISK,
            "spec.approval.required",
            format!("{}-risk tools must require approval", spec.risk.as_str()),
        );
    }
    let writes = spec
        .permissions
        .kubernetes
        .iter()
        .flat_map(|k| &k.verbs)
        .find(|v| WRITE_VERBS.contains(&v.as_str()));
    if rules.require_approval_for_kubernetes_writes
        && let Some(verb) = writes
    {
        ctx.flag(
            rule::APPROVAL_FOR_KUBE_WRITES,
            "spec.approval.required",
            format!("the tool may `{verb}` Kubernetes objects, so it must require approval"),
        );
    }
}

fn rate_limiting(ctx: &mut Ctx, spec: &AgentToolSpec) {
    let policy = ctx.policy;
    let Some(rules) = &policy.spec.rules.rate_limiting else {
        return;
    };
    if rules.require_anomaly_scoring_for_risk.contains(&spec.risk) && spec.anomaly.is_none() {
        ctx.flag(
            rule::ANOMALY_SCORING_FOR_RISK,
            "spec.anomaly",
            format!(
                "{}-risk tools must declare anomaly scoring (spec.anomaly)",
                spec.risk.as_str()
            ),
        );
    }
    match (&spec.rate_limit, rules.max_requests_per_minute) {
        (None, _) if rules.required => ctx.flag(
            rule::RATE_LIMIT_PRESENT,
            "spec.rateLimit",
            "the policy requires a rate limit",
        ),
        (Some(limit), Some(max)) if limit.requests_per_minute > max => ctx.flag(
            rule::RATE_LIMIT_CAPPED,
            "spec.rateLimit.requestsPerMinute",
            format!(
                "{} requests per minute exceeds the policy cap of {max}",
                limit.requests_per_minute
            ),
        ),
        _ => {}
    }
}

fn secret_management(ctx: &mut Ctx, spec: &AgentToolSpec) {
    let policy = ctx.policy;
    let Some(rules) = &policy.spec.rules.secret_management else {
        return;
    };
    if !rules.require_injection {
        return;
    }
    for (i, secret) in spec.secrets.iter().enumerate() {
        if secret.inject.is_none() {
            ctx.flag(
                rule::SECRET_INJECTED_ONLY,
                format!("spec.secrets[{i}]"),
                format!("secret `{}` is shown to the tool; deliver it with inject so only the egress proxy sees it", secret.secret_name),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert!(host_allowed("api.example.com", "api.example.com"));
        assert!(host_allowed("api.example.com", "*.example.com"));
        assert!(host_allowed("*.api.example.com", "*.example.com"));
        assert!(!host_allowed("example.com", "*.example.com"));
        assert!(!host_allowed("evilexample.com", "*.example.com"));
        assert!(!host_allowed("*.example.com", "api.example.com"));
    }

    #[test]
    fn paths_and_digests() {
        assert!(path_is_under("/data/out", "/data") && path_is_under("/data", "/data/"));
        assert!(!path_is_under("/database", "/data"));
        assert!(is_pinned(&format!("ghcr.io/a/b@sha256:{}", "a".repeat(64))));
        assert!(!is_pinned("ghcr.io/a/b:latest"));
    }
}
