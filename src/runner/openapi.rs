//! `GET /openapi.json`: the REST API as an OpenAPI 3.1 document, generated
//! from the tools served (each tool its own invoke path, its `inputSchema` as
//! the request body and its `outputSchema` inside the answer), with every
//! problem type. Client generators and API fuzzers read it. Pure.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::problem::{ProblemKind, TYPE_BASE};
use super::tool::PreparedTool;
use super::tool_metadata::describe;

/// Statuses every authenticated endpoint may answer besides its own.
const AUTH_STATUSES: [u16; 2] = [401, 403];

/// The document for `tools`, the ones the asking caller may call. `oauth`:
/// the runner serves protected resource metadata.
pub fn document(tools: &[Arc<PreparedTool>], oauth: bool) -> Value {
    let mut paths = Map::new();
    paths.insert(
        "/v1/tools".into(),
        json!({"get": operation(
            "listTools",
            "The tools this caller may call",
            json!({"200": json_response("The tools", json!({"$ref": "#/components/schemas/ToolList"}))}),
            &AUTH_STATUSES,
        )}),
    );
    for tool in tools {
        paths.insert(
            format!("/v1/tools/{}/invoke", tool.name),
            json!({"post": invoke_operation(tool)}),
        );
    }
    let mut approval = operation(
        "getApproval",
        "Where a call answered 202 stands (only its caller sees it)",
        json!({"200": json_response("The approval", json!({"$ref": "#/components/schemas/Approval"}))}),
        &[401, 403, 404],
    );
    approval["parameters"] =
        json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    paths.insert("/v1/approvals/{id}".into(), json!({"get": approval}));
    paths.insert(
        "/openapi.json".into(),
        json!({"get": operation(
            "getOpenApi",
            "This document, with the tools this caller may call",
            json!({"200": json_response("An OpenAPI 3.1 document", json!({"type": "object"}))}),
            &AUTH_STATUSES,
        )}),
    );
    for (path, id, summary) in [
        ("/healthz", "healthz", "Liveness"),
        (
            "/readyz",
            "readyz",
            "Readiness: the audit log can be written",
        ),
    ] {
        let mut responses = json!({"200": {"description": "ok",
            "content": {"text/plain": {"schema": {"type": "string"}}}}});
        if path == "/readyz" {
            responses["503"] = problem_response(&[ProblemKind::AuditUnavailable]);
        }
        paths.insert(
            path.into(),
            json!({"get": {"operationId": id, "summary": summary, "security": [], "responses": responses}}),
        );
    }
    if oauth {
        paths.insert(
            super::oauth::METADATA_PATH.into(),
            json!({"get": {"operationId": "getProtectedResourceMetadata",
                "summary": "OAuth 2.0 Protected Resource Metadata (RFC 9728)", "security": [],
                "responses": {"200": json_response("The metadata", json!({"type": "object",
                    "required": ["resource", "authorization_servers"]}))}}}),
        );
    }
    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "toolwarden runner",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every call is authenticated, validated, sanitized, authorized, \
                rate limited and audited, then run in a fresh sandbox. Errors are RFC 9457 problems.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": components(),
        },
    })
}

/// `POST /v1/tools/{name}/invoke` for one tool.
fn invoke_operation(tool: &PreparedTool) -> Value {
    let description = describe(tool);
    let output = description.output_schema.clone().unwrap_or(json!({}));
    let mut responses = json!({
        "200": json_response("The tool ran; `output` is what it printed", json!({
            "type": "object",
            "required": ["invocationId", "output", "exitCode", "durationMs"],
            "additionalProperties": false,
            "properties": {
                "invocationId": {"type": "string"},
                "output": output,
                "exitCode": {"type": "integer"},
                "durationMs": {"type": "integer", "minimum": 0},
                "outputTruncated": {"type": "boolean"},
            },
        })),
    });
    if tool.spec.approval.as_ref().is_some_and(|a| a.required) {
        responses["202"] = json_response(
            "A human must approve the call first: it did not run",
            json!({"$ref": "#/components/schemas/Approval"}),
        );
    }
    let mut statuses = vec![400, 401, 403, 404, 408, 413, 415, 502, 503, 504];
    if tool.spec.rate_limit.is_some() {
        statuses.push(429);
    }
    let mut op = operation(
        &format!("invoke_{}", tool.name),
        &description.title,
        responses,
        &statuses,
    );
    op["description"] = description.description.into();
    op["requestBody"] = json!({"required": true,
        "content": {"application/json": {"schema": description.input_schema}}});
    op["x-toolwarden-annotations"] =
        serde_json::to_value(&description.annotations).unwrap_or_default();
    op
}

/// An operation with its own responses plus problems for `statuses`.
fn operation(id: &str, summary: &str, mut responses: Value, statuses: &[u16]) -> Value {
    for status in statuses {
        let kinds: Vec<ProblemKind> = ProblemKind::ALL
            .into_iter()
            .filter(|k| k.status().as_u16() == *status)
            .collect();
        responses[status.to_string()] = problem_response(&kinds);
    }
    json!({"operationId": id, "summary": summary, "responses": responses})
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// A problem response of one of `kinds` (several kinds share a status).
fn problem_response(kinds: &[ProblemKind]) -> Value {
    let titles: Vec<&str> = kinds.iter().map(|k| k.title()).collect();
    let types: Vec<String> = kinds
        .iter()
        .map(|k| format!("{TYPE_BASE}{}", k.slug()))
        .collect();
    json!({
        "description": titles.join("; "),
        "content": {"application/problem+json": {"schema": {
            "allOf": [{"$ref": "#/components/schemas/Problem"}],
            "properties": {"type": {"enum": types}},
        }}},
    })
}

fn components() -> Value {
    let types: Vec<String> = ProblemKind::ALL
        .iter()
        .map(|k| format!("{TYPE_BASE}{}", k.slug()))
        .collect();
    json!({
        "Problem": {
            "type": "object",
            "description": "An RFC 9457 problem; `type` names the kind of failure.",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string", "enum": types},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object",
                    "required": ["path", "message"],
                    "properties": {"path": {"type": "string"}, "message": {"type": "string"}}}},
                "invocationId": {"type": "string"},
                "retryAfterSeconds": {"type": "integer", "minimum": 1},
            },
        },
        "Approval": {
            "type": "object",
            "required": ["status", "approvalId", "invocationId", "tool", "requestedAt", "expiresAt", "location"],
            "properties": {
                "status": {"enum": ["pending", "expired"]},
                "approvalId": {"type": "string"},
                "invocationId": {"type": "string"},
                "tool": {"type": "string"},
                "requestedAt": {"type": "string", "format": "date-time"},
                "expiresAt": {"type": "string", "format": "date-time"},
                "location": {"type": "string"},
            },
        },
        "ToolList": {
            "type": "object",
            "required": ["tools", "isolation"],
            "properties": {
                "isolation": {"type": "string"},
                "tools": {"type": "array", "items": {
                    "type": "object",
                    "required": ["name", "title", "description", "inputSchema", "annotations", "risk", "generation"],
                    "properties": {
                        "name": {"type": "string"},
                        "title": {"type": "string"},
                        "description": {"type": "string"},
                        "inputSchema": {"type": "object"},
                        "outputSchema": {"type": "object"},
                        "annotations": {"type": "object"},
                        "risk": {"enum": ["low", "medium", "high"]},
                        "generation": {"type": "integer"},
                        "isolation": {"type": "object"},
                    },
                }},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::fake::TestRunner;

    #[test]
    fn every_tool_has_its_invoke_path_with_its_schemas_and_every_problem_type_is_listed() {
        let t = TestRunner::notes();
        let tools: Vec<_> = t.runner.registry.snapshot().values().cloned().collect();
        let doc = document(&tools, false);
        assert_eq!(doc["openapi"], "3.1.0");
        let invoke = &doc["paths"]["/v1/tools/notes/invoke"]["post"];
        assert_eq!(
            invoke["requestBody"]["content"]["application/json"]["schema"],
            tools[0].spec.input_schema
        );
        // notes needs approval for writes and is rate limited.
        for status in ["200", "202", "400", "401", "403", "429", "502"] {
            assert!(invoke["responses"][status].is_object(), "{status}");
        }
        let types = doc["components"]["schemas"]["Problem"]["properties"]["type"]["enum"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(types, ProblemKind::ALL.len());
        assert!(
            doc["paths"]
                .get(super::super::oauth::METADATA_PATH)
                .is_none()
        );
        // The document is valid JSON Schema where it embeds schemas: the 200's compiles.
        let ok = &invoke["responses"]["200"]["content"]["application/json"]["schema"];
        jsonschema::draft202012::new(ok).unwrap();
    }
}
