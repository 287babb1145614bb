//! Operations: the kube-runtime `Controller` per watched scope (cluster-wide or one per
//! `--namespaces` entry), shared reflector stores for ToolPolicies and namespaces (a
//! policy change re-evaluates every tool, a namespace relabel the tools in it), leader
//! election on a coordination Lease, `/metrics` `/healthz` `/readyz`, graceful shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PartialObjectMeta};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::utils::PredicateConfig;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{broadcast, watch};

use super::apply::{FIELD_MANAGER, OwnedStores};
use super::build::{ApiServerEndpoint, Settings};
use super::dereference::Stores;
use super::labels::{MANAGED_BY, MANAGED_BY_VALUE, NAME, NAME_VALUE, TOOL};
use super::metrics::Metrics;
use super::reconcile::{Context, error_policy, reconcile};
use super::{policy_status, runner_token_review};
use crate::api::{AgentTool, ToolPolicy};

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub settings: Settings,
    /// Watch only these namespaces; empty: the whole cluster.
    pub namespaces: Vec<String>,
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

/// Reconciles running at once per watched scope: enough to bring 1,000 tools up within a
/// minute (each is about a dozen API requests), few enough not to flood the API server.
const RECONCILE_CONCURRENCY: u16 = 16;

/// How long reconciles in flight may take to finish after a shutdown signal (the kubelet
/// waits 30 s by default before SIGKILL).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "finding the API server's addresses (EndpointSlices of Service default/kubernetes): {0}"
    )]
    ApiServerDiscovery(#[source] kube::Error),
    #[error("the Service default/kubernetes has no ready endpoint")]
    NoApiServerEndpoint,
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
            RunError::ApiServerDiscovery(_) => "ApiServerDiscoveryFailed",
            RunError::NoApiServerEndpoint => "NoApiServerEndpoint",
            RunError::Lease { .. } => "LeaseFailed",
            RunError::LeadershipLost => "LeadershipLost",
        }
    }
}

/// Runs until `shutdown` resolves (then finishes reconciles in flight) or leadership is
/// lost, serving `/metrics`, `/healthz` and `/readyz` on `listener`. Empty
/// `options.settings.api_server` is filled from the cluster.
pub async fn run(
    client: Client,
    mut options: Options,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    tokio::spawn(serve_health(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&ready),
        stopped(stop_rx.clone()),
    ));

    if options.settings.api_server.is_empty() {
        options.settings.api_server = api_server_endpoints(&client).await?;
    }
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

/// The API server's addresses: the ready endpoints of Service `default/kubernetes`.
pub async fn api_server_endpoints(client: &Client) -> Result<Vec<ApiServerEndpoint>, RunError> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await
        .map_err(RunError::ApiServerDiscovery)?;
    let mut endpoints = BTreeSet::new();
    for slice in &list.items {
        let ports: Vec<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
            .collect();
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false));
        for address in ready.flat_map(|e| &e.addresses) {
            let Ok(ip) = address.parse::<std::net::IpAddr>() else {
                continue;
            };
            endpoints.extend(ports.iter().map(|&port| ApiServerEndpoint { ip, port }));
        }
    }
    if endpoints.is_empty() {
        return Err(RunError::NoApiServerEndpoint);
    }
    Ok(endpoints.into_iter().collect())
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
    let controllers: Vec<(Option<String>, Controller<AgentTool>)> = scopes
        .into_iter()
        .map(|scope| {
            let controller = Controller::new(
                scoped::<AgentTool>(&client, &scope),
                watcher::Config::default(),
            );
            (scope, controller)
        })
        .collect();
    let counting = policy_status::run(
        client.clone(),
        stores.policies.clone(),
        stores.namespaces.clone(),
        controllers.iter().map(|(_, c)| c.store()).collect(),
        stop.clone(),
    );
    let token_review = runner_token_review::run(
        client.clone(),
        options.namespaces.clone(),
        controllers.iter().map(|(_, c)| c.store()).collect(),
        stop.clone(),
    );
    let all = controllers.into_iter().map(|(scope, controller)| {
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
            (scope, controller),
            parts,
            triggers,
            stop.clone(),
        )
    });
    futures::future::join3(futures::future::join_all(all), counting, token_review).await;
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
    (scope, controller): (Option<String>, Controller<AgentTool>),
    (settings, stores, metrics, recorder): (Settings, Stores, Arc<Metrics>, Recorder),
    triggers: Triggers,
    stop: watch::Receiver<bool>,
) {
    // Only the controller's own children are watched, and only their metadata is cached.
    let children = watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGED_BY_VALUE}"));
    let (service_accounts, sa_events) = owned_reflector(&client, &scope, &children);
    let (roles, role_events) = owned_reflector(&client, &scope, &children);
    let (role_bindings, binding_events) = owned_reflector(&client, &scope, &children);
    let (config_maps, config_map_events) = owned_reflector(&client, &scope, &children);
    let (deployments, deployment_events) = owned_reflector(&client, &scope, &children);
    let (services, service_events) = owned_reflector(&client, &scope, &children);
    let (network_policies, network_policy_events) = owned_reflector(&client, &scope, &children);
    let (pdbs, pdb_events) = owned_reflector(&client, &scope, &children);
    let owned = OwnedStores {
        service_accounts,
        roles,
        role_bindings,
        config_maps,
        deployments,
        services,
        network_policies,
        pdbs,
    };
    let (runner_pods, pod_events) = runner_pods_reflector(&client, &scope);
    let ctx = Arc::new(
        Context::new(client.clone(), settings, stores, owned, metrics, recorder)
            .with_runner_pods(runner_pods),
    );
    let tools = controller.store();
    let tools_listed = tools.clone();
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
    let reconciling = controller
        .owns_stream(sa_events)
        .owns_stream(role_events)
        .owns_stream(binding_events)
        .owns_stream(pdb_events)
        .owns_stream(config_map_events)
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(network_policy_events)
        // Pods belong to ReplicaSets, not to the tool: their label names it.
        .watches_stream(pod_events, |pod| {
            let tool = pod.labels().get(TOOL)?;
            Some(ObjectRef::new(tool).within(&pod.namespace()?))
        })
        .reconcile_all_on(policy_changes)
        .reconcile_on(relabelled)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
        )
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // kube-runtime holds a graceful shutdown until the AgentTool cache has listed once. No
    // reconcile runs before that, so there is nothing to wait for; after it, reconciles in
    // flight get a bounded time to finish.
    let bounded = async {
        stopped(stop).await;
        let listed = tools_listed.wait_until_ready().now_or_never().is_some();
        if listed {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            tracing::warn!(
                "reconciles still running {SHUTDOWN_GRACE:?} after shutdown; stopping anyway"
            );
        }
    };
    tokio::select! {
        () = reconciling => {}
        () = bounded => {}
    }
}

/// A metadata cache of one child kind, and the stream that both fills it and triggers
/// the owning tool's reconcile.
fn owned_reflector<K>(
    client: &Client,
    scope: &Option<String>,
    config: &watcher::Config,
) -> (
    Store<PartialObjectMeta<K>>,
    impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static,
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
    let events = reflector(
        writer,
        watcher(
            scoped::<PartialObjectMeta<K>>(client, scope),
            config.clone(),
        ),
    )
    .default_backoff()
    .touched_objects();
    (store, events)
}

/// The runner pods of `scope` (by the runner labels), each reduced to its metadata and
/// status (what [`super::runner_pods::trouble`] reads), and the stream that fills the
/// cache and triggers the reconcile of the pod's tool.
fn runner_pods_reflector(
    client: &Client,
    scope: &Option<String>,
) -> (
    Store<Pod>,
    impl futures::Stream<Item = Result<Pod, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = reflector::store();
    let runners = watcher::Config::default().labels(&format!(
        "{MANAGED_BY}={MANAGED_BY_VALUE},{NAME}={NAME_VALUE}"
    ));
    let events = reflector(
        writer,
        watcher(scoped::<Pod>(client, scope), runners).modify(|pod| {
            pod.spec = None;
            pod.managed_fields_mut().clear();
        }),
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(runner_pod_state, PredicateConfig::default());
    (store, events)
}

/// A hash of what a tool's status reads from its runner pod: a change of anything else
/// (its scheduling conditions, its IP) triggers no reconcile.
fn runner_pod_state(pod: &Pod) -> Option<u64> {
    let status = pod.status.as_ref();
    let read = (
        &pod.metadata.deletion_timestamp,
        status.and_then(|s| s.container_statuses.as_ref()),
        status.and_then(|s| s.init_container_statuses.as_ref()),
    );
    let bytes = serde_json::to_vec(&read).ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
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
        // Watch errors are retried with backoff inside the stream; the stream never ends.
        let drive = events.for_each(|event| {
            match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    let _ = sender.send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "watching ToolPolicies"),
            }
            futures::future::ready(())
        });
        tokio::select! {
            () = drive => {}
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
        let mut labels = NamespaceLabels::default();
        let drive = events.for_each(|event| {
            match event {
                Ok(event) => {
                    if let Some(affected) = labels.observe(&event) {
                        let _ = sender.send(affected);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watching Namespaces"),
            }
            futures::future::ready(())
        });
        tokio::select! {
            () = drive => {}
            () = shutdown => {}
        }
    });
    (store, relabelled)
}

/// The labels of every namespace, to tell a relabel from any other namespace update.
#[derive(Default)]
struct NamespaceLabels(BTreeMap<String, BTreeMap<String, String>>);

impl NamespaceLabels {
    /// Which tools a namespace event must re-check: `Some(Some(ns))` those in `ns`,
    /// `Some(None)` all of them, `None` none.
    fn observe(&mut self, event: &watcher::Event<Namespace>) -> Option<Option<String>> {
        match event {
            watcher::Event::InitApply(ns) => {
                self.0.insert(ns.name_any(), ns.labels().clone());
                None
            }
            watcher::Event::Apply(ns) => {
                let labels = ns.labels().clone();
                let before = self.0.insert(ns.name_any(), labels.clone());
                (before.as_ref() != Some(&labels)).then(|| Some(ns.name_any()))
            }
            watcher::Event::Delete(ns) => {
                self.0.remove(&ns.name_any());
                None
            }
            // A relist may hide relabels that happened while the watch was down.
            watcher::Event::InitDone => Some(None),
            watcher::Event::Init => None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(labels: &[(&str, &str)], annotation: &str) -> Namespace {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        serde_json::from_value(serde_json::json!({"metadata": {
            "name": "agents", "labels": labels, "annotations": {"note": annotation}}}))
        .unwrap()
    }

    /// A pod's scheduling and address changes reconcile nothing; its containers' states
    /// and its deletion do.
    #[test]
    fn only_what_the_status_reads_of_a_runner_pod_triggers_a_reconcile() {
        let pod = |conditions: serde_json::Value, containers: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "grep-7d9f8c6b5-abcde", "namespace": "agents"},
                "status": {"conditions": conditions, "podIP": "10.0.0.7",
                           "containerStatuses": containers}}))
            .unwrap()
        };
        let waiting = serde_json::json!([{"name": "runner", "image": "i", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]);
        let crashed = serde_json::json!([{"name": "runner", "image": "i", "imageID": "",
            "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 2, "message": "ImageLacksMountPoints: x"}}}]);
        let pending = pod(serde_json::json!([]), waiting.clone());
        let scheduled = pod(
            serde_json::json!([{"type": "PodScheduled", "status": "True"}]),
            waiting,
        );
        assert_eq!(runner_pod_state(&pending), runner_pod_state(&scheduled));
        let refused = pod(serde_json::json!([]), crashed);
        assert_ne!(runner_pod_state(&pending), runner_pod_state(&refused));
        let mut deleting = refused.clone();
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        assert_ne!(runner_pod_state(&refused), runner_pod_state(&deleting));
    }

    #[test]
    fn only_a_label_change_rechecks_the_namespaces_tools() {
        let mut known = NamespaceLabels::default();
        let team_a = ns(&[("team", "a")], "one");
        assert_eq!(
            known.observe(&watcher::Event::InitApply(team_a.clone())),
            None
        );
        assert_eq!(known.observe(&watcher::Event::InitDone), Some(None));
        assert_eq!(known.observe(&watcher::Event::Apply(team_a)), None);
        let annotated = ns(&[("team", "a")], "two");
        assert_eq!(known.observe(&watcher::Event::Apply(annotated)), None);
        let relabelled = ns(&[("team", "b")], "two");
        assert_eq!(
            known.observe(&watcher::Event::Apply(relabelled.clone())),
            Some(Some("agents".into()))
        );
        assert_eq!(
            known.observe(&watcher::Event::Delete(relabelled.clone())),
            None
        );
        // Created again: its tools (waiting for it) are checked.
        assert_eq!(
            known.observe(&watcher::Event::Apply(relabelled)),
            Some(Some("agents".into()))
        );
    }
}
