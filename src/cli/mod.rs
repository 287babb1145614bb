//! The `toolwarden` command line.

mod audit;
mod check;
mod controller;
mod logging;
mod manifests;
mod report_formats;
mod serve;
mod shutdown;
mod webhook;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use check::CheckArgs;
pub use controller::ControllerArgs;
pub use logging::{LogFormat, init_logging};
pub use manifests::ManifestsArgs;
pub use serve::{RunnerArgs, ServeArgs};
pub use webhook::WebhookArgs;

/// toolwarden makes the tools AI agents call safe to run in production.
///
/// Declare each tool as an AgentTool; toolwarden checks it against the
/// security checklist and your ToolPolicies, and runs every call in a fresh
/// sandbox.
#[derive(Parser, Debug)]
#[command(
    name = "toolwarden",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// How diagnostics are written to stderr: `text` (coloured only when stderr is a
    /// terminal) or `json` (one object a line, for log collectors). `RUST_LOG` sets the level.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check AgentTool manifests against the security checklist, offline (for GitOps CI).
    ///
    /// Reads files and folders of multi-document YAML. AgentTools and ToolPolicies may
    /// sit together; other kinds are skipped and counted. Every tool is checked against
    /// the built-in baseline and every ToolPolicy that selects it.
    ///
    /// Exit status: 0 clean (warnings allowed), 1 violations of an enforcing policy or
    /// the baseline, 2 unreadable or invalid input.
    Check(CheckArgs),
    /// Print the CustomResourceDefinitions (AgentTool, ToolPolicy, ToolApproval) as YAML.
    ///
    /// Apply them with `toolwarden crd | kubectl apply --server-side -f -`.
    Crd {
        /// Write one file per CRD into this folder instead (how `crds/` is regenerated).
        #[arg(long, value_name = "DIR")]
        write: Option<std::path::PathBuf>,
    },
    /// Print the whole install (CRDs, namespace, RBAC, controller, webhook) as YAML.
    ///
    /// `toolwarden manifests | kubectl apply --server-side -f -`; the same objects as the
    /// Helm chart charts/toolwarden with its default values.
    Manifests(ManifestsArgs),
    /// Serve the AgentTools in DIR over REST and MCP, with no cluster.
    ///
    /// Every tool is checked against the checklist first (same engine and messages as
    /// `check`); failing tools are refused. Files in DIR are watched and reloaded; calls
    /// in flight finish with the tool they started with.
    Serve(ServeArgs),
    /// The runner inside the pods the controller creates (TokenReview authentication).
    Runner(RunnerArgs),
    /// Reconcile every AgentTool into least-privilege runner workloads (the operator).
    ///
    /// Needs the CRDs installed. Runs phases per tool: read its namespace and the
    /// ToolPolicies, check it (as `check`, with the namespace's real labels), build and
    /// server-side apply its children, report status. Several replicas elect a leader
    /// on a Lease.
    Controller(ControllerArgs),
    /// The admission webhook: holds the checklist at the API server (HTTPS).
    ///
    /// Reviews AgentTools (the checklist, as `check`), ToolPolicies (malformed rules),
    /// runner workloads (only the controller changes them; nothing beyond the runner
    /// securityContext) and ToolApproval decisions (an approver, not the caller, once).
    Webhook(WebhookArgs),
    /// Work with audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check an audit log: its chain, its MACs (with --key), its start and its
    /// anchor. Reports the first damage (exit 1): an altered or resealed record,
    /// a removed/reordered/inserted one, a dropped head, a cut tail, an
    /// incomplete record. Exit 0 when intact (notes say what cannot be ruled
    /// out), 2 when a file cannot be read.
    Verify {
        /// The audit log (`serve --audit-log`, or a collected stdout log with --no-anchor).
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
        /// The audit key that sealed the log (`serve --audit-key`); without it
        /// only the links are checked, and a resealed log passes.
        #[arg(long, value_name = "FILE")]
        key: Option<std::path::PathBuf>,
        /// The anchor file naming the latest checkpoint; default: FILE.anchor.
        #[arg(long, value_name = "ANCHOR", conflicts_with = "no_anchor")]
        anchor: Option<std::path::PathBuf>,
        /// Check a log that has no anchor file (one collected from stdout): a cut
        /// tail after its last checkpoint then cannot be detected.
        #[arg(long)]
        no_anchor: bool,
    },
}

/// Runs the parsed command and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Crd { write: None } => {
            print!("{}", crate::api::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Crd { write: Some(dir) } => write_crds(&dir),
        Command::Manifests(args) => manifests::run(&args),
        Command::Serve(args) => serve::serve(args),
        Command::Runner(args) => serve::runner(args),
        Command::Controller(args) => controller::run(args),
        Command::Webhook(args) => webhook::run(args),
        Command::Audit(AuditCommand::Verify {
            file,
            key,
            anchor,
            no_anchor,
        }) => {
            let anchor = match (anchor, no_anchor) {
                (_, true) => audit::AnchorArg::None,
                (Some(path), false) => audit::AnchorArg::File(path),
                (None, false) => audit::AnchorArg::BesideLog,
            };
            audit::verify_file(&file, key.as_deref(), anchor)
        }
    }
}

fn write_crds(dir: &std::path::Path) -> ExitCode {
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        crate::api::crd_files()
            .into_iter()
            .try_for_each(|(name, yaml)| {
                std::fs::write(dir.join(&name), yaml)?;
                eprintln!("wrote {}", dir.join(&name).display());
                Ok(())
            })
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing CRDs to {}: {e}", dir.display());
            ExitCode::from(2)
        }
    }
}
