//! Why the proxy refused or failed a request.

use std::net::IpAddr;

use hyper::StatusCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("invalid egress rule: {detail}")]
    InvalidRule { detail: String },
    #[error("secret `{secret}` cannot be injected: {detail}")]
    InvalidCredential { secret: String, detail: String },
    #[error("no random numbers for a placeholder: {detail}")]
    Random { detail: String },
    #[error("no trusted root certificates for upstream TLS: {detail}")]
    NoTrustRoots { detail: String },

    #[error("not a proxy request: {detail}")]
    NotProxyRequest { detail: String },
    #[error("`{host}` is not a valid host name")]
    InvalidHost { host: String },
    #[error("the Host header `{host_header}` differs from the request's authority `{authority}`")]
    HostMismatch {
        host_header: String,
        authority: String,
    },
    #[error("the path is not plain (empty, `.` or `..` segments, `%`, `\\`): {path}")]
    PathNotPlain { path: String },
    #[error("`{host}` is not in permissions.network.egress")]
    HostNotAllowed { host: String },
    #[error("port {port} is not in {rule}.ports")]
    PortNotAllowed { port: u16, rule: String },
    #[error("method {method} is not in {rule}.methods")]
    MethodNotAllowed { method: String, rule: String },
    #[error("path {path} is under none of {rule}.paths")]
    PathNotAllowed { path: String, rule: String },
    #[error(
        "{rule} limits paths or methods, which a CONNECT tunnel would hide; send http:// requests"
    )]
    TunnelNotAllowed { rule: String },
    #[error("{rule} is plain HTTP; a CONNECT tunnel must carry TLS to a rule without plainHttp")]
    TunnelToPlainHttp { rule: String },
    #[error(
        "{host} resolves to {address}, which is {kind} ({range}) and not in allowedEgressCidrs"
    )]
    AddressNotAllowed {
        host: String,
        address: IpAddr,
        kind: &'static str,
        range: String,
    },
    #[error("cannot resolve {host}: {detail}")]
    ResolveFailed { host: String, detail: String },
    #[error("the tunnel did not start with a TLS ClientHello: {detail}")]
    NotTls { detail: String },
    #[error("the TLS ClientHello names no server (SNI) for {host}")]
    NoSni { host: String },
    #[error("the TLS ClientHello names `{sni}` in a tunnel to `{host}`")]
    SniMismatch { sni: String, host: String },
    #[error("a placeholder of secret `{secret}` in {place}")]
    CredentialMisuse { secret: String, place: String },
    #[error("the request body is larger than {limit} bytes")]
    RequestTooLarge { limit: usize },
    #[error("the response body is larger than {limit} bytes")]
    ResponseTooLarge { limit: usize },
    #[error("no answer within {} ms", .limit.as_millis())]
    Timeout { limit: std::time::Duration },
    #[error("cannot connect to {address}: {detail}")]
    ConnectFailed { address: String, detail: String },
    #[error("TLS to {host} failed: {detail}")]
    UpstreamTls { host: String, detail: String },
    #[error("upstream HTTP error: {detail}")]
    Upstream { detail: String },
    #[error("bad request: {detail}")]
    BadRequest { detail: String },
    #[error("the proxy stopped")]
    Stopped,
    #[error("more than {limit} tunnels open")]
    TooManyConnections { limit: usize },
}

impl EgressError {
    /// A stable name for audit records and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            EgressError::InvalidRule { .. } => "InvalidRule",
            EgressError::InvalidCredential { .. } => "InvalidCredential",
            EgressError::Random { .. } => "Random",
            EgressError::NoTrustRoots { .. } => "NoTrustRoots",
            EgressError::NotProxyRequest { .. } => "NotProxyRequest",
            EgressError::InvalidHost { .. } => "InvalidHost",
            EgressError::HostMismatch { .. } => "HostMismatch",
            EgressError::PathNotPlain { .. } => "PathNotPlain",
            EgressError::HostNotAllowed { .. } => "HostNotAllowed",
            EgressError::PortNotAllowed { .. } => "PortNotAllowed",
            EgressError::MethodNotAllowed { .. } => "MethodNotAllowed",
            EgressError::PathNotAllowed { .. } => "PathNotAllowed",
            EgressError::TunnelNotAllowed { .. } => "TunnelNotAllowed",
            EgressError::TunnelToPlainHttp { .. } => "TunnelToPlainHttp",
            EgressError::AddressNotAllowed { .. } => "AddressNotAllowed",
            EgressError::ResolveFailed { .. } => "ResolveFailed",
            EgressError::NotTls { .. } => "NotTls",
            EgressError::NoSni { .. } => "NoSni",
            EgressError::SniMismatch { .. } => "SniMismatch",
            EgressError::CredentialMisuse { .. } => "CredentialMisuse",
            EgressError::RequestTooLarge { .. } => "RequestTooLarge",
            EgressError::ResponseTooLarge { .. } => "ResponseTooLarge",
            EgressError::Timeout { .. } => "Timeout",
            EgressError::ConnectFailed { .. } => "ConnectFailed",
            EgressError::UpstreamTls { .. } => "UpstreamTls",
            EgressError::Upstream { .. } => "Upstream",
            EgressError::BadRequest { .. } => "BadRequest",
            EgressError::Stopped => "Stopped",
            EgressError::TooManyConnections { .. } => "TooManyConnections",
        }
    }

    /// The rule a refusal came from, for the audit record: a rule's field,
    /// or the default that denies whatever no rule allows.
    pub fn denied_by(&self) -> Option<String> {
        Some(match self {
            EgressError::HostNotAllowed { .. } => {
                "permissions.network.egress (default deny)".into()
            }
            EgressError::PortNotAllowed { rule, .. } => format!("{rule}.ports"),
            EgressError::MethodNotAllowed { rule, .. } => format!("{rule}.methods"),
            EgressError::PathNotAllowed { rule, .. } => format!("{rule}.paths"),
            EgressError::TunnelNotAllowed { rule } => format!("{rule}.paths/methods"),
            EgressError::TunnelToPlainHttp { rule } => format!("{rule}.plainHttp"),
            EgressError::AddressNotAllowed { range, .. } => {
                format!("non-public address {range} (sandboxing.allowedEgressCidrs)")
            }
            EgressError::SniMismatch { .. }
            | EgressError::NoSni { .. }
            | EgressError::NotTls { .. } => {
                "CONNECT needs TLS whose SNI is the declared host".into()
            }
            EgressError::CredentialMisuse { secret, .. } => format!("secrets[{secret}].inject"),
            EgressError::HostMismatch { .. } => "Host must equal the request's authority".into(),
            EgressError::PathNotPlain { .. } => "paths must be plain".into(),
            EgressError::RequestTooLarge { .. } => "request size limit".into(),
            EgressError::ResponseTooLarge { .. } => "response size limit".into(),
            _ => return None,
        })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            EgressError::NotProxyRequest { .. }
            | EgressError::InvalidHost { .. }
            | EgressError::HostMismatch { .. }
            | EgressError::PathNotPlain { .. }
            | EgressError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            EgressError::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            EgressError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            EgressError::ResolveFailed { .. }
            | EgressError::ConnectFailed { .. }
            | EgressError::UpstreamTls { .. }
            | EgressError::Upstream { .. }
            | EgressError::ResponseTooLarge { .. } => StatusCode::BAD_GATEWAY,
            EgressError::Stopped | EgressError::TooManyConnections { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            EgressError::InvalidRule { .. }
            | EgressError::InvalidCredential { .. }
            | EgressError::Random { .. }
            | EgressError::NoTrustRoots { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            EgressError::HostNotAllowed { .. }
            | EgressError::PortNotAllowed { .. }
            | EgressError::MethodNotAllowed { .. }
            | EgressError::PathNotAllowed { .. }
            | EgressError::TunnelNotAllowed { .. }
            | EgressError::TunnelToPlainHttp { .. }
            | EgressError::AddressNotAllowed { .. }
            | EgressError::NotTls { .. }
            | EgressError::NoSni { .. }
            | EgressError::SniMismatch { .. }
            | EgressError::CredentialMisuse { .. } => StatusCode::FORBIDDEN,
        }
    }
}
