use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    toolwarden::cli::run(toolwarden::cli::Cli::parse())
}
