//! The reconcile driver: dereference → validate → build → apply → status for one
//! AgentTool, with one error enum per phase. Specs that cannot be deployed are reported
//! and wait for a change (no hot loop); API errors retry with a per-tool backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, Store};
use kube::{Client, Resource, ResourceExt};

use super::apply::{self, ApplyError, OwnedStores};
use super::build::{self, BuildError, Settings};
use super::dereference::{self, DereferenceError, Stores};
use super::labels::{CONFIG_HASH, TOOL};
use super::metrics::Metrics;
use super::runner_pods::{self, PodTrouble};
use super::status::{self, DEGRADED, READY, Refusal, StatusError};
use super::validate::{self, ValidateError};
use crate::api::{AgentTool, AgentToolStatus};
use crate::policy::Engine;

/// Resync of a healthy tool, beyond the watches: a safety net for a missed event.
const RESYNC: Duration = Duration::from_secs(10 * 60);
/// A missing Secret/ConfigMap/PVC, or an object of someone else's holding a child's name,
/// is not watched (that would need cluster-wide reads of every Secret): look again after
/// this long.
const UNWATCHED_RETRY: Duration = Duration::from_secs(60);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub engine: Engine,
    pub stores: Stores,
    pub owned: OwnedStores,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// The runner pods of every tool (watched, never listed per reconcile): what they
    /// report goes into the tool's status.
    pub runner_pods: Store<Pod>,
    /// Consecutive failures per tool (`namespace/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        stores: Stores,
        owned: OwnedStores,
        metrics: Arc<Metrics>,
        recorder: Recorder,
    ) -> Context {
        Context {
            client,
            settings,
            engine: Engine::default(),
            stores,
            owned,
            metrics,
            recorder,
            runner_pods: reflector::store().0,
            failures: Mutex::default(),
        }
    }

    /// Reads the runner pods from `pods` (by default an empty cache: no pod reports).
    pub fn with_runner_pods(mut self, pods: Store<Pod>) -> Context {
        self.runner_pods = pods;
        self
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // Only counters behind the lock: a panic elsewhere leaves them usable.
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A failed reconcile; every phase has its own error type.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Dereference(#[from] DereferenceError),
    #[error(transparent)]
    Validate(#[from] ValidateError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Status(#[from] StatusError),
}

impl ReconcileError {
    /// Stable CamelCase reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ReconcileError::Dereference(e) => e.reason(),
            ReconcileError::Validate(e) => e.reason(),
            ReconcileError::Build(e) => e.reason(),
            ReconcileError::Apply(e) => e.reason(),
            ReconcileError::Status(e) => e.reason(),
        }
    }
}

/// kube-runtime's reconcile callback.
pub async fn reconcile(tool: Arc<AgentTool>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = phases(&tool, &ctx).await;
    let took = started.elapsed();
    match &result {
        Ok(Reconciled::Applied) => {
            ctx.failures().remove(&key(&tool));
            ctx.metrics.reconciled("applied", None, took);
        }
        Ok(Reconciled::Refused(reason, _)) => {
            ctx.failures().remove(&key(&tool));
            ctx.metrics.reconciled("refused", Some(reason), took);
        }
        Err(e) => {
            tracing::warn!(tool = %key(&tool), reason = e.reason(), error = %e, "reconcile failed");
            ctx.metrics.reconciled("error", Some(e.reason()), took);
        }
    }
    result.map(|done| match done {
        Reconciled::Applied => Action::requeue(RESYNC),
        Reconciled::Refused(_, retry) => retry.map_or_else(Action::await_change, Action::requeue),
    })
}

/// kube-runtime's error callback: exponential backoff per tool.
pub fn error_policy(tool: Arc<AgentTool>, _error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures();
    let count = failures.entry(key(&tool)).or_insert(0);
    *count = count.saturating_add(1);
    Action::requeue(backoff(*count))
}

/// Delay after `failures` consecutive failures: 1 s, 2 s, 4 s, ... at most 5 min.
pub fn backoff(failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1));
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

enum Reconciled {
    Applied,
    /// Reported in the status; waits for a change, or retries after the duration.
    Refused(&'static str, Option<Duration>),
}

async fn phases(tool: &AgentTool, ctx: &Context) -> Result<Reconciled, ReconcileError> {
    let now = Time(jiff::Timestamp::now());
    let inputs = match dereference::dereference(tool, &ctx.client, &ctx.stores).await {
        Ok(inputs) => inputs,
        Err(e @ DereferenceError::MissingReference { .. }) => {
            let refusal = Refusal {
                reason: e.reason(),
                message: e.to_string(),
                admitted: None,
            };
            return refuse(tool, ctx, &refusal, now, Some(UNWATCHED_RETRY)).await;
        }
        Err(e) => return Err(e.into()),
    };
    let admitted = match validate::validate(tool, &inputs, &ctx.engine) {
        Ok(admitted) => admitted,
        Err(e) => {
            let refusal = Refusal {
                reason: e.reason(),
                message: e.to_string(),
                admitted: None,
            };
            return refuse(tool, ctx, &refusal, now, None).await;
        }
    };
    let children = match build::children(&admitted, &ctx.settings) {
        Ok(children) => children,
        Err(e) => {
            let refusal = Refusal {
                reason: e.reason(),
                message: e.to_string(),
                admitted: Some(&admitted),
            };
            return refuse(tool, ctx, &refusal, now, None).await;
        }
    };
    let namespace = tool.namespace().unwrap_or_default();
    let uid = tool.uid().unwrap_or_default();
    let applied = match apply::apply(
        &ctx.client,
        &namespace,
        &tool.name_any(),
        &uid,
        &children,
        &ctx.owned,
    )
    .await
    {
        Ok(applied) => applied,
        Err(e @ ApplyError::NameTaken { .. }) => {
            let refusal = Refusal {
                reason: e.reason(),
                message: e.to_string(),
                admitted: Some(&admitted),
            };
            return refuse(tool, ctx, &refusal, now, Some(UNWATCHED_RETRY)).await;
        }
        Err(e) => return Err(e.into()),
    };
    let trouble = pod_trouble(tool, &ctx.runner_pods, &applied.deployment);
    report(
        tool,
        ctx,
        status::of_applied(tool, &admitted, &applied.deployment, trouble.as_ref(), now),
    )
    .await?;
    Ok(Reconciled::Applied)
}

/// What the runner pods of the applied Deployment's current template report.
fn pod_trouble(tool: &AgentTool, pods: &Store<Pod>, deployment: &Deployment) -> Option<PodTrouble> {
    let (namespace, name) = (tool.namespace(), tool.name_any());
    let pods: Vec<Arc<Pod>> = pods
        .state()
        .into_iter()
        .filter(|pod| pod.namespace() == namespace && pod.labels().get(TOOL) == Some(&name))
        .collect();
    let config_hash = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH));
    let deployment_name = deployment.metadata.name.as_deref().unwrap_or(&name);
    runner_pods::trouble(
        deployment_name,
        config_hash.map(String::as_str),
        pods.iter().map(|pod| &**pod),
    )
}

/// Reports why the tool cannot be deployed; it then waits for a change, or looks again
/// after `retry`.
async fn refuse(
    tool: &AgentTool,
    ctx: &Context,
    refusal: &Refusal<'_>,
    now: Time,
    retry: Option<Duration>,
) -> Result<Reconciled, ReconcileError> {
    report(tool, ctx, status::of_refused(tool, refusal, now)).await?;
    Ok(Reconciled::Refused(refusal.reason, retry))
}

/// Writes the status when it changed, with an Event for each condition that changed
/// reason and for a new generation rolled out.
async fn report(tool: &AgentTool, ctx: &Context, new: AgentToolStatus) -> Result<(), StatusError> {
    let old = tool.status.clone().unwrap_or_default();
    if old == new {
        return Ok(());
    }
    status::write(&ctx.client, tool, &new).await?;
    for event in events(&old, &new) {
        if let Err(e) = ctx.recorder.publish(&event, &tool.object_ref(&())).await {
            tracing::warn!(tool = %key(tool), error = %e, "publishing an Event failed");
        }
    }
    Ok(())
}

/// The Events a status change deserves (pure).
pub fn events(old: &AgentToolStatus, new: &AgentToolStatus) -> Vec<Event> {
    let reasons = |s: &AgentToolStatus| -> BTreeMap<String, (String, String)> {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), (c.status.clone(), c.reason.clone())))
            .collect()
    };
    let (before, after) = (reasons(old), reasons(new));
    let mut events = Vec::new();
    // Only an applied tool has endpoints (its runner pods may still be in trouble).
    let applied = !new.endpoints.is_empty();
    if applied && new.observed_generation != old.observed_generation {
        let reason = if old.observed_generation.is_none() {
            "Created"
        } else {
            "Updated"
        };
        events.push(Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(format!(
                "runner workload applied for generation {}",
                new.observed_generation.unwrap_or_default()
            )),
            action: "Apply".into(),
            secondary: None,
        });
    }
    for condition in &new.conditions {
        if before.get(&condition.type_) == after.get(&condition.type_) {
            continue;
        }
        // Not ready yet while pods start is normal; a denial or a refusal is not.
        let trouble = match condition.type_.as_str() {
            DEGRADED => condition.status == "True",
            READY => condition.status == "False" && condition.reason != "RunnersNotReady",
            _ => condition.status == "False",
        };
        events.push(Event {
            type_: if trouble {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: condition.reason.clone(),
            // Events cap their note at 1 kB.
            note: Some(condition.message.chars().take(1000).collect()),
            action: condition.type_.clone(),
            secondary: None,
        });
    }
    events
}

fn key(tool: &AgentTool) -> String {
    format!(
        "{}/{}",
        tool.namespace().unwrap_or_default(),
        tool.name_any()
    )
}
