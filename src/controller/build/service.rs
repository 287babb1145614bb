//! The Service agents call: REST (`/v1/tools/NAME/invoke`) and MCP (`/mcp`) share the
//! runner's one HTTP port.

use k8s_openapi::api::core::v1::Service;
use serde_json::json;

use super::deployment::RUNNER_PORT;
use super::{BuildError, ChildNames, child_meta, from_json};
use crate::api::AgentTool;
use crate::controller::labels::child_labels;

pub fn build(tool: &AgentTool, names: &ChildNames) -> Result<Service, BuildError> {
    let spec = from_json(
        "Service",
        json!({
            "selector": child_labels(tool),
            "ports": [{"name": "http", "port": RUNNER_PORT, "targetPort": "http", "protocol": "TCP"}],
        }),
    )?;
    Ok(Service {
        metadata: child_meta(tool, &names.runner)?,
        spec: Some(spec),
        status: None,
    })
}

/// The URLs agents use, as reported in the tool's status.
pub fn endpoints(tool_name: &str, namespace: &str) -> [(String, String); 2] {
    let base = format!("http://{tool_name}.{namespace}.svc:{RUNNER_PORT}");
    [
        ("rest".into(), format!("{base}/v1/tools/{tool_name}/invoke")),
        ("mcp".into(), format!("{base}/mcp")),
    ]
}
