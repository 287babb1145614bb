//! Real parts for the egress proxy's tests and benchmark: HTTP and HTTPS
//! upstreams on loopback (a throw-away CA from rcgen), a resolver whose
//! answers the test decides, an audit recorder and a small HTTP client.
#![allow(dead_code)] // each user takes what it needs

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use toolwarden::egress::{
    EgressAudit, EgressEvent, EgressPolicy, EgressProxy, ResolveFuture, Resolver, UpstreamTls,
};

/// A CA the test trusts and a server certificate it issued for some names.
pub struct TestPki {
    pub ca: CertificateDer<'static>,
    pub server: Arc<rustls::ServerConfig>,
}

impl TestPki {
    pub fn new(names: &[&str]) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "toolwarden egress test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        TestPki {
            ca: ca.der().clone(),
            server: Arc::new(server),
        }
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        roots
    }

    /// The proxy's upstream TLS, trusting only this CA.
    pub fn upstream_tls(&self) -> UpstreamTls {
        UpstreamTls::with_roots(self.roots()).unwrap()
    }

    /// A TLS client (for tunnels) trusting only this CA.
    pub fn client(&self) -> tokio_rustls::TlsConnector {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(self.roots())
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// What an upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An HTTP (or HTTPS) server on loopback that records what it gets.
/// `/big` answers 2 MiB, `/slow` answers after 10 s, a path ending in `/echo`
/// the request's headers as a JSON object, anything else `{"ok":true}`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(bind: &str, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, record) = (connections.clone(), seen.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                stream.set_nodelay(true).ok();
                count.fetch_add(1, Ordering::SeqCst);
                let (record, acceptor) = (record.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| answer(request, record.clone()));
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                http.serve_connection(TokioIo::new(tls), service).await.ok();
                            }
                        }
                        None => {
                            http.serve_connection(TokioIo::new(stream), service)
                                .await
                                .ok();
                        }
                    }
                });
            }
        });
        Ok(Upstream {
            addr,
            connections,
            seen,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let target = parts.uri.to_string();
    record.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: parts.headers.clone(),
        body,
    });
    let body = match parts.uri.path() {
        "/big" => Bytes::from(vec![b'x'; 2 * 1024 * 1024]),
        echo if echo.ends_with("/echo") => {
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.to_string(), value.into())
                })
                .collect();
            Bytes::from(serde_json::Value::Object(headers).to_string())
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Bytes::from_static(b"late")
        }
        _ => Bytes::from_static(br#"{"ok":true}"#),
    };
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        "x-upstream-hop",
        hyper::header::HeaderValue::from_static("1"),
    );
    response.headers_mut().insert(
        "connection",
        hyper::header::HeaderValue::from_static("x-upstream-hop"),
    );
    Ok(response)
}

/// A resolver whose answers the test sets: each name has a queue of answers,
/// the last one repeating. Counts calls.
#[derive(Default)]
pub struct Names {
    answers: Mutex<HashMap<String, VecDeque<Vec<IpAddr>>>>,
    calls: AtomicUsize,
}

impl Names {
    pub fn set(&self, name: &str, answers: &[&[&str]]) {
        let queue = answers
            .iter()
            .map(|ips| ips.iter().map(|ip| ip.parse().unwrap()).collect())
            .collect();
        self.answers.lock().unwrap().insert(name.to_string(), queue);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Resolver for Names {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut answers = self.answers.lock().unwrap();
        let answer = match answers.get_mut(host) {
            Some(queue) if queue.len() > 1 => queue.pop_front(),
            Some(queue) => queue.front().cloned(),
            None => None,
        };
        Box::pin(async move {
            answer.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown test name"))
        })
    }
}

/// Keeps every audit event.
#[derive(Default)]
pub struct Recorder(Mutex<Vec<EgressEvent>>);

impl EgressAudit for Recorder {
    fn record(&self, event: EgressEvent) {
        self.0.lock().unwrap().push(event);
    }
}

impl Recorder {
    pub fn events(&self) -> Vec<EgressEvent> {
        self.0.lock().unwrap().clone()
    }

    /// The first event matching `want`, waiting up to 10 s (tunnels record
    /// theirs when they end).
    pub async fn wait_for(&self, want: impl Fn(&EgressEvent) -> bool) -> EgressEvent {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(event) = self.events().into_iter().find(|e| want(e)) {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "no matching audit event in {:#?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A running proxy on loopback.
pub struct Proxy {
    pub addr: SocketAddr,
    pub audit: Arc<Recorder>,
    task: tokio::task::JoinHandle<io::Error>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(policy: EgressPolicy, tls: UpstreamTls, names: Arc<Names>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let audit = Arc::new(Recorder::default());
        let proxy = EgressProxy::new(policy, tls, audit.clone()).with_resolver(names);
        let task = tokio::spawn(proxy.serve(listener));
        Proxy { addr, audit, task }
    }
}

/// A response as the client saw it.
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn reason(&self) -> &str {
        self.headers
            .get(toolwarden::egress::REASON_HEADER)
            .map_or("", |v| v.to_str().unwrap())
    }
}

/// Sends one request over a new connection to `to` (the proxy, or an
/// upstream directly).
pub async fn send(to: SocketAddr, request: Request<Full<Bytes>>) -> Answer {
    let stream = TcpStream::connect(to).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// A `GET` of `url` with `headers` (no `Host` unless given).
pub fn get(url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    request("GET", url, headers, "")
}

pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Opens a `CONNECT` tunnel through the proxy: the proxy's status, and the
/// tunnel when it answered 200.
pub async fn connect(
    proxy: SocketAddr,
    authority: &str,
) -> (u16, String, Option<TokioIo<hyper::upgrade::Upgraded>>) {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection.with_upgrades());
    let request = Request::builder()
        .method("CONNECT")
        .uri(authority)
        .header("host", authority)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let reason = response
        .headers()
        .get(toolwarden::egress::REASON_HEADER)
        .map_or(String::new(), |v| v.to_str().unwrap().to_string());
    if status != 200 {
        return (status, reason, None);
    }
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    (status, reason, Some(TokioIo::new(upgraded)))
}
