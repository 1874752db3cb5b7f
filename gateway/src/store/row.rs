//! One `usage_events` row, rendered once from a usage record, and what a batch of rows
//! adds to the hourly and daily rollups (both databases write the same sums).

use std::collections::BTreeMap;

use crate::record::UsageRecord;

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

impl UsageRow {
    pub fn new(r: &UsageRecord) -> Self {
        let who = &r.workload;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        Self {
            request_id: r.request_id.clone(),
            time_ms: r
                .started_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            namespace: who.namespace.clone(),
            pod: who.pod.clone(),
            container: who.container.clone(),
            source_ip: r.peer.ip().to_string(),
            destination: r.destination.clone(),
            api: r.api_name().to_owned(),
            endpoint: r.endpoint_name().to_owned(),
            requested_model: r.requested_model.clone(),
            used_model: r.used_model.clone(),
            input_tokens: to_i64(r.input_tokens),
            output_tokens: to_i64(r.output_tokens),
            cached_tokens: r.cached_tokens.map(to_i64),
            reasoning_tokens: r.reasoning_tokens.map(to_i64),
            token_source: r.token_source().as_str().to_owned(),
            status: i32::from(r.status),
            outcome: r.outcome.as_str().to_owned(),
            rules: r.rules.join(","),
            latency_ms: ms(r.latency),
            ttft_ms: r.first_chunk.map(ms),
            streamed: r.streamed,
        }
    }

    pub(super) fn model(&self) -> &str {
        self.used_model.as_deref().unwrap_or("")
    }
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// The rollup rows a batch adds to: per (table, bucket, namespace, pod, model), the
/// requests and tokens of the batch's new rows. A batch then costs one upsert per group,
/// not per row.
type RollupKey<'a> = (&'static str, i64, &'a str, &'a str, &'a str);

pub(super) fn rollup_sums<'a>(
    rows: impl Iterator<Item = &'a UsageRow>,
) -> BTreeMap<RollupKey<'a>, (i64, i64, i64)> {
    let mut sums = BTreeMap::new();
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

/// Adds groups' sums from `source` (SQLite's parameters, PostgreSQL's arrays) to a
/// rollup table.
pub(super) fn rollup_upsert(table: &str, source: &str) -> String {
    format!(
        "INSERT INTO {table} (bucket_ms, namespace, pod, model, requests, input_tokens, output_tokens) \
         {source} \
         ON CONFLICT (bucket_ms, namespace, pod, model) DO UPDATE SET \
         requests = {table}.requests + excluded.requests, \
         input_tokens = {table}.input_tokens + excluded.input_tokens, \
         output_tokens = {table}.output_tokens + excluded.output_tokens"
    )
}
