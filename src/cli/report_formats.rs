//! Renders `check` findings as text, JSON or SARIF 2.1.0.

use serde_json::{Value, json};

use crate::api::PolicyMode;
use crate::api::manifest::Origin;
use crate::policy::{Violation, catalog};

/// One violation of one tool, with where the tool came from.
#[derive(Clone, Debug)]
pub struct Finding {
    pub origin: Origin,
    pub tool: String,
    pub violation: Violation,
}

/// `file:document: RULE path: message (source)`, with the mode in front of
/// the source when the rule is not an enforced one: two policies demanding
/// the same rule give two lines that say which is which.
pub fn render_text(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|f| {
            let v = &f.violation;
            let note = if v.mode == PolicyMode::Enforce {
                format!(" ({})", v.source())
            } else {
                format!(" ({}, {})", v.mode.as_str(), v.source())
            };
            format!("{}: {} {}: {}{note}\n", f.origin, v.rule, v.path, v.message)
        })
        .collect()
}

pub fn render_json(findings: &[Finding]) -> String {
    let violations: Vec<Value> = findings
        .iter()
        .map(|f| {
            let v = &f.violation;
            json!({
                "rule": v.rule,
                "item": v.item,
                "path": v.path,
                "message": v.message,
                "file": f.origin.file.display().to_string(),
                "document": f.origin.document,
                "line": f.origin.line,
                "tool": f.tool,
                "policy": v.policy,
                "mode": v.mode,
            })
        })
        .collect();
    format!(
        "{}\n",
        serde_json::to_string_pretty(&json!({ "violations": violations }))
            .expect("JSON values serialize")
    )
}

/// SARIF 2.1.0 as GitHub code scanning and other SARIF consumers read it.
pub fn render_sarif(findings: &[Finding]) -> String {
    let rules: Vec<Value> = catalog::ALL
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "name": r.item.as_str(),
                "shortDescription": { "text": r.summary },
                "properties": { "checklistItem": r.item.as_str(), "baseline": r.baseline },
            })
        })
        .collect();
    let results: Vec<Value> = findings
        .iter()
        .map(|f| {
            let v = &f.violation;
            let level = match v.mode {
                PolicyMode::Enforce => "error",
                PolicyMode::Warn => "warning",
                PolicyMode::Audit => "note",
            };
            json!({
                "ruleId": v.rule,
                "ruleIndex": catalog::ALL.iter().position(|r| r.id == v.rule),
                "level": level,
                "message": { "text": format!("{}: {}", v.path, v.message) },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": { "uri": f.origin.file.display().to_string() },
                        "region": { "startLine": f.origin.line },
                    },
                    "logicalLocations": [{ "fullyQualifiedName": format!("{}/{}", f.tool, v.path), "kind": "member" }],
                }],
                "properties": { "tool": f.tool, "policy": v.policy, "document": f.origin.document },
            })
        })
        .collect();
    let sarif = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "toolwarden",
                "version": env!("CARGO_PKG_VERSION"),
                "informationUri": "https://toolwarden.dev",
                "rules": rules,
            }},
            "results": results,
        }],
    });
    format!(
        "{}\n",
        serde_json::to_string_pretty(&sarif).expect("JSON values serialize")
    )
}
