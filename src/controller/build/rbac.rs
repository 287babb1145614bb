//! The tool's own identity, only when it declares `permissions.kubernetes`: a
//! ServiceAccount bound to exactly the declared rules, never mounted into any pod. The
//! runner may only mint short-lived tokens for it (TokenRequest on that one
//! ServiceAccount), which it hands to a sandbox per call; its own identity never leaves it.

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::{BuildError, ChildNames, ToolIdentity, child_meta, service_account};
use crate::api::AgentTool;

pub fn build(tool: &AgentTool, names: &ChildNames) -> Result<ToolIdentity, BuildError> {
    let namespace = child_meta(tool, &names.tool)?.namespace;
    let rules = tool
        .spec
        .permissions
        .kubernetes
        .iter()
        .map(|rule| PolicyRule {
            api_groups: Some(rule.api_groups.clone()),
            resources: Some(rule.resources.clone()),
            verbs: rule.verbs.clone(),
            resource_names: (!rule.resource_names.is_empty()).then(|| rule.resource_names.clone()),
            non_resource_urls: None,
        })
        .collect();
    let mint_tokens = PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["serviceaccounts/token".into()]),
        resource_names: Some(vec![names.tool.clone()]),
        verbs: vec!["create".into()],
        non_resource_urls: None,
    };
    let binding = |name: &str, role: &str, account: &str| -> Result<RoleBinding, BuildError> {
        Ok(RoleBinding {
            metadata: child_meta(tool, name)?,
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: role.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: account.into(),
                namespace: namespace.clone(),
                api_group: None,
            }]),
        })
    };
    Ok(ToolIdentity {
        service_account: service_account::build(tool, &names.tool)?,
        role: Role {
            metadata: child_meta(tool, &names.tool)?,
            rules: Some(rules),
        },
        role_binding: binding(&names.tool, &names.tool, &names.tool)?,
        token_role: Role {
            metadata: child_meta(tool, &names.token)?,
            rules: Some(vec![mint_tokens]),
        },
        token_role_binding: binding(&names.token, &names.token, &names.runner)?,
    })
}
