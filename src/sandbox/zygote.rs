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

use crate::sandbox::detect::{CGROUP_PARENT, CgroupMode, HostReport};
use crate::sandbox::executor::LateExecutor;
use crate::sandbox::proto::{self, ExitInfo, FromZygote, ToZygote};
use crate::sandbox::{Enforcement, Error, Result, netlo, seal, seccomp, spec, sweep};

/// Fd number of the runner socket in the zygote.
pub const ZYGOTE_SOCK_FD: RawFd = 3;
/// Environment variables the runner sets for the zygote (its environment is otherwise empty).
pub const ENV_STATE_ROOT: &str = "TOOLWARDEN_SANDBOX_STATE";
pub const ENV_FORCE_RLIMITS: &str = "TOOLWARDEN_SANDBOX_FORCE_RLIMITS";

struct PoolDef {
    spec: Value,
    cgroup: Option<CgroupMode>,
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
    std::fs::create_dir_all(state_root.join("bundles"))?;
    let host = HostReport::detect(std::env::var_os(ENV_FORCE_RLIMITS).is_some());
    sweep::sweep(&state_root);
    seccomp::filters()?;
    proto::send(sock, &FromZygote::Hello { host: host.clone() }, &[])?;

    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;

    let zpid = std::process::id();
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
            reap_keepers(&mut keepers, &state_root);
        }
        if !sock_ready {
            continue;
        }
        let Some((msg, _fds)) = proto::recv::<ToZygote>(sock)? else {
            // Runner gone. Parked containers see EOF on their control pipes and exit; their
            // keepers clean up.
            return Ok(());
        };
        match msg {
            ToZygote::CreatePool { pool, spec: sspec } => {
                let userns_why = host.userns_unusable_for(&sspec);
                let reply = match spec::build(&sspec, &host, userns_why.is_none()).and_then(|v| {
                    // Validate once here rather than failing in every keeper.
                    serde_json::from_value::<Spec>(v.clone())
                        .map_err(|e| Error::Invalid(format!("OCI spec: {e}")))?;
                    Ok(v)
                }) {
                    Ok(v) => {
                        pools.insert(
                            pool,
                            PoolDef {
                                spec: v,
                                cgroup: host.cgroup,
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
            ToZygote::Spawn { pool, req } => {
                let Some(def) = pools.get(&pool) else {
                    let error = format!("unknown pool {pool}");
                    proto::send(sock, &FromZygote::SpawnFailed { req, error }, &[])?;
                    continue;
                };
                seq += 1;
                let id = sweep::container_id(zpid, seq);
                // SAFETY: the zygote is single-threaded.
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => {
                        // The keeper must not inherit a blocked SIGCHLD (nor pass it on).
                        let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
                        let code = keeper(sock, &state_root, &id, def, req);
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

/// Reaps exited keepers; a keeper that did not exit cleanly may have left its container.
fn reap_keepers(keepers: &mut HashMap<Pid, String>, state_root: &Path) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
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
fn keeper(sock: BorrowedFd<'_>, state_root: &Path, id: &str, def: &PoolDef, req: u64) -> i32 {
    let result = keeper_run(sock, state_root, id, def, req);
    sweep::remove_container(state_root, id);
    match result {
        Ok(()) => 0,
        Err(e) => {
            let error = e.to_string();
            let _ = proto::send(sock, &FromZygote::SpawnFailed { req, error }, &[]);
            1
        }
    }
}

fn pidfd_open(pid: i32) -> Result<OwnedFd> {
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
) -> Result<()> {
    let bundle = state_root.join("bundles").join(id);
    std::fs::create_dir_all(&bundle)?;
    let mut spec = def.spec.clone();
    spec["linux"]["cgroupsPath"] = Value::String(format!("/{CGROUP_PARENT}/{id}"));
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec(&spec).map_err(|e| Error::Protocol(e.to_string()))?,
    )?;

    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (ctl_r, ctl_w) = pipe2(cloexec)?;
    let (in_r, in_w) = pipe2(cloexec)?;
    let (out_r, out_w) = pipe2(cloexec)?;
    let (err_r, err_w) = pipe2(cloexec)?;
    let executor = LateExecutor {
        control_fd: ctl_r.as_raw_fd(),
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
        .with_detach(true)
        .build()
        .map_err(|e| Error::Container(format!("build: {e}")))?;
    drop(ctl_r);
    let pid = container
        .pid()
        .ok_or_else(|| Error::Container("no init pid".into()))?;
    let pidfd = pidfd_open(pid.as_raw())?;
    netlo::bring_up_lo(pid.as_raw())?;
    container
        .start()
        .map_err(|e| Error::Container(format!("start: {e}")))?;
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
        ],
    )?;
    // The runner now holds the only parent-side ends.
    drop((ctl_w, in_w, out_r, err_r, pidfd));

    // The init is our child via CLONE_PARENT without an exit signal: needs __WALL.
    let status = loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Err(nix::Error::EINTR) => continue,
            other => break other?,
        }
    };
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, c) => (Some(c), None),
        WaitStatus::Signaled(_, s, _) => (None, Some(s as i32)),
        _ => (None, None),
    };
    let (oom_killed, peak_memory_bytes) = memory_stats(def.cgroup, id);
    let exit = ExitInfo {
        exit_code,
        signal,
        oom_killed,
        peak_memory_bytes,
    };
    proto::send(sock, &FromZygote::Exited { req, exit }, &[])?;
    container
        .delete(true)
        .map_err(|e| Error::Container(format!("delete: {e}")))?;
    Ok(())
}

fn read_kv(path: PathBuf, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// (oom_killed, peak memory) read from the container's memory cgroup before deletion.
fn memory_stats(mode: Option<CgroupMode>, id: &str) -> (bool, Option<u64>) {
    let root = Path::new("/sys/fs/cgroup");
    let read_u64 = |p: PathBuf| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    match mode {
        Some(CgroupMode::V1 { .. }) => {
            let dir = root.join("memory").join(CGROUP_PARENT).join(id);
            let oom = read_kv(dir.join("memory.oom_control"), "oom_kill").unwrap_or(0) > 0;
            (oom, read_u64(dir.join("memory.max_usage_in_bytes")))
        }
        Some(CgroupMode::V2) => {
            let dir = root.join(CGROUP_PARENT).join(id);
            let oom = read_kv(dir.join("memory.events"), "oom_kill").unwrap_or(0) > 0;
            (oom, read_u64(dir.join("memory.peak")))
        }
        None => (false, None),
    }
}
