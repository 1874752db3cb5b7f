//! Budget leases in the shared (PostgreSQL) store. A gateway takes a slice of each limit
//! of a budget window with one locked read-and-update, spends it locally, and gives back
//! what it did not use. The sum of all leases of a window never passes its limits.

use super::{Store, StoreError};

/// The measures a budget can limit, in this order everywhere: total, input and output
/// tokens, requests.
pub type Measures = [u64; 4];

/// The `budget_windows` column holding what was leased of each measure.
const COLUMNS: [&str; 4] = [
    "tokens_used",
    "input_tokens_used",
    "output_tokens_used",
    "requests_used",
];

/// The outcome of one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// What this lease gave, per measure.
    pub granted: Measures,
    /// What all gateways together hold of the window after it, per measure.
    pub leased: Measures,
}

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
