//! AdmissionReview bodies as the API server sends them, and the example
//! objects, for the webhook tests, fuzz seeds and benchmarks.
#![allow(dead_code)]

use std::path::Path;

use k8s_openapi::api::core::v1::Namespace;
use serde_json::{Value, json};
use toolwarden::api::manifest::Manifests;
use toolwarden::api::{AgentTool, ToolPolicy};
use toolwarden::webhook::{Admission, ClusterView, Config};

pub const NAMESPACE: &str = "agents";
pub const RELEASE_NAMESPACE: &str = "toolwarden";
/// The uid of every request [`Request::body`] builds.
pub const REQUEST_UID: &str = "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4";
pub const CONTROLLER_USER: &str = "system:serviceaccount:toolwarden:toolwarden-controller";

/// A namespace with the labels the API server and its owner set.
pub fn namespace(name: &str, labels: Value) -> Namespace {
    let mut all = json!({"kubernetes.io/metadata.name": name});
    all.as_object_mut()
        .unwrap()
        .extend(labels.as_object().cloned().unwrap_or_default());
    serde_json::from_value(json!({"metadata": {"name": name, "labels": all}})).unwrap()
}

pub fn admission(policies: Vec<ToolPolicy>, tools: Vec<AgentTool>) -> Admission {
    let namespaces = vec![
        namespace(NAMESPACE, json!({"team": "agents"})),
        namespace(RELEASE_NAMESPACE, json!({})),
    ];
    Admission::new(
        Config::new(RELEASE_NAMESPACE, "toolwarden-controller"),
        ClusterView::from_objects(policies, namespaces, tools),
    )
}

/// Every AgentTool and ToolPolicy in a file or folder.
pub fn load(path: &str) -> Manifests {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    Manifests::load(&[path], false).unwrap()
}

pub fn example_tool(name: &str) -> AgentTool {
    load("examples")
        .tools
        .into_iter()
        .map(|t| t.object)
        .find(|t| t.metadata.name.as_deref() == Some(name))
        .unwrap()
}

/// What the API server adds to a stored object.
pub fn as_stored(object: &impl serde::Serialize, kind: &str, api_version: &str) -> Value {
    let mut value = serde_json::to_value(object).unwrap();
    value["kind"] = json!(kind);
    value["apiVersion"] = json!(api_version);
    value["metadata"]["uid"] = json!("5f1c1c4e-0000-4000-8000-000000000001");
    value["metadata"]["resourceVersion"] = json!("4242");
    value["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    value
}

/// Who makes a request.
#[derive(Clone, Copy)]
pub struct User<'a> {
    pub name: &'a str,
    pub groups: &'a [&'a str],
}

pub const ALICE: User = User {
    name: "alice@example.com",
    groups: &["system:authenticated", "developers"],
};

/// One AdmissionReview request body.
pub struct Request<'a> {
    pub group: &'a str,
    pub version: &'a str,
    pub kind: &'a str,
    pub resource: &'a str,
    pub sub_resource: Option<&'a str>,
    pub operation: &'a str,
    pub namespace: Option<&'a str>,
    pub name: String,
    pub object: Option<Value>,
    pub old_object: Option<Value>,
    pub user: User<'a>,
}

impl Request<'_> {
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.review()).unwrap()
    }

    pub fn review(&self) -> Value {
        let gvk = json!({"group": self.group, "version": self.version, "kind": self.kind});
        let gvr = json!({"group": self.group, "version": self.version, "resource": self.resource});
        let mut request = json!({
            "uid": REQUEST_UID,
            "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
            "name": self.name,
            "operation": self.operation,
            "userInfo": {"username": self.user.name, "uid": "u-1", "groups": self.user.groups},
            "object": self.object, "oldObject": self.old_object,
            "dryRun": false,
            "options": {"kind": format!("{}Options", title(self.operation)), "apiVersion": "meta.k8s.io/v1"},
        });
        if let Some(ns) = self.namespace {
            request["namespace"] = json!(ns);
        }
        if let Some(sub) = self.sub_resource {
            request["subResource"] = json!(sub);
            request["requestSubResource"] = json!(sub);
        }
        json!({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request})
    }
}

fn title(op: &str) -> String {
    let lower = op.to_lowercase();
    let mut chars = lower.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// An AgentTool create (or update, with the old object) by `user`.
pub fn tool_request<'a>(tool: &AgentTool, old: Option<&AgentTool>, user: User<'a>) -> Request<'a> {
    let stored = |t: &AgentTool| as_stored(t, "AgentTool", "toolwarden.dev/v1alpha1");
    Request {
        group: "toolwarden.dev",
        version: "v1alpha1",
        kind: "AgentTool",
        resource: "agenttools",
        sub_resource: None,
        operation: if old.is_some() { "UPDATE" } else { "CREATE" },
        namespace: Some(NAMESPACE),
        name: tool.metadata.name.clone().unwrap_or_default(),
        object: Some(stored(tool)),
        old_object: old.map(stored),
        user,
    }
}

/// The answer, as JSON.
pub fn answer(admission: &Admission, body: &[u8]) -> Value {
    let review = admission.review(body).expect("a well-formed review");
    let value = serde_json::to_value(review).unwrap();
    assert_eq!(value["apiVersion"], "admission.k8s.io/v1", "{value}");
    assert_eq!(value["kind"], "AdmissionReview", "{value}");
    assert_eq!(
        value["response"]["uid"], REQUEST_UID,
        "the response must echo the request's uid: {value}"
    );
    value["response"].clone()
}
