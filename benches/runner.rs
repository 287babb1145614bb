//! Runner performance: the pipeline alone (no sandbox), end-to-end HTTP calls
//! of a trivial tool, and idle RSS of `toolwarden serve`. Prints figures;
//! targets: pipeline median <= 100 us, >= 300 calls/s, p99 <= 10 ms at 100
//! calls/s, idle RSS <= 20 MB.
//!
//! End-to-end figures use the *unsandboxed* process executor until the
//! sandbox engine is wired in; rerun them then.

use std::sync::Arc;
use std::time::{Duration, Instant};

use toolwarden::runner::audit::AuditLog;
use toolwarden::runner::auth::Authenticator;
use toolwarden::runner::executor::{
    ExecFuture, ExecOutcome, SecretDelivery, ToolExecutor, UnsandboxedProcessExecutor,
};
use toolwarden::runner::metrics::Metrics;
use toolwarden::runner::pipeline::{CallContext, Runner};
use toolwarden::runner::ratelimit::LimiterClock;
use toolwarden::runner::registry::{PreparedTool, Registry, SecretsDir};

const TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: trivial}
spec:
  description: Answers {} at once
  risk: low
  inputSchema:
    type: object
    additionalProperties: false
    properties:
      name: {type: string, maxLength: 100, pattern: "^[a-zA-Z ]+$"}
      email: {type: string, format: email, maxLength: 254}
  sanitize:
    - field: /name
      transforms: [trim, normalizeUnicode]
  runtime:
    image: docker.io/library/busybox:1.36.1
    command: [/bin/echo, "{}"]
  rateLimit: {requestsPerMinute: 1000000}
"#;

/// Answers at once, so the pipeline's own cost is measured.
struct Instant0;
impl ToolExecutor for Instant0 {
    fn execute<'a>(
        &'a self,
        _: &'a PreparedTool,
        _: Vec<u8>,
        _: Vec<SecretDelivery>,
    ) -> ExecFuture<'a> {
        Box::pin(async {
            Ok(ExecOutcome {
                exit_code: Some(0),
                stdout: b"{}".to_vec(),
                ..ExecOutcome::default()
            })
        })
    }
    fn isolation(&self) -> String {
        "none (benchmark)".into()
    }
}

fn runner(dir: &std::path::Path, executor: Arc<dyn ToolExecutor>) -> Arc<Runner> {
    std::fs::write(dir.join("trivial.yaml"), TOOL).unwrap();
    let registry = Arc::new(Registry::new(LimiterClock::real(), SecretsDir::default()));
    let report = registry.load(&[dir.join("trivial.yaml")]);
    assert_eq!(report.served, ["trivial"], "{report:?}");
    Arc::new(Runner {
        registry,
        auth: Authenticator {
            allow_anonymous: true,
            ..Authenticator::default()
        },
        audit: AuditLog::open_file(&dir.join("audit.log")).unwrap(),
        executor,
        metrics: Metrics::default(),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

const BODY: &[u8] = br#"{"name":" Ada Lovelace ","email":"ada@example.com"}"#;

async fn pipeline_only(dir: &std::path::Path) {
    let runner = runner(dir, Arc::new(Instant0));
    let ctx = CallContext {
        transport: "bench",
        ..CallContext::default()
    };
    let mut times = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let start = Instant::now();
        runner.invoke(&ctx, "trivial", Ok(BODY)).await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "pipeline without sandbox (audit to a file): median {:?}, p99 {:?}  (target: median <= 100 us)",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
}

async fn http(dir: &std::path::Path) {
    let runner = runner(dir, Arc::new(UnsandboxedProcessExecutor));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v1/tools/trivial/invoke",
        listener.local_addr().unwrap()
    );
    tokio::spawn(toolwarden::runner::rest::serve(
        listener,
        runner,
        std::future::pending(),
    ));
    let client = reqwest::Client::new();
    let call = |client: reqwest::Client, url: String| async move {
        let start = Instant::now();
        let response = client
            .post(&url)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        response.bytes().await.unwrap();
        start.elapsed()
    };
    // Throughput: 8 concurrent callers for 3 s.
    let deadline = Instant::now() + Duration::from_secs(3);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while Instant::now() < deadline {
                    call(client.clone(), url.clone()).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    println!(
        "end-to-end throughput (8 concurrent, unsandboxed processes): {:.0} calls/s  (target >= 300)",
        f64::from(total) / 3.0
    );
    // Latency at a fixed 100 calls/s for 3 s.
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut pending = Vec::new();
    for _ in 0..300 {
        ticker.tick().await;
        pending.push(tokio::spawn(call(client.clone(), url.clone())));
    }
    let mut times = Vec::new();
    for p in pending {
        times.push(p.await.unwrap());
    }
    times.sort();
    println!(
        "end-to-end latency at 100 calls/s: p50 {:?}, p99 {:?}  (target p99 <= 10 ms)",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
}

fn idle_rss(dir: &std::path::Path) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .args([
            "serve",
            "--unsandboxed-dev",
            "--listen",
            "127.0.0.1:0",
            "--audit-log",
        ])
        .arg(dir.join("idle-audit.log"))
        .arg(dir.join("trivial.yaml"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the banner's last line, then measure.
    use std::io::BufRead;
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().trim_start().starts_with("audit:") {
            break;
        }
    }
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: unknown")
        .to_string();
    println!("idle `toolwarden serve` {rss}  (target <= 20 MB)");
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(pipeline_only(dir.path()));
    rt.block_on(http(dir.path()));
    idle_rss(dir.path());
}
