use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The sandbox zygote must start as a fresh single-threaded process, before
    // anything else (clap, tokio) runs in it; see src/sandbox/zygote.rs.
    if std::env::args().nth(1).as_deref() == Some(toolwarden::sandbox::ZYGOTE_SUBCOMMAND) {
        std::process::exit(toolwarden::sandbox::zygote_main());
    }
    let cli = toolwarden::cli::Cli::parse();
    // Logs (the sandbox engine's startup and pool lines) go to stderr; RUST_LOG overrides.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    toolwarden::cli::run(cli)
}
