//! Test seam: a [`ToolExecutor`] with canned outcomes that records what each
//! run was given, and a [`Runner`] around it whose audit records stay in
//! memory. The whole pipeline runs as ordinary unit tests: no root, no sandbox.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::admission::Admission;
use super::audit::{AuditKey, AuditLog};
use super::auth::Authenticator;
use super::executor::{ExecError, ExecFuture, ExecOutcome, ToolExecutor};
use super::kube_identity::{MintError, MintFuture, TokenMinter, ToolIdentity};
use super::pipeline::{CallContext, Runner};
use super::ratelimit::LimiterClock;
use super::registry::{Registry, manifest_files};
use super::tool::{PreparedTool, SecretDelivery, SecretsDir};
use super::watch::Watch;

/// What one run was given.
#[derive(Clone, Debug)]
pub struct Run {
    pub tool: String,
    pub stdin: Value,
    pub secrets: Vec<SecretDelivery>,
}

/// Answers each run with the next canned result; a run with none left is an
/// [`ExecError::Spawn`], so a test that did not expect a run sees one.
#[derive(Default)]
pub struct FakeExecutor {
    canned: Mutex<VecDeque<Result<ExecOutcome, ExecError>>>,
    runs: Mutex<Vec<Run>>,
    /// How long each run takes.
    delay: Mutex<Duration>,
}

impl FakeExecutor {
    /// The next run exits 0 and prints `stdout`.
    pub fn prints(&self, stdout: &str) {
        self.answers(Ok(ExecOutcome {
            exit_code: Some(0),
            stdout: stdout.as_bytes().to_vec(),
            ..ExecOutcome::default()
        }));
    }

    pub fn answers(&self, result: Result<ExecOutcome, ExecError>) {
        self.canned.lock().unwrap().push_back(result);
    }

    pub fn delay(&self, each_run: Duration) {
        *self.delay.lock().unwrap() = each_run;
    }

    pub fn runs(&self) -> Vec<Run> {
        self.runs.lock().unwrap().clone()
    }
}

impl ToolExecutor for FakeExecutor {
    fn execute<'a>(
        &'a self,
        tool: &'a PreparedTool,
        stdin: Vec<u8>,
        secrets: Vec<SecretDelivery>,
    ) -> ExecFuture<'a> {
        self.runs.lock().unwrap().push(Run {
            tool: tool.name.clone(),
            stdin: serde_json::from_slice(&stdin).expect("the pipeline hands the tool JSON"),
            secrets,
        });
        let next = self.canned.lock().unwrap().pop_front();
        let delay = *self.delay.lock().unwrap();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            next.unwrap_or_else(|| {
                Err(ExecError::Spawn(std::io::Error::other(
                    "no canned outcome left",
                )))
            })
        })
    }

    fn isolation(&self) -> String {
        "fake executor (tests)".into()
    }
}

/// Mints [`FakeMinter::token`]`(1)`, `(2)`, ... in turn, or refuses every request
/// like an API server that forbids it.
#[derive(Default)]
pub struct FakeMinter {
    minted: AtomicUsize,
    pub forbidden: AtomicBool,
}

impl FakeMinter {
    /// The `n`th token (from 1): JWT-shaped, each one different.
    pub fn token(n: usize) -> String {
        format!("eyJhbGciOiJSUzI1NiJ9.eyJjYWxsIjoi{n}In0.c2lnbmF0dXJlLW9mLWNhbGwt{n}-tail")
    }

    /// How many tokens were minted.
    pub fn minted(&self) -> usize {
        self.minted.load(Ordering::SeqCst)
    }
}

impl TokenMinter for FakeMinter {
    fn mint(&self) -> MintFuture<'_> {
        let result = if self.forbidden.load(Ordering::SeqCst) {
            Err(MintError::Refused {
                service_account: "lister-tool".into(),
                status: 403,
                message: "serviceaccounts \"lister-tool\" is forbidden".into(),
            })
        } else {
            Ok(FakeMinter::token(
                self.minted.fetch_add(1, Ordering::SeqCst) + 1,
            ))
        };
        Box::pin(std::future::ready(result))
    }
}

/// An audit sink the test can read back, and break.
#[derive(Clone, Default)]
struct Captured {
    bytes: Arc<Mutex<Vec<u8>>>,
    broken: Arc<AtomicBool>,
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("the audit disk is gone"));
        }
        self.bytes.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The bearer token [`TestRunner`] accepts, for subject `alice` in group `devs`.
pub const TOKEN: &str = "test-token-of-alice";

/// A runner over the manifests in a folder of its own, with [`FakeExecutor`].
pub struct TestRunner {
    pub runner: Arc<Runner>,
    pub executor: Arc<FakeExecutor>,
    pub dir: tempfile::TempDir,
    audit: Captured,
}

impl TestRunner {
    /// Serves `manifests` (each written as its own `*.yaml`); `secrets` are
    /// `(secret/key, value)` files under `dir/secrets`.
    pub fn new(manifests: &[&str], secrets: &[(&str, &str)]) -> TestRunner {
        let dir = tempfile::tempdir().unwrap();
        for (i, manifest) in manifests.iter().enumerate() {
            std::fs::write(dir.path().join(format!("tool-{i}.yaml")), manifest).unwrap();
        }
        let secrets_dir = dir.path().join("secrets");
        for (path, value) in secrets {
            let file = secrets_dir.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, value).unwrap();
        }
        TestRunner::serving(dir, Some(secrets_dir))
    }

    /// Serves the manifests already in `dir`.
    pub fn serving(dir: tempfile::TempDir, secrets: Option<PathBuf>) -> TestRunner {
        TestRunner::watched(dir, secrets, Watch::default())
    }

    /// [`serving`](Self::serving) with the watching stages' settings and state.
    pub fn watched(dir: tempfile::TempDir, secrets: Option<PathBuf>, watch: Watch) -> TestRunner {
        let registry = Registry::new(LimiterClock::manual(), SecretsDir(secrets));
        let report = registry.load(&manifest_files(dir.path()).unwrap());
        assert!(
            report.errors.is_empty() && report.refused.is_empty(),
            "{report:?}"
        );
        let audit = Captured::default();
        let key = AuditKey::new(&[7; 32]).unwrap();
        let executor = Arc::new(FakeExecutor::default());
        let hash = hex::encode(Sha256::digest(TOKEN));
        let auth = Authenticator {
            tokens: [(hash, ("alice".to_string(), vec!["devs".to_string()]))].into(),
            ..Authenticator::default()
        };
        let runner = Arc::new(Runner {
            // One run of a tool at a time, a short queue: admission is testable.
            admission: Admission::new(1, Duration::from_millis(50)),
            watch,
            ..Runner::new(
                Arc::new(registry),
                auth,
                AuditLog::to_writer(Box::new(audit.clone()), "memory", key),
                executor.clone(),
            )
        });
        TestRunner {
            runner,
            executor,
            dir,
            audit,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Mints tokens with `minter` for the tools with `permissions.kubernetes`, in
    /// namespace `agents`.
    pub fn with_minter(mut self, minter: Arc<FakeMinter>) -> TestRunner {
        let identity = ToolIdentity::new(minter, "agents".into(), FAKE_CA.into());
        Arc::get_mut(&mut self.runner)
            .expect("the runner is not shared yet")
            .tool_identity = Some(Arc::new(identity));
        self
    }

    /// A REST call's context with `authorization` as the header.
    pub fn context(authorization: Option<&str>) -> CallContext {
        CallContext {
            transport: "rest",
            client_ip: Some("127.0.0.1".into()),
            user_agent: Some("unit-test".into()),
            authorization: authorization.map(String::from),
            ..CallContext::default()
        }
    }

    /// From now on, every write to the audit log fails.
    pub fn break_audit(&self) {
        self.audit.broken.store(true, Ordering::Relaxed);
    }

    /// Every call record written so far (checkpoints left out).
    pub fn records(&self) -> Vec<Value> {
        let bytes = self.audit.bytes.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r.get("invocationId").is_some())
            .collect()
    }
}

/// The cluster CA [`TestRunner::with_minter`] hands out.
pub const FAKE_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIfake\n-----END CERTIFICATE-----\n";

/// A tool with its own Kubernetes identity (it may list pods).
pub const LISTER: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: lister}
spec:
  description: Lists the pods of its namespace
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  runtime: {image: "busybox:1.36.1", command: [/bin/lister]}
  permissions:
    kubernetes:
      - {apiGroups: [""], resources: [pods], verbs: [get, list]}
"#;

/// The secret [`NOTES`] gets as `API_TOKEN`.
pub const NOTES_SECRET: &str = "s3cr3t-token-value";

/// A tool with every check: a schema, a sanitized field, an authorization
/// rule, approval for writes, a rate limit, an env secret, a redacted field.
pub const NOTES: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: notes}
spec:
  description: Reads and writes notes
  risk: medium
  maxInputBytes: 1024
  inputSchema:
    type: object
    additionalProperties: false
    required: [operation, name]
    properties:
      operation: {type: string, enum: [read, write]}
      name: {type: string, pattern: "^[a-z]{1,16}$"}
      text: {type: string, maxLength: 256}
  sanitize:
    - field: /text
      transforms: [stripControlChars]
  authorization:
    - expression: 'input.name != "private"'
      message: Access denied
  approval:
    required: true
    when: 'input.operation == "write"'
    approvers: {groups: [admins]}
  runtime: {image: "busybox:1.36.1", command: [/bin/notes]}
  sandbox: {timeoutMs: 1000, maxOutputBytes: 200}
  rateLimit: {requestsPerMinute: 4}
  secrets:
    - {secretName: api, key: token, env: API_TOKEN}
  audit: {input: redacted, redact: [/text]}
"#;

/// A tool that promises `{"weather": string, "celsius": number}` and nothing else.
pub const FORECAST: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: forecast}
spec:
  description: Tomorrow's weather
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  outputSchema:
    type: object
    additionalProperties: false
    required: [weather, celsius]
    properties:
      weather: {type: string, maxLength: 64}
      celsius: {type: number}
  runtime: {image: "busybox:1.36.1", command: [/bin/forecast]}
"#;

impl TestRunner {
    /// Serves [`NOTES`] with its secret.
    pub fn notes() -> TestRunner {
        TestRunner::new(&[NOTES], &[("api/token", NOTES_SECRET)])
    }
}
