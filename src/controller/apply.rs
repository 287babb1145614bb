//! The apply phase: every desired child by server-side apply under one field manager
//! (forced: a hand edit of a field the controller owns is put back), then the optional
//! children the tool no longer needs are deleted.
//!
//! A child is only ever written when it does not exist or the tool controls it: an object
//! someone else created under the same name (a tool named `default` and the namespace's
//! default ServiceAccount) is never taken over. Which children exist and who owns them is
//! read from metadata caches of the controller's own children (the same watches that
//! trigger reconciles); only a name the caches do not know costs one metadata read.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{ChildNames, Children};

/// The one field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "toolwarden-controller";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "{kind} {name} exists and does not belong to this AgentTool: rename the tool or \
         remove the {kind}"
    )]
    NameTaken { kind: &'static str, name: String },
    #[error("reading {kind} {name}: {source}")]
    Read {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}, no longer needed: {source}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ApplyError {
    /// Stable CamelCase reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ApplyError::NameTaken { .. } => "NameConflict",
            ApplyError::Read { .. } => "ReadFailed",
            ApplyError::Apply { .. } => "ApplyFailed",
            ApplyError::Delete { .. } => "DeleteFailed",
        }
    }
}

/// Metadata caches of the children that exist (label-selected: only the controller's).
#[derive(Clone)]
pub struct OwnedStores {
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub roles: Store<PartialObjectMeta<Role>>,
    pub role_bindings: Store<PartialObjectMeta<RoleBinding>>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub deployments: Store<PartialObjectMeta<Deployment>>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub network_policies: Store<PartialObjectMeta<NetworkPolicy>>,
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
}

/// What the API server answered for the children whose state the status reports.
pub struct Applied {
    pub deployment: Deployment,
}

/// The tool being applied: where its children live and who they must belong to.
struct Target<'a> {
    client: &'a Client,
    namespace: &'a str,
    tool_uid: &'a str,
}

pub async fn apply(
    client: &Client,
    namespace: &str,
    tool_name: &str,
    tool_uid: &str,
    children: &Children,
    owned: &OwnedStores,
) -> Result<Applied, ApplyError> {
    let names = ChildNames::of(tool_name);
    let t = Target {
        client,
        namespace,
        tool_uid,
    };
    t.apply(&children.runner_service_account, &owned.service_accounts)
        .await?;
    t.apply(&children.config_map, &owned.config_maps).await?;
    match &children.tool_identity {
        Some(identity) => {
            t.apply(&identity.service_account, &owned.service_accounts)
                .await?;
            t.apply(&identity.role, &owned.roles).await?;
            t.apply(&identity.role_binding, &owned.role_bindings)
                .await?;
            t.apply(&identity.token_role, &owned.roles).await?;
            t.apply(&identity.token_role_binding, &owned.role_bindings)
                .await?;
        }
        None => {
            t.delete_stale(&names.tool, &owned.service_accounts).await?;
            for name in [&names.tool, &names.token] {
                t.delete_stale(name, &owned.role_bindings).await?;
                t.delete_stale(name, &owned.roles).await?;
            }
        }
    }
    let deployment = t.apply(&children.deployment, &owned.deployments).await?;
    t.apply(&children.service, &owned.services).await?;
    t.apply(&children.network_policy, &owned.network_policies)
        .await?;
    match &children.pdb {
        Some(pdb) => {
            t.apply(pdb, &owned.pdbs).await?;
        }
        None => t.delete_stale(&names.runner, &owned.pdbs).await?,
    }
    Ok(Applied { deployment })
}

/// True when `meta` names the tool with `uid` as its controlling owner.
fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

impl Target<'_> {
    async fn apply<K>(
        &self,
        object: &K,
        store: &Store<PartialObjectMeta<K>>,
    ) -> Result<K, ApplyError>
    where
        K: k8s_openapi::Resource
            + Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
    {
        let kind = <K as k8s_openapi::Resource>::KIND;
        let name = object.name_any();
        let api: Api<K> = Api::namespaced(self.client.clone(), self.namespace);
        let cached = store.get(&ObjectRef::new(&name).within(self.namespace));
        let ours = match cached {
            Some(meta) => controlled_by(&meta.metadata, self.tool_uid),
            // Not among the controller's children: new, or someone else's.
            None => match api.get_metadata_opt(&name).await {
                Ok(None) => true,
                Ok(Some(meta)) => controlled_by(&meta.metadata, self.tool_uid),
                Err(source) => return Err(ApplyError::Read { kind, name, source }),
            },
        };
        if !ours {
            return Err(ApplyError::NameTaken { kind, name });
        }
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|source| ApplyError::Apply { kind, name, source })
    }

    /// Deletes `name` when the cache has it and this tool controls it.
    async fn delete_stale<K>(
        &self,
        name: &str,
        store: &Store<PartialObjectMeta<K>>,
    ) -> Result<(), ApplyError>
    where
        K: k8s_openapi::Resource
            + Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let Some(existing) = store.get(&ObjectRef::new(name).within(self.namespace)) else {
            return Ok(());
        };
        if !controlled_by(&existing.metadata, self.tool_uid) {
            return Ok(());
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), self.namespace);
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(source) => Err(ApplyError::Delete {
                kind: <K as k8s_openapi::Resource>::KIND,
                name: name.to_string(),
                source,
            }),
        }
    }
}
