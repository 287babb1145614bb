//! Calls a runner pod as an in-cluster caller would, from outside the cluster: over a
//! port-forward to the pod (the API server's service proxy drops the `Authorization`
//! header the runner authenticates by) with a ServiceAccount token minted for the
//! runner's audience.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

/// The port runner pods serve REST and MCP on.
const RUNNER_PORT: u16 = 8080;

/// A 10-minute token of ServiceAccount `name` in `ns` (created if missing) for `audience`.
pub async fn caller_token(client: &Client, ns: &str, name: &str, audience: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    if let Err(e) = accounts.create(&PostParams::default(), &account).await {
        assert!(
            matches!(&e, kube::Error::Api(s) if s.code == 409),
            "creating ServiceAccount {name}: {e}"
        );
    }
    let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [audience], "expirationSeconds": 600}});
    let answer: TokenRequest = accounts
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for {name}: {e}"));
    answer.status.expect("TokenRequest status").token
}

/// The name of a Ready pod among those `selector` selects in `ns`.
pub async fn ready_pod(client: &Client, ns: &str, selector: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .ok()?;
    list.items
        .into_iter()
        .find(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|pod| pod.name_any())
}

/// One HTTP/1.1 request to runner pod `pod`, with `host` as the `Host` header (one of
/// the names the runner allows) and `token`, if any, as the bearer token. Returns the
/// status and the body (JSON, or the text as a JSON string).
pub async fn request(
    client: &Client,
    (ns, pod, host): (&str, &str, &str),
    (method, path, body): (&str, &str, Option<Value>),
    token: Option<&str>,
) -> (u16, Value) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut forwarder = pods
        .portforward(pod, &[RUNNER_PORT])
        .await
        .unwrap_or_else(|e| panic!("port-forward to {pod}: {e}"));
    let stream = forwarder
        .take_stream(RUNNER_PORT)
        .expect("the forwarded port");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 over the port-forward");
    let connection = tokio::spawn(connection);
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let response = sender
        .send_request(builder.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {pod}: {e}"));
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("the response body")
        .to_bytes();
    drop(sender);
    connection.abort();
    forwarder.abort();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}
