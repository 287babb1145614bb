//! What a caller of the engine gives and gets: a pool's [`SandboxSpec`] and [`Limits`], one
//! call's [`Invocation`] and [`Outcome`], and the [`Enforcement`] vocabulary used in audit
//! records, metrics and logs.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A bind mount from the host into the sandbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    /// Absolute path inside the sandbox. Resolved inside the rootfs (symlinks cannot escape).
    pub destination: PathBuf,
    pub read_only: bool,
}

/// Resource limits, fixed when a pool is created.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock limit from delivery of the invocation; the whole container is SIGKILLed.
    pub timeout: Duration,
    /// Memory (memory+swap) limit.
    pub memory_bytes: Option<u64>,
    /// CPU quota in millicores (1000 = one full core).
    pub cpu_millicores: Option<u32>,
    /// Maximum number of tasks (processes + threads).
    pub pids: u32,
    /// Cap for each of stdout and stderr; extra output is drained and dropped.
    pub max_output_bytes: usize,
    /// Size of the tmpfs mounted at /tmp (and /dev/shm).
    pub tmp_size_bytes: u64,
    /// RLIMIT_FSIZE: largest file a sandboxed process may write.
    pub file_size_bytes: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(10),
            memory_bytes: Some(256 << 20),
            cpu_millicores: Some(1000),
            pids: 64,
            max_output_bytes: 1 << 20,
            tmp_size_bytes: 64 << 20,
            file_size_bytes: 64 << 20,
            open_files: 1024,
        }
    }
}

/// Everything fixed per pool (per tool generation).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Root filesystem directory, mounted read-only.
    pub rootfs: PathBuf,
    pub mounts: Vec<BindMount>,
    pub limits: Limits,
    /// Number of pre-created containers kept ready (0 = every call is cold).
    pub warm_pool: usize,
    /// Where each sandbox gets a small tmpfs of its own for the files of its one call
    /// ([`Invocation::files`]); `None`: no such mount, and calls carry no files.
    #[serde(default)]
    pub call_files_dir: Option<PathBuf>,
}

/// The standard folder of a pod's Kubernetes credentials (`token`, `namespace`, `ca.crt`),
/// where client libraries look for them: a tool's own identity is handed over there.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// At most this many files per call, each at most [`MAX_CALL_FILE_BYTES`]: credentials, not data.
pub const MAX_CALL_FILES: usize = 8;
pub const MAX_CALL_FILE_BYTES: usize = 64 << 10;
/// Size of the per-sandbox tmpfs holding them: every file at its largest fits.
pub const CALL_FILES_TMPFS_BYTES: usize = MAX_CALL_FILES * MAX_CALL_FILE_BYTES;

/// A file for one call only, written (mode 0400, owned by the sandbox's user) into the
/// pool's [`SandboxSpec::call_files_dir`] before the tool starts.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallFile {
    /// A plain file name: see [`is_call_file_name`].
    pub name: String,
    pub contents: String,
}

impl std::fmt::Debug for CallFile {
    /// Never the contents: they are credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CallFile({:?}, {} bytes)",
            self.name,
            self.contents.len()
        )
    }
}

/// A name that stays inside its folder: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` (so never `.` or `..`), hence no `/`, no NUL, no traversal.
pub fn is_call_file_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One call.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Invocation {
    /// argv[0] is resolved against PATH from `env` (or a default PATH) if it has no '/'.
    pub argv: Vec<String>,
    /// The complete environment of the tool; nothing of the runner's leaks in.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox (default "/").
    pub cwd: Option<String>,
    pub stdin: Vec<u8>,
    /// This call's own files (e.g. its Kubernetes token), for a pool with a `call_files_dir`.
    pub files: Vec<CallFile>,
}

/// A captured output stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    pub bytes: Vec<u8>,
    /// More bytes were written than `max_output_bytes`.
    pub truncated: bool,
}

/// What enforces one limit. One vocabulary everywhere (audit records, metrics, logs):
/// camelCase, as in the CRDs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Mechanism {
    CgroupV1,
    CgroupV2,
    Rlimit,
    Tmpfs,
    None,
}

impl Mechanism {
    /// The serialized name: `cgroupV1`, `cgroupV2`, `rlimit`, `tmpfs`, `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::CgroupV1 => "cgroupV1",
            Mechanism::CgroupV2 => "cgroupV2",
            Mechanism::Rlimit => "rlimit",
            Mechanism::Tmpfs => "tmpfs",
            Mechanism::None => "none",
        }
    }
}

/// Which mechanism is active per limit, reported at startup and in every [`Outcome`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Enforcement {
    pub memory: Mechanism,
    pub pids: Mechanism,
    pub cpu: Mechanism,
    pub file_size: Mechanism,
    pub tmp_size: Mechanism,
    /// Devices restricted by the device cgroup (v1) or only by the device list (v2 without eBPF).
    pub devices: Mechanism,
    pub user_namespace: bool,
    pub seccomp: bool,
}

/// Result of one call.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub timed_out: bool,
    /// Killed by the memory cgroup's OOM killer. Always false when memory is enforced by
    /// RLIMIT_AS (see `enforcement.memory`): allocations are refused instead.
    pub oom_killed: bool,
    pub duration: Duration,
    /// Peak memory of the sandbox (memory cgroup); with rlimits, the largest peak RSS of a
    /// single process (the tool or a descendant it reaped).
    pub peak_memory_bytes: Option<u64>,
    pub enforcement: Enforcement,
}

impl std::fmt::Display for Enforcement {
    /// `memory=cgroupV1 pids=cgroupV1 ... userNamespace=true seccomp=true`, for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory={} pids={} cpu={} fileSize={} tmpSize={} devices={} userNamespace={} seccomp={}",
            self.memory.as_str(),
            self.pids.as_str(),
            self.cpu.as_str(),
            self.file_size.as_str(),
            self.tmp_size.as_str(),
            self.devices.as_str(),
            self.user_namespace,
            self.seccomp
        )
    }
}

#[cfg(test)]
mod vocabulary_tests {
    use super::*;

    #[test]
    fn records_metrics_and_logs_use_the_same_camel_case_names() {
        for m in [
            Mechanism::CgroupV1,
            Mechanism::CgroupV2,
            Mechanism::Rlimit,
            Mechanism::Tmpfs,
            Mechanism::None,
        ] {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        let e = Enforcement {
            memory: Mechanism::CgroupV1,
            pids: Mechanism::CgroupV1,
            cpu: Mechanism::CgroupV1,
            file_size: Mechanism::Rlimit,
            tmp_size: Mechanism::Tmpfs,
            devices: Mechanism::None,
            user_namespace: true,
            seccomp: true,
        };
        let json = serde_json::to_value(e).unwrap();
        assert_eq!(json["fileSize"], "rlimit");
        assert_eq!(json["userNamespace"], true);
        assert!(
            e.to_string().contains("fileSize=rlimit tmpSize=tmpfs"),
            "{e}"
        );
    }
}
