//! The zygote: a fresh single-threaded process (`toolwarden sandbox-zygote`) that owns all
//! container creation. It forks one *keeper* per container; the keeper builds, starts, hands
//! off, waits for and deletes that one container.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use serde_json::Value;

use crate::sandbox::detect::{CGROUP_PARENT, CgroupMode, HostReport, IdMap, RootSwitch};
use crate::sandbox::executor::LateExecutor;
use crate::sandbox::proto::{self, ExitInfo, FromZygote, ToZygote};
use crate::sandbox::{
    Enforcement, Error, Result, cgroup_v2, mountpoint, netlo, seal, seccomp, spec, sweep,
};

/// Fd number of the runner socket in the zygote.
pub const ZYGOTE_SOCK_FD: RawFd = 3;
/// Environment variables the runner sets for the zygote (its environment is otherwise empty).
pub const ENV_STATE_ROOT: &str = "TOOLWARDEN_SANDBOX_STATE";
pub const ENV_FORCE_RLIMITS: &str = "TOOLWARDEN_SANDBOX_FORCE_RLIMITS";

struct PoolDef {
    spec: Value,
    /// The per-call cgroups' hierarchy; None when cgroups are not used (rlimit mode).
    cgroup: Option<CgroupMode>,
    /// RLIMIT_AS the executor sets just before execve (rlimit mode).
    address_space: Option<u64>,
    /// Move-mount + chroot instead of pivot_root (see `detect::RootSwitch`).
    no_pivot: bool,
    /// The ids the sandbox's user namespace maps (None without one).
    id_map: Option<IdMap>,
}

/// Entry point of the hidden `sandbox-zygote` subcommand. Returns the process exit code.
pub fn zygote_main() -> i32 {
    let seal_err = seal::ensure_sealed().err();
    // SAFETY: fd 3 was placed there by the runner for us alone.
    let sock = unsafe { OwnedFd::from_raw_fd(ZYGOTE_SOCK_FD) };
    let _ = nix::fcntl::fcntl(
        sock.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    match run(sock.as_fd(), seal_err) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("toolwarden sandbox-zygote: {e}");
            1
        }
    }
}

fn run(sock: BorrowedFd<'_>, seal_err: Option<std::io::Error>) -> Result<()> {
    if let Some(e) = seal_err {
        // Never run unsealed: the container init would expose the runner binary.
        return Err(Error::Zygote(format!(
            "cannot re-exec from sealed memfd: {e}"
        )));
    }
    let state_root = PathBuf::from(
        std::env::var_os(ENV_STATE_ROOT).ok_or_else(|| Error::Zygote("no state root".into()))?,
    );
    std::fs::create_dir_all(&state_root)?;
    let zpid = std::process::id();
    become_reaper()?;
    enter_own_mount_namespace()?;
    unmask_proc();
    let host = HostReport::detect(std::env::var_os(ENV_FORCE_RLIMITS).is_some(), &state_root);
    // After detection (which places the per-call cgroups' parent on cgroup v2), before this
    // zygote's mount namespace hides anything (the state tmpfs, the cgroup tree).
    sweep::sweep(&state_root);
    // The per-call cgroups' hierarchy; None in rlimit mode.
    let per_call_cgroup = host.cgroup.filter(|_| host.cgroup_unusable.is_none());
    let root = if per_call_cgroup.is_some() {
        let root = sweep::zygote_dir(&state_root, zpid);
        std::fs::create_dir_all(&root)?;
        mount_state_tmpfs(&root)?;
        root
    } else {
        state_root.clone()
    };
    std::fs::create_dir_all(root.join("bundles"))?;
    if host.cgroup_unusable.is_some() {
        hide_cgroupfs()?;
    } else if matches!(host.cgroup, Some(CgroupMode::V1 { .. }))
        && let Err(e) = hide_unused_cgroup_v1()
    {
        // Only a cost: libcontainer then uses every hierarchy, as before.
        eprintln!("toolwarden sandbox-zygote: keeping all cgroup v1 hierarchies: {e}");
    }
    seccomp::filters()?;
    // libcontainer and libcgroups reach /proc through pathrs, which mounts a private procfs
    // instance (fsopen/fsmount) per process the first time and caches it. Created here, the
    // cached handle (subset=pid, detached, close-on-exec) is inherited by every keeper and its
    // container processes: ~2 procfs instances fewer per call. Failure only costs that.
    let _ = pathrs::procfs::ProcfsHandle::new();
    proto::send(sock, &FromZygote::Hello { host: host.clone() }, &[])?;

    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;

    let mut pools: HashMap<u64, PoolDef> = HashMap::new();
    let mut keepers: HashMap<Pid, String> = HashMap::new();
    let mut seq: u64 = 0;
    loop {
        let mut fds = [
            nix::poll::PollFd::new(sock, nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(sigfd.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Err(nix::Error::EINTR) => continue,
            r => r?,
        };
        let sock_ready = fds[0].any().unwrap_or(false);
        let sig_ready = fds[1].any().unwrap_or(false);
        if sig_ready {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            reap_keepers(&mut keepers, &root);
        }
        if !sock_ready {
            continue;
        }
        let Some((msg, _fds)) = proto::recv::<ToZygote>(sock)? else {
            // Runner gone. Parked containers see EOF on their control pipes and exit; their
            // keepers clean up.
            shutdown(&mut keepers, &sigfd, &root, &state_root);
            return Ok(());
        };
        match msg {
            ToZygote::CreatePool { pool, spec: sspec } => {
                let userns_why = host.userns_unusable_for(&sspec);
                let reply = match mountpoint::ensure(&sspec)
                    .map_err(|e| Error::Invalid(format!("mount targets: {e}")))
                    .and_then(|()| spec::build(&sspec, &host, userns_why.is_none()))
                    .and_then(|v| {
                        // Validate once here rather than failing in every keeper.
                        serde_json::from_value::<Spec>(v.clone())
                            .map_err(|e| Error::Invalid(format!("OCI spec: {e}")))?;
                        Ok(v)
                    }) {
                    Ok(v) => {
                        let address_space = spec::address_space_limit(&sspec.limits, &host);
                        pools.insert(
                            pool,
                            PoolDef {
                                spec: v,
                                cgroup: per_call_cgroup,
                                address_space,
                                no_pivot: host.root_switch == RootSwitch::MoveMount,
                                id_map: host.id_map.filter(|_| userns_why.is_none()),
                            },
                        );
                        let enforcement: Enforcement = host.enforcement(userns_why.is_none());
                        FromZygote::PoolCreated { pool, enforcement }
                    }
                    Err(e) => FromZygote::PoolFailed {
                        pool,
                        error: e.to_string(),
                    },
                };
                proto::send(sock, &reply, &[])?;
            }
            ToZygote::DropPool { pool } => {
                pools.remove(&pool);
            }
            ToZygote::Spawn {
                pool,
                req,
                background,
            } => {
                let Some(def) = pools.get(&pool) else {
                    let error = format!("unknown pool {pool}");
                    proto::send(sock, &FromZygote::SpawnFailed { req, error }, &[])?;
                    continue;
                };
                seq += 1;
                let id = sweep::container_id(zpid, seq);
                // A refill's fork (copying the zygote's page tables) must not preempt the call
                // that triggered it: fork at low priority; the keeper inherits it.
                if background {
                    set_nice(0, BACKGROUND_NICE);
                }
                // SAFETY: the zygote is single-threaded.
                let forked = unsafe { fork() };
                if background && !matches!(forked, Ok(ForkResult::Child)) {
                    set_nice(0, 0);
                }
                match forked {
                    Ok(ForkResult::Child) => {
                        // The keeper must not inherit a blocked SIGCHLD (nor pass it on).
                        let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
                        let code = keeper(sock, &root, &id, def, req, background);
                        unsafe { libc::_exit(code) }
                    }
                    Ok(ForkResult::Parent { child }) => {
                        keepers.insert(child, id);
                    }
                    Err(e) => {
                        let error = format!("fork keeper: {e}");
                        proto::send(sock, &FromZygote::SpawnFailed { req, error }, &[])?;
                    }
                }
            }
        }
    }
}

/// Waits (bounded) for the keepers to finish their containers, then removes this zygote's
/// container root and the state root if nothing else uses it, so an engine leaves no directory
/// behind.
fn shutdown(keepers: &mut HashMap<Pid, String>, sigfd: &SignalFd, root: &Path, state_root: &Path) {
    let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
    loop {
        reap_keepers(keepers, root);
        if keepers.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            for (pid, id) in keepers.drain() {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                sweep::remove_container(root, &id);
            }
            break;
        }
        let mut fds = [nix::poll::PollFd::new(
            sigfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
        while let Ok(Some(_)) = sigfd.read_signal() {}
    }
    // Non-recursive: another engine may share the root (its entries keep it).
    let _ = std::fs::remove_dir(root.join("bundles"));
    if root != state_root {
        let _ = nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(root);
    }
    let _ = std::fs::remove_dir(state_root);
}

/// How long the zygote waits for its keepers when the runner goes away (parked containers exit
/// at once on EOF; keepers kill running ones when the runner's socket hangs up).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Reaps exited keepers; a keeper that did not exit cleanly may have left its container.
fn reap_keepers(keepers: &mut HashMap<Pid, String>, state_root: &Path) {
    loop {
        // Any child: keepers, and orphans re-parented to this subreaper (`become_reaper`).
        match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(st) => {
                let Some(pid) = st.pid() else { return };
                if let Some(id) = keepers.remove(&pid)
                    && !matches!(st, WaitStatus::Exited(_, 0))
                {
                    sweep::remove_container(state_root, &id);
                }
            }
        }
    }
}

/// Keeper body (in a forked child). Returns the keeper's exit code.
fn keeper(
    sock: BorrowedFd<'_>,
    state_root: &Path,
    id: &str,
    def: &PoolDef,
    req: u64,
    background: bool,
) -> i32 {
    let (pid, init, report, mnt_ns) = match keeper_run(sock, state_root, id, def, req, background) {
        Ok(started) => started,
        Err(e) => {
            let error = e.to_string();
            let _ = proto::send(sock, &FromZygote::SpawnFailed { req, error }, &[]);
            sweep::remove_container(state_root, id);
            return 1;
        }
    };
    kill_if_runner_leaves(init.as_fd(), sock);
    let waited = keeper_wait(def, id, pid);
    let reaped = waited.is_ok();
    let msg = match waited {
        Ok(exit) => FromZygote::Exited { req, exit },
        Err(e) => FromZygote::SpawnFailed {
            req,
            error: e.to_string(),
        },
    };
    // Small (< PIPE_BUF) into a fresh pipe: never blocks. EPIPE (call dropped) is fine.
    if let Ok(buf) = serde_json::to_vec(&msg) {
        let _ = nix::unistd::write(&report, &buf);
    }
    drop(report);
    // Now the mount tree may be torn down (see keeper_run).
    drop(mnt_ns);
    // The call is answered: deleting the container is background work.
    set_nice(0, BACKGROUND_NICE);
    if reaped {
        sweep::remove_exited(state_root, id);
        0
    } else {
        sweep::remove_container(state_root, id);
        1
    }
}

/// What libcontainer adds to the container's /dev beyond the sandbox's explicit device list
/// (null, zero, random, urandom, tty): /dev/full (`rootfs::utils::default_devices`) and, on
/// kernels that have /proc/kcore, a `/dev/kcore -> /proc/kcore` symlink
/// (`Symlink::setup_kcore_symlink`). /proc/kcore is masked anyway; no name for kernel memory is
/// left either.
const EXTRA_DEV_ENTRIES: [&str; 2] = ["full", "kcore"];

/// Unlinks [`EXTRA_DEV_ENTRIES`] from the container's /dev tmpfs after `build()` (pivot_root
/// done, init parked before `start()`). No sandboxed code has run yet, so nothing under that
/// /dev can be a planted symlink.
///
/// With a user namespace that /dev belongs to the sandbox's root, which the keeper is not (and
/// in a pod the keeper has no CAP_DAC_OVERRIDE): the unlinks are made with the sandbox root's
/// file-system ids (CAP_SETUID/CAP_SETGID, which writing the id maps needs anyway).
fn remove_extra_devices(pid: i32, id_map: Option<IdMap>) -> Result<()> {
    use nix::fcntl::OFlag;
    let dev = nix::fcntl::open(
        format!("/proc/{pid}/root/dev").as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: open just returned this fd to us.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    let unlink_all = || -> Result<()> {
        for entry in EXTRA_DEV_ENTRIES {
            match nix::unistd::unlinkat(
                Some(dev.as_raw_fd()),
                entry,
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(nix::Error::ENOENT) => {}
                Err(e) => return Err(Error::Container(format!("remove /dev/{entry}: {e}"))),
            }
        }
        Ok(())
    };
    let Some(ids) = id_map else {
        return unlink_all();
    };
    // SAFETY: plain syscalls in the single-threaded keeper; restored right after.
    unsafe {
        libc::setfsgid(ids.gid_base);
        libc::setfsuid(ids.uid_base);
    }
    let unlinked = unlink_all();
    unsafe {
        libc::setfsuid(0);
        libc::setfsgid(0);
    }
    unlinked
}

/// Nice value of background (refill) builds.
const BACKGROUND_NICE: i32 = 10;

fn set_nice(pid: i32, nice: i32) {
    // SAFETY: plain syscall. Failure only costs scheduling priority.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) };
}

pub(crate) fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: raw syscall; on success the return value is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn keeper_run(
    sock: BorrowedFd<'_>,
    state_root: &Path,
    id: &str,
    def: &PoolDef,
    req: u64,
    background: bool,
) -> Result<(Pid, OwnedFd, OwnedFd, std::fs::File)> {
    if background {
        // A refill must not steal CPU from running calls on a small host.
        set_nice(0, BACKGROUND_NICE);
    }
    let bundle = state_root.join("bundles").join(id);
    std::fs::create_dir_all(&bundle)?;
    let mut spec = def.spec.clone();
    match def.cgroup {
        Some(CgroupMode::V2) => {
            spec["linux"]["cgroupsPath"] =
                Value::String(format!("/{}/{id}", cgroup_v2::per_call_parent()));
        }
        Some(CgroupMode::V1 { .. }) => {
            spec["linux"]["cgroupsPath"] = Value::String(format!("/{CGROUP_PARENT}/{id}"));
        }
        None => {}
    }
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec(&spec).map_err(|e| Error::Protocol(e.to_string()))?,
    )?;

    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (ctl_r, ctl_w) = pipe2(cloexec)?;
    let (in_r, in_w) = pipe2(cloexec)?;
    let (out_r, out_w) = pipe2(cloexec)?;
    let (err_r, err_w) = pipe2(cloexec)?;
    // The init checks through this that we are still alive once its parent-death signal is set.
    let keeper = pidfd_open(std::process::id() as i32)?;
    let executor = LateExecutor {
        control_fd: ctl_r.as_raw_fd(),
        keeper_pidfd: keeper.as_raw_fd(),
        address_space: def.address_space,
    };
    let mut container = ContainerBuilder::new(id.to_string(), SyscallType::Linux)
        .with_root_path(state_root)
        .map_err(|e| Error::Container(format!("{e:#}")))?
        .with_executor(executor)
        .with_stdin(in_r)
        .with_stdout(out_w)
        .with_stderr(err_w)
        .as_init(&bundle)
        .with_systemd(false)
        .with_no_pivot(def.no_pivot)
        .with_detach(true)
        .build()
        .map_err(|e| Error::Container(format!("build: {e}")))?;
    drop((ctl_r, keeper));
    let pid = container
        .pid()
        .ok_or_else(|| Error::Container("no init pid".into()))?;
    let pidfd = pidfd_open(pid.as_raw())?;
    remove_extra_devices(pid.as_raw(), def.id_map)?;
    // Holding a reference to the container's mount namespace moves its teardown (unmounting
    // ~30 mounts plus an RCU grace period) out of the init's exit, i.e. off the path between the
    // tool's exit and its report; it happens when the keeper closes this after reporting.
    let mnt_ns = std::fs::File::open(format!("/proc/{}/ns/mnt", pid.as_raw()))?;
    if background {
        // The init inherited our nice value: the tool must run at normal priority, and so must
        // this keeper's exit report (root may lower nice values again).
        set_nice(pid.as_raw(), 0);
        set_nice(0, 0);
    }
    netlo::bring_up_lo(pid.as_raw())?;
    container
        .start()
        .map_err(|e| Error::Container(format!("start: {e}")))?;
    // Created after build() so the container never inherits it.
    let (report_r, report_w) = pipe2(cloexec)?;
    proto::send(
        sock,
        &FromZygote::Ready {
            req,
            id: id.to_string(),
            pid: pid.as_raw(),
        },
        &[
            ctl_w.as_raw_fd(),
            in_w.as_raw_fd(),
            out_r.as_raw_fd(),
            err_r.as_raw_fd(),
            pidfd.as_raw_fd(),
            report_r.as_raw_fd(),
        ],
    )?;
    // The runner now holds the only parent-side ends.
    drop((ctl_w, in_w, out_r, err_r, report_r));
    Ok((pid, pidfd, report_w, mnt_ns))
}

/// Returns when the container init has exited. If the runner goes away first (its end of the
/// zygote socket hangs up: it exited or was killed, with or without this zygote), nobody
/// enforces the call's deadline any more: kill the init, which takes its pid namespace (the
/// tool's whole tree) with it. A keeper killed outright takes the init along by the init's
/// parent-death signal (see `LateExecutor::exec`).
fn kill_if_runner_leaves(init: BorrowedFd<'_>, sock: BorrowedFd<'_>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        // No events asked of the socket: only its hang-up (always reported) wakes us.
        let mut fds = [
            PollFd::new(init, PollFlags::POLLIN),
            PollFd::new(sock, PollFlags::empty()),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        if fds[0].any().unwrap_or(false) {
            return;
        }
        let gone = PollFlags::POLLHUP | PollFlags::POLLERR;
        if fds[1].revents().is_some_and(|r| r.intersects(gone)) {
            // SAFETY: plain syscall on a pidfd we own (never a reused pid).
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    init.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                )
            };
            return;
        }
    }
}

/// Waits for the container init and collects its exit status and memory statistics.
fn keeper_wait(def: &PoolDef, id: &str, pid: Pid) -> Result<ExitInfo> {
    // The init is our child via CLONE_PARENT without an exit signal: needs __WALL. wait4 for
    // the rusage: its max RSS is the peak memory when there is no memory cgroup.
    // SAFETY: zeroed rusage is a valid value; wait4 only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut raw = 0;
    loop {
        // SAFETY: plain syscall with valid pointers.
        if unsafe { libc::wait4(pid.as_raw(), &mut raw, libc::__WALL, &mut usage) } >= 0 {
            break;
        }
        match nix::Error::last() {
            nix::Error::EINTR => continue,
            e => return Err(e.into()),
        }
    }
    let status = WaitStatus::from_raw(pid, raw)?;
    let reaped_ns = proto::monotonic_ns();
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, c) => (Some(c), None),
        WaitStatus::Signaled(_, s, _) => (None, Some(s as i32)),
        _ => (None, None),
    };
    let (oom_killed, peak_memory_bytes) = match def.cgroup {
        Some(mode) => memory_stats(mode, id),
        // rlimit mode: no OOM kill to detect (RLIMIT_AS refuses allocations instead); the
        // peak is the largest RSS of the init and its reaped descendants (KiB on Linux).
        None => (false, Some(usage.ru_maxrss.max(0) as u64 * 1024)),
    };
    Ok(ExitInfo {
        exit_code,
        signal,
        oom_killed,
        peak_memory_bytes,
        reaped_ns,
        sent_ns: proto::monotonic_ns(),
    })
}

fn read_kv(path: PathBuf, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// (oom_killed, peak memory) read from the container's memory cgroup before deletion. On
/// cgroup v2 the peak includes swap where the kernel reports it (`memory.swap.peak`, 6.5+);
/// the sandbox's swap allowance is 0 anyway (see `spec::build`).
fn memory_stats(mode: CgroupMode, id: &str) -> (bool, Option<u64>) {
    let root = Path::new("/sys/fs/cgroup");
    let read_u64 = |p: PathBuf| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    match mode {
        CgroupMode::V1 { .. } => {
            let dir = root.join("memory").join(CGROUP_PARENT).join(id);
            let oom = read_kv(dir.join("memory.oom_control"), "oom_kill").unwrap_or(0) > 0;
            (oom, read_u64(dir.join("memory.max_usage_in_bytes")))
        }
        CgroupMode::V2 => {
            let dir = cgroup_v2::container_dir(id);
            let oom = read_kv(dir.join("memory.events"), "oom_kill").unwrap_or(0) > 0;
            let swap = read_u64(dir.join("memory.swap.peak")).unwrap_or(0);
            (oom, read_u64(dir.join("memory.peak")).map(|m| m + swap))
        }
    }
}

/// The zygote's own mount namespace, inherited by its keepers (and copied into each container,
/// which pivots away from it): a slave of the host's, so later host mounts (bind sources,
/// images) still arrive and nothing done here propagates back.
fn enter_own_mount_namespace() -> Result<()> {
    use nix::mount::{MsFlags, mount};
    let err =
        |what: &str, e: nix::Error| Error::Zygote(format!("own mount namespace: {what}: {e}"));
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| err("unshare(CLONE_NEWNS)", e))?;
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
        .map_err(|e| err("make / rslave", e))
}

/// Makes the zygote the reaper of every process it starts, at any depth: a container init whose
/// keeper died, or anything a keeper left, is re-parented here (not to the runner, or to PID 1
/// of a pod, which may never reap) and reaped by `reap_keepers`. Also starts with no
/// supplementary groups: in a user namespace the sandbox could not drop them itself
/// (`setgroups` is denied there), and a group of the runner's would open files to it.
fn become_reaper() -> Result<()> {
    // SAFETY: plain prctl with an integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(Error::Zygote(format!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        )));
    }
    if nix::unistd::setgroups(&[]).is_err() && !nix::unistd::getgroups()?.is_empty() {
        return Err(Error::Zygote(
            "cannot drop the supplementary groups (no CAP_SETGID)".into(),
        ));
    }
    Ok(())
}

/// A container runtime masks parts of a pod's /proc (/dev/null over /proc/kcore, /proc/keys,
/// ...; tmpfs over /proc/acpi, /proc/scsi; read-only binds of /proc/sys, /proc/bus, ...). A
/// sandbox's user namespace owns its mount namespace, so every mount it inherits is locked,
/// and the kernel refuses a fresh procfs there while the only procfs around has locked mounts
/// over non-empty files and directories (`mount_too_revealing`). So the zygote removes those
/// masks in its own mount namespace, before any sandbox exists.
///
/// Why that is safe: only the zygote and its keepers (runner code, root of the pod's user
/// namespace, which may unmount them anyway with the CAP_SYS_ADMIN it holds there) see the
/// unmasked /proc; the runner's HTTP side keeps the runtime's masks; every sandbox mounts its
/// own procfs and masks it again with the OCI spec's maskedPaths/readonlyPaths (the same paths,
/// spec.rs) before the tool runs; and what the masks hide stays guarded by the kernel against
/// the *host*'s root (/proc/kcore needs CAP_SYS_RAWIO in the initial user namespace, which a pod
/// never has; /proc/sysrq-trigger is writable by the host's uid 0 only). A mask that cannot be removed
/// (a host's locked mount) stays, and the probe then reports the user namespace unusable.
fn unmask_proc() {
    let Ok(mounts) = mountinfo() else { return };
    let mut masks: Vec<String> = mounts
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with("/proc/"))
        .collect();
    masks.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in masks {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Upper bound of the container-state tmpfs: a container's state and bundle take ~10 KiB.
const STATE_TMPFS_SIZE: &str = "size=64m";

/// libcontainer writes and rewrites each container's state.json, config and bundle, then
/// deletes them; on a disk file system (here /run is ext4; in a pod it is an emptyDir) the
/// journal work alone cost ~1.5 ms of CPU per call. A tmpfs in the zygote's own mount
/// namespace keeps that in memory and vanishes with the zygote. Only used with per-call
/// cgroups: those name every container, so the sweeper still finds a crashed zygote's
/// containers without their state dirs (in rlimit mode the state dirs are the only record).
fn mount_state_tmpfs(dir: &Path) -> Result<()> {
    use nix::mount::{MsFlags, mount};
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let options = format!("mode=0700,{STATE_TMPFS_SIZE}");
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        flags,
        Some(options.as_str()),
    )
    .map_err(|e| Error::Zygote(format!("mount state tmpfs on {}: {e}", dir.display())))
}

/// rlimit mode. libcontainer always moves the container into a cgroup (`cgroupsPath`, or
/// `:youki:<id>` without one) and fails on a read-only cgroup file system (cgroup v1 has no
/// "rootless" tolerance at all). So in the zygote's own mount namespace (inherited by its
/// keepers, hence by the containers, which get no /sys at all) no cgroup file system stays
/// mounted and /sys/fs/cgroup is an empty read-only tmpfs: libcgroups then detects a legacy
/// layout without any hierarchy, and its add_task/apply/remove do nothing. The host's (the
/// pod's) cgroups stay the outer bound of everything the zygote starts.
fn hide_cgroupfs() -> Result<()> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let cgroup_root = Path::new("/sys/fs/cgroup");
    let hide_err = |what: &str, e: nix::Error| Error::Zygote(format!("hide cgroupfs: {what}: {e}"));
    // Deepest first; a mount that cannot be detached (e.g. locked) is covered below, which is
    // enough for cgroup2 (libcgroups only looks for v1 hierarchies once the root is a tmpfs).
    let mut cgroup_mounts = mounts_of_type(&["cgroup", "cgroup2"])?;
    cgroup_mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in &cgroup_mounts {
        let _ = umount2(m.as_str(), MntFlags::MNT_DETACH);
    }
    let _ = umount2(cgroup_root, MntFlags::MNT_DETACH);
    if !cgroup_root.is_dir() {
        return Err(Error::Zygote(
            "hide cgroupfs: /sys/fs/cgroup missing (libcontainer needs it)".into(),
        ));
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    mount(
        Some("tmpfs"),
        cgroup_root,
        Some("tmpfs"),
        flags,
        Some("size=4k,mode=555"),
    )
    .map_err(|e| hide_err("mount tmpfs on /sys/fs/cgroup", e))?;
    let left = mounts_of_type(&["cgroup"])?;
    if !left.is_empty() {
        return Err(Error::Zygote(format!(
            "hide cgroupfs: cannot unmount cgroup v1 hierarchies {left:?}"
        )));
    }
    Ok(())
}

/// cgroup v1 controllers the sandbox's limits use: memory (memory+swap), pids, cpu (quota) and
/// devices (the device cgroup; libcontainer also lists a container's processes there).
const V1_CONTROLLERS_USED: &[&str] = &["memory", "pids", "cpu", "devices"];

/// cgroup v1 (hybrid) with writable cgroups. libcgroups' v1 manager puts every container into
/// *every* mounted hierarchy (cpuacct, cpuset, blkio, freezer, ...), although the sandbox sets
/// no limit there: a cgroup created, joined and removed per call and per hierarchy. So in the
/// zygote's own mount namespace only the hierarchies of the limits in use stay mounted.
/// Containers then get cgroups only there; their limits are unchanged, and a hidden hierarchy
/// imposed none. The sweeper has already run in the host's view.
fn hide_unused_cgroup_v1() -> Result<()> {
    use nix::mount::{MntFlags, umount2};
    let err = |what: &str, e: nix::Error| Error::Zygote(format!("{what}: {e}"));
    let unused: Vec<String> = mountinfo()?
        .into_iter()
        .filter(|m| m.fstype == "cgroup")
        .filter(|m| {
            // Super options, e.g. "rw,cpu,cpuacct" or "rw,name=systemd" (a named hierarchy
            // without controllers: libcgroups ignores it, leave it alone).
            let opts: Vec<&str> = m.super_opts.split(',').collect();
            let controllers = opts.iter().any(|o| is_v1_controller(o));
            controllers && !opts.iter().any(|o| V1_CONTROLLERS_USED.contains(o))
        })
        .map(|m| m.mount_point)
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    for m in &unused {
        umount2(m.as_str(), MntFlags::MNT_DETACH).map_err(|e| err(&format!("umount {m}"), e))?;
    }
    Ok(())
}

/// Names of cgroup v1 controllers (as in a hierarchy's mount options).
fn is_v1_controller(opt: &str) -> bool {
    matches!(
        opt,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "devices"
            | "freezer"
            | "net_cls"
            | "net_prio"
            | "blkio"
            | "perf_event"
            | "hugetlb"
            | "pids"
            | "rdma"
            | "misc"
    )
}

pub(crate) struct MountEntry {
    /// The path of the file system shown at the mount point (a bind's source).
    pub root: String,
    pub mount_point: String,
    pub fstype: String,
    pub super_opts: String,
}

/// Our mount namespace's mounts, from /proc/self/mountinfo.
pub(crate) fn mountinfo() -> Result<Vec<MountEntry>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            // Fields: id parent dev root mountpoint opts [optional...] - fstype source superopts
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountEntry {
                root: f.get(3)?.to_string(),
                mount_point: f.get(4)?.to_string(),
                fstype: f.get(sep + 1)?.to_string(),
                super_opts: f.get(sep + 3).unwrap_or(&"").to_string(),
            })
        })
        .collect())
}

/// Mount points of the file systems of these types in our mount namespace.
fn mounts_of_type(types: &[&str]) -> Result<Vec<String>> {
    Ok(mountinfo()?
        .into_iter()
        .filter(|m| types.contains(&m.fstype.as_str()))
        .map(|m| m.mount_point)
        .collect())
}
