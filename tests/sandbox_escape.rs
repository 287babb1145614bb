//! Escape attempts against real sandboxes; each must fail in the specific expected way.
mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Rootfs, run, sh, text};
use toolwarden::sandbox::{BindMount, Invocation, Pool};

/// Compiles tests/data/probe.c statically and installs it as /bin/probe in the rootfs.
fn install_probe(rootfs: &Rootfs) {
    let out = rootfs.dir.path().join("probe");
    let st = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/probe.c"))
        .status()
        .expect("gcc (needed to build the static escape probe)");
    assert!(st.success(), "gcc -static failed (need libc6-dev)");
    let dst = rootfs.path().join("bin/probe");
    std::fs::copy(&out, &dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn probe(args: &[&str]) -> Invocation {
    let mut argv = vec!["/bin/probe".to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    Invocation {
        argv,
        ..Invocation::default()
    }
}

async fn setup(warm: usize) -> (Rootfs, toolwarden::sandbox::Sandboxes, Pool) {
    let rootfs = common::busybox_rootfs();
    install_probe(&rootfs);
    let engine = common::engine();
    let pool = engine
        .pool(common::spec(&rootfs, common::limits(), warm))
        .await
        .unwrap();
    (rootfs, engine, pool)
}

async fn expect_probe(pool: &Pool, args: &[&str], want: &str) {
    let o = run(pool, probe(args)).await;
    assert_eq!(text(&o.stdout).trim(), want, "probe {args:?}: {o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangerous_syscalls_are_denied() {
    require_root!();
    let (_r, _e, pool) = setup(2).await;
    for (args, want) in [
        (&["bpf"][..], "EPERM"),
        (&["io_uring"], "EPERM"),
        (&["keyctl"], "EPERM"),
        (&["add_key"], "EPERM"),
        (&["ptrace"], "EPERM"),
        (&["process_vm_readv"], "EPERM"),
        (&["perf_event_open"], "EPERM"),
        (&["userfaultfd"], "EPERM"),
        (&["open_by_handle_at"], "EPERM"),
        (&["clone3"], "ENOSYS"),
        (&["clone_newuser"], "EPERM"),
        (&["unshare"], "EPERM"),
        (&["setns"], "EPERM"),
        (&["mount"], "EPERM"),
        (&["mount_cgroup"], "EPERM"),
        (&["chroot"], "EPERM"),
        (&["mknod"], "EPERM"),
        (&["netlink"], "EPERM"),
        (&["raw"], "EPERM"),
        (&["packet"], "EPERM"),
        (&["vsock"], "EPERM"),
        // The sandbox dies with its keeper; the tool cannot opt out.
        (&["pdeathsig"], "9"),
        (&["pdeathsig_clear"], "EPERM"),
    ] {
        expect_probe(&pool, args, want).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_caps_and_filesystem_are_locked_down() {
    require_root!();
    let (_r, _e, pool) = setup(1).await;
    let o = run(&pool, sh("grep -E '^(Uid|Gid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status")).await;
    let s = text(&o.stdout);
    for line in [
        "CapInh:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(s.contains(line), "missing {line:?} in {s}");
    }
    assert!(s.contains("Uid:\t65534\t65534\t65534\t65534"), "{s}");
    // Each write attempt must fail with the named error.
    for (script, err) in [
        ("touch /bin/evil", "Read-only file system"),
        (
            "echo 1 > /proc/sys/kernel/ns_last_pid",
            "Read-only file system",
        ),
        // No sysfs at all in a sandbox (spec.rs): /sys is the image's empty directory.
        (
            "echo x > /sys/kernel/uevent_helper",
            "nonexistent directory",
        ),
        (
            "echo /evil > /sys/fs/cgroup/release_agent",
            "nonexistent directory",
        ),
        ("cat /dev/mem", "No such file or directory"),
        ("cat /dev/kmsg", "No such file or directory"),
        ("head -c1 /dev/full", "No such file or directory"),
        ("cat /dev/net/tun", "No such file or directory"),
        ("unshare -U true", "Operation not permitted"),
        ("chroot /tmp /bin/true", "Operation not permitted"),
        (
            "mount -t tmpfs none /tmp",
            "permission denied (are you root?)",
        ),
    ] {
        let o = run(&pool, sh(script)).await;
        assert_ne!(o.exit_code, Some(0), "{script} succeeded: {o:?}");
        assert!(
            text(&o.stderr).contains(err),
            "{script}: want {err:?}, got {o:?}"
        );
    }
    let o = run(&pool, sh("ls -A /sys; grep -c sysfs /proc/self/mounts")).await;
    assert_eq!(
        text(&o.stdout),
        "0\n",
        "a sysfs is mounted or /sys is not empty: {o:?}"
    );
    // /proc/sysrq-trigger: read-only where the kernel has it (this CI kernel has no SYSRQ).
    let want = if std::path::Path::new("/proc/sysrq-trigger").exists() {
        "Read-only file system"
    } else {
        "nonexistent directory"
    };
    let o = run(&pool, sh("echo b > /proc/sysrq-trigger")).await;
    assert!(
        o.exit_code != Some(0) && text(&o.stderr).contains(want),
        "{o:?}"
    );
    // Masked paths (those this kernel has) read as empty: /dev/null is bound over them.
    let masked: Vec<&str> = [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
    ]
    .into_iter()
    .filter(|p| std::path::Path::new(p).exists())
    .collect();
    assert!(
        !masked.is_empty(),
        "no masked /proc path exists on this host to check"
    );
    for p in masked {
        let o = run(&pool, sh(&format!("wc -c < {p}"))).await;
        assert_eq!(text(&o.stdout).trim(), "0", "{p}: {o:?}");
    }
    // Exactly the explicit device list (libcontainer's extra /dev/full and, where the kernel
    // has /proc/kcore, its /dev/kcore symlink are removed before start) plus the standard
    // links and folders, whatever the kernel: no name anywhere in /dev leads to kernel memory.
    let o = run(&pool, sh("ls /dev | tr '\\n' ' '")).await;
    assert_eq!(
        text(&o.stdout).trim(),
        "fd null ptmx pts random shm stderr stdin stdout tty urandom zero",
        "{o:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_is_isolated_but_lo_is_up() {
    require_root!();
    let (_r, _e, pool) = setup(1).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    expect_probe(&pool, &["tcp_connect", &port], "ECONNREFUSED").await;
    // A host abstract unix socket is in the host network namespace only.
    let name = format!("tw-escape-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _abs = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    expect_probe(&pool, &["abstract_connect", &name], "ECONNREFUSED").await;
    expect_probe(&pool, &["lo_up"], "ok").await;
    // The sandbox's network namespace has no device but lo.
    let o = run(
        &pool,
        sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"),
    )
    .await;
    assert_eq!(text(&o.stdout).trim(), "lo", "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fd_env_or_cwd_leaks() {
    require_root!();
    // A non-CLOEXEC fd in the runner would be inherited by the zygote; it must not reach the tool.
    let leaked = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    assert!(leaked >= 3);
    let (_r, _e, pool) = setup(1).await;
    // ls holds fd 3 for the directory it lists; nothing else may be open.
    let o = run(
        &pool,
        Invocation {
            argv: vec!["/bin/ls".into(), "/proc/self/fd".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        text(&o.stdout).split_whitespace().collect::<Vec<_>>(),
        ["0", "1", "2", "3"],
        "{o:?}"
    );
    // The environment is exactly the invocation's (nothing of the runner's).
    let env = vec![
        ("PATH".to_string(), "/bin".to_string()),
        ("A".to_string(), "1".to_string()),
    ];
    let o = run(
        &pool,
        Invocation {
            argv: vec!["env".into()],
            env: env.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(text(&o.stdout), "PATH=/bin\nA=1\n", "{o:?}");
    let o = run(
        &pool,
        Invocation {
            argv: vec!["cat".into(), "/proc/1/environ".into()],
            env,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(text(&o.stdout), "PATH=/bin\0A=1\0", "{o:?}");
    // CVE-2024-21626: cwd through a leaked fd.
    for n in 3..12 {
        let inv = Invocation {
            argv: vec!["/bin/pwd".into()],
            cwd: Some(format!("/proc/self/fd/{n}")),
            ..Default::default()
        };
        let o = run(&pool, inv).await;
        assert_eq!(o.exit_code, Some(126), "cwd fd {n}: {o:?}");
        assert!(text(&o.stderr).contains("chdir"), "{o:?}");
    }
    unsafe { libc::close(leaked) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_mount_target_stays_inside_rootfs() {
    require_root!();
    let rootfs = common::busybox_rootfs();
    let host_target = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::set_permissions(src.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(src.path().join("data"), "hello").unwrap();
    std::os::unix::fs::symlink(host_target.path(), rootfs.path().join("mnt/escape")).unwrap();
    let mut spec = common::spec(&rootfs, common::limits(), 0);
    spec.mounts.push(BindMount {
        source: src.path().into(),
        destination: "/mnt/escape/x".into(),
        read_only: true,
    });
    let engine = common::engine();
    let pool = engine.pool(spec).await.unwrap();
    let o = pool.run(sh("cat /mnt/escape/x/data")).await;
    // Whatever the outcome inside, nothing may be created at the host path the symlink names.
    assert_eq!(
        std::fs::read_dir(host_target.path()).unwrap().count(),
        0,
        "{o:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_bombs_are_contained() {
    require_root!();
    let rootfs = common::busybox_rootfs();
    let engine = common::engine();
    let mut limits = common::limits();
    limits.timeout = Duration::from_secs(2);
    let pool = engine
        .pool(common::spec(&rootfs, limits.clone(), 0))
        .await
        .unwrap();

    // pids cap: forks beyond 32 tasks fail.
    let o = run(
        &pool,
        sh("i=0; while [ $i -lt 64 ]; do sleep 5 & i=$((i+1)); done"),
    )
    .await;
    assert!(text(&o.stderr).contains("can't fork"), "{o:?}");
    // Fork bomb: contained by the pids cap, killed at the timeout, call returns.
    let o = run(&pool, sh("f(){ f|f& }; f; sleep 100")).await;
    assert!(o.timed_out && o.signal == Some(9), "{o:?}");
    assert!(o.duration < Duration::from_secs(4), "{o:?}");
    // Busy loop killed at the limit.
    let o = run(&pool, sh("while :; do :; done")).await;
    assert!(
        o.timed_out && o.signal == Some(9) && o.duration < Duration::from_secs(4),
        "{o:?}"
    );
    // Memory bomb: OOM kill reported. (128 MiB at once: a bomb that grows slowly may meet the
    // 2 s timeout first in an emulated guest, scripts/vm-test.sh.)
    let o = run(&pool, sh("dd if=/dev/zero of=/dev/null bs=128M count=1")).await;
    assert!(o.oom_killed && o.signal == Some(9) && !o.timed_out, "{o:?}");
    assert!(o.peak_memory_bytes.unwrap() >= 60 << 20, "{o:?}");
    // 5 MB of output: capped and flagged.
    let o = run(&pool, sh("head -c 5000000 /dev/zero; echo done >&2")).await;
    assert_eq!(o.stdout.bytes.len(), 64 * 1024);
    assert!(
        o.stdout.truncated && !o.stderr.truncated && o.exit_code == Some(0),
        "{o:?}"
    );
    // FSIZE (2 MiB) hits before the 4 MiB tmpfs: EFBIG.
    let o = run(&pool, sh("dd if=/dev/zero of=/tmp/f bs=1M count=3")).await;
    assert!(
        o.exit_code == Some(1) && text(&o.stderr).contains("File too large"),
        "{o:?}"
    );
    // tmpfs cap: many files under the FSIZE limit fill /tmp.
    let o = run(
        &pool,
        sh("for i in 1 2 3 4 5; do dd if=/dev/zero of=/tmp/f$i bs=1M count=1 || exit 7; done"),
    )
    .await;
    assert_eq!(o.exit_code, Some(7), "{o:?}");
    assert!(text(&o.stderr).contains("No space left on device"), "{o:?}");
    // kill -1 inside only reaches the sandbox; a host process survives.
    let mut host = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let o = run(&pool, sh("sleep 10 & kill -9 -1; echo survived")).await;
    assert_eq!(text(&o.stdout), "survived\n", "{o:?}");
    assert!(
        host.try_wait().unwrap().is_none(),
        "host process was killed"
    );
    host.kill().unwrap();
    let _ = host.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_binary_cannot_be_overwritten_through_proc_exe() {
    require_root!();
    // CVE-2019-5736: a container process reaching /proc/<pid>/exe of the process that
    // created it could overwrite the runtime binary. Here even the host's root tries, on
    // the zygote that every container init is a clone of.
    let engine = common::engine();
    let exe = format!("/proc/{}/exe", engine.zygote_pid());
    let target = std::fs::read_link(&exe).unwrap();
    assert!(
        target
            .to_string_lossy()
            .starts_with("/memfd:toolwarden-sealed"),
        "the zygote runs from a sealed copy, not from {}",
        target.display()
    );
    let binary = env!("CARGO_BIN_EXE_toolwarden");
    let before = std::fs::read(binary).unwrap();
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(&exe)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\x7fELF-overwritten"));
    let error = written.expect_err("writing through /proc/<zygote>/exe must fail");
    // ETXTBSY while it runs; the write seal holds even once nothing executes it.
    assert!(
        [libc::ETXTBSY, libc::EPERM].contains(&error.raw_os_error().unwrap_or(0)),
        "{error}"
    );
    let sealed = std::fs::File::open(&exe).unwrap();
    let seals = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&sealed), libc::F_GET_SEALS) };
    assert!(seals >= 0, "{}", std::io::Error::last_os_error());
    for seal in [
        libc::F_SEAL_WRITE,
        libc::F_SEAL_GROW,
        libc::F_SEAL_SHRINK,
        libc::F_SEAL_SEAL,
    ] {
        assert_ne!(seals & seal, 0, "seal {seal:#x} missing from {seals:#x}");
    }
    assert_eq!(
        std::fs::read(binary).unwrap(),
        before,
        "the binary is unchanged"
    );
}
