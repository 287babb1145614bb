//! The labels on every child the controller creates. The admission webhook recognises
//! runner workloads by exactly these, so they are the one definition both use.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::api::AgentTool;

/// `app.kubernetes.io/managed-by: toolwarden` on every child.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "toolwarden";
/// `app.kubernetes.io/name: toolwarden-runner` on every child.
pub const NAME: &str = "app.kubernetes.io/name";
pub const NAME_VALUE: &str = "toolwarden-runner";
/// `toolwarden.dev/tool: <AgentTool name>` on every child.
pub const TOOL: &str = "toolwarden.dev/tool";

/// Pod-template annotation holding the hash of the admitted tool: a change rolls the pods.
pub const CONFIG_HASH: &str = "toolwarden.dev/config-hash";

/// The labels of every child of `tool`; also the runner pods' selector.
pub fn child_labels(tool: &AgentTool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string()),
        (NAME.to_string(), NAME_VALUE.to_string()),
        (TOOL.to_string(), tool.name_any()),
    ])
}

/// Label selector (`key=value,...`) for listing the children of the tool named `tool`.
pub fn children_selector(tool: &str) -> String {
    format!("{MANAGED_BY}={MANAGED_BY_VALUE},{NAME}={NAME_VALUE},{TOOL}={tool}")
}
