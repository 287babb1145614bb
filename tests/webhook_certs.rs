//! The self-managed certificate against an API server: a small fake one over
//! real HTTP on loopback that keeps Secrets and the ValidatingWebhookConfiguration
//! with resourceVersions and answers conflicts as the real one does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use toolwarden::webhook::certs::{CertStore, Material, SelfManaged};
use toolwarden::webhook::install::Install;

#[derive(Default)]
struct Fake {
    secrets: BTreeMap<String, Value>,
    configuration: Option<Value>,
    version: u64,
    writes: Vec<String>,
}

type Shared = Arc<Mutex<Fake>>;

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}))).into_response()
}

fn conflict() -> Response {
    (StatusCode::CONFLICT, Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}))).into_response()
}

fn stamp(fake: &mut Fake, mut object: Value) -> Value {
    fake.version += 1;
    object["metadata"]["resourceVersion"] = json!(fake.version.to_string());
    object
}

async fn get_secret(
    State(fake): State<Shared>,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    match fake.lock().unwrap().secrets.get(&name) {
        Some(secret) => Json(secret.clone()).into_response(),
        None => not_found(),
    }
}

async fn create_secret(
    State(fake): State<Shared>,
    Path(_): Path<String>,
    Json(secret): Json<Value>,
) -> Response {
    let mut fake = fake.lock().unwrap();
    let name = secret["metadata"]["name"].as_str().unwrap().to_string();
    if fake.secrets.contains_key(&name) {
        return conflict();
    }
    let stored = stamp(&mut fake, secret);
    fake.secrets.insert(name.clone(), stored.clone());
    fake.writes.push(format!("create secret {name}"));
    (StatusCode::CREATED, Json(stored)).into_response()
}

async fn replace_secret(
    State(fake): State<Shared>,
    Path((_, name)): Path<(String, String)>,
    Json(secret): Json<Value>,
) -> Response {
    let mut fake = fake.lock().unwrap();
    let current = fake
        .secrets
        .get(&name)
        .map(|s| s["metadata"]["resourceVersion"].clone());
    if current != Some(secret["metadata"]["resourceVersion"].clone()) {
        return conflict();
    }
    let stored = stamp(&mut fake, secret);
    fake.secrets.insert(name.clone(), stored.clone());
    fake.writes.push(format!("replace secret {name}"));
    Json(stored).into_response()
}

async fn get_configuration(State(fake): State<Shared>, Path(_): Path<String>) -> Response {
    match &fake.lock().unwrap().configuration {
        Some(c) => Json(c.clone()).into_response(),
        None => not_found(),
    }
}

async fn replace_configuration(
    State(fake): State<Shared>,
    Path(_): Path<String>,
    Json(config): Json<Value>,
) -> Response {
    let mut fake = fake.lock().unwrap();
    let current = fake
        .configuration
        .as_ref()
        .map(|c| c["metadata"]["resourceVersion"].clone());
    if current != Some(config["metadata"]["resourceVersion"].clone()) {
        return conflict();
    }
    let stored = stamp(&mut fake, config);
    fake.configuration = Some(stored.clone());
    fake.writes.push("replace configuration".into());
    Json(stored).into_response()
}

async fn fake_api_server(fake: Shared) -> kube::Client {
    let router = axum::Router::new()
        .route(
            "/api/v1/namespaces/{ns}/secrets/{name}",
            get(get_secret).put(replace_secret),
        )
        .route(
            "/api/v1/namespaces/{ns}/secrets",
            axum::routing::post(create_secret),
        )
        .route(
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{name}",
            get(get_configuration).put(replace_configuration),
        )
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn manager() -> SelfManaged {
    SelfManaged {
        namespace: "toolwarden".into(),
        secret: "toolwarden-webhook-tls".into(),
        webhook_configuration: "toolwarden".into(),
        dns_names: vec!["toolwarden-webhook.toolwarden.svc".into()],
        check_every: Duration::from_secs(60),
    }
}

fn bundles(fake: &Shared) -> Vec<String> {
    let fake = fake.lock().unwrap();
    fake.configuration.as_ref().unwrap()["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let b64 = w["clientConfig"]["caBundle"].as_str().unwrap_or("");
            let bytes: k8s_openapi::ByteString = serde_json::from_value(json!(b64)).unwrap();
            String::from_utf8(bytes.0).unwrap()
        })
        .collect()
}

fn stored_material(fake: &Shared) -> Material {
    let secret: Secret =
        serde_json::from_value(fake.lock().unwrap().secrets["toolwarden-webhook-tls"].clone())
            .unwrap();
    Material::from_secret(&secret).expect("a complete Secret")
}

#[tokio::test]
async fn the_secret_is_created_once_shared_renewed_when_due_and_the_bundle_follows() {
    let fake: Shared = Arc::default();
    let mut configuration = Install::default().webhook_configuration();
    configuration["metadata"]["resourceVersion"] = json!("1");
    fake.lock().unwrap().configuration = Some(configuration);
    let client = fake_api_server(Arc::clone(&fake)).await;

    // Two replicas start: one creates, the other uses what the first created.
    let (first, second) = (CertStore::default(), CertStore::default());
    manager().round(&client, &first).await.unwrap();
    manager().round(&client, &second).await.unwrap();
    assert!(first.is_loaded() && second.is_loaded());
    let created = stored_material(&fake);
    assert_eq!(
        fake.lock().unwrap().writes,
        [
            "create secret toolwarden-webhook-tls",
            "replace configuration"
        ],
        "one Secret, one bundle patch; the second replica changed nothing"
    );
    for bundle in bundles(&fake) {
        assert_eq!(bundle, created.ca.cert_pem);
    }

    // The serving certificate nears expiry (as recorded): the next round reissues it.
    {
        let mut fake = fake.lock().unwrap();
        let secret = fake.secrets.get_mut("toolwarden-webhook-tls").unwrap();
        let soon = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 86_400;
        secret["metadata"]["annotations"]["toolwarden.dev/serving-not-after"] =
            json!(soon.to_string());
    }
    manager().round(&client, &first).await.unwrap();
    let renewed = stored_material(&fake);
    assert_ne!(renewed.serving, created.serving);
    assert_eq!(
        renewed.ca, created.ca,
        "same CA: the bundle did not need to change"
    );
    assert_eq!(
        fake.lock().unwrap().writes.last().unwrap(),
        "replace secret toolwarden-webhook-tls"
    );

    // The CA nears its end: a new one, both in the bundle.
    {
        let mut fake = fake.lock().unwrap();
        let secret = fake.secrets.get_mut("toolwarden-webhook-tls").unwrap();
        let soon = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 100 * 86_400;
        secret["metadata"]["annotations"]["toolwarden.dev/ca-not-after"] = json!(soon.to_string());
    }
    manager().round(&client, &first).await.unwrap();
    let rotated = stored_material(&fake);
    assert_ne!(rotated.ca.cert_pem, created.ca.cert_pem);
    for bundle in bundles(&fake) {
        assert!(
            bundle.contains(&rotated.ca.cert_pem) && bundle.contains(&created.ca.cert_pem),
            "{bundle}"
        );
    }

    // A Secret damaged by hand is replaced, not trusted.
    fake.lock()
        .unwrap()
        .secrets
        .get_mut("toolwarden-webhook-tls")
        .unwrap()["data"]
        .as_object_mut()
        .unwrap()
        .remove("tls.key");
    manager().round(&client, &first).await.unwrap();
    assert_ne!(stored_material(&fake).ca.cert_pem, rotated.ca.cert_pem);

    // Without its webhook configuration the round fails with a clear reason.
    fake.lock().unwrap().configuration = None;
    let error = manager().round(&client, &first).await.unwrap_err();
    assert_eq!(error.reason(), "NoWebhookConfiguration", "{error}");
}
