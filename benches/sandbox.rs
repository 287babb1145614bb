//! `cargo bench --bench sandbox`: N runs of /bin/true in a busybox rootfs: toolwarden cold and
//! warm vs `crun run` / `runc run` on an equivalent bundle vs bare fork+exec. Needs root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use toolwarden::sandbox::{EngineConfig, Invocation, Limits, SandboxSpec, Sandboxes};

const N: usize = 200;

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

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[(v.len() * 95) / 100]))
}

/// An OCI bundle for crun/runc from `runc spec`, made equivalent: read-only busybox root,
/// /bin/true, no terminal, same namespaces minus user (runc's default).
fn oci_bundle(dir: &Path, root: &Path) -> Option<PathBuf> {
    let b = dir.join("bundle");
    std::fs::create_dir_all(&b).unwrap();
    let st = Command::new("runc")
        .arg("spec")
        .current_dir(&b)
        .status()
        .ok()?;
    if !st.success() {
        return None;
    }
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    v["process"]["terminal"] = false.into();
    v["process"]["args"] = serde_json::json!(["/bin/true"]);
    v["root"]["path"] = root.display().to_string().into();
    std::fs::write(b.join("config.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    Some(b)
}

fn time_cmd(bin: &str, bundle: &Path) -> Option<Vec<Duration>> {
    let mut v = Vec::new();
    for i in 0..N {
        let id = format!("bench-{bin}-{}-{i}", std::process::id());
        let t = Instant::now();
        let st = Command::new(bin)
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        v.push(t.elapsed());
        if !st.success() {
            eprintln!("{bin} run failed: {st}");
            return None;
        }
    }
    Some(v)
}

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
    let spec = |warm| SandboxSpec {
        rootfs: root.clone(),
        mounts: vec![],
        limits: Limits::default(),
        warm_pool: warm,
    };
    let mut rows: Vec<(&str, Vec<Duration>)> = Vec::new();
    let (cold, warm, rss) = rt.block_on(async {
        let cold_pool = engine.pool(spec(0)).await.unwrap();
        let mut cold = Vec::new();
        for _ in 0..N {
            let t = Instant::now();
            let o = cold_pool.run(inv.clone()).await.unwrap();
            cold.push(t.elapsed());
            assert_eq!(o.exit_code, Some(0));
        }
        drop(cold_pool);
        let pool = engine.pool(spec(4)).await.unwrap();
        let mut warm = Vec::new();
        for _ in 0..N {
            // Measure request latency with a filled pool (refill happens between requests).
            while pool.warm_len() < 4 {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let t = Instant::now();
            let o = pool.run(inv.clone()).await.unwrap();
            warm.push(t.elapsed());
            assert_eq!(o.exit_code, Some(0));
        }
        while pool.warm_len() < 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rss = (rss_kib(std::process::id()), rss_kib(engine.zygote_pid()));
        (cold, warm, rss)
    });
    rows.push(("toolwarden cold", cold));
    rows.push(("toolwarden warm", warm));
    let bundle = oci_bundle(tmp.path(), &root);
    for bin in ["crun", "runc"] {
        match bundle.as_deref().and_then(|b| time_cmd(bin, b)) {
            Some(v) => rows.push((bin, v)),
            None => println!("{bin}: not available"),
        }
    }
    let mut bare = Vec::new();
    for _ in 0..N {
        let t = Instant::now();
        Command::new(root.join("bin/busybox"))
            .arg("true")
            .status()
            .unwrap();
        bare.push(t.elapsed());
    }
    rows.push(("bare fork+exec", bare));
    let crun_med = rows
        .iter()
        .find(|r| r.0 == "crun")
        .map(|r| stats(r.1.clone()).0);
    println!("\n{N} runs of /bin/true (busybox rootfs)\n");
    println!("| runner | median ms | p95 ms | x crun median |");
    println!("|---|---:|---:|---:|");
    for (name, v) in &rows {
        let (med, p95) = stats(v.clone());
        let ratio = crun_med
            .map(|c| format!("{:.2}", med / c))
            .unwrap_or("-".into());
        println!("| {name} | {med:.3} | {p95:.3} | {ratio} |");
    }
    println!(
        "\nrunner RSS with warm pool of 4: {} KiB (zygote: {} KiB)",
        rss.0, rss.1
    );
}
