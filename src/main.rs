use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The sandbox zygote must start as a fresh single-threaded process, before
    // anything else (clap, tokio) runs in it; see src/sandbox/zygote.rs.
    if std::env::args().nth(1).as_deref() == Some(toolwarden::sandbox::ZYGOTE_SUBCOMMAND) {
        std::process::exit(toolwarden::sandbox::zygote_main());
    }
    toolwarden::cli::run(toolwarden::cli::Cli::parse())
}
