//! End to end against a real cluster: whatever `KUBECONFIG` (or the in-cluster
//! config) points at. Without one, every test prints why it skipped.
//!
//! Run: `cargo test --test e2e -- --nocapture`. Each test creates and deletes a
//! namespace of its own, `toolwarden-e2e-<test>-<pid>`; this one's objects are
//! only ever created with server-side dry run.

mod controller;
mod runner_call;
mod runner_pod;
mod webhook;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use toolwarden::api::manifest::Manifests;
use toolwarden::api::{AgentTool, SecretInjection, ToolPolicy};

/// A client for the configured cluster, or the reason there is none.
async fn cluster() -> Result<Client, String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes config ({e})"))?;
    client
        .apiserver_version()
        .await
        .map_err(|e| format!("the configured cluster does not answer ({e})"))?;
    Ok(client)
}

macro_rules! cluster_or_skip {
    () => {
        match cluster().await {
            Ok(client) => client,
            Err(why) => {
                eprintln!(
                    "SKIPPED {}: {why}; set KUBECONFIG to a Kubernetes 1.33+ cluster to run it",
                    module_path!()
                );
                return;
            }
        }
    };
}

/// A Ready, schedulable node's name, or why pods would stay Pending.
async fn ready_node(client: &Client) -> Result<String, String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing nodes: {e}"))?;
    let ready = list.items.into_iter().find(|n| {
        let schedulable = !n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        let is_ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        schedulable && is_ready
    });
    ready.and_then(|n| n.metadata.name).ok_or_else(|| {
        "the cluster has no Ready, schedulable node (pods would stay Pending)".into()
    })
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply("toolwarden-e2e").force();
    for crd in toolwarden::api::all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(60), established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not established within 60 s"))
            .unwrap();
    }
}

/// A namespace of one test: `<prefix>-<pid>`, a prefix per test, since the tests of this
/// binary run at once.
struct TestNamespace {
    api: Api<Namespace>,
    name: String,
}

impl TestNamespace {
    async fn create(client: &Client, prefix: &str) -> TestNamespace {
        let api: Api<Namespace> = Api::all(client.clone());
        let name = format!("{prefix}-{}", std::process::id());
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("creating the test namespace");
        TestNamespace { api, name }
    }

    async fn delete(self) {
        let _ = self.api.delete(&self.name, &DeleteParams::default()).await;
    }
}

fn examples() -> Manifests {
    Manifests::load(
        &[Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")],
        false,
    )
    .expect("examples load")
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

#[tokio::test]
async fn examples_are_accepted_and_cel_rules_are_enforced_by_the_api_server() {
    let client = cluster_or_skip!();
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "toolwarden-e2e-crd").await;
    let tools: Api<AgentTool> = Api::namespaced(client.clone(), &ns.name);
    let manifests = examples();

    for loaded in &manifests.tools {
        let mut tool = loaded.object.clone();
        tool.metadata.namespace = Some(ns.name.clone());
        tools
            .create(&dry_run(), &tool)
            .await
            .unwrap_or_else(|e| panic!("{}: rejected: {e}", loaded.origin));
    }
    let policies: Api<ToolPolicy> = Api::all(client.clone());
    for loaded in &manifests.policies {
        policies
            .create(&dry_run(), &loaded.object)
            .await
            .unwrap_or_else(|e| panic!("{}: rejected: {e}", loaded.origin));
    }

    let base = manifests
        .tools
        .iter()
        .find(|t| t.object.metadata.name.as_deref() == Some("api-call"))
        .unwrap()
        .object
        .clone();
    let mut cases: Vec<(&str, AgentTool)> = Vec::new();
    let mut two_deliveries = base.clone();
    two_deliveries.spec.secrets[0].env = Some("API_KEY".into());
    cases.push(("exactly one way", two_deliveries));
    let mut when_without_required = base.clone();
    when_without_required.spec.approval = Some(
        serde_json::from_value(serde_json::json!({"required": false, "when": "true"})).unwrap(),
    );
    cases.push((
        "approval.when needs approval.required",
        when_without_required,
    ));
    let mut not_object = base.clone();
    not_object.spec.input_schema = serde_json::json!({"type": "array"});
    cases.push(("spec.inputSchema.type", not_object));
    let mut two_sources = base.clone();
    two_sources.spec.permissions.filesystem = vec![
        serde_json::from_value(
            serde_json::json!({"mountPath": "/data", "emptyDir": {}, "hostPath": "/"}),
        )
        .unwrap(),
    ];
    cases.push(("exactly one source", two_sources));
    let mut timeout = base.clone();
    timeout.spec.sandbox.timeout_ms = 50;
    cases.push(("timeoutMs", timeout));
    let mut no_delivery = base;
    no_delivery.spec.secrets[0].inject = None::<SecretInjection>;
    cases.push(("exactly one way", no_delivery));

    for (expected, mut tool) in cases {
        tool.metadata.namespace = Some(ns.name.clone());
        match tools.create(&dry_run(), &tool).await {
            Ok(_) => panic!("the API server accepted a tool that breaks `{expected}`"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{status:?}");
                assert!(
                    status.message.contains(expected),
                    "expected `{expected}` in: {}",
                    status.message
                );
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    ns.delete().await;
}
