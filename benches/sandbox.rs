//! `cargo bench --bench sandbox`: N runs of /bin/true in a busybox rootfs: toolwarden cold and
//! warm vs `crun run` / `runc run` on an equivalent bundle vs bare fork+exec, then the whole
//! machine's CPU time per container for each of them. Needs root.

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;
use toolwarden::sandbox::detect::HostReport;
use toolwarden::sandbox::{EngineConfig, Invocation, Limits, SandboxSpec, Sandboxes};

fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in ["true", "sh"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    for p in [dir.to_path_buf(), root.clone()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    root
}

/// Runs per runner (env BENCH_N, default 200).
static N: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
});

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[(v.len() * 95) / 100]))
}

/// The OCI bundle for crun/runc: toolwarden's own pool spec (`oci_spec::build`, same namespaces
/// incl. the user namespace + mapping when the pool uses one, same cgroup limits, device list,
/// masked/readonly paths, rlimits, uid 65534, no capabilities, noNewPrivileges) with
/// args=/bin/true. Differences: no seccomp filter (toolwarden installs its own in the init) and
/// loopback stays down (toolwarden brings `lo` up). Returns the bundle and a description.
fn oci_bundle(
    dir: &Path,
    spec: &SandboxSpec,
    host: &HostReport,
    userns: bool,
) -> (PathBuf, String) {
    let b = dir.join("bundle");
    std::fs::create_dir_all(&b).unwrap();
    let mut v = toolwarden::sandbox::oci_spec::build(spec, host, userns).unwrap();
    v["process"]["args"] = serde_json::json!(["/bin/true"]);
    std::fs::write(b.join("config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    let ns: Vec<&str> = v["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["type"].as_str())
        .collect();
    let res: Vec<&str> = v["linux"]["resources"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let desc = format!(
        "namespaces [{}], cgroup resources [{}] (cgroupfs, per-run cgroupsPath), ro busybox root, \
         tmpfs /tmp+/dev/shm, {} masked paths, uid 65534, no caps, noNewPrivileges, \
         no seccomp, lo down",
        ns.join(" "),
        res.join(" "),
        v["linux"]["maskedPaths"].as_array().map_or(0, |a| a.len()),
    );
    (b, desc)
}

/// True when /sys/fs/cgroup/unified is a cgroup2 mount with controllers (hybrid mode): crun
/// (up to at least 1.8) refuses to run there ("cgroups in hybrid mode not supported, drop
/// all controllers from cgroupv2") whatever its --cgroup-manager.
fn hybrid_with_v2_controllers() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false)
}

/// Runs the child in a private mount namespace without /sys/fs/cgroup/unified, so crun sees a
/// pure v1 host (the same v1 hierarchies libcontainer and runc use here). Applied to crun AND
/// runc so both pay the same (measured) wrapper cost.
fn hide_unified(cmd: &mut Command) {
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let none = c"none".as_ptr();
            if libc::mount(
                none,
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
                || libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn time_cmd(bin: &str, bundle: &Path, wrap: bool, n: usize) -> Option<Vec<Duration>> {
    let cfg = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    spec["linux"]["cgroupsPath"] = format!("/{BENCH_CGROUP}/{bin}-{}", std::process::id()).into();
    std::fs::write(&cfg, serde_json::to_vec(&spec).unwrap()).unwrap();
    let mut v = Vec::new();
    for _ in 0..n {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let i = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("bench-{bin}-{}-{i}", std::process::id());
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if wrap {
            hide_unified(&mut cmd);
        }
        let t = Instant::now();
        let out = cmd.output().ok()?;
        v.push(t.elapsed());
        if !out.status.success() {
            eprintln!(
                "{bin} run failed: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
    }
    Some(v)
}

/// fork+exec+wait of the rootfs's busybox `true` on the host (optionally in the same private
/// mount namespace wrapper as crun/runc).
fn bare(busybox: &Path, wrap: bool) -> Duration {
    let mut cmd = Command::new(busybox);
    cmd.arg("true");
    if wrap {
        hide_unified(&mut cmd);
    }
    let t = Instant::now();
    assert!(cmd.status().unwrap().success());
    t.elapsed()
}

const BENCH_CGROUP: &str = "twbench";

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    if !nix::unistd::geteuid().is_root() || !Path::new("/bin/busybox").exists() {
        println!("SKIPPED: benchmark needs root and /bin/busybox (busybox-static)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = rootfs(tmp.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = EngineConfig::new(PathBuf::from(env!("CARGO_BIN_EXE_toolwarden")));
    cfg.state_root = PathBuf::from(format!("/run/twbench-{}", std::process::id()));
    let engine = Sandboxes::start(&cfg).unwrap();
    let inv = Invocation {
        argv: vec!["/bin/true".into()],
        ..Default::default()
    };
    let rootfs = root.clone();
    let spec = move |warm| SandboxSpec {
        rootfs: rootfs.clone(),
        mounts: vec![],
        limits: Limits::default(),
        warm_pool: warm,
        call_files_dir: None,
    };
    let userns = rt
        .block_on(engine.pool(spec(0)))
        .unwrap()
        .enforcement()
        .user_namespace;
    let (bundle, desc) = oci_bundle(tmp.path(), &spec(0), engine.host(), userns);
    let wrap = hybrid_with_v2_controllers();
    println!("\ncrun/runc bundle (identical for both): {desc}");
    if wrap {
        println!(
            "hybrid cgroups with v2 controllers: crun and runc both run in a private mount ns \
             without /sys/fs/cgroup/unified (crun refuses hybrid mode otherwise); its cost is \
             the 'fork+exec in private mount ns' row"
        );
    }
    let have = |bin: &str| time_cmd(bin, &bundle, wrap, 1).is_some();
    let runtimes: Vec<&str> = ["crun", "runc"].into_iter().filter(|b| have(b)).collect();
    let mut rows: Vec<(&str, Vec<Duration>)> = ["toolwarden cold", "toolwarden warm"]
        .into_iter()
        .chain(runtimes.iter().copied())
        .chain(["bare fork+exec"])
        .chain(wrap.then_some("fork+exec in private mount ns"))
        .map(|n| (n, Vec::new()))
        .collect();
    // Interleaved rounds (one call of every runner per round) so that load changes on this
    // shared host hit all columns alike. Before each timed call the warm pool is full again, so
    // no refill runs during any measurement. The loop runs as a task, like a request handler.
    let engine2 = engine.clone();
    let busybox = root.join("bin/busybox");
    // USER_HZ ticks are 10 ms: enough containers for a figure to within a few per cent.
    let cpu_runs = (*N).max(100);
    let rss = rt
        .block_on(rt.spawn(async move {
            let engine = engine2;
            let cold_pool = engine.pool(spec(0)).await.unwrap();
            let pool = engine.pool(spec(4)).await.unwrap();
            let zpid = engine.zygote_pid();
            // Quiet point before each timed call: warm pool full and every other keeper gone
            // (the zygote's only children are the 4 parked keepers), so no refill build or
            // container deletion of an earlier call overlaps the measurement.
            let settle = || async {
                while pool.warm_len() < 4 || common::keepers(zpid).len() > 4 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            for _ in 0..*N {
                for (name, v) in rows.iter_mut() {
                    settle().await;
                    let t = Instant::now();
                    match *name {
                        "toolwarden cold" | "toolwarden warm" => {
                            let p = if *name == "toolwarden cold" {
                                &cold_pool
                            } else {
                                &pool
                            };
                            let o = p.run(inv.clone()).await.unwrap();
                            v.push(t.elapsed());
                            assert_eq!(o.exit_code, Some(0));
                        }
                        "bare fork+exec" => v.push(bare(&busybox, false)),
                        "fork+exec in private mount ns" => v.push(bare(&busybox, true)),
                        bin => v.extend(time_cmd(bin, &bundle, wrap, 1).unwrap()),
                    }
                }
            }
            settle().await;
            let rss = (rss_kib(std::process::id()), rss_kib(engine.zygote_pid()));
            // CPU per container: each runner starts containers back to back, and the machine's
            // busy time (every process and kernel thread) is divided by their number. For
            // toolwarden that is the whole life of a container (build, run, delete, and for the
            // warm pool the refill), since `settle` waits for all of it.
            let mut cpu = Vec::new();
            for (name, _) in rows.iter() {
                settle().await;
                let before = common::machine_busy_secs();
                for _ in 0..cpu_runs {
                    match *name {
                        "toolwarden cold" => {
                            cold_pool.run(inv.clone()).await.unwrap();
                        }
                        "toolwarden warm" => {
                            pool.run(inv.clone()).await.unwrap();
                        }
                        "bare fork+exec" => {
                            bare(&busybox, false);
                        }
                        "fork+exec in private mount ns" => {
                            bare(&busybox, true);
                        }
                        bin => {
                            time_cmd(bin, &bundle, wrap, 1).unwrap();
                        }
                    }
                }
                settle().await;
                let ms = (common::machine_busy_secs() - before) * 1e3 / cpu_runs as f64;
                cpu.push((*name, ms));
            }
            (rss, rows, cpu)
        }))
        .unwrap();
    let (rss, rows, cpu) = rss;
    for d in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(d.path().join(BENCH_CGROUP));
    }
    let med = |name: &str| {
        rows.iter()
            .find(|r| r.0 == name)
            .map(|r| stats(r.1.clone()).0)
    };
    let (crun_med, runc_med) = (med("crun"), med("runc"));
    println!("\n{} runs of /bin/true (busybox rootfs)\n", *N);
    println!("| runner | median ms | p95 ms | x crun median | x runc median |");
    println!("|---|---:|---:|---:|---:|");
    for (name, v) in &rows {
        let (m, p95) = stats(v.clone());
        let ratio = |r: Option<f64>| r.map(|c| format!("{:.2}", m / c)).unwrap_or("-".into());
        println!(
            "| {name} | {m:.3} | {p95:.3} | {} | {} |",
            ratio(crun_med),
            ratio(runc_med)
        );
    }
    let crun_cpu = cpu.iter().find(|r| r.0 == "crun").map(|r| r.1);
    println!("\nCPU per container, whole machine, {cpu_runs} containers back to back per runner\n");
    println!("| runner | CPU ms per container | x crun |");
    println!("|---|---:|---:|");
    for (name, ms) in &cpu {
        let ratio = crun_cpu.map_or("-".into(), |c| format!("{:.2}", ms / c));
        println!("| {name} | {ms:.2} | {ratio} |");
    }
    println!(
        "\nrunner RSS with warm pool of 4: {} KiB (zygote: {} KiB)",
        rss.0, rss.1
    );
}
