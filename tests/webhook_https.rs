//! The webhook over real HTTPS on loopback, with a certificate generated the
//! way the self-managed mode does: reviews, hostile bodies, a slow client, and
//! a certificate swapped while serving.

#[path = "common/webhook.rs"]
mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use toolwarden::api::ToolPolicy;
use toolwarden::webhook::certs::{self, CertStore, Material};
use toolwarden::webhook::server::{self, Limits};
use webhook::*;

struct Running {
    addr: std::net::SocketAddr,
    certs: Arc<CertStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn material(now: i64) -> Material {
    certs::renew(None, &["localhost".to_string()], now)
        .unwrap()
        .unwrap()
}

async fn start(material: &Material, policies: Vec<ToolPolicy>, limits: Limits) -> Running {
    let certs = Arc::new(CertStore::default());
    certs
        .set(&material.serving.cert_pem, &material.serving.key_pem)
        .unwrap();
    let router = server::router(
        Arc::new(admission(policies, vec![])),
        Arc::clone(&certs),
        &limits,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let tls = certs::tls_config(Arc::clone(&certs));
    let task = tokio::spawn(server::serve(listener, tls, router, limits, async {
        stopped.await.ok();
    }));
    Running {
        addr,
        certs,
        stop: Some(stop),
        task,
    }
}

impl Running {
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn client_for(trusted_ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(trusted_ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over TLS: (status, body).
async fn request(
    addr: std::net::SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tls.connect(name, tcp).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    // A body the server refuses early may not be read in full; that is the server's right.
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn strict_policy() -> ToolPolicy {
    serde_json::from_value(json!({"apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": {"name": "strict"},
        "spec": {"mode": "enforce", "rules": {"sandboxing": {"maxTimeoutMs": 100}, "rateLimiting": {"maxRequestsPerMinute": 1}}}}))
    .unwrap()
}

#[tokio::test]
async fn reviews_over_https_with_a_generated_certificate() {
    let material = material(time_now());
    let running = start(&material, vec![strict_policy()], Limits::default()).await;
    let tls = client_for(&material.ca_bundle(time_now()));
    let tool = example_tool("user-profile-update");
    let (status, body) = request(
        running.addr,
        &tls,
        "POST",
        "/validate",
        &tool_request(&tool, None, ALICE).body(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let review: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(review["response"]["allowed"], false, "{review}");
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("TW-SANDBOX-001") && message.contains("TW-RATE-002"),
        "{message}"
    );

    let (status, body) = request(running.addr, &tls, "GET", "/readyz", b"")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    // Hostile bodies: not JSON, too large, an empty one; the server keeps serving.
    let (status, body) = request(running.addr, &tls, "POST", "/validate", b"{\"kind\": [")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not an AdmissionReview"), "{body}");
    let huge = vec![b' '; toolwarden::webhook::MAX_REVIEW_BYTES + 1];
    let (status, _) = request(running.addr, &tls, "POST", "/validate", &huge)
        .await
        .unwrap();
    assert_eq!(status, 413);
    let (status, _) = request(running.addr, &tls, "POST", "/validate", b"")
        .await
        .unwrap();
    assert_eq!(status, 400);
    let (status, _) = request(
        running.addr,
        &tls,
        "POST",
        "/validate",
        &tool_request(&tool, None, ALICE).body(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // A client that does not trust the webhook's CA gets nowhere.
    let stranger = client_for(&self::material(time_now()).ca.cert_pem);
    assert!(
        request(running.addr, &stranger, "GET", "/healthz", b"")
            .await
            .is_err()
    );
    running.stop().await;
}

/// A renewed certificate (here: from a new CA) is served to the next handshake,
/// without restarting the server.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let now = time_now();
    let first = material(now);
    let running = start(&first, vec![], Limits::default()).await;
    let old_only = client_for(&first.ca.cert_pem);
    assert_eq!(
        request(running.addr, &old_only, "GET", "/healthz", b"")
            .await
            .unwrap()
            .0,
        200
    );
    // The CA is now within its renewal window (its recorded expiry moved closer).
    let mut aging = first.clone();
    aging.ca.not_after = now + certs::CA_RENEW_BEFORE - 1;
    let rotated = certs::renew(Some(&aging), &["localhost".to_string()], now)
        .unwrap()
        .unwrap();
    assert_ne!(rotated.ca, first.ca);
    running
        .certs
        .set(&rotated.serving.cert_pem, &rotated.serving.key_pem)
        .unwrap();
    let new_only = client_for(&rotated.ca.cert_pem);
    assert_eq!(
        request(running.addr, &new_only, "GET", "/healthz", b"")
            .await
            .unwrap()
            .0,
        200
    );
    // (A fresh client: one that connected before may resume its TLS session.)
    let old_only = client_for(&first.ca.cert_pem);
    assert!(
        request(running.addr, &old_only, "GET", "/healthz", b"")
            .await
            .is_err(),
        "the old certificate is gone"
    );
    // The bundle patched into the configuration trusts both while the old CA lives.
    let both = client_for(&rotated.ca_bundle(now));
    assert_eq!(
        request(running.addr, &both, "GET", "/healthz", b"")
            .await
            .unwrap()
            .0,
        200
    );
    running.stop().await;
}

/// A client that connects and sends nothing (or stalls mid-handshake) is cut off
/// after the handshake timeout; it holds no evaluation slot meanwhile.
#[tokio::test]
async fn a_silent_client_is_disconnected() {
    let material = material(time_now());
    let limits = Limits {
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let running = start(&material, vec![], limits).await;
    let mut silent = TcpStream::connect(running.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let tls = client_for(&material.ca.cert_pem);
    assert_eq!(
        request(running.addr, &tls, "GET", "/healthz", b"")
            .await
            .unwrap()
            .0,
        200
    );
    running.stop().await;
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Before its stores have listed everything the webhook judges nothing: a policy
/// it has not seen yet could be the one that denies. Not ready, and every review
/// gets 503 (the API server then fails the request closed).
#[tokio::test]
async fn nothing_is_admitted_before_the_stores_are_synced() {
    // An API server that never answers: the stores never fill.
    let config = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let (view, reflectors) = toolwarden::webhook::ClusterView::watch(&client);
    let reflectors = tokio::spawn(reflectors);
    let material = material(time_now());
    let certs = Arc::new(CertStore::default());
    certs
        .set(&material.serving.cert_pem, &material.serving.key_pem)
        .unwrap();
    let admission = toolwarden::webhook::Admission::new(
        toolwarden::webhook::Config::new(RELEASE_NAMESPACE, "toolwarden-controller"),
        view,
    );
    let limits = Limits::default();
    let router = server::router(Arc::new(admission), Arc::clone(&certs), &limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(
        listener,
        certs::tls_config(certs),
        router,
        limits,
        async {
            stopped.await.ok();
        },
    ));
    let tls = client_for(&material.ca.cert_pem);
    let (status, body) = request(addr, &tls, "GET", "/readyz", b"").await.unwrap();
    assert_eq!((status, body.as_str()), (503, "stores not synced yet"));
    let tool = example_tool("user-profile-update");
    let (status, body) = request(
        addr,
        &tls,
        "POST",
        "/validate",
        &tool_request(&tool, None, ALICE).body(),
    )
    .await
    .unwrap();
    // A denial for this request (code 503, the reason readable by the caller),
    // so it is refused even under `failurePolicy: Ignore`.
    assert_eq!(status, 200, "{body}");
    let review: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(review["response"]["allowed"], false, "{review}");
    assert_eq!(review["response"]["uid"], REQUEST_UID, "{review}");
    assert_eq!(review["response"]["status"]["code"], 503, "{review}");
    assert_eq!(
        review["response"]["status"]["reason"], "NotReady",
        "{review}"
    );
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("has not synced"), "{message}");
    stop.send(()).unwrap();
    task.await.unwrap();
    reflectors.abort();
}

/// Every evaluation slot taken (here: none at all) until the deadline: the
/// review is denied for its uid with code 503 and a message saying the webhook
/// is busy, after waiting the whole deadline and not longer; a body without a
/// readable uid gets a bare 503. The server keeps serving afterwards.
#[tokio::test]
async fn a_busy_webhook_denies_the_review_it_could_not_evaluate() {
    let material = material(time_now());
    let deadline = Duration::from_millis(300);
    let limits = Limits {
        max_in_flight: 0,
        deadline,
        ..Limits::default()
    };
    let running = start(&material, vec![strict_policy()], limits).await;
    let tls = client_for(&material.ca_bundle(time_now()));
    // Compliant: admitted were it evaluated, so a denial can only come from the busy path.
    let mut tool = example_tool("user-profile-update");
    tool.spec.sandbox.timeout_ms = 100;
    tool.spec.rate_limit = None;
    let body = tool_request(&tool, None, ALICE).body();
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let (tls, body) = (tls.clone(), body.clone());
        let addr = running.addr;
        waiting.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = request(addr, &tls, "POST", "/validate", &body)
                .await
                .unwrap();
            (started.elapsed(), answer)
        }));
    }
    for waiter in waiting {
        let (elapsed, (status, body)) = waiter.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let review: Value = serde_json::from_str(&body).unwrap();
        let response = &review["response"];
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1", "{review}");
        assert_eq!(response["uid"], REQUEST_UID, "{review}");
        assert_eq!(response["allowed"], false, "{review}");
        assert_eq!(response["status"]["code"], 503, "{review}");
        assert_eq!(response["status"]["reason"], "Busy", "{review}");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("busy") && message.contains("300ms"),
            "{message}"
        );
        assert!(
            elapsed >= deadline && elapsed < deadline + Duration::from_secs(3),
            "answered after {elapsed:?}, deadline {deadline:?}"
        );
    }
    // Nothing to answer for: not a v1 AdmissionReview, or no uid.
    let mut wrong_version: Value = serde_json::from_slice(&body).unwrap();
    wrong_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut no_uid: Value = serde_json::from_slice(&body).unwrap();
    no_uid["request"]["uid"] = json!("");
    for hostile in [wrong_version, no_uid] {
        let (status, body) = request(
            running.addr,
            &tls,
            "POST",
            "/validate",
            &serde_json::to_vec(&hostile).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("busy"), "{body}");
    }
    let (status, _) = request(running.addr, &tls, "GET", "/healthz", b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    running.stop().await;
}
