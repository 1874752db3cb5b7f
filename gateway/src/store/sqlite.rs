//! SQLite, the embedded default. Reads and migrations go through sqlx; batches through
//! a rusqlite connection of the writer's own. Why two drivers: sqlx runs a statement on
//! a worker thread behind a channel, so a batch had to be one statement, its 22 values a
//! row passed as one JSON parameter, and unpacking that cost more than storing the rows
//! (gateway/benches/store_write.rs measures it). Both open the file the same way
//! ([`BUSY_TIMEOUT`], WAL, `synchronous=NORMAL`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::row::{rollup_sums, rollup_upsert, UsageRow};
use super::StoreError;

/// How long a connection waits for another's write lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The read pool, with the migrations applied.
pub(super) async fn open_pool(path: &Path) -> Result<SqlitePool, StoreError> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .map_err(StoreError::Connect)?;
    sqlx::migrate!("../migrations/sqlite")
        .run(&pool)
        .await
        .map_err(StoreError::Migrate)?;
    Ok(pool)
}

/// The SQLite batch writer's own connection (rusqlite, opened on the first batch): one
/// cached prepared INSERT bound row by row in one transaction, whose change count says
/// whether each row was new. (Through sqlx, which runs statements on a worker thread
/// behind a channel, a batch had to be one statement: its 22 values a row came in as
/// one JSON parameter, and unpacking that cost more than storing the rows.)
#[derive(Clone)]
pub struct SqliteWriter {
    path: PathBuf,
    conn: std::sync::Arc<std::sync::Mutex<Option<rusqlite::Connection>>>,
}

impl std::fmt::Debug for SqliteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteWriter {
    pub(super) fn new(path: PathBuf) -> Self {
        Self {
            path,
            conn: Default::default(),
        }
    }

    /// Writes a batch on a blocking thread (SQLite's calls block). Returns how many rows
    /// were new.
    pub(super) async fn write(&self, rows: &[UsageRow]) -> Result<usize, StoreError> {
        let this = self.clone();
        let rows = rows.to_vec();
        tokio::task::spawn_blocking(move || this.write_blocking(&rows))
            .await
            .map_err(|e| StoreError::SqliteThread(e.to_string()))?
    }

    fn write_blocking(&self, rows: &[UsageRow]) -> Result<usize, StoreError> {
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| StoreError::SqliteThread("a batch write panicked".into()))?;
        let mut conn = match guard.take() {
            Some(conn) => conn,
            None => {
                let conn = rusqlite::Connection::open(&self.path)?;
                // The file is in WAL mode (set when it was opened with its migrations);
                // NORMAL syncs at checkpoints, as the sqlx pool's connections do.
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                conn.busy_timeout(BUSY_TIMEOUT)?;
                conn
            }
        };
        // On an error the connection is dropped and opened afresh next time: the file
        // may have been replaced or repaired.
        let new = write_sqlite(&mut conn, rows)?;
        *guard = Some(conn);
        Ok(new)
    }
}

/// SQLite: one row; a row already stored (a replay) changes nothing.
const SQLITE_INSERT_EVENT: &str = concat!(
    "INSERT INTO usage_events (",
    event_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
     ?18, ?19, ?20, ?21, ?22) ON CONFLICT (request_id) DO NOTHING"
);

/// SQLite: adds one group's sums to a rollup row.
fn sqlite_rollup(table: &str) -> String {
    rollup_upsert(table, "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
}

/// Writes one batch into SQLite in one transaction: each row inserted unless its id is
/// already stored (a replay; or twice in the batch: stored and counted once), then the
/// new rows added to the rollups, one upsert per group.
fn write_sqlite(conn: &mut rusqlite::Connection, rows: &[UsageRow]) -> Result<usize, StoreError> {
    // IMMEDIATE: the write lock up front, so the transaction never has to upgrade.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut new = Vec::with_capacity(rows.len());
    {
        let mut insert = tx.prepare_cached(SQLITE_INSERT_EVENT)?;
        for r in rows {
            let changed = insert.execute(rusqlite::params![
                r.request_id,
                r.time_ms,
                r.namespace,
                r.pod,
                r.container,
                r.source_ip,
                r.destination,
                r.api,
                r.endpoint,
                r.requested_model,
                r.used_model,
                r.input_tokens,
                r.output_tokens,
                r.cached_tokens,
                r.reasoning_tokens,
                r.token_source,
                r.status,
                r.outcome,
                r.rules,
                r.latency_ms,
                r.ttft_ms,
                r.streamed,
            ])?;
            if changed == 1 {
                new.push(r);
            }
        }
        for ((table, bucket, namespace, pod, model), (requests, input, output)) in
            rollup_sums(new.iter().copied())
        {
            tx.prepare_cached(&sqlite_rollup(table))?
                .execute(rusqlite::params![
                    bucket, namespace, pod, model, requests, input, output
                ])?;
        }
    }
    tx.commit()?;
    Ok(new.len())
}
