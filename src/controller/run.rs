//! Operations: the kube-runtime `Controller` per watched scope (cluster-wide or one per
//! `--namespaces` entry), shared reflector stores for ToolPolicies and namespaces (a
//! policy change re-evaluates every tool, a namespace relabel the tools in it), leader
//! election on a coordination Lease, `/metrics` `/healthz` `/readyz`, graceful shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{broadcast, watch};

use super::apply::{FIELD_MANAGER, OwnedStores};
use super::build::Settings;
use super::dereference::Stores;
use super::labels::{MANAGED_BY, MANAGED_BY_VALUE};
use super::metrics::Metrics;
use super::reconcile::{Context, error_policy, reconcile};
use crate::api::{AgentTool, ToolPolicy};

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub settings: Settings,
    /// Watch only these namespaces; empty: the whole cluster.
    pub namespaces: Vec<String>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// `None`: no leader election (one replica only).
    pub lease: Option<LeaseOptions>,
}

#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub namespace: String,
    pub name: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
}

/// Lease validity after the last renewal; a new leader takes over at most this late.
const LEASE_SECONDS: u64 = 15;
/// The holder renews this long before expiry; also the clock skew tolerated between nodes.
const LEASE_GRACE_SECONDS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving metrics and health on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("leader election on Lease {name}: {source}")]
    Lease {
        name: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("lost the leader Lease: stopping so that two replicas never both write")]
    LeadershipLost,
}

impl RunError {
    pub fn reason(&self) -> &'static str {
        match self {
            RunError::Listen { .. } => "ListenFailed",
            RunError::Lease { .. } => "LeaseFailed",
            RunError::LeadershipLost => "LeadershipLost",
        }
    }
}

/// Runs until `shutdown` resolves (then finishes reconciles in flight) or leadership is lost.
pub async fn run(
    client: Client,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: options.listen,
            source,
        })?;
    tokio::spawn(serve_health(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&ready),
        stopped(stop_rx.clone()),
    ));

    let mut leadership = None;
    if let Some(lease) = &options.lease {
        let lease_error = |source| RunError::Lease {
            name: lease.name.clone(),
            source,
        };
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &lease.name)
            .with_namespace(&lease.namespace)
            .with_identity(&lease.identity)
            .with_duration(LEASE_SECONDS)
            .with_grace(LEASE_GRACE_SECONDS)
            .with_field_manager(FIELD_MANAGER)
            .build()
            .await
            .map_err(lease_error)?;
        let (mut is_leader, task) = manager.watch().await;
        // A standby replica is healthy and ready: it serves health and waits.
        ready.store(true, Ordering::Release);
        tracing::info!(lease = %lease.name, identity = %lease.identity, "waiting for the leader Lease");
        let mut stop = stop_rx.clone();
        tokio::select! {
            acquired = is_leader.wait_for(|leader| *leader) => {
                if acquired.is_err() {
                    return Err(RunError::LeadershipLost);
                }
            }
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        }
        tracing::info!(lease = %lease.name, "leading");
        metrics.leader.set(1);
        leadership = Some((is_leader, task));
    }

    let controllers = run_controllers(
        client,
        &options,
        Arc::clone(&metrics),
        Arc::clone(&ready),
        stop_rx.clone(),
    );
    let result = match &mut leadership {
        Some((is_leader, _)) => {
            tokio::select! {
                () = controllers => Ok(()),
                _ = is_leader.wait_for(|leader| !*leader) => Err(RunError::LeadershipLost),
            }
        }
        None => {
            controllers.await;
            Ok(())
        }
    };
    if let Some((is_leader, task)) = leadership {
        // Closing the channel makes the manager release the Lease: a standby takes over now.
        drop(is_leader);
        let _ = task.await;
        metrics.leader.set(0);
    }
    result
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn run_controllers(
    client: Client,
    options: &Options,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
) {
    let (policies, policy_changes) = watch_policies(client.clone(), stopped(stop.clone()));
    let (namespaces, relabelled) = watch_namespaces(client.clone(), stopped(stop.clone()));
    let stores = Stores {
        namespaces,
        policies,
    };
    // Namespaces are only checked once both stores hold the cluster's state.
    let synced = async {
        let _ = stores.namespaces.wait_until_ready().await;
        let _ = stores.policies.wait_until_ready().await;
    };
    tokio::select! {
        () = synced => {}
        () = stopped(stop.clone()) => return,
    }
    ready.store(true, Ordering::Release);
    let scopes: Vec<Option<String>> = if options.namespaces.is_empty() {
        vec![None]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: options.lease.as_ref().map(|l| l.identity.clone()),
    };
    let all = scopes.into_iter().map(|scope| {
        let recorder = Recorder::new(client.clone(), reporter.clone());
        let triggers = Triggers {
            policies: policy_changes.subscribe(),
            relabelled: relabelled.subscribe(),
        };
        let parts = (
            options.settings.clone(),
            stores.clone(),
            Arc::clone(&metrics),
            recorder,
        );
        run_scope(
            client.clone(),
            scope,
            parts,
            triggers,
            stopped(stop.clone()),
        )
    });
    futures::future::join_all(all).await;
}

/// What makes tools reconcile besides their own and their children's changes.
struct Triggers {
    /// Any ToolPolicy created, changed or deleted.
    policies: broadcast::Receiver<()>,
    /// A namespace whose labels changed; `None` when changes were missed (re-check all).
    relabelled: broadcast::Receiver<Option<String>>,
}

fn scoped<K>(client: &Client, scope: &Option<String>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match scope {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// One kube-runtime Controller over the AgentTools of `scope` (a namespace, or all).
async fn run_scope(
    client: Client,
    scope: Option<String>,
    (settings, stores, metrics, recorder): (Settings, Stores, Arc<Metrics>, Recorder),
    triggers: Triggers,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    // Only the controller's own children are watched and cached.
    let children = watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGED_BY_VALUE}"));
    let (service_accounts, sa_events) =
        owned_reflector::<ServiceAccount>(&client, &scope, &children);
    let (roles, role_events) = owned_reflector::<Role>(&client, &scope, &children);
    let (role_bindings, binding_events) =
        owned_reflector::<RoleBinding>(&client, &scope, &children);
    let (pdbs, pdb_events) = owned_reflector::<PodDisruptionBudget>(&client, &scope, &children);
    let owned = OwnedStores {
        service_accounts,
        roles,
        role_bindings,
        pdbs,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        stores,
        owned,
        metrics,
        recorder,
    ));
    let controller = Controller::new(
        scoped::<AgentTool>(&client, &scope),
        watcher::Config::default(),
    );
    let tools = controller.store();
    let policy_changes = futures::stream::unfold(triggers.policies, |mut rx| async move {
        match rx.recv().await {
            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => Some(((), rx)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    });
    let relabelled = futures::stream::unfold(triggers.relabelled, |mut rx| async move {
        match rx.recv().await {
            Ok(namespace) => Some((namespace, rx)),
            Err(broadcast::error::RecvError::Lagged(_)) => Some((None, rx)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    })
    .flat_map(move |namespace| {
        let affected: Vec<ObjectRef<AgentTool>> = tools
            .state()
            .iter()
            .filter(|tool| namespace.is_none() || tool.namespace() == namespace)
            .map(|tool| ObjectRef::from_obj(&**tool))
            .collect();
        futures::stream::iter(affected)
    });
    controller
        .owns(scoped::<Deployment>(&client, &scope), children.clone())
        .owns(scoped::<ConfigMap>(&client, &scope), children.clone())
        .owns(scoped::<Service>(&client, &scope), children.clone())
        .owns(scoped::<NetworkPolicy>(&client, &scope), children.clone())
        .owns_stream(sa_events)
        .owns_stream(role_events)
        .owns_stream(binding_events)
        .owns_stream(pdb_events)
        .reconcile_all_on(policy_changes)
        .reconcile_on(relabelled)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

/// A cache of one optional child kind, and the stream that both fills it and triggers
/// the owning tool's reconcile.
fn owned_reflector<K>(
    client: &Client,
    scope: &Option<String>,
    config: &watcher::Config,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let events = reflector(writer, watcher(scoped::<K>(client, scope), config.clone()))
        .default_backoff()
        .touched_objects();
    (store, events)
}

/// The ToolPolicy cache, and a signal on every change after the initial list.
fn watch_policies(
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Store<ToolPolicy>, broadcast::Sender<()>) {
    let (store, writer) = reflector::store();
    let (changed, _) = broadcast::channel(64);
    let sender = changed.clone();
    let events = reflector(
        writer,
        watcher(Api::<ToolPolicy>::all(client), watcher::Config::default()),
    )
    .default_backoff();
    tokio::spawn(async move {
        let drive = events.try_for_each(|event| {
            if matches!(event, watcher::Event::Apply(_) | watcher::Event::Delete(_)) {
                let _ = sender.send(());
            }
            futures::future::ready(Ok(()))
        });
        tokio::select! {
            result = drive => if let Err(e) = result {
                tracing::error!(error = %e, "the ToolPolicy watch ended");
            },
            () = shutdown => {}
        }
    });
    (store, changed)
}

/// The Namespace cache, and the name of every namespace whose labels change.
fn watch_namespaces(
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Store<Namespace>, broadcast::Sender<Option<String>>) {
    let (store, writer) = reflector::store();
    let (relabelled, _) = broadcast::channel(256);
    let sender = relabelled.clone();
    let events = reflector(
        writer,
        watcher(Api::<Namespace>::all(client), watcher::Config::default()),
    )
    .default_backoff();
    tokio::spawn(async move {
        let mut known: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let drive = events.try_for_each(|event| {
            match event {
                watcher::Event::InitApply(ns) => {
                    known.insert(ns.name_any(), ns.labels().clone());
                }
                watcher::Event::Apply(ns) => {
                    let labels = ns.labels().clone();
                    if known.insert(ns.name_any(), labels.clone()).as_ref() != Some(&labels) {
                        let _ = sender.send(Some(ns.name_any()));
                    }
                }
                watcher::Event::Delete(ns) => {
                    known.remove(&ns.name_any());
                }
                // A relist may hide relabels that happened while disconnected.
                watcher::Event::InitDone => {
                    let _ = sender.send(None);
                }
                watcher::Event::Init => {}
            }
            futures::future::ready(Ok(()))
        });
        tokio::select! {
            result = drive => if let Err(e) = result {
                tracing::error!(error = %e, "the Namespace watch ended");
            },
            () = shutdown => {}
        }
    });
    (store, relabelled)
}

/// `/metrics` (Prometheus text), `/healthz` (the process answers), `/readyz` (stores
/// synced, or standing by for the Lease).
async fn serve_health(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Acquire);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "the metrics and health server stopped");
    }
}
