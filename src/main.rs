use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The sandbox zygote must start as a fresh single-threaded process, before
    // anything else (clap, tokio) runs in it; see src/sandbox/zygote.rs.
    if std::env::args().nth(1).as_deref() == Some(toolwarden::sandbox::ZYGOTE_SUBCOMMAND) {
        std::process::exit(toolwarden::sandbox::zygote_main());
    }
    let cli = toolwarden::cli::Cli::parse();
    toolwarden::cli::init_logging(cli.log_format);
    // In a pod the runner is PID 1: a forked init reaps orphans (src/sandbox/reaper.rs). Still
    // single-threaded here: neither clap nor the log subscriber starts a thread.
    if let Some(code) = toolwarden::sandbox::reaper::init_if_pid1() {
        std::process::exit(code);
    }
    toolwarden::cli::run(cli)
}
