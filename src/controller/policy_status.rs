//! `ToolPolicy.status.violatingTools`: how many of the watched AgentTools break each
//! policy (in any mode), counted by the same engine the reconciles use, from the
//! reflector stores alone. Recounted only when a tool, policy or namespace changed,
//! and written (server-side apply on `/status`) only to policies whose status differs.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::apply::FIELD_MANAGER;
use crate::api::{AgentTool, ToolPolicy, ToolPolicyStatus};
use crate::policy::Engine;

/// How often the stores are looked at: a changed count shows within this long.
const PERIOD: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("writing the status of ToolPolicy {name}: {source}")]
pub struct PolicyStatusError {
    name: String,
    #[source]
    source: kube::Error,
}

impl PolicyStatusError {
    /// Stable CamelCase reason for logs.
    pub fn reason(&self) -> &'static str {
        "PolicyStatusUpdateFailed"
    }
}

/// For every policy, the number of `tools` with at least one violation it demands.
/// A tool whose namespace is not (yet) known is not counted: its policies cannot be
/// selected without the namespace's labels.
pub fn violating_tools<'a>(
    engine: &Engine,
    policies: &[ToolPolicy],
    namespace_labels: impl Fn(&str) -> Option<BTreeMap<String, String>>,
    tools: impl IntoIterator<Item = &'a AgentTool>,
) -> BTreeMap<String, u32> {
    let mut counts: BTreeMap<String, u32> = policies.iter().map(|p| (p.name_any(), 0)).collect();
    for tool in tools {
        let Some(labels) = namespace_labels(&tool.namespace().unwrap_or_default()) else {
            continue;
        };
        let report = engine.evaluate(tool, policies, &labels);
        let mut broken: Vec<&str> = report
            .violations
            .iter()
            .filter_map(|v| v.policy.as_deref())
            .collect();
        broken.sort_unstable();
        broken.dedup();
        for policy in broken {
            if let Some(count) = counts.get_mut(policy) {
                *count += 1;
            }
        }
    }
    counts
}

/// The statuses to write: policies whose stored count or observed generation differs.
pub fn stale(
    policies: &[ToolPolicy],
    counts: &BTreeMap<String, u32>,
) -> Vec<(String, ToolPolicyStatus)> {
    policies
        .iter()
        .filter_map(|policy| {
            let name = policy.name_any();
            let current = policy.status.clone().unwrap_or_default();
            let wanted = ToolPolicyStatus {
                observed_generation: policy.meta().generation,
                violating_tools: counts.get(&name).copied().unwrap_or(0),
                ..current.clone()
            };
            (wanted != current).then_some((name, wanted))
        })
        .collect()
}

pub async fn write(
    client: &Client,
    name: &str,
    status: &ToolPolicyStatus,
) -> Result<(), PolicyStatusError> {
    let api: Api<ToolPolicy> = Api::all(client.clone());
    let patch = json!({
        "apiVersion": crate::api::API_VERSION,
        "kind": "ToolPolicy",
        "status": {
            "observedGeneration": status.observed_generation,
            "violatingTools": status.violating_tools,
        },
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|source| PolicyStatusError {
        name: name.to_string(),
        source,
    })
}

/// What the stores hold, summed over resource versions: changes when any object does.
fn fingerprint<K: Resource>(objects: &[Arc<K>]) -> u64 {
    objects.iter().fold(0u64, |sum, object| {
        let mut hasher = DefaultHasher::new();
        object.meta().uid.hash(&mut hasher);
        object.meta().resource_version.hash(&mut hasher);
        sum.wrapping_add(hasher.finish())
    })
}

/// The counts of the last look at the stores, and what they were counted from.
#[derive(Default)]
pub struct Counter {
    engine: Engine,
    counted: Option<(u64, BTreeMap<String, u32>)>,
}

impl Counter {
    /// One look at the stores: recounts if any object changed since the last look,
    /// then writes every policy whose status differs from the counts (a failed
    /// write is logged and stays stale for the next look).
    pub async fn update(
        &mut self,
        client: &Client,
        policies: &Store<ToolPolicy>,
        namespaces: &Store<Namespace>,
        tools: &[Store<AgentTool>],
    ) {
        let all_tools: Vec<Arc<AgentTool>> = tools.iter().flat_map(Store::state).collect();
        let current_policies = policies.state();
        let print = fingerprint(&all_tools)
            .wrapping_add(fingerprint(&current_policies).rotate_left(21))
            .wrapping_add(fingerprint(&namespaces.state()).rotate_left(42));
        let policy_list: Vec<ToolPolicy> = current_policies.iter().map(|p| (**p).clone()).collect();
        let counts = match &mut self.counted {
            Some((seen, counts)) if *seen == print => counts,
            counted => {
                let counts = violating_tools(
                    &self.engine,
                    &policy_list,
                    |ns| {
                        namespaces
                            .get(&ObjectRef::new(ns))
                            .map(|ns| ns.labels().clone())
                    },
                    all_tools.iter().map(|t| &**t),
                );
                &mut counted.insert((print, counts)).1
            }
        };
        for (name, status) in stale(&policy_list, counts) {
            if let Err(e) = write(client, &name, &status).await {
                tracing::warn!(policy = %name, reason = e.reason(), error = %e, "policy status");
            }
        }
    }
}

/// Keeps every policy's `violatingTools` current until `stop` turns true.
pub async fn run(
    client: Client,
    policies: Store<ToolPolicy>,
    namespaces: Store<Namespace>,
    tools: Vec<Store<AgentTool>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut counter = Counter::default();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        counter
            .update(&client, &policies, &namespaces, &tools)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, selector: serde_json::Value, status: serde_json::Value) -> ToolPolicy {
        serde_json::from_value(
            json!({"apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy",
            "metadata": {"name": name, "generation": 3},
            "spec": {"mode": "warn", "namespaceSelector": selector,
                     "rules": {"sandboxing": {"maxTimeoutMs": 100}}},
            "status": status}),
        )
        .unwrap()
    }

    fn tool(namespace: &str, name: &str, timeout_ms: u32) -> AgentTool {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/execute-code.yaml");
        let mut tool: AgentTool =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        tool.metadata.namespace = Some(namespace.into());
        tool.metadata.name = Some(name.into());
        tool.spec.sandbox.timeout_ms = timeout_ms;
        tool
    }

    fn labels(ns: &str) -> Option<BTreeMap<String, String>> {
        match ns {
            "team-a" => Some(BTreeMap::from([("team".into(), "a".into())])),
            "team-b" => Some(BTreeMap::from([("team".into(), "b".into())])),
            _ => None,
        }
    }

    #[test]
    fn each_policy_counts_the_tools_that_break_it_in_the_namespaces_it_selects() {
        let policies = [
            policy("team-a", json!({"matchLabels": {"team": "a"}}), json!(null)),
            policy("everyone", json!({}), json!(null)),
            policy("nobody", json!({"matchLabels": {"team": "z"}}), json!(null)),
        ];
        let tools = [
            tool("team-a", "slow-1", 30_000),
            tool("team-a", "slow-2", 30_000),
            tool("team-a", "fast", 50),
            tool("team-b", "slow-3", 30_000),
            // Its namespace is unknown: not counted anywhere.
            tool("gone", "slow-4", 30_000),
        ];
        let counts = violating_tools(&Engine::default(), &policies, labels, &tools);
        assert_eq!(
            counts,
            BTreeMap::from([
                ("everyone".into(), 3),
                ("nobody".into(), 0),
                ("team-a".into(), 2),
            ])
        );
    }

    #[test]
    fn only_policies_whose_count_or_generation_changed_are_written() {
        let up_to_date = policy(
            "up-to-date",
            json!({}),
            json!({"observedGeneration": 3, "violatingTools": 2}),
        );
        let wrong_count = policy(
            "wrong-count",
            json!({}),
            json!({"observedGeneration": 3, "violatingTools": 5}),
        );
        let new_generation = policy(
            "new-generation",
            json!({}),
            json!({"observedGeneration": 2, "violatingTools": 2}),
        );
        let never_written = policy("never-written", json!({}), json!(null));
        let counts = BTreeMap::from([
            ("up-to-date".into(), 2),
            ("wrong-count".into(), 2),
            ("new-generation".into(), 2),
            ("never-written".into(), 0),
        ]);
        let written: BTreeMap<String, (Option<i64>, u32)> = stale(
            &[up_to_date, wrong_count, new_generation, never_written],
            &counts,
        )
        .into_iter()
        .map(|(name, s)| (name, (s.observed_generation, s.violating_tools)))
        .collect();
        assert_eq!(
            written,
            BTreeMap::from([
                ("never-written".into(), (Some(3), 0)),
                ("new-generation".into(), (Some(3), 2)),
                ("wrong-count".into(), (Some(3), 2)),
            ])
        );
    }
}
