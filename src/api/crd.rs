//! Generates the CustomResourceDefinitions from the Rust types; `crds/` is
//! this output and a test fails when they drift.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{AgentTool, ToolApproval, ToolPolicy};

/// Every CRD toolwarden serves, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![AgentTool::crd(), ToolPolicy::crd(), ToolApproval::crd()]
}

/// All CRDs as one multi-document YAML stream, as `toolwarden crd` prints it.
pub fn crds_yaml() -> String {
    all_crds()
        .iter()
        .map(|crd| serde_yaml::to_string(crd).expect("a CRD always serializes to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}
