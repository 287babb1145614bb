//! Reconcile scenarios against a mocked API server (tower-test, as kube-rs/controller-rs
//! `src/fixtures.rs`): a small in-memory API server answers server-side applies, status
//! patches, metadata gets, deletes and Events, records every request, and can fail the
//! requests a test names.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::PartialObjectMeta;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock;

use super::apply::OwnedStores;
use super::build::{ApiServerEndpoint, Settings, ToolRootfs};
use super::dereference::Stores;
use super::metrics::Metrics;
use super::reconcile::{Context, ReconcileError, backoff, error_policy, reconcile};
use crate::api::{AgentTool, AgentToolStatus, ToolPolicy};

/// One request the controller made.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    /// Path and query.
    uri: String,
    body: Value,
}

impl Call {
    fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
}

#[derive(Default)]
struct ApiState {
    /// Objects by path (`/apis/apps/v1/namespaces/agents/deployments/x`).
    objects: HashMap<String, Value>,
    calls: Vec<Call>,
    /// `(method, path suffix, status)`: the next matching request fails with it.
    failures: Vec<(Method, String, u16)>,
}

/// The in-memory API server behind a mocked client.
#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<ApiState>>);

impl FakeApi {
    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.0.lock().unwrap()
    }

    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    fn fail_next(&self, method: Method, path_suffix: &str, status: u16) {
        self.state()
            .failures
            .push((method, path_suffix.to_string(), status));
    }

    fn put(&self, path: &str, object: Value) {
        self.state().objects.insert(path.to_string(), object);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.state().objects.get(path).cloned()
    }

    fn client(&self) -> Client {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let uri = request.uri().to_string();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (status, answer) = api.answer(Call { method, uri, body });
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        Client::new(service, "default")
    }

    fn answer(&self, call: Call) -> (u16, Value) {
        let mut state = self.state();
        state.calls.push(call.clone());
        let path = call.path().to_string();
        let failure = state
            .failures
            .iter()
            .position(|(m, suffix, _)| *m == call.method && path.ends_with(suffix.as_str()));
        if let Some(index) = failure {
            let (_, _, code) = state.failures.remove(index);
            return (code, status_body(code, "injected failure"));
        }
        let not_found = (404, status_body(404, "not found"));
        match call.method {
            Method::PATCH if path.ends_with("/status") => {
                let object_path = path.trim_end_matches("/status");
                let Some(object) = state.objects.get_mut(object_path) else {
                    return not_found;
                };
                object["status"] = call.body["status"].clone();
                (200, object.clone())
            }
            // Server-side apply and strategic merge, approximated as a JSON merge: what the
            // patch sets wins, what it leaves out (a Deployment's status) stays.
            Method::PATCH => {
                let object = state.objects.entry(path).or_insert_with(|| json!({}));
                merge(object, &call.body);
                (200, object.clone())
            }
            // Watches are not served: watchers back off and the caches keep their list.
            Method::GET if call.uri.contains("watch=true") => {
                (500, status_body(500, "no watches here"))
            }
            Method::GET => match state.objects.get(&path) {
                Some(object) => (200, object.clone()),
                None => not_found,
            },
            Method::DELETE => match state.objects.remove(&path) {
                Some(_) => (200, status_body(200, "deleted")),
                None => not_found,
            },
            // Creates (Events, the Lease): stored under their name.
            Method::POST => {
                let name = call.body["metadata"]["name"].as_str().unwrap_or("event");
                let mut object = call.body.clone();
                object["metadata"]["resourceVersion"] = json!("1");
                state
                    .objects
                    .insert(format!("{path}/{name}"), object.clone());
                (201, object)
            }
            _ => (405, status_body(405, "unexpected")),
        }
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn status_body(code: u16, message: &str) -> Value {
    let reason = StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
        .replace(' ', "");
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": if code < 300 { "Success" } else { "Failure" },
           "message": message, "reason": reason, "code": code})
}

const TOOL_PATH: &str = "/apis/toolwarden.dev/v1alpha1/namespaces/agents/agenttools/execute-code";
const DEPLOYMENT_PATH: &str = "/apis/apps/v1/namespaces/agents/deployments/execute-code";

/// A controller context on the fake API, with stores the test can change.
struct Harness {
    api: FakeApi,
    ctx: Arc<Context>,
    namespaces: Writer<Namespace>,
    policies: Writer<ToolPolicy>,
    owned: OwnedWriters,
    /// What the watch of runner pods would have seen.
    pods: Writer<Pod>,
}

/// What the controller's watches of optional children would have seen.
struct OwnedWriters {
    service_accounts: Writer<PartialObjectMeta<ServiceAccount>>,
    roles: Writer<PartialObjectMeta<Role>>,
    role_bindings: Writer<PartialObjectMeta<RoleBinding>>,
    pdbs: Writer<PartialObjectMeta<PodDisruptionBudget>>,
}

impl Harness {
    fn new() -> Harness {
        let api = FakeApi::default();
        let client = api.client();
        let (namespace_store, mut namespaces) = reflector::store();
        let (policy_store, policies) = reflector::store();
        namespaces.apply_watcher_event(&watcher::Event::Apply(namespace(&[("team", "a")])));
        let (service_accounts, sa_writer) = reflector::store();
        let (roles, role_writer) = reflector::store();
        let (role_bindings, binding_writer) = reflector::store();
        let (pdbs, pdb_writer) = reflector::store();
        let (runner_pods, pods) = reflector::store();
        // Caches the tests leave empty: every child then costs a metadata read.
        let owned = OwnedStores {
            service_accounts,
            roles,
            role_bindings,
            config_maps: reflector::store().0,
            deployments: reflector::store().0,
            services: reflector::store().0,
            network_policies: reflector::store().0,
            pdbs,
        };
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "toolwarden-controller".into(),
                instance: None,
            },
        );
        let ctx = Context::new(
            client,
            Settings {
                runner_image: "ghcr.io/toolwarden/toolwarden:test".into(),
                api_server: vec![ApiServerEndpoint {
                    ip: [10, 0, 0, 1].into(),
                    port: 6443,
                }],
                tool_rootfs: ToolRootfs::default(),
            },
            Stores {
                namespaces: namespace_store,
                policies: policy_store,
            },
            owned,
            Arc::new(Metrics::default()),
            recorder,
        )
        .with_runner_pods(runner_pods);
        Harness {
            api,
            ctx: Arc::new(ctx),
            pods,
            namespaces,
            policies,
            owned: OwnedWriters {
                service_accounts: sa_writer,
                roles: role_writer,
                role_bindings: binding_writer,
                pdbs: pdb_writer,
            },
        }
    }

    /// Feeds every object the fake holds of kind K at `paths` to the matching watch.
    fn watched<K: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> watcher::Event<PartialObjectMeta<K>> {
        let object = self
            .api
            .get(path)
            .unwrap_or_else(|| panic!("{path} was applied"));
        watcher::Event::Apply(serde_json::from_value(object).unwrap())
    }

    /// The tool as the API server holds it (status included).
    fn tool(&self) -> AgentTool {
        serde_json::from_value(self.api.get(TOOL_PATH).expect("the tool exists")).unwrap()
    }

    fn create(&self, tool: &AgentTool) {
        self.api.put(TOOL_PATH, serde_json::to_value(tool).unwrap());
    }

    async fn reconcile(&self) -> Result<Action, ReconcileError> {
        reconcile(Arc::new(self.tool()), Arc::clone(&self.ctx)).await
    }

    fn status(&self) -> AgentToolStatus {
        self.tool().status.unwrap_or_default()
    }

    fn deployment(&self) -> Value {
        self.api.get(DEPLOYMENT_PATH).expect("a Deployment")
    }

    fn set_policy(&mut self, policy: ToolPolicy) {
        self.policies
            .apply_watcher_event(&watcher::Event::Apply(policy));
    }
}

fn namespace(labels: &[(&str, &str)]) -> Namespace {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    serde_json::from_value(json!({"metadata": {"name": "agents", "labels": labels}})).unwrap()
}

fn example_tool() -> AgentTool {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/execute-code.yaml");
    let mut tool: AgentTool =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    tool.metadata.uid = Some("uid-1".into());
    tool.metadata.generation = Some(1);
    tool
}

/// Demands a timeout and a process limit below execute-code's (1000 ms, 16), for tools in
/// namespaces labelled `team: a`.
fn strict_policy(mode: &str) -> ToolPolicy {
    serde_yaml::from_str(&format!(
        "apiVersion: toolwarden.dev/v1alpha1\nkind: ToolPolicy\nmetadata: {{name: strict}}\n\
         spec:\n  mode: {mode}\n  namespaceSelector: {{matchLabels: {{team: a}}}}\n  \
         rules: {{sandboxing: {{maxTimeoutMs: 500, maxPids: 8}}}}\n"
    ))
    .unwrap()
}

fn condition<'a>(status: &'a AgentToolStatus, type_: &str) -> (&'a str, &'a str, &'a str) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

fn applied_kinds(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.method == Method::PATCH && !c.path().ends_with("/status"))
        .map(|c| c.body["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn events(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| c.method == Method::POST && c.path().ends_with("/events"))
        .map(|c| {
            (
                c.body["type"].as_str().unwrap_or_default().to_string(),
                c.body["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn replicas(deployment: &Value) -> i64 {
    deployment["spec"]["replicas"].as_i64().unwrap()
}

#[tokio::test]
async fn a_new_tool_gets_every_child_by_server_side_apply_and_a_status() {
    let h = Harness::new();
    h.create(&example_tool());
    let action = h.reconcile().await.expect("reconciled");
    assert_eq!(action, Action::requeue(Duration::from_secs(600)));
    let calls = h.api.take_calls();
    assert_eq!(
        applied_kinds(&calls),
        [
            "ServiceAccount",
            "ConfigMap",
            "Deployment",
            "Service",
            "NetworkPolicy"
        ]
    );
    for apply in calls.iter().filter(|c| c.method == Method::PATCH) {
        assert!(
            apply.uri.contains("fieldManager=toolwarden-controller")
                && apply.uri.contains("force=true"),
            "{}",
            apply.uri
        );
    }
    // Nothing optional existed, so nothing was deleted.
    assert!(
        calls.iter().all(|c| c.method != Method::DELETE),
        "{calls:?}"
    );
    let status = h.status();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(condition(&status, "Ready").1, "RunnersNotReady");
    assert_eq!(condition(&status, "PolicyCompliant").0, "True");
    assert_eq!(condition(&status, "Degraded").0, "False");
    assert_eq!(
        status.endpoints["rest"],
        "http://execute-code.agents.svc:8080/v1/tools/execute-code/invoke"
    );
    assert_eq!(status.isolation["rootfs"], "imageVolume");
    assert!(
        events(&calls).contains(&("Normal".into(), "Created".into())),
        "{calls:?}"
    );

    // The runner pods become ready: the next reconcile reports it, once.
    let mut deployment = h.deployment();
    deployment["status"] = json!({"readyReplicas": 1, "replicas": 1});
    h.api.put(DEPLOYMENT_PATH, deployment);
    h.reconcile().await.unwrap();
    assert_eq!(
        condition(&h.status(), "Ready"),
        ("True", "RunnersReady", "1 of 1 runner pods ready")
    );
    h.api.take_calls();
    h.reconcile().await.unwrap();
    let calls = h.api.take_calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.path().ends_with("/status") || c.method == Method::POST),
        "an unchanged status is not rewritten and raises no Event: {calls:?}"
    );
}

#[tokio::test]
async fn an_updated_spec_rolls_the_pods_and_reports_the_new_generation() {
    let h = Harness::new();
    h.create(&example_tool());
    h.reconcile().await.unwrap();
    let hash = |d: &Value| {
        d["spec"]["template"]["metadata"]["annotations"]["toolwarden.dev/config-hash"].clone()
    };
    let before = hash(&h.deployment());
    let mut tool = h.tool();
    tool.spec.sandbox.timeout_ms = 2000;
    tool.metadata.generation = Some(2);
    h.create(&tool);
    h.api.take_calls();
    h.reconcile().await.unwrap();
    assert_ne!(
        hash(&h.deployment()),
        before,
        "a changed tool rolls the pods"
    );
    assert_eq!(h.status().observed_generation, Some(2));
    assert!(events(&h.api.take_calls()).contains(&("Normal".into(), "Updated".into())));
}

/// A runner pod of the current rollout: controlled by a ReplicaSet of the tool's
/// Deployment, with its pod template's config hash, and these container statuses.
fn runner_pod(deployment: &Value, container_statuses: Value) -> Pod {
    let template = &deployment["spec"]["template"]["metadata"];
    serde_json::from_value(json!({
        "metadata": {
            "name": "execute-code-6c9f7d8b4-x2x7q", "namespace": "agents",
            "labels": template["labels"], "annotations": template["annotations"],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "execute-code-6c9f7d8b4", "uid": "rs-1", "controller": true}],
        },
        "status": {"phase": "Running", "containerStatuses": container_statuses},
    }))
    .unwrap()
}

/// The image lacks /proc and /tmp: the runner writes why into its termination message and
/// exits; the pod's status reaches the tool's conditions through the pod watch, and once
/// the pod runs (a fixed image) the conditions clear.
#[tokio::test]
async fn a_runner_pod_refusing_an_image_without_mount_points_makes_the_tool_degraded() {
    let mut h = Harness::new();
    h.create(&example_tool());
    h.reconcile().await.unwrap();
    let refusal = "ImageLacksMountPoints: tool execute-code (/etc/toolwarden/tools/\
        execute-code.yaml): spec.runtime.image: image docker.io/library/busybox:1.36.1 (image \
        volume /var/lib/toolwarden/image-volumes/docker.io_library_busybox_1.36.1) lacks the \
        mount point(s) /proc, /tmp: an image volume is read-only, so the image itself must \
        contain these empty directories";
    let refused = runner_pod(
        &h.deployment(),
        json!([{"name": "runner", "image": "ghcr.io/toolwarden/toolwarden:test", "imageID": "",
            "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff",
                "message": "back-off 1m20s restarting failed container=runner"}},
            "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "message": refusal}}}]),
    );
    h.pods
        .apply_watcher_event(&watcher::Event::Apply(refused.clone()));
    h.api.take_calls();
    h.reconcile().await.unwrap();
    let calls = h.api.take_calls();
    let patch = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path() == format!("{TOOL_PATH}/status"))
        .expect("the status is patched");
    let patched: AgentToolStatus = serde_json::from_value(patch.body["status"].clone()).unwrap();
    for type_ in ["Ready", "Degraded"] {
        let (status, reason, message) = condition(&patched, type_);
        let expected = if type_ == "Ready" { "False" } else { "True" };
        assert_eq!((status, reason), (expected, "ImageLacksMountPoints"));
        assert!(
            message.starts_with("runner pod execute-code-6c9f7d8b4-x2x7q refuses to start")
                && message.contains("lacks the mount point(s) /proc, /tmp"),
            "{message}"
        );
    }
    assert_eq!(condition(&patched, "PolicyCompliant").0, "True");
    assert_eq!(patched.isolation["rootfs"], "imageVolume");
    assert!(
        events(&calls).contains(&("Warning".into(), "ImageLacksMountPoints".into())),
        "{calls:?}"
    );

    // The same pod, from a rollout the tool no longer has, is not the tool's story.
    let mut stale = refused;
    stale
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("toolwarden.dev/config-hash".into(), "an-older-one".into());
    h.pods.apply_watcher_event(&watcher::Event::Apply(stale));
    h.reconcile().await.unwrap();
    assert_eq!(
        condition(&h.status(), "Degraded"),
        ("False", "AsExpected", "every child applied")
    );
    assert_eq!(condition(&h.status(), "Ready").1, "RunnersNotReady");
}

#[tokio::test]
async fn a_hand_edited_deployment_is_put_back() {
    let h = Harness::new();
    h.create(&example_tool());
    h.reconcile().await.unwrap();
    let desired = h.deployment();
    // Someone widens the pod: a host capability, privilege, more replicas.
    let mut edited = desired.clone();
    let context = &mut edited["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    context["privileged"] = json!(true);
    context["capabilities"]["add"] = json!(["SYS_ADMIN", "NET_ADMIN", "SYS_MODULE"]);
    edited["spec"]["replicas"] = json!(5);
    h.api.put(DEPLOYMENT_PATH, edited);
    h.reconcile().await.unwrap();
    assert_eq!(h.deployment()["spec"], desired["spec"]);
}

#[tokio::test]
async fn an_enforcing_policy_scales_the_tool_to_zero_naming_the_rule_and_warn_brings_it_back() {
    let mut h = Harness::new();
    h.create(&example_tool());
    h.reconcile().await.unwrap();
    assert_eq!(replicas(&h.deployment()), 1);
    h.api.take_calls();

    h.set_policy(strict_policy("enforce"));
    h.reconcile().await.unwrap();
    assert_eq!(
        replicas(&h.deployment()),
        0,
        "an enforced violation leaves no runner pod"
    );
    let status = h.status();
    let (compliant, reason, message) = condition(&status, "PolicyCompliant");
    assert_eq!((compliant, reason), ("False", "PolicyDenied"));
    // Every broken rule is named, with its path and the policy that demands it.
    for path in ["spec.sandbox.timeoutMs", "spec.sandbox.pids"] {
        assert!(message.contains(path), "{path} in {message}");
    }
    assert_eq!(message.matches("TW-SANDBOX-").count(), 2, "{message}");
    assert_eq!(
        message.matches("(policy strict, enforce)").count(),
        2,
        "{message}"
    );
    assert_eq!(condition(&status, "Ready").1, "PolicyDenied");
    assert!(events(&h.api.take_calls()).contains(&("Warning".into(), "PolicyDenied".into())));

    h.set_policy(strict_policy("warn"));
    h.reconcile().await.unwrap();
    assert_eq!(replicas(&h.deployment()), 1, "warn reconciles and reports");
    let status = h.status();
    assert_eq!(condition(&status, "PolicyCompliant").1, "PolicyWarnings");
    assert_eq!(condition(&status, "Ready").1, "RunnersNotReady");
}

#[tokio::test]
async fn a_namespace_relabel_changes_which_policies_apply() {
    let mut h = Harness::new();
    h.set_policy(strict_policy("enforce"));
    h.create(&example_tool());
    h.reconcile().await.unwrap();
    assert_eq!(replicas(&h.deployment()), 0);
    // The namespace leaves team a: the policy no longer selects the tool.
    h.namespaces
        .apply_watcher_event(&watcher::Event::Apply(namespace(&[("team", "b")])));
    h.reconcile().await.unwrap();
    assert_eq!(replicas(&h.deployment()), 1);
    assert_eq!(condition(&h.status(), "PolicyCompliant").0, "True");
}

#[tokio::test]
async fn a_transient_api_error_is_retried_with_growing_backoff() {
    let h = Harness::new();
    h.create(&example_tool());
    h.api
        .fail_next(Method::PATCH, "/deployments/execute-code", 500);
    let error = h.reconcile().await.expect_err("the apply failed");
    assert_eq!(error.reason(), "ApplyFailed");
    let tool = Arc::new(h.tool());
    let first = error_policy(Arc::clone(&tool), &error, Arc::clone(&h.ctx));
    let second = error_policy(Arc::clone(&tool), &error, Arc::clone(&h.ctx));
    assert_eq!(first, Action::requeue(Duration::from_secs(1)));
    assert_eq!(second, Action::requeue(Duration::from_secs(2)));
    assert_eq!(backoff(30), Duration::from_secs(300));
    assert!(
        h.ctx
            .metrics
            .encode()
            .contains("toolwarden_controller_reconcile_errors_total{reason=\"ApplyFailed\"} 1"),
        "{}",
        h.ctx.metrics.encode()
    );
    // The retry succeeds and resets the backoff.
    h.reconcile().await.expect("the retry applies");
    assert_eq!(replicas(&h.deployment()), 1);
    assert_eq!(
        error_policy(tool, &error, Arc::clone(&h.ctx)),
        Action::requeue(Duration::from_secs(1))
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_once_and_waits_for_a_change() {
    let h = Harness::new();
    let mut tool = example_tool();
    tool.spec.permissions.filesystem =
        vec![serde_json::from_value(json!({"mountPath": "/host", "hostPath": "/etc"})).unwrap()];
    h.create(&tool);
    let action = h.reconcile().await.expect("a refusal is not an error");
    assert_eq!(action, Action::await_change(), "no hot loop");
    let calls = h.api.take_calls();
    assert!(
        applied_kinds(&calls).is_empty(),
        "nothing deployed: {calls:?}"
    );
    let status = h.status();
    let (ready, reason, message) = condition(&status, "Ready");
    assert_eq!((ready, reason), ("False", "HostPathUnsupported"));
    assert!(message.contains("filesystem[0].hostPath"), "{message}");
    assert_eq!(condition(&status, "Degraded").0, "True");
    assert!(events(&calls).contains(&("Warning".into(), "HostPathUnsupported".into())));
    // Reconciled again (a resync), it makes no request at all.
    h.reconcile().await.unwrap();
    assert!(h.api.take_calls().is_empty());
}

#[tokio::test]
async fn a_missing_secret_is_reported_and_looked_up_again_later() {
    let h = Harness::new();
    let mut tool = example_tool();
    tool.spec.secrets = vec![
        serde_json::from_value(json!({"secretName": "keys", "key": "k", "file": "/run/k"}))
            .unwrap(),
    ];
    h.create(&tool);
    let action = h.reconcile().await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    assert_eq!(condition(&h.status(), "Ready").1, "MissingReference");
    h.api.put(
        "/api/v1/namespaces/agents/secrets/keys",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": "agents"}}),
    );
    h.reconcile().await.unwrap();
    assert_eq!(condition(&h.status(), "Degraded").0, "False");
    assert_eq!(replicas(&h.deployment()), 1);
}

#[tokio::test]
async fn optional_children_a_tool_no_longer_needs_are_deleted() {
    let h = Harness::new();
    let mut tool = example_tool();
    tool.spec.serving.replicas = 2;
    tool.spec.permissions.kubernetes = vec![
        serde_json::from_value(
            json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}),
        )
        .unwrap(),
    ];
    h.create(&tool);
    h.reconcile().await.unwrap();
    let calls = h.api.take_calls();
    let kinds = applied_kinds(&calls);
    for kind in ["Role", "RoleBinding", "PodDisruptionBudget"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    // The watches see them, then the tool drops its permissions and extra replicas.
    let ns = "/apis/rbac.authorization.k8s.io/v1/namespaces/agents";
    let sa: watcher::Event<PartialObjectMeta<ServiceAccount>> =
        h.watched("/api/v1/namespaces/agents/serviceaccounts/execute-code-tool");
    let role: watcher::Event<PartialObjectMeta<Role>> =
        h.watched(&format!("{ns}/roles/execute-code-tool"));
    let token_role: watcher::Event<PartialObjectMeta<Role>> =
        h.watched(&format!("{ns}/roles/execute-code-token"));
    let binding: watcher::Event<PartialObjectMeta<RoleBinding>> =
        h.watched(&format!("{ns}/rolebindings/execute-code-tool"));
    let pdb: watcher::Event<PartialObjectMeta<PodDisruptionBudget>> =
        h.watched("/apis/policy/v1/namespaces/agents/poddisruptionbudgets/execute-code");
    let mut h = h;
    h.owned.service_accounts.apply_watcher_event(&sa);
    h.owned.roles.apply_watcher_event(&role);
    h.owned.roles.apply_watcher_event(&token_role);
    h.owned.role_bindings.apply_watcher_event(&binding);
    h.owned.pdbs.apply_watcher_event(&pdb);
    let mut tool = h.tool();
    tool.spec.serving.replicas = 1;
    tool.spec.permissions.kubernetes.clear();
    h.create(&tool);
    h.reconcile().await.unwrap();
    let deleted: Vec<String> = h
        .api
        .take_calls()
        .iter()
        .filter(|c| c.method == Method::DELETE)
        .map(|c| {
            c.path()
                .rsplit_once("/namespaces/agents/")
                .unwrap()
                .1
                .to_string()
        })
        .collect();
    assert_eq!(
        deleted,
        [
            "serviceaccounts/execute-code-tool",
            "rolebindings/execute-code-tool",
            "roles/execute-code-tool",
            "roles/execute-code-token",
            "poddisruptionbudgets/execute-code",
        ],
        "the token binding the watch did not see is left alone; the rest are collected"
    );
}

#[tokio::test]
async fn health_metrics_and_readiness_are_served_and_shutdown_is_graceful() {
    let api = FakeApi::default();
    let client = api.client();
    let empty_list = |kind: &str, api_version: &str| json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []});
    api.put(
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {},
               "items": [{"metadata": {"name": "kubernetes"}, "addressType": "IPv4",
                          "endpoints": [{"addresses": ["192.0.2.10"], "conditions": {"ready": true}}],
                          "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}]}),
    );
    let options = super::run::Options {
        settings: Settings {
            runner_image: "ghcr.io/toolwarden/toolwarden:test".into(),
            api_server: Vec::new(),
            tool_rootfs: ToolRootfs::default(),
        },
        namespaces: vec!["agents".into()],
        lease: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(super::run::run(client, options, listener, async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let request = http.get(format!("{base}{path}"));
        async move {
            let response = request.send().await.ok()?;
            Some((response.status().as_u16(), response.text().await.ok()?))
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let health = loop {
        if let Some(answer) = get("/healthz").await {
            break answer;
        }
        assert!(std::time::Instant::now() < deadline, "no /healthz");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health.0, 200);
    // The caches have not listed anything: not ready.
    assert_eq!(get("/readyz").await.unwrap().0, 503);
    let (status, metrics) = get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("toolwarden_controller_reconcile_duration_seconds"),
        "{metrics}"
    );
    // Once namespaces and ToolPolicies are listed, the controller is ready.
    api.put("/api/v1/namespaces", empty_list("NamespaceList", "v1"));
    api.put(
        "/apis/toolwarden.dev/v1alpha1/toolpolicies",
        empty_list("ToolPolicyList", "toolwarden.dev/v1alpha1"),
    );
    api.put(
        "/apis/toolwarden.dev/v1alpha1/namespaces/agents/agenttools",
        empty_list("AgentToolList", "toolwarden.dev/v1alpha1"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get("/readyz").await.map(|r| r.0) != Some(200) {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(()).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), controller)
        .await
        .expect("stops on the shutdown signal");
    stopped.unwrap().expect("a clean stop");
}

#[tokio::test]
async fn a_cluster_without_api_server_endpoints_is_refused_at_start() {
    let api = FakeApi::default();
    api.put(
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {}, "items": []}),
    );
    let error = super::run::api_server_endpoints(&api.client())
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "NoApiServerEndpoint");
}

#[tokio::test]
async fn the_controller_reads_and_writes_nothing_before_it_holds_the_lease_and_releases_it() {
    let api = FakeApi::default();
    api.put(
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {},
               "items": [{"metadata": {"name": "kubernetes"}, "addressType": "IPv4",
                          "endpoints": [{"addresses": ["192.0.2.10"]}],
                          "ports": [{"port": 6443}]}]}),
    );
    api.put(
        "/apis/toolwarden.dev/v1alpha1/namespaces/agents/agenttools",
        json!({"apiVersion": "toolwarden.dev/v1alpha1", "kind": "AgentToolList",
               "metadata": {"resourceVersion": "1"}, "items": []}),
    );
    // Another replica holds the Lease for two more seconds.
    let lease_path =
        "/apis/coordination.k8s.io/v1/namespaces/toolwarden/leases/toolwarden-controller";
    let now = jiff::Timestamp::now().to_string();
    api.put(
        lease_path,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "toolwarden-controller", "namespace": "toolwarden", "resourceVersion": "1"},
               "spec": {"holderIdentity": "replica-b", "leaseDurationSeconds": 2,
                        "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}),
    );
    let options = super::run::Options {
        settings: Settings {
            runner_image: "ghcr.io/toolwarden/toolwarden:test".into(),
            api_server: Vec::new(),
            tool_rootfs: ToolRootfs::default(),
        },
        namespaces: vec!["agents".into()],
        lease: Some(super::run::LeaseOptions {
            namespace: "toolwarden".into(),
            name: "toolwarden-controller".into(),
            identity: "replica-a".into(),
        }),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(super::run::run(api.client(), options, listener, async {
        let _ = stopped.await;
    }));
    let holder = |api: &FakeApi| {
        api.get(lease_path)
            .and_then(|lease| lease["spec"]["holderIdentity"].as_str().map(String::from))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = match reqwest::get(&metrics_url).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if metrics.contains("\ntoolwarden_controller_leader 1\n") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never led: lease {:?}",
            api.get(lease_path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder(&api).as_deref(), Some("replica-a"));
    // Nothing of the cluster was touched before the Lease was taken over.
    let calls = api.state().calls.clone();
    let took_over = calls
        .iter()
        .position(|c| c.method == Method::PATCH && c.body.to_string().contains("replica-a"))
        .expect("a Lease update naming replica-a");
    let first_watch = calls
        .iter()
        .position(|c| c.path().ends_with("/toolpolicies") || c.path().ends_with("/namespaces"))
        .expect("leading, it watches ToolPolicies and Namespaces");
    assert!(
        took_over < first_watch,
        "read the cluster before leading: {calls:#?}"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), controller)
        .await
        .expect("stops")
        .unwrap()
        .expect("a clean stop");
    assert_ne!(
        holder(&api).as_deref(),
        Some("replica-a"),
        "the Lease is released on shutdown"
    );
}

#[tokio::test]
async fn an_object_of_someone_elses_under_a_childs_name_is_never_taken_over() {
    let h = Harness::new();
    // The namespace already has a ServiceAccount named like the tool, not the tool's.
    let theirs = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": "execute-code", "namespace": "agents", "uid": "theirs"}});
    let path = "/api/v1/namespaces/agents/serviceaccounts/execute-code";
    h.api.put(path, theirs.clone());
    h.create(&example_tool());
    let action = h.reconcile().await.expect("a refusal, not an error");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let calls = h.api.take_calls();
    assert!(
        applied_kinds(&calls).is_empty(),
        "nothing written: {calls:?}"
    );
    assert_eq!(
        h.api.get(path),
        Some(theirs),
        "their ServiceAccount is untouched"
    );
    let status = h.status();
    let (degraded, reason, message) = condition(&status, "Degraded");
    assert_eq!((degraded, reason), ("True", "NameConflict"));
    assert!(message.contains("ServiceAccount execute-code"), "{message}");
    // The same name, controlled by the tool (as the controller left it), is applied.
    let mut ours = h.api.get(path).unwrap();
    ours["metadata"]["ownerReferences"] = json!([{"apiVersion": "toolwarden.dev/v1alpha1",
        "kind": "AgentTool", "name": "execute-code", "uid": "uid-1", "controller": true}]);
    h.api.put(path, ours);
    h.reconcile().await.unwrap();
    assert_eq!(condition(&h.status(), "Degraded").0, "False");
}

/// `violatingTools` on the fake API server: counted from the stores, written once per
/// change (not again while it holds), lowered when the tool is fixed or deleted, and a
/// failed write is tried again on the next look.
#[tokio::test]
async fn each_policy_status_counts_the_tools_that_break_it() {
    const POLICY_PATH: &str = "/apis/toolwarden.dev/v1alpha1/toolpolicies/strict";
    let mut h = Harness::new();
    let mut policy = strict_policy("warn");
    policy.metadata.generation = Some(2);
    h.api
        .put(POLICY_PATH, serde_json::to_value(&policy).unwrap());
    h.set_policy(policy);
    let (tools, mut tool_writer) = reflector::store::<AgentTool>();
    let breaking = example_tool();
    tool_writer.apply_watcher_event(&watcher::Event::Apply(breaking.clone()));
    let mut counter = super::policy_status::Counter::default();
    let (client, stores) = (h.ctx.client.clone(), h.ctx.stores.clone());
    let tool_stores = [tools];
    let mut look = async || {
        counter
            .update(&client, &stores.policies, &stores.namespaces, &tool_stores)
            .await;
    };
    let status_writes = |api: &FakeApi| -> Vec<Value> {
        api.take_calls()
            .into_iter()
            .filter(|c| c.method == Method::PATCH && c.path() == format!("{POLICY_PATH}/status"))
            .map(|c| c.body["status"].clone())
            .collect()
    };
    // The watch brings the written status back into the policy store.
    let observe = |h: &mut Harness| {
        let stored: ToolPolicy = serde_json::from_value(h.api.get(POLICY_PATH).unwrap()).unwrap();
        h.set_policy(stored);
    };

    look().await;
    assert_eq!(
        status_writes(&h.api),
        [json!({"observedGeneration": 2, "violatingTools": 1})]
    );
    observe(&mut h);
    look().await;
    assert_eq!(
        status_writes(&h.api),
        Vec::<Value>::new(),
        "nothing changed"
    );

    // Fixed: within the policy's limits, it no longer counts.
    let mut fixed = breaking.clone();
    fixed.spec.sandbox.timeout_ms = 100;
    fixed.spec.sandbox.pids = 4;
    fixed.metadata.resource_version = Some("2".into());
    tool_writer.apply_watcher_event(&watcher::Event::Apply(fixed));
    h.api
        .fail_next(Method::PATCH, "/toolpolicies/strict/status", 500);
    look().await;
    assert_eq!(
        h.api.get(POLICY_PATH).unwrap()["status"]["violatingTools"],
        1,
        "the injected failure kept the old count"
    );
    h.api.take_calls();
    look().await;
    assert_eq!(
        status_writes(&h.api),
        [json!({"observedGeneration": 2, "violatingTools": 0})],
        "the failed write is tried again"
    );
    observe(&mut h);

    // Broken again, then deleted.
    tool_writer.apply_watcher_event(&watcher::Event::Apply(breaking.clone()));
    look().await;
    assert_eq!(status_writes(&h.api)[0]["violatingTools"], 1);
    observe(&mut h);
    tool_writer.apply_watcher_event(&watcher::Event::Delete(breaking));
    look().await;
    assert_eq!(status_writes(&h.api)[0]["violatingTools"], 0);
}

/// The runners' TokenReview binding on the fake API server: the controller fills in
/// the subjects the install leaves out, writes nothing while they hold, puts them back
/// after an upgrade empties them, follows tools coming and going, and reports a
/// missing binding or a failed write with its reason (tried again on the next look).
#[tokio::test]
async fn every_runner_may_review_tokens_through_the_one_binding_the_controller_keeps() {
    use super::runner_token_review::{TOKEN_REVIEW_ROLE, TokenReviewBindingError, subjects, sync};
    let binding_path =
        format!("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{TOKEN_REVIEW_ROLE}");
    let installed = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": TOKEN_REVIEW_ROLE, "resourceVersion": "7"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": TOKEN_REVIEW_ROLE},
    });
    let h = Harness::new();
    let client = h.ctx.client.clone();
    let mut tools = vec![example_tool()];
    let writes = |api: &FakeApi| -> Vec<Value> {
        api.take_calls()
            .into_iter()
            .filter(|c| c.method == Method::PATCH && c.path() == binding_path)
            .map(|c| {
                // Written only on the condition that the binding is as it was read.
                assert_eq!(c.body["metadata"]["resourceVersion"], "7", "{}", c.body);
                c.body["subjects"].clone()
            })
            .collect()
    };

    let missing = sync(&client, &[], &subjects(&tools)).await.unwrap_err();
    assert!(
        matches!(missing, TokenReviewBindingError::Missing),
        "{missing}"
    );
    assert_eq!(missing.reason(), "TokenReviewBindingMissing");
    assert_eq!(writes(&h.api), Vec::<Value>::new(), "nothing is created");

    h.api.put(&binding_path, installed.clone());
    assert!(sync(&client, &[], &subjects(&tools)).await.unwrap());
    let execute_code =
        json!({"kind": "ServiceAccount", "name": "execute-code", "namespace": "agents"});
    assert_eq!(writes(&h.api), [json!([execute_code])]);
    assert!(!sync(&client, &[], &subjects(&tools)).await.unwrap());
    assert_eq!(writes(&h.api), Vec::<Value>::new(), "nothing changed");

    // `helm upgrade` re-applies the binding without subjects: they are put back.
    h.api.put(&binding_path, installed);
    assert!(sync(&client, &[], &subjects(&tools)).await.unwrap());
    assert_eq!(writes(&h.api), [json!([execute_code])]);

    // A second tool joins; a failed write is reported and tried again.
    let mut search = example_tool();
    search.metadata.name = Some("search".into());
    search.metadata.namespace = Some("team-b".into());
    tools.push(search);
    h.api.fail_next(
        Method::PATCH,
        "/clusterrolebindings/toolwarden-runner-token-review",
        500,
    );
    let failed = sync(&client, &[], &subjects(&tools)).await.unwrap_err();
    assert_eq!(failed.reason(), "TokenReviewBindingUpdateFailed");
    h.api.take_calls();
    assert!(sync(&client, &[], &subjects(&tools)).await.unwrap());
    let search_sa = json!({"kind": "ServiceAccount", "name": "search", "namespace": "team-b"});
    assert_eq!(writes(&h.api), [json!([execute_code, search_sa])]);

    // The first tool is deleted: its runner loses the permission.
    tools.remove(0);
    assert!(sync(&client, &[], &subjects(&tools)).await.unwrap());
    assert_eq!(writes(&h.api), [json!([search_sa])]);
}
