//! `toolwarden check`: the checklist, offline.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::report_formats::{Finding, render_json, render_sarif, render_text};
use crate::api::manifest::{LoadError, Manifests};
use crate::api::{PolicyMode, ToolPolicy};
use crate::policy;

/// Exit status for unreadable or invalid input.
const EXIT_INVALID: u8 = 2;
/// Exit status when an enforcing rule is broken.
const EXIT_VIOLATIONS: u8 = 1;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Manifest files or folders (searched for *.yaml and *.yml). Repeatable.
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
    /// Extra files or folders of ToolPolicies to apply (AgentTools in them are ignored). Repeatable.
    #[arg(long = "policy", value_name = "FILE")]
    pub policies: Vec<PathBuf>,
    /// Also read the subfolders of folders given with -f.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// One line per violation: `file:document: RULE path: message`.
    Text,
    /// `{"violations": [...]}` with rule, path, message and file.
    Json,
    /// SARIF 2.1.0, for code-scanning tools.
    Sarif,
}

pub fn run(args: &CheckArgs) -> ExitCode {
    let manifests = match load(args) {
        Ok(m) => m,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} input error(s); nothing was checked", errors.len());
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let findings = evaluate_all(&manifests);
    let rendered = match args.output {
        OutputFormat::Text => render_text(&findings),
        OutputFormat::Json => render_json(&findings),
        OutputFormat::Sarif => render_sarif(&findings),
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(rendered.as_bytes())
        .and_then(|_| stdout.flush())
    {
        eprintln!("error: writing the report: {e}");
        return ExitCode::from(EXIT_INVALID);
    }
    let enforced = findings
        .iter()
        .filter(|f| f.violation.mode == PolicyMode::Enforce)
        .count();
    let policies = manifests.policies.len();
    eprintln!(
        "checked {} tool(s) against {policies} polic{} (skipped {} other document(s)): {} violation(s), {enforced} enforced",
        manifests.tools.len(),
        if policies == 1 { "y" } else { "ies" },
        manifests.skipped.len(),
        findings.len(),
    );
    if enforced > 0 {
        ExitCode::from(EXIT_VIOLATIONS)
    } else {
        ExitCode::SUCCESS
    }
}

/// Reads the manifests and the extra policy files; all errors are reported together.
fn load(args: &CheckArgs) -> Result<Manifests, Vec<LoadError>> {
    let main = Manifests::load(&args.paths, args.recursive);
    let extra = if args.policies.is_empty() {
        Ok(Manifests::default())
    } else {
        Manifests::load(&args.policies, args.recursive)
    };
    match (main, extra) {
        (Ok(mut main), Ok(extra)) => {
            main.policies.extend(extra.policies);
            Ok(main)
        }
        (main, extra) => Err(main
            .err()
            .into_iter()
            .chain(extra.err())
            .flatten()
            .collect()),
    }
}

/// Evaluates every tool. Offline there is no namespace object, so a tool's
/// namespace carries only the label the API server always sets on it.
fn evaluate_all(manifests: &Manifests) -> Vec<Finding> {
    let policies: Vec<ToolPolicy> = manifests
        .policies
        .iter()
        .map(|p| p.object.clone())
        .collect();
    let engine = policy::Engine::default();
    let mut findings = Vec::new();
    for tool in &manifests.tools {
        let namespace = tool
            .object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), namespace)]);
        let report = engine.evaluate(&tool.object, &policies, &labels);
        let name = tool.object.metadata.name.clone().unwrap_or_default();
        findings.extend(report.violations.into_iter().map(|violation| Finding {
            origin: tool.origin.clone(),
            tool: name.clone(),
            violation,
        }));
    }
    findings
}
