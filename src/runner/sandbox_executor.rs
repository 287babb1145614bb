//! The real [`ToolExecutor`]: every call runs in a fresh youki sandbox from
//! the engine in `src/sandbox/`. One warm pool per tool generation, created when
//! the tool is loaded ([`ToolExecutor::prepare`]) and dropped when a reload
//! replaces or removes the tool, so calls in flight keep their pool.

use std::collections::HashMap;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::api::{AgentToolSpec, FilesystemMount, parse_quantity};
use crate::sandbox::detect::RootSwitch;
use crate::sandbox::spec::SANDBOX_UID;
use crate::sandbox::{BindMount, Enforcement, Invocation, Limits, Pool, SandboxSpec, Sandboxes};

use super::executor::{ExecError, ExecFuture, ExecOutcome, SecretDelivery, ToolExecutor};
use super::registry::PreparedTool;

/// Where the standalone runner finds the volumes a tool names:
/// `DIR/pvc/<claim>` and `DIR/configmap/<name>`.
#[derive(Clone, Debug, Default)]
pub struct VolumesDir(pub Option<PathBuf>);

pub struct SandboxExecutor {
    engine: Sandboxes,
    volumes: VolumesDir,
    /// Private per-pool folders for file secrets (root-owned, mode 0711).
    scratch_root: PathBuf,
    pools: Mutex<HashMap<PoolKey, Arc<OnceCell<Arc<ToolPool>>>>>,
}

type PoolKey = (String, u64);

/// A pool and the secret files only its sandboxes see; the files go with it.
struct ToolPool {
    pool: Pool,
    _secret_files: Option<SecretFiles>,
}

/// A private folder of file secrets, removed when dropped.
struct SecretFiles(PathBuf);

impl Drop for SecretFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl SandboxExecutor {
    pub fn new(engine: Sandboxes, volumes: VolumesDir, scratch_root: PathBuf) -> Self {
        SandboxExecutor {
            engine,
            volumes,
            scratch_root,
            pools: Mutex::new(HashMap::new()),
        }
    }

    async fn pool(&self, tool: &PreparedTool) -> Result<Arc<ToolPool>, String> {
        let cell = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((tool.name.clone(), tool.generation))
            .or_default()
            .clone();
        // A failed creation leaves the cell empty: the next call tries again.
        cell.get_or_try_init(|| self.create_pool(tool))
            .await
            .cloned()
    }

    async fn create_pool(&self, tool: &PreparedTool) -> Result<Arc<ToolPool>, String> {
        let rootfs = tool.rootfs.as_ref().ok_or_else(|| {
            format!(
                "no root file system for image {:?} (pass --images)",
                tool.spec.runtime.image
            )
        })?;
        let rootfs =
            std::fs::canonicalize(rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
        let mut spec = SandboxSpec {
            rootfs,
            mounts: volume_mounts(&tool.spec, &self.volumes)?,
            limits: limits(&tool.spec)?,
            warm_pool: tool.spec.sandbox.warm_pool as usize,
        };
        let files: Vec<(&str, &[u8])> = tool
            .secrets
            .iter()
            .filter_map(|s| match s {
                SecretDelivery::File { path, value } => Some((path.as_str(), value.as_slice())),
                SecretDelivery::Env { .. } => None,
            })
            .collect();
        let secret_files = if files.is_empty() {
            None
        } else {
            let dir = SecretFiles(self.scratch_root.join(uuid::Uuid::new_v4().to_string()));
            write_secret_files(&dir.0, &files, &mut spec.mounts)
                .and_then(|files| {
                    // The sandbox user must own them: the host's 65534, or its
                    // user-namespace mapping when this pool gets a user namespace.
                    let host = self.engine.host();
                    let owner = match host.userns_unusable_for(&spec) {
                        None => host.sandbox_outer_uid().unwrap_or(SANDBOX_UID),
                        Some(_) => SANDBOX_UID,
                    };
                    files
                        .iter()
                        .try_for_each(|f| chown(f, Some(owner), Some(owner)))
                })
                .map_err(|e| format!("secret files: {e}"))?;
            Some(dir)
        };
        let pool = self.engine.pool(spec).await.map_err(|e| e.to_string())?;
        Ok(Arc::new(ToolPool {
            pool,
            _secret_files: secret_files,
        }))
    }
}

impl ToolExecutor for SandboxExecutor {
    fn execute<'a>(
        &'a self,
        tool: &'a PreparedTool,
        stdin: Vec<u8>,
        secrets: Vec<SecretDelivery>,
    ) -> ExecFuture<'a> {
        Box::pin(async move {
            let pool = self.pool(tool).await.map_err(ExecError::Spawn)?;
            let runtime = &tool.spec.runtime;
            let mut env: Vec<(String, String)> = runtime
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect();
            // File secrets are mounted with the pool; env secrets go to this run only.
            env.extend(secrets.into_iter().filter_map(|s| match s {
                SecretDelivery::Env { name, value } => Some((name, value)),
                SecretDelivery::File { .. } => None,
            }));
            let invocation = Invocation {
                argv: runtime
                    .command
                    .iter()
                    .chain(&runtime.args)
                    .cloned()
                    .collect(),
                env,
                cwd: runtime.working_dir.clone(),
                stdin,
            };
            let outcome = pool
                .pool
                .run(invocation)
                .await
                .map_err(|e| ExecError::Spawn(e.to_string()))?;
            Ok(ExecOutcome {
                exit_code: outcome.exit_code,
                stdout: outcome.stdout.bytes,
                stdout_truncated: outcome.stdout.truncated,
                stderr: outcome.stderr.bytes,
                stderr_truncated: outcome.stderr.truncated,
                timed_out: outcome.timed_out,
                oom_killed: outcome.oom_killed,
                duration: outcome.duration,
                peak_memory_bytes: outcome.peak_memory_bytes,
                enforcement: Some(outcome.enforcement),
            })
        })
    }

    fn prepare<'a>(&'a self, tools: &'a [Arc<PreparedTool>]) -> ExecFuture<'a, Vec<String>> {
        Box::pin(async move {
            let live: Vec<PoolKey> = tools
                .iter()
                .map(|t| (t.name.clone(), t.generation))
                .collect();
            // Pools of replaced or removed tools go; calls in flight hold their own Arc.
            self.pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|key, _| live.contains(key));
            let mut errors = Vec::new();
            for tool in tools {
                match self.pool(tool).await {
                    Ok(pool) => tracing::info!(
                        tool = %tool.name,
                        generation = tool.generation,
                        enforcement = %describe(&pool.pool.enforcement()),
                        "sandbox pool ready"
                    ),
                    Err(e) => errors.push(format!("{}: {e}", tool.name)),
                }
            }
            Ok(errors)
        })
    }

    fn isolation(&self) -> String {
        let host = self.engine.host();
        let user_namespace = match (&host.userns_unusable, host.id_map) {
            (None, Some(ids)) => format!(
                "yes (sandbox ids 0-{} are the runner's {}-{})",
                ids.size - 1,
                ids.uid_base,
                ids.uid_base + (ids.size - 1)
            ),
            (Some(why), _) => format!("no ({why})"),
            (None, None) => "no".to_string(),
        };
        let root_switch = match host.root_switch {
            RootSwitch::PivotRoot => "pivot_root",
            RootSwitch::MoveMount => "move-mount + chroot (pivot_root refused)",
        };
        let outer_bound = host
            .outer_bound
            .as_ref()
            .map(|b| format!("; outer bound: {b}"))
            .unwrap_or_default();
        format!(
            "youki sandbox per call (pid, mount, ipc, uts, net, cgroup namespaces; seccomp; {}; user namespace: {user_namespace}; root switch: {root_switch}{outer_bound})",
            describe_mechanism(host.cgroup_mechanism()),
        )
    }
}

/// `spec.sandbox` as engine limits. Quantities were bounded by the CRD schema;
/// a value that still does not parse is a clear error, not a default.
fn limits(spec: &AgentToolSpec) -> Result<Limits, String> {
    let sandbox = &spec.sandbox;
    let quantity = |field: &str, q: &Option<_>| -> Result<Option<f64>, String> {
        q.as_ref()
            .map(|q| parse_quantity(q).map_err(|e| format!("spec.sandbox.{field}: {e}")))
            .transpose()
    };
    let defaults = Limits::default();
    let tmp_size_bytes =
        quantity("tmpSize", &sandbox.tmp_size)?.map_or(defaults.tmp_size_bytes, |b| b as u64);
    Ok(Limits {
        timeout: Duration::from_millis(u64::from(sandbox.timeout_ms)),
        memory_bytes: quantity("memory", &sandbox.memory)?
            .map(|b| b as u64)
            .or(defaults.memory_bytes),
        cpu_millicores: quantity("cpu", &sandbox.cpu)?
            .map(|cores| (cores * 1000.0).ceil() as u32)
            .or(defaults.cpu_millicores),
        pids: sandbox.pids,
        max_output_bytes: usize::try_from(sandbox.max_output_bytes).unwrap_or(usize::MAX),
        tmp_size_bytes,
        // A tool cannot write a file bigger than its scratch space anyway.
        file_size_bytes: tmp_size_bytes,
        open_files: defaults.open_files,
    })
}

/// `permissions.filesystem` as bind mounts from the host.
fn volume_mounts(spec: &AgentToolSpec, volumes: &VolumesDir) -> Result<Vec<BindMount>, String> {
    spec.permissions
        .filesystem
        .iter()
        .enumerate()
        .map(|(i, mount)| {
            let at = |e: String| format!("spec.permissions.filesystem[{i}]: {e}");
            let named = volume_source(mount, volumes).map_err(at)?;
            // The engine takes absolute paths; symlinks are resolved here, on the host.
            let source = std::fs::canonicalize(&named)
                .map_err(|e| at(format!("{}: {e}", named.display())))?;
            if !source.is_dir() {
                return Err(at(format!("{} is not a folder", source.display())));
            }
            Ok(BindMount {
                source,
                destination: PathBuf::from(&mount.mount_path),
                read_only: mount.read_only,
            })
        })
        .collect()
}

fn volume_source(mount: &FilesystemMount, volumes: &VolumesDir) -> Result<PathBuf, String> {
    let named = |kind: &str, name: &str| match &volumes.0 {
        Some(dir) => Ok(dir.join(kind).join(name)),
        None => Err(format!(
            "{kind} {name:?} needs a volumes folder (--volumes DIR, read as DIR/{kind}/{name})"
        )),
    };
    if let Some(path) = &mount.host_path {
        Ok(PathBuf::from(path))
    } else if let Some(claim) = &mount.persistent_volume_claim {
        named("pvc", claim)
    } else if let Some(name) = &mount.config_map {
        named("configmap", name)
    } else {
        // A shared folder would let one call leave data for the next, which a
        // fresh sandbox per call must not allow; /tmp is the per-call scratch.
        Err(
            "emptyDir is not available to the standalone runner; use /tmp (spec.sandbox.tmpSize)"
                .into(),
        )
    }
}

/// Writes each file secret into `dir` (mode 0400) and adds a read-only bind
/// mount of it at its declared path. Returns the files written.
fn write_secret_files(
    dir: &Path,
    files: &[(&str, &[u8])],
    mounts: &mut Vec<BindMount>,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // Traversable (a user-namespaced sandbox must reach the files), not listable.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    let mut written = Vec::new();
    for (i, (path, value)) in files.iter().enumerate() {
        let file = dir.join(i.to_string());
        std::fs::write(&file, value)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400))?;
        mounts.push(BindMount {
            source: file.clone(),
            destination: PathBuf::from(path),
            read_only: true,
        });
        written.push(file);
    }
    Ok(written)
}

/// Which mechanism enforces each limit, as (limit, mechanism) pairs.
pub fn enforcement_pairs(e: &Enforcement) -> [(&'static str, &'static str); 8] {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    [
        ("memory", describe_mechanism(e.memory)),
        ("pids", describe_mechanism(e.pids)),
        ("cpu", describe_mechanism(e.cpu)),
        ("fileSize", describe_mechanism(e.file_size)),
        ("tmpSize", describe_mechanism(e.tmp_size)),
        ("devices", describe_mechanism(e.devices)),
        ("userNamespace", yes_no(e.user_namespace)),
        ("seccomp", yes_no(e.seccomp)),
    ]
}

/// One line for logs: which mechanism enforces each limit.
pub fn describe(e: &Enforcement) -> String {
    enforcement_pairs(e)
        .iter()
        .map(|(limit, mechanism)| format!("{limit}={mechanism}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe_mechanism(m: crate::sandbox::Mechanism) -> &'static str {
    use crate::sandbox::Mechanism;
    match m {
        Mechanism::CgroupV1 => "cgroup v1",
        Mechanism::CgroupV2 => "cgroup v2",
        Mechanism::Rlimit => "rlimits",
        Mechanism::Tmpfs => "tmpfs",
        Mechanism::None => "none",
    }
}
