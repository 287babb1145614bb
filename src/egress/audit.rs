//! One record per request through the proxy, handed to whoever keeps the
//! audit trail (the runner's audit log: `runner::audit::EgressTrail`).

use std::net::IpAddr;

use serde::Serialize;

use super::error::EgressError;

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EgressOutcome {
    /// Forwarded, or a tunnel run to its end.
    Allowed,
    /// Refused by a rule (`deniedBy` says which).
    Denied,
    /// A placeholder was found where its secret may not go.
    CredentialMisuse,
    /// Allowed, but the upstream could not be reached or answered badly.
    Failed,
}

/// One request (or `CONNECT` tunnel) through the proxy. Never holds a
/// secret's value; the query string is left out, the path kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressEvent {
    pub outcome: EgressOutcome,
    pub method: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    /// The address connected to (or refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// The status the tool got; 200 for a tunnel that was opened.
    pub status: u16,
    /// Request body bytes forwarded (tunnels: bytes from the tool).
    pub bytes_sent: u64,
    /// Response body bytes returned (tunnels: bytes to the tool).
    pub bytes_received: u64,
    pub duration_ms: u64,
    /// The egress rule that allowed the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `secretName/key` of each credential swapped in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub injected: Vec<String>,
    /// The [`EgressError::reason`] of a refusal or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The rule that refused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl EgressEvent {
    pub(crate) fn new(method: &str) -> Self {
        EgressEvent {
            outcome: EgressOutcome::Allowed,
            method: method.to_string(),
            host: String::new(),
            port: 0,
            path: String::new(),
            address: None,
            status: 0,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0,
            rule: None,
            injected: Vec::new(),
            reason: None,
            denied_by: None,
            detail: None,
        }
    }

    pub(crate) fn fail(&mut self, error: &EgressError) {
        let status = error.status();
        self.outcome = match error {
            EgressError::CredentialMisuse { .. } => EgressOutcome::CredentialMisuse,
            _ if status.is_server_error() => EgressOutcome::Failed,
            _ => EgressOutcome::Denied,
        };
        self.reason = Some(error.reason());
        self.denied_by = error.denied_by();
        self.detail = Some(error.to_string());
    }
}

/// Receives every [`EgressEvent`]; the runner's audit log implements it.
/// Called on the proxy's tasks, so it must not block for long.
pub trait EgressAudit: Send + Sync + 'static {
    fn record(&self, event: EgressEvent);
}
