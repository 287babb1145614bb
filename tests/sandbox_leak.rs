//! After 1,000 calls including timeouts and OOM kills, nothing is left behind.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

/// Everything that belongs to zygote `zpid`: state dirs, bundles, cgroups, keeper processes.
fn leftovers(state_root: &Path, zpid: u32) -> Vec<String> {
    let prefix = format!("tw-{zpid}-");
    let mut out = Vec::new();
    let mut scan = |dir: &Path| {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    out.push(e.path().display().to_string());
                }
            }
        }
    };
    scan(state_root);
    scan(&state_root.join("bundles"));
    for e in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        scan(&e.path().join("toolwarden"));
    }
    if let Ok(kids) = std::fs::read_to_string(format!("/proc/{zpid}/task/{zpid}/children")) {
        out.extend(kids.split_whitespace().map(|p| format!("process {p}")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_calls_leave_nothing_behind() {
    require_root!();
    let rootfs = common::busybox_rootfs();
    let engine = common::engine();
    let zpid = engine.zygote_pid();
    let mut limits = common::limits();
    limits.timeout = Duration::from_millis(1500);
    let pool = engine.pool(common::spec(&rootfs, limits, 4)).await.unwrap();
    let (mut timeouts, mut ooms) = (0, 0);
    for i in 0..1000 {
        let script = match i % 100 {
            17 => "while :; do :; done",
            53 => "tail /dev/zero",
            _ => "echo ok",
        };
        let o = common::run(&pool, common::sh(script)).await;
        match i % 100 {
            17 => {
                assert!(o.timed_out, "{o:?}");
                timeouts += 1
            }
            53 => {
                assert!(o.oom_killed, "{o:?}");
                ooms += 1
            }
            _ => assert_eq!(common::text(&o.stdout), "ok\n", "call {i}: {o:?}"),
        }
    }
    assert_eq!((timeouts, ooms), (10, 10));
    drop(pool);
    // Parked containers exit on EOF of their control pipe and their keepers delete them;
    // wait for that (bounded) instead of sleeping a fixed time.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut left = leftovers(&common::state_root(), zpid);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = leftovers(&common::state_root(), zpid);
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(engine);
    assert!(
        !Path::new(&format!("/proc/{zpid}")).exists(),
        "zygote still running"
    );
    common::wait_removed(&common::state_root()).await;
}
