//! The `toolwarden` command line.

mod check;
mod report_formats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use check::CheckArgs;

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
