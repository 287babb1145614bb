//! The HTTP forward proxy: absolute-form `http://` requests (forwarded over
//! TLS unless the rule is `plainHttp`, credentials swapped in) and `CONNECT`
//! tunnels (TLS only, SNI checked).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::address;
use super::audit::{EgressAudit, EgressEvent};
use super::error::EgressError;
use super::policy::{EgressPolicy, HostRule, canonical_host, is_plain_path, path_under};
use super::resolve::{Resolver, SystemResolver};
use super::sni::read_client_hello;

/// Largest request head (request line and headers) the proxy reads.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Connections one proxy serves at once, and tunnels it keeps open; a
/// connection beyond it is closed on accept, a tunnel refused with 503.
pub const MAX_CONNECTIONS: usize = 64;
/// Names the header that says why the proxy refused a request.
pub const REASON_HEADER: &str = "x-toolwarden-egress-reason";

/// Where the proxy accepts connections: a TCP or Unix listener, such as one
/// created inside a sandbox's network namespace.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn accept(&mut self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&mut self) -> io::Result<tokio::net::UnixStream> {
        Ok(UnixListener::accept(self).await?.0)
    }
}

/// The TLS client the proxy opens upstream connections with. Build it once
/// per runner (loading the system roots reads files) and share it.
#[derive(Clone)]
pub struct UpstreamTls(tokio_rustls::TlsConnector);

impl UpstreamTls {
    /// Trusts the system's root certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR`
    /// or the distribution's bundle).
    pub fn system() -> Result<Self, EgressError> {
        let loaded = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(loaded.certs);
        if added == 0 {
            return Err(EgressError::NoTrustRoots {
                detail: format!("no usable system certificate ({:?})", loaded.errors),
            });
        }
        Self::with_roots(roots)
    }

    /// Trusts exactly `roots`.
    pub fn with_roots(roots: rustls::RootCertStore) -> Result<Self, EgressError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| EgressError::NoTrustRoots {
                detail: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(UpstreamTls(tokio_rustls::TlsConnector::from(Arc::new(
            config,
        ))))
    }
}

/// The proxy of one sandbox (or one call): its policy, how it resolves and
/// connects, and where its audit records go.
#[derive(Clone)]
pub struct EgressProxy {
    policy: EgressPolicy,
    tls: UpstreamTls,
    resolver: Arc<dyn Resolver>,
    audit: Arc<dyn EgressAudit>,
    /// Closed when [`EgressProxy::serve`] is dropped, which ends open tunnels.
    served: Option<watch::Receiver<()>>,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    /// One permit per open tunnel (its connection has ended in the upgrade).
    tunnels: Arc<Semaphore>,
}

type ProxyBody = Full<Bytes>;

impl EgressProxy {
    pub fn new(policy: EgressPolicy, tls: UpstreamTls, audit: Arc<dyn EgressAudit>) -> Self {
        EgressProxy {
            policy,
            tls,
            resolver: Arc::new(SystemResolver),
            audit,
            served: None,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            tunnels: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// Resolves names with `resolver` instead of the system's.
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolver>) -> Self {
        self.resolver = resolver;
        self
    }

    /// Serves connections from `listener` until accepting fails. Dropping
    /// the returned future closes every connection and tunnel it serves.
    pub async fn serve<L: Listener>(mut self, mut listener: L) -> io::Error {
        let (_serving, served) = watch::channel(());
        self.served = Some(served);
        let proxy = Arc::new(self);
        let mut connections = JoinSet::new();
        loop {
            let io = match listener.accept().await {
                Ok(io) => io,
                Err(e) if is_transient(&e) => continue,
                Err(e) => return e,
            };
            while connections.try_join_next().is_some() {}
            let Ok(permit) = proxy.connections.clone().try_acquire_owned() else {
                tracing::warn!(
                    limit = MAX_CONNECTIONS,
                    "egress proxy: connection refused, too many open"
                );
                continue;
            };
            let proxy = proxy.clone();
            connections.spawn(async move {
                proxy.serve_connection(io).await;
                drop(permit);
            });
        }
    }
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

impl EgressProxy {
    async fn serve_connection<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: Arc<Self>,
        io: Io,
    ) {
        let limits = self.policy.limits();
        let service = hyper::service::service_fn(move |request| {
            let inner = self.clone();
            async move { Ok::<_, Infallible>(inner.handle(request).await) }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        if let Err(error) = http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
        {
            tracing::debug!(%error, "egress proxy: connection ended");
        }
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let mut event = EgressEvent::new(request.method().as_str());
        let timeout = self.policy.limits().timeout;
        let exchange = async {
            if request.method() == Method::CONNECT {
                self.clone().open_tunnel(request, &mut event, started).await
            } else {
                self.forward(request, &mut event).await
            }
        };
        let result = tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(EgressError::Timeout { limit: timeout }));
        match result {
            Ok(Some(response)) => {
                event.status = response.status().as_u16();
                self.record(event, started);
                response
            }
            // A tunnel records its event when it ends.
            Ok(None) => Response::new(Full::default()),
            Err(error) => {
                event.fail(&error);
                event.status = error.status().as_u16();
                self.record(event, started);
                refusal(&error)
            }
        }
    }

    fn record(&self, mut event: EgressEvent, started: Instant) {
        event.duration_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(?event, "egress");
        self.audit.record(event);
    }

    /// An absolute-form `http://` request.
    async fn forward(
        &self,
        request: Request<Incoming>,
        event: &mut EgressEvent,
    ) -> Result<Option<Response<ProxyBody>>, EgressError> {
        let (mut parts, body) = request.into_parts();
        let authority = proxy_authority(&parts.uri)?;
        let host = canonical(authority.host())?;
        event.host = host.clone();
        event.path = parts.uri.path().to_string();
        check_host_header(&parts.headers, &authority, &host)?;
        let (rule, port) = self.policy.rule_for(&host, authority.port_u16())?;
        event.port = port;
        event.rule = Some(rule.name.clone());
        check_method_and_path(rule, &parts.method, parts.uri.path())?;

        let credentials = &self.policy.credentials;
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        credentials.refuse_in(parts.uri.to_string().as_bytes(), "the URL")?;
        let injected = credentials.inject(&host, parts.uri.path(), &mut parts.headers)?;
        event.injected = injected.secrets;
        let body = read_body(body, self.policy.limits().max_request_bytes).await?;
        credentials.refuse_in(&body, "the request body")?;
        event.bytes_sent = body.len() as u64;

        let stream = self.connect(&host, port, event).await?;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::EXPECT);
        let host_value =
            HeaderValue::from_str(authority.as_str()).map_err(|_| EgressError::InvalidHost {
                host: authority.to_string(),
            })?;
        parts.headers.insert(header::HOST, host_value);
        parts.uri = target.parse::<Uri>().map_err(|e| EgressError::BadRequest {
            detail: e.to_string(),
        })?;
        parts.version = hyper::Version::HTTP_11;
        let upstream_request = Request::from_parts(parts, Full::new(body));

        let response = if rule.plain_http {
            self.exchange(stream, upstream_request).await?
        } else {
            let name =
                ServerName::try_from(host.clone()).map_err(|e| EgressError::UpstreamTls {
                    host: host.clone(),
                    detail: e.to_string(),
                })?;
            let tls = tokio::time::timeout(
                self.policy.limits().connect_timeout,
                self.tls.0.connect(name, stream),
            )
            .await
            .map_err(|_| EgressError::Timeout {
                limit: self.policy.limits().connect_timeout,
            })?
            .map_err(|e| EgressError::UpstreamTls {
                host: host.clone(),
                detail: e.to_string(),
            })?;
            self.exchange(tls, upstream_request).await?
        };
        let (mut parts, body) = response.into_parts();
        let limit = self.policy.limits().max_response_bytes;
        let body = read_body(body, limit).await.map_err(|error| match error {
            EgressError::RequestTooLarge { limit } => EgressError::ResponseTooLarge { limit },
            other => other,
        })?;
        event.bytes_received = body.len() as u64;
        // Content-Length stays: the body read matched it (or it answers a HEAD).
        strip_hop_by_hop(&mut parts.headers);
        Ok(Some(Response::from_parts(parts, Full::new(body))))
    }

    /// One request over a fresh upstream connection.
    async fn exchange<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        io: Io,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, EgressError> {
        let upstream = |e: hyper::Error| EgressError::Upstream {
            detail: e.to_string(),
        };
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            .handshake(TokioIo::new(io))
            .await
            .map_err(upstream)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "egress proxy: upstream connection ended");
            }
        });
        sender.send_request(request).await.map_err(upstream)
    }

    /// A `CONNECT host:port` tunnel. Refusals that can be known from the
    /// request are answered before the tunnel opens; the SNI is checked on
    /// the first bytes through it, before anything is sent upstream.
    async fn open_tunnel(
        self: Arc<Self>,
        request: Request<Incoming>,
        event: &mut EgressEvent,
        started: Instant,
    ) -> Result<Option<Response<ProxyBody>>, EgressError> {
        let authority = request
            .uri()
            .authority()
            .filter(|a| a.port_u16().is_some() && request.uri().path_and_query().is_none())
            .cloned()
            .ok_or_else(|| EgressError::NotProxyRequest {
                detail: "CONNECT needs host:port".into(),
            })?;
        let host = canonical(authority.host())?;
        event.host = host.clone();
        let (rule, port) = self.policy.rule_for(&host, authority.port_u16())?;
        event.port = port;
        event.rule = Some(rule.name.clone());
        if !rule.paths.is_empty() || !rule.methods.is_empty() {
            return Err(EgressError::TunnelNotAllowed {
                rule: rule.name.clone(),
            });
        }
        if rule.plain_http {
            return Err(EgressError::TunnelToPlainHttp {
                rule: rule.name.clone(),
            });
        }
        for (name, value) in request.headers() {
            let place = format!("CONNECT header `{name}`");
            self.policy
                .credentials
                .refuse_in(name.as_str().as_bytes(), &place)?;
            self.policy
                .credentials
                .refuse_in(value.as_bytes(), &place)?;
        }
        let addresses = self.checked_addresses(&host, event).await?;
        let permit = self.tunnels.clone().try_acquire_owned().map_err(|_| {
            EgressError::TooManyConnections {
                limit: MAX_CONNECTIONS,
            }
        })?;
        let upgrade = hyper::upgrade::on(request);
        let mut event = event.clone();
        event.status = StatusCode::OK.as_u16();
        let inner = self.clone();
        tokio::spawn(async move {
            let timeout = inner.policy.limits().timeout;
            let run = inner.run_tunnel(upgrade, &host, port, addresses, &mut event);
            let result = tokio::select! {
                result = tokio::time::timeout(timeout, run) => result.unwrap_or(Err(EgressError::Timeout {
                    limit: timeout,
                })),
                () = serving_ends(inner.served.clone()) => Err(EgressError::Stopped),
            };
            if let Err(error) = result {
                event.fail(&error);
            }
            inner.record(event, started);
            drop(permit);
        });
        Ok(None)
    }

    async fn run_tunnel(
        &self,
        upgrade: hyper::upgrade::OnUpgrade,
        host: &str,
        port: u16,
        addresses: Vec<IpAddr>,
        event: &mut EgressEvent,
    ) -> Result<(), EgressError> {
        let limits = self.policy.limits();
        let client = upgrade.await.map_err(|e| EgressError::Upstream {
            detail: format!("tunnel upgrade: {e}"),
        })?;
        let mut client = TokioIo::new(client);
        let (hello, sni) =
            tokio::time::timeout(limits.connect_timeout, read_client_hello(&mut client))
                .await
                .map_err(|_| EgressError::Timeout {
                    limit: limits.connect_timeout,
                })??;
        let sni = sni.ok_or_else(|| EgressError::NoSni {
            host: host.to_string(),
        })?;
        if canonical_host(&sni).as_deref() != Some(host) {
            return Err(EgressError::SniMismatch {
                sni,
                host: host.to_string(),
            });
        }
        let (mut upstream, address) = self.connect_to(&addresses, port, event).await?;
        upstream
            .write_all(&hello)
            .await
            .map_err(|e| EgressError::ConnectFailed {
                address: address.to_string(),
                detail: e.to_string(),
            })?;
        let (sent, received) = relay(
            client,
            upstream,
            limits.max_request_bytes,
            limits.max_response_bytes,
        )
        .await;
        event.bytes_sent = sent + hello.len() as u64;
        event.bytes_received = received;
        if received >= limits.max_response_bytes as u64 {
            return Err(EgressError::ResponseTooLarge {
                limit: limits.max_response_bytes,
            });
        }
        Ok(())
    }

    /// Resolves `host` once and keeps the addresses the policy admits; the
    /// proxy connects only to these, so a second answer cannot be used.
    async fn checked_addresses(
        &self,
        host: &str,
        event: &mut EgressEvent,
    ) -> Result<Vec<IpAddr>, EgressError> {
        let resolved = match host.parse::<IpAddr>() {
            Ok(literal) => vec![literal],
            Err(_) => {
                self.resolver
                    .resolve(host)
                    .await
                    .map_err(|e| EgressError::ResolveFailed {
                        host: host.to_string(),
                        detail: e.to_string(),
                    })?
            }
        };
        let mut refusal = None;
        let mut admitted = Vec::new();
        for ip in resolved {
            match address::check(ip, &self.policy.allowed_cidrs) {
                Ok(()) => admitted.push(ip),
                Err(refused) => {
                    refusal.get_or_insert((ip, refused));
                }
            }
        }
        if admitted.is_empty() {
            return Err(match refusal {
                Some((ip, refused)) => {
                    event.address = Some(ip);
                    EgressError::AddressNotAllowed {
                        host: host.to_string(),
                        address: ip,
                        kind: refused.kind,
                        range: refused.range.to_string(),
                    }
                }
                None => EgressError::ResolveFailed {
                    host: host.to_string(),
                    detail: "no addresses".into(),
                },
            });
        }
        Ok(admitted)
    }

    async fn connect(
        &self,
        host: &str,
        port: u16,
        event: &mut EgressEvent,
    ) -> Result<TcpStream, EgressError> {
        let addresses = self.checked_addresses(host, event).await?;
        Ok(self.connect_to(&addresses, port, event).await?.0)
    }

    /// Connects to the first of `addresses` (all checked) that answers; the
    /// event names the address tried last.
    async fn connect_to(
        &self,
        addresses: &[IpAddr],
        port: u16,
        event: &mut EgressEvent,
    ) -> Result<(TcpStream, SocketAddr), EgressError> {
        let timeout = self.policy.limits().connect_timeout;
        let mut last = None;
        for ip in addresses {
            event.address = Some(*ip);
            let address = SocketAddr::new(*ip, port);
            let error = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true).ok();
                    return Ok((stream, address));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} ms", timeout.as_millis()),
            };
            last = Some(EgressError::ConnectFailed {
                address: address.to_string(),
                detail: error,
            });
        }
        Err(last.unwrap_or(EgressError::ResolveFailed {
            host: String::new(),
            detail: "no addresses".into(),
        }))
    }
}

/// Returns once the `serve` that owns this proxy is dropped.
async fn serving_ends(served: Option<watch::Receiver<()>>) {
    match served {
        Some(mut served) => while served.changed().await.is_ok() {},
        None => std::future::pending().await,
    }
}

/// Copies both ways until each side is done, each direction capped; returns
/// the bytes from the tool and to the tool.
async fn relay<C, U>(client: C, upstream: U, max_up: usize, max_down: usize) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, mut client_write) = tokio::io::split(client);
    let (upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let up = async {
        let n = tokio::io::copy(&mut client_read.take(max_up as u64), &mut upstream_write)
            .await
            .unwrap_or(0);
        upstream_write.shutdown().await.ok();
        n
    };
    let down = async {
        let n = tokio::io::copy(&mut upstream_read.take(max_down as u64), &mut client_write)
            .await
            .unwrap_or(0);
        client_write.shutdown().await.ok();
        n
    };
    tokio::join!(up, down)
}

/// The `http://host[:port]` of an absolute-form request, without user info.
fn proxy_authority(uri: &Uri) -> Result<Authority, EgressError> {
    let not_proxy = |detail: &str| EgressError::NotProxyRequest {
        detail: detail.to_string(),
    };
    match uri.scheme() {
        Some(scheme) if *scheme == Scheme::HTTP => {}
        Some(_) => {
            return Err(not_proxy(
                "only http:// URLs are forwarded (the proxy opens TLS itself); use CONNECT for a TLS tunnel",
            ));
        }
        None => {
            return Err(not_proxy(
                "the request target must be an absolute http:// URL",
            ));
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| not_proxy("the URL has no host"))?;
    if authority.as_str().contains('@') {
        return Err(not_proxy("user information in the URL is not forwarded"));
    }
    Ok(authority.clone())
}

fn canonical(host: &str) -> Result<String, EgressError> {
    canonical_host(host).ok_or_else(|| EgressError::InvalidHost {
        host: host.to_string(),
    })
}

/// `Host`, when sent, must name the URL's authority (one header, same host,
/// same explicit port).
fn check_host_header(
    headers: &HeaderMap,
    authority: &Authority,
    host: &str,
) -> Result<(), EgressError> {
    let mut values = headers.get_all(header::HOST).iter();
    let Some(value) = values.next() else {
        return Ok(());
    };
    let mismatch = || EgressError::HostMismatch {
        host_header: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        authority: authority.to_string(),
    };
    if values.next().is_some() {
        return Err(mismatch());
    }
    let sent = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<Authority>().ok())
        .ok_or_else(mismatch)?;
    if canonical_host(sent.host()).as_deref() != Some(host)
        || sent.port_u16() != authority.port_u16()
    {
        return Err(mismatch());
    }
    Ok(())
}

fn check_method_and_path(rule: &HostRule, method: &Method, path: &str) -> Result<(), EgressError> {
    if !rule.methods.is_empty() && !rule.methods.iter().any(|m| m.as_str() == method.as_str()) {
        return Err(EgressError::MethodNotAllowed {
            method: method.to_string(),
            rule: rule.name.clone(),
        });
    }
    if !is_plain_path(path) {
        return Err(EgressError::PathNotPlain {
            path: path.to_string(),
        });
    }
    if !rule.paths.is_empty() && !rule.paths.iter().any(|prefix| path_under(path, prefix)) {
        return Err(EgressError::PathNotAllowed {
            path: path.to_string(),
            rule: rule.name.clone(),
        });
    }
    Ok(())
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, EgressError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(EgressError::RequestTooLarge { limit })
        }
        Err(error) => Err(EgressError::BadRequest {
            detail: error.to_string(),
        }),
    }
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1: `Connection` and the headers
/// it lists, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`)
/// and every `Proxy-*` header (`Proxy-Authorization` is for this proxy only).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy_headers: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy_headers {
        headers.remove(name);
    }
}

/// The answer to a refused or failed request: its status, the reason in
/// [`REASON_HEADER`] and the message (never a secret) as text.
fn refusal(error: &EgressError) -> Response<ProxyBody> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{error}\n"))));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        HeaderName::from_static(REASON_HEADER),
        HeaderValue::from_static(error.reason()),
    );
    if error.status() != StatusCode::FORBIDDEN {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_proxy_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-connection", "keep-alive"),
            ("proxy-anything", "x"),
            ("x-kept", "yes"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        assert_eq!(
            headers.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
            vec!["x-kept"]
        );
    }

    #[test]
    fn only_absolute_http_urls_are_forwarded() {
        for (uri, ok) in [
            ("http://api.test/v1", true),
            ("http://api.test:8080/v1?q=1", true),
            ("https://api.test/v1", false),
            ("/v1", false),
            ("http://user:pw@api.test/v1", false),
            ("ftp://api.test/", false),
        ] {
            let parsed: Uri = uri.parse().unwrap();
            assert_eq!(proxy_authority(&parsed).is_ok(), ok, "{uri}");
        }
    }

    #[test]
    fn the_host_header_must_name_the_authority() {
        let authority: Authority = "api.test:8080".parse().unwrap();
        for (sent, ok) in [
            (vec!["api.test:8080"], true),
            (vec!["API.test.:8080"], true),
            (vec![], true),
            (vec!["api.test"], false),
            (vec!["evil.test:8080"], false),
            (vec!["api.test:8080", "api.test:8080"], false),
            (vec!["api.test:8080@evil.test"], false),
        ] {
            let mut headers = HeaderMap::new();
            for value in &sent {
                headers.append(header::HOST, HeaderValue::from_str(value).unwrap());
            }
            assert_eq!(
                check_host_header(&headers, &authority, "api.test").is_ok(),
                ok,
                "{sent:?}"
            );
        }
    }
}
