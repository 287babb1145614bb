//! Generates the CustomResourceDefinitions from the Rust types; `crds/` is
//! this output and a test fails when they drift.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Value, json};

use super::{AgentTool, ToolApproval, ToolPolicy};

/// Every CRD toolwarden serves, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![AgentTool::crd(), ToolPolicy::crd(), ToolApproval::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                let mut value = serde_json::to_value(&*schema).expect("a schema is JSON");
                kubernetes_integer_formats(&mut value);
                *schema = serde_json::from_value(value).expect("only formats and bounds changed");
            }
        }
    }
    crds
}

/// Kubernetes knows the integer formats `int32` and `int64` only; schemars writes Rust's
/// unsigned widths (`uint16`, `uint32`, ...), and the API server warns about them on every
/// `kubectl apply`. Each becomes the narrowest Kubernetes format that holds it, with the
/// bounds the unsigned width implied made explicit where the type did not state them.
fn kubernetes_integer_formats(node: &mut Value) {
    match node {
        Value::Object(map) => {
            let unsigned = match map.get("format").and_then(Value::as_str) {
                Some("uint8") => Some(("int32", Some(u64::from(u8::MAX)))),
                Some("uint16") => Some(("int32", Some(u64::from(u16::MAX)))),
                Some("uint32") => Some(("int64", Some(u64::from(u32::MAX)))),
                Some("uint64" | "uint") => Some(("int64", None)),
                _ => None,
            };
            if let Some((format, max)) = unsigned {
                map.insert("format".into(), format.into());
                map.entry("minimum").or_insert(json!(0.0));
                if let Some(max) = max {
                    map.entry("maximum").or_insert(json!(max as f64));
                }
            }
            map.values_mut().for_each(kubernetes_integer_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(kubernetes_integer_formats),
        _ => {}
    }
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
