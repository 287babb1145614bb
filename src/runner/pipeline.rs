//! One call, start to finish: every check of the security checklist, each
//! step audited, then the run. REST and MCP both call [`Runner::invoke`].
//!
//! Order: authenticate, rate limit, size and shape, validate, sanitize,
//! authorize, approval gate, run, redact. Rate limiting comes right after
//! authentication so floods are turned away before any parsing. Authorization
//! runs on the sanitized input, the exact input the tool receives: checking
//! the raw input would let a transform turn an approved value into a forbidden
//! one (e.g. `.\u0000.` passes `!input.path.contains("..")`, then
//! stripControlChars makes it `..`).

use std::sync::Arc;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::audit::{AuditFailed, AuditLog};
use super::auth::{Authenticator, Caller};
use super::authorize::{authorize, holds};
use super::executor::{ExecOutcome, ToolExecutor};
use super::limits::parse_input;
use super::metrics::Metrics;
use super::problem::{Problem, ProblemKind};
use super::redact::{redact_fields, redact_secrets};
use super::registry::{PreparedTool, Registry};
use super::sandbox_executor::enforcement_pairs;
use super::sanitize::sanitize;
use super::validate::validate;
use crate::api::AuditLevel;

/// Bytes of a failed tool's stderr kept in the audit record.
const AUDIT_STDERR_BYTES: usize = 4096;

/// Everything the runner needs; shared by every connection.
pub struct Runner {
    pub registry: Arc<Registry>,
    pub auth: Authenticator,
    pub audit: AuditLog,
    pub executor: Arc<dyn ToolExecutor>,
    pub metrics: Metrics,
}

/// Who is asking, as the transport saw it.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    pub transport: &'static str,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub authorization: Option<String>,
}

/// A successful call.
#[derive(Clone, Debug, PartialEq)]
pub struct Success {
    pub invocation_id: String,
    /// The tool's JSON, or its text when it is not JSON.
    pub output: Value,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub output_truncated: bool,
}

/// The audit trail of one call: every record carries the same correlation fields.
struct Trail {
    log: AuditLog,
    base: Map<String, Value>,
}

impl Trail {
    fn record(&self, event: &str, fields: Value) -> Result<(), Problem> {
        let mut record = Map::new();
        record.insert("event".into(), event.into());
        record.extend(self.base.clone());
        if let Value::Object(fields) = fields {
            record.extend(fields);
        }
        self.log.append(record).map_err(audit_problem)
    }

    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.base.insert(key.into(), value.into());
    }

    /// Records the refusal (with every field error) and hands back the problem.
    fn deny(&self, stage: &str, reason: &str, mut problem: Problem) -> Problem {
        let mut fields = json!({"stage": stage, "reason": reason,
                                "status": problem.kind.status().as_u16(), "problem": problem.kind.slug()});
        if !problem.errors.is_empty() {
            fields["errors"] = json!(problem.errors);
        }
        if let Err(audit) = self.record("denied", fields) {
            return audit;
        }
        problem.invocation_id = self
            .base
            .get("invocationId")
            .and_then(Value::as_str)
            .map(String::from);
        problem
    }
}

fn audit_problem(e: AuditFailed) -> Problem {
    // The log itself reports each change of its health; this is per call.
    tracing::debug!("{e}; refusing the call");
    Problem::new(
        ProblemKind::AuditUnavailable,
        "calls are refused because the audit log cannot be written",
    )
}

/// `sha256:<hex>` of the input's JSON text (keys sorted by serde_json's map).
pub fn input_digest(input: &Value) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(input.to_string().as_bytes()))
    )
}

/// How the input appears in the audit record, per the tool's `audit` spec. Pure.
pub fn audited_input(tool: &PreparedTool, input: &Value) -> Value {
    let digest = input_digest(input);
    match tool.spec.audit.input {
        AuditLevel::None => json!({}),
        AuditLevel::Digest => json!({"inputDigest": digest}),
        AuditLevel::Redacted => {
            json!({"inputDigest": digest, "input": redact_fields(input, &tool.spec.audit.redact)})
        }
        AuditLevel::Full => json!({"inputDigest": digest, "input": input}),
    }
}

impl Runner {
    /// Runs the pipeline for one call of `tool_name` with `body` as its input.
    /// `body` is an error when the transport already refused it (too large,
    /// wrong content type); the refusal is audited like any other.
    pub async fn invoke(
        self: &Arc<Self>,
        ctx: &CallContext,
        tool_name: &str,
        body: Result<&[u8], Problem>,
    ) -> Result<Success, Problem> {
        let _in_flight = self.metrics.in_flight();
        let tool = self.registry.get(tool_name);
        let result = self.pipeline(ctx, tool_name, tool.as_ref(), body).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(p) => p.kind.slug(),
        };
        self.metrics
            .call(tool.as_ref().map_or("", |t| t.name.as_str()), outcome);
        result
    }

    async fn pipeline(
        self: &Arc<Self>,
        ctx: &CallContext,
        tool_name: &str,
        tool: Option<&Arc<PreparedTool>>,
        body: Result<&[u8], Problem>,
    ) -> Result<Success, Problem> {
        // Fail closed before doing anything we could not record (a failed log retries here).
        self.audit.ensure_writable().map_err(audit_problem)?;
        let invocation_id = uuid::Uuid::new_v4().to_string();
        let mut trail = Trail {
            log: self.audit.clone(),
            base: Map::new(),
        };
        trail.set("invocationId", invocation_id.clone());
        trail.set("transport", ctx.transport);
        trail.set("tool", tool_name);
        if let Some(tool) = tool {
            trail.set("toolGeneration", tool.generation);
        }
        trail.set("clientIp", ctx.client_ip.clone());
        trail.set("userAgent", ctx.user_agent.clone());
        trail.record(
            "received",
            json!({"bodyBytes": body.as_ref().ok().map(|b| b.len())}),
        )?;

        let caller = match self.auth.authenticate(ctx.authorization.as_deref()).await {
            Ok(caller) => caller,
            Err(e) => {
                let problem = Problem::new(ProblemKind::Unauthenticated, e.to_string());
                return Err(trail.deny("authentication", &e.reason(), problem));
            }
        };
        trail.set(
            "caller",
            json!({"sub": caller.sub, "groups": caller.groups, "method": caller.method}),
        );
        let Some(tool) = tool else {
            let problem = Problem::new(
                ProblemKind::NotFound,
                format!("there is no tool named {tool_name:?}"),
            );
            return Err(trail.deny("lookup", "unknown tool", problem));
        };

        if let Some(limiter) = &tool.limiter
            && let Err(limited) = limiter.check(&caller.sub)
        {
            // Round up: retrying after a truncated delay would be rejected again.
            let secs =
                limited.retry_after.as_secs() + u64::from(limited.retry_after.subsec_nanos() > 0);
            trail.record(
                "rateLimited",
                json!({"retryAfterMs": limited.retry_after.as_millis() as u64}),
            )?;
            let mut problem = Problem::new(
                ProblemKind::RateLimited,
                format!(
                    "rate limit of {} calls per minute exceeded; retry in {secs} s",
                    tool.spec
                        .rate_limit
                        .as_ref()
                        .map_or(0, |r| r.requests_per_minute)
                ),
            );
            problem.retry_after_secs = Some(secs.max(1));
            problem.invocation_id = Some(invocation_id);
            return Err(problem);
        }

        let body = body.map_err(|p| trail.deny("shape", &p.detail.clone(), p))?;
        let mut input = parse_input(body, tool.spec.max_input_bytes)
            .map_err(|p| trail.deny("shape", &p.detail.clone(), p))?;
        if let Err(errors) = validate(&tool.validator, &input) {
            let problem = Problem::validation(errors);
            return Err(trail.deny("validation", &problem.detail.clone(), problem));
        }
        trail.record("validated", audited_input(tool, &input))?;

        let changed = sanitize(&mut input, &tool.spec.sanitize);
        if !tool.spec.sanitize.is_empty() {
            trail.record(
                "sanitized",
                json!({"changedFields": changed, "sanitizedDigest": input_digest(&input)}),
            )?;
        }

        if let Err(denied) = authorize(&tool.rules, &caller, &input) {
            let problem = Problem::new(ProblemKind::Forbidden, denied.message.clone());
            return Err(trail.deny("authorization", &denied.reason, problem));
        }

        if let Some(approval_id) = approval_gate(tool, &caller, &input, &invocation_id) {
            trail.record("approvalPending", json!({"approvalId": approval_id}))?;
            let mut problem = Problem::new(
                ProblemKind::PendingApproval,
                "this call needs a human approval before it runs",
            );
            problem.approval_id = Some(approval_id);
            problem.invocation_id = Some(invocation_id);
            return Err(problem);
        }

        self.run_detached(trail, Arc::clone(tool), input, invocation_id)
            .await
    }

    /// Runs the call in its own task, so that the run and its closing record
    /// happen whether or not the caller is still listening: a caller that
    /// hangs up mid-call still gets a call whose side effects are recorded
    /// (closed as `abandoned`).
    async fn run_detached(
        self: &Arc<Self>,
        trail: Trail,
        tool: Arc<PreparedTool>,
        input: Value,
        invocation_id: String,
    ) -> Result<Success, Problem> {
        let (answer, caller) = tokio::sync::oneshot::channel();
        let runner = Arc::clone(self);
        tokio::spawn(async move {
            let _open = runner.audit.open_call();
            let closing = |event| {
                if answer.is_closed() {
                    "abandoned"
                } else {
                    event
                }
            };
            let result = runner
                .run(&trail, &tool, input, invocation_id, closing)
                .await;
            let _ = answer.send(result);
        });
        caller.await.unwrap_or_else(|_| {
            Err(Problem::new(
                ProblemKind::ToolFailed,
                "the tool could not be run",
            ))
        })
    }

    /// `closing` names the closing record: `finished`/`failed`, or
    /// `abandoned` once the caller is gone.
    async fn run(
        &self,
        trail: &Trail,
        tool: &PreparedTool,
        input: Value,
        invocation_id: String,
        closing: impl Fn(&'static str) -> &'static str,
    ) -> Result<Success, Problem> {
        trail.record("started", json!({}))?;
        let stdin = input.to_string().into_bytes();
        let outcome = match self
            .executor
            .execute(tool, stdin, tool.secrets.clone())
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                let reason = String::from_utf8_lossy(&redact_secrets(
                    e.to_string().as_bytes(),
                    &tool.secret_values,
                ))
                .into_owned();
                trail.record(closing("failed"), json!({"error": reason}))?;
                let mut problem =
                    Problem::new(ProblemKind::ToolFailed, "the tool could not be run");
                problem.invocation_id = Some(invocation_id);
                return Err(problem);
            }
        };
        self.metrics.run(&tool.name, outcome.duration.as_secs_f64());
        if let Some(enforcement) = &outcome.enforcement {
            self.metrics
                .enforcement(&tool.name, &enforcement_pairs(enforcement));
        }
        let stdout = redact_secrets(&outcome.stdout, &tool.secret_values);
        trail.record(
            closing("finished"),
            finished_record(&outcome, &stdout, &tool.secret_values),
        )?;
        respond(outcome, stdout, invocation_id)
    }
}

/// The `finished` record: everything about the run, internal details included. Pure.
fn finished_record(outcome: &ExecOutcome, stdout: &[u8], secrets: &[Vec<u8>]) -> Value {
    let mut stderr = redact_secrets(&outcome.stderr, secrets);
    stderr.truncate(AUDIT_STDERR_BYTES);
    json!({
        "exitCode": outcome.exit_code,
        "timedOut": outcome.timed_out,
        "oomKilled": outcome.oom_killed,
        "durationMs": outcome.duration.as_millis() as u64,
        "peakMemoryBytes": outcome.peak_memory_bytes,
        "enforcement": outcome.enforcement,
        "outputBytes": stdout.len(),
        "outputTruncated": outcome.stdout_truncated,
        "stderr": String::from_utf8_lossy(&stderr),
    })
}

/// Turns a run into the caller's answer; failures get generic messages. Pure.
fn respond(
    outcome: ExecOutcome,
    stdout: Vec<u8>,
    invocation_id: String,
) -> Result<Success, Problem> {
    let failed = |kind, detail: &str| {
        let mut problem = Problem::new(kind, detail);
        problem.invocation_id = Some(invocation_id.clone());
        Err(problem)
    };
    if outcome.timed_out {
        return failed(ProblemKind::ToolTimeout, "the tool did not finish in time");
    }
    match outcome.exit_code {
        Some(0) if !outcome.oom_killed => {}
        _ => {
            return failed(
                ProblemKind::ToolFailed,
                "the tool failed; details are in the audit log",
            );
        }
    }
    let output = serde_json::from_slice(&stdout)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&stdout).into_owned()));
    Ok(Success {
        invocation_id,
        output,
        exit_code: 0,
        duration_ms: outcome.duration.as_millis() as u64,
        output_truncated: outcome.stdout_truncated,
    })
}

/// The approval hook: `Some(approval id)` when a human must decide first.
/// The approval flow itself (ToolApproval objects, waiting, resuming) is a
/// separate piece of work; until it lands such calls are answered 202 and
/// not run. A `when` expression that fails to evaluate requires approval.
fn approval_gate(
    tool: &PreparedTool,
    caller: &Caller,
    input: &Value,
    invocation_id: &str,
) -> Option<String> {
    if !tool.spec.approval.as_ref().is_some_and(|a| a.required) {
        return None;
    }
    let needed = match &tool.approval_when {
        None => true,
        Some(when) => holds(when, caller, input).unwrap_or(true),
    };
    needed.then(|| format!("approval-{invocation_id}"))
}
