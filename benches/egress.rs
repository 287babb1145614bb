//! Egress proxy overhead, `cargo bench --bench egress`.
//!
//! N sequential `GET`s of a small JSON answer from a plain-HTTP upstream on
//! loopback, each on a new connection, once directly and once through the
//! proxy (absolute-form `http://` request, a name resolved by an in-memory
//! resolver, the address check, a credential swapped into a header, the
//! audit event), interleaved in the same run so both see the same machine.
//! Prints median and p95 of each and the median added latency: target
//! <= 1 ms. `BENCH_N` sets N (default 2000).
//!
//! Then (root only) the example `api-call` tool end to end in real sandboxes:
//! `BENCH_SANDBOX_N` (default 50) calls through the runner's sandbox executor,
//! each a warm sandbox whose busybox wget goes through the call's proxy,
//! which opens TLS to an HTTPS upstream on loopback with the key injected;
//! against the same tool with the network left out (its wget answered by
//! nothing: `endpoint` unset), so the difference is the proxied request.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/egress_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Names, Proxy, Recorder, TestPki, Upstream, get, send};
use toolwarden::api::{AgentTool, EgressCidr, EgressRule, SecretUse};
use toolwarden::egress::{Credentials, EgressPolicy, UpstreamTls};
use toolwarden::runner::executor::ToolExecutor;
use toolwarden::runner::ratelimit::LimiterClock;
use toolwarden::runner::tool::{SecretsDir, prepare};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let port = upstream.port();
    let names = Arc::new(Names::default());
    names.set("bench.test", &[&["127.0.0.1"]]);
    let rules: Vec<EgressRule> = serde_yaml::from_str(&format!(
        "- {{host: bench.test, ports: [{port}], plainHttp: true, paths: [/v1], methods: [GET]}}"
    ))
    .unwrap();
    let secret: SecretUse = serde_yaml::from_str(
        "{secretName: keys, key: bench, inject: {host: bench.test, header: X-API-Key}}",
    )
    .unwrap();
    let mut credentials = Credentials::default();
    let placeholder = credentials.issue(&secret, b"real-key").unwrap();
    let policy = EgressPolicy::new(&rules, &[EgressCidr("127.0.0.0/8".into())])
        .unwrap()
        .with_credentials(credentials);
    let tls = UpstreamTls::with_roots(rustls::RootCertStore::empty()).unwrap();
    let proxy = Proxy::start(policy, tls, names).await;

    let direct_url = format!("http://127.0.0.1:{port}/v1/item");
    let proxied_url = format!("http://bench.test:{port}/v1/item");
    let headers = [("x-api-key", placeholder.as_str())];
    // Warm-up (connection setup paths, allocator).
    for _ in 0..100 {
        send(upstream.addr, get("/v1/item", &[])).await;
        send(proxy.addr, get(&proxied_url, &headers)).await;
    }
    let (mut direct, mut proxied) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let started = Instant::now();
        let answer = send(upstream.addr, get("/v1/item", &[("host", "127.0.0.1")])).await;
        direct.push(started.elapsed());
        assert_eq!(answer.status, 200);
        let started = Instant::now();
        let answer = send(proxy.addr, get(&proxied_url, &headers)).await;
        proxied.push(started.elapsed());
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    direct.sort();
    proxied.sort();
    let added = micros(percentile(&proxied, 0.5)) - micros(percentile(&direct, 0.5));
    println!("egress proxy, {n} GETs on loopback, one connection each ({direct_url} vs via proxy)");
    println!("| Path | Median µs | p95 µs |");
    println!("| --- | ---: | ---: |");
    for (name, samples) in [("direct", &direct), ("through the proxy", &proxied)] {
        println!(
            "| {name} | {:.0} | {:.0} |",
            micros(percentile(samples, 0.5)),
            micros(percentile(samples, 0.95))
        );
    }
    let verdict = if added <= 1000.0 { "met" } else { "MISSED" };
    println!("median added latency: {added:.0} µs (target <= 1000 µs: {verdict})");
    assert_eq!(proxy.audit.events().len(), 100 + n);
    drop(proxy);
    sandboxed_api_call().await;
}

/// The example `api-call` tool end to end in real sandboxes (see the top).
async fn sandboxed_api_call() {
    if let Some(why) = common::skip_reason() {
        println!("sandboxed api-call: skipped ({why})");
        return;
    }
    let n: usize = std::env::var("BENCH_SANDBOX_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = common::world_traversable_tempdir();
    let (executor, store) = common::runner_sandbox(dir.path());
    let pki = TestPki::new(&["api.example.com"]);
    let upstream = Upstream::start("127.0.0.1:0", Some(pki.server.clone()))
        .await
        .unwrap();
    let names = Arc::new(Names::default());
    names.set("api.example.com", &[&["127.0.0.1"]]);
    let executor = executor.with_egress_upstreams(pki.upstream_tls(), names);
    let port = upstream.port();
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/api-call.yaml"),
    )
    .unwrap()
    .replace("ports: [443]", &format!("ports: [443, {port}]"));
    let secrets = dir.path().join("secrets/external-api-keys");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("example"), "bench-key").unwrap();
    std::fs::write(secrets.join("service"), "bench-other-key").unwrap();
    let secrets = SecretsDir(Some(dir.path().join("secrets")));
    let tool: AgentTool = serde_yaml::from_str(&manifest).unwrap();
    let mut tool = prepare(&tool, 1, &secrets, Some(&store), &LimiterClock::manual()).unwrap();
    tool.allowed_egress_cidrs = vec![EgressCidr("127.0.0.0/8".into())];
    let tool = Arc::new(tool);
    assert!(
        executor
            .prepare(std::slice::from_ref(&tool))
            .await
            .unwrap()
            .is_empty()
    );
    let audit = Arc::new(Recorder::default());
    let call = |endpoint: Option<String>| {
        let input = match endpoint {
            Some(endpoint) => serde_json::json!({"endpoint": endpoint, "method": "GET"}),
            None => serde_json::json!({"method": "GET"}),
        };
        let (tool, executor, audit) = (tool.clone(), &executor, audit.clone());
        async move {
            let started = Instant::now();
            let outcome = executor
                .execute_with_egress(&tool, input.to_string().into_bytes(), vec![], audit)
                .await
                .unwrap();
            (started.elapsed(), outcome)
        }
    };
    let endpoint = format!("https://api.example.com:{port}/v1/items");
    for _ in 0..5 {
        call(Some(endpoint.clone())).await;
    }
    let (mut proxied, mut offline) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let (took, outcome) = call(Some(endpoint.clone())).await;
        assert_eq!(outcome.stdout, br#"{"ok":true}"#, "{outcome:?}");
        proxied.push(took);
        let (took, outcome) = call(None).await;
        assert_ne!(outcome.exit_code, Some(0), "no URL, no request");
        offline.push(took);
    }
    proxied.sort();
    offline.sort();
    println!(
        "sandboxed api-call (examples/api-call.yaml), {n} calls, warm sandboxes, HTTPS upstream on loopback"
    );
    println!("| Call | Median ms | p95 ms |");
    println!("| --- | ---: | ---: |");
    for (name, samples) in [
        (
            "GET through the proxy, key injected, TLS upstream",
            &proxied,
        ),
        ("same tool, no request (wget fails at once)", &offline),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} |",
            micros(percentile(samples, 0.5)) / 1000.0,
            micros(percentile(samples, 0.95)) / 1000.0
        );
    }
    assert_eq!(upstream.requests().len(), 5 + n);
    assert!(audit.events().iter().all(|e| e.injected.len() == 1));
}
