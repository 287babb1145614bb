//! cgroup v2 only, the mode real nodes run: swap counts against the memory limit (its
//! allowance is 0), and per-call cgroups live below the engine's own cgroup (systemd's
//! delegation rules).
//! `scripts/vm-test.sh` runs these in a pure cgroup v2 guest, with and without systemd and
//! with a swap device. On a cgroup v1 host they print SKIPPED, except under
//! `TOOLWARDEN_TEST_CGROUP=v2` (set by the VM script), where a v1 host is a failure.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{run, sh};

/// True on a cgroup v2 host; prints SKIPPED (or panics where v2 was promised) otherwise.
fn cgroup_v2() -> bool {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return true;
    }
    if std::env::var("TOOLWARDEN_TEST_CGROUP").is_ok_and(|v| v == "v2") {
        panic!("TOOLWARDEN_TEST_CGROUP=v2 but /sys/fs/cgroup is not a cgroup v2 hierarchy");
    }
    eprintln!("SKIPPED: cgroup v1 host; scripts/vm-test.sh runs this in a cgroup v2 guest");
    false
}

/// Total swap in bytes, from /proc/swaps.
fn swap_bytes() -> u64 {
    std::fs::read_to_string("/proc/swaps")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// This process's cgroup, as a path under /sys/fs/cgroup.
fn own_cgroup() -> PathBuf {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))
}

/// Memory bombs that survive a 64 MiB limit when swap sits outside it (the bug libcgroups 0.7
/// left): one process that needs 128 MiB at once, and three processes that each fit but hold
/// 32 MiB at the same time (each dd blocks writing into a pipe nobody reads until `sleep`
/// exits).
const SWAP_BOMBS: [&str; 2] = [
    "dd if=/dev/zero of=/dev/null bs=128M count=1",
    "for i in 1 2 3; do dd if=/dev/zero bs=32M count=1 2>/dev/null | sleep 4 & done; wait",
];

/// `oom_kill` of a cgroup v2 `memory.events`.
fn oom_kills(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join("memory.events"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.parse().ok())
        .expect("oom_kill in memory.events")
}

/// The control: each bomb, run on the host in a cgroup with the same memory limit but swap
/// left unlimited, is not OOM-killed. So the sandbox's OOM kills are the swap limit's doing,
/// not a guest that cannot swap. `parent` has the memory controller enabled for its children.
fn bombs_survive_with_unlimited_swap(parent: &Path) {
    for (i, bomb) in SWAP_BOMBS.into_iter().enumerate() {
        let control = parent.join(format!("swap-control-{}-{i}", std::process::id()));
        std::fs::create_dir(&control).unwrap();
        std::fs::write(control.join("memory.max"), "67108864").unwrap();
        std::fs::write(control.join("memory.swap.max"), "max").unwrap();
        let procs = control.join("cgroup.procs");
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ >{} && {bomb}", procs.display()))
            .status()
            .unwrap();
        let kills = oom_kills(&control);
        std::fs::remove_dir(&control).unwrap();
        assert!(
            status.success() && kills == 0,
            "control `{bomb}` with unlimited swap: {status}, {kills} OOM kills"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_counts_against_the_memory_limit() {
    require_root!();
    if !cgroup_v2() {
        return;
    }
    let rootfs = common::busybox_rootfs();
    let engine = common::engine();
    let limits = common::limits(); // 64 MiB of memory
    let pool = engine.pool(common::spec(&rootfs, limits, 0)).await.unwrap();
    if std::env::var("TOOLWARDEN_TEST_EXPECT_SWAP").is_ok_and(|v| v == "1") {
        assert!(
            swap_bytes() >= 256 << 20,
            "the VM promised swap: {}",
            swap_bytes()
        );
        // The engine moved this process into a leaf; its parent is the delegated cgroup.
        bombs_survive_with_unlimited_swap(own_cgroup().parent().unwrap());
    }

    for bomb in SWAP_BOMBS {
        let o = run(&pool, sh(bomb)).await;
        assert!(
            o.oom_killed && !o.timed_out,
            "`{bomb}` was not OOM-killed: {o:?}"
        );
        // The peak counts memory and swap (memory.peak + memory.swap.peak where the kernel
        // has the latter): at the limit, since the swap allowance is 0.
        let peak = o.peak_memory_bytes.expect("a peak on cgroup v2");
        assert!(
            (60 << 20..=(64 << 20) + (1 << 20)).contains(&peak),
            "`{bomb}`: peak {peak} should sit at the 64 MiB limit: {o:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_cgroups_live_below_the_engines_own_cgroup() {
    require_root!();
    if !cgroup_v2() {
        return;
    }
    let rootfs = common::busybox_rootfs();
    let engine = common::engine();
    let pool = engine
        .pool(common::spec(&rootfs, common::limits(), 1))
        .await
        .unwrap();
    // A call running now: its cgroup exists until it ends.
    let call = tokio::spawn({
        let pool = pool.clone();
        async move { run(&pool, sh("sleep 2")).await }
    });
    // The engine moved this process into a leaf of its own cgroup, so walk up from there.
    let own = own_cgroup();
    let delegated = own.parent().unwrap().join("toolwarden");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // Only containers whose limits are applied (libcontainer creates the directory first).
    let limited = |p: &PathBuf| {
        std::fs::read_to_string(p.join("memory.max")).is_ok_and(|m| m.trim() == "67108864")
    };
    let containers = loop {
        let found: Vec<PathBuf> = std::fs::read_dir(&delegated)
            .map(|rd| rd.flatten().map(|e| e.path()).filter(limited).collect())
            .unwrap_or_default();
        if !found.is_empty() || std::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !containers.is_empty(),
        "no per-call cgroup under {} (own cgroup {})",
        delegated.display(),
        own.display()
    );
    for dir in &containers {
        let swap = std::fs::read_to_string(dir.join("memory.swap.max")).unwrap();
        assert_eq!(
            swap,
            "0\n",
            "{}: swap outside the memory limit",
            dir.display()
        );
    }
    if own.parent().unwrap() != Path::new("/sys/fs/cgroup") {
        assert!(
            !Path::new("/sys/fs/cgroup/toolwarden").exists(),
            "per-call cgroups at the root of the tree, outside the engine's own"
        );
    }
    let o = call.await.unwrap();
    assert_eq!(o.exit_code, Some(0), "{o:?}");
}
