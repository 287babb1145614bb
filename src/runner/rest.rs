//! The REST handlers (`/v1/tools`, `/v1/tools/{name}/invoke`,
//! `/v1/approvals/{id}`), the probes and
//! `/metrics`. Thin: every decision is made by the pipeline; the routes are
//! `router.rs`'s.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::auth::Caller;
use super::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
use super::openapi;
use super::pipeline::{Called, Runner, auth_problem};
use super::problem::{Problem, ProblemKind};
use super::request::{call_context, is_json, read_body};
use super::tool_metadata::describe;

/// Body cap for calls to unknown tools (they are refused anyway).
const UNKNOWN_TOOL_BODY_BYTES: usize = 64 * 1024;

/// The caller of a read-only endpoint, from the headers, or the refusal to send.
async fn caller_of(
    runner: &Runner,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<Caller, Response> {
    let ctx = call_context("rest", peer, headers);
    runner
        .auth
        .authenticate(ctx.authorization.as_deref())
        .await
        .map_err(|e| auth_problem(&e).into_response())
}

/// `GET /v1/tools`: the tools this caller may call, described as MCP lists
/// them, with their risk, generation and isolation.
pub async fn list_tools(
    State(runner): State<Arc<Runner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller_of(&runner, peer, &headers).await {
        Ok(caller) => caller,
        Err(refusal) => return refusal,
    };
    let tools: Vec<_> = runner
        .visible_tools(&caller)
        .iter()
        .map(|t| {
            let degradations = runner.executor.degradations(t);
            let mut entry = serde_json::to_value(describe(t)).unwrap_or_default();
            entry["risk"] = t.spec.risk.as_str().into();
            entry["generation"] = t.generation.into();
            entry["isolation"] = json!({
                "degraded": degradations.as_ref().map(|d| !d.is_empty()),
                "degradations": degradations,
            });
            entry
        })
        .collect();
    // How calls are isolated here (the engine's probe result, as in the startup banner).
    axum::Json(json!({"tools": tools, "isolation": runner.executor.isolation()})).into_response()
}

pub async fn invoke(
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
        Ok(Called::Ran(success)) => axum::Json(Invoked {
            invocation_id: &success.invocation_id,
            output: &success.output,
            exit_code: success.exit_code,
            duration_ms: success.duration_ms,
            output_truncated: success.output_truncated,
        })
        .into_response(),
        // Accepted, not run: a plain JSON body (not a problem) and where to follow it.
        Ok(Called::AwaitingApproval(pending)) => (
            StatusCode::ACCEPTED,
            [(header::LOCATION, pending.location())],
            axum::Json(pending.view(jiff::Timestamp::now())),
        )
            .into_response(),
        Err(problem) => problem.into_response(),
    }
}

/// `GET /v1/approvals/{id}`: where a call answered `202` stands. Only the
/// caller who asked sees it; to anyone else it does not exist.
pub async fn approval(
    State(runner): State<Arc<Runner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller_of(&runner, peer, &headers).await {
        Ok(caller) => caller,
        Err(refusal) => return refusal,
    };
    match runner.approvals.lookup(&id, &caller.sub) {
        Some(pending) => axum::Json(pending.view(jiff::Timestamp::now())).into_response(),
        None => Problem::new(ProblemKind::NotFound, "no such approval").into_response(),
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

pub async fn ready(State(runner): State<Arc<Runner>>) -> Response {
    match runner.audit.ensure_writable() {
        Ok(()) => "ready\n".into_response(),
        Err(e) => Problem::new(ProblemKind::AuditUnavailable, e.to_string()).into_response(),
    }
}

/// `/metrics` on the main listener: tool names and call counts are for
/// authenticated callers only, like `/v1/tools`.
pub async fn authenticated_metrics(
    State(runner): State<Arc<Runner>>,
    headers: HeaderMap,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = runner.auth.authenticate(authorization).await {
        return auth_problem(&e).into_response();
    }
    metrics(State(runner), headers).await
}

pub async fn metrics(State(runner): State<Arc<Runner>>, headers: HeaderMap) -> Response {
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

/// `GET /.well-known/oauth-protected-resource[/path]`: this resource's OAuth
/// metadata (RFC 9728), public like any discovery document; only when OAuth
/// is configured.
pub async fn protected_resource(State(runner): State<Arc<Runner>>, uri: Uri) -> Response {
    match &runner.auth.oauth {
        Some(oauth) if oauth.serves_metadata_at(uri.path()) => {
            axum::Json(oauth.metadata()).into_response()
        }
        _ => Problem::new(ProblemKind::NotFound, "no such endpoint").into_response(),
    }
}

/// `GET /openapi.json`: the REST API as OpenAPI 3.1, with the tools this
/// caller may call (each its own invoke path with its input and output schema).
pub async fn openapi_document(
    State(runner): State<Arc<Runner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller_of(&runner, peer, &headers).await {
        Ok(caller) => caller,
        Err(refusal) => return refusal,
    };
    let oauth = runner.auth.oauth.is_some();
    axum::Json(openapi::document(&runner.visible_tools(&caller), oauth)).into_response()
}
