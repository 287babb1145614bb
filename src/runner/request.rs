//! What REST and MCP read from a request alike: the caller's context from
//! the headers, the content type, and the body within a size and a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, header};

use super::body_limits::{bounded, too_large};
use super::pipeline::CallContext;
use super::problem::{FieldError, Problem, ProblemKind};

/// A body must arrive within this once the call is admitted to read it.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest `User-Agent` kept for the audit log; longer ones are cut and marked.
const MAX_USER_AGENT_BYTES: usize = 256;

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
        forwarding: forwarding_headers(headers),
    }
}

/// The headers proxies name the client in (`X-Forwarded-For`, `Forwarded`);
/// believed only when the peer is a trusted proxy.
fn forwarding_headers(headers: &HeaderMap) -> HeaderMap {
    let mut forwarding = HeaderMap::new();
    for name in [
        header::FORWARDED,
        HeaderName::from_static("x-forwarded-for"),
    ] {
        for value in headers.get_all(&name) {
            forwarding.append(name.clone(), value.clone());
        }
    }
    forwarding
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
            Problem::validation(vec![FieldError {
                path: String::new(),
                message: format!("the body could not be read: {e}"),
            }])
        }
    })
}
