//! The executor without a sandbox: the tool's command as a plain child
//! process of the runner (tests of the HTTP pipeline, `--unsandboxed-dev`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::executor::{Degradation, ExecError, ExecFuture, ExecOutcome, ToolExecutor};
use super::tool::{PreparedTool, SecretDelivery};
use crate::sandbox::model::SERVICE_ACCOUNT_DIR;

/// **Unsandboxed**: runs the tool's command as an ordinary child process of the
/// runner, with the runner's privileges, file system and network. It enforces
/// only the timeout and the output cap, ignores `runtime.image`, and refuses
/// tools that declare file secrets (it has nowhere private to put them).
///
/// It exists for tests of the HTTP pipeline only. `serve` uses it only under
/// the loud `--unsandboxed-dev` flag; it must never run untrusted tools.
#[derive(Clone, Debug, Default)]
pub struct UnsandboxedProcessExecutor;

impl ToolExecutor for UnsandboxedProcessExecutor {
    fn execute<'a>(
        &'a self,
        tool: &'a PreparedTool,
        stdin: Vec<u8>,
        secrets: Vec<SecretDelivery>,
    ) -> ExecFuture<'a> {
        Box::pin(run_process(tool, stdin, secrets))
    }

    fn degradations(&self, _tool: &PreparedTool) -> Option<Vec<Degradation>> {
        Some(vec![Degradation {
            missing: "sandbox",
            reason: "--unsandboxed-dev runs tools as plain processes".into(),
        }])
    }

    fn isolation(&self) -> String {
        "NONE: unsandboxed child processes (--unsandboxed-dev)".into()
    }
}

/// Why a tool cannot run without a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Unrunnable {
    #[error("runtime.command is empty")]
    EmptyCommand,
    #[error("file secrets ({path}) need the sandbox")]
    FileSecret { path: String },
}

impl Unrunnable {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            Unrunnable::EmptyCommand => "EmptyCommand",
            Unrunnable::FileSecret { .. } => "FileSecretNeedsSandbox",
        }
    }
}

async fn run_process(
    tool: &PreparedTool,
    stdin: Vec<u8>,
    secrets: Vec<SecretDelivery>,
) -> Result<ExecOutcome, ExecError> {
    let runtime = &tool.spec.runtime;
    let argv: Vec<&String> = runtime.command.iter().chain(&runtime.args).collect();
    let Some((program, args)) = argv.split_first() else {
        return Err(ExecError::NotRunnable(Box::new(Unrunnable::EmptyCommand)));
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .envs(runtime.env.iter().map(|e| (&e.name, &e.value)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for secret in secrets {
        match secret {
            SecretDelivery::Env { name, value } => {
                command.env(name, value);
            }
            SecretDelivery::File { path, .. } => {
                return Err(ExecError::NotRunnable(Box::new(Unrunnable::FileSecret {
                    path,
                })));
            }
            SecretDelivery::CallFile(file) => {
                return Err(ExecError::NotRunnable(Box::new(Unrunnable::FileSecret {
                    path: format!("{SERVICE_ACCOUNT_DIR}/{}", file.name),
                })));
            }
        }
    }
    if let Some(dir) = &runtime.working_dir {
        command.current_dir(dir);
    }
    let cap = tool.capture_bytes();
    let timeout = Duration::from_millis(u64::from(tool.spec.sandbox.timeout_ms));
    let started = Instant::now();
    let mut child = command.spawn().map_err(ExecError::Spawn)?;
    let mut child_stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let work = async {
        // A tool that exits without reading its input closes the pipe: not an error.
        let feed = async move {
            let _ = child_stdin.write_all(&stdin).await;
            drop(child_stdin);
        };
        let ((), out, err, status) = tokio::join!(
            feed,
            read_capped(stdout, cap),
            read_capped(stderr, cap),
            child.wait()
        );
        Ok::<_, ExecError>((out?, err?, status.map_err(ExecError::Io)?))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => {
            let ((stdout, stdout_truncated), (stderr, stderr_truncated), status) = result?;
            Ok(ExecOutcome {
                exit_code: status.code(),
                stdout,
                stdout_truncated,
                stderr,
                stderr_truncated,
                duration: started.elapsed(),
                ..ExecOutcome::default()
            })
        }
        // Dropping `work` dropped the child, and kill_on_drop killed it.
        Err(_) => Ok(ExecOutcome {
            timed_out: true,
            duration: started.elapsed(),
            ..ExecOutcome::default()
        }),
    }
}

/// Reads a stream to its end, keeping at most `cap` bytes (the rest is drained
/// so the writer never blocks on a full pipe).
async fn read_capped(
    mut stream: impl AsyncRead + Unpin,
    cap: usize,
) -> Result<(Vec<u8>, bool), ExecError> {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).await.map_err(ExecError::Io)?;
        if n == 0 {
            return Ok((kept, truncated));
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        truncated |= n > room;
    }
}
