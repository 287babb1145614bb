//! PID 1 duty. In a pod the runner is its container's PID 1: every orphan of the pid namespace
//! (a keeper whose zygote died, a container init whose keeper died) is re-parented to it and
//! must be reaped, or zombies pile up until `clone3` fails with EAGAIN. The runner itself is a
//! multi-threaded tokio process whose children are reaped by their owners (`Child::wait`), so it
//! cannot also reap "any child". As tini and dumb-init do, PID 1 therefore forks at startup,
//! before any thread exists: the child goes on as the runner, the parent stays a tiny init that
//! reaps every process re-parented to it and forwards termination signals to the runner.
//! (The zygote additionally is a subreaper for what it starts: `zygote::become_reaper`.)

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

/// Signals PID 1 passes on to the runner (the kernel never delivers a signal without a handler
/// to a namespace's init, so they would otherwise be lost).
const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// When this process is PID 1: forks, and returns `None` in the child (which goes on as the
/// runner) while the parent reaps and forwards until the runner exits, then returns
/// `Some(exit code)` (the runner's). Returns `None` at once when not PID 1. Call early in
/// `main`, while the process is still single-threaded.
pub fn init_if_pid1() -> Option<i32> {
    if std::process::id() != 1 {
        return None;
    }
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    for s in FORWARDED {
        mask.add(*s);
    }
    // Blocked before the fork, so no signal is lost between fork and the signalfd.
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None) {
        tracing::warn!(error = %e, "PID 1 without reaping: sigprocmask failed");
        return None;
    }
    // SAFETY: single-threaded here (first thing in main, before any thread exists), so the
    // child's copy of memory holds no lock another thread took.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
            None
        }
        Ok(ForkResult::Parent { child }) => Some(reap_until_exit(child, &mask)),
        Err(e) => {
            let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
            tracing::warn!(error = %e, "PID 1 without reaping: fork failed");
            None
        }
    }
}

/// The init loop: reaps every child, forwards signals to `runner`, returns its exit code.
fn reap_until_exit(runner: Pid, mask: &SigSet) -> i32 {
    let Ok(signals) = SignalFd::with_flags(mask, SfdFlags::SFD_CLOEXEC) else {
        // Cannot happen with a valid mask; without it, still wait for the runner.
        return exit_code(waitpid(runner, None));
    };
    loop {
        let Ok(Some(info)) = signals.read_signal() else {
            continue;
        };
        let signal = Signal::try_from(info.ssi_signo as i32);
        if let Ok(s) = signal
            && s != Signal::SIGCHLD
        {
            let _ = kill(runner, s);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) if status.pid() == Some(runner) => return exit_code(Ok(status)),
                Ok(_) => {}
            }
        }
    }
}

fn exit_code(status: nix::Result<WaitStatus>) -> i32 {
    match status {
        Ok(WaitStatus::Exited(_, code)) => code,
        Ok(WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
        _ => 1,
    }
}

/// Zombies in our pid namespace (in a pod: the pod's), from /proc: the symptom of a missing
/// reaper, exported as a metric.
pub fn zombies() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // "pid (comm) S ...": the state follows the last ')' (comm may hold one).
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .count()
}
