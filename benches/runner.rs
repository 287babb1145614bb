//! Runner performance, `cargo bench --bench runner` (root needed for the sandboxed columns).
//!
//! Measures, and prints side by side with targets:
//! - the pipeline alone (auth, validation, sanitising, rate limit, audit to a file) with an
//!   executor that answers at once: target median <= 100 us;
//! - end-to-end HTTP calls of a trivial tool (`/bin/echo {}`) through the REST endpoint:
//!   throughput with 8 concurrent callers over N calls (target >= 300 calls/s) and p50/p99
//!   latency at a fixed offered rate of 100 calls/s, open loop, latency counted from each
//!   call's scheduled start (target p99 <= 10 ms). Three executors: the unsandboxed process
//!   executor (the baseline, no isolation) and the real `SandboxExecutor` (a fresh youki
//!   sandbox per call) with the default warm pool (2) and a larger one (8);
//! - idle RSS of the `toolwarden serve` process: target <= 20 MB;
//! - CPU time per call during the throughput run, split by who spent it (this process,
//!   the tool processes or the zygote with its keepers and sandboxes, kernel threads, the
//!   rest of the machine), to show where the time goes. Not judged.
//!
//! The sandboxed columns need root and /bin/busybox (the tool's root file system is built
//! from it); without them they print SKIPPED with the reason.
//!
//! Environment: `BENCH_N` calls for throughput (default 2000), `BENCH_RATE_SECS` seconds at
//! 100 calls/s (default 10), `RUST_LOG` for engine logs (default `warn`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use toolwarden::runner::audit::{AuditKey, AuditLog};
use toolwarden::runner::auth::Authenticator;
use toolwarden::runner::executor::{ExecFuture, ExecOutcome, ToolExecutor};
use toolwarden::runner::images::{ImageStore, entry_name};
use toolwarden::runner::pipeline::{CallContext, Runner};
use toolwarden::runner::ratelimit::LimiterClock;
use toolwarden::runner::registry::Registry;
use toolwarden::runner::sandbox_executor::{SandboxExecutor, VolumesDir};
use toolwarden::runner::tool::{PreparedTool, SecretDelivery, SecretsDir};
use toolwarden::runner::unsandboxed::UnsandboxedProcessExecutor;
use toolwarden::sandbox::{EngineConfig, Sandboxes};

const IMAGE: &str = "docker.io/library/busybox:1.36.1";

/// The trivial tool; `{sandbox}` is replaced by its `spec.sandbox` block.
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
{sandbox}"#;

const BODY: &[u8] = br#"{"name":" Ada Lovelace ","email":"ada@example.com"}"#;

/// Concurrent callers in the throughput run.
const CONCURRENCY: usize = 8;
/// Offered rate of the latency run.
const RATE_PER_SEC: u64 = 100;

const TARGET_PIPELINE: Duration = Duration::from_micros(100);
const TARGET_THROUGHPUT: f64 = 300.0;
const TARGET_P99: Duration = Duration::from_millis(10);
const TARGET_RSS_KB: u64 = 20 * 1024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The tool manifest with `spec.sandbox.warmPool` (None: the default).
fn tool_yaml(warm_pool: Option<u32>) -> String {
    let sandbox = match warm_pool {
        Some(n) => format!("  sandbox: {{warmPool: {n}}}\n"),
        None => String::new(),
    };
    TOOL.replace("{sandbox}", &sandbox)
}

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

/// A runner serving the trivial tool from `dir/<name>.yaml`, resolving images from `images`.
fn runner(
    dir: &Path,
    name: &str,
    yaml: &str,
    images: Option<ImageStore>,
    executor: Arc<dyn ToolExecutor>,
) -> Arc<Runner> {
    let manifest = dir.join(format!("{name}.yaml"));
    std::fs::write(&manifest, yaml).unwrap();
    let mut registry = Registry::new(LimiterClock::real(), SecretsDir::default());
    if let Some(images) = images {
        registry = registry.with_images(images);
    }
    let report = registry.load(&[manifest]);
    assert_eq!(report.served, ["trivial"], "{report:?}");
    Arc::new(Runner::new(
        Arc::new(registry),
        Authenticator {
            allow_anonymous: true,
            ..Authenticator::default()
        },
        AuditLog::open_file(
            &dir.join(format!("{name}-audit.log")),
            AuditKey::new(&[1u8; 32]).unwrap(),
        )
        .unwrap(),
        executor,
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn fmt_dur(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} us", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

struct PipelineStats {
    median: Duration,
    p99: Duration,
}

async fn pipeline_only(dir: &Path) -> PipelineStats {
    let runner = runner(dir, "pipeline", &tool_yaml(None), None, Arc::new(Instant0));
    let ctx = CallContext {
        transport: "bench",
        ..CallContext::default()
    };
    let mut times = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let start = Instant::now();
        runner
            .invoke(&ctx, "trivial", std::future::ready(Ok(BODY.into())))
            .await
            .unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    PipelineStats {
        median: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
    }
}

/// End-to-end figures of one executor.
#[derive(Default)]
struct EndToEnd {
    calls: usize,
    throughput: f64,
    /// Latency at the fixed rate, sorted.
    latencies: Vec<Duration>,
    /// Calls (of both runs) that did not answer 2xx, and the first such answer.
    failures: usize,
    first_failure: Option<String>,
    /// Calls of the open-loop run that started > 1 ms after they were due (the bench
    /// process's runtime was short of CPU); their latency still counts from when they were due.
    late_starts: usize,
    /// CPU time spent during the throughput run, per call.
    cpu_per_call: Cpu,
}

/// CPU time in seconds.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    /// All CPUs of the machine, busy (not idle or iowait).
    machine: f64,
    /// This process: the HTTP client and the runner.
    bench: f64,
    /// Tool processes (the unsandboxed executor's children), the zygote and everything it
    /// forked (keepers, sandboxes) once reaped.
    tools: f64,
    /// Kernel threads (e.g. network namespace and cgroup teardown, RCU callbacks).
    kthreads: f64,
}

impl Cpu {
    fn sample(zygote: Option<u32>) -> Cpu {
        const TICK: f64 = 0.01; // USER_HZ is 100 on Linux
        // utime, stime, cutime, cstime of a process.
        let times = |pid: &str| -> [f64; 4] {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<f64> = rest
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse().ok())
                .collect();
            std::array::from_fn(|i| f.get(i).copied().unwrap_or(0.0))
        };
        // Kernel threads: kthreadd (pid 2) and its children.
        let kthreads: f64 = std::fs::read_dir("/proc")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
                        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                        let rest = stat.rsplit_once(')')?.1;
                        let f: Vec<&str> = rest.split_whitespace().collect();
                        let ppid: u32 = f.get(1)?.parse().ok()?;
                        let cpu = f.get(11..13)?.iter().filter_map(|v| v.parse::<f64>().ok());
                        (pid == 2 || ppid == 2).then(|| cpu.sum::<f64>())
                    })
                    .sum()
            })
            .unwrap_or(0.0);
        let me = times("self");
        let zygote = zygote.map_or([0.0; 4], |z| times(&z.to_string()));
        Cpu {
            machine: common::machine_busy_secs(),
            bench: (me[0] + me[1]) * TICK,
            tools: (me[2] + me[3] + zygote.iter().sum::<f64>()) * TICK,
            kthreads: kthreads * TICK,
        }
    }

    fn per_call(self, before: Cpu, calls: usize) -> Cpu {
        let n = calls as f64;
        Cpu {
            machine: (self.machine - before.machine) / n,
            bench: (self.bench - before.bench) / n,
            tools: (self.tools - before.tools) / n,
            kthreads: (self.kthreads - before.kthreads) / n,
        }
    }
}

/// One HTTP call; Ok(()) on 2xx, Err(description) otherwise.
async fn call(client: &reqwest::Client, url: &str) -> Result<(), String> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
    }
}

/// Serves `runner` on a loopback port and measures it; the server stops afterwards.
/// `before_run` is awaited before each measured run (e.g. to let warm pools refill).
async fn end_to_end<F, Fut>(
    runner: Arc<Runner>,
    n: usize,
    rate_secs: u64,
    zygote: Option<u32>,
    before_run: F,
) -> EndToEnd
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v1/tools/trivial/invoke",
        listener.local_addr().unwrap()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(toolwarden::runner::router::serve(listener, runner, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let failures = Arc::new(AtomicUsize::new(0));
    let first_failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let record = {
        let (failures, first_failure) = (failures.clone(), first_failure.clone());
        move |r: Result<(), String>| {
            if let Err(e) = r {
                failures.fetch_add(1, Ordering::Relaxed);
                first_failure.lock().unwrap().get_or_insert(e);
            }
        }
    };
    // Warm-up: connections, lazily created state, the first sandboxes.
    for _ in 0..20 {
        record(call(&client, &url).await);
    }

    // Throughput: CONCURRENCY callers share N calls.
    before_run().await;
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = Cpu::sample(zygote);
    let start = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, url, next, record) =
                (client.clone(), url.clone(), next.clone(), record.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    record(call(&client, &url).await);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let throughput = n as f64 / start.elapsed().as_secs_f64();
    // Containers are deleted in the background after each call: let that finish too.
    before_run().await;
    let cpu_per_call = Cpu::sample(zygote).per_call(cpu_before, n);

    // Latency at a fixed offered rate, open loop: call i is due at t0 + i/RATE whatever
    // the previous calls do, and its latency counts from then (no coordinated omission).
    // A plain thread paces the calls: its sleep is precise to tens of microseconds, where
    // tokio's timer rounds up to the next millisecond.
    before_run().await;
    let count = (RATE_PER_SEC * rate_secs) as usize;
    let period = Duration::from_nanos(1_000_000_000 / RATE_PER_SEC);
    let late = Arc::new(AtomicUsize::new(0));
    let pacer = {
        let (client, url, record, late) =
            (client.clone(), url.clone(), record.clone(), late.clone());
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let t0 = Instant::now() + Duration::from_millis(50);
            (0..count)
                .map(|i| {
                    let due = t0 + period * i as u32;
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let (client, url, record, late) =
                        (client.clone(), url.clone(), record.clone(), late.clone());
                    rt.spawn(async move {
                        if due.elapsed() > Duration::from_millis(1) {
                            late.fetch_add(1, Ordering::Relaxed);
                        }
                        record(call(&client, &url).await);
                        due.elapsed()
                    })
                })
                .collect::<Vec<_>>()
        })
    };
    let pending = tokio::task::spawn_blocking(move || pacer.join().unwrap())
        .await
        .unwrap();
    let mut latencies = Vec::with_capacity(count);
    for p in pending {
        latencies.push(p.await.unwrap());
    }
    latencies.sort();

    drop(client);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let first_failure = first_failure.lock().unwrap().take();
    EndToEnd {
        calls: n,
        throughput,
        latencies,
        failures: failures.load(Ordering::Relaxed),
        first_failure,
        late_starts: late.load(Ordering::Relaxed),
        cpu_per_call,
    }
}

/// Waits until the engine is idle with `warm` containers parked (at most 30 s): the number
/// of containers (one keeper process each, parked or still being built or removed) must reach
/// `warm` and stay unchanged for 300 ms.
async fn wait_warm(zygote: u32, warm: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stable_since = Instant::now();
    let mut last = usize::MAX;
    while Instant::now() < deadline {
        let now = common::keepers(zygote).len();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        if now >= warm && stable_since.elapsed() >= Duration::from_millis(300) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("warning: warm pool did not settle at {warm} within 30 s ({last} containers)");
}

/// A folder a user-namespaced sandbox can traverse (0755, and so are its ancestors).
fn world_traversable(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The toolwarden binary (the zygote is this binary re-executed). Cargo builds it for
/// benches and passes its path in CARGO_BIN_EXE_toolwarden.
fn toolwarden_exe() -> Result<PathBuf, String> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_toolwarden"));
    if exe.is_file() {
        Ok(exe)
    } else {
        Err(format!(
            "{} is missing (build it with `cargo build --release`)",
            exe.display()
        ))
    }
}

/// A unique sandbox state root under /run, removed on drop (the zygote removes it on a clean
/// shutdown; this is the backstop).
struct StateRoot(PathBuf);

impl StateRoot {
    fn new(tag: &str) -> StateRoot {
        StateRoot(PathBuf::from(format!(
            "/run/tw-bench-{}-{tag}",
            std::process::id()
        )))
    }
}

impl Drop for StateRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The end-to-end figures of the real sandbox executor with `warm_pool` (None: default 2).
async fn sandboxed(
    dir: &Path,
    images: &Path,
    warm_pool: Option<u32>,
    n: usize,
    rate_secs: u64,
) -> Result<(EndToEnd, String), String> {
    let tag = format!(
        "wp{}",
        warm_pool.map_or("default".into(), |n| n.to_string())
    );
    let state = StateRoot::new(&tag);
    let mut cfg = EngineConfig::new(toolwarden_exe()?);
    cfg.state_root = state.0.clone();
    let engine = Sandboxes::start(&cfg).map_err(|e| format!("sandbox engine: {e}"))?;
    let zygote = engine.zygote_pid();
    let scratch = dir.join(format!("{tag}-secret-files"));
    let executor = Arc::new(SandboxExecutor::new(engine, VolumesDir(None), scratch));
    let isolation = executor.isolation();
    let store = ImageStore::new(images.to_path_buf(), dir.join("image-cache"));
    let runner = runner(
        dir,
        &tag,
        &tool_yaml(warm_pool),
        Some(store),
        executor.clone(),
    );
    let tools: Vec<_> = runner.registry.snapshot().values().cloned().collect();
    let errors = executor
        .prepare(&tools)
        .await
        .map_err(|e| format!("prepare: {e}"))?;
    if !errors.is_empty() {
        let errors: Vec<String> = errors.iter().map(|(t, e)| format!("{t}: {e}")).collect();
        return Err(format!("prepare: {}", errors.join("; ")));
    }
    let warm = tools[0].spec.sandbox.warm_pool as usize;
    wait_warm(zygote, warm).await;
    let figures = end_to_end(runner, n, rate_secs, Some(zygote), || {
        wait_warm(zygote, warm)
    })
    .await;
    // Let the refills in flight finish first: dropping a pool while its sandboxes are being
    // built makes those builds fail (logged as errors). The server is stopped; dropping the
    // last executor stops the zygote, which removes the state root.
    wait_warm(zygote, warm).await;
    drop(executor);
    Ok((figures, isolation))
}

/// RSS of a process in KiB, from /proc.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Direct children of a process.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|c| {
                    c.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

struct IdleRss {
    serve_kb: u64,
    /// The zygote (sandboxed serve only).
    zygote_kb: Option<u64>,
}

/// Idle RSS of `toolwarden serve` on the trivial tool with `warm_pool`, measured 1.5 s after
/// its banner (the warm pool is filled by then). `sandbox`: (images folder, state dir) or None for
/// `--unsandboxed-dev`.
fn idle_rss(
    dir: &Path,
    warm_pool: Option<u32>,
    sandbox: Option<(&Path, &Path)>,
) -> Result<IdleRss, String> {
    use std::io::BufRead;
    let tool_dir = dir.join("idle-tools");
    std::fs::create_dir_all(&tool_dir).unwrap();
    std::fs::write(tool_dir.join("trivial.yaml"), tool_yaml(warm_pool)).unwrap();
    let mut cmd = std::process::Command::new(toolwarden_exe()?);
    let audit_key = dir.join("idle-audit.key");
    std::fs::write(&audit_key, [1u8; 32]).unwrap();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--audit-log"])
        .arg(dir.join("idle-audit.log"))
        .arg("--audit-key")
        .arg(&audit_key);
    match sandbox {
        Some((images, state)) => {
            cmd.arg("--images")
                .arg(images)
                .arg("--image-cache")
                .arg(dir.join("idle-image-cache"))
                .arg("--state-dir")
                .arg(state);
        }
        None => {
            cmd.arg("--unsandboxed-dev");
        }
    }
    let mut child = cmd
        .arg(tool_dir.join("trivial.yaml"))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("toolwarden serve: {e}"))?;
    // Wait for the banner's last line, then keep draining stderr so it never blocks.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut banner = Vec::new();
    let mut ready = false;
    for line in stderr.by_ref() {
        let Ok(line) = line else { break };
        ready = line.trim_start().starts_with("audit:");
        banner.push(line);
        if ready {
            break;
        }
    }
    std::thread::spawn(move || for _ in stderr {});
    let result = if ready {
        std::thread::sleep(Duration::from_millis(1500));
        let pid = child.id();
        let zygote = children(pid).into_iter().find(|c| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"sandbox-zygote"))
        });
        match rss_kb(pid) {
            Some(serve_kb) => Ok(IdleRss {
                serve_kb,
                zygote_kb: zygote.and_then(rss_kb),
            }),
            None => Err("no VmRSS in /proc".into()),
        }
    } else {
        Err(format!(
            "serve did not start: {}",
            banner.last().map_or("(no output)", String::as_str)
        ))
    };
    // SIGTERM: a clean shutdown, so the zygote removes its state.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// One column of the end-to-end table.
struct Column {
    title: String,
    /// Err: skipped or failed, with the reason.
    figures: Result<EndToEnd, String>,
    rss: Result<IdleRss, String>,
    /// Whether the targets are judged on this column (the baseline is not).
    judged: bool,
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn print_table(pipeline: &PipelineStats, columns: &[Column]) {
    let w0 = 36;
    let w = 24;
    let mut header = format!("{:w0$}", "measurement");
    for c in columns {
        header += &format!(" | {:>w$}", c.title);
    }
    header += " | target           | verdict (sandboxed columns)";
    println!("{header}");
    println!("{}", "-".repeat(header.len()));

    type Cell = Box<dyn Fn(&EndToEnd) -> (String, Option<bool>)>;
    let rows: Vec<(&str, &str, Cell)> = vec![
        (
            "throughput, 8 concurrent",
            ">= 300 calls/s",
            Box::new(|e: &EndToEnd| {
                (
                    format!("{:.0} calls/s", e.throughput),
                    Some(e.throughput >= TARGET_THROUGHPUT),
                )
            }),
        ),
        (
            "latency p50 at 100 calls/s",
            "-",
            Box::new(|e: &EndToEnd| (fmt_dur(percentile(&e.latencies, 0.5)), None)),
        ),
        (
            "latency p99 at 100 calls/s",
            "<= 10 ms",
            Box::new(|e: &EndToEnd| {
                let p99 = percentile(&e.latencies, 0.99);
                (fmt_dur(p99), Some(p99 <= TARGET_P99))
            }),
        ),
        (
            "latency max at 100 calls/s",
            "-",
            Box::new(|e: &EndToEnd| (fmt_dur(*e.latencies.last().unwrap()), None)),
        ),
        (
            "CPU/call, throughput run: machine",
            "-",
            Box::new(|e: &EndToEnd| (format!("{:.2} ms", e.cpu_per_call.machine * 1e3), None)),
        ),
        (
            "  bench process (client + runner)",
            "-",
            Box::new(|e: &EndToEnd| (format!("{:.2} ms", e.cpu_per_call.bench * 1e3), None)),
        ),
        (
            "  tool procs / zygote+keepers+boxes",
            "-",
            Box::new(|e: &EndToEnd| (format!("{:.2} ms", e.cpu_per_call.tools * 1e3), None)),
        ),
        (
            "  kernel threads (teardown, RCU)",
            "-",
            Box::new(|e: &EndToEnd| (format!("{:.2} ms", e.cpu_per_call.kthreads * 1e3), None)),
        ),
        (
            "  other processes (noise)",
            "-",
            Box::new(|e: &EndToEnd| {
                let c = e.cpu_per_call;
                let other = c.machine - c.bench - c.tools - c.kthreads;
                (format!("{:.2} ms", other * 1e3), None)
            }),
        ),
        (
            "failed calls (all runs)",
            "0",
            Box::new(|e: &EndToEnd| {
                (
                    format!("{} of {}", e.failures, e.calls + e.latencies.len() + 20),
                    Some(e.failures == 0),
                )
            }),
        ),
    ];
    for (name, target, cell) in &rows {
        let mut line = format!("{name:w0$}");
        let mut verdicts = Vec::new();
        for c in columns {
            let text = match &c.figures {
                Ok(e) => {
                    let (text, met) = cell(e);
                    if let (true, Some(met)) = (c.judged, met) {
                        verdicts.push(format!("{}: {}", c.title.trim(), verdict(met)));
                    }
                    text
                }
                Err(_) => {
                    if c.judged && *target != "-" {
                        verdicts.push(format!("{}: not measured", c.title.trim()));
                    }
                    "SKIPPED".into()
                }
            };
            line += &format!(" | {text:>w$}");
        }
        line += &format!(" | {target:16} | {}", verdicts.join(", "));
        println!("{line}");
    }

    // Idle RSS of the serve process.
    let mut line = format!("{:w0$}", "idle RSS of `toolwarden serve`");
    let mut verdicts = Vec::new();
    for c in columns {
        let text = match &c.rss {
            Ok(r) => {
                if c.judged {
                    verdicts.push(format!(
                        "{}: {}",
                        c.title.trim(),
                        verdict(r.serve_kb <= TARGET_RSS_KB)
                    ));
                }
                format!("{:.1} MB", r.serve_kb as f64 / 1024.0)
            }
            Err(_) => {
                if c.judged {
                    verdicts.push(format!("{}: not measured", c.title.trim()));
                }
                "SKIPPED".into()
            }
        };
        line += &format!(" | {text:>w$}");
    }
    line += &format!(" | {:16} | {}", "<= 20 MB", verdicts.join(", "));
    println!("{line}");
    let mut line = format!("{:w0$}", "  + its sandbox zygote (not judged)");
    for c in columns {
        let text = match &c.rss {
            Ok(IdleRss {
                zygote_kb: Some(kb),
                ..
            }) => format!("{:.1} MB", *kb as f64 / 1024.0),
            _ => "-".into(),
        };
        line += &format!(" | {text:>w$}");
    }
    println!("{line} | {:16} |", "-");

    // The pipeline alone: one figure, the executor does not take part.
    println!(
        "{:w0$} | {:>w$} | {:16} | {}",
        "pipeline alone, median (no HTTP)",
        fmt_dur(pipeline.median),
        "<= 100 us",
        verdict(pipeline.median <= TARGET_PIPELINE)
    );
    println!(
        "{:w0$} | {:>w$} | {:16} |",
        "pipeline alone, p99 (no HTTP)",
        fmt_dur(pipeline.p99),
        "-"
    );
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let n = env_or("BENCH_N", 2000) as usize;
    let rate_secs = env_or("BENCH_RATE_SECS", 10);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // World-traversable: user-namespaced sandboxes must reach the image root file system.
    let dir = tempfile::Builder::new()
        .prefix("tw-bench")
        .tempdir()
        .unwrap();
    world_traversable(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    println!(
        "toolwarden runner bench: {cores} cores, throughput over {n} calls with {CONCURRENCY} \
         concurrent callers, latency over {} calls offered at {RATE_PER_SEC} calls/s (open loop); \
         client, runner and sandboxes share this machine",
        RATE_PER_SEC * rate_secs
    );
    let loadavg = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", loadavg().trim());
    let pipeline = rt.block_on(pipeline_only(dir.path()));

    let baseline_runner = runner(
        dir.path(),
        "baseline",
        &tool_yaml(None),
        None,
        Arc::new(UnsandboxedProcessExecutor),
    );
    let baseline = rt.block_on(end_to_end(baseline_runner, n, rate_secs, None, || async {
        // Tool processes are reaped when the call ends: nothing runs in the background.
    }));
    let mut columns = vec![Column {
        title: "unsandboxed (baseline)".into(),
        figures: Ok(baseline),
        rss: idle_rss(dir.path(), None, None),
        judged: false,
    }];

    let skip = common::skip_reason();
    let images = dir.path().join("images");
    if skip.is_none() {
        world_traversable(&images);
        common::build_busybox_rootfs(&images.join(entry_name(IMAGE)));
    }
    let mut isolation = None;
    for warm_pool in [None, Some(8)] {
        let title = format!("sandbox warmPool={}", warm_pool.unwrap_or(2));
        let (figures, rss) = match &skip {
            Some(why) => (Err(why.clone()), Err(why.clone())),
            None => {
                let figures = rt.block_on(sandboxed(dir.path(), &images, warm_pool, n, rate_secs));
                let figures = figures.map(|(f, iso)| {
                    isolation.get_or_insert(iso);
                    f
                });
                let state = StateRoot::new("serve");
                let rss = idle_rss(dir.path(), warm_pool, Some((&images, &state.0)));
                (figures, rss)
            }
        };
        columns.push(Column {
            title,
            figures,
            rss,
            judged: true,
        });
    }

    println!();
    print_table(&pipeline, &columns);
    println!();
    if let Some(why) = &skip {
        println!("sandboxed columns SKIPPED: {why}");
    }
    for c in &columns {
        match &c.figures {
            Ok(e) => {
                if let Some(f) = &e.first_failure {
                    println!("{}: first failed call: {f}", c.title);
                }
                if e.late_starts > 0 {
                    println!(
                        "{}: {} calls of the fixed-rate run started > 1 ms late (the bench process was short of CPU)",
                        c.title, e.late_starts
                    );
                }
            }
            Err(why) if skip.is_none() => println!("{}: FAILED: {why}", c.title),
            Err(_) => {}
        }
        if let Err(why) = &c.rss
            && skip.is_none()
        {
            println!("{}: idle RSS FAILED: {why}", c.title);
        }
    }
    println!(
        "load average at end: {} (the machine is shared: other processes' CPU shows in the \
         'other processes' row and slows every column)",
        loadavg().trim()
    );
    if let Some(iso) = isolation {
        println!("sandbox isolation: {iso}");
    }
}
