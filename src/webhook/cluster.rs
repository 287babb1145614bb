//! What the webhook knows about the cluster: reflector stores of the
//! ToolPolicies, the Namespaces (their real labels) and the AgentTools. Nothing
//! is fetched per request; until every store has its first full list the
//! webhook reports not ready and answers no review.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::api::{AgentTool, ToolPolicy};

/// A read-only view of the three stores; cheap to clone.
#[derive(Clone)]
pub struct ClusterView {
    policies: Store<ToolPolicy>,
    namespaces: Store<Namespace>,
    tools: Store<AgentTool>,
    synced: Arc<AtomicBool>,
}

impl ClusterView {
    /// A view over fixed objects, synced at once (tests, fuzzing, benchmarks).
    pub fn from_objects(
        policies: Vec<ToolPolicy>,
        namespaces: Vec<Namespace>,
        tools: Vec<AgentTool>,
    ) -> ClusterView {
        ClusterView {
            policies: filled_store(policies),
            namespaces: filled_store(namespaces),
            tools: filled_store(tools),
            synced: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Starts the three reflectors. The returned future runs them (and never
    /// ends while the API server answers); the view is synced once each store
    /// has listed everything once.
    pub fn watch(client: &Client) -> (ClusterView, impl Future<Output = ()> + Send + 'static) {
        let (policies, policy_writer) = reflector::store();
        let (namespaces, namespace_writer) = reflector::store();
        let (tools, tool_writer) = reflector::store();
        let view = ClusterView {
            policies: policies.clone(),
            namespaces: namespaces.clone(),
            tools: tools.clone(),
            synced: Arc::new(AtomicBool::new(false)),
        };
        let synced = Arc::clone(&view.synced);
        let run_policies = reflect(Api::<ToolPolicy>::all(client.clone()), policy_writer);
        let run_namespaces = reflect(Api::<Namespace>::all(client.clone()), namespace_writer);
        let run_tools = reflect(Api::<AgentTool>::all(client.clone()), tool_writer);
        let mark_synced = async move {
            let ready = futures::future::try_join3(
                policies.wait_until_ready(),
                namespaces.wait_until_ready(),
                tools.wait_until_ready(),
            )
            .await;
            if ready.is_ok() {
                synced.store(true, Ordering::Release);
                tracing::info!("webhook stores synced: ToolPolicies, Namespaces, AgentTools");
            }
        };
        let run = async move {
            futures::join!(run_policies, run_namespaces, run_tools, mark_synced);
        };
        (view, run)
    }

    /// True once every store has been listed.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Every ToolPolicy (the engine picks those that select a tool).
    pub fn policies(&self) -> Vec<ToolPolicy> {
        self.policies
            .state()
            .iter()
            .map(|p| (**p).clone())
            .collect()
    }

    /// The labels of a namespace, `None` when the namespace is not known.
    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&ObjectRef::new(name))
            .map(|ns| ns.metadata.labels.clone().unwrap_or_default())
    }

    /// An AgentTool by namespace and name.
    pub fn tool(&self, namespace: &str, name: &str) -> Option<Arc<AgentTool>> {
        self.tools.get(&ObjectRef::new(name).within(namespace))
    }
}

fn filled_store<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut writer = reflector::store::Writer::default();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    writer.as_reader()
}

/// Runs one reflector forever; watch errors are logged and retried with backoff.
async fn reflect<K>(api: Api<K>, writer: reflector::store::Writer<K>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        if let Err(error) = event {
            tracing::warn!(%kind, %error, "watch failed; retrying");
        }
    }
}
