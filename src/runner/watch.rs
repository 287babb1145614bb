//! What the pipeline needs to watch calls rather than shape them (README
//! "Guards, anomaly scoring and IP allow-lists"): the client address behind
//! trusted proxies and the runner-wide allow-list, per-caller anomaly
//! baselines, the content guards of a document (in-process ones, then the
//! `http` classifiers), and resource alerts. The pipeline decides what each
//! result means for the call and audits it.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{Value, json};

use super::executor::ExecOutcome;
use super::tool::PreparedTool;
use crate::api::AnomalySpec;
use crate::guards::anomaly::{AnomalyDetector, AnomalyError, Assessment, Call, SystemClock};
use crate::guards::client_addr::{IpAllowList, TrustedProxies, client_address};
use crate::guards::{Finding, GuardAction, GuardKind, GuardOutcome, GuardSet, HttpGuard};

/// Most strings one `http` guard posts for one document (a pointer with `*`
/// over a long array would otherwise fan out into a request per item).
const MAX_CLASSIFIER_REQUESTS: usize = 32;
/// Longest classifier answer read.
const MAX_VERDICT_BYTES: usize = 16 * 1024;
/// The rule recorded when a classifier gives no usable verdict.
const CLASSIFIER_UNAVAILABLE: &str = "classifierUnavailable";

/// Runner-wide state and settings of the watching stages.
pub struct Watch {
    /// Proxies whose forwarding header names the client (`--trusted-proxies`).
    pub trusted_proxies: TrustedProxies,
    /// `--ip-allow-list`: every request but the probes comes from it.
    pub allow_list: IpAllowList,
    anomaly: Mutex<AnomalyDetector>,
    /// Baselines changed since they were last saved.
    unsaved: AtomicBool,
    /// Built on the first `http` guard's call (it reads the system's roots).
    classifier: OnceLock<ClassifierClient>,
}

impl Default for Watch {
    fn default() -> Self {
        Watch::new(
            TrustedProxies::default(),
            IpAllowList::default(),
            AnomalyDetector::new(Arc::new(SystemClock)),
        )
    }
}

impl Watch {
    pub fn new(
        trusted_proxies: TrustedProxies,
        allow_list: IpAllowList,
        anomaly: AnomalyDetector,
    ) -> Watch {
        Watch {
            trusted_proxies,
            allow_list,
            anomaly: Mutex::new(anomaly),
            unsaved: AtomicBool::new(false),
            classifier: OnceLock::new(),
        }
    }

    /// The client behind a connection from `peer`: the peer itself, or what
    /// a trusted proxy's forwarding header in `headers` says.
    pub fn client_address(&self, peer: Option<&str>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer: IpAddr = peer?.parse().ok()?;
        Some(client_address(peer, headers, &self.trusted_proxies))
    }

    /// Scores a call of `caller` and learns from it unless it is refused.
    pub fn assess(&self, caller: &str, call: &Call, spec: &AnomalySpec) -> Assessment {
        let assessment = self.detector().assess(caller, call, spec);
        self.unsaved.store(true, Ordering::Release);
        assessment
    }

    /// Records how a scored call ended (the baseline's error rate).
    pub fn record_outcome(&self, caller: &str, ok: bool) {
        self.detector().record_outcome(caller, ok);
        self.unsaved.store(true, Ordering::Release);
    }

    /// Saves the baselines if they changed since the last save.
    pub fn save_baselines(&self) -> Result<(), AnomalyError> {
        if !self.unsaved.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let snapshot = self.detector().snapshot();
        snapshot.write().inspect_err(|_| {
            self.unsaved.store(true, Ordering::Release);
        })
    }

    fn detector(&self) -> std::sync::MutexGuard<'_, AnomalyDetector> {
        // A panic while holding the lock leaves plain counters: still usable.
        self.anomaly
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every guard of `guards` over `document`: the in-process ones, then,
    /// unless they refused already, the `http` classifiers (on the redacted
    /// document, so what a `redact` guard removed is not sent anywhere).
    pub async fn check(&self, guards: &GuardSet, document: &Value) -> GuardOutcome {
        let mut outcome = guards.apply(document);
        if outcome.refused || guards.http_guards().next().is_none() {
            return outcome;
        }
        let checked = outcome.redacted.as_ref().unwrap_or(document);
        let asks = guards
            .http_guards()
            .flat_map(|(index, options, action, fields)| {
                covered(checked, fields)
                    .into_iter()
                    .take(MAX_CLASSIFIER_REQUESTS)
                    .map(move |(pointer, value)| self.ask(index, options, action, pointer, value))
            });
        let findings: Vec<Finding> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        outcome.refused = findings.iter().any(|f| f.action == GuardAction::Refuse);
        outcome.findings.extend(findings);
        if outcome.refused {
            outcome.redacted = None;
        }
        outcome
    }

    /// One classifier verdict on one field; `None` when it allows.
    async fn ask(
        &self,
        index: usize,
        options: &HttpGuard,
        action: GuardAction,
        pointer: String,
        value: &Value,
    ) -> Option<Finding> {
        let text = match value {
            Value::String(text) => Cow::Borrowed(text.as_str()),
            other => Cow::Owned(other.to_string()),
        };
        let finding = |rule: Cow<'static, str>, action| Finding {
            guard: GuardKind::Http,
            guard_index: index,
            rule,
            pointer: pointer.clone(),
            action,
            in_key: false,
            span: None,
        };
        match self.verdict(options, &pointer, &text).await {
            Ok(Verdict::Allow) => None,
            Ok(Verdict::Deny(rule)) => Some(finding(Cow::Owned(rule), action)),
            Err(error) => {
                tracing::warn!(endpoint = %options.endpoint, guard = index, %error,
                               fail_open = options.fail_open, "guard classifier gave no verdict");
                let action = if options.fail_open {
                    GuardAction::Flag
                } else {
                    GuardAction::Refuse
                };
                Some(finding(Cow::Borrowed(CLASSIFIER_UNAVAILABLE), action))
            }
        }
    }

    async fn verdict(
        &self,
        options: &HttpGuard,
        pointer: &str,
        text: &str,
    ) -> Result<Verdict, ClassifierError> {
        let client = self.classifier.get_or_init(classifier_client);
        let ask = async {
            let body = json!({"pointer": pointer, "text": text}).to_string();
            let request = axum::http::Request::post(options.endpoint.as_str())
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| ClassifierError::Endpoint(e.to_string()))?;
            let response = client.request(request).await?;
            if !response.status().is_success() {
                return Err(ClassifierError::Status(response.status().as_u16()));
            }
            let body = Limited::new(response.into_body(), MAX_VERDICT_BYTES)
                .collect()
                .await
                .map_err(|_| ClassifierError::TooLarge)?
                .to_bytes();
            Verdict::parse(&body)
        };
        let timeout = Duration::from_millis(u64::from(options.timeout_ms));
        tokio::time::timeout(timeout, ask)
            .await
            .map_err(|_| ClassifierError::Timeout(options.timeout_ms))?
    }
}

/// A classifier's answer: `{"verdict": "allow" | "deny", "rule": "..."}`.
#[derive(Debug, PartialEq)]
enum Verdict {
    Allow,
    /// With the classifier's rule name (`deny` when it gives none or an unusable one).
    Deny(String),
}

impl Verdict {
    fn parse(body: &[u8]) -> Result<Verdict, ClassifierError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            verdict: String,
            #[serde(default)]
            rule: Option<String>,
        }
        let answer: Answer =
            serde_json::from_slice(body).map_err(|e| ClassifierError::Malformed(e.to_string()))?;
        match answer.verdict.as_str() {
            "allow" => Ok(Verdict::Allow),
            "deny" => {
                // The rule goes into the audit log: a name, not whatever the service echoes.
                let rule = answer
                    .rule
                    .filter(|r| {
                        (1..=64).contains(&r.len())
                            && r.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    })
                    .unwrap_or_else(|| "deny".into());
                Ok(Verdict::Deny(rule))
            }
            other => Err(ClassifierError::Malformed(format!(
                "verdict {other:?} is neither allow nor deny"
            ))),
        }
    }
}

/// Why a classifier gave no verdict.
#[derive(Debug, thiserror::Error)]
enum ClassifierError {
    #[error("no answer within {0} ms")]
    Timeout(u32),
    #[error("{0}")]
    Http(#[from] hyper_util::client::legacy::Error),
    #[error("endpoint: {0}")]
    Endpoint(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("answer unreadable or larger than {MAX_VERDICT_BYTES} bytes")]
    TooLarge,
    #[error("answer is not a verdict: {0}")]
    Malformed(String),
}

type ClassifierClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// The client classifiers are asked with: pooled connections, HTTP/1.1,
/// TLS with the system's roots (ring, as elsewhere). Redirects are not
/// followed: a verdict comes from the configured endpoint.
fn classifier_client() -> ClassifierClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// The values `fields` point at in `document`, with their JSON pointers
/// (`*` matches any one key or index); empty `fields` is the whole document.
fn covered<'v>(document: &'v Value, fields: &[String]) -> Vec<(String, &'v Value)> {
    if fields.is_empty() {
        return vec![(String::new(), document)];
    }
    let mut out = Vec::new();
    for field in fields {
        let segments: Vec<String> = field
            .split('/')
            .skip(1)
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        select(document, &segments, String::new(), &mut out);
    }
    out
}

fn select<'v>(
    value: &'v Value,
    segments: &[String],
    at: String,
    out: &mut Vec<(String, &'v Value)>,
) {
    let Some((first, rest)) = segments.split_first() else {
        out.push((at, value));
        return;
    };
    let escaped = |key: &str| format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
    match value {
        Value::Object(members) if first == "*" => {
            for (key, member) in members {
                select(member, rest, escaped(key), out);
            }
        }
        Value::Object(members) => {
            if let Some(member) = members.get(first) {
                select(member, rest, escaped(first), out);
            }
        }
        Value::Array(items) if first == "*" => {
            for (i, item) in items.iter().enumerate() {
                select(item, rest, format!("{at}/{i}"), out);
            }
        }
        Value::Array(items) => {
            if let Some(item) = first.parse::<usize>().ok().and_then(|i| items.get(i)) {
                select(item, rest, format!("{at}/{first}"), out);
            }
        }
        _ => {}
    }
}

/// `alerts` the run crossed: `(kind, record fields)`, kind `duration` or `memory`. Pure.
pub fn alerts(tool: &PreparedTool, outcome: &ExecOutcome) -> Vec<(&'static str, Value)> {
    let mut crossed = Vec::new();
    let duration_ms = outcome.duration.as_millis() as u64;
    if let Some(limit) = tool.spec.alerts.as_ref().and_then(|a| a.duration_ms)
        && duration_ms > u64::from(limit)
    {
        crossed.push((
            "duration",
            json!({"kind": "duration", "durationMs": duration_ms, "limitMs": limit}),
        ));
    }
    if let (Some(limit), Some(peak)) = (tool.memory_alert_bytes, outcome.peak_memory_bytes)
        && peak > limit
    {
        crossed.push((
            "memory",
            json!({"kind": "memory", "peakMemoryBytes": peak, "limitBytes": limit}),
        ));
    }
    crossed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_select_values_with_their_pointers() {
        let doc = json!({"a/b": {"x": 1}, "items": [{"note": "n0"}, {"note": "n1"}], "s": "t"});
        let pointers = |fields: &[&str]| -> Vec<String> {
            let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
            covered(&doc, &fields).into_iter().map(|(p, _)| p).collect()
        };
        assert_eq!(pointers(&[]), [""]);
        assert_eq!(
            pointers(&["/items/*/note"]),
            ["/items/0/note", "/items/1/note"]
        );
        assert_eq!(pointers(&["/a~1b/x", "/s", "/missing"]), ["/a~1b/x", "/s"]);
        assert_eq!(pointers(&["/items/1"]), ["/items/1"]);
    }

    #[test]
    fn verdicts_are_read_strictly() {
        assert_eq!(
            Verdict::parse(br#"{"verdict":"allow"}"#).unwrap(),
            Verdict::Allow
        );
        assert_eq!(
            Verdict::parse(br#"{"verdict":"deny","rule":"toxicity"}"#).unwrap(),
            Verdict::Deny("toxicity".into())
        );
        // A rule that is not a plain name is not copied into the audit log.
        assert_eq!(
            Verdict::parse(br#"{"verdict":"deny","rule":"<script>\n"}"#).unwrap(),
            Verdict::Deny("deny".into())
        );
        for bad in [&br#"{"verdict":"maybe"}"#[..], b"yes", br#"{"rule":"x"}"#] {
            assert!(Verdict::parse(bad).is_err());
        }
    }
}
