//! DEGRADED mode, reproduced for real: the engine's zygote sees /sys/fs/cgroup read-only (as in
//! a user-namespaced Kubernetes pod), so no per-call cgroup can be created. The engine must say
//! so, fall back to rlimits (address space, processes, CPU seconds, file size) and still contain
//! every bomb, without creating or leaving anything behind.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{run, sh, text};
use toolwarden::sandbox::{Enforcement, Mechanism, Outcome, Pool};

const SIGXCPU: i32 = libc::SIGXCPU;
const SIGKILL: i32 = libc::SIGKILL;

/// Sizes of the sandboxed process trees under zygote `root`, one per container: non-root
/// descendants (keepers run as root, sandboxed processes as the sandbox uid) grouped by their
/// topmost non-root ancestor, the container's init.
fn sandboxed_trees(root: u32) -> Vec<usize> {
    let mut procs = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
        };
        if let (Some(ppid), Some(uid)) = (field("PPid:"), field("Uid:")) {
            procs.insert(pid, (ppid, uid));
        }
    }
    let descends = |mut pid: u32| {
        while let Some(&(ppid, _)) = procs.get(&pid) {
            if ppid == root {
                return true;
            }
            pid = ppid;
        }
        false
    };
    let sandboxed = |pid: &u32| procs.get(pid).is_some_and(|&(_, uid)| uid != 0);
    let mut trees: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for pid in procs.keys().filter(|p| sandboxed(p) && descends(**p)) {
        let mut top = *pid;
        while let Some(&(ppid, _)) = procs.get(&top) {
            if !sandboxed(&ppid) {
                break;
            }
            top = ppid;
        }
        *trees.entry(top).or_default() += 1;
    }
    trees.into_values().collect()
}

fn assert_rlimits(e: &Enforcement) {
    assert_eq!(
        (e.memory, e.pids, e.cpu, e.file_size),
        (
            Mechanism::Rlimit,
            Mechanism::Rlimit,
            Mechanism::Rlimit,
            Mechanism::Rlimit
        ),
        "{e:?}"
    );
    // No device cgroup either: only the explicit device list.
    assert_eq!(e.devices, Mechanism::None, "{e:?}");
    assert_eq!(e.tmp_size, Mechanism::Tmpfs, "{e:?}");
    assert!(e.seccomp, "{e:?}");
}

async fn checked(pool: &Pool, script: &str) -> Outcome {
    let o = run(pool, sh(script)).await;
    // Every outcome reports the enforcement actually in force.
    assert_eq!(o.enforcement, pool.enforcement(), "{script}: {o:?}");
    o
}

/// Serializes the tests of this file: without a user namespace, RLIMIT_NPROC counts the
/// processes of the sandbox uid over all sandboxes, so a fork bomb running in parallel with
/// another test's calls would make their forks fail.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_cgroupfs_degrades_to_rlimits_and_contains_bombs() {
    require_root!();
    let _serial = SERIAL.lock().await;
    // As in the pod: no user namespace for the sandboxes (there, a nested one cannot be set
    // up; here the pool refuses one because the rootfs is not world-traversable).
    scenario(false).await;
    // And with a user namespace (a host with user namespaces but a read-only cgroup tree).
    scenario(true).await;
}

/// A rootfs the user-namespace root cannot traverse: the pool runs without a
/// user namespace, as in a pod (where a nested one cannot be set up).
fn deny_user_namespace(rootfs: &common::Rootfs) {
    std::fs::set_permissions(
        rootfs.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
}

async fn scenario(userns: bool) {
    eprintln!("--- read-only cgroupfs, user namespace: {userns}");
    let rootfs = common::busybox_rootfs();
    if !userns {
        deny_user_namespace(&rootfs);
    }
    let cfg = common::config();
    let state_root = cfg.state_root.clone();
    let engine = common::engine_with_readonly_cgroupfs(cfg)
        .unwrap_or_else(|e| panic!("engine on a read-only cgroupfs: {e}"));
    let zpid = engine.zygote_pid();

    // The zygote found the tree read-only and says so.
    let why = engine
        .host()
        .cgroup_unusable
        .clone()
        .expect("cgroups reported usable on a read-only cgroupfs");
    assert!(why.contains("Read-only file system"), "{why}");
    assert_eq!(engine.host().cgroup_mechanism(), Mechanism::Rlimit);
    // ... and names the outer bound: the limits of the cgroup the engine runs in.
    let outer = engine.host().outer_bound.clone().expect("outer bound");
    assert!(
        outer.contains("pids.max=") && !outer.contains("=?"),
        "{outer}"
    );

    let mut limits = common::limits();
    // CPU budget = timeout x quota = 4 s x 0.5 core = 2 s of CPU time per process.
    limits.timeout = Duration::from_secs(4);
    limits.cpu_millicores = Some(500);
    let pool = engine
        .pool(common::spec(&rootfs, limits.clone(), 2))
        .await
        .expect("pool on a read-only cgroupfs");
    assert_rlimits(&pool.enforcement());
    assert_eq!(pool.enforcement().user_namespace, userns);

    // Warm containers get built and parked without any cgroup being created for them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.warm_len() < 2 {
        assert!(Instant::now() < deadline, "warm pool never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(common::cgroups_of(zpid), Vec::<std::path::PathBuf>::new());

    // A normal call: stdin -> stdout, stderr, exit code, the sandbox uid.
    let mut inv = sh("cat; echo out; echo err >&2; id -u; id -g; exit 3");
    inv.stdin = b"in:".to_vec();
    let o = run(&pool, inv).await;
    assert_eq!(text(&o.stdout), "in:out\n65534\n65534\n", "{o:?}");
    assert_eq!(text(&o.stderr), "err\n", "{o:?}");
    assert_eq!(o.exit_code, Some(3), "{o:?}");
    assert!(!o.timed_out && !o.oom_killed, "{o:?}");
    assert_rlimits(&o.enforcement);
    // Peak memory is still reported (max RSS from wait4, not a cgroup counter).
    assert!(o.peak_memory_bytes.is_some_and(|b| b > 0), "{o:?}");

    // The limits are really installed in the tool process (soft and hard).
    let o = checked(
        &pool,
        "ulimit -v; ulimit -Hv; ulimit -u; ulimit -t; ulimit -f",
    )
    .await;
    let mem_kib = limits.memory_bytes.unwrap() / 1024;
    assert_eq!(
        text(&o.stdout),
        format!(
            "{mem_kib}\n{mem_kib}\n{}\n2\n{}\n",
            limits.pids,
            limits.file_size_bytes / 512
        ),
        "{o:?}"
    );

    // Memory bomb: allocations beyond RLIMIT_AS (64 MiB) are refused, so the tool fails by
    // itself (no OOM kill, nothing else on the host is pressed); its peak RSS stays under the
    // limit.
    let o = checked(&pool, "tail /dev/zero").await;
    assert!(!o.timed_out, "{o:?}");
    assert!(
        o.exit_code.is_some_and(|c| c != 0) || o.signal.is_some(),
        "{o:?}"
    );
    let peak = o.peak_memory_bytes.expect("peak memory");
    assert!(peak <= limits.memory_bytes.unwrap(), "{o:?}");
    eprintln!(
        "memory bomb: exit {:?}, signal {:?}, peak RSS {} KiB, stderr {:?}",
        o.exit_code,
        o.signal,
        peak / 1024,
        text(&o.stderr).trim()
    );
    // Holding 100 MB in memory (sort) is refused too.
    let o = checked(&pool, "head -c 100000000 /dev/zero | sort >/dev/null").await;
    assert!(!o.timed_out && o.exit_code != Some(0), "{o:?}");
    assert!(
        o.peak_memory_bytes.unwrap() <= limits.memory_bytes.unwrap(),
        "{o:?}"
    );
    eprintln!(
        "sort of 100 MB: exit {:?}, stderr {:?}",
        o.exit_code,
        text(&o.stderr).trim()
    );

    // Process cap: forks beyond RLIMIT_NPROC (32 tasks of the sandbox uid) fail. Without a
    // user namespace the count is the host uid's: the pool's parked containers and any
    // concurrent sandbox take from the same 32.
    let o = checked(
        &pool,
        "i=0; while [ $i -lt 64 ]; do sleep 5 & echo started; i=$((i+1)); done",
    )
    .await;
    let started = text(&o.stdout).lines().count();
    assert!(text(&o.stderr).contains("can't fork"), "{o:?}");
    assert!(
        (1..limits.pids as usize).contains(&started),
        "{started} forks: {o:?}"
    );
    eprintln!("process cap: {started} background forks succeeded, then \"can't fork\"");

    // Fork bomb: capped by RLIMIT_NPROC (sampled from the host while it runs), killed at the
    // timeout, the call returns.
    let sampler_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = sampler_stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut max = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            max = max.max(sandboxed_trees(zpid).into_iter().max().unwrap_or(0));
            std::thread::sleep(Duration::from_millis(50));
        }
        max
    });
    let o = checked(&pool, "f(){ f|f& }; f; sleep 100").await;
    sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_tasks = sampler.join().unwrap();
    assert!(o.timed_out && o.signal == Some(SIGKILL), "{o:?}");
    assert!(
        o.duration < limits.timeout + Duration::from_secs(2),
        "{o:?}"
    );
    eprintln!(
        "fork bomb: at most {max_tasks} processes in the sandbox; timed out {}, signal {:?}, after {:?}",
        o.timed_out, o.signal, o.duration
    );
    assert!(
        max_tasks > 4 && max_tasks <= limits.pids as usize,
        "fork bomb reached {max_tasks} processes (cap {})",
        limits.pids
    );

    // Busy loop: RLIMIT_CPU is 2 s soft, 3 s hard. The tool is the init of its pid namespace,
    // for which the kernel drops SIGXCPU (a default-action signal from inside), so the hard
    // limit's SIGKILL stops it, before the 4 s timeout; on a starved machine the timeout may
    // come first.
    let o = checked(&pool, "while :; do :; done").await;
    let by_rlimit = o.signal == Some(SIGKILL) && !o.timed_out;
    assert!(
        by_rlimit || (o.timed_out && o.signal == Some(SIGKILL)),
        "{o:?}"
    );
    assert!(
        o.duration < limits.timeout + Duration::from_secs(2),
        "{o:?}"
    );
    eprintln!(
        "busy loop (init) stopped by {} after {:?}",
        if by_rlimit {
            "RLIMIT_CPU hard limit"
        } else {
            "the timeout"
        },
        o.duration
    );
    // Any other process gets SIGXCPU at the soft limit (152 = 128 + SIGXCPU).
    let o = checked(&pool, "sh -c 'while :; do :; done'; echo rc=$?").await;
    assert!(
        text(&o.stdout) == format!("rc={}\n", 128 + SIGXCPU) || o.timed_out,
        "{o:?}"
    );
    assert!(
        o.duration < limits.timeout + Duration::from_secs(2),
        "{o:?}"
    );

    // FSIZE (2 MiB) still hits before the 4 MiB tmpfs.
    let o = checked(&pool, "dd if=/dev/zero of=/tmp/f bs=1M count=3").await;
    assert!(
        o.exit_code == Some(1) && text(&o.stderr).contains("File too large"),
        "{o:?}"
    );

    // The engine is unharmed: a normal call still works.
    let o = checked(&pool, "echo still-ok").await;
    assert_eq!(text(&o.stdout), "still-ok\n", "{o:?}");
    // At no point was a cgroup created for this zygote's containers.
    assert_eq!(common::cgroups_of(zpid), Vec::<std::path::PathBuf>::new());

    // Nothing of that zygote is left: no state dir, bundle, cgroup or process.
    drop(pool);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut left = common::engine_leftovers(&state_root, zpid);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = common::engine_leftovers(&state_root, zpid);
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(engine);
    assert!(
        !Path::new(&format!("/proc/{zpid}")).exists(),
        "zygote still running"
    );
    assert!(sandboxed_trees(zpid).is_empty());
    common::wait_removed(&state_root).await;
}

/// Environment variable that turns `crash_helper_runner` into the runner that gets killed.
const CRASH_CHILD: &str = "TW_DEGRADED_CRASH_CHILD";

/// Not a test on its own: the runner process that `runner_crash_leaves_no_sandboxed_process`
/// starts (this test binary again) and SIGKILLs in the middle of a call. Returns at once
/// otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_helper_runner() {
    if std::env::var_os(CRASH_CHILD).is_none() {
        return;
    }
    let rootfs = common::busybox_rootfs();
    // No user namespace, as in the pod.
    deny_user_namespace(&rootfs);
    let cfg = common::config();
    let state_root = cfg.state_root.clone();
    let engine = common::engine_with_readonly_cgroupfs(cfg).unwrap();
    let mut limits = common::limits();
    limits.timeout = Duration::from_secs(600);
    let pool = engine.pool(common::spec(&rootfs, limits, 0)).await.unwrap();
    println!("ZYGOTE {} {}", engine.zygote_pid(), state_root.display());
    let _ = pool.run(sh("sleep 1000")).await;
    unreachable!("the parent kills this process during the call");
}

/// Start time (clock ticks since boot) of a process, to tell it from a later one with its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The runner dies (SIGKILL) while a call runs, so nothing kills the tool through its pidfd or
/// timeout. The zygote's shutdown must still remove the container; without a cgroup to list
/// its processes it has to kill the container's init.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_crash_leaves_no_sandboxed_process() {
    require_root!();
    let _serial = SERIAL.lock().await;
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_helper_runner",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("ZYGOTE "))
    });
    let line = tokio::time::timeout(Duration::from_secs(60), line)
        .await
        .expect("runner child did not start an engine")
        .unwrap()
        .expect("runner child exited early");
    let mut words = line.split_whitespace().skip(1);
    let zpid: u32 = words.next().unwrap().parse().unwrap();
    let state_root = std::path::PathBuf::from(words.next().unwrap());
    // Wait for the tool to run, and remember its processes (pid, start time).
    let deadline = Instant::now() + Duration::from_secs(30);
    let tools = loop {
        let procs: Vec<(u32, u64)> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c == "sleep\x001000\x00")
            })
            .filter_map(|p| Some((p, start_time(p)?)))
            .collect();
        if !procs.is_empty() {
            break procs;
        }
        assert!(Instant::now() < deadline, "the tool never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sandboxed_trees(zpid).len(), 1, "{tools:?}");
    child.kill().unwrap();
    let _ = child.wait();
    // The zygote sees its runner gone, gives the keepers 10 s, then removes every container.
    let deadline = Instant::now() + Duration::from_secs(30);
    let alive = |tools: &[(u32, u64)]| -> Vec<u32> {
        tools
            .iter()
            .filter(|(p, t)| start_time(*p) == Some(*t))
            .map(|(p, _)| *p)
            .collect()
    };
    while (!alive(&tools).is_empty() || Path::new(&format!("/proc/{zpid}")).exists())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alive(&tools), Vec::<u32>::new(), "sandboxed tool survived");
    assert!(
        !Path::new(&format!("/proc/{zpid}")).exists(),
        "zygote still running"
    );
    assert_eq!(
        common::engine_leftovers(&state_root, zpid),
        Vec::<String>::new()
    );
    common::wait_removed(&state_root).await;
}
