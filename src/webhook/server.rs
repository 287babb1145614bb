//! The HTTPS server: `POST /validate` for every review (one service, one
//! validator per kind behind it), `/healthz` and `/readyz`. Each evaluation
//! holds one of a fixed number of slots and must finish within a deadline
//! below the API server's webhook timeout. When it cannot (no slot in time, the
//! deadline overrun, the stores not synced yet) the answer is a *denial* with
//! code 503 and a message saying why, for the request's `uid`: the API server
//! shows that message to the caller and the request is refused whatever the
//! configuration's `failurePolicy` says. Only a body without a readable `uid`
//! gets a bare HTTP `503` (the API server fails it closed under `Fail`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use kube::core::admission::AdmissionResponse;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::certs::CertStore;
use super::review::{Admission, MAX_REVIEW_BYTES};

/// Limits of the server (`webhook` flags).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Reviews evaluated at once; more wait for a slot until the deadline.
    pub max_in_flight: usize,
    /// Slot wait plus evaluation; keep it below the configuration's `timeoutSeconds`.
    pub deadline: Duration,
    /// TLS handshake and request headers must arrive within this.
    pub handshake_timeout: Duration,
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: 16,
            deadline: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            max_connections: 512,
        }
    }
}

struct App {
    admission: Arc<Admission>,
    certs: Arc<CertStore>,
    slots: Arc<Semaphore>,
    deadline: Duration,
}

/// The routes, without TLS (tests drive it directly; [`serve`] puts TLS in front).
pub fn router(admission: Arc<Admission>, certs: Arc<CertStore>, limits: &Limits) -> Router {
    let app = Arc::new(App {
        admission,
        certs,
        slots: Arc::new(Semaphore::new(limits.max_in_flight)),
        deadline: limits.deadline,
    });
    Router::new()
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(app)
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    match (app.admission.view.is_synced(), app.certs.is_loaded()) {
        (true, true) => "ok".into_response(),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "stores not synced yet").into_response(),
        (_, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no serving certificate yet",
        )
            .into_response(),
    }
}

async fn validate(State(app): State<Arc<App>>, body: Bytes) -> Response {
    if !app.admission.view.is_synced() {
        return unavailable(
            &body,
            "NotReady",
            "toolwarden's webhook has not synced its ToolPolicy, Namespace and AgentTool stores yet",
        );
    }
    let deadline = tokio::time::Instant::now() + app.deadline;
    let Ok(Ok(slot)) =
        tokio::time::timeout_at(deadline, Arc::clone(&app.slots).acquire_owned()).await
    else {
        tracing::warn!(deadline = ?app.deadline, "no evaluation slot before the deadline");
        return unavailable(
            &body,
            "Busy",
            format!(
                "toolwarden's webhook is busy: no evaluation slot within {:?}; retry",
                app.deadline
            ),
        );
    };
    let admission = Arc::clone(&app.admission);
    // `Bytes` clones share the buffer: the busy answer below reads the uid from it.
    let request = body.clone();
    // The slot goes with the evaluation: one that overruns the deadline still counts.
    let work = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        admission.review(&request)
    });
    match tokio::time::timeout_at(deadline, work).await {
        Ok(Ok(Ok(review))) => axum::Json(review).into_response(),
        Ok(Ok(Err(bad))) => {
            tracing::info!(reason = bad.reason(), error = %bad, "bad admission review");
            (StatusCode::BAD_REQUEST, bad.to_string()).into_response()
        }
        Ok(Err(panicked)) => {
            tracing::error!(error = %panicked, "admission evaluation panicked");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "admission evaluation failed",
            )
                .into_response()
        }
        Err(_) => {
            tracing::warn!(deadline = ?app.deadline, "admission evaluation overran its deadline");
            unavailable(
                &body,
                "Busy",
                format!(
                    "toolwarden's webhook did not finish evaluating within {:?}; retry",
                    app.deadline
                ),
            )
        }
    }
}

/// The answer when the webhook cannot judge a review: a denial (code 503,
/// `reason`, `message`) for the review's uid, so the caller reads why and the
/// request is refused even under `failurePolicy: Ignore`; a bare `503` only
/// when the body has no readable uid (nothing to answer for).
fn unavailable(body: &[u8], reason: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    match super::review::request_uid(body) {
        Some(uid) => {
            let mut response = AdmissionResponse::invalid(message);
            response.uid = uid;
            response.result.code = 503;
            response.result.reason = reason.to_string();
            axum::Json(response.into_review()).into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, message).into_response(),
    }
}

/// Serves `router` over TLS until `shutdown` resolves, then lets open
/// connections finish their request (up to 10 s).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!(%peer, "connection table full; closing");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing them");
    }
}
