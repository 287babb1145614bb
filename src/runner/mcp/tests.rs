//! Tests of the MCP endpoint: both eras, the checks, long calls and tasks.

use axum::Router;
use axum::http::Request;
use std::time::Duration;

use serde_json::json;
use tower::ServiceExt;

use super::*;
use crate::runner::fake::{TOKEN, TestRunner};

async fn send(t: &TestRunner, token: Option<&str>, message: &Value) -> (StatusCode, Value) {
    let mut headers = vec![];
    if let Some(token) = token {
        headers.push(("authorization", format!("Bearer {token}")));
    }
    let response = exchange(t, headers, message).await;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// One POST to `/mcp` with `headers` (beside the content type and `Accept`).
async fn exchange(
    t: &TestRunner,
    headers: Vec<(&'static str, String)>,
    message: &Value,
) -> Response {
    let router = Router::new()
        .route("/mcp", axum::routing::post(post))
        .with_state(t.runner.clone());
    let mut request = Request::post("/mcp")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let mut request = request.body(Body::from(message.to_string())).unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    router.oneshot(request).await.unwrap()
}

/// A stateless (2026-07-28) request with consistent headers: its answer.
async fn stateless(t: &TestRunner, method: &str, params: Value) -> (StatusCode, Value) {
    stateless_with(t, method, params, json!({})).await
}

/// A stateless request from a client that declares the tasks extension.
async fn with_tasks(t: &TestRunner, method: &str, params: Value) -> (StatusCode, Value) {
    let capabilities = json!({"extensions": {tasks::EXTENSION: {}}});
    stateless_with(t, method, params, capabilities).await
}

async fn stateless_with(
    t: &TestRunner,
    method: &str,
    mut params: Value,
    capabilities: Value,
) -> (StatusCode, Value) {
    params["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2026-07-28");
    params["_meta"]["io.modelcontextprotocol/clientCapabilities"] = capabilities;
    let mut headers = vec![
        ("authorization", format!("Bearer {TOKEN}")),
        ("mcp-protocol-version", "2026-07-28".to_string()),
        ("mcp-method", method.to_string()),
    ];
    if let Some(name) = params["name"].as_str().or(params["taskId"].as_str()) {
        headers.push(("mcp-name", name.to_string()));
    }
    let message = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let response = exchange(t, headers, &message).await;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn the_stateless_era_answers_in_its_own_shapes() {
    let t = TestRunner::notes();
    let (status, discover) = stateless(&t, "server/discover", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        discover["result"],
        json!({
            "supportedVersions": ["2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26"],
            "capabilities": {"tools": {"listChanged": false},
                             "extensions": {"io.modelcontextprotocol/tasks": {}}},
            "instructions": INSTRUCTIONS,
            "ttlMs": DISCOVER_TTL_MS,
            "cacheScope": "public",
            "_meta": {"io.modelcontextprotocol/serverInfo":
                      {"name": "toolwarden", "version": env!("CARGO_PKG_VERSION")}},
            "resultType": "complete",
        })
    );
    let (_, list) = stateless(&t, "tools/list", json!({})).await;
    assert_eq!(list["result"]["resultType"], "complete");
    assert_eq!(list["result"]["ttlMs"], TOOLS_TTL_MS);
    assert_eq!(list["result"]["tools"][0]["name"], "notes");

    t.executor.prints(r#"{"note": "hi"}"#);
    let read = json!({"name": "notes", "arguments": {"operation": "read", "name": "todo"}});
    let (_, call) = stateless(&t, "tools/call", read).await;
    assert_eq!(call["result"]["resultType"], "complete");
    assert_eq!(call["result"]["isError"], false);
    // Invalid input: still the tool's error, now with resultType.
    let bad = json!({"name": "notes", "arguments": {"operation": 5}});
    let (status, call) = stateless(&t, "tools/call", bad).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(call["result"]["isError"], true, "{call}");
    assert_eq!(call["result"]["structuredContent"]["status"], 400, "{call}");
    // Faults of the request are the transport's statuses; `ping` and `initialize`'s
    // siblings are gone from this era.
    let (status, call) = stateless(&t, "tools/call", json!({"name": "nope"})).await;
    assert_eq!(
        (status, &call["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!(INVALID_PARAMS))
    );
    let (status, ping) = stateless(&t, "ping", json!({})).await;
    assert_eq!(
        (status, &ping["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!(METHOD_NOT_FOUND))
    );
    // The handshake era keeps its shapes: no resultType.
    let (_, list) = send(
        &t,
        Some(TOKEN),
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert!(list["result"].get("resultType").is_none(), "{list}");
    assert!(list["result"].get("ttlMs").is_none(), "{list}");
}

/// Time is paused: the fake tool's 9 s pass at once, and with them the progress ticks.
#[tokio::test(start_paused = true)]
async fn a_call_with_a_progress_token_streams_progress_then_its_result() {
    let t = TestRunner::notes();
    t.executor.prints(r#"{"note": "hi"}"#);
    t.executor.delay(Duration::from_secs(9));
    let mut call = tools_call("notes".into(), json!({"operation": "read", "name": "todo"}));
    call["params"]["_meta"] = json!({"progressToken": 42});
    let headers = vec![("authorization", format!("Bearer {TOKEN}"))];
    let response = exchange(&t, headers, &call).await;
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let messages: Vec<Value> = String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let (answer, progress) = messages.split_last().unwrap();
    assert_eq!(answer["result"]["structuredContent"], json!({"note": "hi"}));
    let ticks: Vec<_> = progress
        .iter()
        .map(|p| p["params"]["progress"].clone())
        .collect();
    assert_eq!(ticks, [json!(2), json!(4), json!(6), json!(8)]);
    for p in progress {
        assert_eq!(p["method"], "notifications/progress");
        assert_eq!(p["params"]["progressToken"], 42);
    }

    // Without a token (or with one that is no string or integer): one JSON body.
    t.executor.delay(Duration::ZERO);
    t.executor.prints(r#"{"note": "hi"}"#);
    call["params"]["_meta"] = json!({"progressToken": true});
    let (status, answer) = send(&t, Some(TOKEN), &call).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["result"]["isError"], false, "{answer}");
}

/// Time is paused: the fake tool's 9 s pass as soon as the test waits.
#[tokio::test(start_paused = true)]
async fn a_slow_call_from_a_tasks_client_becomes_a_task_polled_to_its_result() {
    let t = TestRunner::notes();
    let read = json!({"name": "notes", "arguments": {"operation": "read", "name": "todo"}});
    // Quick: answered inline, even to a client that could take a task.
    t.executor.prints(r#"{"note": "quick"}"#);
    let (_, call) = with_tasks(&t, "tools/call", read.clone()).await;
    assert_eq!(call["result"]["resultType"], "complete", "{call}");
    assert_eq!(call["result"]["structuredContent"]["note"], "quick");

    t.executor.prints(r#"{"note": "slow"}"#);
    t.executor.delay(Duration::from_secs(9));
    let (status, call) = with_tasks(&t, "tools/call", read.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let handle = &call["result"];
    assert_eq!(handle["resultType"], "task", "{call}");
    assert_eq!(handle["status"], "working");
    assert_eq!(handle["ttlMs"], tasks::TASK_TTL.as_millis() as u64);
    assert_eq!(
        handle["pollIntervalMs"],
        tasks::POLL_INTERVAL.as_millis() as u64
    );
    assert!(handle.get("result").is_none());
    let task_id = handle["taskId"].as_str().unwrap().to_string();
    let get = json!({"taskId": task_id});
    let (_, polled) = with_tasks(&t, "tasks/get", get.clone()).await;
    assert_eq!(polled["result"]["status"], "working", "{polled}");
    assert_eq!(polled["result"]["resultType"], "complete");

    tokio::time::sleep(Duration::from_secs(10)).await;
    let (_, polled) = with_tasks(&t, "tasks/get", get.clone()).await;
    let done = &polled["result"];
    assert_eq!(done["status"], "completed", "{polled}");
    assert_eq!(done["result"]["structuredContent"], json!({"note": "slow"}));
    assert_eq!(done["result"]["isError"], false);
    let invocation = t.records().pop().unwrap()["invocationId"].clone();
    assert_eq!(
        done["result"]["_meta"]["toolwarden.dev/invocationId"],
        invocation
    );
    assert_eq!(done["createdAt"], handle["createdAt"]);
    // `tasks/update` has nothing to answer; `tasks/cancel` of a finished task keeps it.
    let update = json!({"taskId": task_id, "inputResponses": {"x": {}}});
    let (_, ack) = with_tasks(&t, "tasks/update", update).await;
    assert_eq!(ack["result"], json!({"resultType": "complete"}));
    let (_, ack) = with_tasks(&t, "tasks/cancel", get.clone()).await;
    assert_eq!(ack["result"], json!({"resultType": "complete"}));
    let (_, polled) = with_tasks(&t, "tasks/get", get.clone()).await;
    assert_eq!(polled["result"]["status"], "completed");

    // Without the extension declared: no task, and the tasks methods refuse.
    let (status, refused) = stateless(&t, "tasks/get", get.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"]["code"], MISSING_REQUIRED_CLIENT_CAPABILITY);
    assert_eq!(
        refused["error"]["data"],
        json!({"requiredCapabilities": {"extensions": {tasks::EXTENSION: {}}}})
    );
    t.executor.prints(r#"{"note": "inline"}"#);
    let (_, call) = stateless(&t, "tools/call", read.clone()).await;
    assert_eq!(
        call["result"]["structuredContent"]["note"], "inline",
        "{call}"
    );
    // The handshake era has no tasks.
    let message = json!({"jsonrpc": "2.0", "id": 2, "method": "tasks/get", "params": get});
    let (_, answer) = send(&t, Some(TOKEN), &message).await;
    assert_eq!(answer["error"]["code"], METHOD_NOT_FOUND);
    // An unknown id is invalid params; no id at all, no `Mcp-Name` to route on.
    let unknown = json!({"taskId": "786512e2-9e0d-44bd-8f29-789f320fe840"});
    let (status, answer) = with_tasks(&t, "tasks/get", unknown).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"]["code"], INVALID_PARAMS, "{answer}");
    let (_, answer) = with_tasks(&t, "tasks/get", json!({})).await;
    assert_eq!(
        answer["error"]["code"],
        stateless::HEADER_MISMATCH,
        "{answer}"
    );
}

/// A task cancelled while its tool runs: cancelled at once; the run ends on its
/// own and is audited as `abandoned`.
#[tokio::test(start_paused = true)]
async fn a_cancelled_task_is_cancelled_and_its_run_still_audited() {
    let t = TestRunner::notes();
    t.executor.prints(r#"{"note": "slow"}"#);
    t.executor.delay(Duration::from_secs(9));
    let read = json!({"name": "notes", "arguments": {"operation": "read", "name": "todo"}});
    let (_, call) = with_tasks(&t, "tools/call", read).await;
    let get = json!({"taskId": call["result"]["taskId"]});
    let (_, ack) = with_tasks(&t, "tasks/cancel", get.clone()).await;
    assert_eq!(ack["result"], json!({"resultType": "complete"}), "{ack}");
    let (_, polled) = with_tasks(&t, "tasks/get", get.clone()).await;
    assert_eq!(polled["result"]["status"], "cancelled", "{polled}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let closing = t.records().pop().unwrap();
    assert_eq!(closing["event"], "abandoned", "{closing}");
    let (_, polled) = with_tasks(&t, "tasks/get", get).await;
    assert_eq!(polled["result"]["status"], "cancelled", "{polled}");
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
    let text: Value = serde_json::from_str(result["content"][0]["text"].as_str().unwrap()).unwrap();
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
        let message = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": params});
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
    assert_eq!(answer["result"]["protocolVersion"], HANDSHAKE_VERSIONS[0]);
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
