//! The apply phase: every desired child by server-side apply under one field manager
//! (forced: a hand edit of a field the controller owns is put back), then the optional
//! children the tool no longer needs are deleted. Which of those exist is read from the
//! reflector stores that also trigger reconciles, so a steady state costs no deletes.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{ChildNames, Children};
use super::labels::{MANAGED_BY, MANAGED_BY_VALUE};

/// The one field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "toolwarden-controller";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
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
            ApplyError::Apply { .. } => "ApplyFailed",
            ApplyError::Delete { .. } => "DeleteFailed",
        }
    }
}

/// The optional children that exist, as the controller's watches see them.
#[derive(Clone)]
pub struct OwnedStores {
    pub service_accounts: Store<ServiceAccount>,
    pub roles: Store<Role>,
    pub role_bindings: Store<RoleBinding>,
    pub pdbs: Store<PodDisruptionBudget>,
}

/// What the API server answered for the children whose state the status reports.
pub struct Applied {
    pub deployment: Deployment,
}

pub async fn apply(
    client: &Client,
    namespace: &str,
    tool_name: &str,
    children: &Children,
    owned: &OwnedStores,
) -> Result<Applied, ApplyError> {
    let names = ChildNames::of(tool_name);
    let c = Client::clone(client);
    apply_one(&c, namespace, &children.runner_service_account).await?;
    apply_one(&c, namespace, &children.config_map).await?;
    match &children.tool_identity {
        Some(identity) => {
            apply_one(&c, namespace, &identity.service_account).await?;
            apply_one(&c, namespace, &identity.role).await?;
            apply_one(&c, namespace, &identity.role_binding).await?;
            apply_one(&c, namespace, &identity.token_role).await?;
            apply_one(&c, namespace, &identity.token_role_binding).await?;
        }
        None => {
            delete_stale(&c, namespace, &names.tool, &owned.service_accounts).await?;
            for name in [&names.tool, &names.token] {
                delete_stale(&c, namespace, name, &owned.role_bindings).await?;
                delete_stale(&c, namespace, name, &owned.roles).await?;
            }
        }
    }
    let deployment = apply_one(&c, namespace, &children.deployment).await?;
    apply_one(&c, namespace, &children.service).await?;
    apply_one(&c, namespace, &children.network_policy).await?;
    match &children.pdb {
        Some(pdb) => {
            apply_one(&c, namespace, pdb).await?;
        }
        None => delete_stale(&c, namespace, &names.runner, &owned.pdbs).await?,
    }
    Ok(Applied { deployment })
}

async fn apply_one<K>(client: &Client, namespace: &str, object: &K) -> Result<K, ApplyError>
where
    K: k8s_openapi::Resource
        + Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| ApplyError::Apply {
        kind: <K as k8s_openapi::Resource>::KIND,
        name,
        source,
    })
}

/// Deletes `name` when the store has it and it is one of ours (never a look-alike
/// someone else created under that name).
async fn delete_stale<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    store: &Store<K>,
) -> Result<(), ApplyError>
where
    K: k8s_openapi::Resource
        + Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let Some(existing) = store.get(&ObjectRef::new(name).within(namespace)) else {
        return Ok(());
    };
    if existing.labels().get(MANAGED_BY).map(String::as_str) != Some(MANAGED_BY_VALUE) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
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
