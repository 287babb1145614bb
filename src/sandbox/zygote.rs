//! The zygote: a fresh single-threaded process (`toolwarden sandbox-zygote`) that owns all
//! container creation. This file is its event loop: it answers the runner's requests, forks
//! one keeper per container ([`crate::sandbox::keeper`]) and reaps them.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::Spec;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::sandbox::detect::{CgroupMode, HostReport, RootSwitch};
use crate::sandbox::error::{ContainerError, Error, Result, SetupError, SpecError};
use crate::sandbox::keeper::{self, BACKGROUND_NICE, PoolDef, set_nice};
use crate::sandbox::model::Enforcement;
use crate::sandbox::names;
use crate::sandbox::proto::{
    self, ENV_FORCE_RLIMITS, ENV_LOG_JSON, ENV_STATE_ROOT, FromZygote, ToZygote, ZYGOTE_SOCK_FD,
};
use crate::sandbox::{mountpoint, oci_spec, seal, seccomp, sweep, zygote_mounts};

/// Entry point of the hidden `sandbox-zygote` subcommand. Returns the process exit code.
pub fn zygote_main() -> i32 {
    let seal_err = seal::ensure_sealed().err();
    tracing::dispatcher::with_default(&log_subscriber(), || serve(seal_err))
}

fn serve(seal_err: Option<std::io::Error>) -> i32 {
    // Started by hand, without the runner's socket: owning a closed fd would abort.
    let cloexec = nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC);
    let sock = nix::fcntl::fcntl(ZYGOTE_SOCK_FD, cloexec).map(|_| {
        // SAFETY: fd 3 is open (checked by the fcntl) and was placed there by the runner for
        // this process alone; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(ZYGOTE_SOCK_FD) }
    });
    let result = match &sock {
        Ok(sock) => run(sock.as_fd(), seal_err),
        Err(errno) => Err(SetupError::NoSocket {
            fd: ZYGOTE_SOCK_FD,
            errno: *errno,
        }
        .into()),
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, reason = e.reason(), "sandbox zygote failed");
            1
        }
    };
    // Only now: the runner learns of a failure when this socket closes, and may exit at once;
    // the reason must be on stderr before that.
    drop(sock);
    code
}

/// The zygote's diagnostics go to the stderr it shares with the runner, as text or as JSON
/// lines like the runner's (`ENV_LOG_JSON`), at the level of the runner's `RUST_LOG` (passed on
/// by the runner; default `info`). Installed for the
/// zygote's thread only, never process-wide: a keeper (and the container init cloned from it,
/// whose stderr is the tool's) must not log, or libcontainer's own events would end up in the
/// tool's output (see the keeper's fork).
fn log_subscriber() -> tracing::Dispatch {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if std::env::var_os(ENV_LOG_JSON).is_some() {
        tracing::Dispatch::new(builder.json().finish())
    } else {
        tracing::Dispatch::new(builder.finish())
    }
}

fn run(sock: BorrowedFd<'_>, seal_err: Option<std::io::Error>) -> Result<()> {
    if let Some(e) = seal_err {
        // Never run unsealed: the container init would expose the runner binary.
        return Err(SetupError::Unsealed(e).into());
    }
    let state_root =
        PathBuf::from(std::env::var_os(ENV_STATE_ROOT).ok_or(SetupError::NoStateRoot)?);
    std::fs::create_dir_all(&state_root)?;
    let zpid = std::process::id();
    become_reaper()?;
    zygote_mounts::enter_own_mount_namespace()?;
    zygote_mounts::unmask_proc();
    let host = HostReport::detect(std::env::var_os(ENV_FORCE_RLIMITS).is_some(), &state_root);
    // After detection (which places the per-call cgroups' parent on cgroup v2), before this
    // zygote's mount namespace hides anything (the state tmpfs, the cgroup tree).
    sweep::sweep(&state_root);
    // The per-call cgroups' hierarchy; None in rlimit mode.
    let per_call_cgroup = host.cgroup.filter(|_| host.cgroup_unusable.is_none());
    let root = if per_call_cgroup.is_some() {
        let root = names::zygote_dir(&state_root, zpid);
        std::fs::create_dir_all(&root)?;
        zygote_mounts::mount_state_tmpfs(&root)?;
        root
    } else {
        state_root.clone()
    };
    std::fs::create_dir_all(root.join("bundles"))?;
    if host.cgroup_unusable.is_some() {
        zygote_mounts::hide_cgroupfs()?;
    } else if matches!(host.cgroup, Some(CgroupMode::V1 { .. }))
        && let Err(e) = zygote_mounts::hide_unused_cgroup_v1()
    {
        // Only a cost: libcontainer then uses every hierarchy, as before.
        tracing::warn!(
            error = %e,
            reason = e.reason(),
            "sandbox zygote keeps all cgroup v1 hierarchies"
        );
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
                    .map_err(SpecError::MountTarget)
                    .and_then(|()| oci_spec::build(&sspec, &host, userns_why.is_none()))
                    .and_then(|v| {
                        // Validate once here rather than failing in every keeper.
                        serde_json::from_value::<Spec>(v.clone()).map_err(SpecError::Oci)?;
                        Ok(v)
                    }) {
                    Ok(v) => {
                        let address_space = oci_spec::address_space_limit(&sspec.limits, &host);
                        pools.insert(
                            pool,
                            PoolDef {
                                spec: v,
                                cgroup: per_call_cgroup,
                                address_space,
                                no_pivot: host.root_switch == RootSwitch::MoveMount,
                                id_map: host.id_map.filter(|_| userns_why.is_none()),
                                call_files_dir: sspec.call_files_dir.clone(),
                            },
                        );
                        let enforcement: Enforcement = host.enforcement(userns_why.is_none());
                        FromZygote::PoolCreated { pool, enforcement }
                    }
                    Err(e) => FromZygote::PoolFailed {
                        pool,
                        error: Error::from(e).to_failure(),
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
                    let error = Error::from(ContainerError::UnknownPool(pool)).to_failure();
                    proto::send(sock, &FromZygote::SpawnFailed { req, error }, &[])?;
                    continue;
                };
                seq += 1;
                let id = names::container_id(zpid, seq);
                // A refill's fork (copying the zygote's page tables) must not preempt the call
                // that triggered it: fork at low priority; the keeper inherits it.
                if background {
                    set_nice(0, BACKGROUND_NICE);
                }
                // SAFETY: the zygote is single-threaded (the runner started it fresh and it
                // starts no thread), so the keeper's copy of memory holds no lock another
                // thread took; the keeper leaves only through `_exit`.
                let forked = unsafe { fork() };
                if background && !matches!(forked, Ok(ForkResult::Child)) {
                    set_nice(0, 0);
                }
                match forked {
                    Ok(ForkResult::Child) => {
                        // The keeper must not inherit a blocked SIGCHLD (nor pass it on).
                        let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
                        // No diagnostics from here on (see `log_subscriber`).
                        let silent = tracing::subscriber::NoSubscriber::default();
                        let code = tracing::subscriber::with_default(silent, || {
                            keeper::keeper(sock, &root, &id, def, req, background)
                        });
                        // SAFETY: `_exit` takes a plain int and never returns; it runs no
                        // destructor or atexit handler, so the keeper releases nothing it
                        // shares with the zygote (the socket, the pools, the signalfd).
                        unsafe { libc::_exit(code) }
                    }
                    Ok(ForkResult::Parent { child }) => {
                        keepers.insert(child, id);
                    }
                    Err(e) => {
                        let error = Error::from(ContainerError::ForkKeeper(e)).to_failure();
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

/// Makes the zygote the reaper of every process it starts, at any depth: a container init whose
/// keeper died, or anything a keeper left, is re-parented here (not to the runner, or to PID 1
/// of a pod, which may never reap) and reaped by `reap_keepers`. Also starts with no
/// supplementary groups: in a user namespace the sandbox could not drop them itself
/// (`setgroups` is denied there), and a group of the runner's would open files to it.
fn become_reaper() -> Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(SetupError::Subreaper)?;
    if nix::unistd::setgroups(&[]).is_err() && !nix::unistd::getgroups()?.is_empty() {
        return Err(SetupError::SupplementaryGroups.into());
    }
    Ok(())
}
