//! One call in a parked container: deliver the invocation, feed stdin, capture stdout and
//! stderr, wait for the exit report under the deadline, kill at the timeout.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::sandbox::error::{Error, InvocationError, ProtocolError, Result};
use crate::sandbox::model::{
    Captured, Enforcement, Invocation, Limits, MAX_CALL_FILE_BYTES, MAX_CALL_FILES, Outcome,
    is_call_file_name,
};
use crate::sandbox::output;
use crate::sandbox::proto::{self, FromZygote, LateExec};
use crate::sandbox::zygote_client::{Parked, lock};

/// How long to wait for the exit report after the SIGKILL at the timeout.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long to keep reading output after the exit report (pipes normally hit EOF at once).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Runs `inv` in the parked container `w` and collects its outcome. Never hangs: the container
/// is SIGKILLed at the timeout and every wait afterwards is bounded. `start` is when the call
/// began waiting (its duration includes that wait).
pub async fn run(
    w: Parked,
    inv: Invocation,
    start: Instant,
    limits: &Limits,
    enforcement: Enforcement,
    pool_id: u64,
) -> Result<Outcome> {
    let cap = limits.max_output_bytes;
    let out = Arc::new(Mutex::new(Captured::default()));
    let err = Arc::new(Mutex::new(Captured::default()));
    let late = LateExec {
        argv: inv.argv,
        env: inv.env,
        cwd: inv.cwd,
        files: inv.files,
    };
    let payload = serde_json::to_vec(&late).map_err(ProtocolError::Encode)?;
    let kill_guard = KillOnDrop(w.pidfd);
    let released_ns = proto::monotonic_ns();
    // Control pipe first (it releases the parked init). A payload up to PIPE_BUF always fits
    // into the fresh, empty pipe, so write it inline (no task, no epoll registration) and
    // close it at once: the init starts on EOF. Larger payloads and stdin are fed by a task
    // so a tool that does not read them cannot block us.
    let mut feed: Vec<(OwnedFd, Vec<u8>)> = Vec::new();
    if payload.len() <= libc::PIPE_BUF {
        let n = nix::unistd::write(&w.control, &payload)?;
        if n != payload.len() {
            return Err(ProtocolError::ShortWrite {
                written: n,
                len: payload.len(),
            }
            .into());
        }
        drop(w.control);
    } else {
        feed.push((w.control, payload));
    }
    if inv.stdin.is_empty() {
        drop(w.stdin);
    } else {
        feed.push((w.stdin, inv.stdin));
    }
    let stdin_task = (!feed.is_empty()).then(|| {
        tokio::spawn(async move {
            for (fd, data) in feed {
                output::feed(fd, data).await;
            }
        })
    });
    // Output is captured in this task (no spawn, no cross-thread wakeup) while waiting for
    // the exit report.
    let capture = async {
        tokio::join!(
            output::capture(w.stdout, cap, out.clone()),
            output::capture(w.stderr, cap, err.clone())
        )
    };
    let mut capture = std::pin::pin!(capture);
    let mut report = pipe::Receiver::from_owned_fd(w.report)?;
    let wait_exit = async {
        let mut buf = Vec::new();
        let mut read = std::pin::pin!(report.read_to_end(&mut buf));
        let deadline = Instant::now() + limits.timeout;
        let (r, timed_out) = match tokio::time::timeout_at(deadline.into(), &mut read).await {
            Ok(r) => (Some(r), false),
            Err(_) => {
                kill_guard.kill();
                (tokio::time::timeout(KILL_GRACE, &mut read).await.ok(), true)
            }
        };
        let ev = match r {
            Some(Ok(_)) if !buf.is_empty() => serde_json::from_slice::<FromZygote>(&buf)
                .map_err(|e| ProtocolError::Decode(e).into()),
            Some(Ok(_)) => Err(Error::KeeperDied),
            Some(Err(e)) => Err(e.into()),
            None => Err(Error::ExitStatusLost),
        };
        (ev, timed_out)
    };
    let mut wait_exit = std::pin::pin!(wait_exit);
    let mut captured = false;
    let (exit, timed_out) = tokio::select! {
        r = &mut wait_exit => r,
        _ = &mut capture => {
            captured = true;
            wait_exit.await
        }
    };
    let exit = match exit? {
        FromZygote::Exited { exit, .. } => exit,
        FromZygote::SpawnFailed { error, .. } => return Err(Error::Reported(error)),
        _ => return Err(ProtocolError::Unexpected("exit report").into()),
    };
    let duration = start.elapsed();
    let got_ns = proto::monotonic_ns();
    if !captured {
        // Pipes normally hit EOF with the exit; a leaked writer (a daemonised grandchild
        // is killed with the pid namespace) cannot hold us longer than the grace.
        let _ = tokio::time::timeout(OUTPUT_GRACE, &mut capture).await;
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    let us = |a: u64, b: u64| b.saturating_sub(a) / 1000;
    tracing::debug!(
        pool = pool_id,
        setup_us = start.elapsed().as_micros() as u64 - us(released_ns, proto::monotonic_ns()),
        released_to_reaped_us = us(released_ns, exit.reaped_ns),
        reaped_to_sent_us = us(exit.reaped_ns, exit.sent_ns),
        sent_to_received_us = us(exit.sent_ns, got_ns),
        received_to_done_us = us(got_ns, proto::monotonic_ns()),
        total_us = start.elapsed().as_micros() as u64,
        "sandbox call timing"
    );
    let take = |c: &Arc<Mutex<Captured>>| std::mem::take(&mut *lock(c));
    Ok(Outcome {
        exit_code: exit.exit_code,
        signal: exit.signal,
        stdout: take(&out),
        stderr: take(&err),
        timed_out,
        oom_killed: exit.oom_killed,
        duration,
        peak_memory_bytes: exit.peak_memory_bytes,
        enforcement,
    })
}

/// Kills the container if the call is dropped (e.g. the HTTP request is cancelled).
struct KillOnDrop(OwnedFd);

impl KillOnDrop {
    fn kill(&self) {
        let _ = rustix::process::pidfd_send_signal(&self.0, rustix::process::Signal::KILL);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // After a normal exit the process is gone; the signal then fails harmlessly
        // (the pidfd refers to that exact process, never to a reused pid).
        self.kill();
    }
}

/// Refuses an invocation the container init could not run as given (checked before a
/// container is taken from the pool). `call_files`: whether the pool's sandboxes have a
/// call-files tmpfs.
pub fn validate(inv: &Invocation, call_files: bool) -> Result<(), InvocationError> {
    if !inv.files.is_empty() && !call_files {
        return Err(InvocationError::NoCallFilesMount);
    }
    if inv.files.len() > MAX_CALL_FILES {
        return Err(InvocationError::TooManyCallFiles(inv.files.len()));
    }
    for (i, file) in inv.files.iter().enumerate() {
        if !is_call_file_name(&file.name) || inv.files[..i].iter().any(|f| f.name == file.name) {
            return Err(InvocationError::BadCallFileName(file.name.clone()));
        }
        if file.contents.len() > MAX_CALL_FILE_BYTES {
            return Err(InvocationError::CallFileTooLarge(file.name.clone()));
        }
    }
    if inv.argv.is_empty() {
        return Err(InvocationError::EmptyArgv);
    }
    let bad = |s: &str| s.contains('\0');
    if inv.argv.iter().any(|a| bad(a)) {
        return Err(InvocationError::NulInArgv);
    }
    for (k, v) in &inv.env {
        if k.is_empty() || k.contains('=') || bad(k) || bad(v) {
            return Err(InvocationError::BadEnvName(k.clone()));
        }
    }
    if let Some(cwd) = &inv.cwd
        && (!cwd.starts_with('/') || bad(cwd))
    {
        return Err(InvocationError::RelativeCwd);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::model::CallFile;

    fn with_files(names: &[&str]) -> Invocation {
        Invocation {
            argv: vec!["true".into()],
            files: names
                .iter()
                .map(|name| CallFile {
                    name: name.to_string(),
                    contents: "x".into(),
                })
                .collect(),
            ..Invocation::default()
        }
    }

    #[test]
    fn hostile_call_file_names_are_refused_before_any_container_is_taken() {
        for name in [
            "../token",
            "..",
            ".",
            "",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "to\0ken",
            "tok en",
            "tøken",
            &"a".repeat(65),
        ] {
            let err = validate(&with_files(&[name]), true).unwrap_err();
            assert!(
                matches!(err, InvocationError::BadCallFileName(_)),
                "{name:?}: {err}"
            );
        }
        assert!(matches!(
            validate(&with_files(&["token", "token"]), true),
            Err(InvocationError::BadCallFileName(_))
        ));
        validate(&with_files(&["token", "ca.crt", "namespace"]), true).unwrap();
    }

    #[test]
    fn call_files_are_bounded_and_need_their_folder() {
        assert!(matches!(
            validate(&with_files(&["token"]), false),
            Err(InvocationError::NoCallFilesMount)
        ));
        let names: Vec<String> = (0..=MAX_CALL_FILES).map(|i| format!("f{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert!(matches!(
            validate(&with_files(&names), true),
            Err(InvocationError::TooManyCallFiles(_))
        ));
        let mut big = with_files(&["token"]);
        big.files[0].contents = "x".repeat(MAX_CALL_FILE_BYTES + 1);
        assert!(matches!(
            validate(&big, true),
            Err(InvocationError::CallFileTooLarge(_))
        ));
        // Without files, nothing changes for a pool without the folder.
        validate(&with_files(&[]), false).unwrap();
    }
}
