//! Shared test helpers: a busybox rootfs and an engine, both real.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toolwarden::runner::images::{ImageStore, entry_name};
use toolwarden::runner::sandbox_executor::{SandboxExecutor, VolumesDir};
use toolwarden::sandbox::{
    EngineConfig, Invocation, Limits, Outcome, Pool, SandboxSpec, Sandboxes, names,
};

pub const BUSYBOX: &str = "/bin/busybox";

/// Set by `.ci/run`: a test that cannot create a real sandbox fails instead of skipping, so a
/// green CI means real sandboxes ran. A developer's laptop without root may still skip.
pub const REQUIRE_SANDBOX_ENV: &str = "TOOLWARDEN_REQUIRE_SANDBOX";

/// Returns a reason to skip, printed by the caller, or None when real sandboxes can run.
/// Panics with that reason instead when [`REQUIRE_SANDBOX_ENV`] is `1`.
pub fn skip_reason() -> Option<String> {
    let why = missing_sandbox_prerequisite()?;
    if std::env::var(REQUIRE_SANDBOX_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_SANDBOX_ENV}=1 but real sandboxes cannot run here: {why}");
    }
    Some(why)
}

fn missing_sandbox_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: real sandboxes need root".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!(
            "{BUSYBOX} missing: apt-get install -y busybox-static"
        ));
    }
    None
}

#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(why) = common::skip_reason() {
            eprintln!("SKIPPED {}: {}", module_path!(), why);
            return;
        }
    };
}

/// A rootfs dir with a static busybox and its applet symlinks (world-traversable so a user
/// namespace root can reach it).
pub struct Rootfs {
    pub dir: tempfile::TempDir,
}

impl Rootfs {
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

pub fn busybox_rootfs() -> Rootfs {
    let dir = world_traversable_tempdir();
    build_busybox_rootfs(&dir.path().join("rootfs"));
    Rootfs { dir }
}

/// A temporary folder a user-namespaced sandbox can reach (mode 0755).
pub fn world_traversable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("tw-test")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Writes a static busybox root file system into `root`.
pub fn build_busybox_rootfs(root: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "mnt", "work"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    for entry in walk(root) {
        let m = std::fs::symlink_metadata(&entry).unwrap();
        if m.is_dir() {
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![p.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

/// The state root of the calling test (one per test thread, so engines of tests running in
/// parallel never share one and each test can check that its root is removed).
pub fn state_root() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static N: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    PathBuf::from(format!(
        "/run/twtest-{}-{}",
        std::process::id(),
        N.with(|n| *n)
    ))
}

pub fn config() -> EngineConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let mut cfg = EngineConfig::new(PathBuf::from(env!("CARGO_BIN_EXE_toolwarden")));
    cfg.state_root = state_root();
    cfg
}

pub fn engine() -> Sandboxes {
    Sandboxes::start(&config()).expect("start sandbox engine")
}

/// What the example tools need beside their manifests in `dir`: `images/`
/// with the busybox root file system under their image reference, and
/// `volumes/` with the claims the examples mount: the file tool's (holding
/// `notes.txt`) and the profile store as `examples/volumes/` seeds it.
pub fn example_images_and_volumes(dir: &Path) {
    let workspace = dir.join("volumes/pvc/agent-workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join("notes.txt"), "remember the milk\n").unwrap();
    let profiles = dir.join("volumes/pvc/user-profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let seeded =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/volumes/pvc/user-profiles");
    for entry in std::fs::read_dir(seeded).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, profiles.join(path.file_name().unwrap())).unwrap();
    }
    build_busybox_rootfs(
        &dir.join("images")
            .join(entry_name("docker.io/library/busybox:1.36.1")),
    );
}

/// A folder `serve` can run the examples from: their manifests (files only, not
/// `violations/`) beside the `images/` and `volumes/` they need.
pub fn examples_tools_dir() -> tempfile::TempDir {
    let dir = world_traversable_tempdir();
    example_images_and_volumes(dir.path());
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// The runner's real executor on a fresh engine, and an image store holding
/// the busybox root file system under the examples' image reference.
pub fn runner_sandbox(dir: &Path) -> (SandboxExecutor, ImageStore) {
    example_images_and_volumes(dir);
    let executor = SandboxExecutor::new(
        engine(),
        VolumesDir(Some(dir.join("volumes"))),
        dir.join("state"),
    );
    let store = ImageStore::new(dir.join("images"), dir.join("image-cache"));
    (executor, store)
}

pub fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(10),
        memory_bytes: Some(64 << 20),
        cpu_millicores: Some(1000),
        pids: 32,
        max_output_bytes: 64 * 1024,
        tmp_size_bytes: 4 << 20,
        file_size_bytes: 2 << 20,
        open_files: 256,
    }
}

pub fn spec(rootfs: &Rootfs, limits: Limits, warm: usize) -> SandboxSpec {
    SandboxSpec {
        rootfs: rootfs.path(),
        mounts: vec![],
        limits,
        warm_pool: warm,
        call_files_dir: None,
    }
}

pub fn sh(script: &str) -> Invocation {
    Invocation {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/bin".into())],
        cwd: None,
        stdin: vec![],
        files: vec![],
    }
}

pub async fn run(pool: &Pool, inv: Invocation) -> Outcome {
    pool.run(inv).await.expect("sandbox run")
}

pub fn text(c: &toolwarden::sandbox::Captured) -> String {
    String::from_utf8_lossy(&c.bytes).into_owned()
}

/// Waits (bounded) until the engine's asynchronous shutdown has removed `root`.
pub async fn wait_removed(root: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while root.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} left behind",
            root.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts an engine whose zygote sees the cgroup file system read-only, as in a
/// user-namespaced Kubernetes pod (`hostUsers: false`): a helper thread unshares its mount
/// namespace (allowed in a multi-threaded process), makes every mount private and remounts each
/// mount at or under /sys/fs/cgroup read-only (MS_REMOUNT|MS_BIND|MS_RDONLY, per mount, so the
/// host and the rest of the test process are unaffected). The zygote, spawned from that
/// thread, inherits its mount namespace. Returns an error naming the step that failed.
pub fn engine_with_readonly_cgroupfs(cfg: EngineConfig) -> Result<Sandboxes, String> {
    std::thread::spawn(move || -> Result<Sandboxes, String> {
        use nix::mount::{MsFlags, mount};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
        let none = None::<&str>;
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
            .map_err(|e| format!("make / rprivate: {e}"))?;
        // /proc/self would be the thread group leader's (other) namespace.
        let info = std::fs::read_to_string("/proc/thread-self/mountinfo")
            .map_err(|e| format!("mountinfo: {e}"))?;
        let mut remounted = Vec::new();
        for line in info.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let (mp, opts) = (f[4], f[5]);
            if mp != "/sys/fs/cgroup" && !mp.starts_with("/sys/fs/cgroup/") {
                continue;
            }
            let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
            // Keep the per-mount flags the mount has (as a container runtime would).
            for o in opts.split(',') {
                flags |= match o {
                    "nosuid" => MsFlags::MS_NOSUID,
                    "nodev" => MsFlags::MS_NODEV,
                    "noexec" => MsFlags::MS_NOEXEC,
                    _ => MsFlags::empty(),
                };
            }
            mount(none, mp, none, flags, none)
                .map_err(|e| format!("remount {mp} read-only: {e}"))?;
            remounted.push(mp.to_string());
        }
        if remounted.is_empty() {
            return Err("no mount at or under /sys/fs/cgroup".into());
        }
        // Check the reproduction itself: no cgroup can be created anywhere in the tree.
        for mp in &remounted {
            let probe = Path::new(mp).join(format!("tw-rotest-{}", std::process::id()));
            match std::fs::create_dir(&probe) {
                Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
                other => {
                    let _ = std::fs::remove_dir(&probe);
                    return Err(format!("{mp} still writable: mkdir gave {other:?}"));
                }
            }
        }
        Sandboxes::start(&cfg).map_err(|e| format!("engine start: {e}"))
    })
    .join()
    .map_err(|_| "read-only cgroupfs helper thread panicked".to_string())?
}

/// Cgroup directories (anywhere in the host's cgroup tree, up to 3 levels deep) created for
/// containers of zygote `zpid` (ids `tw-<zpid>-<n>`, e.g. `toolwarden/tw-…` or `:youki:tw-…`).
pub fn cgroups_of(zpid: u32) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, needle: &str, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if e.file_name().to_string_lossy().contains(needle) {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), depth - 1, needle, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        3,
        &format!("tw-{zpid}-"),
        &mut out,
    );
    out
}

/// Everything that belongs to zygote `zpid`: state dirs, bundles, cgroups, child processes.
/// State dirs and bundles are looked for in the state root and, while the zygote runs, in the
/// private tmpfs it keeps them on (seen through its /proc root).
pub fn engine_leftovers(state_root: &Path, zpid: u32) -> Vec<String> {
    let prefix = format!("tw-{zpid}-");
    let private = names::zygote_dir(state_root, zpid);
    let private = Path::new(&format!("/proc/{zpid}/root")).join(private.strip_prefix("/").unwrap());
    let mut out = Vec::new();
    for root in [state_root.to_path_buf(), private] {
        for dir in [root.join("bundles"), root] {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    out.push(e.path().display().to_string());
                }
            }
        }
    }
    out.extend(cgroups_of(zpid).iter().map(|p| p.display().to_string()));
    out.extend(keepers(zpid).into_iter().map(|p| format!("process {p}")));
    out
}

/// The zygote's children: one keeper per container (parked, building, running or being
/// removed).
pub fn keepers(zpid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{zpid}/task/{zpid}/children"))
        .map(|kids| kids.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Busy CPU time of the whole machine (every process and kernel thread; not idle or iowait) in
/// seconds, from /proc/stat.
pub fn machine_busy_secs() -> f64 {
    const TICK: f64 = 0.01; // USER_HZ is 100 on Linux
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<f64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(f.iter().take(8).sum::<f64>() - f.get(3)? - f.get(4)?)
        })
        .map_or(0.0, |ticks| ticks * TICK)
}

/// Spawns a `toolwarden serve ...` command with stderr piped, reads stderr up to the banner's
/// last line (`audit:`) and keeps draining the rest, so reload messages never block the
/// server. Returns the child, the lines read and the REST address (`host:port`).
pub fn spawn_serve(
    command: &mut std::process::Command,
) -> (std::process::Child, Vec<String>, String) {
    use std::io::BufRead;
    let mut child = command
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut banner = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.trim_start().starts_with("audit:");
        banner.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let addr = banner
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("REST:"))
        .and_then(|l| l.split("http://").nth(1))
        .and_then(|l| l.split('/').next())
        .unwrap_or_else(|| panic!("no REST line in {banner:#?}"))
        .to_string();
    (child, banner, addr)
}
