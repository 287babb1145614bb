//! The HTTP surface: REST (`/v1/tools`, `/v1/tools/{name}/invoke`), probes,
//! `/metrics`, and the MCP endpoint mounted from `mcp.rs`. Thin: every
//! decision is made by the pipeline.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::limits::too_large;
use super::mcp;
use super::pipeline::{CallContext, Runner};
use super::problem::{Problem, ProblemKind};

/// Body cap for calls to unknown tools (they are refused anyway).
const UNKNOWN_TOOL_BODY_BYTES: usize = 64 * 1024;

pub fn router(runner: Arc<Runner>) -> Router {
    Router::new()
        .route("/v1/tools", get(list_tools))
        .route("/v1/tools/{name}/invoke", post(invoke))
        .route("/mcp", post(mcp::post).get(mcp::get).delete(mcp::delete))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { Problem::new(ProblemKind::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                ProblemKind::MethodNotAllowed,
                "method not allowed on this endpoint",
            )
        })
        .with_state(runner)
}

/// What the transport knows about the caller.
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
        user_agent: text(header::USER_AGENT),
        authorization: text(header::AUTHORIZATION),
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
            json!({"name": t.name, "description": t.spec.description,
                   "inputSchema": t.spec.input_schema, "risk": t.spec.risk.as_str(),
                   "generation": t.generation})
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

/// Reads a body up to `limit` bytes, as a problem when it is larger.
pub async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, Problem> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
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
    let body = if is_json(&headers) {
        read_body(body, limit).await
    } else {
        Err(Problem::new(
            ProblemKind::UnsupportedMediaType,
            "the body must be JSON (Content-Type: application/json)",
        ))
    };
    match runner
        .invoke(&ctx, &name, body.as_deref().map_err(Clone::clone))
        .await
    {
        Ok(success) => {
            let mut out = json!({
                "invocationId": success.invocation_id,
                "output": success.output,
                "exitCode": success.exit_code,
                "durationMs": success.duration_ms,
            });
            if success.output_truncated {
                out["outputTruncated"] = true.into();
            }
            axum::Json(out).into_response()
        }
        Err(problem) => problem.into_response(),
    }
}

async fn ready(State(runner): State<Arc<Runner>>) -> Response {
    match runner.audit.failure() {
        None => "ready\n".into_response(),
        Some(e) => Problem::new(ProblemKind::AuditUnavailable, e.to_string()).into_response(),
    }
}

async fn metrics(State(runner): State<Arc<Runner>>) -> Response {
    runner
        .metrics
        .tools_served
        .set(runner.registry.snapshot().len() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        runner.metrics.encode(),
    )
        .into_response()
}

/// Serves the runner on `listener` until `shutdown` completes; calls in
/// flight are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runner: Arc<Runner>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(runner).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
