//! The real [`ToolExecutor`]: every call runs in a fresh youki sandbox from
//! the engine in `src/sandbox/`. One warm pool per tool generation, created when
//! the tool is loaded ([`ToolExecutor::prepare`]) and dropped when a reload
//! replaces or removes the tool, so calls in flight keep their pool.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, chown, fchown};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::api::{AgentToolSpec, parse_quantity};
use crate::egress::{
    Credentials, EgressAudit, EgressError, EgressEvent, EgressPolicy, EgressProxy, PROXY_ENV,
    Resolver, SANDBOX_PROXY_PORT, SystemResolver, UpstreamTls, proxy_env,
};
use crate::sandbox::detect::RootSwitch;
use crate::sandbox::model::SERVICE_ACCOUNT_DIR;
use crate::sandbox::names::SANDBOX_UID;
use crate::sandbox::{BindMount, Invocation, Limits, Mechanism, Pool, SandboxSpec, Sandboxes};

use super::executor::{Degradation, ExecError, ExecFuture, ExecOutcome, ToolExecutor};
use super::tool::{PreparedTool, SecretDelivery};
pub use super::volumes::VolumesDir;
use super::volumes::{BoundedVolume, BoundedVolumes, VolumeError, VolumeSource, size_limit};

pub struct SandboxExecutor {
    engine: Sandboxes,
    volumes: VolumesDir,
    /// Per-tool folders of file secrets (`STATE/secret-files`, root-owned, mode 0711).
    secrets_root: PathBuf,
    /// Writable volumes, bounded by their size limit (`STATE/volumes`).
    bounded: Arc<BoundedVolumes>,
    /// `serve --allow-degraded`: every tool may run with weaker isolation.
    allow_degraded: bool,
    pools: Mutex<HashMap<PoolKey, Arc<OnceCell<Arc<ToolPool>>>>>,
    /// How the egress proxies reach upstreams.
    upstream_tls: OnceCell<UpstreamTls>,
    resolver: Arc<dyn Resolver>,
}

/// Name, generation and secrets revision: rotated secrets need fresh sandboxes.
type PoolKey = (String, u64, u64);

/// A pool, the secret files only its sandboxes see and the bounded volumes
/// it mounts; they go with it (fields drop in order: the pool first).
struct ToolPool {
    pool: Pool,
    _secret_files: Option<SecretFiles>,
    _volumes: Vec<BoundedVolume>,
    /// What this tool runs without (accepted by `allowDegraded` or the flag).
    degradations: Vec<Degradation>,
    /// The tool's egress rules (and its policies' ranges), for a tool with
    /// `permissions.network.egress`: each call gets a proxy enforcing them.
    egress: Option<(EgressPolicy, UpstreamTls)>,
}

/// A private folder of file secrets, removed when dropped.
struct SecretFiles(PathBuf);

impl Drop for SecretFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pool_key(tool: &PreparedTool) -> PoolKey {
    (tool.name.clone(), tool.generation, tool.secrets_revision)
}

impl SandboxExecutor {
    /// `state`: where file secrets (`secret-files/`) and the images of
    /// writable volumes (`volumes/`) are kept.
    pub fn new(engine: Sandboxes, volumes: VolumesDir, state: PathBuf) -> Self {
        let bounded = Arc::new(BoundedVolumes::new(
            state.join("volumes"),
            engine.zygote_pid(),
        ));
        SandboxExecutor {
            engine,
            volumes,
            secrets_root: state.join("secret-files"),
            bounded,
            allow_degraded: false,
            pools: Mutex::new(HashMap::new()),
            upstream_tls: OnceCell::new(),
            resolver: Arc::new(SystemResolver),
        }
    }

    /// The egress proxies trust `tls`'s roots instead of the system's and
    /// resolve names with `resolver` (tests, with upstreams on loopback).
    pub fn with_egress_upstreams(mut self, tls: UpstreamTls, resolver: Arc<dyn Resolver>) -> Self {
        self.upstream_tls = OnceCell::new_with(Some(tls));
        self.resolver = resolver;
        self
    }

    /// Serve tools whose isolation the host weakens (no user namespace,
    /// rlimits instead of cgroups) without their own `allowDegraded`.
    pub fn allow_degraded(mut self, allow: bool) -> Self {
        self.allow_degraded = allow;
        self
    }

    async fn pool(&self, tool: &PreparedTool) -> Result<Arc<ToolPool>, PoolError> {
        let cell = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(pool_key(tool))
            .or_default()
            .clone();
        // A failed creation leaves the cell empty: the next call tries again.
        cell.get_or_try_init(|| self.create_pool(tool))
            .await
            .cloned()
    }

    async fn create_pool(&self, tool: &PreparedTool) -> Result<Arc<ToolPool>, PoolError> {
        let rootfs = tool.rootfs.as_ref().ok_or_else(|| PoolError::NoRootfs {
            image: tool.spec.runtime.image.clone(),
        })?;
        let rootfs = std::fs::canonicalize(rootfs).map_err(|source| PoolError::Io {
            path: rootfs.clone(),
            source,
        })?;
        // Before anything is created for the pool: a bad policy leaves nothing behind.
        let egress = self.egress_policy(tool).await?;
        let planned = self.plan_mounts(&tool.spec)?;
        let file_secrets: Vec<(&str, &[u8])> = tool
            .secrets
            .iter()
            .filter_map(|s| match s {
                SecretDelivery::File { path, value } => Some((path.as_str(), value.as_slice())),
                SecretDelivery::Env { .. } | SecretDelivery::CallFile(_) => None,
            })
            .collect();
        let mut spec = SandboxSpec {
            rootfs,
            mounts: planned.iter().map(|p| p.bind.clone()).collect(),
            limits: Limits {
                max_output_bytes: tool.capture_bytes(),
                ..limits(&tool.spec)?
            },
            warm_pool: tool.spec.sandbox.warm_pool as usize,
            // Only a tool with its own Kubernetes identity gets the folder its token lands in.
            call_files_dir: (!tool.spec.permissions.kubernetes.is_empty())
                .then(|| PathBuf::from(SERVICE_ACCOUNT_DIR)),
        };
        if !file_secrets.is_empty() {
            prepare_secrets_root(&self.secrets_root).map_err(|source| PoolError::Io {
                path: self.secrets_root.clone(),
                source,
            })?;
        }
        // Decided on every folder the sandboxes will reach (the per-tool secret
        // folder will belong to the mapped root, which the check accepts).
        let mut probe = spec.clone();
        probe.mounts.push(BindMount {
            source: self.secrets_root.clone(),
            destination: "/".into(),
            read_only: true,
        });
        probe.mounts.retain(|m| m.source.exists());
        let host = self.engine.host();
        let userns_unusable = host.userns_unusable_for(&probe);
        let mut degradations =
            degradations(userns_unusable.as_deref(), host.cgroup_unusable.as_deref());
        self.accept(tool, &degradations)?;
        // The container's root and the tool's user, as the host sees them.
        let container_root = match (&userns_unusable, host.id_map) {
            (None, Some(ids)) => ids.uid_base,
            _ => 0,
        };
        let sandbox_user = container_root + SANDBOX_UID;
        let mut volumes = Vec::new();
        for (i, p) in planned.iter().enumerate() {
            if let Some((source, size)) = &p.bounded {
                // mkfs and mount are processes: keep them off the async workers.
                let (bounded, source, size) = (self.bounded.clone(), source.clone(), *size);
                let volume =
                    tokio::task::spawn_blocking(move || bounded.mount(&source, size, sandbox_user))
                        .await
                        .map_err(PoolError::Interrupted)?
                        .map_err(|source| PoolError::Volume { index: i, source })?;
                volumes.push(volume);
            }
        }
        let secret_files = if file_secrets.is_empty() {
            None
        } else {
            // Not the tool's name: nothing checks metadata.name for `/` or `..`.
            let dir =
                self.secrets_root
                    .join(format!("gen{}-{}", tool.generation, uuid::Uuid::new_v4()));
            let files = SecretFiles(dir);
            let mounts = write_secret_files(&files.0, &file_secrets, container_root, sandbox_user)
                .map_err(PoolError::SecretFiles)?;
            spec.mounts.extend(mounts);
            Some(files)
        };
        let pool = self.engine.pool(spec).await?;
        // The engine decides again on the final spec: what it gave is what counts.
        let given = pool.enforcement();
        if !given.user_namespace && userns_unusable.is_none() {
            degradations.extend(self::degradations(
                Some("the sandbox engine did not give this pool one"),
                None,
            ));
        }
        if given.memory == Mechanism::Rlimit && host.cgroup_unusable.is_none() {
            degradations.extend(self::degradations(
                None,
                Some("the sandbox engine did not give this pool cgroups"),
            ));
        }
        self.accept(tool, &degradations)?;
        Ok(Arc::new(ToolPool {
            pool,
            _secret_files: secret_files,
            _volumes: volumes,
            degradations,
            egress,
        }))
    }

    /// The egress policy of a tool that declares egress, checked once here
    /// (its rules, ranges and injected values) so a bad one refuses the tool.
    async fn egress_policy(
        &self,
        tool: &PreparedTool,
    ) -> Result<Option<(EgressPolicy, UpstreamTls)>, PoolError> {
        let rules = &tool.spec.permissions.network.egress;
        if rules.is_empty() {
            return Ok(None);
        }
        let policy = EgressPolicy::new(rules, &tool.allowed_egress_cidrs)?;
        call_credentials(tool)?;
        // Loaded once, by the first tool that needs it (it reads files).
        let tls = self
            .upstream_tls
            .get_or_try_init(|| async { UpstreamTls::system() })
            .await?;
        Ok(Some((policy, tls.clone())))
    }

    /// Creates the images of the volumes `tools` mount writable, before any
    /// pool is built, so every mount of such a volume uses its image. Returns
    /// the volumes whose image was created now. Errors are left to the pool
    /// creation, which reports them per tool.
    async fn create_images(&self, tools: &[Arc<PreparedTool>]) -> Vec<VolumeSource> {
        let writable: Vec<(VolumeSource, u64)> = tools
            .iter()
            .flat_map(|t| &t.spec.permissions.filesystem)
            .filter(|m| !m.read_only)
            .filter_map(|m| Some((self.volumes.resolve(m).ok()?, size_limit(m).ok()?)))
            .collect();
        let bounded = self.bounded.clone();
        tokio::task::spawn_blocking(move || {
            writable
                .into_iter()
                .filter(|(source, size)| bounded.ensure_image(source, *size).unwrap_or(false))
                .map(|(source, _)| source)
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// True when `tool` mounts one of `volumes` read-only.
    fn reads_folder_of(&self, tool: &PreparedTool, volumes: &[VolumeSource]) -> bool {
        tool.spec
            .permissions
            .filesystem
            .iter()
            .filter(|m| m.read_only)
            .filter_map(|m| self.volumes.resolve(m).ok())
            .any(|source| volumes.contains(&source))
    }

    /// Refuses a tool whose isolation would be degraded unless it, or the
    /// operator, accepted that.
    fn accept(&self, tool: &PreparedTool, degradations: &[Degradation]) -> Result<(), PoolError> {
        if degradations.is_empty() || self.allow_degraded || tool.spec.sandbox.allow_degraded {
            return Ok(());
        }
        Err(PoolError::Degraded(degradations.to_vec()))
    }

    /// `permissions.filesystem` as bind mounts; a writable volume's source is
    /// the mount point of its bounded image.
    fn plan_mounts(&self, spec: &AgentToolSpec) -> Result<Vec<PlannedMount>, PoolError> {
        spec.permissions
            .filesystem
            .iter()
            .enumerate()
            .map(|(i, mount)| {
                let at = |source| PoolError::Volume { index: i, source };
                let source = self.volumes.resolve(mount).map_err(at)?;
                // Once a volume has an image, its data lives there: read-only
                // mounts use it too.
                let size = if mount.read_only {
                    None
                } else {
                    Some(size_limit(mount).map_err(at)?)
                };
                let (from, bounded) = if size.is_none() && !self.bounded.image(&source).exists() {
                    (source.folder.clone(), None)
                } else {
                    let mountpoint = self.bounded.mountpoint(&source).map_err(at)?;
                    (mountpoint, Some((source, size)))
                };
                Ok(PlannedMount {
                    bind: BindMount {
                        source: from,
                        destination: PathBuf::from(&mount.mount_path),
                        read_only: mount.read_only,
                    },
                    bounded,
                })
            })
            .collect()
    }
}

/// Why a tool's pool of sandboxes cannot be built: the tool cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no root file system for image {image:?} (pass --images)")]
    NoRootfs { image: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spec.sandbox.{field}: {source}")]
    Quantity {
        field: &'static str,
        source: crate::api::BadQuantity,
    },
    #[error("spec.permissions.filesystem[{index}]: {source}")]
    Volume { index: usize, source: VolumeError },
    #[error("secret files: {0}")]
    SecretFiles(#[source] std::io::Error),
    #[error("{0}")]
    Interrupted(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Engine(#[from] crate::sandbox::Error),
    #[error("egress: {0}")]
    Egress(#[from] EgressError),
    #[error(
        "refused: its isolation would be degraded ({}); set spec.sandbox.allowDegraded: true or start serve with --allow-degraded to accept that",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Degraded(Vec<Degradation>),
}

impl PoolError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            PoolError::NoRootfs { .. } => "NoRootFileSystem",
            PoolError::Io { .. } => "SandboxStateUnavailable",
            PoolError::Quantity { .. } => "InvalidQuantity",
            PoolError::Volume { source, .. } => source.reason(),
            PoolError::SecretFiles(_) => "SecretFilesUnwritable",
            PoolError::Interrupted(_) => "PoolCreationInterrupted",
            PoolError::Engine(_) => "SandboxEngineFailed",
            PoolError::Egress(e) => e.reason(),
            PoolError::Degraded(_) => "IsolationDegraded",
        }
    }
}

/// One mount of a tool, and the bounded volume behind it (with its size
/// limit when the mount is writable).
struct PlannedMount {
    bind: BindMount,
    bounded: Option<(VolumeSource, Option<u64>)>,
}

/// The protections a pool on this host runs without.
fn degradations(userns_unusable: Option<&str>, cgroup_unusable: Option<&str>) -> Vec<Degradation> {
    let mut out = Vec::new();
    if let Some(why) = userns_unusable {
        out.push(Degradation {
            missing: "userNamespace",
            reason: why.to_string(),
        });
    }
    if let Some(why) = cgroup_unusable {
        out.push(Degradation {
            missing: "cgroups",
            reason: format!("memory, pids and cpu limited by rlimits only: {why}"),
        });
    }
    out
}

impl ToolExecutor for SandboxExecutor {
    fn execute<'a>(
        &'a self,
        tool: &'a PreparedTool,
        stdin: Vec<u8>,
        secrets: Vec<SecretDelivery>,
    ) -> ExecFuture<'a> {
        self.execute_with_egress(tool, stdin, secrets, Arc::new(EgressToLog))
    }

    fn execute_with_egress<'a>(
        &'a self,
        tool: &'a PreparedTool,
        stdin: Vec<u8>,
        secrets: Vec<SecretDelivery>,
        egress_audit: Arc<dyn EgressAudit>,
    ) -> ExecFuture<'a> {
        Box::pin(async move {
            let pool = self
                .pool(tool)
                .await
                .map_err(|e| ExecError::NotRunnable(Box::new(e)))?;
            let runtime = &tool.spec.runtime;
            let mut env: Vec<(String, String)> = runtime
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect();
            // File secrets are mounted with the pool; env secrets and call files go to this
            // run only.
            let mut files = Vec::new();
            for secret in secrets {
                match secret {
                    SecretDelivery::Env { name, value } => env.push((name, value)),
                    SecretDelivery::CallFile(file) => files.push(file),
                    SecretDelivery::File { .. } => {}
                }
            }
            let mut invocation = Invocation {
                argv: runtime
                    .command
                    .iter()
                    .chain(&runtime.args)
                    .cloned()
                    .collect(),
                env,
                cwd: runtime.working_dir.clone(),
                stdin,
                files,
            };
            let outcome = match &pool.egress {
                None => pool.pool.run(invocation).await?,
                Some((policy, tls)) => {
                    let (credentials, placeholders) =
                        call_credentials(tool).map_err(|e| ExecError::NotRunnable(Box::new(e)))?;
                    let env = &mut invocation.env;
                    env.retain(|(name, _)| !PROXY_ENV.contains(&name.as_str()));
                    env.extend(proxy_env(SANDBOX_PROXY_PORT));
                    env.extend(placeholders);
                    let proxy = EgressProxy::new(
                        policy.clone().with_credentials(credentials),
                        tls.clone(),
                        egress_audit,
                    )
                    .with_resolver(self.resolver.clone());
                    pool.pool
                        .run_serving(invocation, SANDBOX_PROXY_PORT, |listener| {
                            serve_proxy(proxy, listener)
                        })
                        .await?
                }
            };
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

    fn prepare<'a>(
        &'a self,
        tools: &'a [Arc<PreparedTool>],
    ) -> ExecFuture<'a, Vec<(String, ExecError)>> {
        Box::pin(async move {
            let fresh = self.create_images(tools).await;
            let live: Vec<PoolKey> = tools
                .iter()
                // A pool that mounts a volume read-only from its folder goes
                // when the volume got its image: its data lives there now.
                .filter(|t| !self.reads_folder_of(t, &fresh))
                .map(|t| pool_key(t))
                .collect();
            // Pools of replaced or removed tools go; calls in flight hold their own Arc.
            self.pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|key, _| live.contains(key));
            let mut errors = Vec::new();
            for tool in tools {
                // A reload keeps the pools of unchanged tools: only new ones are logged.
                let existed = self
                    .pools
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&pool_key(tool))
                    .is_some_and(|cell| cell.initialized());
                match self.pool(tool).await {
                    Ok(_) if existed => {}
                    Ok(pool) if pool.degradations.is_empty() => tracing::info!(
                        tool = %tool.name,
                        generation = tool.generation,
                        enforcement = %pool.pool.enforcement(),
                        "sandbox pool ready"
                    ),
                    Ok(pool) => tracing::warn!(
                        tool = %tool.name,
                        generation = tool.generation,
                        enforcement = %pool.pool.enforcement(),
                        degraded = %pool
                            .degradations
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; "),
                        "sandbox pool ready with DEGRADED isolation (allowed)"
                    ),
                    Err(e) => errors.push((tool.name.clone(), ExecError::NotRunnable(Box::new(e)))),
                }
            }
            Ok(errors)
        })
    }

    fn degradations(&self, tool: &PreparedTool) -> Option<Vec<Degradation>> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let cell = pools.get(&pool_key(tool))?;
        cell.get().map(|pool| pool.degradations.clone())
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
            host.cgroup_mechanism().as_str(),
        )
    }
}

/// This call's credentials for the tool's `inject` secrets, and the
/// placeholder variables (`inject.placeholderEnv`) the sandbox gets instead
/// of the values.
fn call_credentials(
    tool: &PreparedTool,
) -> Result<(Credentials, Vec<(String, String)>), EgressError> {
    let mut credentials = Credentials::default();
    let mut env = Vec::new();
    for injected in &tool.injected {
        let placeholder = credentials.issue(&injected.secret, &injected.value)?;
        let variable = injected
            .secret
            .inject
            .as_ref()
            .and_then(|i| i.placeholder_env.clone());
        if let Some(name) = variable {
            env.push((name, placeholder));
        }
    }
    Ok((credentials, env))
}

/// Serves `proxy` on the socket made inside the sandbox until the call ends
/// (the future is dropped with it).
async fn serve_proxy(proxy: EgressProxy, listener: std::net::TcpListener) {
    let error = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => proxy.serve(listener).await,
        Err(error) => error,
    };
    tracing::error!(%error, "egress proxy stopped: the sandbox has no way out for the rest of the call");
}

/// Where egress records go when the caller gave no audit trail (direct use of
/// [`ToolExecutor::execute`]): the runner's log.
struct EgressToLog;

impl EgressAudit for EgressToLog {
    fn record(&self, event: EgressEvent) {
        tracing::info!(event = %serde_json::json!(event), "egress");
    }
}

/// `spec.sandbox` as engine limits. Quantities were bounded by the CRD schema;
/// a value that still does not parse is a clear error, not a default.
fn limits(spec: &AgentToolSpec) -> Result<Limits, PoolError> {
    let sandbox = &spec.sandbox;
    let quantity = |field: &'static str, q: &Option<_>| -> Result<Option<f64>, PoolError> {
        q.as_ref()
            .map(|q| parse_quantity(q).map_err(|source| PoolError::Quantity { field, source }))
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

/// `STATE/secret-files`: root-owned and mode 0711, so a user-namespaced
/// sandbox's setup can pass through it but nobody can list it.
fn prepare_secrets_root(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    chown(dir, Some(0), Some(0))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

/// Writes each file secret into the new folder `dir` and returns a read-only
/// bind mount of each at its declared path.
///
/// `dir` is mode 0700 and belongs to the container's root (the mapped root
/// with a user namespace, else root), which only sets the sandbox up: the tool
/// itself (`sandbox_user`, the same uid in every sandbox) cannot enter it, so
/// no sandbox reaches another tool's folder by any path; each sees its own
/// files only through their bind mounts. Files are created mode 0400 at once
/// (`create_new`, no window before a chmod) and owned by `sandbox_user`.
/// Re-running it with a new folder is how a new value gets delivered.
fn write_secret_files(
    dir: &Path,
    files: &[(&str, &[u8])],
    container_root: u32,
    sandbox_user: u32,
) -> std::io::Result<Vec<BindMount>> {
    // 0710, group = the runner's: the engine (in a pod without CAP_DAC_OVERRIDE) must
    // still reach the files to mount them; tools never hold that group.
    std::fs::DirBuilder::new().mode(0o710).create(dir)?;
    let mut mounts = Vec::new();
    for (i, (path, value)) in files.iter().enumerate() {
        let source = dir.join(i.to_string());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&source)?;
        fchown(&file, Some(sandbox_user), Some(sandbox_user))?;
        file.write_all(value)?;
        mounts.push(BindMount {
            source,
            destination: PathBuf::from(path),
            read_only: true,
        });
    }
    chown(
        dir,
        Some(container_root),
        Some(nix::unistd::getegid().as_raw()),
    )?;
    Ok(mounts)
}
