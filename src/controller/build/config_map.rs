//! The ConfigMap the runner serves from: the tool exactly as the controller admitted it
//! (validated spec, the namespace's real verdict beside it), never re-read from the API.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use sha2::{Digest, Sha256};

use super::{BuildError, ChildNames, child_meta};
use crate::api::AgentTool;
use crate::controller::validate::Admitted;

/// Key of the verdict: not `*.yaml`, so the runner does not read it as a manifest.
pub const VERDICT_KEY: &str = crate::runner::registry::ADMITTED_VERDICT_FILE;

pub fn build(admitted: &Admitted, names: &ChildNames) -> Result<ConfigMap, BuildError> {
    let tool = &admitted.tool;
    // Only what identifies the tool: no uid, managedFields or status in what the runner reads.
    let served = AgentTool {
        metadata: ObjectMeta {
            name: tool.metadata.name.clone(),
            namespace: tool.metadata.namespace.clone(),
            labels: tool.metadata.labels.clone(),
            generation: tool.metadata.generation,
            ..ObjectMeta::default()
        },
        spec: tool.spec.clone(),
        status: None,
    };
    // What `toolwarden runner` serves by (`runner::registry::AdmittedVerdict`): it names
    // the tool and generation, so a verdict never applies to another spec.
    let verdict = serde_json::to_string_pretty(&serde_json::json!({
        "tool": tool.name_any(),
        "generation": tool.metadata.generation,
        "denied": admitted.verdict.denied,
        "violations": admitted.verdict.violations,
        "allowedEgressCidrs": admitted.allowed_egress_cidrs,
    }))
    .map_err(|source| BuildError::Encode {
        kind: "ConfigMap",
        source,
    })?;
    Ok(ConfigMap {
        metadata: child_meta(tool, &names.runner)?,
        data: Some(BTreeMap::from([
            (
                format!("{}.yaml", tool.name_any()),
                serde_yaml::to_string(&served)?,
            ),
            (VERDICT_KEY.to_string(), verdict + "\n"),
        ])),
        ..ConfigMap::default()
    })
}

/// SHA-256 of the ConfigMap's data, for the pod template annotation that rolls the pods.
pub fn content_hash(config_map: &ConfigMap) -> String {
    let mut hash = Sha256::new();
    for (key, value) in config_map.data.iter().flatten() {
        // Length-prefixed, so moving bytes between key and value changes the hash.
        for part in [key, value] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
    }
    hex::encode(hash.finalize())
}
