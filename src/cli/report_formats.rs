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

/// `file:document: RULE path: message (sources)`: one line per tool, rule, path, message
/// and mode, naming every policy that demands it (`policy a, b` or `baseline`), with the
/// mode in front when it is not `enforce`.
pub fn render_text(findings: &[Finding]) -> String {
    // Keyed by the line without its sources, in order of first appearance.
    let mut lines: Vec<(String, PolicyMode, Vec<&Violation>)> = Vec::new();
    for f in findings {
        let v = &f.violation;
        let head = format!("{}: {} {}: {}", f.origin, v.rule, v.path, v.message);
        match lines
            .iter_mut()
            .find(|(h, m, _)| *h == head && *m == v.mode)
        {
            Some((_, _, sources)) => sources.push(v),
            None => lines.push((head, v.mode, vec![v])),
        }
    }
    lines
        .into_iter()
        .map(|(head, mode, sources)| {
            let sources = sources_text(&sources);
            if mode == PolicyMode::Enforce {
                format!("{head} ({sources})\n")
            } else {
                format!("{head} ({}, {sources})\n", mode.as_str())
            }
        })
        .collect()
}

/// `baseline`, `policy a`, `policies a, b`, or `baseline; policies a, b`.
fn sources_text(violations: &[&Violation]) -> String {
    let policies: Vec<&str> = violations
        .iter()
        .filter_map(|v| v.policy.as_deref())
        .collect();
    let baseline = policies.len() < violations.len();
    let named = match policies.as_slice() {
        [] => None,
        [one] => Some(format!("policy {one}")),
        many => Some(format!("policies {}", many.join(", "))),
    };
    match (baseline, named) {
        (true, Some(named)) => format!("baseline; {named}"),
        (true, None) => "baseline".into(),
        (false, Some(named)) => named,
        (false, None) => unreachable!("a violation comes from a policy or the baseline"),
    }
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
