//! The usage store: SQLite embedded by default, PostgreSQL when gateways share usage.
//! Rows, not HTTP: each finished usage record becomes one `usage_events` row, written in
//! batches, one transaction a batch, idempotent on the request id, with the hourly and
//! daily rollups updated in the same transaction for the rows that were new.

/// The `usage_events` columns every batch statement writes, in the order of their
/// values (SQLite's parameters, PostgreSQL's arrays, COPY's fields).
macro_rules! event_columns {
    () => {
        "request_id, time_ms, namespace, pod, container, source_ip, destination, api, \
         endpoint, requested_model, used_model, input_tokens, output_tokens, cached_tokens, \
         reasoning_tokens, token_source, status, outcome, rules, latency_ms, ttft_ms, streamed"
    };
}

mod postgres;
mod query;
mod row;
pub mod spool;
mod sqlite;
pub mod writer;

use std::path::PathBuf;
use std::str::FromStr;

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

pub use query::UsageTotal;
pub use row::UsageRow;
pub use sqlite::SqliteWriter;

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

/// An open store.
#[derive(Debug, Clone)]
pub enum Store {
    /// Reads and migrations through sqlx; batches through the writer's own connection.
    Sqlite(SqlitePool, SqliteWriter),
    Postgres(PgPool),
}

impl Store {
    /// Opens (creating a SQLite file if needed) and applies the migrations.
    pub async fn connect(url: &StoreUrl) -> Result<Self, StoreError> {
        match url {
            StoreUrl::Sqlite(path) => Ok(Store::Sqlite(
                sqlite::open_pool(path).await?,
                SqliteWriter::new(path.clone()),
            )),
            StoreUrl::Postgres(url) => Ok(Store::Postgres(postgres::open_pool(url).await?)),
        }
    }

    /// A PostgreSQL store that connects on first use (no migrations: the writer applies
    /// them when it connects).
    pub fn lazy(url: &StoreUrl) -> Result<Self, StoreError> {
        match url {
            StoreUrl::Postgres(url) => Ok(Store::Postgres(postgres::lazy_pool(url)?)),
            StoreUrl::Sqlite(_) => Err(StoreError::NotShared),
        }
    }

    /// Writes a batch in one transaction. Returns how many rows were new.
    pub async fn write(&self, rows: &[UsageRow]) -> Result<usize, StoreError> {
        match self {
            Store::Sqlite(_, writer) => writer.write(rows).await,
            Store::Postgres(pool) => postgres::write(pool, rows).await,
        }
    }
}
