//! The `toolwarden` command line.

mod audit;
mod check;
mod logging;
mod report_formats;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use check::CheckArgs;
pub use logging::{LogFormat, init_logging};
pub use serve::{RunnerArgs, ServeArgs};

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
    /// Serve the AgentTools in DIR over REST and MCP, with no cluster.
    ///
    /// Every tool is checked against the checklist first (same engine and messages as
    /// `check`); failing tools are refused. Files in DIR are watched and reloaded; calls
    /// in flight finish with the tool they started with.
    Serve(ServeArgs),
    /// The runner inside the pods the controller creates (TokenReview authentication).
    Runner(RunnerArgs),
    /// Work with audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check an audit log's hash chain; reports the first broken record (exit 1).
    Verify {
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
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
        Command::Serve(args) => serve::serve(args),
        Command::Runner(args) => serve::runner(args),
        Command::Audit(AuditCommand::Verify { file }) => audit::verify_file(&file),
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
