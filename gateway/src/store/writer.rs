//! The batch writer: takes finished usage records from a bounded channel and writes
//! them in batches (every `batch_rows` rows or `flush_every`, whichever comes first),
//! off the request path. When the store fails, batches go to the spool, in order, and
//! are replayed (exactly once: rows are idempotent on their request id) when it is back.
//! When the channel closes (shutdown) everything left is written or spooled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::spool::Spool;
use super::{Store, StoreUrl, UsageRow};
use crate::record::UsageRecord;

/// How the writer batches and retries.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub batch_rows: usize,
    pub flush_every: Duration,
    pub retry_every: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            batch_rows: 500,
            flush_every: Duration::from_millis(200),
            retry_every: Duration::from_secs(1),
        }
    }
}

/// Counters the writer keeps (for metrics and tests).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// The store answered the last write (or connect).
    pub connected: std::sync::atomic::AtomicBool,
    pub written: AtomicU64,
    pub spooled: AtomicU64,
    pub replayed: AtomicU64,
}

struct Writer {
    url: StoreUrl,
    store: Option<Store>,
    spool: Arc<Spool>,
    stats: Arc<WriterStats>,
}

impl Writer {
    fn set_store(&mut self, store: Option<Store>) {
        self.stats
            .connected
            .store(store.is_some(), Ordering::Relaxed);
        self.store = store;
    }

    async fn store(&mut self) -> Option<&Store> {
        if self.store.is_none() {
            match Store::connect(&self.url).await {
                Ok(s) => self.set_store(Some(s)),
                Err(e) => tracing::warn!(error = %e, "usage store unavailable; spooling"),
            }
        }
        self.store.as_ref()
    }

    async fn spool_rows(&self, rows: Vec<UsageRow>) {
        let n = rows.len() as u64;
        let spool = self.spool.clone();
        match tokio::task::spawn_blocking(move || spool.append(&rows)).await {
            Ok(Ok(())) => {
                self.stats.spooled.fetch_add(n, Ordering::Relaxed);
            }
            // Both the store and the spool failed: the rows are lost, and say so loudly.
            Ok(Err(e)) => {
                tracing::error!(error = %e, rows = n, "spool write failed: usage rows lost")
            }
            Err(e) => tracing::error!(error = %e, rows = n, "spool task failed: usage rows lost"),
        }
    }

    /// Writes spooled rows, oldest first; empties the spool when all are stored.
    async fn replay(&mut self) -> bool {
        let spool = self.spool.clone();
        let rows = match tokio::task::spawn_blocking(move || spool.read()).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the spool");
                return false;
            }
            Err(_) => return false,
        };
        if rows.is_empty() {
            return true;
        }
        let Some(store) = self.store().await else {
            return false;
        };
        let mut inserted = 0;
        for chunk in rows.chunks(500) {
            match store.write(chunk).await {
                Ok(n) => inserted += n,
                Err(e) => {
                    tracing::warn!(error = %e, "replay failed; the spool is kept");
                    self.set_store(None);
                    return false;
                }
            }
        }
        let spool = self.spool.clone();
        if let Ok(Ok(())) = tokio::task::spawn_blocking(move || spool.clear()).await {
            self.stats
                .replayed
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            tracing::info!(
                rows = rows.len(),
                new = inserted,
                "spooled usage replayed into the store"
            );
            true
        } else {
            false
        }
    }

    async fn write(&mut self, rows: Vec<UsageRow>) {
        // While anything is spooled, new rows queue behind it to keep their order.
        if !self.spool.is_empty() && !self.replay().await {
            self.spool_rows(rows).await;
            return;
        }
        let result = match self.store().await {
            Some(store) => store.write(&rows).await.map_err(|e| e.to_string()),
            None => Err("store unavailable".to_owned()),
        };
        match result {
            Ok(_) => {
                self.stats
                    .written
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = rows.len(), "usage batch not stored; spooling");
                self.set_store(None);
                self.spool_rows(rows).await;
            }
        }
    }
}

/// Starts the writer. It ends once `rx` is closed and everything is written or spooled.
pub fn spawn(
    url: StoreUrl,
    store: Option<Store>,
    spool: Spool,
    config: WriterConfig,
    mut rx: mpsc::Receiver<Arc<UsageRecord>>,
) -> (JoinHandle<()>, Arc<WriterStats>) {
    let stats = Arc::new(WriterStats::default());
    stats.connected.store(store.is_some(), Ordering::Relaxed);
    let mut w = Writer {
        url,
        store,
        spool: Arc::new(spool),
        stats: stats.clone(),
    };
    #[expect(
        clippy::disallowed_methods,
        reason = "the writer: its handle goes to the caller, which awaits it at shutdown"
    )]
    let handle = tokio::spawn(async move {
        let mut retry = tokio::time::interval(config.retry_every);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                r = rx.recv() => r,
                _ = retry.tick(), if !w.spool.is_empty() => {
                    w.replay().await;
                    continue;
                }
            };
            let Some(first) = first else { break };
            let mut batch = vec![UsageRow::new(&first)];
            let deadline = tokio::time::Instant::now() + config.flush_every;
            while batch.len() < config.batch_rows {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => batch.push(UsageRow::new(&r)),
                    Ok(None) | Err(_) => break,
                }
            }
            w.write(batch).await;
        }
        // Shutdown: a last try at the spool, so a clean stop leaves nothing behind if
        // the store is there.
        if !w.spool.is_empty() {
            w.replay().await;
        }
    });
    (handle, stats)
}
