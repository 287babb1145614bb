//! MCP (Model Context Protocol) over the streamable HTTP transport at `/mcp`, in
//! both eras on one endpoint: the stateless revision 2026-07-28 (`server/discover`,
//! per-request `_meta`, routing headers checked against the body: [`stateless`])
//! and the handshake revisions 2025-03-26 to 2025-11-25 (`initialize`, `ping`),
//! each answered in its own era's shapes. `tools/list` and `tools/call` are
//! served in both. Answers are plain JSON (the transport allows a JSON response
//! instead of an SSE stream), except a `tools/call` that asks for progress, which
//! is streamed with progress ([`event_stream`]). No session IDs, no server-initiated messages, so
//! `GET` and `DELETE` answer 405 as the transport specifies for that case.

mod event_stream;
mod stateless;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;

use super::mcp_tasks as tasks;
use super::pipeline::{CallContext, Called, Runner, Success};
use super::problem::{Problem, ProblemKind};
use super::request::{call_context, is_json, read_body};
use super::tool_metadata::{ToolDescription, describe};

/// Handshake-era revisions spoken, newest first; `initialize` offers the newest
/// when the client asks for one we do not know.
pub const HANDSHAKE_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// Every revision served, newest first.
pub fn served_versions() -> impl Iterator<Item = &'static str> {
    stateless::STATELESS_VERSIONS
        .into_iter()
        .chain(HANDSHAKE_VERSIONS)
}

/// How long a stateless client may cache `tools/list`: the served tools change
/// only when their manifests do, and a minute bounds how stale a list can be.
const TOOLS_TTL_MS: u64 = 60_000;
/// How long a stateless client may cache `server/discover`: it changes only
/// when the runner is upgraded.
const DISCOVER_TTL_MS: u64 = 3_600_000;

const INSTRUCTIONS: &str = "Every tool call is validated, authorized, rate limited and audited, then run in a fresh sandbox.";
const SERVER_INFO: ServerInfo = ServerInfo {
    name: "toolwarden",
    version: env!("CARGO_PKG_VERSION"),
};

/// Largest JSON-RPC message read (the largest tool input the CRD allows, plus room).
pub const MAX_MESSAGE_BYTES: usize = 17 * 1024 * 1024;

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;
/// The request needs a capability the client did not declare (the tasks extension's).
const MISSING_REQUIRED_CLIENT_CAPABILITY: i64 = -32021;

/// One JSON-RPC response: `result` or `error`.
#[derive(Serialize)]
struct RpcResponse {
    jsonrpc: &'static str,
    id: Value,
    #[serde(flatten)]
    outcome: Outcome,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Result(Answer),
    Error(RpcError),
}

/// A result in its era's shape: the stateless era adds `resultType`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    #[serde(flatten)]
    reply: Reply,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_type: Option<&'static str>,
}

#[derive(Serialize)]
struct RpcError {
    code: i64,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }
}

/// The results of the methods served.
#[derive(Serialize)]
#[serde(untagged)]
enum Reply {
    Initialize(InitializeResult),
    Discover(DiscoverResult),
    /// `ping`'s empty object.
    Empty {},
    Tools(ToolsList),
    Call(CallToolResult),
    /// A `tools/call` answered with a task handle (`resultType: "task"`).
    TaskCreated(tasks::TaskView),
    /// `tasks/get`.
    Task(tasks::TaskView),
}

#[derive(Serialize)]
struct ToolsList {
    tools: Vec<ToolDescription>,
    /// Stateless era only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    cache: Option<CacheHints>,
}

/// The stateless era's `CacheableResult` fields.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CacheHints {
    ttl_ms: u64,
    cache_scope: CacheScope,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum CacheScope {
    /// The same for every caller: shared caches may keep it.
    Public,
    /// May differ per caller (which tools a caller is shown): only that caller's cache.
    Private,
}

/// Which revision a request speaks, which decides the shapes of its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Era {
    /// 2025-03-26 to 2025-11-25: `initialize` first, results as those revisions give them.
    Handshake,
    /// 2026-07-28: every request self-contained, results with `resultType`.
    Stateless,
}

impl Era {
    fn respond(self, id: Value, reply: Result<Reply, RpcError>) -> RpcResponse {
        let outcome = match reply {
            Ok(reply) => Outcome::Result(Answer {
                result_type: (self == Era::Stateless).then_some(match reply {
                    Reply::TaskCreated(_) => "task",
                    _ => "complete",
                }),
                reply,
            }),
            Err(error) => Outcome::Error(error),
        };
        RpcResponse {
            jsonrpc: "2.0",
            id,
            outcome,
        }
    }

    /// The HTTP status of an answer sent as JSON. The stateless transport gives
    /// JSON-RPC errors their own (400, or 404 for an unknown method); the
    /// handshake era answers every request it could read with 200.
    fn status(self, answer: &RpcResponse) -> StatusCode {
        match (&answer.outcome, self) {
            (Outcome::Error(error), Era::Stateless) => error_status(error.code),
            _ => StatusCode::OK,
        }
    }
}

/// The stateless transport's table (as the official SDKs apply it): request
/// faults 400, an unknown method 404, anything else (an internal error) 200.
fn error_status(code: i64) -> StatusCode {
    match code {
        METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        PARSE_ERROR
        | INVALID_REQUEST
        | INVALID_PARAMS
        | stateless::HEADER_MISMATCH
        | stateless::UNSUPPORTED_PROTOCOL_VERSION
        | MISSING_REQUIRED_CLIENT_CAPABILITY => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

fn error(id: Value, code: i64, message: impl Into<String>) -> RpcResponse {
    Era::Handshake.respond(id, Err(RpcError::new(code, message)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct InitializeParams {
    protocol_version: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InitializeResult {
    protocol_version: &'static str,
    capabilities: Capabilities,
    server_info: ServerInfo,
    instructions: &'static str,
}

/// `server/discover`'s result: what `initialize` told, without a handshake.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DiscoverResult {
    supported_versions: Vec<&'static str>,
    capabilities: Capabilities,
    instructions: &'static str,
    #[serde(flatten)]
    cache: CacheHints,
    #[serde(rename = "_meta")]
    meta: DiscoverMeta,
}

#[derive(Serialize)]
struct DiscoverMeta {
    #[serde(rename = "io.modelcontextprotocol/serverInfo")]
    server_info: ServerInfo,
}

#[derive(Serialize)]
struct Capabilities {
    tools: ToolsCapability,
    /// Stateless era only: extensions are negotiated per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    extensions: Option<Extensions>,
}

#[derive(Serialize)]
struct Extensions {
    /// No settings: an empty object declares support.
    #[serde(rename = "io.modelcontextprotocol/tasks")]
    tasks: NoSettings,
}

#[derive(Serialize)]
struct NoSettings {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolsCapability {
    list_changed: bool,
}

#[derive(Serialize)]
struct ServerInfo {
    name: &'static str,
    version: &'static str,
}

#[derive(Deserialize)]
struct CallToolParams {
    name: String,
    /// As given: `null` reaches the pipeline (and fails its schema), only a
    /// missing field means no arguments.
    #[serde(default = "no_arguments")]
    arguments: Value,
}

fn no_arguments() -> Value {
    Value::Object(serde_json::Map::new())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CallToolResult {
    content: [TextContent; 1],
    is_error: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    structured_content: Option<Value>,
    #[serde(rename = "_meta", skip_serializing_if = "Option::is_none")]
    meta: Option<CallMeta>,
}

#[derive(Serialize)]
struct TextContent {
    #[serde(rename = "type")]
    kind: &'static str,
    text: String,
}

#[derive(Serialize)]
struct CallMeta {
    #[serde(rename = "toolwarden.dev/invocationId")]
    invocation_id: String,
}

pub async fn get() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response()
}

pub async fn delete() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response()
}

pub async fn post(
    State(runner): State<Arc<Runner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // `Origin` and `Host` were checked by the accept loop (DNS rebinding).
    // The caller is authenticated from the headers before the body is read.
    let mut ctx = call_context("mcp", peer, &headers);
    match runner.authenticate(&ctx).await {
        Ok(caller) => ctx.caller = Some(caller),
        Err(problem) => return problem.into_response(),
    }
    let Some(format) = response_format(&headers) else {
        return Problem::new(
            ProblemKind::NotAcceptable,
            "Accept must allow application/json or text/event-stream",
        )
        .into_response();
    };
    if !is_json(&headers) {
        return Problem::new(
            ProblemKind::UnsupportedMediaType,
            "an MCP message must be JSON (Content-Type: application/json)",
        )
        .into_response();
    }
    let bytes = match read_body(body, MAX_MESSAGE_BYTES).await {
        Ok(bytes) => bytes,
        Err(mut problem) => {
            if problem.kind == ProblemKind::TooLarge {
                problem.detail = format!(
                    "an MCP message may be at most {MAX_MESSAGE_BYTES} bytes (17 MiB); \
                     each tool's maxInputBytes then applies to its arguments"
                );
            }
            return problem.into_response();
        }
    };
    // The envelope is read as a `Value`, not a derived struct: JSON-RPC tells an
    // absent `id` (a notification) from `"id": null` (an invalid request), and a
    // batch array from an object, which `#[derive(Deserialize)]` folds together.
    // Params and every answer are typed below.
    let message: Value = match serde_json::from_slice(&bytes) {
        Ok(message) => message,
        Err(e) => {
            let body = error(Value::Null, PARSE_ERROR, format!("not JSON: {e}"));
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
    };
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        // A response or something else with no method: nothing to answer.
        return if message.get("id").is_some()
            && (message.get("result").is_some() || message.get("error").is_some())
        {
            StatusCode::ACCEPTED.into_response()
        } else {
            let body = error(
                Value::Null,
                INVALID_REQUEST,
                "expected one JSON-RPC request or notification",
            );
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        };
    };
    let Some(id) = message.get("id").cloned() else {
        return StatusCode::ACCEPTED.into_response(); // a notification
    };
    // MCP: "the ID MUST NOT be null" (a JSON-RPC id is a string or an integer).
    if !(id.is_string() || id.is_i64() || id.is_u64()) {
        let body = error(
            Value::Null,
            INVALID_REQUEST,
            "a request's id must be a string or an integer",
        );
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    let header_version = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok());
    let era = if stateless::is_stateless(method, &params, header_version) {
        if let Err(refusal) = stateless::check(&headers, method, &params) {
            return refuse(id, &refusal);
        }
        Era::Stateless
    } else if let Err(refusal) = stateless::check_routing(&headers, method, &params, false) {
        return refuse(id, &refusal);
    } else {
        Era::Handshake
    };
    let reply = match (era, method) {
        (Era::Handshake, "initialize") => Ok(Reply::Initialize(initialize(params))),
        (Era::Handshake, "ping") => Ok(Reply::Empty {}),
        (Era::Stateless, "server/discover") => Ok(Reply::Discover(discover())),
        (_, "tools/list") => {
            // Only the tools this caller may call (it was authenticated above).
            let visible = ctx.caller.as_ref().map(|c| runner.visible_tools(c));
            let tools = visible
                .unwrap_or_default()
                .iter()
                .map(|t| describe(t))
                .collect();
            // Tools in name order (the registry's), each described from its manifest
            // alone: the same list every time, which clients and prompt caches rely on.
            let cache = (era == Era::Stateless).then_some(CacheHints {
                ttl_ms: TOOLS_TTL_MS,
                cache_scope: CacheScope::Private,
            });
            Ok(Reply::Tools(ToolsList { tools, cache }))
        }
        (Era::Stateless, "tasks/get" | "tasks/update" | "tasks/cancel") => {
            task_request(&runner.tasks, &task_owner(&ctx), method, &params)
        }
        (_, "tools/call") => {
            let progress_token = event_stream::progress_token(&params);
            let as_task = era == Era::Stateless && tasks::client_declares(&params);
            // Params are an object: serde would also read a struct from an array.
            let Some(CallToolParams { name, arguments }) = params
                .is_object()
                .then(|| serde_json::from_value(params).ok())
                .flatten()
            else {
                let error = RpcError::new(INVALID_PARAMS, "params.name is required");
                let answer = era.respond(id, Err(error));
                return (era.status(&answer), axum::Json(answer)).into_response();
            };
            // A stateless client mirrors the arguments the schema marks with
            // `x-mcp-header` into headers an intermediary may act on: they must agree.
            if era == Era::Stateless
                && let Some(tool) = runner.registry.get(&name)
                && let Err(refusal) =
                    stateless::check_param_headers(&headers, &tool.spec.input_schema, &arguments)
            {
                return refuse(id, &refusal);
            }
            let owner = task_owner(&ctx);
            let call = call_tool(Arc::clone(&runner), ctx, name, arguments);
            if as_task {
                call_or_task(&runner, &owner, call).await
            } else if let Some(token) = progress_token
                && accepts(&headers, "text/event-stream")
            {
                return event_stream::with_progress(
                    token,
                    async move { era.respond(id, call.await) },
                );
            } else {
                call.await
            }
        }
        (_, other) => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!("method not found: {other}"),
        )),
    };
    let answer = era.respond(id, reply);
    match format {
        ResponseFormat::Json => (era.status(&answer), axum::Json(answer)).into_response(),
        ResponseFormat::EventStream => event_stream::single(&answer),
    }
}

/// A request refused before it is served, with the stateless specification's code and status.
fn refuse(id: Value, refusal: &stateless::Refusal) -> Response {
    tracing::debug!(reason = refusal.reason(), "{refusal}");
    let code = refusal.code();
    let error = RpcError {
        code,
        message: refusal.to_string(),
        data: refusal.data(),
    };
    let answer = Era::Stateless.respond(id, Err(error));
    (error_status(code), axum::Json(answer)).into_response()
}

/// Runs a `tools/call` through the pipeline. A call the pipeline refused is the
/// tool's result, flagged as an error with the problem as its content, so the
/// agent sees why and can correct itself; only an unknown tool and a fault of the
/// runner itself are JSON-RPC errors.
async fn call_tool(
    runner: Arc<Runner>,
    ctx: CallContext,
    name: String,
    arguments: Value,
) -> Result<Reply, RpcError> {
    let input = serde_json::to_vec(&arguments).unwrap_or_default();
    let body = std::future::ready(Ok(input.into()));
    let result = match runner.invoke(&ctx, &name, body).await {
        Ok(Called::Ran(success)) => success_result(&success),
        // Not run: a tool error, so the agent does not take it for the tool's answer.
        Ok(Called::AwaitingApproval(pending)) => {
            let view =
                serde_json::to_value(pending.view(jiff::Timestamp::now())).unwrap_or_default();
            call_result(view, true, Some(&pending.invocation_id))
        }
        Err(problem) => match problem.kind {
            // After authentication, so names cannot be probed anonymously.
            ProblemKind::NotFound => {
                return Err(RpcError::new(
                    INVALID_PARAMS,
                    format!("Unknown tool: {name}"),
                ));
            }
            ProblemKind::AuditUnavailable | ProblemKind::Internal => {
                return Err(RpcError::new(INTERNAL_ERROR, problem.detail));
            }
            _ => call_result(problem.body(), true, problem.invocation_id.as_deref()),
        },
    };
    Ok(Reply::Call(result))
}

/// Who owns the tasks a request makes: the caller as its authenticator named it
/// (the same `sub` from another authenticator is someone else).
fn task_owner(ctx: &CallContext) -> String {
    ctx.caller
        .as_ref()
        .map(|c| format!("{}:{}", c.method, c.sub))
        .unwrap_or_default()
}

/// Answers a call inline when it ends within [`tasks::TASK_AFTER`]; else with a
/// task handle, while the call runs on in a task of its own and leaves its
/// outcome in the book. Waiting in place first keeps quick calls free of the
/// spawn and the polling; a book with no room for `owner` means an inline answer.
async fn call_or_task(
    runner: &Arc<Runner>,
    owner: &str,
    call: impl Future<Output = Result<Reply, RpcError>> + Send + 'static,
) -> Result<Reply, RpcError> {
    let mut call = Box::pin(call);
    if let Ok(reply) = tokio::time::timeout(tasks::TASK_AFTER, &mut call).await {
        return reply;
    }
    let Some(task) = runner.tasks.open(owner) else {
        return call.await;
    };
    let task_id = task.task_id().to_string();
    tracing::debug!(task_id, "the call continues as a task");
    let book = Arc::clone(runner);
    let running = tokio::spawn(
        async move {
            // Serializing these types cannot fail: they hold only JSON values and strings.
            let outcome = match call.await {
                Ok(reply) => Ok(serde_json::to_value(reply).unwrap_or_default()),
                Err(error) => Err(serde_json::to_value(error).unwrap_or_default()),
            };
            book.tasks.finish(&task_id, outcome);
        }
        .in_current_span(),
    );
    runner.tasks.attach(task.task_id(), running.abort_handle());
    Ok(Reply::TaskCreated(task))
}

/// `tasks/get`, `tasks/update` and `tasks/cancel`, for the caller's own tasks:
/// anyone else's task is "not found", like one that never was.
fn task_request(
    book: &tasks::TaskBook,
    owner: &str,
    method: &str,
    params: &Value,
) -> Result<Reply, RpcError> {
    if !tasks::client_declares(params) {
        return Err(RpcError {
            code: MISSING_REQUIRED_CLIENT_CAPABILITY,
            message: "Missing required client capability".into(),
            data: Some(serde_json::json!({
                "requiredCapabilities": {"extensions": {tasks::EXTENSION: {}}}})),
        });
    }
    let Some(task_id) = params.get("taskId").and_then(Value::as_str) else {
        return Err(RpcError::new(INVALID_PARAMS, "params.taskId is required"));
    };
    let not_found = || RpcError::new(INVALID_PARAMS, "Failed to retrieve task: Task not found");
    match method {
        "tasks/get" => book
            .get(task_id, owner)
            .map(Reply::Task)
            .ok_or_else(not_found),
        // No task here ever asks for input, so no response is outstanding and
        // every one sent is ignored, as the extension says of unknown keys.
        "tasks/update" => book
            .get(task_id, owner)
            .map(|_| Reply::Empty {})
            .ok_or_else(not_found),
        _ => match book.cancel(task_id, owner) {
            true => Ok(Reply::Empty {}),
            false => Err(not_found()),
        },
    }
}

/// How the answer to a request is sent, from the request's `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseFormat {
    Json,
    EventStream,
}

/// The streamable HTTP transport lets the server answer a request with one JSON
/// body or an SSE stream; a client that accepts only one gets that one. `None`
/// when `Accept` allows neither (406). No `Accept` at all is taken as `*/*`.
fn response_format(headers: &HeaderMap) -> Option<ResponseFormat> {
    if accepts(headers, "application/json") {
        Some(ResponseFormat::Json)
    } else if accepts(headers, "text/event-stream") {
        Some(ResponseFormat::EventStream)
    } else {
        None
    }
}

/// Whether `Accept` allows `media`; no `Accept` at all is taken as `*/*`.
fn accepts(headers: &HeaderMap, media: &str) -> bool {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return true;
    };
    let accept = accept.to_str().unwrap_or_default().to_ascii_lowercase();
    let accepted: Vec<&str> = accept
        .split(',')
        .filter_map(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next()?;
            // `q=0` means "not acceptable".
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (!refused).then_some(media)
        })
        .collect();
    let (kind, _) = media.split_once('/').unwrap_or((media, ""));
    accepted
        .iter()
        .any(|a| *a == media || *a == "*/*" || *a == format!("{kind}/*"))
}

/// Answers with the protocol version asked for when it is spoken, else the
/// newest (a malformed request gets the newest too).
fn initialize(params: Value) -> InitializeResult {
    let asked = serde_json::from_value::<InitializeParams>(params)
        .unwrap_or_default()
        .protocol_version;
    let version = HANDSHAKE_VERSIONS
        .into_iter()
        .find(|v| Some(*v) == asked.as_deref())
        .unwrap_or(HANDSHAKE_VERSIONS[0]);
    InitializeResult {
        protocol_version: version,
        capabilities: Capabilities {
            tools: ToolsCapability {
                list_changed: false,
            },
            extensions: None,
        },
        server_info: SERVER_INFO,
        instructions: INSTRUCTIONS,
    }
}

/// What `server/discover` answers every stateless client alike.
fn discover() -> DiscoverResult {
    DiscoverResult {
        supported_versions: served_versions().collect(),
        capabilities: Capabilities {
            tools: ToolsCapability {
                list_changed: false,
            },
            extensions: Some(Extensions {
                tasks: NoSettings {},
            }),
        },
        instructions: INSTRUCTIONS,
        cache: CacheHints {
            ttl_ms: DISCOVER_TTL_MS,
            cache_scope: CacheScope::Public,
        },
        meta: DiscoverMeta {
            server_info: SERVER_INFO,
        },
    }
}

/// A successful `tools/call` result. The text is the tool's JSON as printed (numbers with
/// every digit); `structuredContent` is its parsed copy, which clients decode anyway.
fn success_result(success: &Success) -> CallToolResult {
    let raw = success.output.get();
    let parsed: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
    let text = match &parsed {
        Value::String(s) => s.clone(),
        _ => raw.to_string(),
    };
    call_result_with_text(text, parsed, false, Some(&success.invocation_id))
}

/// A `tools/call` result: the output as text, and as structured content when it is an object.
fn call_result(output: Value, is_error: bool, invocation_id: Option<&str>) -> CallToolResult {
    let text = match &output {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    call_result_with_text(text, output, is_error, invocation_id)
}

fn call_result_with_text(
    text: String,
    output: Value,
    is_error: bool,
    invocation_id: Option<&str>,
) -> CallToolResult {
    CallToolResult {
        content: [TextContent { kind: "text", text }],
        is_error,
        structured_content: output.is_object().then_some(output),
        meta: invocation_id.map(|id| CallMeta {
            invocation_id: id.to_string(),
        }),
    }
}

/// MCP answers over the whole pipeline with the fake executor: no root, no sandbox.
#[cfg(test)]
mod tests;
