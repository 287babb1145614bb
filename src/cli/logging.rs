//! Diagnostics on stderr through `tracing`: the level from `RUST_LOG` (default `info`),
//! human text or JSON lines. Audit records never go here (they have their own sink).

use std::io::IsTerminal;
use std::sync::OnceLock;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The format `init_logging` installed, for processes this one starts (the sandbox zygote)
/// that must log the same way.
static INSTALLED: OnceLock<LogFormat> = OnceLock::new();

/// Whether this process logs JSON lines.
pub fn logs_json() -> bool {
    INSTALLED.get() == Some(&LogFormat::Json)
}

/// Installs the global subscriber. Colour codes only reach a terminal: in a file or a
/// pod log they are noise that log pipelines store verbatim.
pub fn init_logging(format: LogFormat) {
    let _ = INSTALLED.set(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
