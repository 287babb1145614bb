//! Runner side: spawns the zygote, keeps warm pools and runs invocations (async, Send).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use tokio::sync::{mpsc, oneshot};

use crate::sandbox::detect::HostReport;
use crate::sandbox::proto::{self, ExitInfo, FromZygote, LateExec, ToZygote};
use crate::sandbox::zygote::{ENV_FORCE_RLIMITS, ENV_STATE_ROOT, ZYGOTE_SOCK_FD};
use crate::sandbox::{
    Captured, Enforcement, Error, Invocation, Outcome, Result, SandboxSpec, ZYGOTE_SUBCOMMAND,
    output,
};

/// How long to wait for the exit report after the SIGKILL at the timeout.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long to keep reading output after the exit report (pipes normally hit EOF at once).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The runner binary; started as `<exe> sandbox-zygote`.
    pub zygote_exe: PathBuf,
    /// libcontainer state root (container state dirs and bundles).
    pub state_root: PathBuf,
    /// Ignore cgroups and use rlimits only (for hosts where cgroups misbehave, and tests).
    pub force_rlimits: bool,
}

impl EngineConfig {
    pub fn new(zygote_exe: PathBuf) -> Self {
        EngineConfig {
            zygote_exe,
            state_root: PathBuf::from("/run/toolwarden/sandbox"),
            force_rlimits: false,
        }
    }
}

enum Event {
    Ready { fds: Vec<OwnedFd> },
    Failed(String),
    Exited(ExitInfo),
}

struct Inner {
    sock: OwnedFd,
    routes: Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>,
    pool_replies: Mutex<HashMap<u64, oneshot::Sender<FromZygote>>>,
    next: AtomicU64,
    child: Mutex<std::process::Child>,
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
            ?enforcement,
            user_namespace_unavailable_because = why.as_deref().unwrap_or("-"),
            "sandbox pool created"
        );
        let pool = Pool {
            shared: Arc::new(PoolShared {
                inner: self.inner.clone(),
                id,
                spec,
                enforcement,
                warm: Mutex::new(VecDeque::new()),
            }),
        };
        for _ in 0..pool.shared.spec.warm_pool {
            pool.shared.clone().refill();
        }
        Ok(pool)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn log_host(h: &HostReport) {
    let cg = h.cgroup_mechanism();
    tracing::info!(
        cgroup = ?h.cgroup,
        limits_enforced_by = ?cg,
        cgroup_unusable_because = h.cgroup_unusable.as_deref().unwrap_or("-"),
        user_namespace = h.userns_unusable.is_none(),
        "sandbox engine started"
    );
    if let Some(why) = &h.userns_unusable {
        tracing::warn!(reason = %why, "sandboxes run WITHOUT a user namespace");
    }
    if let Some(why) = &h.cgroup_unusable {
        tracing::warn!(reason = %why, "memory/pids/cpu limits degrade to rlimits (AS, NPROC, CPU)");
    }
}

/// Single reader of the zygote socket: routes keeper messages to the waiting calls.
fn reader(sock: OwnedFd, inner: std::sync::Weak<Inner>) {
    while let Ok(Some((msg, fds))) = proto::recv::<FromZygote>(sock.as_fd()) {
        let Some(inner) = inner.upgrade() else { return };
        let (req, ev, last) = match msg {
            FromZygote::Ready { req, .. } => (req, Event::Ready { fds }, false),
            FromZygote::SpawnFailed { req, error } => (req, Event::Failed(error), true),
            FromZygote::Exited { req, exit } => (req, Event::Exited(exit), true),
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
    events: mpsc::UnboundedReceiver<Event>,
}

struct PoolShared {
    inner: Arc<Inner>,
    id: u64,
    spec: SandboxSpec,
    enforcement: Enforcement,
    warm: Mutex<VecDeque<Warm>>,
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        // Parked containers exit on EOF of their control pipe (dropped with Warm).
        lock(&self.warm).clear();
        let _ = self.inner.send(&ToZygote::DropPool { pool: self.id });
    }
}

impl PoolShared {
    async fn spawn(&self) -> Result<Warm> {
        let req = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.inner.routes).insert(req, tx);
        if let Err(e) = self.inner.send(&ToZygote::Spawn { pool: self.id, req }) {
            lock(&self.inner.routes).remove(&req);
            return Err(e);
        }
        match rx.recv().await {
            Some(Event::Ready { fds }) if fds.len() == 5 => {
                let mut it = fds.into_iter();
                let mut next = || it.next().expect("length checked");
                Ok(Warm {
                    control: next(),
                    stdin: next(),
                    stdout: next(),
                    stderr: next(),
                    pidfd: next(),
                    events: rx,
                })
            }
            Some(Event::Failed(e)) => Err(Error::Container(e)),
            Some(_) => Err(Error::Protocol("unexpected keeper message".into())),
            None => Err(Error::Zygote("zygote exited".into())),
        }
    }

    /// Adds one container to the warm queue, off the request path.
    fn refill(self: Arc<Self>) {
        tokio::spawn(async move {
            match self.spawn().await {
                Ok(w) => lock(&self.warm).push_back(w),
                Err(e) => {
                    tracing::error!(error = %e, pool = self.id, "warm sandbox creation failed")
                }
            }
        });
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
        lock(&self.shared.warm).len()
    }

    /// Runs one invocation in a fresh sandbox. Never hangs: the container is SIGKILLed at the
    /// timeout and every wait afterwards is bounded.
    pub async fn run(&self, inv: Invocation) -> Result<Outcome> {
        validate(&inv)?;
        let start = Instant::now();
        let s = &self.shared;
        let warm = loop {
            let popped = lock(&s.warm).pop_front();
            match popped {
                Some(mut w) => {
                    s.clone().refill();
                    // A parked container that already died (e.g. killed) is skipped.
                    if w.events.try_recv().is_ok() {
                        continue;
                    }
                    break w;
                }
                None => {
                    if s.spec.warm_pool > 0 {
                        s.clone().refill();
                    }
                    break s.spawn().await?;
                }
            }
        };
        self.run_in(warm, inv, start).await
    }

    async fn run_in(&self, mut w: Warm, inv: Invocation, start: Instant) -> Result<Outcome> {
        let limits = &self.shared.spec.limits;
        let cap = limits.max_output_bytes;
        let out = Arc::new(Mutex::new(Captured::default()));
        let err = Arc::new(Mutex::new(Captured::default()));
        let out_task = tokio::spawn(output::capture(w.stdout, cap, out.clone()));
        let err_task = tokio::spawn(output::capture(w.stderr, cap, err.clone()));
        let late = LateExec {
            argv: inv.argv,
            env: inv.env,
            cwd: inv.cwd,
        };
        let payload = serde_json::to_vec(&late).map_err(|e| Error::Protocol(e.to_string()))?;
        let kill_guard = KillOnDrop(Some(w.pidfd.try_clone()?));
        // Control pipe first (it releases the parked init), then stdin, both async so a tool
        // that does not read stdin cannot block us.
        let stdin_task = tokio::spawn(async move {
            output::feed(w.control, payload).await;
            output::feed(w.stdin, inv.stdin).await;
        });
        let deadline = Instant::now() + limits.timeout;
        let mut timed_out = false;
        let exit = match tokio::time::timeout_at(deadline.into(), w.events.recv()).await {
            Ok(ev) => ev,
            Err(_) => {
                timed_out = true;
                kill_guard.kill();
                tokio::time::timeout(KILL_GRACE, w.events.recv())
                    .await
                    .ok()
                    .flatten()
            }
        };
        let exit = match exit {
            Some(Event::Exited(e)) => e,
            Some(Event::Failed(e)) => return Err(Error::Container(e)),
            Some(Event::Ready { .. }) => return Err(Error::Protocol("duplicate ready".into())),
            None => return Err(Error::Zygote("no exit status for sandbox".into())),
        };
        let duration = start.elapsed();
        let drain = async {
            let _ = out_task.await;
            let _ = err_task.await;
        };
        let _ = tokio::time::timeout(OUTPUT_GRACE, drain).await;
        stdin_task.abort();
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
