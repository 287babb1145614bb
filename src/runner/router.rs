//! The HTTP surface: which handler answers which route (REST from `rest.rs`,
//! MCP from `mcp.rs`), and serving it. Connections, header limits and the
//! `Host`/`Origin` check are the accept loop's (`listener.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};

use super::listener::{self, HttpConfig};
use super::mcp;
use super::oauth::METADATA_PATH;
use super::pipeline::Runner;
use super::problem::{Problem, ProblemKind};
use super::request::call_context;
use super::rest;

pub fn router(runner: Arc<Runner>) -> Router {
    Router::new()
        .route("/v1/tools", get(rest::list_tools))
        .route("/v1/tools/{name}/invoke", post(rest::invoke))
        .route("/v1/approvals/{id}", get(rest::approval))
        .route("/mcp", post(mcp::post).get(mcp::get).delete(mcp::delete))
        .route("/metrics", get(rest::authenticated_metrics))
        .route("/openapi.json", get(rest::openapi_document))
        .route(METADATA_PATH, get(rest::protected_resource))
        .route(
            &format!("{METADATA_PATH}/{{*resource}}"),
            get(rest::protected_resource),
        )
        // Everything above only for clients in `--ip-allow-list`; the probes for anyone.
        .route_layer(middleware::from_fn_with_state(
            runner.clone(),
            allow_listed_clients,
        ))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(rest::ready))
        .fallback(|| async { Problem::new(ProblemKind::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                ProblemKind::MethodNotAllowed,
                "method not allowed on this endpoint",
            )
        })
        .layer(middleware::map_response_with_state(
            runner.clone(),
            oauth_challenge,
        ))
        .with_state(runner)
}

/// With OAuth configured, every refusal of a caller says where to get a
/// token (RFC 9728 section 5.1), whichever handler refused.
async fn oauth_challenge(State(runner): State<Arc<Runner>>, mut response: Response) -> Response {
    if let Some(oauth) = &runner.auth.oauth {
        oauth.challenge(&mut response);
    }
    response
}

/// Refuses requests from clients outside the runner-wide allow-list.
async fn allow_listed_clients(
    State(runner): State<Arc<Runner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let ctx = call_context("http", peer, request.headers());
    match runner.admit_client(&ctx) {
        Ok(()) => next.run(request).await,
        Err(problem) => problem.into_response(),
    }
}

/// Only `/metrics`, unauthenticated: for `--metrics-listen`, an address the
/// operator chose to expose to the scraper.
pub fn metrics_router(runner: Arc<Runner>) -> Router {
    Router::new()
        .route("/metrics", get(rest::metrics))
        .fallback(|| async { Problem::new(ProblemKind::NotFound, "no such endpoint") })
        .with_state(runner)
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
