//! The seam between the runner and whatever runs a tool: [`ToolExecutor`].
//!
//! The real implementation is `sandbox_executor::SandboxExecutor`: a fresh
//! youki sandbox per call. `unsandboxed::UnsandboxedProcessExecutor` runs the
//! tool's command as a plain child process of the runner, with no isolation
//! at all: it exists for the HTTP pipeline's tests and the loud
//! `--unsandboxed-dev` flag.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::tool::{PreparedTool, SecretDelivery};

/// What one run of a tool produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecOutcome {
    /// Exit status; `None` when the process was killed by a signal.
    pub exit_code: Option<i32>,
    /// At most [`PreparedTool::capture_bytes`]: the pipeline redacts, then
    /// cuts to `sandbox.maxOutputBytes`.
    pub stdout: Vec<u8>,
    pub stdout_truncated: bool,
    /// At most [`PreparedTool::capture_bytes`].
    pub stderr: Vec<u8>,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    pub oom_killed: bool,
    pub duration: Duration,
    /// Peak memory of the run, when the executor can measure it.
    pub peak_memory_bytes: Option<u64>,
    /// Which mechanism enforced each limit; `None` without a sandbox.
    pub enforcement: Option<crate::sandbox::Enforcement>,
}

/// Why a tool could not be run at all (as opposed to running and failing).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The executor cannot run this tool (e.g. its sandbox cannot be built,
    /// or its isolation would be degraded); the source says why.
    #[error("the tool could not be started: {0}")]
    NotRunnable(Box<dyn std::error::Error + Send + Sync>),
    #[error("the tool could not be started: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the tool could not be started: {0}")]
    Sandbox(#[from] crate::sandbox::Error),
    #[error("the tool's I/O failed: {0}")]
    Io(#[source] std::io::Error),
}

impl ExecError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            ExecError::NotRunnable(_) => "ToolNotRunnable",
            ExecError::Spawn(_) => "ToolSpawnFailed",
            ExecError::Sandbox(_) => "SandboxFailed",
            ExecError::Io(_) => "ToolIoFailed",
        }
    }
}

/// A protection a tool runs without, and why: listed by the banner,
/// `GET /v1/tools` and the `toolwarden_sandbox_degraded` metric.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Degradation {
    /// `userNamespace`, `cgroups`, or `sandbox` (no isolation at all).
    pub missing: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Degradation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no {}: {}", self.missing, self.reason)
    }
}

/// Future returned by [`ToolExecutor::execute`]; boxed so executors can sit
/// behind `Arc<dyn ToolExecutor>` and `serve` can pick one at run time.
pub type ExecFuture<'a, T = ExecOutcome> =
    Pin<Box<dyn Future<Output = Result<T, ExecError>> + Send + 'a>>;

/// Runs one call of a tool: `tool.spec.runtime` with its limits
/// (`tool.spec.sandbox`), `stdin` as standard input and `secrets` delivered
/// as declared. Implementations enforce the timeout and the output cap.
pub trait ToolExecutor: Send + Sync {
    fn execute<'a>(
        &'a self,
        tool: &'a PreparedTool,
        stdin: Vec<u8>,
        secrets: Vec<SecretDelivery>,
    ) -> ExecFuture<'a>;

    /// [`ToolExecutor::execute`], with the records of the egress proxy (for a
    /// tool with `permissions.network.egress`) going to `egress_audit`.
    /// Executors that run no proxy ignore it.
    fn execute_with_egress<'a>(
        &'a self,
        tool: &'a PreparedTool,
        stdin: Vec<u8>,
        secrets: Vec<SecretDelivery>,
        egress_audit: std::sync::Arc<dyn crate::egress::EgressAudit>,
    ) -> ExecFuture<'a> {
        let _ = egress_audit;
        self.execute(tool, stdin, secrets)
    }

    /// Called with the whole tool set after every (re)load, off the request
    /// path: get ready to run `tools` (e.g. fill warm pools) and release what
    /// belonged to tools no longer in it. Returns the tools that cannot be
    /// run, each with why.
    fn prepare<'a>(
        &'a self,
        tools: &'a [std::sync::Arc<PreparedTool>],
    ) -> ExecFuture<'a, Vec<(String, ExecError)>> {
        let _ = tools;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// What `tool` runs without once prepared (empty: full isolation);
    /// `None` while it is not prepared.
    fn degradations(&self, tool: &PreparedTool) -> Option<Vec<Degradation>> {
        let _ = tool;
        None
    }

    /// One line for the startup banner, e.g. `youki sandbox (namespaces, seccomp, cgroups)`.
    fn isolation(&self) -> String;
}
