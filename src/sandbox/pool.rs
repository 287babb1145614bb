//! Runner side: spawns the zygote, keeps warm pools and runs invocations (async, Send).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use crate::sandbox::detect::{CgroupMode, HostReport};
use crate::sandbox::proto::{self, FromZygote, LateExec, ToZygote};
use crate::sandbox::zygote::{ENV_FORCE_RLIMITS, ENV_STATE_ROOT, ZYGOTE_SOCK_FD};
use crate::sandbox::{
    Captured, Enforcement, Error, Invocation, Outcome, Result, SandboxSpec, ZYGOTE_SUBCOMMAND,
    output,
};

/// How long to wait for the exit report after the SIGKILL at the timeout.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long to keep reading output after the exit report (pipes normally hit EOF at once).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Default of [`EngineConfig::max_running`]; the runner's per-tool slots are derived from it.
pub const DEFAULT_MAX_RUNNING: usize = 64;

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
        }
    }
}

enum Event {
    Ready { fds: Vec<OwnedFd> },
    Failed(String),
}

struct Inner {
    sock: OwnedFd,
    routes: Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>,
    pool_replies: Mutex<HashMap<u64, oneshot::Sender<FromZygote>>>,
    next: AtomicU64,
    child: Mutex<std::process::Child>,
    builds: Semaphore,
    running: Semaphore,
}

impl Inner {
    fn send(&self, msg: &ToZygote) -> Result<()> {
        proto::send(self.sock.as_fd(), msg, &[])
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing our socket end makes the zygote exit; reap it so no zombie remains.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Ok(mut c) = self.child.lock() {
            let _ = c.wait();
        }
    }
}

/// Handle to the sandbox engine (cheap to clone, Send + Sync).
#[derive(Clone)]
pub struct Sandboxes {
    inner: Arc<Inner>,
    host: Arc<HostReport>,
}

impl Sandboxes {
    /// Starts the zygote and waits for its host report. Call once at startup; the caller's
    /// environment is not passed on (the zygote gets only what it needs).
    pub fn start(cfg: &EngineConfig) -> Result<Sandboxes> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let mut cmd = std::process::Command::new(&cfg.zygote_exe);
        cmd.arg(ZYGOTE_SUBCOMMAND)
            .env_clear()
            .env(ENV_STATE_ROOT, &cfg.state_root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if cfg.force_rlimits {
            cmd.env(ENV_FORCE_RLIMITS, "1");
        }
        let their_fd = theirs.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; it also clears CLOEXEC on fd 3.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(their_fd, ZYGOTE_SOCK_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        let host = match proto::recv::<FromZygote>(ours.as_fd())? {
            Some((FromZygote::Hello { host }, _)) => host,
            _ => {
                return Err(Error::Zygote(
                    "zygote failed to start (see its stderr)".into(),
                ));
            }
        };
        log_host(&host);
        let inner = Arc::new(Inner {
            sock: ours,
            routes: Mutex::new(HashMap::new()),
            pool_replies: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            child: Mutex::new(child),
            builds: Semaphore::new(cfg.max_concurrent_builds.max(1)),
            running: Semaphore::new(cfg.max_running.max(1)),
        });
        let reader_sock = inner.sock.try_clone()?;
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("sandbox-zygote-rx".into())
            .spawn(move || reader(reader_sock, weak))?;
        Ok(Sandboxes {
            inner,
            host: Arc::new(host),
        })
    }

    /// Pid of the zygote process (for diagnostics and leak checks).
    pub fn zygote_pid(&self) -> u32 {
        lock(&self.inner.child).id()
    }

    pub fn host(&self) -> &HostReport {
        &self.host
    }

    /// Registers a spec with the zygote and fills its warm pool (in the background).
    pub async fn pool(&self, spec: SandboxSpec) -> Result<Pool> {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pool_replies).insert(id, tx);
        self.inner.send(&ToZygote::CreatePool {
            pool: id,
            spec: spec.clone(),
        })?;
        let enforcement = match rx.await {
            Ok(FromZygote::PoolCreated { enforcement, .. }) => enforcement,
            Ok(FromZygote::PoolFailed { error, .. }) => return Err(Error::Invalid(error)),
            _ => return Err(Error::Zygote("zygote exited".into())),
        };
        let why = self.host.userns_unusable_for(&spec);
        tracing::info!(
            pool = id,
            %enforcement,
            user_namespace_unavailable_because = why.as_deref().unwrap_or("-"),
            "sandbox pool created"
        );
        let pool = Pool {
            shared: Arc::new(PoolShared {
                inner: self.inner.clone(),
                id,
                spec,
                enforcement,
                warm: Mutex::new(WarmQueue::default()),
                parked: Notify::new(),
            }),
        };
        pool.shared.refill();
        Ok(pool)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

/// Single reader of the zygote socket: routes keeper messages to the waiting calls.
fn reader(sock: OwnedFd, inner: std::sync::Weak<Inner>) {
    while let Ok(Some((msg, fds))) = proto::recv::<FromZygote>(sock.as_fd()) {
        let Some(inner) = inner.upgrade() else { return };
        let (req, ev, last) = match msg {
            FromZygote::Ready { req, .. } => (req, Event::Ready { fds }, false),
            FromZygote::SpawnFailed { req, error } => (req, Event::Failed(error), true),
            // Exit reports travel through each container's report pipe.
            FromZygote::Exited { .. } => continue,
            m @ (FromZygote::PoolCreated { .. } | FromZygote::PoolFailed { .. }) => {
                let pool = match &m {
                    FromZygote::PoolCreated { pool, .. } | FromZygote::PoolFailed { pool, .. } => {
                        *pool
                    }
                    _ => unreachable!(),
                };
                if let Some(tx) = lock(&inner.pool_replies).remove(&pool) {
                    let _ = tx.send(m);
                }
                continue;
            }
            FromZygote::Hello { .. } => continue,
        };
        let mut routes = lock(&inner.routes);
        if let Some(tx) = routes.get(&req) {
            let _ = tx.send(ev);
        }
        if last {
            routes.remove(&req);
        }
    }
    // Zygote gone: dropping the senders wakes every waiting call with an error.
    if let Some(inner) = inner.upgrade() {
        lock(&inner.routes).clear();
        lock(&inner.pool_replies).clear();
    }
}

/// A parked container, ready to receive one invocation.
struct Warm {
    control: OwnedFd,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    pidfd: OwnedFd,
    /// Read end of the keeper's exit-report pipe: one `FromZygote::Exited`/`SpawnFailed`, then
    /// EOF. Read directly by the calling task (no reader-thread/channel hop on the hot path);
    /// EOF without a report means the keeper died.
    report: OwnedFd,
}

impl Warm {
    /// True if the parked container already died (report or EOF readable).
    fn is_dead(&self) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.report.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).map_or(true, |n| n > 0)
    }
}

#[derive(Default)]
struct WarmQueue {
    parked: VecDeque<Warm>,
    /// Refills requested but not parked yet (so a burst never overfills the pool).
    pending: usize,
    /// Calls waiting for one of the `pending` refills (never more than `pending`).
    waiting: usize,
}

struct PoolShared {
    inner: Arc<Inner>,
    id: u64,
    spec: SandboxSpec,
    enforcement: Enforcement,
    warm: Mutex<WarmQueue>,
    /// Signalled whenever a container is parked, for calls waiting on an empty pool.
    parked: Notify,
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        // Parked containers exit on EOF of their control pipe (dropped with Warm).
        lock(&self.warm).parked.clear();
        let _ = self.inner.send(&ToZygote::DropPool { pool: self.id });
    }
}

impl PoolShared {
    /// Creates one container. `background` (refills) builds it at low CPU priority so it does
    /// not compete with running calls.
    async fn spawn(&self, background: bool) -> Result<Warm> {
        // Held until the container is parked (or failed): caps concurrent keeper builds.
        let _build = self
            .inner
            .builds
            .acquire()
            .await
            .map_err(|_| Error::Zygote("engine closed".into()))?;
        let req = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.inner.routes).insert(req, tx);
        let msg = ToZygote::Spawn {
            pool: self.id,
            req,
            background,
        };
        if let Err(e) = self.inner.send(&msg) {
            lock(&self.inner.routes).remove(&req);
            return Err(e);
        }
        let ev = rx.recv().await;
        // Everything after Ready comes through the report pipe.
        lock(&self.inner.routes).remove(&req);
        match ev {
            Some(Event::Ready { fds }) if fds.len() == 6 => {
                let mut it = fds.into_iter();
                let mut next = || it.next().expect("length checked");
                Ok(Warm {
                    control: next(),
                    stdin: next(),
                    stdout: next(),
                    stderr: next(),
                    pidfd: next(),
                    report: next(),
                })
            }
            Some(Event::Failed(e)) => Err(Error::Container(e)),
            Some(_) => Err(Error::Protocol("unexpected keeper message".into())),
            None => Err(Error::Zygote("zygote exited".into())),
        }
    }

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
                let r = s.spawn(true).await;
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
    async fn take(self: &Arc<Self>) -> Result<Warm> {
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
                return self.spawn(false).await;
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
        validate(&inv)?;
        let s = &self.shared;
        // Back-pressure: a burst beyond max_running waits here instead of forking keepers.
        let _running = s
            .inner
            .running
            .acquire()
            .await
            .map_err(|_| Error::Zygote("engine closed".into()))?;
        let start = Instant::now();
        let _refill = RefillOnDrop(s.clone());
        let warm = s.take().await?;
        self.run_in(warm, inv, start).await
    }

    async fn run_in(&self, w: Warm, inv: Invocation, start: Instant) -> Result<Outcome> {
        let limits = &self.shared.spec.limits;
        let cap = limits.max_output_bytes;
        let out = Arc::new(Mutex::new(Captured::default()));
        let err = Arc::new(Mutex::new(Captured::default()));
        let late = LateExec {
            argv: inv.argv,
            env: inv.env,
            cwd: inv.cwd,
        };
        let payload = serde_json::to_vec(&late).map_err(|e| Error::Protocol(e.to_string()))?;
        let kill_guard = KillOnDrop(Some(w.pidfd));
        let released_ns = proto::monotonic_ns();
        // Control pipe first (it releases the parked init). A payload up to PIPE_BUF always fits
        // into the fresh, empty pipe, so write it inline (no task, no epoll registration) and
        // close it at once: the init starts on EOF. Larger payloads and stdin are fed by a task
        // so a tool that does not read them cannot block us.
        let mut feed: Vec<(OwnedFd, Vec<u8>)> = Vec::new();
        if payload.len() <= libc::PIPE_BUF {
            let n = nix::unistd::write(&w.control, &payload)?;
            if n != payload.len() {
                return Err(Error::Protocol("short write to control pipe".into()));
            }
            drop(w.control);
        } else {
            feed.push((w.control, payload));
        }
        if inv.stdin.is_empty() {
            drop(w.stdin);
        } else {
            feed.push((w.stdin, inv.stdin));
        }
        let stdin_task = (!feed.is_empty()).then(|| {
            tokio::spawn(async move {
                for (fd, data) in feed {
                    output::feed(fd, data).await;
                }
            })
        });
        // Output is captured in this task (no spawn, no cross-thread wakeup) while waiting for
        // the exit report.
        let capture = async {
            tokio::join!(
                output::capture(w.stdout, cap, out.clone()),
                output::capture(w.stderr, cap, err.clone())
            )
        };
        let mut capture = std::pin::pin!(capture);
        let mut report = pipe::Receiver::from_owned_fd(w.report)?;
        let wait_exit = async {
            let mut buf = Vec::new();
            let mut read = std::pin::pin!(report.read_to_end(&mut buf));
            let deadline = Instant::now() + limits.timeout;
            let (r, timed_out) = match tokio::time::timeout_at(deadline.into(), &mut read).await {
                Ok(r) => (Some(r), false),
                Err(_) => {
                    kill_guard.kill();
                    (tokio::time::timeout(KILL_GRACE, &mut read).await.ok(), true)
                }
            };
            let ev = match r {
                Some(Ok(_)) if !buf.is_empty() => serde_json::from_slice::<FromZygote>(&buf)
                    .map_err(|e| Error::Protocol(e.to_string())),
                Some(Ok(_)) => Err(Error::Zygote("keeper died without an exit report".into())),
                Some(Err(e)) => Err(e.into()),
                None => Err(Error::Zygote("no exit status for sandbox".into())),
            };
            (ev, timed_out)
        };
        let mut wait_exit = std::pin::pin!(wait_exit);
        let mut captured = false;
        let (exit, timed_out) = tokio::select! {
            r = &mut wait_exit => r,
            _ = &mut capture => {
                captured = true;
                wait_exit.await
            }
        };
        let exit = match exit? {
            FromZygote::Exited { exit, .. } => exit,
            FromZygote::SpawnFailed { error, .. } => return Err(Error::Container(error)),
            _ => return Err(Error::Protocol("unexpected exit report".into())),
        };
        let duration = start.elapsed();
        let got_ns = proto::monotonic_ns();
        if !captured {
            // Pipes normally hit EOF with the exit; a leaked writer (a daemonised grandchild
            // is killed with the pid namespace) cannot hold us longer than the grace.
            let _ = tokio::time::timeout(OUTPUT_GRACE, &mut capture).await;
        }
        if let Some(t) = stdin_task {
            t.abort();
        }
        let us = |a: u64, b: u64| b.saturating_sub(a) / 1000;
        tracing::debug!(
            pool = self.shared.id,
            setup_us = start.elapsed().as_micros() as u64 - us(released_ns, proto::monotonic_ns()),
            released_to_reaped_us = us(released_ns, exit.reaped_ns),
            reaped_to_sent_us = us(exit.reaped_ns, exit.sent_ns),
            sent_to_received_us = us(exit.sent_ns, got_ns),
            received_to_done_us = us(got_ns, proto::monotonic_ns()),
            total_us = start.elapsed().as_micros() as u64,
            "sandbox call timing"
        );
        let take = |c: &Arc<Mutex<Captured>>| std::mem::take(&mut *lock(c));
        Ok(Outcome {
            exit_code: exit.exit_code,
            signal: exit.signal,
            stdout: take(&out),
            stderr: take(&err),
            timed_out,
            oom_killed: exit.oom_killed,
            duration,
            peak_memory_bytes: exit.peak_memory_bytes,
            enforcement: self.shared.enforcement,
        })
    }
}

/// Kills the container if the call is dropped (e.g. the HTTP request is cancelled).
struct KillOnDrop(Option<OwnedFd>);

impl KillOnDrop {
    fn kill(&self) {
        if let Some(fd) = &self.0 {
            // SAFETY: see Warm::kill.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                );
            }
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // After a normal exit the process is gone; the signal then fails harmlessly
        // (the pidfd refers to that exact process, never to a reused pid).
        self.kill();
    }
}

fn validate(inv: &Invocation) -> Result<()> {
    if inv.argv.is_empty() {
        return Err(Error::Invalid("argv is empty".into()));
    }
    let bad = |s: &str| s.contains('\0');
    if inv.argv.iter().any(|a| bad(a)) {
        return Err(Error::Invalid("NUL byte in argv".into()));
    }
    for (k, v) in &inv.env {
        if k.is_empty() || k.contains('=') || bad(k) || bad(v) {
            return Err(Error::Invalid(format!(
                "bad environment variable name {k:?}"
            )));
        }
    }
    if let Some(cwd) = &inv.cwd
        && (!cwd.starts_with('/') || bad(cwd))
    {
        return Err(Error::Invalid("cwd must be an absolute path".into()));
    }
    Ok(())
}
