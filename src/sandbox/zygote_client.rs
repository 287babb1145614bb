//! The runner's end of the zygote socket: starts the zygote process, sends it requests and
//! routes its replies (one reader thread) to the tasks waiting for them.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::sandbox::detect::HostReport;
use crate::sandbox::error::{Error, Failure, ProtocolError, Result};
use crate::sandbox::model::{Enforcement, SandboxSpec};
use crate::sandbox::names::ZYGOTE_SUBCOMMAND;
use crate::sandbox::proto::{
    self, ENV_FORCE_RLIMITS, ENV_LOG_JSON, ENV_STATE_ROOT, FromZygote, ToZygote, ZYGOTE_SOCK_FD,
};

/// What the reader thread passes to a task waiting for its container.
enum Event {
    Ready { fds: Vec<OwnedFd> },
    Failed(Failure),
}

/// How the zygote is started (see `EngineConfig`).
pub struct Launch<'a> {
    pub exe: &'a Path,
    pub state_root: &'a Path,
    pub force_rlimits: bool,
    pub max_concurrent_builds: usize,
    pub max_running: usize,
    pub json_logs: bool,
}

/// A running zygote and the requests in flight to it.
pub struct ZygoteClient {
    sock: OwnedFd,
    routes: Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>,
    pool_replies: Mutex<HashMap<u64, oneshot::Sender<FromZygote>>>,
    next: AtomicU64,
    child: Mutex<std::process::Child>,
    /// Containers being built at once, over all pools.
    builds: Semaphore,
    /// Calls executing at once, over all pools.
    pub running: Semaphore,
}

impl ZygoteClient {
    /// Starts the zygote and waits for its host report. The caller's environment is not passed
    /// on (the zygote gets only what it needs).
    pub fn start(launch: &Launch<'_>) -> Result<(Arc<ZygoteClient>, HostReport)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let mut cmd = std::process::Command::new(launch.exe);
        cmd.arg(ZYGOTE_SUBCOMMAND)
            .env_clear()
            .env(ENV_STATE_ROOT, launch.state_root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        if launch.force_rlimits {
            cmd.env(ENV_FORCE_RLIMITS, "1");
        }
        if launch.json_logs {
            cmd.env(ENV_LOG_JSON, "1");
        }
        // The zygote's diagnostics at the runner's level.
        if let Some(filter) = std::env::var_os("RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let their_fd = theirs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls dup2, which is
        // async-signal-safe (no allocation, no lock); `their_fd` is open in the child because
        // `theirs` lives until after spawn. dup2 also clears CLOEXEC on fd 3.
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
            _ => return Err(Error::ZygoteStartFailed),
        };
        let client = Arc::new(ZygoteClient {
            sock: ours,
            routes: Mutex::new(HashMap::new()),
            pool_replies: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            child: Mutex::new(child),
            builds: Semaphore::new(launch.max_concurrent_builds.max(1)),
            running: Semaphore::new(launch.max_running.max(1)),
        });
        let reader_sock = client.sock.try_clone()?;
        let weak = Arc::downgrade(&client);
        std::thread::Builder::new()
            .name("sandbox-zygote-rx".into())
            .spawn(move || reader(reader_sock, weak))?;
        Ok((client, host))
    }

    /// Pid of the zygote process.
    pub fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    /// A fresh id for a pool or a spawn request.
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn send(&self, msg: &ToZygote) -> Result<()> {
        proto::send(self.sock.as_fd(), msg, &[])
    }

    /// Registers pool `id` with the zygote, which builds and validates its OCI spec.
    pub async fn create_pool(&self, id: u64, spec: SandboxSpec) -> Result<Enforcement> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pool_replies).insert(id, tx);
        self.send(&ToZygote::CreatePool { pool: id, spec })?;
        match rx.await {
            Ok(FromZygote::PoolCreated { enforcement, .. }) => Ok(enforcement),
            Ok(FromZygote::PoolFailed { error, .. }) => Err(Error::Reported(error)),
            _ => Err(Error::ZygoteExited),
        }
    }

    /// Creates one container of `pool`. `background` (refills) builds it at low CPU priority
    /// so it does not compete with running calls.
    pub async fn spawn(&self, pool: u64, background: bool) -> Result<Parked> {
        // Held until the container is parked (or failed): caps concurrent keeper builds.
        let _build = self
            .builds
            .acquire()
            .await
            .map_err(|_| Error::EngineClosed)?;
        let req = self.next_id();
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.routes).insert(req, tx);
        let msg = ToZygote::Spawn {
            pool,
            req,
            background,
        };
        if let Err(e) = self.send(&msg) {
            lock(&self.routes).remove(&req);
            return Err(e);
        }
        let ev = rx.recv().await;
        // Everything after Ready comes through the report pipe.
        lock(&self.routes).remove(&req);
        match ev {
            Some(Event::Ready { fds }) if fds.len() == 6 => {
                let mut it = fds.into_iter();
                let mut next = || it.next().expect("length checked");
                Ok(Parked {
                    control: next(),
                    stdin: next(),
                    stdout: next(),
                    stderr: next(),
                    pidfd: next(),
                    report: next(),
                })
            }
            Some(Event::Failed(e)) => Err(Error::Reported(e)),
            Some(Event::Ready { fds }) => Err(ProtocolError::FdCount(fds.len()).into()),
            None => Err(Error::ZygoteExited),
        }
    }
}

impl Drop for ZygoteClient {
    fn drop(&mut self) {
        // Closing our socket end makes the zygote exit; reap it so no zombie remains.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Ok(mut c) = self.child.lock() {
            let _ = c.wait();
        }
    }
}

/// Locks one of the engine's mutexes, also after a panic elsewhere poisoned it: every critical
/// section only moves whole entries (routes, parked containers, captured bytes), so what a
/// panicking holder left behind is still consistent.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Single reader of the zygote socket: routes keeper messages to the waiting calls.
fn reader(sock: OwnedFd, client: std::sync::Weak<ZygoteClient>) {
    while let Ok(Some((msg, fds))) = proto::recv::<FromZygote>(sock.as_fd()) {
        let Some(client) = client.upgrade() else {
            return;
        };
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
                if let Some(tx) = lock(&client.pool_replies).remove(&pool) {
                    let _ = tx.send(m);
                }
                continue;
            }
            FromZygote::Hello { .. } => continue,
        };
        let mut routes = lock(&client.routes);
        if let Some(tx) = routes.get(&req) {
            let _ = tx.send(ev);
        }
        if last {
            routes.remove(&req);
        }
    }
    // Zygote gone: dropping the senders wakes every waiting call with an error.
    if let Some(client) = client.upgrade() {
        lock(&client.routes).clear();
        lock(&client.pool_replies).clear();
    }
}

/// A parked container, ready to receive one invocation: the fds its keeper handed over.
pub struct Parked {
    pub control: OwnedFd,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub pidfd: OwnedFd,
    /// Read end of the keeper's exit-report pipe: one `FromZygote::Exited`/`SpawnFailed`, then
    /// EOF. Read directly by the calling task (no reader-thread/channel hop on the hot path);
    /// EOF without a report means the keeper died.
    pub report: OwnedFd,
}

impl Parked {
    /// True if the parked container already died (report or EOF readable).
    pub fn is_dead(&self) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.report.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).map_or(true, |n| n > 0)
    }
}
