//! A keeper: one forked child of the zygote per container. It builds and starts the container,
//! hands the per-call pipes and a pidfd to the runner, waits for the container init, reports
//! its exit through the report pipe and deletes the container.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::WaitStatus;
use nix::unistd::{Pid, pipe2};
use serde_json::Value;

use crate::sandbox::container_init::ParkedInit;
use crate::sandbox::detect::{CgroupMode, IdMap};
use crate::sandbox::error::{ContainerError, ProtocolError, Result};
use crate::sandbox::names::CGROUP_PARENT;
use crate::sandbox::proto::{self, ExitInfo, FromZygote};
use crate::sandbox::{cgroup_v2, netlo, sweep};

/// What the zygote keeps per pool for its keepers: the validated OCI spec and how to run it.
pub struct PoolDef {
    pub spec: Value,
    /// The per-call cgroups' hierarchy; None when cgroups are not used (rlimit mode).
    pub cgroup: Option<CgroupMode>,
    /// RLIMIT_AS the container init sets just before execve (rlimit mode).
    pub address_space: Option<u64>,
    /// Move-mount + chroot instead of pivot_root (see `detect::RootSwitch`).
    pub no_pivot: bool,
    /// The ids the sandbox's user namespace maps (None without one).
    pub id_map: Option<IdMap>,
    /// Where the container init writes the call's files (the spec's tmpfs there).
    pub call_files_dir: Option<PathBuf>,
}

/// Keeper body (in a forked child). Returns the keeper's exit code.
pub fn keeper(
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
            let error = e.to_failure();
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
            error: e.to_failure(),
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
        serde_json::to_vec(&spec).map_err(ProtocolError::Encode)?,
    )?;

    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (ctl_r, ctl_w) = pipe2(cloexec)?;
    let (in_r, in_w) = pipe2(cloexec)?;
    let (out_r, out_w) = pipe2(cloexec)?;
    let (err_r, err_w) = pipe2(cloexec)?;
    // The init checks through this that we are still alive once its parent-death signal is set.
    let keeper = pidfd_open(nix::unistd::getpid())?;
    let executor = ParkedInit {
        control_fd: ctl_r.as_raw_fd(),
        keeper_pidfd: keeper.as_raw_fd(),
        address_space: def.address_space,
        call_files_dir: def.call_files_dir.clone(),
    };
    let mut container = ContainerBuilder::new(id.to_string(), SyscallType::Linux)
        .with_root_path(state_root)
        .map_err(ContainerError::StateRoot)?
        .with_executor(executor)
        .with_stdin(in_r)
        .with_stdout(out_w)
        .with_stderr(err_w)
        .as_init(&bundle)
        .with_systemd(false)
        .with_no_pivot(def.no_pivot)
        .with_detach(true)
        .build()
        .map_err(ContainerError::Build)?;
    drop((ctl_r, keeper));
    let pid = container.pid().ok_or(ContainerError::NoInitPid)?;
    let pidfd = pidfd_open(pid)?;
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
    container.start().map_err(ContainerError::Start)?;
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
/// parent-death signal (see `ParkedInit::exec`).
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
            // A pidfd names that exact process, never a reused pid.
            let _ = rustix::process::pidfd_send_signal(init, rustix::process::Signal::KILL);
            return;
        }
    }
}

/// Waits for the container init and collects its exit status and memory statistics.
fn keeper_wait(def: &PoolDef, id: &str, pid: Pid) -> Result<ExitInfo> {
    // The init is our child via CLONE_PARENT without an exit signal: needs __WALL. wait4 for
    // the rusage: its max RSS is the peak memory when there is no memory cgroup.
    // SAFETY: `rusage` is a plain C struct of integers; all zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut raw = 0;
    loop {
        // SAFETY: both pointers are to live locals of the right types, which wait4 only writes.
        // Raw because nix and rustix wrap waitpid without the rusage (the peak RSS we need).
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
/// the sandbox's swap allowance is 0 anyway (see `oci_spec::build`).
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
    // SAFETY: `open` just returned this fd; nothing else owns it.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    let unlink_all = || -> Result<()> {
        for entry in EXTRA_DEV_ENTRIES {
            match nix::unistd::unlinkat(
                Some(dev.as_raw_fd()),
                entry,
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(nix::Error::ENOENT) => {}
                Err(errno) => return Err(ContainerError::RemoveDevice { entry, errno }.into()),
            }
        }
        Ok(())
    };
    let Some(ids) = id_map else {
        return unlink_all();
    };
    // Per-thread ids of the single-threaded keeper, restored right after.
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(ids.gid_base));
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(ids.uid_base));
    let unlinked = unlink_all();
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
    unlinked
}

/// Nice value of background (refill) builds.
pub const BACKGROUND_NICE: i32 = 10;

/// Sets the nice value of process `pid` (0: this process). Failure only costs scheduling
/// priority.
pub fn set_nice(pid: i32, nice: i32) {
    let _ = rustix::process::setpriority_process(rustix::process::Pid::from_raw(pid), nice);
}

fn pidfd_open(pid: Pid) -> Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid.as_raw()).ok_or(nix::Error::ESRCH)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| std::io::Error::from(e).into())
}
