//! The dereference phase: the only reads of a reconcile. The namespace's labels and the
//! ToolPolicies come from reflector stores (nothing listed per reconcile); the Secrets,
//! ConfigMaps and PVCs the tool references are checked to exist (metadata only).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Secret};
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::api::{AgentTool, ToolPolicy};

/// What validation needs from the cluster.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// The real labels of the tool's namespace.
    pub namespace_labels: BTreeMap<String, String>,
    /// Every ToolPolicy; the engine picks those that select the tool.
    pub policies: Vec<ToolPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum DereferenceError {
    #[error("namespace {0} is not (yet) known to the controller")]
    NamespaceNotFound(String),
    #[error("{kind} {name} referenced by the tool does not exist in namespace {namespace}")]
    MissingReference {
        kind: &'static str,
        name: String,
        namespace: String,
    },
    #[error("reading {kind} {name}: {source}")]
    Api {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl DereferenceError {
    /// Stable CamelCase reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DereferenceError::NamespaceNotFound(_) => "NamespaceNotFound",
            DereferenceError::MissingReference { .. } => "MissingReference",
            DereferenceError::Api { .. } => "ApiUnavailable",
        }
    }
}

/// The reflector stores the dereference phase reads.
#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub policies: Store<ToolPolicy>,
}

pub async fn dereference(
    tool: &AgentTool,
    client: &Client,
    stores: &Stores,
) -> Result<Inputs, DereferenceError> {
    let namespace = tool.namespace().unwrap_or_default();
    let ns = stores
        .namespaces
        .get(&ObjectRef::new(&namespace))
        .ok_or_else(|| DereferenceError::NamespaceNotFound(namespace.clone()))?;
    let references = references(tool);
    for name in &references.secrets {
        exists::<Secret>(client, &namespace, name).await?;
    }
    for name in &references.config_maps {
        exists::<ConfigMap>(client, &namespace, name).await?;
    }
    for name in &references.claims {
        exists::<PersistentVolumeClaim>(client, &namespace, name).await?;
    }
    Ok(Inputs {
        namespace_labels: ns.labels().clone(),
        policies: stores
            .policies
            .state()
            .iter()
            .map(|p| (**p).clone())
            .collect(),
    })
}

/// The objects in the tool's namespace its pods would mount.
#[derive(Default)]
struct References<'a> {
    secrets: BTreeSet<&'a str>,
    config_maps: BTreeSet<&'a str>,
    claims: BTreeSet<&'a str>,
}

fn references(tool: &AgentTool) -> References<'_> {
    let mut refs = References::default();
    refs.secrets
        .extend(tool.spec.secrets.iter().map(|s| s.secret_name.as_str()));
    for mount in &tool.spec.permissions.filesystem {
        refs.config_maps.extend(mount.config_map.as_deref());
        refs.claims.extend(mount.persistent_volume_claim.as_deref());
    }
    refs.claims
        .extend(tool.spec.audit.persistent_volume_claim.as_deref());
    refs
}

async fn exists<K>(client: &Client, namespace: &str, name: &str) -> Result<(), DereferenceError>
where
    K: k8s_openapi::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let kind = <K as k8s_openapi::Resource>::KIND;
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.get_metadata_opt(name).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(DereferenceError::MissingReference {
            kind,
            name: name.to_string(),
            namespace: namespace.to_string(),
        }),
        Err(source) => Err(DereferenceError::Api {
            kind,
            name: name.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_claim_must_exist_like_every_mounted_claim() {
        let mut tool: AgentTool = serde_yaml::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/execute-code.yaml"
            ))
            .unwrap(),
        )
        .unwrap();
        tool.spec.audit.persistent_volume_claim = Some("audit-trail".into());
        assert!(references(&tool).claims.contains("audit-trail"));
    }
}
