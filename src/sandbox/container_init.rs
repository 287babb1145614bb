//! The libcontainer `Executor` that runs inside the container init. libcontainer calls
//! `exec` after pivot_root, setuid(65534), capability drop, no_new_privs and the start
//! signal; we then park reading the real invocation from a control pipe (late delivery is what
//! makes warm containers possible; seccomp is installed before parking), close every other fd
//! and execve.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};

use crate::sandbox::model::{CallFile, is_call_file_name};
use crate::sandbox::oci_spec::DEFAULT_PATH;
use crate::sandbox::proto::LateExec;
use crate::sandbox::seccomp;

#[derive(Clone)]
pub struct ParkedInit {
    /// Read end of the control pipe (open in the keeper when `build()` forks the init).
    pub control_fd: RawFd,
    /// A pidfd of the keeper (the init's parent), open until `exec` has set the parent-death signal.
    pub keeper_pidfd: RawFd,
    /// RLIMIT_AS (rlimit mode), set just before execve: earlier, the init still has the
    /// zygote's (larger) address space and its own allocations would fail.
    pub address_space: Option<u64>,
    /// The container's own tmpfs for the call's files (`SandboxSpec::call_files_dir`).
    pub call_files_dir: Option<PathBuf>,
}

/// Exit codes used when the sandbox could not run the tool (like a shell's 126/127).
pub const EXIT_NOT_FOUND: i32 = 127;
pub const EXIT_CANNOT_EXEC: i32 = 126;

fn fail(code: i32, msg: &str) -> ! {
    // fd 2 is the caller's stderr pipe: the reason becomes part of the Outcome.
    let line = format!("toolwarden-sandbox: {msg}\n");
    let _ = nix::unistd::write(std::io::stderr(), line.as_bytes());
    exit_now(code)
}

/// Ends the init at once. Nothing may run on the way out: no destructor (they would act on
/// state cloned from the keeper) and no atexit handler (libc's, which would flush stdio
/// buffers copied from the keeper).
fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` takes a plain int, touches no memory of ours and never returns; it is
    // unsafe only as a foreign function (neither nix nor rustix wraps it for a process).
    unsafe { libc::_exit(code) }
}

impl Executor for ParkedInit {
    fn exec(&self, _spec: &Spec) -> Result<(), ExecutorError> {
        // Die with the keeper: if the keeper is killed (with its zygote and runner, say) nothing
        // else would end this sandbox at its deadline. Set here because a credential change
        // (libcontainer's setuid/setgid, done by now) clears it; execve keeps it (nosuid mounts:
        // no set-id exec can clear it), and seccomp stops the tool from clearing it. As PID 1 of
        // its pid namespace the init takes the tool's whole tree along.
        if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err() {
            fail(EXIT_CANNOT_EXEC, "prctl(PR_SET_PDEATHSIG) failed");
        }
        // The keeper may have died before that: then nothing would ever send the signal.
        let mut keeper = libc::pollfd {
            fd: self.keeper_pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one initialised `pollfd` we own, length 1, no wait; the kernel only reads the
        // fd number (a closed one would come back as POLLNVAL, not as undefined behaviour).
        // Raw because the fd is a number inherited through clone(), not a Rust-owned fd.
        if unsafe { libc::poll(&mut keeper, 1, 0) } != 0 {
            exit_now(EXIT_CANNOT_EXEC)
        }
        // The init was cloned while the keeper held the parent-side pipe ends (stdin write end,
        // control write end, ...): close every inherited fd except stdio and the control pipe
        // now, or neither stdin nor the control pipe would ever reach EOF.
        let fd = self.control_fd as u32;
        if fd > 3 {
            close_range(3, fd - 1);
        }
        close_range(fd + 1, u32::MAX);
        // Also before parking, off the request path: dispositions survive until execve.
        reset_signals();
        // Install seccomp before parking: the filter (~1,400 BPF instructions) costs ~0.3 ms to
        // load, which is then off the request path; everything below until execve (read, close,
        // chdir, getcwd, stat, write, exit) is in the allowlist, and parking under the filter
        // only tightens the init.
        let filters = match seccomp::filters() {
            Ok(f) => f,
            Err(e) => fail(EXIT_CANNOT_EXEC, &e.to_string()),
        };
        if let Err(e) = seccomp::apply(filters) {
            fail(EXIT_CANNOT_EXEC, &format!("seccomp: {e}"));
        }
        // SAFETY: the control pipe's read end was inherited from the keeper for this init
        // alone and kept open by the close_range above; nothing else here owns it.
        let mut control = unsafe { std::fs::File::from_raw_fd(self.control_fd) };
        let mut buf = Vec::new();
        if control.read_to_end(&mut buf).is_err() || buf.is_empty() {
            // Pool shut down (runner closed the control pipe) before any invocation.
            exit_now(0)
        }
        drop(control);
        let inv: LateExec = match serde_json::from_slice(&buf) {
            Ok(v) => v,
            Err(e) => fail(EXIT_CANNOT_EXEC, &format!("bad invocation: {e}")),
        };
        // Close (not merely CLOEXEC) every fd above stdio before touching user-controlled
        // paths, so `cwd=/proc/self/fd/N` cannot reach a runtime fd (CVE-2024-21626).
        if !close_range(3, u32::MAX) {
            fail(EXIT_CANNOT_EXEC, "close_range failed");
        }
        if let Err(e) = write_call_files(self.call_files_dir.as_deref(), &inv.files) {
            fail(EXIT_CANNOT_EXEC, &e.to_string());
        }
        let cwd = inv.cwd.as_deref().unwrap_or("/");
        if let Err(e) = nix::unistd::chdir(cwd) {
            fail(EXIT_CANNOT_EXEC, &format!("chdir {cwd}: {e}"));
        }
        match nix::unistd::getcwd() {
            // getcwd reports "(unreachable)..." (or fails) for a cwd outside our root.
            Ok(p) if p.is_absolute() => {}
            _ => fail(EXIT_CANNOT_EXEC, "cwd is outside the sandbox root"),
        }
        let Some(arg0) = inv.argv.first() else {
            fail(EXIT_CANNOT_EXEC, "empty argv");
        };
        let path_var = inv
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(DEFAULT_PATH);
        let Some(prog) = resolve(arg0, path_var) else {
            fail(EXIT_NOT_FOUND, &format!("{arg0}: not found"));
        };
        let to_c = |s: String| {
            CString::new(s).unwrap_or_else(|_| fail(EXIT_CANNOT_EXEC, "NUL byte in argument"))
        };
        let prog = to_c(prog);
        let argv: Vec<CString> = inv.argv.into_iter().map(to_c).collect();
        let envp: Vec<CString> = inv
            .env
            .into_iter()
            .map(|(k, v)| to_c(format!("{k}={v}")))
            .collect();
        if let Some(bytes) = self.address_space {
            // Lowering a limit needs no privilege; setrlimit/prlimit64 are in the allowlist.
            let address_space = nix::sys::resource::Resource::RLIMIT_AS;
            if nix::sys::resource::setrlimit(address_space, bytes, bytes).is_err() {
                fail(EXIT_CANNOT_EXEC, "setrlimit(RLIMIT_AS) failed");
            }
        }
        let err = nix::unistd::execve(&prog, &argv, &envp).unwrap_err();
        let code = if err == nix::Error::ENOENT {
            EXIT_NOT_FOUND
        } else {
            EXIT_CANNOT_EXEC
        };
        fail(code, &format!("exec {}: {err}", prog.to_string_lossy()))
    }

    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        // argv is not known yet; it is checked at exec time.
        Ok(())
    }

    fn setup_envs(
        &self,
        _envs: std::collections::HashMap<String, String>,
    ) -> Result<(), ExecutorSetEnvsError> {
        // Scrub everything inherited from the runner; execve gets an explicit envp.
        for (k, _) in std::env::vars_os() {
            // SAFETY: the container init is a clone of the single-threaded keeper and starts no
            // thread: nothing reads the environment while it changes.
            unsafe { std::env::remove_var(k) };
        }
        Ok(())
    }
}

/// Why the container init could not write a call's files (the tool then does not run).
#[derive(Debug, thiserror::Error)]
enum CallFileError {
    #[error("per-call files but no call-files folder")]
    NoFolder,
    #[error("bad per-call file name {0:?}")]
    BadName(String),
    #[error("per-call file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Writes each of the call's files into `dir`, this container's fresh tmpfs, as the
/// sandbox's user (the init's uid by now), mode 0400. Names are checked again here (the
/// runner checked them): a name is one plain path component, and `create_new` with
/// `O_NOFOLLOW` never writes through anything already there.
fn write_call_files(dir: Option<&Path>, files: &[CallFile]) -> Result<(), CallFileError> {
    if files.is_empty() {
        return Ok(());
    }
    let dir = dir.ok_or(CallFileError::NoFolder)?;
    for file in files {
        if !is_call_file_name(&file.name) {
            return Err(CallFileError::BadName(file.name.clone()));
        }
        let path = dir.join(&file.name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .and_then(|mut f| f.write_all(file.contents.as_bytes()))
            .map_err(|source| CallFileError::Write { path, source })?;
    }
    Ok(())
}

fn resolve(arg0: &str, path_var: &str) -> Option<String> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if arg0.contains('/') {
        // Let execve report the precise error (ENOENT, EACCES...).
        return Some(arg0.to_string());
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(arg0))
        .find(|p| is_exec(p))
        .map(|p| p.to_string_lossy().into_owned())
}

/// Closes the fds `first..=last` (what is open in that range). Returns false on failure.
///
/// Only for the container init, which never returns (it execs or exits): fds Rust objects
/// cloned from the keeper still "own" there are never used or dropped again.
fn close_range(first: u32, last: u32) -> bool {
    // SAFETY: close_range(2) takes plain integers and touches no memory; closing is sound for
    // the reason above. Raw because neither nix 0.29 nor rustix 1.1 wraps close_range.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) == 0 }
}

/// Gives the tool default signal dispositions and an empty signal mask, as a
/// shell would: the Rust runtime ignores SIGPIPE (and glibc's internal real-time
/// signals may be ignored too), and execve keeps ignored signals ignored, so
/// `yes | head -1` would otherwise never end by SIGPIPE.
fn reset_signals() {
    /// The kernel's `struct sigaction` on x86_64 (glibc's wrapper refuses the
    /// real-time signals it reserves, so the raw system call is used).
    #[cfg(target_arch = "x86_64")]
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: 0, // SIG_DFL
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `default` is a valid x86_64 kernel sigaction (SIG_DFL, no flags, empty mask)
        // that outlives the call, the old action is not asked for (null), and 8 is the size of
        // the kernel's sigset. Installing SIG_DFL runs no handler code; the init is
        // single-threaded, so no other thread relies on a disposition.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    let empty = 0u64;
    // SAFETY: `empty` is a valid 8-byte kernel sigset that outlives the call; the old mask is
    // not asked for (null). Unblocking signals in the single-threaded init only lets them in.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
}

/// The init's own check of a call's files, for an invocation that did not come through
/// the runner's validation (no root needed: plain files in a temporary folder).
#[cfg(test)]
mod call_file_tests {
    use super::*;

    fn file(name: &str) -> CallFile {
        CallFile {
            name: name.into(),
            contents: "t0ken".into(),
        }
    }

    #[test]
    fn the_init_writes_plain_names_only_and_never_through_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        for name in ["../escape", "a/b", "..", ""] {
            let err = write_call_files(Some(dir.path()), &[file(name)]).unwrap_err();
            assert!(matches!(err, CallFileError::BadName(_)), "{name:?}: {err}");
        }
        assert!(matches!(
            write_call_files(None, &[file("token")]),
            Err(CallFileError::NoFolder)
        ));
        // A link planted where the token goes is not followed.
        let target = outside.path().join("stolen");
        std::os::unix::fs::symlink(&target, dir.path().join("token")).unwrap();
        let err = write_call_files(Some(dir.path()), &[file("token")]).unwrap_err();
        assert!(matches!(err, CallFileError::Write { .. }), "{err}");
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // A good name: mode 0400, the contents as given.
        write_call_files(Some(dir.path()), &[file("ca.crt")]).unwrap();
        let written = dir.path().join("ca.crt");
        assert_eq!(std::fs::read_to_string(&written).unwrap(), "t0ken");
        let mode = std::fs::metadata(&written).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o400);
    }
}
