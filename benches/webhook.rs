//! The admission webhook's latency.
//!
//! Run: `cargo bench --bench webhook`. Targets: handler p99 ≤ 1 ms for a tool
//! against 50 ToolPolicies (each the full checklist of examples/baseline-policy.yaml);
//! over TLS on loopback at 1,000 reviews/s, p99 ≤ 5 ms. Each figure is printed
//! beside an in-run baseline: for the handler, decoding and re-encoding the same
//! review as plain JSON (work any webhook does); over TLS, the same load on
//! `/healthz` (TLS and HTTP, no evaluation). Latency over TLS is measured from
//! each request's scheduled send time (open loop), so a stall is not hidden.

#[path = "../tests/common/webhook.rs"]
mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use toolwarden::api::ToolPolicy;
use toolwarden::webhook::certs::{self, CertStore};
use toolwarden::webhook::server::{self, Limits};
use webhook::*;

const POLICIES: usize = 50;
const RATE_PER_SECOND: u64 = 1000;
const LOAD_SECONDS: u64 = 5;
const CONNECTIONS: usize = 8;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms  (n={})",
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
        samples.len()
    )
}

fn policies() -> Vec<ToolPolicy> {
    let baseline = load("examples/baseline-policy.yaml").policies[0]
        .object
        .clone();
    (0..POLICIES)
        .map(|i| {
            let mut p = baseline.clone();
            p.metadata.name = Some(format!("policy-{i}"));
            p
        })
        .collect()
}

fn time_each(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..200 {
        f();
    }
    (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}

/// A keep-alive HTTPS connection sending one request at a time, as the API server does.
struct Connection {
    stream: BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl Connection {
    async fn open(addr: std::net::SocketAddr, ca_pem: &str) -> Connection {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        Connection {
            stream: BufReader::new(tls),
        }
    }

    async fn send(&mut self, method: &str, path: &str, body: &[u8]) -> u16 {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        self.stream.get_mut().write_all(&request).await.unwrap();
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).await.unwrap();
        let status = status_line[9..12].parse().unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await.unwrap();
        status
    }
}

/// Open-loop load: one request every 1/RATE s, spread over the connections;
/// latency from the scheduled send time to the full answer.
async fn open_loop(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    method: &'static str,
    path: &'static str,
    body: Arc<Vec<u8>>,
) -> Vec<Duration> {
    let (tx, rx) = work_queue();
    let mut workers = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut connection = Connection::open(addr, ca_pem).await;
        let rx = Arc::clone(&rx);
        let body = Arc::clone(&body);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(scheduled) = rx.lock().await.recv().await else {
                    break;
                };
                let status: u16 = connection.send(method, path, &body).await;
                assert_eq!(status, 200);
                latencies.push(scheduled.elapsed());
            }
            latencies
        }));
    }
    let start = tokio::time::Instant::now();
    let total = RATE_PER_SECOND * LOAD_SECONDS;
    for i in 0..total {
        let at = start + Duration::from_micros(i * 1_000_000 / RATE_PER_SECOND);
        tokio::time::sleep_until(at).await;
        tx.send(at.into_std()).unwrap();
    }
    drop(tx);
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    all
}

type Receiver = Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>;

fn work_queue() -> (tokio::sync::mpsc::UnboundedSender<Instant>, Receiver) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}

fn main() {
    let policies = policies();
    let admission = admission(policies.clone(), vec![]);
    let tool = example_tool("user-profile-update");
    let body = tool_request(&tool, Some(&tool), ALICE).body();
    let response = admission.review(&body).unwrap();
    assert!(
        response.response.as_ref().unwrap().allowed,
        "the benchmark tool must be compliant"
    );

    let baseline = time_each(5000, || {
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        std::hint::black_box(serde_json::to_vec(&value).unwrap());
    });
    let handler = time_each(5000, || {
        std::hint::black_box(admission.review(&body).unwrap());
    });
    println!("handler, 1 tool x {POLICIES} policies (target p99 <= 1 ms)");
    println!("  review            {}", summary(handler));
    println!("  baseline (JSON)   {}", summary(baseline));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let material = certs::renew(None, &["localhost".to_string()], now).unwrap().unwrap();
        let store = Arc::new(CertStore::default());
        store.set(&material.serving.cert_pem, &material.serving.key_pem).unwrap();
        let limits = Limits::default();
        let router = server::router(Arc::new(admission), Arc::clone(&store), &limits);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(server::serve(
            listener,
            certs::tls_config(store),
            router,
            limits,
            std::future::pending(),
        ));
        let body = Arc::new(body);
        let empty = Arc::new(Vec::new());
        let ca = material.ca.cert_pem.clone();
        let reviews = open_loop(addr, &ca, "POST", "/validate", body).await;
        let health = open_loop(addr, &ca, "GET", "/healthz", empty).await;
        println!(
            "TLS on loopback, {RATE_PER_SECOND} req/s for {LOAD_SECONDS} s over {CONNECTIONS} keep-alive connections (target p99 <= 5 ms)"
        );
        println!("  POST /validate    {}", summary(reviews));
        println!("  baseline /healthz {}", summary(health));
    });
}
