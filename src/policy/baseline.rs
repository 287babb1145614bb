//! Rules that hold for every tool, with or without a ToolPolicy: the schema
//! compiles, expressions parse, quantities are valid, cross-field consistency,
//! no literal secrets, and no hostPath an administrator did not allow.

use crate::api::{AgentToolSpec, AllowedHostPath, AuditLevel, PolicyMode, Risk, parse_quantity};
use crate::guards::GuardSet;
use crate::guards::client_addr::IpAllowList;

use super::Violation;
use super::catalog::{self as rule, Rule};
use super::facts::ToolFacts;
use super::literal_secrets::{SecretLook, is_secret_name, looks_like_secret};
use super::schema_shape::MAX_SCHEMA_DEPTH;

/// `host_paths`: what the policies that select the tool allow for `hostPath`.
pub fn check(
    spec: &AgentToolSpec,
    facts: &ToolFacts,
    host_paths: &[&AllowedHostPath],
    out: &mut Vec<Violation>,
) {
    let mut flag = |rule: Rule, path: String, message: String| {
        out.push(Violation {
            rule: rule.id,
            item: rule.item,
            path,
            message,
            policy: None,
            mode: PolicyMode::Enforce,
        })
    };

    if let Some(error) = &facts.schema_error {
        flag(
            rule::SCHEMA_COMPILES,
            "spec.inputSchema".into(),
            format!("input schema does not compile: {error}"),
        );
    }
    if let Some(error) = &facts.output_schema_error {
        flag(
            rule::SCHEMA_COMPILES,
            "spec.outputSchema".into(),
            format!("output schema does not compile: {error}"),
        );
    }
    if let Some(site) = &facts.shape.too_deep {
        flag(
            rule::SCHEMA_TOO_DEEP,
            site.schema_path.clone(),
            format!("input schema nests deeper than {MAX_SCHEMA_DEPTH} levels"),
        );
    }
    for (i, sanitize) in spec.sanitize.iter().enumerate() {
        if !facts.shape.string_fields.contains(&sanitize.field) {
            flag(
                rule::SANITIZE_TARGET_EXISTS,
                format!("spec.sanitize[{i}].field"),
                format!(
                    "`{}` is not a string field of the input schema",
                    sanitize.field
                ),
            );
        }
    }
    for (i, error) in &facts.authorization_errors {
        flag(
            rule::AUTHORIZATION_COMPILES,
            format!("spec.authorization[{i}].expression"),
            format!("not a valid CEL expression: {error}"),
        );
    }
    if let Some(approval) = &spec.approval {
        if let Some(error) = &facts.approval_when_error {
            flag(
                rule::APPROVAL_CONSISTENT,
                "spec.approval.when".into(),
                format!("not a valid CEL expression: {error}"),
            );
        }
        if approval.when.is_some() && !approval.required {
            flag(
                rule::APPROVAL_CONSISTENT,
                "spec.approval.when".into(),
                "approval.when needs approval.required: true".into(),
            );
        }
        if approval.required
            && approval.approvers.users.is_empty()
            && approval.approvers.groups.is_empty()
        {
            flag(
                rule::APPROVAL_CONSISTENT,
                "spec.approval.approvers".into(),
                "approval is required but no approver users or groups are named".into(),
            );
        }
    }
    if spec.audit.input != AuditLevel::Redacted && !spec.audit.redact.is_empty() {
        flag(
            rule::AUDIT_REDACT_USED,
            "spec.audit.redact".into(),
            format!(
                "redact fields have no effect with `input: {}`; use `input: redacted`",
                spec.audit.input.as_str()
            ),
        );
    }
    let sandbox = &spec.sandbox;
    let mut quantities = vec![
        ("spec.sandbox.memory".to_string(), &sandbox.memory),
        ("spec.sandbox.cpu".to_string(), &sandbox.cpu),
        ("spec.sandbox.tmpSize".to_string(), &sandbox.tmp_size),
    ];
    if let Some(alerts) = &spec.alerts {
        quantities.push(("spec.alerts.memory".to_string(), &alerts.memory));
    }
    for (i, mount) in spec.permissions.filesystem.iter().enumerate() {
        quantities.push((
            format!("spec.permissions.filesystem[{i}].sizeLimit"),
            &mount.size_limit,
        ));
    }
    for (path, quantity) in quantities {
        let field = path.rsplit('.').next().unwrap_or_default().to_string();
        if let Some(q) = quantity {
            match parse_quantity(q) {
                Ok(v) if v > 0.0 => {}
                Ok(_) => flag(
                    rule::QUANTITIES_VALID,
                    path,
                    format!("{field} must be greater than zero"),
                ),
                Err(e) => flag(rule::QUANTITIES_VALID, path, e.to_string()),
            }
        }
    }
    check_guards(spec, facts, &mut flag);
    check_callers(spec, &mut flag);
    check_host_paths(spec, host_paths, &mut flag);
    check_secret_delivery(spec, &mut flag);
    check_literals(spec, &mut flag);
}

/// High-risk tools declare input guards; every guard compiles, and input
/// guards name fields the input schema has.
fn check_guards(
    spec: &AgentToolSpec,
    facts: &ToolFacts,
    flag: &mut impl FnMut(Rule, String, String),
) {
    if spec.risk == Risk::High && spec.guards.input.is_empty() {
        flag(
            rule::GUARDS_FOR_HIGH_RISK,
            "spec.guards.input".into(),
            "high-risk tools must declare input guards (e.g. promptInjection and malicious on free-text fields)".into(),
        );
    }
    let lists = [
        ("input", &spec.guards.input),
        ("output", &spec.guards.output),
    ];
    for (list, decls) in lists {
        for (i, decl) in decls.iter().enumerate() {
            let path = format!("spec.guards.{list}[{i}]");
            if let Err(e) = GuardSet::compile(std::slice::from_ref(decl)) {
                flag(rule::GUARDS_VALID, path, e.to_string());
                continue;
            }
            if list != "input" {
                continue;
            }
            for (j, field) in decl.fields.iter().enumerate() {
                if !names_schema_strings(field, &facts.shape.string_fields) {
                    flag(
                        rule::GUARDS_VALID,
                        format!("{path}.fields[{j}]"),
                        format!("`{field}` holds no string field of the input schema"),
                    );
                }
            }
        }
    }
}

/// True when `field` is a string field of the schema or contains one; `*`
/// (either side) matches any one segment.
fn names_schema_strings<'a>(
    field: &str,
    string_fields: impl IntoIterator<Item = &'a String>,
) -> bool {
    let wanted: Vec<&str> = field.split('/').skip(1).collect();
    string_fields.into_iter().any(|string_field| {
        let have: Vec<&str> = string_field.split('/').skip(1).collect();
        wanted.len() <= have.len()
            && wanted
                .iter()
                .zip(&have)
                .all(|(w, h)| w == h || *w == "*" || *h == "*")
    })
}

fn check_callers(spec: &AgentToolSpec, flag: &mut impl FnMut(Rule, String, String)) {
    let Some(callers) = &spec.callers else {
        return;
    };
    for (i, entry) in callers.ip_allow_list.iter().enumerate() {
        if let Err(e) = IpAllowList::parse(std::slice::from_ref(entry)) {
            flag(
                rule::IP_ALLOW_LIST_VALID,
                format!("spec.callers.ipAllowList[{i}]"),
                e.to_string(),
            );
        }
    }
}

/// Every hostPath must lie under a prefix a selecting policy allows, and be
/// read-only unless that prefix allows writes.
fn check_host_paths(
    spec: &AgentToolSpec,
    allowed: &[&AllowedHostPath],
    flag: &mut impl FnMut(Rule, String, String),
) {
    for (i, mount) in spec.permissions.filesystem.iter().enumerate() {
        let Some(path) = &mount.host_path else {
            continue;
        };
        let covering: Vec<&&AllowedHostPath> = allowed
            .iter()
            .filter(|a| path_is_under(path, &a.path_prefix))
            .collect();
        let message = if covering.is_empty() {
            format!(
                "hostPath `{path}` is not allowed: no ToolPolicy selecting this tool lists it in leastPrivilege.allowedHostPaths"
            )
        } else if !mount.read_only && covering.iter().all(|a| a.read_only) {
            format!(
                "hostPath `{path}` is writable, but its allowedHostPaths entry allows read-only mounts only; set readOnly: true"
            )
        } else {
            continue;
        };
        flag(
            rule::NO_HOST_PATH,
            format!("spec.permissions.filesystem[{i}].hostPath"),
            message,
        );
    }
}

/// True when `path` is `prefix` or below it, by whole path components.
pub(super) fn path_is_under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn check_secret_delivery(spec: &AgentToolSpec, flag: &mut impl FnMut(Rule, String, String)) {
    let egress = &spec.permissions.network.egress;
    for (i, secret) in spec.secrets.iter().enumerate() {
        let ways = [
            secret.env.is_some(),
            secret.file.is_some(),
            secret.inject.is_some(),
        ]
        .iter()
        .filter(|w| **w)
        .count();
        if ways != 1 {
            flag(
                rule::SECRET_DELIVERED_ONCE,
                format!("spec.secrets[{i}]"),
                format!(
                    "secret `{}` must be delivered exactly one way (env, file or inject), found {ways}",
                    secret.secret_name
                ),
            );
        }
        if let Some(inject) = &secret.inject
            && !egress.iter().any(|rule| rule.host == inject.host)
        {
            flag(
                rule::SECRET_DELIVERED_ONCE,
                format!("spec.secrets[{i}].inject.host"),
                format!(
                    "`{}` is not in permissions.network.egress, so the header could never be sent",
                    inject.host
                ),
            );
        }
        if let Some(name) = secret
            .inject
            .as_ref()
            .and_then(|i| i.placeholder_env.as_ref())
        {
            let taken = crate::egress::PROXY_ENV.contains(&name.as_str())
                || spec.runtime.env.iter().any(|e| &e.name == name)
                || spec.secrets.iter().enumerate().any(|(j, other)| {
                    j != i
                        && (other.env.as_ref() == Some(name)
                            || other
                                .inject
                                .as_ref()
                                .and_then(|o| o.placeholder_env.as_ref())
                                == Some(name))
                });
            if taken {
                flag(
                    rule::SECRET_DELIVERED_ONCE,
                    format!("spec.secrets[{i}].inject.placeholderEnv"),
                    format!(
                        "`{name}` is already set for the tool (runtime.env, another secret or the proxy's variables)"
                    ),
                );
            }
        }
    }
}

fn check_literals(spec: &AgentToolSpec, flag: &mut impl FnMut(Rule, String, String)) {
    let runtime = &spec.runtime;
    let env = runtime
        .env
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("spec.runtime.env[{i}].value"), e.value.as_str()));
    let command = runtime
        .command
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("spec.runtime.command[{i}]"), c.as_str()));
    let args = runtime
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("spec.runtime.args[{i}]"), a.as_str()));
    for (path, value) in env.chain(command).chain(args) {
        match looks_like_secret(value) {
            Some(SecretLook::KnownFormat(kind)) => flag(
                rule::NO_LITERAL_SECRET,
                path,
                format!("looks like a literal {kind}; reference a Secret in spec.secrets instead"),
            ),
            Some(SecretLook::HighEntropy) => flag(
                rule::NO_HIGH_ENTROPY_LITERAL,
                path,
                "high-entropy literal that looks like a key; reference a Secret in spec.secrets instead".into(),
            ),
            None => {}
        }
    }
    for (i, var) in runtime.env.iter().enumerate() {
        if is_secret_name(&var.name) && !var.value.is_empty() {
            flag(
                rule::SECRET_NAMED_ENV_LITERAL,
                format!("spec.runtime.env[{i}]"),
                format!(
                    "`{}` names a credential but has a literal value; deliver it with spec.secrets[].env",
                    var.name
                ),
            );
        }
    }
}
