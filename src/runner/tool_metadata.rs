//! What a tool says about itself to agents (MCP `tools/list`, `GET /v1/tools`,
//! `/openapi.json`), derived from what its AgentTool declares and never typed
//! by hand: a hint cannot claim less than the permissions grant.

use serde::Serialize;
use serde_json::Value;

use super::tool::PreparedTool;
use crate::api::{AgentToolSpec, HttpMethod};

/// A tool as MCP `tools/list` shows it.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ToolDescription {
    pub name: String,
    pub title: String,
    pub description: String,
    pub input_schema: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    pub annotations: ToolAnnotations,
}

/// MCP tool annotations; each is derived in [`annotations`].
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ToolAnnotations {
    pub title: String,
    pub read_only_hint: bool,
    pub destructive_hint: bool,
    /// Only when the tool declares `spec.idempotent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotent_hint: Option<bool>,
    pub open_world_hint: bool,
}

/// Kubernetes verbs that change nothing.
const READ_VERBS: [&str; 3] = ["get", "list", "watch"];
/// Kubernetes verbs that change or remove what exists (`create` only adds).
const DESTRUCTIVE_VERBS: [&str; 4] = ["update", "patch", "delete", "deletecollection"];
/// HTTP methods that change or remove what exists on the far side.
const DESTRUCTIVE_METHODS: [HttpMethod; 3] =
    [HttpMethod::Put, HttpMethod::Patch, HttpMethod::Delete];
/// HTTP methods that change nothing (RFC 9110 safe methods).
const SAFE_METHODS: [HttpMethod; 3] = [HttpMethod::Get, HttpMethod::Head, HttpMethod::Options];

/// A tool as `tools/list` shows it. Pure.
pub fn describe(tool: &PreparedTool) -> ToolDescription {
    let title = title(&tool.name);
    ToolDescription {
        name: tool.name.clone(),
        title: title.clone(),
        description: tool.spec.description.clone(),
        input_schema: tool.spec.input_schema.clone(),
        output_schema: tool.spec.output_schema.clone(),
        annotations: annotations(&tool.spec, title),
    }
}

/// The name made readable: `file-operation` becomes `File operation`. Pure.
pub fn title(name: &str) -> String {
    let spaced = name.replace(['-', '.'], " ");
    let mut chars = spaced.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The hints, from the permissions alone (risk is a judgement, not a grant):
/// - `readOnlyHint`: no writable mount, no Kubernetes verb but get/list/watch,
///   and no egress that admits a method other than GET/HEAD/OPTIONS (an
///   egress rule without `methods`, or one that allows tunnels, can send anything).
/// - `destructiveHint`: a writable persistentVolumeClaim or hostPath mount, a
///   Kubernetes update/patch/delete/deletecollection verb, or egress that
///   admits PUT/PATCH/DELETE (any method when `methods` is empty).
/// - `idempotentHint`: `spec.idempotent`, when declared.
/// - `openWorldHint`: any egress. Pure.
pub fn annotations(spec: &AgentToolSpec, title: String) -> ToolAnnotations {
    let permissions = &spec.permissions;
    let verbs = || permissions.kubernetes.iter().flat_map(|r| &r.verbs);
    let egress = &permissions.network.egress;
    let writes_files = permissions.filesystem.iter().any(|m| !m.read_only);
    let overwrites_files = permissions
        .filesystem
        .iter()
        .any(|m| !m.read_only && (m.persistent_volume_claim.is_some() || m.host_path.is_some()));
    let writes_cluster = verbs().any(|v| !READ_VERBS.contains(&v.as_str()));
    let deletes_in_cluster = verbs().any(|v| DESTRUCTIVE_VERBS.contains(&v.as_str()));
    let sends = egress
        .iter()
        .any(|r| r.methods.is_empty() || r.methods.iter().any(|m| !SAFE_METHODS.contains(m)));
    let overwrites_remote = egress
        .iter()
        .any(|r| r.methods.is_empty() || r.methods.iter().any(|m| DESTRUCTIVE_METHODS.contains(m)));
    ToolAnnotations {
        title,
        read_only_hint: !writes_files && !writes_cluster && !sends,
        destructive_hint: overwrites_files || deletes_in_cluster || overwrites_remote,
        idempotent_hint: spec.idempotent,
        open_world_hint: !egress.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentTool;

    fn spec(permissions: &str) -> AgentToolSpec {
        let manifest = format!(
            "apiVersion: toolwarden.dev/v1alpha1\nkind: AgentTool\nmetadata: {{name: t}}\n\
             spec:\n  description: d\n  risk: high\n  inputSchema: {{type: object}}\n  \
             runtime: {{image: busybox}}\n  permissions: {permissions}\n"
        );
        serde_yaml::from_str::<AgentTool>(&manifest).unwrap().spec
    }

    fn hints(permissions: &str) -> (bool, bool, bool) {
        let a = annotations(&spec(permissions), String::new());
        (a.read_only_hint, a.destructive_hint, a.open_world_hint)
    }

    #[test]
    fn each_hint_follows_the_grant_that_implies_it() {
        // (readOnly, destructive, openWorld)
        let cases = [
            ("{}", (true, false, false)),
            (
                "{filesystem: [{mountPath: /d, configMap: c}]}",
                (true, false, false),
            ),
            (
                "{filesystem: [{mountPath: /s, readOnly: false, emptyDir: {}}]}",
                (false, false, false),
            ),
            (
                "{filesystem: [{mountPath: /p, readOnly: false, persistentVolumeClaim: p}]}",
                (false, true, false),
            ),
            (
                "{kubernetes: [{apiGroups: [''], resources: [pods], verbs: [get, list]}]}",
                (true, false, false),
            ),
            (
                "{kubernetes: [{apiGroups: [''], resources: [pods], verbs: [create]}]}",
                (false, false, false),
            ),
            (
                "{kubernetes: [{apiGroups: [''], resources: [pods], verbs: [delete]}]}",
                (false, true, false),
            ),
            (
                "{network: {egress: [{host: api.example.com, methods: [GET]}]}}",
                (true, false, true),
            ),
            (
                "{network: {egress: [{host: api.example.com, methods: [GET, POST]}]}}",
                (false, false, true),
            ),
            (
                "{network: {egress: [{host: api.example.com, methods: [DELETE]}]}}",
                (false, true, true),
            ),
            // No methods: anything may be sent, tunnels included.
            (
                "{network: {egress: [{host: api.example.com}]}}",
                (false, true, true),
            ),
        ];
        for (permissions, expected) in cases {
            assert_eq!(hints(permissions), expected, "{permissions}");
        }
    }

    #[test]
    fn idempotent_only_when_declared_and_titles_read_like_words() {
        let mut s = spec("{}");
        assert_eq!(annotations(&s, String::new()).idempotent_hint, None);
        s.idempotent = Some(true);
        assert_eq!(annotations(&s, String::new()).idempotent_hint, Some(true));
        assert_eq!(title("file-operation"), "File operation");
        assert_eq!(title("x"), "X");
        let json = serde_json::to_value(annotations(&spec("{}"), "T".into())).unwrap();
        assert!(json.get("idempotentHint").is_none(), "{json}");
    }
}
