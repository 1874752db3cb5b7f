//! Reports read from the store: totals per namespace, pod and model, and the usage
//! budgets count (what a restarted gateway seeds its ledger from).

use sqlx::Row;

use super::{Store, StoreError};
use crate::budget::Spent;
use crate::record::Outcome;

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

impl Store {
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

impl Store {
    /// Usage of requests that reached the LLM ([`Outcome::reached_llm`]: the gateway's
    /// own refusals count nothing) since `from_ms`.
    pub async fn spent_since(&self, from_ms: i64) -> Result<Vec<Spent>, StoreError> {
        let sql = format!(
            "SELECT namespace, pod, COALESCE(used_model, ''), CAST(SUM(input_tokens) AS BIGINT), \
             CAST(SUM(output_tokens) AS BIGINT), COUNT(*) FROM usage_events \
             WHERE time_ms >= $1 AND outcome NOT IN ({}) \
             GROUP BY namespace, pod, COALESCE(used_model, '')",
            refusals()
        );
        self.select(&sql, &[from_ms], |r| Spent {
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

/// The stored outcomes of requests that did not reach the LLM, as an SQL list.
fn refusals() -> String {
    Outcome::ALL
        .into_iter()
        .filter(|o| !o.reached_llm())
        .map(|o| format!("'{}'", o.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
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

#[cfg(test)]
mod tests {
    #[test]
    fn budget_queries_leave_out_exactly_the_refusals() {
        assert_eq!(super::refusals(), "'rejected', 'denied'");
    }
}
