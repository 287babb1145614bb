//! Messages between the runner and the zygote/keepers over a `SOCK_SEQPACKET` socketpair.
//! One message = one datagram (JSON) plus optional fds passed with `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::sandbox::detect::HostReport;
use crate::sandbox::error::{Failure, ProtocolError, Result};
use crate::sandbox::model::{Enforcement, SandboxSpec};

const MAX_MSG: usize = 256 * 1024;

/// Fd number of the runner socket in the zygote.
pub const ZYGOTE_SOCK_FD: RawFd = 3;
/// Environment variables the runner sets for the zygote (its environment is otherwise empty).
pub const ENV_STATE_ROOT: &str = "TOOLWARDEN_SANDBOX_STATE";
pub const ENV_FORCE_RLIMITS: &str = "TOOLWARDEN_SANDBOX_FORCE_RLIMITS";

#[derive(Debug, Serialize, Deserialize)]
pub enum ToZygote {
    CreatePool {
        pool: u64,
        spec: SandboxSpec,
    },
    DropPool {
        pool: u64,
    },
    /// Fork a keeper that creates one container of `pool`; replies are tagged `req`.
    Spawn {
        pool: u64,
        req: u64,
        /// A warm-pool refill: build at low CPU priority.
        #[serde(default)]
        background: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum FromZygote {
    Hello {
        host: HostReport,
    },
    PoolCreated {
        pool: u64,
        enforcement: Enforcement,
    },
    PoolFailed {
        pool: u64,
        error: Failure,
    },
    /// Container is parked in its init (`container_init`). Fds: control, stdin, stdout, stderr, pidfd, and
    /// the read end of the exit-report pipe (which then carries `Exited` or `SpawnFailed`).
    Ready {
        req: u64,
        id: String,
        pid: i32,
    },
    SpawnFailed {
        req: u64,
        error: Failure,
    },
    Exited {
        req: u64,
        exit: ExitInfo,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitInfo {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub peak_memory_bytes: Option<u64>,
    /// CLOCK_MONOTONIC (ns) when the keeper reaped the init and when it sent this report: lets
    /// the runner log where a call's time went (debug level).
    #[serde(default)]
    pub reaped_ns: u64,
    #[serde(default)]
    pub sent_ns: u64,
}

/// CLOCK_MONOTONIC in ns (same clock in every process of the host).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Wire form of an invocation written into a parked container's control pipe.
#[derive(Debug, Serialize, Deserialize)]
pub struct LateExec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
}

pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[RawFd]) -> Result<()> {
    let buf = serde_json::to_vec(msg).map_err(ProtocolError::Encode)?;
    if buf.len() > MAX_MSG {
        return Err(ProtocolError::TooLarge {
            len: buf.len(),
            max: MAX_MSG,
        }
        .into());
    }
    let iov = [IoSlice::new(&buf)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Blocking receive. `Ok(None)` means the peer closed the socket.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
) -> Result<Option<(T, Vec<OwnedFd>)>> {
    thread_local! {
        // Reused: a fresh 256 KiB buffer per message is an mmap + munmap + page faults on the
        // exit-report path.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MSG]);
    }
    BUF.with_borrow_mut(|buf| recv_into(sock, buf))
}

fn recv_into<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<Option<(T, Vec<OwnedFd>)>> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; 8]);
    let (len, fds) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these fds in this process for this
                        // message; nothing else owns them.
                        fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    return Err(ProtocolError::ControlTruncated.into());
                }
                break (msg.bytes, fds);
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if len == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..len]).map_err(ProtocolError::Decode)?;
    Ok(Some((msg, fds)))
}
