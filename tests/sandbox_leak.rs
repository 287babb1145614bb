//! After 1,000 calls including timeouts and OOM kills, nothing is left behind.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

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
            // All at once: a bomb that grows slowly may meet the timeout first in an
            // emulated guest (scripts/vm-test.sh).
            53 => "dd if=/dev/zero of=/dev/null bs=128M count=1",
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
    let mut left = common::engine_leftovers(&common::state_root(), zpid);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = common::engine_leftovers(&common::state_root(), zpid);
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(engine);
    assert!(
        !Path::new(&format!("/proc/{zpid}")).exists(),
        "zygote still running"
    );
    common::wait_removed(&common::state_root()).await;
}
