//! MCP (Model Context Protocol) over the streamable HTTP transport at `/mcp`:
//! `initialize`, `ping`, `tools/list` and `tools/call`, answered as plain JSON
//! (the transport allows a JSON response instead of an SSE stream). The server
//! is stateless: no session IDs, no server-initiated messages, so `GET` and
//! `DELETE` answer 405 as the transport specifies for that case.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::pipeline::{Called, Runner, Success};
use super::problem::{Problem, ProblemKind};
use super::request::{call_context, is_json, read_body};
use super::tool_metadata::{ToolDescription, describe};

/// Protocol revisions spoken, newest first; the newest is offered when the
/// client asks for one we do not know.
pub const PROTOCOL_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// Largest JSON-RPC message read (the largest tool input the CRD allows, plus room).
pub const MAX_MESSAGE_BYTES: usize = 17 * 1024 * 1024;

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;

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
    Result(Reply),
    Error(RpcError),
}

#[derive(Serialize)]
struct RpcError {
    code: i64,
    message: String,
}

/// The results of the methods served.
#[derive(Serialize)]
#[serde(untagged)]
enum Reply {
    Initialize(InitializeResult),
    /// `ping`'s empty object.
    Empty {},
    Tools {
        tools: Vec<ToolDescription>,
    },
    Call(CallToolResult),
}

fn error(id: Value, code: i64, message: impl Into<String>) -> RpcResponse {
    RpcResponse {
        jsonrpc: "2.0",
        id,
        outcome: Outcome::Error(RpcError {
            code,
            message: message.into(),
        }),
    }
}

fn result(id: Value, reply: Reply) -> RpcResponse {
    RpcResponse {
        jsonrpc: "2.0",
        id,
        outcome: Outcome::Result(reply),
    }
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

#[derive(Serialize)]
struct Capabilities {
    tools: ToolsCapability,
}

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
    if let Some(version) = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        && !PROTOCOL_VERSIONS.contains(&version)
    {
        let body = error(
            Value::Null,
            INVALID_REQUEST,
            format!("unsupported MCP-Protocol-Version {version}"),
        );
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
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
    let answer = match method {
        "initialize" => result(id, Reply::Initialize(initialize(params))),
        "ping" => result(id, Reply::Empty {}),
        "tools/list" => {
            // Only the tools this caller may call (it was authenticated above).
            let visible = ctx.caller.as_ref().map(|c| runner.visible_tools(c));
            let tools = visible
                .unwrap_or_default()
                .iter()
                .map(|t| describe(t))
                .collect();
            result(id, Reply::Tools { tools })
        }
        "tools/call" => {
            // Params are an object: serde would also read a struct from an array.
            let Some(CallToolParams { name, arguments }) = params
                .is_object()
                .then(|| serde_json::from_value(params).ok())
                .flatten()
            else {
                return axum::Json(error(id, INVALID_PARAMS, "params.name is required"))
                    .into_response();
            };
            let input = serde_json::to_vec(&arguments).unwrap_or_default();
            let body = std::future::ready(Ok(input.into()));
            match runner.invoke(&ctx, &name, body).await {
                Ok(Called::Ran(success)) => result(id, Reply::Call(success_result(&success))),
                // Not run: a tool error, so the agent does not take it for the tool's answer.
                Ok(Called::AwaitingApproval(pending)) => {
                    let view = serde_json::to_value(pending.view(jiff::Timestamp::now()))
                        .unwrap_or_default();
                    result(
                        id,
                        Reply::Call(call_result(view, true, Some(&pending.invocation_id))),
                    )
                }
                Err(problem) => match problem.kind {
                    ProblemKind::Unauthenticated => return problem.into_response(),
                    // After authentication, so names cannot be probed anonymously.
                    ProblemKind::NotFound => {
                        error(id, INVALID_PARAMS, format!("Unknown tool: {name}"))
                    }
                    ProblemKind::AuditUnavailable | ProblemKind::Internal => {
                        error(id, INTERNAL_ERROR, problem.detail)
                    }
                    _ => result(
                        id,
                        Reply::Call(call_result(
                            problem.body(),
                            true,
                            problem.invocation_id.as_deref(),
                        )),
                    ),
                },
            }
        }
        other => error(id, METHOD_NOT_FOUND, format!("method not found: {other}")),
    };
    match format {
        ResponseFormat::Json => axum::Json(answer).into_response(),
        ResponseFormat::EventStream => event_stream(&answer),
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
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Some(ResponseFormat::Json);
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
    let allows = |media: &str| {
        let (kind, _) = media.split_once('/').unwrap_or((media, ""));
        accepted
            .iter()
            .any(|a| *a == media || *a == "*/*" || *a == format!("{kind}/*"))
    };
    if allows("application/json") {
        Some(ResponseFormat::Json)
    } else if allows("text/event-stream") {
        Some(ResponseFormat::EventStream)
    } else {
        None
    }
}

/// One JSON-RPC response as an SSE stream of one `message` event, then the end.
fn event_stream(answer: &RpcResponse) -> Response {
    let data = serde_json::to_string(answer).expect("a response always serializes");
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        format!("event: message\ndata: {data}\n\n"),
    )
        .into_response()
}

/// Answers with the protocol version asked for when it is spoken, else the
/// newest (a malformed request gets the newest too).
fn initialize(params: Value) -> InitializeResult {
    let asked = serde_json::from_value::<InitializeParams>(params)
        .unwrap_or_default()
        .protocol_version;
    let version = PROTOCOL_VERSIONS
        .into_iter()
        .find(|v| Some(*v) == asked.as_deref())
        .unwrap_or(PROTOCOL_VERSIONS[0]);
    InitializeResult {
        protocol_version: version,
        capabilities: Capabilities {
            tools: ToolsCapability {
                list_changed: false,
            },
        },
        server_info: ServerInfo {
            name: "toolwarden",
            version: env!("CARGO_PKG_VERSION"),
        },
        instructions: "Every tool call is validated, authorized, rate limited and audited, then run in a fresh sandbox.",
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
mod tests {
    use axum::Router;
    use axum::http::Request;
    use serde_json::json;
    use tower::ServiceExt;

    use super::*;
    use crate::runner::fake::{TOKEN, TestRunner};

    async fn send(t: &TestRunner, token: Option<&str>, message: &Value) -> (StatusCode, Value) {
        let router = Router::new()
            .route("/mcp", axum::routing::post(post))
            .with_state(t.runner.clone());
        let mut request = Request::post("/mcp")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let mut request = request.body(Body::from(message.to_string())).unwrap();
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn tools_call(name: Value, arguments: Value) -> Value {
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
               "params": {"name": name, "arguments": arguments}})
    }

    #[tokio::test]
    async fn refusals_are_tool_errors_and_protocol_faults_are_jsonrpc_errors() {
        let t = TestRunner::notes();
        // A refusal of the call is the tool's result, flagged, with the problem as content.
        let forbidden = tools_call(
            "notes".into(),
            json!({"operation": "read", "name": "private"}),
        );
        let (status, answer) = send(&t, Some(TOKEN), &forbidden).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["id"], 7);
        let result = &answer["result"];
        assert_eq!(result["isError"], true);
        assert_eq!(result["structuredContent"]["status"], 403);
        let invocation = t.records().pop().unwrap()["invocationId"].clone();
        assert_eq!(result["_meta"]["toolwarden.dev/invocationId"], invocation);
        let text: Value =
            serde_json::from_str(result["content"][0]["text"].as_str().unwrap()).unwrap();
        assert_eq!(text, result["structuredContent"]);

        // A call awaiting approval did not run: a flagged result holding the pending approval.
        let write = tools_call(
            "notes".into(),
            json!({"operation": "write", "name": "todo", "text": "x"}),
        );
        let (_, answer) = send(&t, Some(TOKEN), &write).await;
        let result = &answer["result"];
        assert_eq!(result["isError"], true, "{answer}");
        assert_eq!(result["structuredContent"]["status"], "pending", "{answer}");
        let approval = result["structuredContent"]["approvalId"].as_str().unwrap();
        assert_eq!(
            result["structuredContent"]["location"],
            format!("/v1/approvals/{approval}")
        );
        assert!(t.executor.runs().is_empty());

        // An unknown tool and a missing name are invalid params.
        let (_, answer) = send(&t, Some(TOKEN), &tools_call("nope".into(), json!({}))).await;
        assert_eq!(answer["error"]["code"], INVALID_PARAMS);
        assert_eq!(answer["error"]["message"], "Unknown tool: nope");
        for params in [
            json!({"arguments": {}}),
            json!(["notes"]),
            json!({"name": 3}),
        ] {
            let message =
                json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": params});
            let (_, answer) = send(&t, Some(TOKEN), &message).await;
            assert_eq!(answer["error"]["code"], INVALID_PARAMS, "{params}");
        }
        // An unknown method; a null id (a request's id must not be null).
        let (_, answer) = send(
            &t,
            Some(TOKEN),
            &json!({"jsonrpc": "2.0", "id": "x", "method": "nope"}),
        )
        .await;
        assert_eq!(answer["error"]["code"], METHOD_NOT_FOUND);
        assert_eq!(answer["id"], "x");
        let (status, answer) = send(
            &t,
            Some(TOKEN),
            &json!({"jsonrpc": "2.0", "id": null, "method": "ping"}),
        )
        .await;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (StatusCode::BAD_REQUEST, &json!(INVALID_REQUEST))
        );
        // A notification gets no answer.
        let (status, _) = send(
            &t,
            Some(TOKEN),
            &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert!(t.executor.runs().is_empty());

        // No token: the HTTP 401 problem, before any message is read.
        let (status, problem) = send(&t, None, &tools_call("notes".into(), json!({}))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(problem["status"], 401);

        // The audit log is down: an internal error, and nothing runs.
        t.break_audit();
        let (_, answer) = send(
            &t,
            Some(TOKEN),
            &tools_call("notes".into(), json!({"operation": "read", "name": "todo"})),
        )
        .await;
        assert_eq!(answer["error"]["code"], INTERNAL_ERROR);
        assert!(t.executor.runs().is_empty());
    }

    #[tokio::test]
    async fn initialize_list_and_a_successful_call() {
        let t = TestRunner::notes();
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                          "params": {"protocolVersion": "2025-06-18"}});
        let (_, answer) = send(&t, Some(TOKEN), &init).await;
        assert_eq!(answer["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(
            answer["result"]["capabilities"],
            json!({"tools": {"listChanged": false}})
        );
        let unknown = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                             "params": {"protocolVersion": 20}});
        let (_, answer) = send(&t, Some(TOKEN), &unknown).await;
        assert_eq!(answer["result"]["protocolVersion"], PROTOCOL_VERSIONS[0]);
        let (_, answer) = send(
            &t,
            Some(TOKEN),
            &json!({"jsonrpc": "2.0", "id": 2, "method": "ping"}),
        )
        .await;
        assert_eq!(answer["result"], json!({}));

        let (_, answer) = send(
            &t,
            Some(TOKEN),
            &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
        )
        .await;
        let tool = &answer["result"]["tools"][0];
        assert_eq!(tool["name"], "notes");
        assert_eq!(
            tool["inputSchema"]["required"],
            json!(["operation", "name"])
        );
        // No mount, Kubernetes rule or egress: nothing it could write.
        assert_eq!(
            tool["annotations"],
            json!({"title": "Notes", "readOnlyHint": true, "destructiveHint": false,
                   "openWorldHint": false})
        );
        assert!(tool.get("outputSchema").is_none());

        t.executor.prints(r#"{"note": 12345678901234567890123}"#);
        let call = tools_call("notes".into(), json!({"operation": "read", "name": "todo"}));
        let (_, answer) = send(&t, Some(TOKEN), &call).await;
        let result = &answer["result"];
        assert_eq!(result["isError"], false);
        assert_eq!(
            result["content"][0]["text"],
            r#"{"note": 12345678901234567890123}"#
        );
        assert!(result["structuredContent"].is_object());
        assert_eq!(
            t.executor.runs()[0].stdin,
            json!({"operation": "read", "name": "todo"})
        );
    }

    #[tokio::test]
    async fn a_declared_output_schema_is_listed_and_answers_are_structured_content() {
        let t = TestRunner::new(&[crate::runner::fake::FORECAST], &[]);
        let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
        let (_, answer) = send(&t, Some(TOKEN), &list).await;
        let tool = &answer["result"]["tools"][0];
        assert_eq!(tool["title"], "Forecast");
        assert_eq!(
            tool["outputSchema"]["required"],
            json!(["weather", "celsius"])
        );

        t.executor.prints(r#"{"weather": "rain", "celsius": 9}"#);
        let (_, answer) = send(&t, Some(TOKEN), &tools_call("forecast".into(), json!({}))).await;
        let result = &answer["result"];
        assert_eq!(result["isError"], false, "{answer}");
        assert_eq!(
            result["structuredContent"],
            json!({"weather": "rain", "celsius": 9})
        );

        // Outside the schema: a tool error naming the problem, never the output.
        t.executor
            .prints(r#"{"weather": "rain", "celsius": 9, "debug": "x"}"#);
        let (_, answer) = send(&t, Some(TOKEN), &tools_call("forecast".into(), json!({}))).await;
        let result = &answer["result"];
        assert_eq!(result["isError"], true, "{answer}");
        assert_eq!(
            result["structuredContent"]["type"],
            "https://toolwarden.dev/problems/tool-output-invalid"
        );
        assert!(
            !result["content"][0]["text"]
                .as_str()
                .unwrap()
                .contains("debug")
        );
    }
}
