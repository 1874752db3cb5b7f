//! Logging: text or JSON lines through a non-blocking writer, so the request path never
//! waits on stdout. The access log is the `access` target.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where log lines go: the gateway logs to stdout (what container runtimes collect);
/// the other commands keep stdout for their output and log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    Stdout,
    Stderr,
}

/// Installs the global subscriber. Keep the guard alive: dropping it flushes the log.
pub fn init(format: LogFormat, to: LogTo) -> WorkerGuard {
    let (writer, guard) = match to {
        LogTo::Stdout => tracing_appender::non_blocking(std::io::stdout()),
        LogTo::Stderr => tracing_appender::non_blocking(std::io::stderr()),
    };
    // sqlx reports PostgreSQL notices ("relation already exists") at info.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
    guard
}
