//! The runner inside a simulated least-privilege pod, on the host, so CI runs the paths a
//! Kubernetes pod with `hostUsers: false` takes. tests/data/pod-sim.sh builds what containerd and
//! runc give such a pod: a user namespace with 65,536 ids mapped to an unused host range (every
//! inherited mount locked), a fresh masked /proc, a read-only /sys and cgroup file system, a
//! /dev of bound device nodes, a read-only root, and only the documented namespaced capabilities
//! ([`toolwarden::sandbox::RUNNER_POD_CAPABILITIES`]) with no_new_privs. `toolwarden serve` runs
//! there as PID 1, and every call goes through real HTTP inside the pod's network namespace.
//! Needs root, busybox-static, util-linux (`unshare`, `setpriv`) and gcc; skips with the reason
//! otherwise (fails under TOOLWARDEN_REQUIRE_SANDBOX=1).
mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use toolwarden::runner::images::entry_name;
use toolwarden::sandbox::RUNNER_POD_CAPABILITIES;

/// The ids a pod owns: its 0..65535 are the host's `base..base+65535`.
const POD_IDS: u32 = 65_536;
/// pids.max of each simulated pod's cgroup, which the banner must report as the outer bound.
const POD_PIDS_MAX: u32 = 1500;
const PORT: u16 = 8080;

/// Returns why this test cannot run here, if it cannot (see `common::skip_reason`).
fn missing_tool() -> Option<String> {
    for tool in ["unshare", "setpriv", "gcc"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} not found (util-linux, gcc)"));
        }
    }
    None
}

macro_rules! require_pod_sim {
    () => {
        require_root!();
        if let Some(why) = missing_tool() {
            if std::env::var(common::REQUIRE_SANDBOX_ENV).is_ok_and(|v| v == "1") {
                panic!(
                    "{}=1 but the pod simulation cannot run: {why}",
                    common::REQUIRE_SANDBOX_ENV
                );
            }
            eprintln!("SKIPPED {}: {}", module_path!(), why);
            return;
        }
    };
}

/// The capabilities setpriv keeps: `+sys_admin,+setuid,...`.
fn pod_caps(caps: &[&str]) -> String {
    caps.iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The bits of [`RUNNER_POD_CAPABILITIES`] in /proc/<pid>/status's CapEff.
fn pod_caps_mask() -> u64 {
    RUNNER_POD_CAPABILITIES
        .iter()
        .map(|c| match *c {
            "CHOWN" => 0,
            "SETGID" => 6,
            "SETUID" => 7,
            "SYS_CHROOT" => 18,
            "SYS_PTRACE" => 19,
            "SYS_ADMIN" => 21,
            other => panic!("capability {other} has no bit here"),
        })
        .fold(0, |mask, bit| mask | 1u64 << bit)
}

/// One simulated runner pod.
struct Pod {
    child: Child,
    /// Host pid of the pod's PID 1.
    pid1: u32,
    dir: tempfile::TempDir,
    host_base: u32,
    netns: File,
    /// /proc/<pid>/ns/pid of the pod's processes.
    pidns: PathBuf,
    cgroups: Vec<PathBuf>,
}

const TOOL: &str = "execute-code";

/// A tool that gets a secret as a file (owned by the sandbox user, mode 0400).
const SECRET_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: read-secret, namespace: agents}
spec:
  description: Reads its secret file
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command: [/bin/sh, -c, 'cat >/dev/null; ls -ln /run/secrets/token | cut -c1-10; sha256sum /run/secrets/token | cut -d" " -f1']
  sandbox: {timeoutMs: 5000}
  secrets:
    - {secretName: tool-secrets, key: token, file: /run/secrets/token}
  rateLimit: {requestsPerMinute: 600}
"#;
const SECRET: &str = "s3cr3t-for-the-pod";

const NO_TMP_IMAGE: &str = "registry.example/no-tmp:1";
const NO_TMP_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: no-tmp, namespace: agents}
spec:
  description: Its image lacks /tmp
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  runtime:
    image: registry.example/no-tmp:1
    command: [/bin/true]
"#;

impl Pod {
    /// Starts `toolwarden serve` in a new simulated pod whose ids are the host's
    /// `host_base..`; `deny_pivot_root` adds a seccomp filter refusing pivot_root, as
    /// containerd's RuntimeDefault profile does; `image_volumes` serves the tools' root file
    /// systems as read-only image volumes (`--image-volumes`) instead of an images folder.
    fn start(host_base: u32, deny_pivot_root: bool, image_volumes: bool) -> Pod {
        Pod::start_with_caps(
            host_base,
            deny_pivot_root,
            image_volumes,
            RUNNER_POD_CAPABILITIES,
        )
    }

    fn start_with_caps(
        host_base: u32,
        deny_pivot_root: bool,
        image_volumes: bool,
        caps: &[&str],
    ) -> Pod {
        let pod = Pod::spawn(host_base, deny_pivot_root, image_volumes, caps);
        pod.wait_ready();
        pod
    }

    /// Starts the pod without waiting for the runner.
    fn spawn(host_base: u32, deny_pivot_root: bool, image_volumes: bool, caps: &[&str]) -> Pod {
        let dir = common::world_traversable_tempdir();
        let pod = dir.path().join("pod");
        let tools = pod.join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        // The example tool, with room for the many calls below in its rate limit, and 5 s
        // instead of 1 s per call: in scripts/vm-test.sh's emulated guests a memory bomb
        // takes longer than 1 s to reach its limit.
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/execute-code.yaml"),
        )
        .unwrap()
        .replace("requestsPerMinute: 30", "requestsPerMinute: 6000")
        .replace("timeoutMs: 1000", "timeoutMs: 5000");
        std::fs::write(tools.join("execute-code.yaml"), manifest).unwrap();
        let images = match image_volumes {
            true => pod.join("image-volumes"),
            false => tools.join("images"),
        };
        let rootfs = images.join(entry_name("docker.io/library/busybox:1.36.1"));
        common::build_busybox_rootfs(&rootfs);
        // The mount target of the secret file: a read-only image must contain it.
        std::fs::create_dir_all(rootfs.join("run/secrets")).unwrap();
        std::fs::write(rootfs.join("run/secrets/token"), b"").unwrap();
        if image_volumes {
            // An image without /tmp: its tool must be refused, naming what is missing.
            let no_tmp = images.join(entry_name(NO_TMP_IMAGE));
            common::build_busybox_rootfs(&no_tmp);
            std::fs::remove_dir(no_tmp.join("tmp")).unwrap();
            std::fs::write(tools.join("no-tmp.yaml"), NO_TMP_TOOL).unwrap();
        } else {
            // Owned by the pod's root, as a tree the runner unpacked into its emptyDir cache is.
            chown_tree(&rootfs, host_base);
        }
        // Files only the pod's root (uid 0), or its group 0, may read.
        for (name, mode) in [("runner-only", 0o600), ("runner-group-only", 0o640)] {
            let file = rootfs.join("etc").join(name);
            std::fs::write(&file, "secret of the runner\n").unwrap();
            std::os::unix::fs::chown(&file, Some(host_base), Some(host_base)).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::write(tools.join("read-secret.yaml"), SECRET_TOOL).unwrap();
        let secrets = pod.join("secrets/tool-secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::write(secrets.join("token"), SECRET).unwrap();
        for d in [&pod, &tools, &images] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The pod's writable folders (emptyDirs) belong to the pod's root.
        for d in ["state", "cache"] {
            let d = pod.join(d);
            std::fs::create_dir(&d).unwrap();
            std::os::unix::fs::chown(&d, Some(host_base), Some(host_base)).unwrap();
        }
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let wrap_dir = dir.path().join("wrap");
        std::fs::create_dir(&wrap_dir).unwrap();
        if deny_pivot_root {
            let st = Command::new("gcc")
                .args(["-static", "-O1", "-o"])
                .arg(wrap_dir.join("deny-pivot-root"))
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/data/deny-pivot-root.c"
                ))
                .status()
                .unwrap();
            assert!(st.success(), "gcc -static failed (need libc6-dev)");
        }
        let cgroups = pod_cgroups(host_base);
        let bin = Path::new(env!("CARGO_BIN_EXE_toolwarden"))
            .parent()
            .unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--pid",
            "--net",
            "--uts",
            "--ipc",
            "--fork",
            "--kill-child",
        ]);
        // On cgroup v2 a pod's container has its own cgroup namespace, rooted at its cgroup
        // (joined before this runs), in which pod-sim.sh mounts cgroup2 read-only.
        if cgroup_v2() {
            cmd.arg("--cgroup");
        }
        cmd.args(["--propagation", "private", "sh"])
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/pod-sim.sh"
            ))
            .args(["/toolwarden/toolwarden", "serve", "/sim/tools"])
            .args(["--listen", &format!("127.0.0.1:{PORT}")])
            .args(["--state-dir", "/sim/state", "--image-cache", "/sim/cache"])
            .args(["--secrets-dir", "/sim/secrets"])
            // A pod's cgroup tree is read-only: rlimits and the pod's own cgroup bound the
            // sandboxes, which the runner serves only when told to.
            .arg("--allow-degraded")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SIM", dir.path())
            .env("BIN", bin)
            .env("POD_CAPS", pod_caps(caps))
            .env("WRAP_DIR", &wrap_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("stdout")).unwrap())
            .stderr(File::create(dir.path().join("stderr")).unwrap());
        if deny_pivot_root {
            cmd.env("WRAP", "/wrap/deny-pivot-root");
        }
        if image_volumes {
            cmd.args(["--image-volumes", "/sim/image-volumes"]);
        }
        let child = spawn_in_user_namespace(cmd, host_base, &cgroups);
        // The pod's PID 1 (unshare's child) is in all of the pod's namespaces.
        let pid1 = pod_pid1(child.id());
        let netns = File::open(format!("/proc/{pid1}/ns/net")).unwrap();
        let pidns = std::fs::read_link(format!("/proc/{pid1}/ns/pid")).unwrap();
        Pod {
            child,
            pid1,
            dir,
            host_base,
            netns,
            pidns,
            cgroups,
        }
    }

    fn wait_ready(&self) {
        // Generous: in scripts/vm-test.sh's emulated guests a runner starts about 20x slower.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok((200, _)) = self.try_http("GET", "/healthz", None) {
                return;
            }
            assert!(
                self.alive() && Instant::now() < deadline,
                "runner not ready; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the pod's PID 1 still runs (not exited, not a zombie).
    fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid1))
            .ok()
            .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().chars().next()? != 'Z'))
            .unwrap_or(false)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// The audit records (JSON lines on the runner's stdout).
    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("stdout"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// One HTTP/1.1 request to the runner, from a thread that joined the pod's network
    /// namespace (the runner listens on the pod's loopback).
    fn try_http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        let ns = self.netns.try_clone()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            body.map_or(0, str::len),
            body.unwrap_or("")
        );
        std::thread::spawn(move || -> std::io::Result<(u16, String)> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut s = std::net::TcpStream::connect(("127.0.0.1", PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.write_all(request.as_bytes())?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            let status = raw
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = raw
                .split_once("\r\n\r\n")
                .map_or("", |(_, b)| b)
                .to_string();
            Ok((status, body))
        })
        .join()
        .expect("http thread")
    }

    fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, body) = self.try_http(method, path, body).expect("http");
        let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (status, json)
    }

    /// Runs `code` with the execute-code tool.
    fn call(&self, code: &str) -> (u16, Value) {
        let body = serde_json::json!({ "code": code }).to_string();
        self.http("POST", &format!("/v1/tools/{TOOL}/invoke"), Some(&body))
    }

    /// Host pids of the processes in the pod's pid namespace, with their state letter.
    fn processes(&self) -> Vec<(i32, char)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .ok()
                .as_ref()
                != Some(&self.pidns)
            {
                continue;
            }
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')')?.1.trim_start().chars().next());
            if let Some(state) = state {
                out.push((pid, state));
            }
        }
        out
    }

    /// Host pid of the pod process (not in a sandbox) whose command line starts with `args`.
    fn find(&self, args: &[&str]) -> Option<i32> {
        let pids = self.processes().into_iter().map(|(p, _)| p);
        pids.into_iter().find(|p| cmdline_starts_with(*p, args))
    }
}

/// Host pid of any process (sandboxes included) whose command line starts with `args`.
fn find_anywhere(args: &[&str]) -> Option<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .find(|p| cmdline_starts_with(*p, args))
}

/// How many processes whose command line starts with `args` run as host uid `uid`.
fn count_processes(args: &[&str], uid: u32) -> usize {
    let uid_line = format!("Uid:\t{uid}\t");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| cmdline_starts_with(*p, args))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .is_ok_and(|s| s.contains(&uid_line))
        })
        .count()
}

fn cmdline_starts_with(pid: i32, args: &[&str]) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let parts: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    parts.len() >= args.len() && args.iter().zip(&parts).all(|(a, p)| a.as_bytes() == *p)
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Killing the pod's PID 1 kills its whole pid namespace.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid1 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for cg in &self.cgroups {
            let _ = std::fs::remove_dir(cg);
        }
        // The pod's files belong to its ids; the tempdir's own cleanup needs no more.
        let _ = self.host_base;
    }
}

fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            chown_tree(&e.path(), id);
        }
    }
}

/// The first child of `unshare` (bounded wait): the pod's PID 1.
fn pod_pid1(unshare: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "unshare started no pod process");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A cgroup per controller for the pod (pids.max = POD_PIDS_MAX), as the kubelet makes one.
fn pod_cgroups(host_base: u32) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let name = format!("tw-podsim-{}-{host_base}", std::process::id());
    let dirs: Vec<PathBuf> = if cgroup_v2() {
        vec![root.join(&name)]
    } else {
        vec![
            root.join("pids").join(&name),
            root.join("memory").join(&name),
        ]
    };
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(dirs[0].join("pids.max"), POD_PIDS_MAX.to_string()).unwrap();
    dirs
}

/// Spawns `cmd` (which unshares everything else) in a new user namespace whose 65,536 ids are
/// the host's `host_base..`, joined to `cgroups`, as root of that namespace: the pre-exec hook
/// unshares the user namespace and waits while this process writes the id maps, then becomes
/// uid/gid 0 there (as runc does for a pod).
fn spawn_in_user_namespace(mut cmd: Command, host_base: u32, cgroups: &[PathBuf]) -> Child {
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (ready_r, ready_w) = nix::unistd::pipe2(cloexec).unwrap();
    let (go_r, go_w) = nix::unistd::pipe2(cloexec).unwrap();
    let procs: Vec<std::ffi::CString> = cgroups
        .iter()
        .map(|c| std::ffi::CString::new(c.join("cgroup.procs").to_str().unwrap()).unwrap())
        .collect();
    let (ready_fd, go_fd) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
    // SAFETY: only async-signal-safe system calls between fork and exec; the buffers were
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return fail();
                }
                libc::close(fd);
            }
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return fail();
            }
            let pid = libc::getpid().to_ne_bytes();
            let mut go = 0u8;
            if libc::write(ready_fd, pid.as_ptr().cast(), 4) != 4
                || libc::read(go_fd, (&mut go as *mut u8).cast(), 1) != 1
                // Group 0 as a supplementary group, as the runtime gives uid 0.
                || libc::setgroups(1, [0 as libc::gid_t].as_ptr()) != 0
                || libc::setresgid(0, 0, 0) != 0
                || libc::setresuid(0, 0, 0) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
    // spawn() returns only after exec, which waits for the maps: spawn from another thread.
    // The child's pipe ends stay open here until the fork is done (then spawn returns).
    let spawner = std::thread::spawn(move || {
        let child = cmd.spawn();
        drop((ready_w, go_r));
        child
    });
    let mut pid = [0u8; 4];
    let mut ready = File::from(ready_r);
    if let Err(e) = ready.read_exact(&mut pid) {
        panic!(
            "the pod's process did not start ({e}): {:?}",
            spawner.join()
        );
    }
    let pid = i32::from_ne_bytes(pid);
    let map = format!("0 {host_base} {POD_IDS}");
    std::fs::write(format!("/proc/{pid}/uid_map"), &map).unwrap();
    std::fs::write(format!("/proc/{pid}/gid_map"), &map).unwrap();
    File::from(go_w).write_all(b"g").unwrap();
    spawner.join().unwrap().expect("spawn the pod")
}

/// Starts 40 background processes, more than the tool's `pids: 16` allows.
const FORK_40: &str = "i=0; while [ $i -lt 40 ]; do sleep 3 & i=$((i+1)); done";

fn output(v: &Value) -> String {
    v["output"].as_str().unwrap_or_default().to_string()
}

/// Waits (bounded) until no process of the pod is a zombie; returns the zombies left.
fn zombies_after_settling(pod: &Pod) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let zombies: Vec<i32> = pod
            .processes()
            .into_iter()
            .filter(|(_, s)| *s == 'Z')
            .map(|(p, _)| p)
            .collect();
        if zombies.is_empty() || Instant::now() > deadline {
            return zombies;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runner_in_a_user_namespaced_pod_serves_enforces_and_reaps() {
    require_pod_sim!();
    let pod = Pod::start(300_000, false, false);
    let banner = pod.stderr();

    // The runner holds exactly the documented capabilities, none of the host's.
    let runner = pod
        .find(&["/toolwarden/toolwarden", "serve"])
        .expect("runner process");
    let status = std::fs::read_to_string(format!("/proc/{runner}/status")).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:\t"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(cap_eff, pod_caps_mask(), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");

    // The banner, the API and the metrics tell what the probe measured.
    let isolation = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("isolation: "))
        .unwrap_or_else(|| panic!("no isolation line in:\n{banner}"))
        .to_string();
    for want in [
        "user namespace: yes (sandbox ids 0-65534 are the runner's 1-65535)",
        "root switch: pivot_root",
        "; rlimit;",
        &format!("pids.max={POD_PIDS_MAX}"),
    ] {
        assert!(isolation.contains(want), "want {want:?} in {isolation:?}");
    }
    let (status, tools) = pod.http("GET", "/v1/tools", None);
    assert_eq!(status, 200, "{tools}");
    assert_eq!(tools["isolation"], Value::String(isolation.clone()));

    // Calls succeed, as the sandbox user mapped inside the pod's ids.
    let (status, v) = pod.call("id; cat /proc/self/uid_map; ls -A /sys | wc -l");
    assert_eq!(status, 200, "{v}\n{}", pod.stderr());
    let out = output(&v);
    assert!(
        out.starts_with("uid=65534(nobody) gid=65534(nogroup)\n"),
        "{out}"
    );
    let map: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(map, ["0", "1", "65535"], "{out}");
    assert_eq!(out.lines().nth(2), Some("0"), "/sys is not empty: {out}");
    // A file secret reaches its sandbox, owned by the sandbox user (chown in the pod).
    let (status, v) = pod.http("POST", "/v1/tools/read-secret/invoke", Some("{}"));
    assert_eq!(status, 200, "{v}\n{}", pod.stderr());
    // (The value itself would be redacted from the output: its digest is compared.)
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(SECRET));
    assert_eq!(output(&v), format!("-r--------\n{digest}\n"), "{v}");
    // Attacks on what the pod's root owns: its files, by owner or by group (the runtime gives
    // the runner group 0; the zygote drops it, so sandboxes cannot inherit it).
    let (_, v) = pod.call(
        "cat /etc/runner-only 2>&1; cat /etc/runner-group-only 2>&1; grep Groups /proc/self/status",
    );
    let out = output(&v);
    assert!(!out.contains("secret of the runner"), "{out}");
    assert_eq!(out.matches("Permission denied").count(), 2, "{out}");
    assert!(
        out.trim_end().ends_with("Groups:"),
        "supplementary groups: {out}"
    );
    // The zygote removed the runtime's /proc masks in its own mount namespace only: the
    // runner's HTTP side keeps them, and every sandbox masks its fresh procfs again.
    let masked_in = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/proc/keys"))
    };
    assert!(masked_in(runner), "the runner lost its /proc masks");
    let zygote = pod
        .find(&["/toolwarden/toolwarden", "sandbox-zygote"])
        .expect("zygote process");
    assert!(!masked_in(zygote), "the zygote kept the /proc masks");
    let (_, v) = pod.call(
        "wc -c < /proc/keys; wc -c < /proc/timer_list; \
         { echo 1 > /proc/sys/kernel/ns_last_pid; } 2>&1; ls /dev | tr '\\n' ' '",
    );
    let out = output(&v);
    assert!(out.starts_with("0\n0\n"), "masked paths readable: {out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(
        out.ends_with("fd null ptmx pts random shm stderr stdin stdout tty urandom zero "),
        "devices: {out}"
    );
    let (_, metrics) = pod.http("GET", "/metrics", None);
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    let user_ns_line = format!(
        "sandbox_enforcement{{tool=\"{TOOL}\",limit=\"userNamespace\",mechanism=\"yes\"}} 1"
    );
    assert!(metrics.contains(&user_ns_line), "{metrics}");

    // Seen from the host, the tool runs as the pod's uid 65535, never a host id outside it.
    // (The tool's timeout is 5 s: the sleep is caught while it runs.)
    let marker = "0.937";
    let sleeper = {
        let code = format!("sleep {marker}");
        let pod_ref = &pod;
        std::thread::scope(|s| {
            let call = s.spawn(move || pod_ref.call(&code));
            let deadline = Instant::now() + Duration::from_secs(20);
            let found = loop {
                if let Some(p) = find_anywhere(&["sleep", marker]) {
                    break Some(p);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let uid = found.map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).unwrap());
            let _ = call.join();
            uid
        })
    }
    .expect("the sleeping tool was never seen");
    let want = pod.host_base + 65_535;
    assert!(
        sleeper.contains(&format!("Uid:\t{want}\t{want}\t{want}\t{want}")),
        "{sleeper}"
    );

    // Each limit is enforced (rlimit mode: the pod's cgroup tree is read-only).
    let (status, v) = pod.call("tail /dev/zero 2>&1 | head -c 200; echo; echo done");
    assert_eq!(status, 200, "{v}");
    assert!(output(&v).ends_with("done\n"), "{v}");
    let memory = pod
        .audit()
        .into_iter()
        .rev()
        .find(|r| r["event"] == "finished");
    let memory = memory.expect("a finished record");
    assert_eq!(memory["enforcement"]["memory"], "rlimit", "{memory}");
    assert_eq!(memory["enforcement"]["userNamespace"], true, "{memory}");
    let (status, v) = pod.call("tail /dev/zero; echo rc=$?");
    assert!(
        output(&v).contains("rc=1"),
        "memory bomb was not refused: {status} {v}"
    );
    // (A shell that cannot fork gives up: the loop runs in its own shell.)
    let (status, v) = pod.call(&format!("sh -c '{FORK_40}' 2>&1; echo rc=$?"));
    let out = output(&v);
    assert!(
        status == 200 && out.contains("can't fork") && out.ends_with("rc=2\n"),
        "{v}"
    );
    let started = Instant::now();
    let (status, v) = pod.call("f(){ f|f& }; f; sleep 100");
    assert_eq!(status, 504, "fork bomb: {v}");
    let (status, v) = pod.call("while :; do :; done");
    assert_eq!(status, 504, "busy loop: {v}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    let (status, v) = pod.call("head -c 100000 /dev/zero | tr '\\0' a");
    assert_eq!(status, 200, "{v}");
    assert_eq!(output(&v).len(), 4096, "output cap: {v}");
    assert_eq!(v["outputTruncated"], true, "{v}");

    // A second pod on the same node: its own ids, its own process budget. While a call of pod
    // A holds every process its limit allows, pod B's calls still run.
    let other = Pod::start(400_000, false, false);
    std::thread::scope(|s| {
        let hog = s.spawn(|| {
            // At its limit, then held there for 0.5 s (builtins and exec need no fork).
            pod.call(&format!(
                "sh -c '{FORK_40}' 2>/tmp/e; read -r why </tmp/e; echo \"$why\"; exec sleep 0.5"
            ))
        });
        // Pod B calls once pod A's sleepers (its sandbox uid, seen from the host) fill its
        // budget: 16 processes, 3 of them shells.
        let a_uid = pod.host_base + 65_535;
        let deadline = Instant::now() + Duration::from_secs(30);
        while count_processes(&["sleep", "3"], a_uid) < 12 {
            assert!(
                Instant::now() < deadline,
                "pod A never reached its process limit"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..3 {
            let (status, v) = other.call("echo ok");
            assert_eq!((status, output(&v)), (200, "ok\n".to_string()), "{v}");
        }
        let (status, v) = hog.join().unwrap();
        assert!(status == 200 && output(&v).contains("can't fork"), "{v}");
    });
    drop(other);

    // Many calls, failures included: nothing is left as a zombie in the pod (the runner is its
    // PID 1; its init reaps, the zygote reaps what it started).
    for i in 0..60 {
        let code = match i % 6 {
            0 => "exit 3",
            1 => "sleep 30",
            2 => "sleep 30 & echo background",
            3 => "tail /dev/zero",
            _ => "echo ok",
        };
        let (status, _) = pod.call(code);
        assert!(matches!(status, 200 | 502 | 504), "{code}: {status}");
    }
    // An orphan of the pod's pid namespace goes to its PID 1 (the runner's init), which must
    // reap it: a shell joins the namespace, starts a sleep in the background and exits; once
    // the orphan is seen, it is killed, and its pid must disappear (a zombie has no command
    // line, so it is followed by pid).
    let orphan_maker = Command::new("nsenter")
        .args(["--target", &pod.pid1.to_string(), "--pid", "--"])
        .args(["sh", "-c", "sleep 29.31 & exit 0"])
        .status()
        .expect("nsenter");
    assert!(orphan_maker.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let orphan = loop {
        if let Some(pid) = find_anywhere(&["sleep", "29.31"]) {
            break pid;
        }
        assert!(Instant::now() < deadline, "the orphan sleep never ran");
        std::thread::sleep(Duration::from_millis(10));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(orphan),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{orphan}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the orphan {orphan} was never reaped: {:?}",
            pod.processes()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let zombies = zombies_after_settling(&pod);
    assert!(zombies.is_empty(), "zombies in the pod: {zombies:?}");
    let (_, metrics) = pod.http("GET", "/metrics", None);
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(metrics.contains("pid_namespace_zombies 0\n"), "{metrics}");
    let (status, v) = pod.call("echo still serving");
    assert_eq!(
        (status, output(&v)),
        (200, "still serving\n".to_string()),
        "{v}"
    );
}

#[test]
fn without_pivot_root_and_from_image_volumes_sandboxes_still_run() {
    require_pod_sim!();
    // containerd's RuntimeDefault seccomp profile refuses pivot_root.
    let pod = Pod::start(500_000, true, true);
    let banner = pod.stderr();
    // The image volume without /tmp: its tool is refused, naming what is missing.
    assert!(
        banner.contains("lacks the mount point(s) /tmp") && banner.contains("no-tmp"),
        "{banner}"
    );
    assert!(
        banner.contains("root switch: move-mount + chroot (pivot_root refused)"),
        "{banner}"
    );
    let (status, v) = pod.call("ls /; cd /; cd ..; cd ..; pwd; ls /");
    assert_eq!(status, 200, "{v}\n{}", pod.stderr());
    let out = output(&v);
    let roots: Vec<&str> = out.split("/\n").collect();
    assert_eq!(roots.len(), 2, "{out}");
    // The same tree before and after climbing: the image's, nothing of the runner's.
    assert_eq!(roots[0], roots[1], "{out}");
    for entry in ["bin", "proc", "tmp", "dev"] {
        assert!(
            roots[0].lines().any(|l| l == entry),
            "{entry} missing: {out}"
        );
    }
    for runner_entry in ["sim", "toolwarden", "wrap", "usr"] {
        assert!(
            !roots[0].lines().any(|l| l == runner_entry),
            "{runner_entry}: {out}"
        );
    }
    // From a read-only image volume, with a file secret bound onto the image's own target;
    // nothing unpacked or cached.
    let (status, v) = pod.http("POST", "/v1/tools/read-secret/invoke", Some("{}"));
    assert_eq!(status, 200, "{v}\n{}", pod.stderr());
    let (_, v) = pod.call("touch /bin/x 2>&1; echo end");
    assert!(output(&v).contains("Read-only file system"), "{v}");
    let cache = pod.dir.path().join("pod/cache");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "something was unpacked"
    );
    // The tool cannot switch roots itself.
    let (_, v) = pod.call("chroot /tmp /bin/true 2>&1; mount -t tmpfs none /tmp 2>&1; echo end");
    let out = output(&v);
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(out.ends_with("end\n"), "{out}");
}

#[test]
fn a_pod_without_the_id_map_capabilities_is_reported_as_such() {
    require_pod_sim!();
    // A runner pod that forgot SETUID cannot map a sandbox's ids: the probe finds out by
    // writing the map, and the banner and the API say so instead of "yes".
    let caps: Vec<&str> = RUNNER_POD_CAPABILITIES
        .iter()
        .copied()
        .filter(|c| *c != "SETUID")
        .collect();
    let pod = Pod::start_with_caps(600_000, false, false, &caps);
    let banner = pod.stderr();
    let isolation = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("isolation: "))
        .unwrap_or_else(|| panic!("no isolation line in:\n{banner}"))
        .to_string();
    assert!(
        isolation.contains("user namespace: no (writing uid_map \"0 1 65535\"")
            && isolation.contains("EPERM")
            && isolation.contains("(MapWriteFailed)"),
        "{isolation}"
    );
    let (status, tools) = pod.http("GET", "/v1/tools", None);
    assert_eq!(status, 200, "{tools}");
    assert_eq!(tools["isolation"], Value::String(isolation));
}

#[test]
fn a_pod_that_cannot_drop_group_0_refuses_to_run_sandboxes() {
    require_pod_sim!();
    // The runtime gives the pod's root the supplementary group 0. Without SETGID the zygote
    // cannot drop it, and a sandbox would keep it (setgroups is denied there): it refuses.
    let caps: Vec<&str> = RUNNER_POD_CAPABILITIES
        .iter()
        .copied()
        .filter(|c| *c != "SETGID")
        .collect();
    let pod = Pod::spawn(700_000, false, false, &caps);
    let deadline = Instant::now() + Duration::from_secs(60);
    while pod.alive() {
        assert!(
            Instant::now() < deadline,
            "runner still up:\n{}",
            pod.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stderr = pod.stderr();
    assert!(
        stderr.contains("cannot drop the supplementary groups")
            && stderr.contains("the sandbox engine could not start"),
        "{stderr}"
    );
}
