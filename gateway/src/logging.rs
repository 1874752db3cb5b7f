//! Logging: text or JSON lines through a non-blocking writer, so the request path never
//! waits on stdout. The access log is the `access` target.

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
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

/// Log lines queued for the writer thread at most.
const QUEUED_LINES: usize = 16_384;

/// Installs the global subscriber. Keep the guard alive: dropping it flushes the log.
pub fn init(format: LogFormat, to: LogTo) -> WorkerGuard {
    // The queue between the request path and the writer thread: tracing-appender's
    // default of 128,000 lines is an array allocated and touched up front (4 MiB of the
    // idle footprint); 16,384 lines is still ~0.4 s of the access log at 40,000
    // requests/s. When it is full a line is dropped rather than blocking a request.
    let queue = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true);
    let (writer, guard, terminal) = match to {
        LogTo::Stdout => {
            let (w, g) = queue.finish(std::io::stdout());
            (w, g, std::io::stdout().is_terminal())
        }
        LogTo::Stderr => {
            let (w, g) = queue.finish(std::io::stderr());
            (w, g, std::io::stderr().is_terminal())
        }
    };
    // sqlx reports PostgreSQL notices ("relation already exists") at info.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only on a terminal: in a file or a log collector they are bytes
        // to store and noise to grep.
        .with_ansi(terminal);
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
