//! A warm pool per [`SandboxSpec`]: parked containers built ahead of the calls, refilled in the
//! background, and the back-pressure on calls running at once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::sandbox::call;
use crate::sandbox::error::{Error, Result};
use crate::sandbox::model::{Enforcement, Invocation, Outcome, SandboxSpec};
use crate::sandbox::netlo;
use crate::sandbox::proto::ToZygote;
use crate::sandbox::zygote_client::{Parked, ZygoteClient, lock};

/// Default of [`crate::sandbox::EngineConfig::max_running`]; the runner's per-tool slots are derived from it.
pub const DEFAULT_MAX_RUNNING: usize = 64;

#[derive(Default)]
struct WarmQueue {
    parked: VecDeque<Parked>,
    /// Refills requested but not parked yet (so a burst never overfills the pool).
    pending: usize,
    /// Calls waiting for one of the `pending` refills (never more than `pending`).
    waiting: usize,
}

struct PoolShared {
    client: Arc<ZygoteClient>,
    id: u64,
    spec: SandboxSpec,
    enforcement: Enforcement,
    warm: Mutex<WarmQueue>,
    /// Signalled whenever a container is parked, for calls waiting on an empty pool.
    parked: Notify,
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        // Parked containers exit on EOF of their control pipe (dropped with `Parked`).
        lock(&self.warm).parked.clear();
        let _ = self.client.send(&ToZygote::DropPool { pool: self.id });
    }
}

impl PoolShared {
    /// Tops the warm queue up to `warm_pool` (parked + pending), in background tasks.
    fn refill(self: &Arc<Self>) {
        // Called from Drop too: without a runtime (shutdown) there is nothing to refill for.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        loop {
            {
                let mut q = lock(&self.warm);
                if q.parked.len() + q.pending >= self.spec.warm_pool {
                    return;
                }
                q.pending += 1;
            }
            let s = self.clone();
            rt.spawn(async move {
                let r = s.client.spawn(s.id, true).await;
                let failed = {
                    let mut q = lock(&s.warm);
                    q.pending -= 1;
                    r.map(|w| q.parked.push_back(w)).err()
                };
                // Also on failure: a waiting call then sees one refill fewer and builds its own.
                s.parked.notify_one();
                if let Some(e) = failed {
                    tracing::error!(error = %e, pool = s.id, "warm sandbox creation failed")
                }
            });
        }
    }

    /// A parked container, else one of the refills in flight, else a container built for this
    /// call. Refills in flight were started earlier, so one is usually parked well before a
    /// build started now would be ready; each waiting call counts on its own refill (more
    /// waiters than refills build their own), so nobody waits for a refill that never comes.
    async fn take(self: &Arc<Self>) -> Result<Parked> {
        loop {
            // Created before the check: a refill parked in between leaves a permit for it.
            let parked = self.parked.notified();
            let waiting = {
                let mut q = lock(&self.warm);
                while let Some(w) = q.parked.pop_front() {
                    // A parked container that already died (e.g. killed) is skipped.
                    if !w.is_dead() {
                        return Ok(w);
                    }
                }
                if q.waiting >= q.pending {
                    None
                } else {
                    q.waiting += 1;
                    Some(Waiting(self))
                }
            };
            let Some(_waiting) = waiting else {
                return self.client.spawn(self.id, false).await;
            };
            parked.await;
        }
    }
}

/// One call waiting for a refill; counted in `WarmQueue::waiting` until dropped (also when the
/// call is cancelled).
struct Waiting<'a>(&'a PoolShared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.warm).waiting -= 1;
    }
}

/// Refills the pool when the call is over (result delivered or call dropped), so the next
/// container's build does not compete with this call for the CPU.
struct RefillOnDrop(Arc<PoolShared>);

impl Drop for RefillOnDrop {
    fn drop(&mut self) {
        self.0.refill();
    }
}

/// Containers for one [`SandboxSpec`]. Clone freely; `run` may be called concurrently.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<PoolShared>,
}

impl Pool {
    pub(crate) fn new(
        client: Arc<ZygoteClient>,
        id: u64,
        spec: SandboxSpec,
        enforcement: Enforcement,
    ) -> Pool {
        let pool = Pool {
            shared: Arc::new(PoolShared {
                client,
                id,
                spec,
                enforcement,
                warm: Mutex::new(WarmQueue::default()),
                parked: Notify::new(),
            }),
        };
        pool.shared.refill();
        pool
    }

    pub fn enforcement(&self) -> Enforcement {
        self.shared.enforcement
    }

    /// Number of containers currently parked.
    pub fn warm_len(&self) -> usize {
        lock(&self.shared.warm).parked.len()
    }

    /// Runs one invocation in a fresh sandbox. Never hangs: the container is SIGKILLed at the
    /// timeout and every wait afterwards is bounded.
    pub async fn run(&self, inv: Invocation) -> Result<Outcome> {
        type NoProxy = fn(std::net::TcpListener) -> std::future::Pending<()>;
        self.run_inner(inv, None::<(u16, NoProxy)>).await
    }

    /// Like [`Pool::run`], with a socket listening on `127.0.0.1:port` inside the sandbox's
    /// network namespace handed to `serve` (the egress proxy) before the invocation is
    /// delivered. `serve` runs for as long as the call and is dropped with it.
    pub async fn run_serving<S, F>(&self, inv: Invocation, port: u16, serve: S) -> Result<Outcome>
    where
        S: FnOnce(std::net::TcpListener) -> F,
        F: std::future::Future<Output = ()>,
    {
        self.run_inner(inv, Some((port, serve))).await
    }

    async fn run_inner<S, F>(&self, inv: Invocation, serving: Option<(u16, S)>) -> Result<Outcome>
    where
        S: FnOnce(std::net::TcpListener) -> F,
        F: std::future::Future<Output = ()>,
    {
        call::validate(&inv, self.shared.spec.call_files_dir.is_some())?;
        let s = &self.shared;
        // Back-pressure: a burst beyond max_running waits here instead of forking keepers.
        let _running = s
            .client
            .running
            .acquire()
            .await
            .map_err(|_| Error::EngineClosed)?;
        let start = Instant::now();
        let _refill = RefillOnDrop(s.clone());
        let warm = s.take().await?;
        let Some((port, serve)) = serving else {
            return call::run(warm, inv, start, &s.spec.limits, s.enforcement, s.id).await;
        };
        let listener = netlo::listen_in(warm.pidfd.as_fd(), port)?;
        let serving = async {
            serve(listener).await;
            // A proxy that stopped early leaves the call running without a way out.
            std::future::pending::<Infallible>().await
        };
        tokio::select! {
            outcome = call::run(warm, inv, start, &s.spec.limits, s.enforcement, s.id) => outcome,
            never = serving => match never {},
        }
    }
}
