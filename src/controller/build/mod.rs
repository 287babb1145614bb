//! The build phase: every child object of one admitted tool, as pure functions of
//! [`Admitted`] and [`Settings`]. Nothing here reads the cluster; the golden and
//! invariant tests pin what each builder produces.

mod config_map;
mod deployment;
mod network_policy;
mod pdb;
mod rbac;
pub mod service;
mod service_account;
#[cfg(test)]
mod tests;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::labels::child_labels;
use super::validate::Admitted;
use crate::api::AgentTool;

pub use deployment::{RUNNER_MEMORY_LIMIT, RUNNER_PORT};

/// Operator-wide settings the children depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The toolwarden image the runner pods run (`--runner-image`).
    pub runner_image: String,
    /// Where the API server listens (the `kubernetes` Service's endpoints): the runner's
    /// TokenReviews go there, so its NetworkPolicy lets exactly these through.
    pub api_server: Vec<ApiServerEndpoint>,
    /// How the tool's image becomes the sandbox root file system in the runner pod.
    pub tool_rootfs: ToolRootfs,
}

/// How the tool's image reaches the runner pod (`--tool-rootfs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolRootfs {
    /// An image volume (`volumes[].image`, Kubernetes 1.33+ with the ImageVolume feature):
    /// the image itself, read-only, nothing copied.
    #[default]
    ImageVolume,
    /// For clusters without image volumes: an init container running the tool's image
    /// copies its file system into an `emptyDir` (the image needs `/bin/sh` and `cp`).
    Copy,
}

impl ToolRootfs {
    /// The name the tool's status reports (`isolation.rootfs`).
    pub fn as_str(self) -> &'static str {
        match self {
            ToolRootfs::ImageVolume => "imageVolume",
            ToolRootfs::Copy => "initContainerCopy",
        }
    }
}

/// One address and port of the API server.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiServerEndpoint {
    pub ip: std::net::IpAddr,
    pub port: u16,
}

/// Everything one tool needs in its namespace. Optional children are `None` when the
/// tool does not need them; the apply phase deletes them then.
#[derive(Clone, Debug)]
pub struct Children {
    /// The runner pods' identity (no token mounted by default).
    pub runner_service_account: ServiceAccount,
    /// Only with `permissions.kubernetes`: the tool's own identity and its rules.
    pub tool_identity: Option<ToolIdentity>,
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub network_policy: NetworkPolicy,
    /// Only with `serving.replicas > 1`.
    pub pdb: Option<PodDisruptionBudget>,
}

/// The tool's dedicated identity: a ServiceAccount bound to exactly the declared rules,
/// and the one permission the runner holds over it (minting its short-lived tokens).
#[derive(Clone, Debug)]
pub struct ToolIdentity {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub token_role: Role,
    pub token_role_binding: RoleBinding,
}

/// A desired child could not be expressed as a Kubernetes object.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the AgentTool has no {0} (it was not read from the API server)")]
    MissingMetadata(&'static str),
    #[error("building the {kind}: {source}")]
    Encode {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("serializing the admitted tool for its ConfigMap: {0}")]
    AdmittedTool(#[from] serde_yaml::Error),
}

impl BuildError {
    /// Stable CamelCase reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            BuildError::MissingMetadata(_) => "MissingMetadata",
            BuildError::Encode { .. } | BuildError::AdmittedTool(_) => "BuildFailed",
        }
    }
}

/// Names of the children, derived from the tool's name (a DNS-1035 label, checked by
/// the validate phase, so every derived name is valid too).
pub struct ChildNames {
    /// ServiceAccount, ConfigMap, Deployment, Service, NetworkPolicy and PDB.
    pub runner: String,
    /// The tool's own ServiceAccount, Role and RoleBinding.
    pub tool: String,
    /// The Role and RoleBinding that let the runner mint the tool's tokens.
    pub token: String,
}

impl ChildNames {
    pub fn of(tool_name: &str) -> ChildNames {
        ChildNames {
            runner: tool_name.to_string(),
            tool: format!("{tool_name}-tool"),
            token: format!("{tool_name}-token"),
        }
    }
}

/// Builds every child of the admitted tool.
pub fn children(admitted: &Admitted, settings: &Settings) -> Result<Children, BuildError> {
    let tool = &admitted.tool;
    let names = ChildNames::of(&tool.name_any());
    let config_map = config_map::build(admitted, &names)?;
    let config_hash = config_map::content_hash(&config_map);
    let tool_identity = if tool.spec.permissions.kubernetes.is_empty() {
        None
    } else {
        Some(rbac::build(tool, &names)?)
    };
    Ok(Children {
        runner_service_account: service_account::build(tool, &names.runner)?,
        tool_identity,
        config_map,
        deployment: deployment::build(admitted, &names, settings, &config_hash)?,
        service: service::build(tool, &names)?,
        network_policy: network_policy::build(tool, &names, &settings.api_server)?,
        pdb: pdb::build(admitted, &names)?,
    })
}

/// Metadata of a child: its name, the tool's namespace, the child labels and the tool
/// as controlling owner (so deleting the tool collects the child).
fn child_meta(tool: &AgentTool, name: &str) -> Result<ObjectMeta, BuildError> {
    let owner = owner_reference(tool)?;
    Ok(ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(
            tool.namespace()
                .ok_or(BuildError::MissingMetadata("namespace"))?,
        ),
        labels: Some(child_labels(tool)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

fn owner_reference(tool: &AgentTool) -> Result<OwnerReference, BuildError> {
    let uid = tool.uid().ok_or(BuildError::MissingMetadata("uid"))?;
    Ok(OwnerReference {
        api_version: AgentTool::api_version(&()).into_owned(),
        kind: AgentTool::kind(&()).into_owned(),
        name: tool.name_any(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Typed object from a JSON shape: the builders write nested specs as JSON, which reads
/// like the manifests they produce.
fn from_json<T: DeserializeOwned>(
    kind: &'static str,
    value: serde_json::Value,
) -> Result<T, BuildError> {
    serde_json::from_value(value).map_err(|source| BuildError::Encode { kind, source })
}
