//! One call, start to finish: every check of the security checklist, each
//! step audited, then the run. REST and MCP both call [`Runner::invoke`].
//!
//! Order: authenticate, client address allow-list, rate limit, read the body,
//! size and shape, anomaly score, validate, sanitize, validate again (when
//! sanitizing changed something), input guards, authorize, approval gate,
//! wait for a run slot of the tool, run, output guards, alerts, redact, cap.
//! Authentication uses the headers alone and the body is read only after it
//! and rate limiting, so an anonymous caller costs no body reading or parsing.
//! Authorization runs on the sanitized input, the exact input the tool
//! receives: checking the raw input would let a transform turn an approved
//! value into a forbidden one (e.g. `.\u0000.` passes
//! `!input.path.contains("..")`, then stripControlChars makes it `..`).

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use super::admission::{Admission, RunSlot};
use super::approvals::{Approvals, PendingApproval};
use super::audit::{AuditFailed, AuditLog, EgressTrail};
use super::auth::{AuthError, Authenticator, Caller};
use super::authorize::{authorize, holds, may_call};
use super::body_limits::{bounded, parse_input};
use super::executor::{ExecOutcome, ToolExecutor};
use super::kube_identity::ToolIdentity;
use super::mcp_tasks::TaskBook;
use super::metrics::Metrics;
use super::problem::{FieldError, Problem, ProblemKind};
use super::redact::{Redactor, redact_fields};
use super::registry::Registry;
use super::sanitize::sanitize;
use super::tool::{PreparedTool, SecretDelivery};
use super::validate::{validate, validate_sanitized};
use super::watch::{Watch, alerts};
use crate::api::AuditLevel;
use crate::guards::GuardOutcome;
use crate::guards::anomaly::{Call, Decision};

/// Bytes of a failed tool's stderr kept in the audit record.
const AUDIT_STDERR_BYTES: usize = 4096;

/// Longest tool name recorded as asked: the longest Kubernetes name. Longer
/// names are no tool's, and an anonymous caller chooses them.
const AUDIT_TOOL_NAME_BYTES: usize = 253;

/// Everything the runner needs; shared by every connection.
pub struct Runner {
    pub registry: Arc<Registry>,
    pub auth: Authenticator,
    pub audit: AuditLog,
    pub executor: Arc<dyn ToolExecutor>,
    pub metrics: Metrics,
    /// Per-tool run slots with a queue deadline.
    pub admission: Admission,
    /// Calls answered `202`, for their callers to look up.
    pub approvals: Approvals,
    /// Client addresses, allow-lists, anomaly baselines and guard classifiers.
    pub watch: Watch,
    /// MCP calls answered with a task handle, for their callers to poll.
    pub tasks: TaskBook,
    /// Mints each call of a tool with `permissions.kubernetes` its own token (`runner
    /// --tool-service-account`); without it such tools are not served.
    pub tool_identity: Option<Arc<ToolIdentity>>,
}

impl Runner {
    /// A runner with no calls behind it: default admission, fresh metrics and
    /// empty approval, watch and task books. Override a field with
    /// `Runner { admission, ..Runner::new(..) }`.
    pub fn new(
        registry: Arc<Registry>,
        auth: Authenticator,
        audit: AuditLog,
        executor: Arc<dyn ToolExecutor>,
    ) -> Runner {
        Runner {
            registry,
            auth,
            audit,
            executor,
            metrics: Metrics::default(),
            admission: Admission::default(),
            approvals: Approvals::default(),
            watch: Watch::default(),
            tasks: TaskBook::default(),
            tool_identity: None,
        }
    }
}

/// Who is asking, as the transport saw it.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    pub transport: &'static str,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub authorization: Option<String>,
    /// Set when the transport authenticated the caller already (MCP does,
    /// before it reads the body that names the tool).
    pub caller: Option<Caller>,
    /// `X-Forwarded-For` and `Forwarded`, read only from trusted proxies.
    pub forwarding: axum::http::HeaderMap,
}

/// What a call that was not refused comes to.
#[derive(Clone, Debug)]
pub enum Called {
    /// The tool ran and succeeded.
    Ran(Success),
    /// A human must approve first: the call did not run.
    AwaitingApproval(PendingApproval),
}

/// A successful call.
#[derive(Clone, Debug)]
pub struct Success {
    pub invocation_id: String,
    /// The tool's output as callers get it: its JSON exactly as printed (numbers
    /// are never re-encoded), or its text as a JSON string when it is not JSON.
    pub output: Box<RawValue>,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub output_truncated: bool,
}

/// The audit trail of one call: every record carries the same correlation fields.
struct Trail {
    log: AuditLog,
    base: Map<String, Value>,
    /// For a call with secrets of its own (its Kubernetes token): every record is
    /// redacted with them, whatever field the tool got them into.
    redactor: Option<Redactor>,
}

impl Trail {
    fn record(&self, event: &str, fields: Value) -> Result<(), Problem> {
        let mut record = Map::new();
        record.insert("event".into(), event.into());
        record.extend(self.base.clone());
        if let Value::Object(fields) = fields {
            record.extend(fields);
        }
        if let Some(redactor) = &self.redactor {
            record.values_mut().for_each(|v| {
                redactor.redact_json(v);
            });
        }
        self.log.append(record).map_err(audit_problem)
    }

    /// This trail, its records redacted with `redactor`.
    fn redacting(&self, redactor: &Redactor) -> Trail {
        Trail {
            log: self.log.clone(),
            base: self.base.clone(),
            redactor: Some(redactor.clone()),
        }
    }

    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.base.insert(key.into(), value.into());
    }

    /// Records the refusal (with every field error) and hands back the problem.
    fn deny(&self, stage: &str, reason: &str, problem: Problem) -> Problem {
        self.deny_with(stage, reason, problem, Map::new())
    }

    /// [`deny`](Self::deny) with more fields in the record.
    fn deny_with(
        &self,
        stage: &str,
        reason: &str,
        problem: Problem,
        mut fields: Map<String, Value>,
    ) -> Problem {
        fields.insert("stage".into(), stage.into());
        fields.insert("reason".into(), reason.into());
        fields.insert("status".into(), problem.kind.status().as_u16().into());
        fields.insert("problem".into(), problem.kind.slug().into());
        if !problem.errors.is_empty() {
            fields.insert("errors".into(), json!(problem.errors));
        }
        self.close_with("denied", Value::Object(fields), problem)
    }

    /// Writes the record that ends the call and hands back its problem.
    fn close_with(&self, event: &str, fields: Value, mut problem: Problem) -> Problem {
        if let Err(audit) = self.record(event, fields) {
            return audit;
        }
        problem.invocation_id = self
            .base
            .get("invocationId")
            .and_then(Value::as_str)
            .map(String::from);
        problem
    }

    /// Audits what the guards of one side (`inputGuards`, `outputGuards`)
    /// found: a refusal is the generic problem with a `denied` record naming
    /// each finding; redactions and flags are a `flagged` record.
    fn guarded(&self, stage: &str, outcome: &GuardOutcome) -> Result<(), Problem> {
        if outcome.refused {
            let fields = json!({"findings": outcome.findings});
            let Value::Object(fields) = fields else {
                unreachable!("a json! object")
            };
            return Err(self.deny_with(stage, "a guard refused", Problem::refused(), fields));
        }
        if !outcome.findings.is_empty() {
            self.record(
                "flagged",
                json!({"stage": stage, "findings": outcome.findings,
                       "redacted": outcome.redacted.is_some()}),
            )?;
        }
        Ok(())
    }
}

/// Records an authentication refusal and hands back the caller's `401` (or
/// `403` for a token without the scopes required).
fn unauthenticated(trail: &Trail, e: &AuthError) -> Problem {
    trail.deny("authentication", &e.detail(), auth_problem(e))
}

/// What a caller the authenticator refused is told.
pub fn auth_problem(e: &AuthError) -> Problem {
    let kind = match e {
        AuthError::InsufficientScope { .. } => ProblemKind::InsufficientScope,
        AuthError::Missing | AuthError::Invalid { .. } => ProblemKind::Unauthenticated,
    };
    Problem::new(kind, e.to_string())
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
    /// Runs the pipeline for one call of `tool_name`. `body` reads its input;
    /// it is awaited only once the caller is authenticated and within its rate
    /// limit, and yields an error when the transport refuses the body (too
    /// large, wrong content type, too slow): audited like any other refusal.
    pub async fn invoke(
        self: &Arc<Self>,
        ctx: &CallContext,
        tool_name: &str,
        body: impl Future<Output = Result<Bytes, Problem>> + Send,
    ) -> Result<Called, Problem> {
        let _in_flight = self.metrics.in_flight();
        let tool = self.registry.get(tool_name);
        let invocation_id = uuid::Uuid::new_v4().to_string();
        // Runtime events of the call (the executor's included) carry its id.
        let span =
            tracing::info_span!("call", invocation_id = %invocation_id, transport = ctx.transport);
        let result = self
            .pipeline(ctx, tool_name, tool.as_ref(), body, invocation_id)
            .instrument(span)
            .await;
        let outcome = match &result {
            Ok(Called::Ran(_)) => "ok",
            Ok(Called::AwaitingApproval(_)) => "pending-approval",
            Err(p) => p.kind.slug(),
        };
        self.metrics
            .call(tool.as_ref().map_or("", |t| t.name.as_str()), outcome);
        result
    }

    /// The tools `caller` may call as far as its identity alone decides (rules
    /// that read the input are left to the call): what listings show it.
    pub fn visible_tools(&self, caller: &Caller) -> Vec<Arc<PreparedTool>> {
        self.registry
            .snapshot()
            .values()
            .filter(|tool| may_call(&tool.rules, caller))
            .cloned()
            .collect()
    }

    /// Authenticates from the headers alone, for transports that must know
    /// the caller before reading the body. A refusal is audited (with no tool:
    /// the body naming it is never read).
    pub async fn authenticate(&self, ctx: &CallContext) -> Result<Caller, Problem> {
        match self.auth.authenticate(ctx.authorization.as_deref()).await {
            Ok(caller) => Ok(caller),
            Err(e) => {
                let trail = self.trail(ctx, uuid::Uuid::new_v4().to_string(), None, None)?;
                trail.record("received", json!({}))?;
                Err(unauthenticated(&trail, &e))
            }
        }
    }

    /// `Err` with the generic refusal (audited, stage `callers`) when the
    /// client is not in the runner-wide allow-list (`serve --ip-allow-list`).
    pub fn admit_client(&self, ctx: &CallContext) -> Result<(), Problem> {
        if self.watch.allow_list.is_empty() {
            return Ok(());
        }
        let client = self
            .watch
            .client_address(ctx.client_ip.as_deref(), &ctx.forwarding);
        if client.is_some_and(|ip| self.watch.allow_list.allows(ip)) {
            return Ok(());
        }
        let trail = self.trail(ctx, uuid::Uuid::new_v4().to_string(), None, None)?;
        trail.record("received", json!({}))?;
        let reason = "the client address is not in the runner's --ip-allow-list";
        Err(trail.deny("callers", reason, Problem::refused()))
    }

    /// A new call's trail with its correlation fields; fails closed when the
    /// audit log is down.
    fn trail(
        &self,
        ctx: &CallContext,
        invocation_id: String,
        tool_name: Option<&str>,
        tool: Option<&PreparedTool>,
    ) -> Result<Trail, Problem> {
        // Fail closed before doing anything we could not record (a failed log retries here).
        self.audit.ensure_writable().map_err(audit_problem)?;
        let mut trail = Trail {
            log: self.audit.clone(),
            base: Map::new(),
            redactor: None,
        };
        trail.set("invocationId", invocation_id);
        trail.set("transport", ctx.transport);
        trail.set(
            "tool",
            tool_name.map(|name| bounded(name, AUDIT_TOOL_NAME_BYTES)),
        );
        if let Some(tool) = tool {
            trail.set("toolGeneration", tool.generation);
        }
        let client = self
            .watch
            .client_address(ctx.client_ip.as_deref(), &ctx.forwarding);
        match client {
            // Behind a trusted proxy: the client it named, and the proxy.
            Some(client) if Some(client.to_string()) != ctx.client_ip => {
                trail.set("clientIp", client.to_string());
                trail.set("peerIp", ctx.client_ip.clone());
            }
            _ => trail.set("clientIp", ctx.client_ip.clone()),
        }
        trail.set("userAgent", ctx.user_agent.clone());
        Ok(trail)
    }

    async fn pipeline(
        self: &Arc<Self>,
        ctx: &CallContext,
        tool_name: &str,
        tool: Option<&Arc<PreparedTool>>,
        body: impl Future<Output = Result<Bytes, Problem>> + Send,
        invocation_id: String,
    ) -> Result<Called, Problem> {
        let mut trail = self.trail(
            ctx,
            invocation_id.clone(),
            Some(tool_name),
            tool.map(Arc::as_ref),
        )?;
        trail.record("received", json!({}))?;

        let caller = match &ctx.caller {
            Some(caller) => caller.clone(),
            None => match self.auth.authenticate(ctx.authorization.as_deref()).await {
                Ok(caller) => caller,
                Err(e) => return Err(unauthenticated(&trail, &e)),
            },
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

        let client = self
            .watch
            .client_address(ctx.client_ip.as_deref(), &ctx.forwarding);
        // An address that cannot be read is in no list.
        if !tool.ip_allow_list.is_empty() && !client.is_some_and(|ip| tool.ip_allow_list.allows(ip))
        {
            let reason = "the client address is not in callers.ipAllowList";
            return Err(trail.deny("callers", reason, Problem::refused()));
        }

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

        let body = body
            .await
            .map_err(|p| trail.deny("shape", &p.detail.clone(), p))?;
        let mut input = parse_input(&body, tool.spec.max_input_bytes)
            .map_err(|p| trail.deny("shape", &p.detail.clone(), p))?;

        // From here on, how the call ends feeds the caller's anomaly baseline.
        let scored = match &tool.spec.anomaly {
            Some(spec) => {
                let call = Call {
                    tool: &tool.name,
                    input_bytes: body.len(),
                    source: client,
                };
                let assessment = self.watch.assess(&caller.sub, &call, spec);
                let fields = json!({"stage": "anomaly", "score": assessment.score,
                                    "factors": assessment.factors, "coldStart": assessment.cold_start});
                match assessment.decision {
                    Decision::Refuse => {
                        self.watch.record_outcome(&caller.sub, false);
                        return Err(trail.close_with("suspicious", fields, Problem::refused()));
                    }
                    Decision::Flag => trail.record("flagged", fields)?,
                    Decision::Allow => trail.record("scored", fields)?,
                }
                Some(OutcomeOf {
                    watch: &self.watch,
                    caller: &caller.sub,
                    ok: false,
                })
            }
            None => None,
        };

        if let Err(errors) = validate(&tool.validator, &input) {
            let problem = Problem::validation(errors);
            return Err(trail.deny("validation", &problem.detail.clone(), problem));
        }
        let mut validated = audited_input(tool, &input);
        validated["bodyBytes"] = body.len().into();
        trail.record("validated", validated)?;

        let changed = sanitize(&mut input, &tool.spec.sanitize);
        if !tool.spec.sanitize.is_empty() {
            trail.record(
                "sanitized",
                json!({"changedFields": changed, "sanitizedDigest": input_digest(&input)}),
            )?;
        }
        // The tool gets what the schema promises: a transform can make a valid
        // value invalid (NFC turns U+037E into `;`, escaping grows a value).
        if !changed.is_empty()
            && let Err(errors) = validate_sanitized(&tool.validator, &input)
        {
            let problem = Problem::validation(errors);
            return Err(trail.deny(
                "validation",
                "the sanitized input fails the schema",
                problem,
            ));
        }

        if let Some(guards) = &tool.input_guards {
            let outcome = self.watch.check(guards, &input).await;
            trail.guarded("inputGuards", &outcome)?;
            if let Some(redacted) = outcome.redacted {
                // What the tool gets still satisfies the schema; a refusal saying why would tell.
                if validate_sanitized(&tool.validator, &redacted).is_err() {
                    let reason = "the redacted input fails the schema";
                    return Err(trail.deny("inputGuards", reason, Problem::refused()));
                }
                input = redacted;
            }
        }

        if let Err(denied) = authorize(&tool.rules, &caller, &input) {
            let problem = Problem::new(ProblemKind::Forbidden, denied.message.clone());
            return Err(trail.deny("authorization", &denied.reason, problem));
        }

        if let Some(approval_id) = approval_gate(tool, &caller, &input, &invocation_id) {
            trail.record("approvalPending", json!({"approvalId": approval_id}))?;
            let timeout = tool.spec.approval.as_ref().map_or(0, |a| a.timeout_seconds);
            let pending = PendingApproval::new(
                approval_id,
                invocation_id,
                &tool.name,
                &caller.sub,
                timeout,
                jiff::Timestamp::now(),
            );
            self.approvals.hold(pending.clone());
            if let Some(outcome) = scored {
                outcome.succeeded();
            }
            return Ok(Called::AwaitingApproval(pending));
        }

        let slot = match self.admission.admit(&tool.name).await {
            Ok(slot) => slot,
            Err(busy) => {
                let mut problem = Problem::new(ProblemKind::Overloaded, busy.to_string());
                // About when a running call of the tool ends and frees a slot.
                problem.retry_after_secs = Some(
                    u64::from(tool.spec.sandbox.timeout_ms)
                        .div_ceil(1000)
                        .max(1),
                );
                return Err(trail.deny("admission", busy.reason(), problem));
            }
        };
        let ran = self
            .run_detached(trail, Arc::clone(tool), input, invocation_id, slot)
            .await?;
        if let Some(outcome) = scored {
            outcome.succeeded();
        }
        Ok(Called::Ran(ran))
    }

    /// Runs the call so that the run and its closing record happen whether or
    /// not the caller is still listening: a caller that hangs up mid-call still
    /// gets a call whose side effects are recorded (closed as `abandoned`). The
    /// run is polled in place, and moved into a task of its own only when the
    /// caller's future is dropped: spawning every call would cost a cross-thread
    /// wake-up (about 40 us) on the pipeline's hot path.
    async fn run_detached(
        self: &Arc<Self>,
        trail: Trail,
        tool: Arc<PreparedTool>,
        input: Value,
        invocation_id: String,
        slot: RunSlot,
    ) -> Result<Success, Problem> {
        let abandoned = Arc::new(AtomicBool::new(false));
        let caller_gone = Arc::clone(&abandoned);
        let runner = Arc::clone(self);
        DetachOnDrop::new(
            async move {
                // The tool's run slot is held for as long as the sandbox runs, not as long
                // as the caller waits: hanging up must not get around the per-tool limit.
                let _slot = slot;
                let _open = runner.audit.open_call();
                let closing = |event| {
                    if caller_gone.load(Ordering::Acquire) {
                        "abandoned"
                    } else {
                        event
                    }
                };
                runner
                    .run(&trail, &tool, input, invocation_id, closing)
                    .await
            }
            // A call whose caller left finishes in a task of its own: still in the call's span.
            .in_current_span(),
            abandoned,
        )
        .await
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
        let mut secrets = tool.secrets.clone();
        // A tool with its own Kubernetes identity never runs without this call's token,
        // which is redacted from this call's output and records like the tool's secrets.
        let identity = match ToolIdentity::for_call(self.tool_identity.as_deref(), tool).await {
            Ok(identity) => identity,
            Err(e) => {
                let error = tool.redactor.redact_str(&e.to_string());
                trail.record(
                    closing("failed"),
                    json!({"error": error, "reason": e.reason()}),
                )?;
                let mut problem = Problem::new(
                    ProblemKind::ToolFailed,
                    "the tool's Kubernetes identity could not be issued",
                );
                problem.invocation_id = Some(invocation_id);
                return Err(problem);
            }
        };
        let (redactor, redacting_trail) = match identity {
            Some(identity) => {
                secrets.extend(identity.files.into_iter().map(SecretDelivery::CallFile));
                let trail = trail.redacting(&identity.redactor);
                (Cow::Owned(identity.redactor), Some(trail))
            }
            None => (Cow::Borrowed(&tool.redactor), None),
        };
        let (redactor, trail) = (redactor.as_ref(), redacting_trail.as_ref().unwrap_or(trail));
        // Only a tool with egress has a proxy whose records join the trail.
        let run = if tool.spec.permissions.network.egress.is_empty() {
            self.executor.execute(tool, stdin, secrets)
        } else {
            let egress = Arc::new(
                EgressTrail::new(trail.log.clone(), trail.base.clone()).redacting(redactor.clone()),
            );
            self.executor
                .execute_with_egress(tool, stdin, secrets, egress)
        };
        let outcome = match run.await {
            Ok(outcome) => outcome,
            Err(e) => {
                let reason = redactor.redact_str(&e.to_string());
                trail.record(closing("failed"), json!({"error": reason}))?;
                let mut problem =
                    Problem::new(ProblemKind::ToolFailed, "the tool could not be run");
                problem.invocation_id = Some(invocation_id);
                return Err(problem);
            }
        };
        self.metrics.run(&tool.name, outcome.duration.as_secs_f64());
        if let Some(enforcement) = &outcome.enforcement {
            self.metrics.enforcement(&tool.name, enforcement);
        }
        let guarded = match &tool.output_guards {
            Some(guards) if failure_hint(&outcome).is_none() && !outcome.timed_out => Some(
                self.watch
                    .check(guards, &output_document(&outcome.stdout))
                    .await,
            ),
            _ => None,
        };
        let guarded_stdout = guarded
            .as_ref()
            .and_then(|g| g.redacted.as_ref())
            .map(|redacted| match redacted {
                Value::String(text) => text.clone().into_bytes(),
                json => json.to_string().into_bytes(),
            });
        // Redact first, then cut: the run captured more than the cap for this.
        let (stdout, cut) = redactor.redact_capped(
            guarded_stdout.as_deref().unwrap_or(&outcome.stdout),
            tool.output_cap(),
        );
        let truncated = cut || outcome.stdout_truncated;
        let alerts = alerts(tool, &outcome);
        let mut finished = finished_record(&outcome, &stdout, truncated, tool, redactor);
        let answer =
            respond(outcome, stdout, truncated, redactor, invocation_id).and_then(|success| {
                match conforms(tool, &success) {
                    Ok(()) => Ok(success),
                    Err(errors) => {
                        finished["outputSchemaErrors"] = json!(errors);
                        Err(output_invalid(errors, success.invocation_id))
                    }
                }
            });
        trail.record(closing("finished"), finished)?;
        for (kind, fields) in alerts {
            self.metrics.alert(&tool.name, kind);
            trail.record("alert", fields)?;
        }
        if let Some(guarded) = &guarded {
            trail.guarded("outputGuards", guarded)?;
        }
        answer
    }
}

/// The tool's output as output guards see it: its JSON, or its text as a string. Pure.
fn output_document(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
}

/// How a scored call ended, for the caller's anomaly baseline: a failure
/// unless [`succeeded`](Self::succeeded) is called, so every refusal and
/// failure after scoring counts, whichever `return` it takes.
struct OutcomeOf<'a> {
    watch: &'a Watch,
    caller: &'a str,
    ok: bool,
}

impl OutcomeOf<'_> {
    fn succeeded(mut self) {
        self.ok = true;
    }
}

impl Drop for OutcomeOf<'_> {
    fn drop(&mut self) {
        self.watch.record_outcome(self.caller, self.ok);
    }
}

/// The `finished` record: everything about the run, internal details included. Pure.
fn finished_record(
    outcome: &ExecOutcome,
    stdout: &[u8],
    stdout_truncated: bool,
    tool: &PreparedTool,
    redactor: &Redactor,
) -> Value {
    // Within maxOutputBytes: past it, the capture may end inside a secret.
    let stderr_cap = AUDIT_STDERR_BYTES.min(tool.output_cap());
    let (stderr, _) = redactor.redact_capped(&outcome.stderr, stderr_cap);
    json!({
        "exitCode": outcome.exit_code,
        "timedOut": outcome.timed_out,
        "oomKilled": outcome.oom_killed,
        "durationMs": outcome.duration.as_millis() as u64,
        "peakMemoryBytes": outcome.peak_memory_bytes,
        "enforcement": outcome.enforcement,
        "outputBytes": stdout.len(),
        "outputTruncated": stdout_truncated,
        "stderr": String::from_utf8_lossy(&stderr),
    })
}

/// Turns a run into the caller's answer; failures get generic messages. Pure.
fn respond(
    outcome: ExecOutcome,
    stdout: Vec<u8>,
    stdout_truncated: bool,
    redactor: &Redactor,
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
    if let Some(why) = failure_hint(&outcome) {
        return failed(
            ProblemKind::ToolFailed,
            &format!(
                "the tool {why}; its output and stderr are in the audit log under this invocationId"
            ),
        );
    }
    let output = tool_output(&stdout, redactor);
    Ok(Success {
        invocation_id,
        output,
        exit_code: 0,
        duration_ms: outcome.duration.as_millis() as u64,
        output_truncated: stdout_truncated,
    })
}

/// The tool's stdout as callers get it. JSON passes through as printed, so numbers keep
/// every digit (`12345678901234567890123`, `1.50`; re-encoding goes through f64). The
/// caller sees decoded JSON, so its decoded strings are redacted too; only when that
/// replaced something is it re-encoded. Text that is not JSON becomes a JSON string. Pure.
fn tool_output(stdout: &[u8], redactor: &Redactor) -> Box<RawValue> {
    let text = String::from_utf8_lossy(stdout);
    let value = match serde_json::from_str::<Value>(&text) {
        Ok(mut json) => {
            if !redactor.redact_json(&mut json)
                && let Ok(raw) = RawValue::from_string(text.trim().to_string())
            {
                return raw;
            }
            json
        }
        Err(_) => Value::String(text.into_owned()),
    };
    serde_json::value::to_raw_value(&value).expect("a JSON value always serializes")
}

/// Checks a successful answer against the tool's `outputSchema`, if it declares
/// one: the errors say where it differs (never the values, as for input). Pure.
fn conforms(tool: &PreparedTool, success: &Success) -> Result<(), Vec<FieldError>> {
    let Some(validator) = &tool.output_validator else {
        return Ok(());
    };
    let output: Value = serde_json::from_str(success.output.get()).unwrap_or(Value::Null);
    validate(validator, &output)
}

/// The caller's answer when the tool's output breaks its schema: a tool error,
/// with where it differs.
fn output_invalid(errors: Vec<FieldError>, invocation_id: String) -> Problem {
    let mut problem = Problem::new(
        ProblemKind::OutputInvalid,
        "the tool's output does not match its outputSchema; it was not passed on \
         (the run is in the audit log under this invocationId)",
    );
    problem.errors = errors;
    problem.invocation_id = Some(invocation_id);
    problem
}

/// How a run failed, in words safe to show a caller (never the tool's stderr, which
/// may hold anything); `None` when it succeeded. Pure.
fn failure_hint(outcome: &ExecOutcome) -> Option<String> {
    match outcome.exit_code {
        _ if outcome.oom_killed => Some("ran out of memory and was killed".into()),
        Some(0) => None,
        Some(code) => Some(format!("exited with code {code}")),
        None => Some("was killed by a signal".into()),
    }
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

/// A future that finishes even when whoever awaits it goes away: dropped before it
/// completes, it marks `abandoned` and hands the rest of its work to a new task.
struct DetachOnDrop<F: Future + Send + 'static> {
    work: Option<Pin<Box<F>>>,
    abandoned: Arc<AtomicBool>,
}

impl<F: Future + Send + 'static> DetachOnDrop<F> {
    fn new(work: F, abandoned: Arc<AtomicBool>) -> Self {
        DetachOnDrop {
            work: Some(Box::pin(work)),
            abandoned,
        }
    }
}

impl<F: Future + Send + 'static> Future for DetachOnDrop<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(work) = self.work.as_mut() else {
            unreachable!("polled after completion");
        };
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for DetachOnDrop<F> {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            self.abandoned.store(true, Ordering::Release);
            // Outside a runtime (the process is ending) there is nothing left to run it on.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = work.await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_dropped_midway_finishes_in_a_task_of_its_own_and_knows_it() {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel();
        let abandoned = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&abandoned);
        let work = DetachOnDrop::new(
            async move {
                let _ = wait.await;
                let _ = done.send(seen.load(Ordering::Acquire));
            },
            Arc::clone(&abandoned),
        );
        // The caller gives up while the work waits.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), work)
                .await
                .is_err()
        );
        go.send(()).unwrap();
        assert_eq!(finished.await, Ok(true), "finished, as abandoned");
    }

    #[tokio::test]
    async fn work_awaited_to_the_end_is_not_abandoned() {
        let abandoned = Arc::new(AtomicBool::new(false));
        assert_eq!(
            DetachOnDrop::new(async { 7 }, Arc::clone(&abandoned)).await,
            7
        );
        assert!(!abandoned.load(Ordering::Acquire));
    }
}

/// The whole pipeline with [`crate::runner::fake::FakeExecutor`]: no root, no sandbox.
#[cfg(test)]
mod scenarios {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::runner::executor::ExecError;
    use crate::runner::fake::{FORECAST, NOTES_SECRET, TOKEN, TestRunner};
    use crate::runner::tool::SecretDelivery;

    fn body(input: &Value) -> impl Future<Output = Result<Bytes, Problem>> + Send + use<> {
        std::future::ready(Ok(Bytes::from(input.to_string())))
    }

    /// A body that counts how often it was read.
    fn counted(
        reads: &Arc<AtomicUsize>,
        input: &Value,
    ) -> impl Future<Output = Result<Bytes, Problem>> + Send + use<> {
        let (reads, bytes) = (Arc::clone(reads), Bytes::from(input.to_string()));
        async move {
            reads.fetch_add(1, Ordering::SeqCst);
            Ok(bytes)
        }
    }

    fn alice() -> CallContext {
        TestRunner::context(Some(&format!("Bearer {TOKEN}")))
    }

    fn read_note() -> Value {
        json!({"operation": "read", "name": "todo"})
    }

    async fn call(
        t: &TestRunner,
        ctx: &CallContext,
        tool: &str,
        input: &Value,
    ) -> Result<Success, Problem> {
        match t.runner.invoke(ctx, tool, body(input)).await? {
            Called::Ran(success) => Ok(success),
            Called::AwaitingApproval(pending) => panic!("awaits approval: {pending:?}"),
        }
    }

    fn events(t: &TestRunner) -> Vec<String> {
        t.records()
            .iter()
            .map(|r| r["event"].as_str().unwrap().to_string())
            .collect()
    }

    /// Every record of a call carries its invocation id, which the answer names too.
    fn assert_one_call(t: &TestRunner, invocation_id: &str) {
        for record in t.records() {
            assert_eq!(record["invocationId"], invocation_id, "{record}");
        }
    }

    #[tokio::test]
    async fn a_call_passes_every_check_and_each_step_is_audited() {
        let t = TestRunner::notes();
        t.executor.prints(r#"{"note": "buy milk"}"#);
        let input = json!({"operation": "read", "name": "todo", "text": "a\u{0007}b"});
        let success = call(&t, &alice(), "notes", &input).await.unwrap();
        assert_eq!(success.output.get(), r#"{"note": "buy milk"}"#);
        assert_eq!(
            events(&t),
            ["received", "validated", "sanitized", "started", "finished"]
        );
        assert_one_call(&t, &success.invocation_id);
        let records = t.records();
        assert_eq!(records[0]["tool"], "notes");
        assert_eq!(records[0]["transport"], "rest");
        assert_eq!(records[1]["caller"]["sub"], "alice");
        // audit.input: redacted, with /text named.
        assert_eq!(records[1]["input"]["text"], "[REDACTED]");
        assert_eq!(records[2]["changedFields"], json!(["/text"]));
        assert_eq!(records[4]["exitCode"], 0);
        // The tool got the sanitized input and its secret, as an env variable.
        let runs = t.executor.runs();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].stdin["text"], "ab");
        assert_eq!(
            runs[0].secrets,
            [SecretDelivery::Env {
                name: "API_TOKEN".into(),
                value: NOTES_SECRET.into()
            }]
        );
    }

    #[tokio::test]
    async fn checks_run_in_order_authentication_first_and_the_body_last_of_the_cheap_ones() {
        let t = TestRunner::notes();
        let reads = Arc::new(AtomicUsize::new(0));
        // Anonymous and unknown tool: the caller learns nothing about tools.
        let anonymous = TestRunner::context(None);
        let problem = t
            .runner
            .invoke(&anonymous, "no-such-tool", counted(&reads, &read_note()))
            .await
            .unwrap_err();
        assert_eq!(problem.kind, ProblemKind::Unauthenticated);
        // Authenticated, unknown tool: not found, body unread.
        let problem = t
            .runner
            .invoke(&alice(), "no-such-tool", counted(&reads, &read_note()))
            .await
            .unwrap_err();
        assert_eq!(problem.kind, ProblemKind::NotFound);
        assert_eq!(reads.load(Ordering::SeqCst), 0, "a body was read");
        // Invalid and forbidden at once: validation comes first.
        let both = json!({"operation": "delete", "name": "private"});
        let problem = call(&t, &alice(), "notes", &both).await.unwrap_err();
        assert_eq!(problem.kind, ProblemKind::Validation);
        // Forbidden and needing approval: authorization comes first.
        let write_private = json!({"operation": "write", "name": "private"});
        let problem = call(&t, &alice(), "notes", &write_private)
            .await
            .unwrap_err();
        assert_eq!(problem.kind, ProblemKind::Forbidden);
        assert_eq!(
            events(&t),
            [
                "received",
                "denied", // anonymous
                "received",
                "denied", // unknown tool
                "received",
                "denied", // invalid
                "received",
                "validated",
                "sanitized",
                "denied", // forbidden
            ]
        );
        let stages: Vec<Value> = t
            .records()
            .iter()
            .filter(|r| r["event"] == "denied")
            .map(|r| r["stage"].clone())
            .collect();
        assert_eq!(
            stages,
            ["authentication", "lookup", "validation", "authorization"]
        );
        // Spend the rest of the limit (4 a minute): then no body is read.
        for _ in 0..2 {
            let problem = call(&t, &alice(), "notes", &both).await.unwrap_err();
            assert_eq!(problem.kind, ProblemKind::Validation);
        }
        let problem = t
            .runner
            .invoke(&alice(), "notes", counted(&reads, &read_note()))
            .await
            .unwrap_err();
        assert_eq!(problem.kind, ProblemKind::RateLimited);
        assert!(problem.retry_after_secs.is_some_and(|s| s >= 1));
        assert_eq!(
            reads.load(Ordering::SeqCst),
            0,
            "a rate-limited body was read"
        );
        assert!(t.executor.runs().is_empty(), "a refused call ran");
        assert_eq!(events(&t).last().unwrap(), "rateLimited");
    }

    #[tokio::test]
    async fn every_refusal_is_its_problem_type_with_the_invocation_id() {
        let t = TestRunner::notes();
        let refused = [
            (
                json!({"operation": "read"}),
                ProblemKind::Validation,
                "validation",
            ),
            (
                json!({"operation": "read", "name": "private"}),
                ProblemKind::Forbidden,
                "authorization",
            ),
        ];
        for (input, kind, stage) in refused {
            let problem = call(&t, &alice(), "notes", &input).await.unwrap_err();
            assert_eq!(problem.kind, kind, "{input}");
            let record = t.records().pop().unwrap();
            assert_eq!(record["event"], "denied");
            assert_eq!(record["stage"], stage);
            assert_eq!(record["problem"], kind.slug());
            assert_eq!(
                problem.invocation_id.as_deref(),
                record["invocationId"].as_str()
            );
        }
        // A write waits for a human: answered, not run, and held for its caller alone.
        let write = json!({"operation": "write", "name": "todo", "text": "x"});
        let Ok(Called::AwaitingApproval(pending)) =
            t.runner.invoke(&alice(), "notes", body(&write)).await
        else {
            panic!("a write must wait for approval");
        };
        assert_eq!(
            pending.approval_id,
            format!("approval-{}", pending.invocation_id)
        );
        assert_eq!(pending.tool, "notes");
        let record = t.records().pop().unwrap();
        assert_eq!(record["event"], "approvalPending");
        assert_eq!(record["approvalId"], pending.approval_id.as_str());
        let caller = record["caller"]["sub"].as_str().unwrap();
        assert_eq!(
            t.runner.approvals.lookup(&pending.approval_id, caller),
            Some(pending.clone())
        );
        assert_eq!(t.runner.approvals.lookup(&pending.approval_id, "bob"), None);
        assert!(t.executor.runs().is_empty());
    }

    #[tokio::test]
    async fn a_body_the_transport_refuses_is_audited_as_a_shape_refusal() {
        for kind in [
            ProblemKind::TooLarge,
            ProblemKind::UnsupportedMediaType,
            ProblemKind::RequestTimeout,
        ] {
            let t = TestRunner::notes();
            let refused = std::future::ready(Err(Problem::new(kind, "refused by the transport")));
            let problem = t
                .runner
                .invoke(&alice(), "notes", refused)
                .await
                .unwrap_err();
            assert_eq!(problem.kind, kind);
            let record = t.records().pop().unwrap();
            assert_eq!(
                (record["stage"].as_str(), record["problem"].as_str()),
                (Some("shape"), Some(kind.slug()))
            );
        }
        // Over maxInputBytes (1024), or not JSON: refused by the pipeline's own shape check.
        let t = TestRunner::notes();
        let big = json!({"operation": "read", "name": "todo", "text": "x".repeat(2000)});
        let problem = call(&t, &alice(), "notes", &big).await.unwrap_err();
        assert_eq!(problem.kind, ProblemKind::TooLarge);
        let garbage = std::future::ready(Ok(Bytes::from_static(b"{not json")));
        let problem = t
            .runner
            .invoke(&alice(), "notes", garbage)
            .await
            .unwrap_err();
        assert_eq!(problem.kind, ProblemKind::Validation);
        assert!(t.executor.runs().is_empty());
    }

    #[tokio::test]
    async fn a_tool_whose_run_slots_stay_full_is_overloaded() {
        let t = TestRunner::notes();
        let _held = t.runner.admission.admit("notes").await.unwrap();
        let problem = call(&t, &alice(), "notes", &read_note()).await.unwrap_err();
        assert_eq!(problem.kind, ProblemKind::Overloaded);
        assert_eq!(
            problem.retry_after_secs,
            Some(1),
            "timeoutMs 1000, rounded up"
        );
        let record = t.records().pop().unwrap();
        assert_eq!(record["stage"], "admission");
        assert!(t.executor.runs().is_empty());
    }

    #[tokio::test]
    async fn runs_that_fail_are_tool_problems_with_generic_messages() {
        let failures = [
            (
                ExecOutcome {
                    timed_out: true,
                    ..ExecOutcome::default()
                },
                ProblemKind::ToolTimeout,
                "did not finish in time",
            ),
            (
                ExecOutcome {
                    exit_code: Some(3),
                    stderr: b"boom".to_vec(),
                    ..ExecOutcome::default()
                },
                ProblemKind::ToolFailed,
                "exited with code 3",
            ),
            (
                ExecOutcome {
                    exit_code: None,
                    ..ExecOutcome::default()
                },
                ProblemKind::ToolFailed,
                "killed by a signal",
            ),
            (
                ExecOutcome {
                    oom_killed: true,
                    exit_code: Some(137),
                    ..ExecOutcome::default()
                },
                ProblemKind::ToolFailed,
                "ran out of memory",
            ),
        ];
        for (outcome, kind, says) in failures {
            let t = TestRunner::notes();
            t.executor.answers(Ok(outcome));
            let problem = call(&t, &alice(), "notes", &read_note()).await.unwrap_err();
            assert_eq!(problem.kind, kind);
            assert!(problem.detail.contains(says), "{}", problem.detail);
            assert!(
                !problem.detail.contains("boom"),
                "stderr reached the caller"
            );
            assert_eq!(events(&t).last().unwrap(), "finished");
        }
        // The executor could not run it at all: the reason is audited, redacted.
        let t = TestRunner::notes();
        let why = format!("cannot start with {NOTES_SECRET}");
        t.executor
            .answers(Err(ExecError::Spawn(std::io::Error::other(why))));
        let problem = call(&t, &alice(), "notes", &read_note()).await.unwrap_err();
        assert_eq!(problem.kind, ProblemKind::ToolFailed);
        assert_eq!(problem.detail, "the tool could not be run");
        let failed = t.records().pop().unwrap();
        assert_eq!(failed["event"], "failed");
        assert_eq!(
            failed["error"],
            "the tool could not be started: cannot start with [REDACTED]"
        );
    }

    #[tokio::test]
    async fn secrets_are_redacted_from_output_and_the_audit_log_then_the_output_is_capped() {
        let t = TestRunner::notes();
        let escaped: String = NOTES_SECRET
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        t.executor.answers(Ok(ExecOutcome {
            exit_code: Some(0),
            stdout: format!(r#"{{"raw": "{NOTES_SECRET}", "escaped": "{escaped}"}}"#).into_bytes(),
            stderr: format!("debug: token={NOTES_SECRET}").into_bytes(),
            ..ExecOutcome::default()
        }));
        let success = call(&t, &alice(), "notes", &read_note()).await.unwrap();
        let output: Value = serde_json::from_str(success.output.get()).unwrap();
        assert_eq!(
            output,
            json!({"raw": "[REDACTED]", "escaped": "[REDACTED]"})
        );
        let finished = t.records().pop().unwrap();
        assert_eq!(finished["stderr"], "debug: token=[REDACTED]");
        let log = serde_json::to_string(&t.records()).unwrap();
        assert!(!log.contains(NOTES_SECRET), "{log}");

        // maxOutputBytes is 200: a secret across the cut is replaced whole, never cut in half.
        let t = TestRunner::notes();
        let text = format!("{}{NOTES_SECRET}", "x".repeat(195));
        t.executor.prints(&text);
        let success = call(&t, &alice(), "notes", &read_note()).await.unwrap();
        assert!(success.output_truncated);
        let shown: String = serde_json::from_str(success.output.get()).unwrap();
        assert_eq!(shown.len(), 200);
        assert!(
            !shown.contains("s3cr"),
            "the secret's head was kept: {shown}"
        );
        assert_eq!(t.records().pop().unwrap()["outputTruncated"], true);
    }

    #[tokio::test]
    async fn an_answer_outside_the_output_schema_is_a_tool_error_and_audited() {
        let t = TestRunner::new(&[FORECAST], &[]);
        t.executor
            .prints(r#"{"weather": "sunny", "celsius": 21.5}"#);
        let success = call(&t, &alice(), "forecast", &json!({})).await.unwrap();
        assert_eq!(
            success.output.get(),
            r#"{"weather": "sunny", "celsius": 21.5}"#
        );
        // Each way a tool can break its promise: an extra field (a leak), a wrong
        // type, a missing field, no JSON at all, a JSON value that is no object.
        let broken = [
            r#"{"weather": "sunny", "celsius": 21, "apiKey": "k"}"#,
            r#"{"weather": "sunny", "celsius": "21"}"#,
            r#"{"weather": "sunny"}"#,
            "sunny, 21 degrees",
            "[1, 2]",
        ];
        for printed in broken {
            t.executor.prints(printed);
            let problem = call(&t, &alice(), "forecast", &json!({}))
                .await
                .unwrap_err();
            assert_eq!(problem.kind, ProblemKind::OutputInvalid, "{printed}");
            assert!(!problem.errors.is_empty(), "{printed}");
            let shown = serde_json::to_string(&problem.body()).unwrap();
            assert!(
                !shown.contains("apiKey") && !shown.contains("sunny"),
                "{shown}"
            );
            let finished = t.records().pop().unwrap();
            assert_eq!(finished["event"], "finished");
            assert_eq!(
                finished["invocationId"].as_str(),
                problem.invocation_id.as_deref()
            );
            assert!(finished["outputSchemaErrors"].is_array(), "{finished}");
        }
    }

    #[tokio::test]
    async fn calls_are_refused_while_the_audit_log_cannot_be_written() {
        let t = TestRunner::notes();
        t.break_audit();
        let problem = call(&t, &alice(), "notes", &read_note()).await.unwrap_err();
        assert_eq!(problem.kind, ProblemKind::AuditUnavailable);
        let problem = t
            .runner
            .authenticate(&TestRunner::context(None))
            .await
            .unwrap_err();
        assert_eq!(problem.kind, ProblemKind::AuditUnavailable);
        assert!(t.executor.runs().is_empty(), "a call ran unaudited");
    }

    #[tokio::test]
    async fn a_caller_that_hangs_up_mid_run_still_gets_its_run_recorded_as_abandoned() {
        let t = TestRunner::notes();
        t.executor.prints("{}");
        t.executor.delay(Duration::from_millis(200));
        let (ctx, input) = (alice(), read_note());
        let call = call(&t, &ctx, "notes", &input);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), call)
                .await
                .is_err()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while events(&t).last().map(String::as_str) != Some("abandoned") {
            assert!(std::time::Instant::now() < deadline, "{:?}", events(&t));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(t.executor.runs().len(), 1);
    }
}

/// The watching stages (guards, allow-lists, anomaly scoring, alerts) in the whole pipeline.
#[cfg(test)]
#[path = "pipeline_watch_tests.rs"]
mod watch_scenarios;
