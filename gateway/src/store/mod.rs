//! The usage store: SQLite embedded by default, PostgreSQL when gateways share usage.
//! Rows, not HTTP: each finished usage record becomes one `usage_events` row, written in
//! batches, one transaction a batch, idempotent on the request id, with the hourly and
//! daily rollups updated in the same transaction for the rows that were new.

pub mod lease;
pub mod spool;
pub mod writer;

use std::path::PathBuf;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use crate::usage::{TokenSource, UsageRecord};

/// Where usage goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

/// A `--store` value is not a supported URL.
#[derive(Debug, thiserror::Error)]
#[error("store {0:?} is not sqlite://PATH or postgres://...")]
pub struct BadStoreUrl(pub String);

impl FromStr for StoreUrl {
    type Err = BadStoreUrl;

    fn from_str(s: &str) -> Result<Self, BadStoreUrl> {
        if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(BadStoreUrl(s.to_owned()));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(s.to_owned()));
        }
        Err(BadStoreUrl(s.to_owned()))
    }
}

/// The store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the usage store: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot migrate the usage store: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("usage store query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("budget leases need a shared (PostgreSQL) store")]
    NotShared,
    #[error("usage store (SQLite) write failed: {0}")]
    SqliteWrite(#[from] rusqlite::Error),
    #[error("usage store (SQLite) writer thread failed: {0}")]
    SqliteThread(String),
}

/// Who this gateway serves: the labels every row carries (from the pod's environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// One `usage_events` row.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageRow {
    pub request_id: String,
    pub time_ms: i64,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub source_ip: String,
    pub destination: String,
    pub api: String,
    pub endpoint: String,
    pub requested_model: Option<String>,
    pub used_model: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
    pub token_source: String,
    pub status: i32,
    pub outcome: String,
    pub rules: String,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub streamed: bool,
}

fn source_name(s: TokenSource) -> &'static str {
    match s {
        TokenSource::Provider => "provider",
        TokenSource::Estimate => "estimate",
        TokenSource::None => "none",
    }
}

impl UsageRow {
    pub fn new(r: &UsageRecord, who: &Identity) -> Self {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        // A count estimated anywhere makes the row an estimate.
        let token_source = if r.input_source == TokenSource::Estimate
            || r.output_source == TokenSource::Estimate
        {
            TokenSource::Estimate
        } else if r.input_source == TokenSource::Provider
            || r.output_source == TokenSource::Provider
        {
            TokenSource::Provider
        } else {
            TokenSource::None
        };
        Self {
            request_id: r.request_id.clone(),
            time_ms: r
                .time
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            namespace: who.namespace.clone(),
            pod: who.pod.clone(),
            container: who.container.clone(),
            source_ip: r.peer.ip().to_string(),
            destination: r.destination.clone(),
            api: r.api.to_owned(),
            endpoint: r.endpoint.to_owned(),
            requested_model: r.requested_model.clone(),
            used_model: r.used_model.clone(),
            input_tokens: to_i64(r.input_tokens),
            output_tokens: to_i64(r.output_tokens),
            cached_tokens: r.cached_tokens.map(to_i64),
            reasoning_tokens: r.reasoning_tokens.map(to_i64),
            token_source: source_name(token_source).to_owned(),
            status: i32::from(r.status),
            outcome: serde_json::to_value(r.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            rules: r.rules.join(","),
            latency_ms: ms(r.latency),
            ttft_ms: r.first_chunk.map(ms),
            streamed: r.streamed,
        }
    }

    fn model(&self) -> &str {
        self.used_model.as_deref().unwrap_or("")
    }
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// An open store.
#[derive(Debug, Clone)]
pub enum Store {
    /// Reads and migrations through sqlx; batches through the writer's own connection.
    Sqlite(SqlitePool, SqliteWriter),
    Postgres(PgPool),
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
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            conn: Default::default(),
        }
    }

    /// Writes a batch on a blocking thread (SQLite's calls block). Returns how many rows
    /// were new.
    async fn write(&self, rows: &[UsageRow]) -> Result<usize, StoreError> {
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
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
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

/// Totals per namespace, pod and model over a time range.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageTotal {
    pub namespace: String,
    pub pod: String,
    pub model: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// The `usage_events` columns every batch statement writes, in the order of their
/// values (SQLite's parameters, PostgreSQL's arrays, COPY's fields).
macro_rules! event_columns {
    () => {
        "request_id, time_ms, namespace, pod, container, source_ip, destination, api, \
         endpoint, requested_model, used_model, input_tokens, output_tokens, cached_tokens, \
         reasoning_tokens, token_source, status, outcome, rules, latency_ms, ttft_ms, streamed"
    };
}

/// SQLite: one row; a row already stored (a replay) changes nothing.
const SQLITE_INSERT_EVENT: &str = concat!(
    "INSERT INTO usage_events (",
    event_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
     ?18, ?19, ?20, ?21, ?22) ON CONFLICT (request_id) DO NOTHING"
);

/// Adds groups' sums from `source` (SQLite's parameters, PostgreSQL's arrays) to a
/// rollup table.
fn rollup_upsert(table: &str, source: &str) -> String {
    format!(
        "INSERT INTO {table} (bucket_ms, namespace, pod, model, requests, input_tokens, output_tokens) \
         {source} \
         ON CONFLICT (bucket_ms, namespace, pod, model) DO UPDATE SET \
         requests = {table}.requests + excluded.requests, \
         input_tokens = {table}.input_tokens + excluded.input_tokens, \
         output_tokens = {table}.output_tokens + excluded.output_tokens"
    )
}

/// SQLite: adds one group's sums to a rollup row.
fn sqlite_rollup(table: &str) -> String {
    rollup_upsert(table, "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
}

/// PostgreSQL, a batch that may hold rows already stored (a replay of a spool, or a live
/// batch whose COPY met a duplicate): one statement, one typed array a column (`UNNEST`),
/// rows already stored skipped; the insert returns the new rows and the same statement
/// adds them to the rollups, one upsert per group in key order (so concurrent gateways
/// lock rollup rows in the same order), the daily groups summed from the hourly ones.
/// Returns how many were new.
const POSTGRES_WRITE: &str = concat!(
    "WITH ins AS (INSERT INTO usage_events (",
    event_columns!(),
    ")
    SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
        $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[], $16::text[],
        $17::integer[], $18::text[], $19::text[], $20::double precision[],
        $21::double precision[], $22::boolean[])
    ON CONFLICT (request_id) DO NOTHING
    RETURNING time_ms, namespace, pod, coalesce(used_model, '') AS model, input_tokens,
        output_tokens
), h AS (
    SELECT time_ms - time_ms % 3600000 AS bucket_ms, namespace, pod, model,
        count(*) AS requests, sum(input_tokens) AS input_tokens,
        sum(output_tokens) AS output_tokens
    FROM ins GROUP BY 1, 2, 3, 4
), hourly AS (
    INSERT INTO usage_hourly (bucket_ms, namespace, pod, model, requests, input_tokens,
        output_tokens)
    SELECT * FROM h ORDER BY 1, 2, 3, 4
    ON CONFLICT (bucket_ms, namespace, pod, model) DO UPDATE SET
        requests = usage_hourly.requests + excluded.requests,
        input_tokens = usage_hourly.input_tokens + excluded.input_tokens,
        output_tokens = usage_hourly.output_tokens + excluded.output_tokens
), daily AS (
    INSERT INTO usage_daily (bucket_ms, namespace, pod, model, requests, input_tokens,
        output_tokens)
    SELECT bucket_ms - bucket_ms % 86400000, namespace, pod, model, sum(requests),
        sum(input_tokens), sum(output_tokens)
    FROM h GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (bucket_ms, namespace, pod, model) DO UPDATE SET
        requests = usage_daily.requests + excluded.requests,
        input_tokens = usage_daily.input_tokens + excluded.input_tokens,
        output_tokens = usage_daily.output_tokens + excluded.output_tokens
)
SELECT CAST(coalesce(sum(requests), 0) AS BIGINT) FROM h"
);

/// The rollup rows a batch adds to: per (table, bucket, namespace, pod, model), the
/// requests and tokens of the batch's new rows. A batch then costs one upsert per group,
/// not per row.
type RollupKey<'a> = (&'static str, i64, &'a str, &'a str, &'a str);

fn rollup_sums<'a>(
    rows: impl Iterator<Item = &'a UsageRow>,
) -> std::collections::BTreeMap<RollupKey<'a>, (i64, i64, i64)> {
    let mut sums = std::collections::BTreeMap::new();
    for r in rows {
        for (table, width) in [("usage_hourly", HOUR_MS), ("usage_daily", DAY_MS)] {
            let bucket = r.time_ms - r.time_ms.rem_euclid(width);
            let e = sums
                .entry((
                    table,
                    bucket,
                    r.namespace.as_str(),
                    r.pod.as_str(),
                    r.model(),
                ))
                .or_insert((0, 0, 0));
            e.0 += 1;
            e.1 += r.input_tokens;
            e.2 += r.output_tokens;
        }
    }
    sums
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

/// PostgreSQL's COPY of a live batch's rows (none of its ids can be stored yet: they are
/// this gateway's own and new). COPY skips the executor work an INSERT does per row
/// (measured: a third of the server's CPU a row); a duplicate id fails it whole, and
/// [`POSTGRES_WRITE`], which skips stored rows, runs instead.
const POSTGRES_COPY: &str = concat!("COPY usage_events (", event_columns!(), ") FROM STDIN");

/// PostgreSQL: adds the groups' sums (one array a column, in key order) to a rollup.
fn postgres_rollup(table: &str) -> String {
    rollup_upsert(
        table,
        "SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
         $6::bigint[], $7::bigint[])",
    )
}

/// One value in COPY's text format: `\N` for NULL; backslash, tab, newline and carriage
/// return escaped.
fn copy_text(out: &mut String, value: Option<&str>) {
    let Some(v) = value else {
        out.push_str("\\N");
        return;
    };
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// A batch in COPY's text format: a line a row, tab-separated, in [`POSTGRES_COPY`]'s
/// column order.
fn copy_rows(rows: &[UsageRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(rows.len() * 256);
    for r in rows {
        let n = |v: Option<i64>| v.map(|v| v.to_string());
        let f = |v: Option<f64>| v.map(|v| v.to_string());
        let fields: [Option<std::borrow::Cow<'_, str>>; 22] = [
            Some(r.request_id.as_str().into()),
            Some(r.time_ms.to_string().into()),
            Some(r.namespace.as_str().into()),
            Some(r.pod.as_str().into()),
            Some(r.container.as_str().into()),
            Some(r.source_ip.as_str().into()),
            Some(r.destination.as_str().into()),
            Some(r.api.as_str().into()),
            Some(r.endpoint.as_str().into()),
            r.requested_model.as_deref().map(Into::into),
            r.used_model.as_deref().map(Into::into),
            Some(r.input_tokens.to_string().into()),
            Some(r.output_tokens.to_string().into()),
            n(r.cached_tokens).map(Into::into),
            n(r.reasoning_tokens).map(Into::into),
            Some(r.token_source.as_str().into()),
            Some(r.status.to_string().into()),
            Some(r.outcome.as_str().into()),
            Some(r.rules.as_str().into()),
            Some(r.latency_ms.to_string().into()),
            f(r.ttft_ms).map(Into::into),
            Some(if r.streamed { "t" } else { "f" }.into()),
        ];
        for (i, v) in fields.iter().enumerate() {
            if i > 0 {
                out.push('\t');
            }
            copy_text(&mut out, v.as_deref());
        }
        let _ = writeln!(out);
    }
    out
}

/// A live batch: COPY, then the rollups, in one transaction. Returns how many rows were
/// stored (all of them, or an error).
async fn copy_postgres(pool: &PgPool, rows: &[UsageRow]) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut copy = tx.copy_in_raw(POSTGRES_COPY).await?;
    copy.send(copy_rows(rows).into_bytes()).await?;
    let stored = copy.finish().await?;
    let sums = rollup_sums(rows.iter());
    for table in ["usage_hourly", "usage_daily"] {
        // In key order (a BTreeMap's): concurrent gateways lock rollup rows alike.
        let (mut bucket, mut namespace, mut pod, mut model) = (vec![], vec![], vec![], vec![]);
        let (mut requests, mut input, mut output) = (vec![], vec![], vec![]);
        for ((_, b, ns, p, m), (r, i, o)) in sums.iter().filter(|((t, ..), _)| *t == table) {
            bucket.push(*b);
            namespace.push(*ns);
            pod.push(*p);
            model.push(*m);
            requests.push(*r);
            input.push(*i);
            output.push(*o);
        }
        sqlx::query(&postgres_rollup(table))
            .bind(bucket)
            .bind(namespace)
            .bind(pod)
            .bind(model)
            .bind(requests)
            .bind(input)
            .bind(output)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(i64::try_from(stored).unwrap_or(i64::MAX))
}

/// Runs [`POSTGRES_WRITE`] over `rows`: how many were new.
async fn write_postgres(pool: &PgPool, rows: &[UsageRow]) -> Result<i64, sqlx::Error> {
    fn col<'a, T>(rows: &'a [UsageRow], f: impl Fn(&'a UsageRow) -> T) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    sqlx::query_scalar(POSTGRES_WRITE)
        .bind(col(rows, |r| r.request_id.as_str()))
        .bind(col(rows, |r| r.time_ms))
        .bind(col(rows, |r| r.namespace.as_str()))
        .bind(col(rows, |r| r.pod.as_str()))
        .bind(col(rows, |r| r.container.as_str()))
        .bind(col(rows, |r| r.source_ip.as_str()))
        .bind(col(rows, |r| r.destination.as_str()))
        .bind(col(rows, |r| r.api.as_str()))
        .bind(col(rows, |r| r.endpoint.as_str()))
        .bind(col(rows, |r| r.requested_model.as_deref()))
        .bind(col(rows, |r| r.used_model.as_deref()))
        .bind(col(rows, |r| r.input_tokens))
        .bind(col(rows, |r| r.output_tokens))
        .bind(col(rows, |r| r.cached_tokens))
        .bind(col(rows, |r| r.reasoning_tokens))
        .bind(col(rows, |r| r.token_source.as_str()))
        .bind(col(rows, |r| r.status))
        .bind(col(rows, |r| r.outcome.as_str()))
        .bind(col(rows, |r| r.rules.as_str()))
        .bind(col(rows, |r| r.latency_ms))
        .bind(col(rows, |r| r.ttft_ms))
        .bind(col(rows, |r| r.streamed))
        .fetch_one(pool)
        .await
}

impl Store {
    /// Opens (creating a SQLite file if needed) and applies the migrations.
    pub async fn connect(url: &StoreUrl) -> Result<Self, StoreError> {
        match url {
            StoreUrl::Sqlite(path) => {
                let opts = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(opts)
                    .await
                    .map_err(StoreError::Connect)?;
                sqlx::migrate!("../migrations/sqlite")
                    .run(&pool)
                    .await
                    .map_err(StoreError::Migrate)?;
                Ok(Store::Sqlite(pool, SqliteWriter::new(path.clone())))
            }
            StoreUrl::Postgres(url) => {
                let opts = PgConnectOptions::from_str(url).map_err(StoreError::Connect)?;
                let pool = PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(std::time::Duration::from_secs(5))
                    .connect_with(opts)
                    .await
                    .map_err(StoreError::Connect)?;
                sqlx::migrate!("../migrations/postgres")
                    .run(&pool)
                    .await
                    .map_err(StoreError::Migrate)?;
                Ok(Store::Postgres(pool))
            }
        }
    }

    /// A PostgreSQL store that connects on first use (no migrations: the writer applies
    /// them when it connects).
    pub fn lazy(url: &StoreUrl) -> Result<Self, StoreError> {
        match url {
            StoreUrl::Postgres(url) => {
                let opts = PgConnectOptions::from_str(url).map_err(StoreError::Connect)?;
                Ok(Store::Postgres(
                    PgPoolOptions::new()
                        .max_connections(4)
                        .acquire_timeout(std::time::Duration::from_secs(5))
                        .connect_lazy_with(opts),
                ))
            }
            StoreUrl::Sqlite(_) => Err(StoreError::NotShared),
        }
    }

    /// Writes a batch in one transaction. Returns how many rows were new.
    pub async fn write(&self, rows: &[UsageRow]) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(_, writer) => writer.write(rows).await,
            Store::Postgres(pool) => {
                let new = match copy_postgres(pool, rows).await {
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        write_postgres(pool, rows).await?
                    }
                    other => other?,
                };
                Ok(usize::try_from(new).unwrap_or(0))
            }
        }
    }

    /// Totals per namespace, pod and model for events in `[from_ms, to_ms)`.
    pub async fn totals(&self, from_ms: i64, to_ms: i64) -> Result<Vec<UsageTotal>, StoreError> {
        // Sums cast to BIGINT: PostgreSQL would sum BIGINT into NUMERIC.
        const SQL: &str = "SELECT namespace, pod, COALESCE(used_model, '') AS model, COUNT(*) AS requests, \
             CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT) FROM usage_events \
             WHERE time_ms >= $1 AND time_ms < $2 \
             GROUP BY namespace, pod, COALESCE(used_model, '') ORDER BY namespace, pod, model";
        self.select(SQL, &[from_ms, to_ms], |r| {
            total(
                r.text(0),
                r.text(1),
                r.text(2),
                r.int(3),
                r.int(4),
                r.int(5),
            )
        })
        .await
    }

    /// Runs a read query on either database. `sql` numbers its parameters `$1`, `$2`...
    /// (rewritten to `?` for SQLite, which binds in order); `map` reads each row.
    async fn select<T>(
        &self,
        sql: &str,
        params: &[i64],
        map: impl Fn(&dyn RowAccess) -> T,
    ) -> Result<Vec<T>, StoreError> {
        match self {
            Store::Sqlite(pool, _) => {
                let mut sql = sql.to_owned();
                for i in (1..=params.len()).rev() {
                    sql = sql.replace(&format!("${i}"), "?");
                }
                let mut q = sqlx::query(&sql);
                for p in params {
                    q = q.bind(*p);
                }
                Ok(q.fetch_all(pool).await?.iter().map(|r| map(r)).collect())
            }
            Store::Postgres(pool) => {
                let mut q = sqlx::query(sql);
                for p in params {
                    q = q.bind(*p);
                }
                Ok(q.fetch_all(pool).await?.iter().map(|r| map(r)).collect())
            }
        }
    }
}

/// Reads columns the same way from either database's rows.
trait RowAccess {
    fn text(&self, i: usize) -> String;
    fn int(&self, i: usize) -> i64;
}

impl RowAccess for sqlx::sqlite::SqliteRow {
    fn text(&self, i: usize) -> String {
        self.try_get(i).unwrap_or_default()
    }
    fn int(&self, i: usize) -> i64 {
        self.try_get(i).unwrap_or_default()
    }
}

impl RowAccess for sqlx::postgres::PgRow {
    fn text(&self, i: usize) -> String {
        self.try_get(i).unwrap_or_default()
    }
    fn int(&self, i: usize) -> i64 {
        self.try_get(i).unwrap_or_default()
    }
}

/// Admitted usage per namespace, pod and model since a time: what budgets count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spent {
    pub namespace: String,
    pub pod: String,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub requests: i64,
}

impl Store {
    /// Usage of requests the gateway let through (refusals count nothing) since `from_ms`.
    pub async fn spent_since(&self, from_ms: i64) -> Result<Vec<Spent>, StoreError> {
        const SQL: &str =
            "SELECT namespace, pod, COALESCE(used_model, ''), CAST(SUM(input_tokens) AS BIGINT), \
             CAST(SUM(output_tokens) AS BIGINT), COUNT(*) FROM usage_events \
             WHERE time_ms >= $1 AND outcome NOT IN ('denied', 'rejected') \
             GROUP BY namespace, pod, COALESCE(used_model, '')";
        self.select(SQL, &[from_ms], |r| Spent {
            namespace: r.text(0),
            pod: r.text(1),
            model: r.text(2),
            input_tokens: r.int(3),
            output_tokens: r.int(4),
            requests: r.int(5),
        })
        .await
    }
}

/// Renders totals as an aligned table, with a total line.
pub fn render_table(totals: &[UsageTotal]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<20} {:<28} {:<24} {:>9} {:>12} {:>12}",
        "NAMESPACE", "POD", "MODEL", "REQUESTS", "INPUT", "OUTPUT"
    );
    for t in totals {
        let _ = writeln!(
            s,
            "{:<20} {:<28} {:<24} {:>9} {:>12} {:>12}",
            t.namespace, t.pod, t.model, t.requests, t.input_tokens, t.output_tokens
        );
    }
    let sum = |f: fn(&UsageTotal) -> i64| totals.iter().map(f).sum::<i64>();
    let _ = writeln!(
        s,
        "{:<20} {:<28} {:<24} {:>9} {:>12} {:>12}",
        "TOTAL",
        "",
        "",
        sum(|t| t.requests),
        sum(|t| t.input_tokens),
        sum(|t| t.output_tokens)
    );
    s
}

/// Renders totals as CSV with a header line.
pub fn render_csv(totals: &[UsageTotal]) -> String {
    let quote = |v: &str| {
        if v.contains([',', '"', '\n']) {
            format!("\"{}\"", v.replace('"', "\"\""))
        } else {
            v.to_owned()
        }
    };
    let mut s = String::from("namespace,pod,model,requests,input_tokens,output_tokens\n");
    for t in totals {
        s.push_str(&format!(
            "{},{},{},{},{},{}\n",
            quote(&t.namespace),
            quote(&t.pod),
            quote(&t.model),
            t.requests,
            t.input_tokens,
            t.output_tokens
        ));
    }
    s
}

fn total(
    namespace: String,
    pod: String,
    model: String,
    requests: i64,
    input_tokens: i64,
    output_tokens: i64,
) -> UsageTotal {
    UsageTotal {
        namespace,
        pod,
        model,
        requests,
        input_tokens,
        output_tokens,
    }
}
