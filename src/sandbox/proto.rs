//! Messages between the runner and the zygote/keepers over a `SOCK_SEQPACKET` socketpair.
//! One message = one datagram (JSON) plus optional fds passed with `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::sandbox::detect::HostReport;
use crate::sandbox::error::{Failure, ProtocolError, Result};
use crate::sandbox::model::{CallFile, Enforcement, SandboxSpec};

const MAX_MSG: usize = 256 * 1024;

/// Fd number of the runner socket in the zygote.
pub const ZYGOTE_SOCK_FD: RawFd = 3;
/// Environment variables the runner sets for the zygote (its environment is otherwise empty).
pub const ENV_STATE_ROOT: &str = "TOOLWARDEN_SANDBOX_STATE";
pub const ENV_FORCE_RLIMITS: &str = "TOOLWARDEN_SANDBOX_FORCE_RLIMITS";
/// Set when the runner logs JSON lines: the zygote then logs them too.
pub const ENV_LOG_JSON: &str = "TOOLWARDEN_SANDBOX_LOG_JSON";

#[derive(Debug, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct LateExec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Written by the container init into its call-files tmpfs before execve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<CallFile>,
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
                // A datagram larger than our buffer arrives cut off: refuse it whole.
                if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                    return Err(ProtocolError::Truncated { max: buf.len() }.into());
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

/// Every message crosses a real socketpair (or, for `LateExec` and exit reports, the bytes a
/// pipe carries) and comes back identical; malformed, truncated or oversized input is an error,
/// never a panic. No root needed.
#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::path::PathBuf;
    use std::time::Duration;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use proptest::prelude::*;

    use super::*;
    use crate::sandbox::detect::{CgroupMode, IdMap, RootSwitch};
    use crate::sandbox::error::Error;
    use crate::sandbox::model::{BindMount, Limits, Mechanism};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn spec() -> SandboxSpec {
        SandboxSpec {
            rootfs: PathBuf::from("/rootfs with space"),
            mounts: vec![BindMount {
                source: PathBuf::from("/src"),
                destination: PathBuf::from("/dst"),
                read_only: true,
            }],
            limits: Limits {
                timeout: Duration::from_millis(1500),
                memory_bytes: None,
                ..Limits::default()
            },
            warm_pool: 3,
            call_files_dir: Some(PathBuf::from(crate::sandbox::model::SERVICE_ACCOUNT_DIR)),
        }
    }

    fn host() -> HostReport {
        HostReport {
            cgroup: Some(CgroupMode::V1 { memsw: false }),
            cgroup_unusable: Some("read-only".into()),
            userns_unusable: None,
            outer_bound: Some("memory.limit_in_bytes=max".into()),
            id_map: Some(IdMap {
                uid_base: 1,
                gid_base: 1,
                size: 65_535,
            }),
            root_switch: RootSwitch::MoveMount,
        }
    }

    fn enforcement() -> Enforcement {
        Enforcement {
            memory: Mechanism::Rlimit,
            pids: Mechanism::CgroupV2,
            cpu: Mechanism::CgroupV1,
            file_size: Mechanism::Rlimit,
            tmp_size: Mechanism::Tmpfs,
            devices: Mechanism::None,
            user_namespace: false,
            seccomp: true,
        }
    }

    fn exit() -> ExitInfo {
        ExitInfo {
            exit_code: None,
            signal: Some(9),
            oom_killed: true,
            peak_memory_bytes: Some(u64::MAX),
            reaped_ns: 1,
            sent_ns: 2,
        }
    }

    fn roundtrip<T>(msg: &T, fds: &[RawFd]) -> (T, usize)
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        let (a, b) = pair();
        send(a.as_fd(), msg, fds).unwrap();
        let (back, got) = recv::<T>(b.as_fd()).unwrap().expect("a message");
        (back, got.len())
    }

    #[test]
    fn every_message_to_the_zygote_comes_back_identical() {
        for msg in [
            ToZygote::CreatePool {
                pool: 1,
                spec: spec(),
            },
            ToZygote::DropPool { pool: u64::MAX },
            ToZygote::Spawn {
                pool: 2,
                req: 3,
                background: true,
            },
        ] {
            assert_eq!(roundtrip(&msg, &[]).0, msg);
        }
    }

    #[test]
    fn every_message_from_the_zygote_comes_back_identical() {
        let failure =
            Error::from(crate::sandbox::error::ContainerError::UnknownPool(4)).to_failure();
        for msg in [
            FromZygote::Hello { host: host() },
            FromZygote::PoolCreated {
                pool: 1,
                enforcement: enforcement(),
            },
            FromZygote::PoolFailed {
                pool: 1,
                error: failure.clone(),
            },
            FromZygote::Ready {
                req: 5,
                id: "tw-1-5".into(),
                pid: 42,
            },
            FromZygote::SpawnFailed {
                req: 6,
                error: failure.clone(),
            },
            FromZygote::Exited {
                req: 7,
                exit: exit(),
            },
        ] {
            assert_eq!(roundtrip(&msg, &[]).0, msg);
            // The exit report travels as plain bytes through a pipe.
            let bytes = serde_json::to_vec(&msg).unwrap();
            assert_eq!(serde_json::from_slice::<FromZygote>(&bytes).unwrap(), msg);
        }
        assert_eq!(failure.reason, "UnknownPool");
    }

    #[test]
    fn the_invocation_written_to_a_parked_init_comes_back_identical() {
        let late = LateExec {
            argv: vec!["sh".into(), "-c".into(), "echo \"é\" \u{0}".into()],
            env: vec![
                ("PATH".into(), "/bin".into()),
                ("EMPTY".into(), String::new()),
            ],
            cwd: Some("/tmp".into()),
            files: vec![
                CallFile {
                    name: "token".into(),
                    contents: "eyJhbGciOi.eyJzdWIi.c2ln".into(),
                },
                CallFile {
                    name: "ca.crt".into(),
                    contents: "-----BEGIN CERTIFICATE-----\n\u{0}é\n".into(),
                },
            ],
        };
        let bytes = serde_json::to_vec(&late).unwrap();
        assert_eq!(serde_json::from_slice::<LateExec>(&bytes).unwrap(), late);
        // A call without files sends what it always did, and an older sender's bytes
        // (no `files`) are a call without files.
        let plain = LateExec {
            files: Vec::new(),
            ..late
        };
        let bytes = serde_json::to_vec(&plain).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("files"));
        assert_eq!(serde_json::from_slice::<LateExec>(&bytes).unwrap(), plain);
    }

    #[test]
    fn a_spec_without_a_call_files_folder_reads_as_none() {
        let mut json = serde_json::to_value(spec()).unwrap();
        json.as_object_mut().unwrap().remove("call_files_dir");
        let back: SandboxSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back.call_files_dir, None);
    }

    #[test]
    fn fds_travel_with_their_message() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let msg = FromZygote::Ready {
            req: 1,
            id: "tw-1-1".into(),
            pid: 1,
        };
        let (back, fds) = roundtrip(&msg, &[r.as_raw_fd(), w.as_raw_fd()]);
        assert_eq!((back, fds), (msg, 2));
    }

    /// Sends raw bytes as one datagram, bypassing `send`.
    fn raw(sock: BorrowedFd<'_>, bytes: &[u8]) {
        let iov = [IoSlice::new(bytes)];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
    }

    #[test]
    fn malformed_messages_are_errors() {
        let (a, b) = pair();
        for bytes in [
            &b"not json"[..],
            b"{\"Spawn\":{\"pool\":1}}",
            b"{\"Unknown\":{}}",
            b"{\"DropPool\":{\"pool\":-1}}",
            b"{\"CreatePool\":{\"pool\":1,\"spec\":{\"rootfs\":\"/\"",
            b"\xff\xfe",
        ] {
            raw(a.as_fd(), bytes);
            let err = recv::<ToZygote>(b.as_fd()).unwrap_err();
            assert!(
                matches!(err, Error::Protocol(ProtocolError::Decode(_))),
                "{err}"
            );
            assert_eq!(err.reason(), "ZygoteProtocolError");
        }
        // A message of the other direction is not one of ours.
        send(a.as_fd(), &FromZygote::Hello { host: host() }, &[]).unwrap();
        assert!(recv::<ToZygote>(b.as_fd()).is_err());
        // The peer closing is not an error: it is the end.
        drop(a);
        assert!(recv::<ToZygote>(b.as_fd()).unwrap().is_none());
    }

    #[test]
    fn oversized_messages_are_refused_both_ways() {
        let (a, b) = pair();
        let mut big = spec();
        big.mounts = (0..MAX_MSG / 40)
            .map(|i| BindMount {
                source: PathBuf::from(format!("/source/{i:020}")),
                destination: PathBuf::from("/d"),
                read_only: false,
            })
            .collect();
        let err = send(a.as_fd(), &ToZygote::CreatePool { pool: 1, spec: big }, &[]).unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ProtocolError::TooLarge { .. })),
            "{err}"
        );
        // A datagram larger than the receiver's buffer is refused whole, not decoded cut off.
        let msg = serde_json::to_vec(&ToZygote::DropPool { pool: 1 }).unwrap();
        raw(a.as_fd(), &msg);
        let mut small = vec![0u8; msg.len() - 1];
        let err = recv_into::<ToZygote>(b.as_fd(), &mut small).unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ProtocolError::Truncated { .. })),
            "{err}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Arbitrary bytes from the peer are a message or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 1..2048)) {
            let (a, b) = pair();
            raw(a.as_fd(), &bytes);
            raw(a.as_fd(), &bytes);
            let _ = recv::<ToZygote>(b.as_fd());
            let _ = recv::<FromZygote>(b.as_fd());
            let _ = serde_json::from_slice::<LateExec>(&bytes);
        }
    }
}
