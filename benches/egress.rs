//! Egress proxy overhead, `cargo bench --bench egress`.
//!
//! N sequential `GET`s of a small JSON answer from a plain-HTTP upstream on
//! loopback, each on a new connection, once directly and once through the
//! proxy (absolute-form `http://` request, a name resolved by an in-memory
//! resolver, the address check, a credential swapped into a header, the
//! audit event), interleaved in the same run so both see the same machine.
//! Prints median and p95 of each and the median added latency: target
//! <= 1 ms. `BENCH_N` sets N (default 2000).

#[path = "../tests/egress_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Names, Proxy, Upstream, get, send};
use toolwarden::api::{EgressCidr, EgressRule, SecretUse};
use toolwarden::egress::{Credentials, EgressPolicy, UpstreamTls};

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
}
