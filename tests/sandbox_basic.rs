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

/// Dropping the engine removes its state root (no /run/twtest-* left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_drop_removes_state_root() {
    require_root!();
    let rootfs = common::busybox_rootfs();
    let engine = common::engine();
    let pool = engine
        .pool(common::spec(&rootfs, common::limits(), 2))
        .await
        .unwrap();
    let o = common::run(&pool, common::sh("echo hi")).await;
    assert_eq!(common::text(&o.stdout), "hi\n");
    let root = common::state_root();
    // The zygote keeps container states on a private tmpfs mounted on this directory.
    let private = toolwarden::sandbox::names::zygote_dir(&root, engine.zygote_pid());
    assert!(private.is_dir(), "{} missing", private.display());
    // Parked containers are still there when the pool and engine go away.
    drop(pool);
    drop(engine);
    // A refill in flight keeps the engine alive until its container is parked (then dropped).
    common::wait_removed(&root).await;
}

/// A burst of calls beyond `max_running` waits instead of creating containers: with a cap of 2,
/// never more than 2 tools run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_is_capped_by_max_running() {
    use std::os::unix::fs::PermissionsExt;
    require_root!();
    let rootfs = common::busybox_rootfs();
    // Shared rw dir: each running tool holds a `run.<i>` entry there until released.
    let shared = rootfs.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cfg = common::config();
    cfg.max_running = 2;
    cfg.max_concurrent_builds = 1;
    let engine = toolwarden::sandbox::Sandboxes::start(&cfg).unwrap();
    let mut spec = common::spec(&rootfs, common::limits(), 0);
    spec.mounts.push(toolwarden::sandbox::BindMount {
        source: shared.clone(),
        destination: "/work".into(),
        read_only: false,
    });
    let pool = engine.pool(spec).await.unwrap();
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let script = format!(
                    "mkdir /work/run.{i}; ls -d /work/run.* | wc -l; \
                     while [ ! -e /work/release ]; do sleep 0.01; done; rmdir /work/run.{i}"
                );
                common::run(&pool, common::sh(&script)).await
            })
        })
        .collect();
    let running = || {
        std::fs::read_dir(&shared)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("run."))
            .count()
    };
    // Wait (bounded) until two tools run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while running() < 2 {
        assert!(std::time::Instant::now() < deadline, "tools did not start");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Without the cap, the other four (cold start ~25 ms each here) would show up within this
    // window; with it, none may while the first two hold their slots.
    let window = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < window {
        assert_eq!(running(), 2, "more than max_running tools at once");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    std::fs::write(shared.join("release"), "").unwrap();
    for c in calls {
        let o = c.await.unwrap();
        assert_eq!(o.exit_code, Some(0), "{o:?}");
        let seen: usize = common::text(&o.stdout).trim().parse().unwrap();
        assert!(seen <= 2, "a tool saw {seen} tools running: {o:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_start_with_default_signals_like_from_a_shell() {
    require_root!();
    let rootfs = common::busybox_rootfs();
    let engine = common::engine();
    let pool = engine
        .pool(common::spec(&rootfs, common::limits(), 1))
        .await
        .unwrap();
    // No signal ignored or blocked (the runner ignores SIGPIPE), so a pipeline ends
    // the usual way: `yes` dies of SIGPIPE once `head` has its line.
    let o = common::run(
        &pool,
        common::sh("grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -n 1"),
    )
    .await;
    assert_eq!(
        common::text(&o.stdout),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\ny\n",
        "{o:?}"
    );
    assert_eq!(common::text(&o.stderr), "", "{o:?}");
    assert_eq!(o.exit_code, Some(0));
}

/// A zygote that cannot start says why on stderr, through tracing, with the error's stable
/// reason; the runner reports only that it did not start. Needs no root: started by hand, the
/// zygote fails at its first check (no runner socket) before touching anything, without
/// aborting on the missing fd.
#[test]
fn a_failed_zygote_logs_its_reason() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .arg(toolwarden::sandbox::ZYGOTE_SUBCOMMAND)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ERROR")
            && stderr.contains("sandbox zygote failed")
            && stderr.contains("no runner socket on fd 3")
            && stderr.contains("ZygoteMisconfigured"),
        "{stderr}"
    );
}
