//! The accept loop in front of the router: what a client may cost before any
//! handler runs. Headers must arrive within a deadline and fit a size cap;
//! connections are counted, and when the table is full the oldest connection
//! with no request in progress (an idle or half-sent one: what a slowloris
//! holds) makes room, so a flood of idle connections cannot lock out real
//! clients. `Host` and `Origin` are checked on every request (DNS rebinding).
//! axum::serve has none of these knobs, hence hyper's connection builder here.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;
use tower::ServiceExt;

use super::problem::{Problem, ProblemKind};

/// Limits of the HTTP layer (`serve` flags).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// A request's headers (and an idle keep-alive connection's next request)
    /// must arrive within this.
    pub header_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Request line plus headers, in bytes; larger requests get `431`.
    pub max_header_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_header_bytes: 32 * 1024,
        }
    }
}

/// hyper's read buffer cannot be smaller than this.
const MIN_HEADER_BYTES: usize = 8192;

/// Headers per request; hyper refuses more.
const MAX_HEADERS: usize = 64;

/// Which names a request may address the runner by (`Host`, `Origin`).
/// A DNS-rebinding page reaches a local server under the attacker's name,
/// so only names configured for this runner (and the address it listens on)
/// are served. Ports are not compared: the name is what rebinding forges.
#[derive(Clone, Debug)]
pub struct AllowedHosts {
    /// Lowercase names and IP literals (IPv6 without brackets).
    names: Vec<String>,
    /// Listening on every address: any IP literal is one of ours, and an IP
    /// literal cannot be rebound.
    any_ip: bool,
}

impl AllowedHosts {
    /// The listen address (and `localhost` names on loopback) plus `extra`.
    pub fn for_listen(listen: SocketAddr, extra: &[String]) -> AllowedHosts {
        let ip = listen.ip();
        let mut names: Vec<String> = extra
            .iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        if !ip.is_unspecified() {
            names.push(ip.to_string());
        }
        if ip.is_loopback() {
            names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
        }
        AllowedHosts {
            names,
            any_ip: ip.is_unspecified(),
        }
    }

    /// Whether `authority` (`host`, `host:port`, `[v6]:port`) names this runner.
    pub fn allows(&self, authority: &str) -> bool {
        let host = match authority.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((v6, "")) => v6,
                Some((v6, port)) if port.strip_prefix(':').is_some_and(is_port) => v6,
                _ => return false,
            },
            None => match authority.rsplit_once(':') {
                Some((host, port)) if is_port(port) => host,
                Some(_) => return false,
                None => authority,
            },
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return false;
        }
        (self.any_ip && host.parse::<IpAddr>().is_ok()) || self.names.contains(&host)
    }

    /// The reason a request is refused, if it is: an unknown `Host` (or
    /// absolute-form authority), or an `Origin` naming another site.
    fn refusal_of(&self, uri: &Uri, headers: &HeaderMap) -> Option<String> {
        // Two of either could be read differently by a proxy in front.
        for name in [header::HOST, header::ORIGIN] {
            if headers.get_all(&name).iter().count() > 1 {
                return Some(format!("the request has more than one {name} header"));
            }
        }
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| text(headers, header::HOST));
        match host {
            None => return Some("the request has no Host header".into()),
            Some(host) if !self.allows(&host) => {
                return Some(format!(
                    "Host {:?} is not a name of this runner (see --allowed-host)",
                    truncate(&host, 100)
                ));
            }
            Some(_) => {}
        }
        let origin = headers.get(header::ORIGIN)?;
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, rest)| rest.split('/').next().unwrap_or_default());
        match origin_host {
            Some(host) if self.allows(host) => None,
            _ => Some(format!(
                "Origin {:?} may not call this runner (see --allowed-host)",
                truncate(&String::from_utf8_lossy(origin.as_bytes()), 100)
            )),
        }
    }
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// At most `max` bytes of `s` (on a character boundary).
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Everything the accept loop needs besides the router.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub limits: HttpLimits,
    pub allowed_hosts: AllowedHosts,
}

impl HttpConfig {
    /// Default limits, and the names of `listen` only.
    pub fn for_listen(listen: SocketAddr) -> HttpConfig {
        HttpConfig {
            limits: HttpLimits::default(),
            allowed_hosts: AllowedHosts::for_listen(listen, &[]),
        }
    }
}

/// One open connection, as the table sees it.
#[derive(Default)]
struct Connection {
    /// Requests being handled; 0 means idle or still sending headers.
    requests: AtomicUsize,
    evicting: AtomicBool,
    evict: Notify,
}

/// The open connections, oldest first.
struct Connections {
    open: Mutex<BTreeMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    max: usize,
}

/// A connection's place in the table; dropping it frees the place.
struct Slot {
    id: u64,
    connection: Arc<Connection>,
    table: Arc<Connections>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.table.open).remove(&self.id);
    }
}

/// Counts a request on its connection while alive.
struct Busy(Arc<Connection>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connections {
    /// A place for a new connection: when the table is full, the oldest
    /// connection without a request in progress is told to close (a request
    /// being served is never cut). `None` when every connection is busy.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = lock(&self.open);
        if open.len() >= self.max {
            let victim = open.values().find(|c| {
                c.requests.load(Ordering::Relaxed) == 0 && !c.evicting.load(Ordering::Relaxed)
            })?;
            victim.evicting.store(true, Ordering::Relaxed);
            victim.evict.notify_one();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection::default());
        open.insert(id, connection.clone());
        Some(Slot {
            id,
            connection,
            table: self.clone(),
        })
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then waits for
/// the requests in progress.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    config: HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let table = Arc::new(Connections {
        open: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(0),
        max: config.limits.max_connections.max(1),
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout)
        .max_buf_size(config.limits.max_header_bytes.max(MIN_HEADER_BYTES))
        .max_headers(MAX_HEADERS);
    let hosts = Arc::new(config.allowed_hosts);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or similar: keep serving the
                    // connections we have, try again shortly.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = table.admit() else {
            tracing::warn!(%peer, max = table.max, "connection refused: every connection is busy");
            continue; // dropping the stream closes it at once
        };
        let (router, hosts, connection) = (router.clone(), hosts.clone(), slot.connection.clone());
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            connection.requests.fetch_add(1, Ordering::Relaxed);
            let busy = Busy(connection.clone());
            let refusal = hosts.refusal_of(request.uri(), request.headers());
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let _busy = busy;
                Ok::<Response, Infallible>(match refusal {
                    Some(reason) => Problem::new(ProblemKind::Forbidden, reason).into_response(),
                    None => router.oneshot(request).await.into_response(),
                })
            }
        });
        let serving = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            tokio::select! {
                _ = serving => {}
                () = slot.connection.evict.notified() => {
                    tracing::debug!(%peer, "idle connection closed to make room");
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (every connection
/// and every sandbox's pipes take descriptors; the usual soft limit of 1024
/// is what a connection flood exhausted). Returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(listen: &str, extra: &[&str]) -> AllowedHosts {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        AllowedHosts::for_listen(listen.parse().unwrap(), &extra)
    }

    #[test]
    fn loopback_listeners_answer_to_loopback_names_only() {
        let h = hosts("127.0.0.1:8080", &[]);
        for ok in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8080",
            "localhost.",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.nip.io",
            "localhost.evil.example",
            "10.0.0.1",
            "",
            ":8080",
            "localhost:80:80",
            "[::1",
            "localhost:http",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
    }

    /// Variants of a rebinding page's `Host` and `Origin`: trailing dots,
    /// case, ports, userinfo and fragment tricks, opaque origins.
    #[test]
    fn forged_host_and_origin_spellings_are_refused() {
        let h = hosts("127.0.0.1:8080", &["runner.example"]);
        for ok in [
            "runner.example.:8080",
            "RUNNER.EXAMPLE",
            "localhost.:0",
            "127.0.0.1.",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "runner.example.evil",
            "evil.runner.example",
            "localhost@evil.example",
            "evil.example#@localhost",
            "localhost:8080.evil.example",
            "localhost:123456",
            "localhost :80",
            "127.1",
            "0x7f.0.0.1",
            "[::ffff:127.0.0.1]",
            "[fe80::1%25lo]",
            "xn--localhost",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
        let refused = |origin: &str| {
            let request = Request::builder()
                .uri("/v1/tools")
                .header(header::HOST, "localhost:8080")
                .header(header::ORIGIN, origin)
                .body(())
                .unwrap();
            h.refusal_of(request.uri(), request.headers()).is_some()
        };
        for bad in [
            "null",
            "file://",
            "http://localhost@evil.example",
            "http://evil.example#@localhost",
            "http://localhost:3000.evil.example",
            "http://localhost.evil.example",
            "localhost",
            "",
        ] {
            assert!(refused(bad), "Origin {bad:?} was allowed");
        }
        for ok in [
            "http://localhost:3000",
            "https://runner.example",
            "http://[::1]:1",
        ] {
            assert!(!refused(ok), "Origin {ok:?} was refused");
        }
    }

    #[test]
    fn a_full_table_closes_the_oldest_idle_connection_and_never_a_busy_one() {
        let table = Arc::new(Connections {
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            max: 3,
        });
        let busy = table.admit().unwrap();
        busy.connection.requests.fetch_add(1, Ordering::Relaxed);
        let idle = table.admit().unwrap();
        let _newer = table.admit().unwrap();
        // Full: the oldest idle one (not the older busy one) is told to close.
        let _fourth = table.admit().unwrap();
        assert!(idle.connection.evicting.load(Ordering::Relaxed));
        assert!(!busy.connection.evicting.load(Ordering::Relaxed));
        drop(idle);
        // Every remaining connection busy: a new one is refused.
        for slot in [&_newer, &_fourth] {
            slot.connection.requests.fetch_add(1, Ordering::Relaxed);
        }
        assert!(table.admit().is_none());
        drop(busy);
        assert!(
            table.admit().is_some(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn configured_names_and_every_ip_when_listening_everywhere() {
        let h = hosts("0.0.0.0:8080", &["Runner.Agents.svc"]);
        for ok in ["runner.agents.svc:8080", "10.1.2.3", "[fe80::1]:80"] {
            assert!(h.allows(ok), "{ok}");
        }
        assert!(!h.allows("rebind.evil.example"));
        let h = hosts("10.0.0.5:8080", &[]);
        assert!(h.allows("10.0.0.5:8080") && !h.allows("10.0.0.6") && !h.allows("localhost"));
    }
}
