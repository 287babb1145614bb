//! The engine's errors. `Display` is the human text; `reason()` is a stable CamelCase name,
//! usable as a Kubernetes condition reason, an Event reason and a metric label. An error raised
//! in the zygote or a keeper crosses the socket as a [`Failure`] (its reason and text) and is
//! [`Error::Reported`] on the runner's side.

use std::path::PathBuf;

use libcontainer::error::LibcontainerError;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid invocation: {0}")]
    Invocation(#[from] InvocationError),
    #[error("invalid sandbox spec: {0}")]
    Spec(#[from] SpecError),
    #[error("zygote setup: {0}")]
    Setup(#[from] SetupError),
    #[error("container {0}")]
    Container(#[from] ContainerError),
    #[error("seccomp filter: {0}")]
    Seccomp(&'static seccompiler::BackendError),
    #[error("zygote protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// Raised in the zygote or a keeper and reported over the socket.
    #[error("{}", .0.message)]
    Reported(Failure),
    #[error("the zygote did not start (see its stderr)")]
    ZygoteStartFailed,
    #[error("the zygote exited")]
    ZygoteExited,
    #[error("the sandbox engine is shut down")]
    EngineClosed,
    #[error("the keeper died without an exit report")]
    KeeperDied,
    #[error("no exit status for the sandbox after it was killed")]
    ExitStatusLost,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("system call: {0}")]
    Nix(#[from] nix::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Stable CamelCase name of the failure. For an error reported by the zygote, the reason it
    /// reported (computed by this same function there).
    pub fn reason(&self) -> &str {
        match self {
            Error::Invocation(_) => "InvalidInvocation",
            Error::Spec(e) => e.reason(),
            Error::Setup(e) => e.reason(),
            Error::Container(e) => e.reason(),
            Error::Seccomp(_) => "SeccompCompileFailed",
            Error::Protocol(_) => "ZygoteProtocolError",
            Error::Reported(f) => &f.reason,
            Error::ZygoteStartFailed => "ZygoteStartFailed",
            Error::ZygoteExited => "ZygoteExited",
            Error::EngineClosed => "EngineClosed",
            Error::KeeperDied => "KeeperDied",
            Error::ExitStatusLost => "ExitStatusLost",
            Error::Io(_) => "IoError",
            Error::Nix(_) => "SystemCallFailed",
        }
    }

    /// The wire form of this error, for the runner.
    pub fn to_failure(&self) -> Failure {
        match self {
            Error::Reported(f) => f.clone(),
            e => Failure {
                reason: e.reason().to_string(),
                message: e.to_string(),
            },
        }
    }
}

/// An error as the zygote reports it to the runner: its [`Error::reason`] and its text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub reason: String,
    pub message: String,
}

/// An [`crate::sandbox::model::Invocation`] the sandbox cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvocationError {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("NUL byte in argv")]
    NulInArgv,
    #[error("bad environment variable name {0:?}")]
    BadEnvName(String),
    #[error("cwd must be an absolute path")]
    RelativeCwd,
    #[error("per-call files for a pool without a call-files folder")]
    NoCallFilesMount,
    #[error("{0} per-call files (at most {max})", max = crate::sandbox::model::MAX_CALL_FILES)]
    TooManyCallFiles(usize),
    #[error(
        "per-call file name {0:?} is not a plain, unique file name (1-64 of A-Z a-z 0-9 . _ -, no leading dot)"
    )]
    BadCallFileName(String),
    #[error("per-call file {0:?} is larger than {max} bytes", max = crate::sandbox::model::MAX_CALL_FILE_BYTES)]
    CallFileTooLarge(String),
}

/// A [`crate::sandbox::model::SandboxSpec`] no OCI spec can be built from.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("rootfs must be an absolute path")]
    RelativeRootfs,
    #[error("bind mount paths must be absolute")]
    RelativeBindMount,
    #[error("the call-files folder must be an absolute path")]
    RelativeCallFilesDir,
    #[error("user namespace without an id map")]
    UserNamespaceWithoutIdMap,
    #[error("mount targets: {0}")]
    MountTarget(std::io::Error),
    #[error("OCI spec: {0}")]
    Oci(serde_json::Error),
}

impl SpecError {
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::RelativeRootfs => "RootfsNotAbsolute",
            SpecError::RelativeBindMount => "BindMountNotAbsolute",
            SpecError::RelativeCallFilesDir => "CallFilesDirNotAbsolute",
            SpecError::UserNamespaceWithoutIdMap => "UserNamespaceWithoutIdMap",
            SpecError::MountTarget(_) => "MountTargetMissing",
            SpecError::Oci(_) => "OciSpecInvalid",
        }
    }
}

/// The zygote could not set itself up (it then exits; the runner reports it did not start).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot re-exec from sealed memfd: {0}")]
    Unsealed(std::io::Error),
    #[error("no state root in the environment")]
    NoStateRoot,
    #[error("no runner socket on fd {fd}: {errno}")]
    NoSocket { fd: i32, errno: nix::Error },
    #[error("PR_SET_CHILD_SUBREAPER: {0}")]
    Subreaper(nix::Error),
    #[error("cannot drop the supplementary groups (no CAP_SETGID)")]
    SupplementaryGroups,
    #[error("own mount namespace: {step}: {errno}")]
    OwnMountNamespace {
        step: &'static str,
        errno: nix::Error,
    },
    #[error("mount state tmpfs on {}: {errno}", .dir.display())]
    StateTmpfs { dir: PathBuf, errno: nix::Error },
    #[error("hide cgroupfs: {step}: {errno}")]
    HideCgroupfs {
        step: &'static str,
        errno: nix::Error,
    },
    #[error("hide cgroupfs: /sys/fs/cgroup missing (libcontainer needs it)")]
    NoCgroupRoot,
    #[error("hide cgroupfs: cannot unmount cgroup v1 hierarchies {0:?}")]
    CgroupV1Left(Vec<PathBuf>),
    #[error("umount {}: {errno}", .mount.display())]
    UnmountCgroupV1 { mount: PathBuf, errno: nix::Error },
}

impl SetupError {
    pub fn reason(&self) -> &'static str {
        match self {
            SetupError::Unsealed(_) => "ZygoteUnsealed",
            SetupError::NoStateRoot | SetupError::NoSocket { .. } => "ZygoteMisconfigured",
            SetupError::Subreaper(_) => "SubreaperFailed",
            SetupError::SupplementaryGroups => "SupplementaryGroupsKept",
            SetupError::OwnMountNamespace { .. } => "MountNamespaceFailed",
            SetupError::StateTmpfs { .. } => "StateTmpfsFailed",
            SetupError::HideCgroupfs { .. }
            | SetupError::NoCgroupRoot
            | SetupError::CgroupV1Left(_) => "HideCgroupfsFailed",
            SetupError::UnmountCgroupV1 { .. } => "HideCgroupV1Failed",
        }
    }
}

/// One container could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("state root: {0:#}")]
    StateRoot(LibcontainerError),
    #[error("build: {0}")]
    Build(LibcontainerError),
    #[error("build: no init pid")]
    NoInitPid,
    #[error("start: {0}")]
    Start(LibcontainerError),
    #[error("remove /dev/{entry}: {errno}")]
    RemoveDevice {
        entry: &'static str,
        errno: nix::Error,
    },
    #[error("loopback: {0}")]
    Loopback(std::io::Error),
    #[error("loopback: the setup thread panicked")]
    LoopbackPanicked,
    #[error("egress proxy listener in the sandbox: {0}")]
    EgressListener(std::io::Error),
    #[error("for unknown pool {0}")]
    UnknownPool(u64),
    #[error("fork keeper: {0}")]
    ForkKeeper(nix::Error),
}

impl ContainerError {
    pub fn reason(&self) -> &'static str {
        match self {
            ContainerError::StateRoot(_) => "ContainerStateRootFailed",
            ContainerError::Build(_) | ContainerError::NoInitPid => "ContainerBuildFailed",
            ContainerError::Start(_) => "ContainerStartFailed",
            ContainerError::RemoveDevice { .. } => "DeviceCleanupFailed",
            ContainerError::Loopback(_) | ContainerError::LoopbackPanicked => "LoopbackFailed",
            ContainerError::EgressListener(_) => "EgressListenerFailed",
            ContainerError::UnknownPool(_) => "UnknownPool",
            ContainerError::ForkKeeper(_) => "KeeperForkFailed",
        }
    }
}

/// A message between the runner and the zygote that cannot be sent or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("encode: {0}")]
    Encode(serde_json::Error),
    #[error("decode: {0}")]
    Decode(serde_json::Error),
    #[error("message of {len} bytes exceeds {max}")]
    TooLarge { len: usize, max: usize },
    #[error("control message truncated")]
    ControlTruncated,
    #[error("message larger than {max} bytes")]
    Truncated { max: usize },
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    #[error("a parked container came with {0} fds, not 6")]
    FdCount(usize),
    #[error("short write to the control pipe ({written} of {len} bytes)")]
    ShortWrite { written: usize, len: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_camel_case_and_survive_the_socket() {
        let errors = [
            Error::from(InvocationError::EmptyArgv),
            Error::from(SpecError::RelativeRootfs),
            Error::from(SetupError::NoStateRoot),
            Error::from(ContainerError::UnknownPool(7)),
            Error::from(ProtocolError::ControlTruncated),
            Error::ZygoteExited,
            Error::from(nix::Error::EPERM),
        ];
        for e in errors {
            let reason = e.reason().to_string();
            assert!(
                reason
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_uppercase())
                    && reason.chars().all(|c| c.is_ascii_alphanumeric()),
                "{reason}"
            );
            // Reported by the zygote, the runner sees the same reason and text.
            let reported = Error::Reported(e.to_failure());
            assert_eq!(reported.reason(), reason);
            assert_eq!(reported.to_string(), e.to_string());
        }
        assert_eq!(
            Error::from(ContainerError::UnknownPool(7)).to_string(),
            "container for unknown pool 7"
        );
    }
}
