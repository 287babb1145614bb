//! Errors as `application/problem+json` (RFC 9457), each with a stable `type`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One invalid field: a JSON pointer into the input and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// The kinds of failure, each with a fixed status, `type` URI and title.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    Validation,
    Unauthenticated,
    /// The access token lacks a scope this runner requires (RFC 6750 `insufficient_scope`).
    InsufficientScope,
    Forbidden,
    RateLimited,
    TooLarge,
    UnsupportedMediaType,
    NotAcceptable,
    NotFound,
    MethodNotAllowed,
    ToolFailed,
    ToolTimeout,
    /// The tool answered something its `outputSchema` does not allow.
    OutputInvalid,
    AuditUnavailable,
    /// The tool's run slots stayed full for the queue deadline.
    Overloaded,
    /// The body did not arrive in time.
    RequestTimeout,
    /// A guard, the anomaly score or an IP allow-list refused the call; one
    /// answer for all of them, so callers cannot probe which check fired.
    Refused,
    Internal,
}

impl ProblemKind {
    /// Every kind, for documents that list them (`/openapi.json`).
    pub const ALL: [ProblemKind; 17] = [
        ProblemKind::Validation,
        ProblemKind::Unauthenticated,
        ProblemKind::InsufficientScope,
        ProblemKind::Forbidden,
        ProblemKind::RateLimited,
        ProblemKind::TooLarge,
        ProblemKind::UnsupportedMediaType,
        ProblemKind::NotAcceptable,
        ProblemKind::NotFound,
        ProblemKind::MethodNotAllowed,
        ProblemKind::ToolFailed,
        ProblemKind::ToolTimeout,
        ProblemKind::OutputInvalid,
        ProblemKind::AuditUnavailable,
        ProblemKind::Overloaded,
        ProblemKind::RequestTimeout,
        ProblemKind::Internal,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::Validation => StatusCode::BAD_REQUEST,
            ProblemKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ProblemKind::Forbidden | ProblemKind::InsufficientScope => StatusCode::FORBIDDEN,
            ProblemKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProblemKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProblemKind::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            ProblemKind::NotFound => StatusCode::NOT_FOUND,
            ProblemKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProblemKind::ToolFailed | ProblemKind::OutputInvalid => StatusCode::BAD_GATEWAY,
            ProblemKind::ToolTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProblemKind::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProblemKind::Refused => StatusCode::FORBIDDEN,
            ProblemKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable identifier of the kind, the last segment of its `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            ProblemKind::Validation => "validation",
            ProblemKind::Unauthenticated => "unauthenticated",
            ProblemKind::InsufficientScope => "insufficient-scope",
            ProblemKind::Forbidden => "forbidden",
            ProblemKind::RateLimited => "rate-limited",
            ProblemKind::TooLarge => "too-large",
            ProblemKind::UnsupportedMediaType => "unsupported-media-type",
            ProblemKind::NotAcceptable => "not-acceptable",
            ProblemKind::NotFound => "not-found",
            ProblemKind::MethodNotAllowed => "method-not-allowed",
            ProblemKind::ToolFailed => "tool-failed",
            ProblemKind::ToolTimeout => "tool-timeout",
            ProblemKind::OutputInvalid => "tool-output-invalid",
            ProblemKind::AuditUnavailable => "audit-unavailable",
            ProblemKind::Overloaded => "overloaded",
            ProblemKind::RequestTimeout => "request-timeout",
            ProblemKind::Refused => "refused",
            ProblemKind::Internal => "internal",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::Validation => "The input is not valid",
            ProblemKind::Unauthenticated => "Authentication required",
            ProblemKind::InsufficientScope => "Insufficient scope",
            ProblemKind::Forbidden => "Forbidden",
            ProblemKind::RateLimited => "Too many requests",
            ProblemKind::TooLarge => "The input is too large",
            ProblemKind::UnsupportedMediaType => "Unsupported media type",
            ProblemKind::NotAcceptable => "Not acceptable",
            ProblemKind::NotFound => "Not found",
            ProblemKind::MethodNotAllowed => "Method not allowed",
            ProblemKind::ToolFailed => "The tool failed",
            ProblemKind::ToolTimeout => "The tool timed out",
            ProblemKind::OutputInvalid => "The tool's output does not match its outputSchema",
            ProblemKind::AuditUnavailable => "The audit log is unavailable",
            ProblemKind::Overloaded => "The tool is busy",
            ProblemKind::RequestTimeout => "The request body did not arrive in time",
            ProblemKind::Refused => REFUSED,
            ProblemKind::Internal => "Internal error",
        }
    }
}

/// Title and detail of [`ProblemKind::Refused`].
pub const REFUSED: &str = "The request cannot be processed";

/// Base of every `type` URI.
pub const TYPE_BASE: &str = "https://toolwarden.dev/problems/";

/// An RFC 9457 problem detail.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub detail: String,
    /// Every invalid field, for `validation`.
    pub errors: Vec<FieldError>,
    /// Seconds until a call may succeed, for `rate-limited` and `overloaded` (`Retry-After`).
    pub retry_after_secs: Option<u64>,
    /// Set once the call has an ID, so callers can quote it.
    pub invocation_id: Option<String>,
}

impl Problem {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Problem {
        Problem {
            kind,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after_secs: None,
            invocation_id: None,
        }
    }

    /// The generic refusal: nothing in it says which check fired.
    pub fn refused() -> Problem {
        Problem::new(ProblemKind::Refused, REFUSED)
    }

    pub fn validation(errors: Vec<FieldError>) -> Problem {
        let detail = match errors.len() {
            1 => "1 field is invalid".to_string(),
            n => format!("{n} fields are invalid"),
        };
        Problem {
            errors,
            ..Problem::new(ProblemKind::Validation, detail)
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "type": format!("{TYPE_BASE}{}", self.kind.slug()),
            "title": self.kind.title(),
            "status": self.kind.status().as_u16(),
            "detail": self.detail,
        });
        if !self.errors.is_empty() {
            body["errors"] = serde_json::json!(self.errors);
        }
        if let Some(id) = &self.invocation_id {
            body["invocationId"] = id.clone().into();
        }
        if let Some(secs) = self.retry_after_secs {
            body["retryAfterSeconds"] = secs.into();
        }
        body
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.kind.status(), self.body().to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.kind == ProblemKind::Unauthenticated {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // For layers that add to a kind's answer (the OAuth challenge).
        response.extensions_mut().insert(self.kind);
        response
    }
}
