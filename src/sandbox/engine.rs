//! The engine's public handle: [`Sandboxes::start`] starts the zygote, [`Sandboxes::pool`]
//! registers a [`SandboxSpec`] and returns its warm [`Pool`].

use std::path::PathBuf;
use std::sync::Arc;

use crate::sandbox::detect::{CgroupMode, HostReport};
use crate::sandbox::error::Result;
use crate::sandbox::model::SandboxSpec;
use crate::sandbox::pool::{DEFAULT_MAX_RUNNING, Pool};
use crate::sandbox::zygote_client::{Launch, ZygoteClient};

/// How the engine is started ([`Sandboxes::start`]).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The runner binary; started as `<exe> sandbox-zygote`.
    pub zygote_exe: PathBuf,
    /// libcontainer state root (container state dirs and bundles).
    pub state_root: PathBuf,
    /// Ignore cgroups and use rlimits only (for hosts where cgroups misbehave, and tests).
    pub force_rlimits: bool,
    /// Containers being built (keeper forked, container not yet parked) at once, over all
    /// pools: a burst queues here instead of forking one keeper per request.
    pub max_concurrent_builds: usize,
    /// Calls executing at once, over all pools; further `run`s wait in FIFO order. Together with
    /// the warm pools this bounds the number of live keepers/containers.
    pub max_running: usize,
    /// The zygote writes its diagnostics as JSON lines (the runner's `--log-format json`)
    /// instead of text, so one log collector parses both.
    pub json_logs: bool,
}

impl EngineConfig {
    pub fn new(zygote_exe: PathBuf) -> Self {
        EngineConfig {
            zygote_exe,
            state_root: PathBuf::from("/run/toolwarden/sandbox"),
            force_rlimits: false,
            // Builds are CPU-bound (clone, mounts, cgroups): more than the core count in
            // parallel only slows each one down.
            max_concurrent_builds: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_running: DEFAULT_MAX_RUNNING,
            json_logs: false,
        }
    }
}

/// Handle to the sandbox engine (cheap to clone, Send + Sync).
#[derive(Clone)]
pub struct Sandboxes {
    client: Arc<ZygoteClient>,
    host: Arc<HostReport>,
}

impl Sandboxes {
    /// Starts the zygote and waits for its host report. Call once at startup; the caller's
    /// environment is not passed on (the zygote gets only what it needs).
    pub fn start(cfg: &EngineConfig) -> Result<Sandboxes> {
        let (client, host) = ZygoteClient::start(&Launch {
            exe: &cfg.zygote_exe,
            state_root: &cfg.state_root,
            force_rlimits: cfg.force_rlimits,
            max_concurrent_builds: cfg.max_concurrent_builds,
            max_running: cfg.max_running,
            json_logs: cfg.json_logs,
        })?;
        log_host(&host);
        Ok(Sandboxes {
            client,
            host: Arc::new(host),
        })
    }

    /// Pid of the zygote process (for diagnostics and leak checks).
    pub fn zygote_pid(&self) -> u32 {
        self.client.pid()
    }

    pub fn host(&self) -> &HostReport {
        &self.host
    }

    /// Registers a spec with the zygote and fills its warm pool (in the background).
    pub async fn pool(&self, spec: SandboxSpec) -> Result<Pool> {
        let id = self.client.next_id();
        let enforcement = self.client.create_pool(id, spec.clone()).await?;
        let why = self.host.userns_unusable_for(&spec);
        tracing::info!(
            pool = id,
            %enforcement,
            user_namespace_unavailable_because = why.as_deref().unwrap_or("-"),
            "sandbox pool created"
        );
        Ok(Pool::new(self.client.clone(), id, spec, enforcement))
    }
}

fn log_host(h: &HostReport) {
    let cg = h.cgroup_mechanism();
    tracing::info!(
        cgroup = h.cgroup.map_or("none", CgroupMode::as_str),
        limits_enforced_by = cg.as_str(),
        cgroup_unusable_because = h.cgroup_unusable.as_deref().unwrap_or("-"),
        user_namespace = h.userns_unusable.is_none(),
        "sandbox engine started"
    );
    if let Some(why) = &h.userns_unusable {
        tracing::warn!(reason = %why, "sandboxes run WITHOUT a user namespace");
    }
    if let Some(why) = &h.cgroup_unusable {
        tracing::warn!(
            reason = %why,
            outer_bound = h.outer_bound.as_deref().unwrap_or("-"),
            "no per-call cgroups: memory, pids and cpu limits fall back to rlimits \
             (RLIMIT_AS; RLIMIT_NPROC, shared by the sandboxes without a user namespace; \
             RLIMIT_CPU seconds), no OOM-kill detection; the engine's own cgroup limits \
             stay the outer bound"
        );
    }
}
