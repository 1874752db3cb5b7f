//! PostgreSQL, the shared store: live batches by COPY, replays by one statement that
//! skips stored rows, and the budget leases of shared budgets ([`LeaseBackend`]).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::row::{rollup_sums, rollup_upsert, UsageRow};
use super::{Store, StoreError};
use crate::budget::{Grant, LeaseBackend, LeaseError, LeaseFuture, Measures};

/// How long a batch or a lease waits for a connection before it fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool, with the migrations applied.
pub(super) async fn open_pool(url: &str) -> Result<PgPool, StoreError> {
    let opts = PgConnectOptions::from_str(url).map_err(StoreError::Connect)?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(opts)
        .await
        .map_err(StoreError::Connect)?;
    sqlx::migrate!("../migrations/postgres")
        .run(&pool)
        .await
        .map_err(StoreError::Migrate)?;
    Ok(pool)
}

/// A pool that connects on first use.
pub(super) fn lazy_pool(url: &str) -> Result<PgPool, StoreError> {
    let opts = PgConnectOptions::from_str(url).map_err(StoreError::Connect)?;
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(opts))
}

/// Writes a batch in one transaction: COPY for a live batch, the statement that skips
/// stored rows when it holds one already stored. Returns how many rows were new.
pub(super) async fn write(pool: &PgPool, rows: &[UsageRow]) -> Result<usize, StoreError> {
    let new = match copy_postgres(pool, rows).await {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            write_postgres(pool, rows).await?
        }
        other => other?,
    };
    Ok(usize::try_from(new).unwrap_or(0))
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

/// The `budget_windows` column holding what was leased of each measure.
const COLUMNS: [&str; 4] = [
    "tokens_used",
    "input_tokens_used",
    "output_tokens_used",
    "requests_used",
];

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Leases up to `want` of each measure of a budget window, never past `limits`
    /// (`None`: unlimited, so nothing is leased of it).
    pub async fn lease(
        &self,
        key: &str,
        window_start: i64,
        want: Measures,
        limits: [Option<u64>; 4],
    ) -> Result<Grant, StoreError> {
        let Store::Postgres(pool) = self else {
            return Err(StoreError::NotShared);
        };
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO budget_windows (scope_key, window_start) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(window_start)
        .execute(&mut *tx)
        .await?;
        // The row lock makes concurrent leases of one window queue up, not overlap.
        let held: (i64, i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT {} FROM budget_windows WHERE scope_key = $1 AND window_start = $2 FOR UPDATE",
            COLUMNS.join(", ")
        ))
        .bind(key)
        .bind(window_start)
        .fetch_one(&mut *tx)
        .await?;
        let held = [held.0, held.1, held.2, held.3].map(to_u64);
        let mut granted = [0; 4];
        let mut leased = held;
        for m in 0..4 {
            if let Some(limit) = limits[m] {
                granted[m] = want[m].min(limit.saturating_sub(held[m]));
                leased[m] = held[m] + granted[m];
            }
        }
        if granted.iter().any(|g| *g > 0) {
            sqlx::query(
                "UPDATE budget_windows SET tokens_used = tokens_used + $3, \
                 input_tokens_used = input_tokens_used + $4, \
                 output_tokens_used = output_tokens_used + $5, \
                 requests_used = requests_used + $6 \
                 WHERE scope_key = $1 AND window_start = $2",
            )
            .bind(key)
            .bind(window_start)
            .bind(to_i64(granted[0]))
            .bind(to_i64(granted[1]))
            .bind(to_i64(granted[2]))
            .bind(to_i64(granted[3]))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Grant { granted, leased })
    }

    /// Returns what a gateway leased and did not use.
    pub async fn give_back(
        &self,
        key: &str,
        window_start: i64,
        unused: Measures,
    ) -> Result<(), StoreError> {
        let Store::Postgres(pool) = self else {
            return Err(StoreError::NotShared);
        };
        sqlx::query(
            "UPDATE budget_windows SET tokens_used = GREATEST(tokens_used - $3, 0), \
             input_tokens_used = GREATEST(input_tokens_used - $4, 0), \
             output_tokens_used = GREATEST(output_tokens_used - $5, 0), \
             requests_used = GREATEST(requests_used - $6, 0) \
             WHERE scope_key = $1 AND window_start = $2",
        )
        .bind(key)
        .bind(window_start)
        .bind(to_i64(unused[0]))
        .bind(to_i64(unused[1]))
        .bind(to_i64(unused[2]))
        .bind(to_i64(unused[3]))
        .execute(pool)
        .await?;
        Ok(())
    }
}

impl LeaseBackend for Store {
    fn lease<'a>(
        &'a self,
        key: &'a str,
        window_start: i64,
        want: Measures,
        limits: [Option<u64>; 4],
    ) -> LeaseFuture<'a, Grant> {
        Box::pin(async move {
            Store::lease(self, key, window_start, want, limits)
                .await
                .map_err(|e| LeaseError::Backend(Box::new(e)))
        })
    }

    fn give_back<'a>(
        &'a self,
        key: &'a str,
        window_start: i64,
        unused: Measures,
    ) -> LeaseFuture<'a, ()> {
        Box::pin(async move {
            Store::give_back(self, key, window_start, unused)
                .await
                .map_err(|e| LeaseError::Backend(Box::new(e)))
        })
    }
}
