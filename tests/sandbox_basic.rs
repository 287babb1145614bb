mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_roundtrip_cold_and_warm() {
    require_root!();
    let rootfs = common::busybox_rootfs();
    let engine = common::engine();
    for warm in [0, 2] {
        let pool = engine
            .pool(common::spec(&rootfs, common::limits(), warm))
            .await
            .unwrap();
        let mut inv = common::sh("cat; echo out; echo err >&2; id -u; exit 3");
        inv.stdin = b"in:".to_vec();
        let o = common::run(&pool, inv).await;
        assert_eq!(common::text(&o.stdout), "in:out\n65534\n", "{o:?}");
        assert_eq!(common::text(&o.stderr), "err\n");
        assert_eq!(o.exit_code, Some(3));
        assert!(!o.timed_out && !o.oom_killed);
        assert!(o.peak_memory_bytes.unwrap() > 0);
    }
}
