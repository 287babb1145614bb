//! Generates the CustomResourceDefinitions from the Rust types; `crds/` is
//! this output and a test fails when they drift.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{AgentTool, ToolApproval, ToolPolicy};

/// Every CRD toolwarden serves, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![AgentTool::crd(), ToolPolicy::crd(), ToolApproval::crd()]
}

/// Each CRD as `(file name, YAML)`, the layout of the `crds/` folder.
pub fn crd_files() -> Vec<(String, String)> {
    all_crds()
        .iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().expect("generated CRDs are named");
            let yaml = serde_yaml::to_string(crd).expect("a CRD always serializes to YAML");
            (format!("{name}.yaml"), yaml)
        })
        .collect()
}

/// All CRDs as one multi-document YAML stream, as `toolwarden crd` prints it.
pub fn crds_yaml() -> String {
    crd_files()
        .into_iter()
        .map(|(_, yaml)| yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}
