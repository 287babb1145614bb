//! A tool's own Kubernetes identity, handed to its sandbox per call. For a tool with
//! `permissions.kubernetes` the controller creates a ServiceAccount `<tool>-tool` bound to
//! exactly the declared rules and lets the runner `create serviceaccounts/token` for it
//! alone. Each call gets a fresh token of it (TokenRequest: the API server's default
//! audience, the shortest lifetime it grants, bound to the runner's pod so it dies with
//! it), never shared with another call and never the runner's own identity. It reaches the
//! sandbox as `token` (with `namespace` and `ca.crt`) in the standard
//! [`SERVICE_ACCOUNT_DIR`](crate::sandbox::model::SERVICE_ACCOUNT_DIR), a tmpfs of that
//! sandbox alone, and is redacted from that call's output and audit records.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;

use super::redact::{Redactor, RedactorError};
use super::tool::PreparedTool;
use crate::sandbox::model::CallFile;

/// Lifetime asked for each token: the API server's minimum (shorter requests are refused).
pub const TOKEN_SECONDS: i64 = 600;

/// How long a call waits for its token: an API server that does not answer fails the
/// call instead of holding its run slot for the client's own (minutes-long) timeout.
pub const MINT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call got no token of its tool's identity: the call fails, the tool never runs
/// without it.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(
        "spec.permissions.kubernetes needs the tool's own ServiceAccount token, which only \
         `toolwarden runner --tool-service-account` mints (in the pods the controller \
         creates); this runner has no cluster identity to hand out"
    )]
    NoIdentity,
    #[error(
        "the API server refused a token for ServiceAccount {service_account} (HTTP {status}): {message}"
    )]
    Refused {
        service_account: String,
        status: u16,
        message: String,
    },
    #[error("requesting a token for ServiceAccount {service_account} failed: {source}")]
    Unavailable {
        service_account: String,
        source: kube::Error,
    },
    #[error("the API server's answer for ServiceAccount {service_account} holds no token")]
    EmptyToken { service_account: String },
    #[error("no token of the tool's ServiceAccount within {}s", MINT_TIMEOUT.as_secs())]
    TimedOut,
    #[error(transparent)]
    Redactor(#[from] RedactorError),
}

impl MintError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            MintError::NoIdentity => "KubernetesIdentityUnavailable",
            MintError::Refused { status: 403, .. } => "TokenRequestForbidden",
            MintError::Refused { .. } => "TokenRequestRefused",
            MintError::Unavailable { .. } => "TokenRequestFailed",
            MintError::EmptyToken { .. } => "TokenRequestEmpty",
            MintError::TimedOut => "TokenRequestTimedOut",
            MintError::Redactor(e) => e.reason(),
        }
    }
}

/// Future returned by [`TokenMinter::mint`].
pub type MintFuture<'a> = Pin<Box<dyn Future<Output = Result<String, MintError>> + Send + 'a>>;

/// Mints tokens of the tool's ServiceAccount: the seam tests without a cluster fill with a
/// fake.
pub trait TokenMinter: Send + Sync {
    /// A token never handed out before.
    fn mint(&self) -> MintFuture<'_>;
}

/// The pod the tokens are bound to: they are invalid once it is deleted.
#[derive(Clone, Debug)]
pub struct BoundPod {
    pub name: String,
    pub uid: String,
}

/// [`TokenMinter`] through the API server's TokenRequest.
pub struct KubeTokenMinter {
    api: kube::Api<ServiceAccount>,
    service_account: String,
    pod: BoundPod,
}

impl KubeTokenMinter {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        service_account: String,
        pod: BoundPod,
    ) -> KubeTokenMinter {
        KubeTokenMinter {
            api: kube::Api::namespaced(client, namespace),
            service_account,
            pod,
        }
    }
}

impl TokenMinter for KubeTokenMinter {
    fn mint(&self) -> MintFuture<'_> {
        Box::pin(async move {
            let request = TokenRequest {
                spec: TokenRequestSpec {
                    // Empty: the API server's own audience, what in-cluster clients present.
                    audiences: Vec::new(),
                    expiration_seconds: Some(TOKEN_SECONDS),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(self.pod.name.clone()),
                        uid: Some(self.pod.uid.clone()),
                    }),
                },
                ..TokenRequest::default()
            };
            let service_account = &self.service_account;
            let answer = self
                .api
                .create_token_request(service_account, &Default::default(), &request)
                .await
                .map_err(|source| match source {
                    kube::Error::Api(status) if (400..500).contains(&status.code) => {
                        MintError::Refused {
                            service_account: service_account.clone(),
                            status: status.code,
                            message: status.message,
                        }
                    }
                    source => MintError::Unavailable {
                        service_account: service_account.clone(),
                        source,
                    },
                })?;
            match answer.status {
                Some(status) if !status.token.is_empty() => Ok(status.token),
                _ => Err(MintError::EmptyToken {
                    service_account: service_account.clone(),
                }),
            }
        })
    }
}

/// What a runner hands every call of a tool with `permissions.kubernetes`.
pub struct ToolIdentity {
    minter: Arc<dyn TokenMinter>,
    /// The tool's (and the runner's) namespace.
    namespace: String,
    /// The cluster's CA bundle, to check the API server with.
    ca_crt: String,
}

/// One call's identity: its files and the tool's redactor with its token added.
pub struct CallIdentity {
    pub files: Vec<CallFile>,
    pub redactor: Redactor,
}

impl ToolIdentity {
    pub fn new(minter: Arc<dyn TokenMinter>, namespace: String, ca_crt: String) -> ToolIdentity {
        ToolIdentity {
            minter,
            namespace,
            ca_crt,
        }
    }

    /// `tool`'s identity for one call: `None` for a tool without `permissions.kubernetes`.
    pub async fn for_call(
        identity: Option<&ToolIdentity>,
        tool: &PreparedTool,
    ) -> Result<Option<CallIdentity>, MintError> {
        if tool.spec.permissions.kubernetes.is_empty() {
            return Ok(None);
        }
        let identity = identity.ok_or(MintError::NoIdentity)?;
        let token = tokio::time::timeout(MINT_TIMEOUT, identity.minter.mint())
            .await
            .map_err(|_| MintError::TimedOut)??;
        let redactor = tool.redactor.with_call_secrets(token_needles(&token))?;
        let file = |name: &str, contents: String| CallFile {
            name: name.into(),
            contents,
        };
        Ok(Some(CallIdentity {
            files: vec![
                file("token", token),
                file("namespace", identity.namespace.clone()),
                file("ca.crt", identity.ca_crt.clone()),
            ],
            redactor,
        }))
    }
}

/// What is redacted of a token: all of it, and its signature alone. A JWT's header and
/// claims are not secret, its signature is what makes it usable: printed in pieces, the
/// token cannot be put back together from the output.
fn token_needles(token: &str) -> Vec<Vec<u8>> {
    let mut needles = vec![token.as_bytes().to_vec()];
    if let Some((_, signature)) = token.rsplit_once('.')
        && signature.len() >= 16
    {
        needles.push(signature.as_bytes().to_vec());
    }
    needles
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    /// A client whose every request gets `status` and `answer`; the requests seen come
    /// back through the channel.
    fn api_server(
        status: u16,
        answer: Value,
    ) -> (
        kube::Client,
        tokio::sync::mpsc::UnboundedReceiver<(String, String, Value)>,
    ) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (seen, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().to_string();
                let uri = request.uri().to_string();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let _ = seen.send((method, uri, body));
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        (kube::Client::new(service, "agents"), requests)
    }

    fn minter(client: kube::Client) -> KubeTokenMinter {
        KubeTokenMinter::new(
            client,
            "agents",
            "lister-tool".into(),
            BoundPod {
                name: "lister-6d9f-abcde".into(),
                uid: "0f6c2f8e-1111-2222-3333-444455556666".into(),
            },
        )
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
               "reason": reason, "message": format!("{reason}: no")})
    }

    #[tokio::test]
    async fn a_token_request_names_the_tool_account_the_minimal_expiry_and_the_runner_pod() {
        let answer = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["https://kubernetes.default.svc"]},
            "status": {"token": "eyJh.eyJz.c2lnbmF0dXJl", "expirationTimestamp": "2026-12-01T21:00:00Z"}});
        let (client, mut requests) = api_server(201, answer);
        let token = minter(client).mint().await.unwrap();
        assert_eq!(token, "eyJh.eyJz.c2lnbmF0dXJl");
        let (method, uri, body) = requests.recv().await.unwrap();
        assert_eq!(method, "POST");
        assert_eq!(
            uri,
            "/api/v1/namespaces/agents/serviceaccounts/lister-tool/token?"
        );
        let spec = &body["spec"];
        assert_eq!(spec["expirationSeconds"], 600);
        assert_eq!(
            spec["boundObjectRef"],
            json!({"apiVersion": "v1", "kind": "Pod", "name": "lister-6d9f-abcde",
                   "uid": "0f6c2f8e-1111-2222-3333-444455556666"})
        );
        // No audience of our own: the API server's default, which it alone accepts.
        assert!(
            spec.get("audiences")
                .is_none_or(|a| a.as_array().is_some_and(Vec::is_empty)),
            "{spec}"
        );
    }

    #[tokio::test]
    async fn refusals_and_failures_of_the_api_server_are_typed() {
        let (client, _requests) = api_server(403, status(403, "Forbidden"));
        let err = minter(client).mint().await.unwrap_err();
        assert_eq!(err.reason(), "TokenRequestForbidden");
        assert!(err.to_string().contains("lister-tool"), "{err}");
        assert!(err.to_string().contains("HTTP 403"), "{err}");
        let (client, _requests) = api_server(404, status(404, "NotFound"));
        assert_eq!(
            minter(client).mint().await.unwrap_err().reason(),
            "TokenRequestRefused"
        );
        let (client, _requests) = api_server(500, status(500, "InternalError"));
        let err = minter(client).mint().await.unwrap_err();
        assert_eq!(err.reason(), "TokenRequestFailed");
        assert!(matches!(err, MintError::Unavailable { .. }), "{err:?}");
        let (client, _requests) = api_server(201, json!({"spec": {"audiences": []}}));
        assert_eq!(
            minter(client).mint().await.unwrap_err().reason(),
            "TokenRequestEmpty"
        );
    }

    /// An API server that never answers: the call fails at the deadline.
    struct Hanging;

    impl TokenMinter for Hanging {
        fn mint(&self) -> MintFuture<'_> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_request_that_never_returns_fails_the_call_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lister.yaml"), crate::runner::fake::LISTER).unwrap();
        let registry = crate::runner::registry::Registry::new(
            crate::runner::ratelimit::LimiterClock::manual(),
            crate::runner::tool::SecretsDir(None),
        );
        registry.load(&crate::runner::registry::manifest_files(dir.path()).unwrap());
        let tool = registry.snapshot().values().next().unwrap().clone();
        let identity = ToolIdentity::new(Arc::new(Hanging), "agents".into(), String::new());
        let started = tokio::time::Instant::now();
        let err = ToolIdentity::for_call(Some(&identity), &tool)
            .await
            .err()
            .expect("no identity from a hanging API server");
        assert_eq!(err.reason(), "TokenRequestTimedOut");
        assert_eq!(started.elapsed(), MINT_TIMEOUT);
    }

    #[test]
    fn a_token_is_redacted_whole_and_by_its_signature() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg";
        let redactor = Redactor::default()
            .with_call_secrets(token_needles(token))
            .unwrap();
        let (header, rest) = token.split_once('.').unwrap();
        let printed = format!("{token}\n{header} {rest}\n");
        let out = redactor.redact_str(&printed);
        assert!(!out.contains("c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"), "{out}");
        assert!(out.starts_with("[REDACTED]\n"), "{out}");
    }

    /// The pipeline with a fake minter and executor: what a call of a tool with an
    /// identity gets, and what is left of its token in the answer and the records.
    mod calls {
        use std::sync::Arc;
        use std::sync::atomic::Ordering;

        use serde_json::{Value, json};

        use crate::runner::executor::ExecOutcome;
        use crate::runner::fake::{FAKE_CA, FORECAST, FakeMinter, LISTER, TOKEN, TestRunner};
        use crate::runner::pipeline::{Called, Success};
        use crate::runner::problem::{Problem, ProblemKind};
        use crate::runner::tool::SecretDelivery;

        /// Alice's call of `tool`.
        async fn call(t: &TestRunner, tool: &str, input: &Value) -> Result<Success, Problem> {
            let ctx = TestRunner::context(Some(&format!("Bearer {TOKEN}")));
            let body = std::future::ready(Ok(bytes::Bytes::from(input.to_string())));
            match t.runner.invoke(&ctx, tool, body).await? {
                Called::Ran(success) => Ok(success),
                Called::AwaitingApproval(pending) => panic!("awaits approval: {pending:?}"),
            }
        }

        /// The files a run of a tool with a Kubernetes identity was handed.
        fn call_files(run: &crate::runner::fake::Run) -> Vec<(String, String)> {
            (run.secrets.iter())
                .filter_map(|s| match s {
                    SecretDelivery::CallFile(f) => Some((f.name.clone(), f.contents.clone())),
                    _ => None,
                })
                .collect()
        }

        #[tokio::test]
        async fn each_call_gets_its_own_token_and_a_printed_token_is_redacted_everywhere() {
            let minter = Arc::new(FakeMinter::default());
            let t = TestRunner::new(&[LISTER], &[]).with_minter(minter.clone());
            let token = FakeMinter::token(1);
            let (claims, signature) = token.split_once('.').unwrap().1.split_once('.').unwrap();
            let escaped: String = token
                .chars()
                .map(|c| format!("\\u{:04x}", c as u32))
                .collect();
            // The tool prints its token raw, JSON-escaped, as a key, and its signature alone.
            t.executor.answers(Ok(ExecOutcome {
                exit_code: Some(0),
                stdout: format!(
                    r#"{{"raw": "{token}", "escaped": "{escaped}", "{token}": 1, "sig": "{signature}", "claims": "{claims}"}}"#
                )
                .into_bytes(),
                stderr: format!("debug: Authorization: Bearer {token}").into_bytes(),
                ..ExecOutcome::default()
            }));
            let success = call(&t, "lister", &json!({})).await.unwrap();
            let output = success.output.get();
            assert!(!output.contains(signature), "{output}");
            let output: Value = serde_json::from_str(output).unwrap();
            assert_eq!(output["raw"], "[REDACTED]");
            assert_eq!(output["escaped"], "[REDACTED]");
            assert_eq!(output["sig"], "[REDACTED]");
            assert_eq!(output["[REDACTED]"], 1);
            let finished = t.records().pop().unwrap();
            assert_eq!(
                finished["stderr"],
                "debug: Authorization: Bearer [REDACTED]"
            );
            let log = serde_json::to_string(&t.records()).unwrap();
            assert!(!log.contains(signature), "{log}");
            // The token reached the run, with the namespace and the cluster's CA.
            let runs = t.executor.runs();
            assert_eq!(
                call_files(&runs[0]),
                [
                    ("token".to_string(), token.clone()),
                    ("namespace".to_string(), "agents".to_string()),
                    ("ca.crt".to_string(), FAKE_CA.to_string()),
                ]
            );
            // The next call mints another token; the first is nothing special to it any more
            // (only this call's token is its secret), and the second is redacted in its turn.
            t.executor.prints(&FakeMinter::token(2));
            let second = call(&t, "lister", &json!({})).await.unwrap();
            assert_eq!(second.output.get(), r#""[REDACTED]""#);
            let runs = t.executor.runs();
            assert_eq!(
                call_files(&runs[1])[0],
                ("token".into(), FakeMinter::token(2))
            );
            assert_ne!(FakeMinter::token(1), FakeMinter::token(2));
            assert_eq!(minter.minted(), 2);
        }

        #[tokio::test]
        async fn a_tool_whose_token_cannot_be_minted_never_runs_and_the_failure_is_audited() {
            let minter = Arc::new(FakeMinter::default());
            minter.forbidden.store(true, Ordering::SeqCst);
            let t = TestRunner::new(&[LISTER], &[]).with_minter(minter);
            let problem = call(&t, "lister", &json!({})).await.unwrap_err();
            assert_eq!(problem.kind, ProblemKind::ToolFailed);
            assert!(problem.invocation_id.is_some());
            assert!(t.executor.runs().is_empty(), "it ran without its token");
            let failed = t.records().pop().unwrap();
            assert_eq!(failed["event"], "failed");
            assert_eq!(failed["reason"], "TokenRequestForbidden");
            assert!(
                failed["error"].as_str().unwrap().contains("HTTP 403"),
                "{failed}"
            );
            // A runner that mints nothing (serve) runs it never either.
            let t = TestRunner::new(&[LISTER], &[]);
            call(&t, "lister", &json!({})).await.unwrap_err();
            assert!(t.executor.runs().is_empty());
            assert_eq!(
                t.records().pop().unwrap()["reason"],
                "KubernetesIdentityUnavailable"
            );
        }

        #[tokio::test]
        async fn a_runner_that_mints_no_tokens_does_not_serve_a_tool_with_kubernetes_rules() {
            let t = TestRunner::new(&[LISTER, FORECAST], &[]);
            crate::runner::reload::prepare_executor(&t.runner).await;
            let served: Vec<String> = t.runner.registry.snapshot().keys().cloned().collect();
            assert_eq!(served, ["forecast"]);
            let t = TestRunner::new(&[LISTER, FORECAST], &[])
                .with_minter(Arc::new(FakeMinter::default()));
            crate::runner::reload::prepare_executor(&t.runner).await;
            assert_eq!(t.runner.registry.snapshot().len(), 2);
        }
    }
}
