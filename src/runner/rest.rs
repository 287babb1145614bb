//! The HTTP surface: REST (`/v1/tools`, `/v1/tools/{name}/invoke`), probes,
//! `/metrics`, and the MCP endpoint mounted from `mcp.rs`. Thin: every
//! decision is made by the pipeline. Connections, header limits and the
//! `Host`/`Origin` check are the accept loop's (`listener.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::limits::{bounded, too_large};
use super::listener::{self, HttpConfig};
use super::mcp;
use super::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
use super::pipeline::{CallContext, Runner};
use super::problem::{Problem, ProblemKind};

/// Body cap for calls to unknown tools (they are refused anyway).
const UNKNOWN_TOOL_BODY_BYTES: usize = 64 * 1024;

/// A body must arrive within this once the call is admitted to read it.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest `User-Agent` kept for the audit log; longer ones are cut and marked.
const MAX_USER_AGENT_BYTES: usize = 256;

pub fn router(runner: Arc<Runner>) -> Router {
    Router::new()
        .route("/v1/tools", get(list_tools))
        .route("/v1/tools/{name}/invoke", post(invoke))
        .route("/mcp", post(mcp::post).get(mcp::get).delete(mcp::delete))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(authenticated_metrics))
        .fallback(|| async { Problem::new(ProblemKind::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                ProblemKind::MethodNotAllowed,
                "method not allowed on this endpoint",
            )
        })
        .with_state(runner)
}

/// Only `/metrics`, unauthenticated: for `--metrics-listen`, an address the
/// operator chose to expose to the scraper.
pub fn metrics_router(runner: Arc<Runner>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { Problem::new(ProblemKind::NotFound, "no such endpoint") })
        .with_state(runner)
}

/// What the transport knows about the caller. The user agent is bounded
/// (it goes into every audit record of the call).
pub fn call_context(transport: &'static str, peer: SocketAddr, headers: &HeaderMap) -> CallContext {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    CallContext {
        transport,
        client_ip: Some(peer.ip().to_string()),
        user_agent: headers
            .get(header::USER_AGENT)
            .map(|v| bounded(&String::from_utf8_lossy(v.as_bytes()), MAX_USER_AGENT_BYTES)),
        authorization: text(header::AUTHORIZATION),
        caller: None,
    }
}

async fn list_tools(
    State(runner): State<Arc<Runner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let ctx = call_context("rest", peer, &headers);
    if let Err(e) = runner.auth.authenticate(ctx.authorization.as_deref()).await {
        return Problem::new(ProblemKind::Unauthenticated, e.to_string()).into_response();
    }
    let tools: Vec<_> = runner
        .registry
        .snapshot()
        .values()
        .map(|t| {
            let degradations = runner.executor.degradations(t);
            json!({"name": t.name, "description": t.spec.description,
            "inputSchema": t.spec.input_schema, "risk": t.spec.risk.as_str(),
            "generation": t.generation,
            "isolation": {
                "degraded": degradations.as_ref().map(|d| !d.is_empty()),
                "degradations": degradations,
            }})
        })
        .collect();
    // How calls are isolated here (the engine's probe result, as in the startup banner).
    axum::Json(json!({"tools": tools, "isolation": runner.executor.isolation()})).into_response()
}

/// True for `application/json` and `application/*+json`, parameters allowed.
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads a body up to `limit` bytes within [`BODY_READ_TIMEOUT`], as a
/// problem when it is larger or slower.
pub async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, Problem> {
    // A declared Content-Length over the limit is refused before any byte is read.
    if axum::body::HttpBody::size_hint(&body).lower() > limit as u64 {
        return Err(too_large(limit as u64));
    }
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(Problem::new(
            ProblemKind::RequestTimeout,
            format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        ));
    };
    read.map_err(|e| {
        let source = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default();
        if source.contains("length limit") || e.to_string().contains("length limit") {
            too_large(limit as u64)
        } else {
            Problem::validation(vec![super::problem::FieldError {
                path: String::new(),
                message: format!("the body could not be read: {e}"),
            }])
        }
    })
}

async fn invoke(
    State(runner): State<Arc<Runner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ctx = call_context("rest", peer, &headers);
    let limit = runner
        .registry
        .get(&name)
        .map_or(UNKNOWN_TOOL_BODY_BYTES, |t| {
            usize::try_from(t.spec.max_input_bytes).unwrap_or(usize::MAX)
        });
    let json = is_json(&headers);
    // Read by the pipeline only after authentication and rate limiting.
    let body = async move {
        if json {
            read_body(body, limit).await
        } else {
            Err(Problem::new(
                ProblemKind::UnsupportedMediaType,
                "the body must be JSON (Content-Type: application/json)",
            ))
        }
    };
    match runner.invoke(&ctx, &name, body).await {
        Ok(success) => axum::Json(Invoked {
            invocation_id: &success.invocation_id,
            output: &success.output,
            exit_code: success.exit_code,
            duration_ms: success.duration_ms,
            output_truncated: success.output_truncated,
        })
        .into_response(),
        Err(problem) => problem.into_response(),
    }
}

/// The answer to a successful call; `output` is embedded as the tool printed it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Invoked<'a> {
    invocation_id: &'a str,
    output: &'a serde_json::value::RawValue,
    exit_code: i32,
    duration_ms: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    output_truncated: bool,
}

async fn ready(State(runner): State<Arc<Runner>>) -> Response {
    match runner.audit.ensure_writable() {
        Ok(()) => "ready\n".into_response(),
        Err(e) => Problem::new(ProblemKind::AuditUnavailable, e.to_string()).into_response(),
    }
}

/// `/metrics` on the main listener: tool names and call counts are for
/// authenticated callers only, like `/v1/tools`.
async fn authenticated_metrics(State(runner): State<Arc<Runner>>, headers: HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = runner.auth.authenticate(authorization).await {
        return Problem::new(ProblemKind::Unauthenticated, e.to_string()).into_response();
    }
    metrics(State(runner), headers).await
}

async fn metrics(State(runner): State<Arc<Runner>>, headers: HeaderMap) -> Response {
    runner
        .metrics
        .tools_served
        .set(runner.registry.snapshot().len() as i64);
    runner
        .metrics
        .audit_healthy
        .set(i64::from(runner.audit.is_healthy()));
    // OpenMetrics for those who ask for it (Prometheus does), the classic text format
    // for everyone else: a classic parser misreads OpenMetrics counters.
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            runner.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            runner.metrics.encode_prometheus(),
        )
            .into_response()
    }
}

/// Serves the runner on `listener` with the default HTTP limits and the
/// listen address's names until `shutdown` completes; calls in flight are
/// finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runner: Arc<Runner>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = HttpConfig::for_listen(listener.local_addr()?);
    listener::serve(listener, router(runner), config, shutdown).await
}
