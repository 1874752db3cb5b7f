//! Logging: text or JSON lines through non-blocking writers, so the request path never
//! waits on stdout. The access log is the `access` target; the recorder writes its lines
//! in batches ([`AccessBatch`]), one write a drain tick instead of one a request.

use std::cell::RefCell;
use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
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

/// The access log's target.
pub const ACCESS_TARGET: &str = "access";

/// Log lines queued for the writer thread at most.
const QUEUED_LINES: usize = 16_384;

/// Access-log batches queued for their writer thread at most, and the size at which a
/// batch is handed over early: together they bound what a stalled stdout holds
/// (32 x 256 KiB, about as much as [`QUEUED_LINES`] lines of the general log).
const QUEUED_BATCHES: usize = 32;
const BATCH_BYTES: usize = 256 * 1024;

/// Keep it alive: dropping it flushes both writers.
pub struct LogGuard {
    _lines: WorkerGuard,
    _access: WorkerGuard,
}

/// The access log's writer and what it has dropped, once logging is set up.
struct AccessSink {
    format: LogFormat,
    writer: NonBlocking,
    dropped: ErrorCounter,
    reported: AtomicUsize,
}

static ACCESS: OnceLock<AccessSink> = OnceLock::new();

thread_local! {
    /// The access lines formatted on this thread since its batch began (`None`: no
    /// batch open, lines go out one by one).
    static BATCH: RefCell<Pending> = const { RefCell::new(Pending(None)) };
}

/// A thread's open batch; a thread that ends with one open still writes it.
struct Pending(Option<Vec<u8>>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(lines) = self.0.take() {
            hand_over(&lines);
        }
    }
}

/// While alive, access-log lines formatted on this thread are gathered and written as
/// one batch when it drops (or when they reach [`BATCH_BYTES`]). The recorder opens one
/// a drain tick: each request's line then costs no hand-off to the writer thread and no
/// write of its own. Without [`init`] (tests, library use) it does nothing.
pub struct AccessBatch(());

impl AccessBatch {
    pub fn begin() -> Option<Self> {
        ACCESS.get()?;
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            if b.0.is_none() {
                b.0 = Some(Vec::with_capacity(16 * 1024));
            }
        });
        Some(AccessBatch(()))
    }
}

impl Drop for AccessBatch {
    fn drop(&mut self) {
        let Some(lines) = BATCH.with(|b| b.borrow_mut().0.take()) else {
            return;
        };
        hand_over(&lines);
        report_drops();
    }
}

fn hand_over(lines: &[u8]) {
    let Some(sink) = ACCESS.get() else {
        return;
    };
    if lines.is_empty() {
        return;
    }
    let _ = sink.writer.clone().write_all(lines);
}

/// The writer drops a batch rather than block the recorder when stdout stalls: say so
/// on the general log (from outside any event: a line logged while one is being written
/// would be dropped).
fn report_drops() {
    let Some(sink) = ACCESS.get() else {
        return;
    };
    let dropped = sink.dropped.dropped_lines();
    if dropped > sink.reported.swap(dropped, Ordering::Relaxed) {
        tracing::error!(
            dropped_batches_total = dropped,
            "access log: stdout is not keeping up; a batch of access lines was dropped (usage records are not affected)"
        );
    }
}

/// Writes one access line with `write` (given the log's format and where to append):
/// into this thread's open batch, or straight to the access writer. `false` when the
/// gateway's logging is not set up (nothing was written).
pub fn write_access(write: impl FnOnce(LogFormat, &mut Vec<u8>)) -> bool {
    let Some(sink) = ACCESS.get() else {
        return false;
    };
    let full = BATCH.with(|b| match b.borrow_mut().0.as_mut() {
        Some(batch) => {
            write(sink.format, batch);
            (batch.len() >= BATCH_BYTES).then(|| std::mem::take(batch))
        }
        None => {
            let mut line = Vec::with_capacity(640);
            write(sink.format, &mut line);
            Some(line)
        }
    });
    if let Some(lines) = full {
        hand_over(&lines);
    }
    true
}

/// Where one formatted line goes: the general writer, or this thread's open batch.
pub enum LineWriter {
    Direct(NonBlocking),
    Batched,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LineWriter::Direct(w) => w.write(buf),
            LineWriter::Batched => {
                let full = BATCH.with(|b| match b.borrow_mut().0.as_mut() {
                    Some(batch) => {
                        batch.extend_from_slice(buf);
                        (batch.len() >= BATCH_BYTES).then(|| std::mem::take(batch))
                    }
                    // The batch closed between choosing this writer and writing.
                    None => Some(buf.to_vec()),
                });
                if let Some(lines) = full {
                    hand_over(&lines);
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LineWriter::Direct(w) => w.flush(),
            LineWriter::Batched => Ok(()),
        }
    }
}

/// Chooses each event's writer from its target: access lines join the thread's open
/// batch, everything else goes to the general writer as before.
#[derive(Clone)]
struct Writers {
    lines: NonBlocking,
}

impl<'a> MakeWriter<'a> for Writers {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter::Direct(self.lines.clone())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter {
        let batching = meta.target() == ACCESS_TARGET && BATCH.with(|b| b.borrow().0.is_some());
        if batching {
            LineWriter::Batched
        } else {
            self.make_writer()
        }
    }
}

/// Installs the global subscriber. Keep the guard alive: dropping it flushes the log.
pub fn init(format: LogFormat, to: LogTo) -> LogGuard {
    // The queue between the request path and the writer thread: tracing-appender's
    // default of 128,000 lines is an array allocated and touched up front (4 MiB of the
    // idle footprint); 16,384 lines is still ~0.4 s of the access log at 40,000
    // requests/s. When it is full a line is dropped rather than blocking a request.
    let queue = || NonBlockingBuilder::default().lossy(true);
    let (lines, access, terminal) = match to {
        LogTo::Stdout => (
            queue()
                .buffered_lines_limit(QUEUED_LINES)
                .finish(io::stdout()),
            queue()
                .buffered_lines_limit(QUEUED_BATCHES)
                .thread_name("kube-gateway-access-log")
                .finish(io::stdout()),
            io::stdout().is_terminal(),
        ),
        LogTo::Stderr => (
            queue()
                .buffered_lines_limit(QUEUED_LINES)
                .finish(io::stderr()),
            queue()
                .buffered_lines_limit(QUEUED_BATCHES)
                .thread_name("kube-gateway-access-log")
                .finish(io::stderr()),
            io::stderr().is_terminal(),
        ),
    };
    let ((lines, lines_guard), (access, access_guard)) = (lines, access);
    let _ = ACCESS.set(AccessSink {
        format,
        dropped: access.error_counter(),
        writer: access,
        reported: AtomicUsize::new(0),
    });
    // sqlx reports PostgreSQL notices ("relation already exists") at info.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Writers { lines })
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
    LogGuard {
        _lines: lines_guard,
        _access: access_guard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Keeps each write it is given, as given.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<String>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(buf).into());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn access_lines_in_a_batch_go_out_as_one_write_and_others_line_by_line() {
        let (general, access) = (Writes::default(), Writes::default());
        let (lines, lines_guard) = NonBlockingBuilder::default().finish(general.clone());
        let (batches, access_guard) = NonBlockingBuilder::default().finish(access.clone());
        assert!(ACCESS
            .set(AccessSink {
                format: LogFormat::Text,
                dropped: batches.error_counter(),
                writer: batches,
                reported: AtomicUsize::new(0),
            })
            .is_ok());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Writers { lines })
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: ACCESS_TARGET, n = 0, "request");
            {
                let _batch = AccessBatch::begin().expect("logging is set up");
                tracing::info!(target: ACCESS_TARGET, n = 1, "request");
                tracing::info!("something else");
                tracing::info!(target: ACCESS_TARGET, n = 2, "request");
            }
            tracing::info!(target: ACCESS_TARGET, n = 3, "request");
        });
        drop((lines_guard, access_guard));
        let general = general.0.lock().unwrap().clone();
        let access = access.0.lock().unwrap().clone();
        // Outside a batch, access lines keep their place among the others.
        assert_eq!(general.len(), 3, "{general:?}");
        assert!(general[0].contains("access: request n=0"), "{general:?}");
        assert!(general[1].contains("something else"), "{general:?}");
        assert!(general[2].contains("access: request n=3"), "{general:?}");
        // Inside, they are gathered, in order, into one write of whole lines.
        assert_eq!(access.len(), 1, "{access:?}");
        let batch: Vec<&str> = access[0].lines().collect();
        assert_eq!(batch.len(), 2, "{access:?}");
        assert!(batch[0].contains("INFO access: request n=1"), "{batch:?}");
        assert!(batch[1].contains("INFO access: request n=2"), "{batch:?}");
        assert!(access[0].ends_with('\n'));
    }
}
