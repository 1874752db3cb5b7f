//! The usage store against real databases: migrations on empty stores (twice), batches
//! idempotent on request id with rollups that agree, and a writer that spools while the
//! store is away and replays exactly once when it is back.
//!
//! PostgreSQL parts need `KGW_TEST_POSTGRES_URL` (CI starts a private cluster and sets
//! it); without it they skip, saying so, except under CI=true where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

mod common;
use common::postgres_url;
use std::time::{Duration, SystemTime};

use kube_gateway::record::Identity;
use kube_gateway::store::spool::Spool;
use kube_gateway::store::writer::{self, WriterConfig};
use kube_gateway::store::{Store, StoreUrl, UsageRow};
use kube_gateway::{Outcome, TokenSource, UsageRecord};

fn record(i: u64, model: &str, input: u64, output: u64) -> UsageRecord {
    UsageRecord {
        request_id: format!("test-{i}"),
        workload: std::sync::Arc::new(who()),
        started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000 + i * 600),
        peer: "10.0.0.7:41000".parse::<SocketAddr>().unwrap(),
        destination: "10.0.0.9:11434".into(),
        endpoint: Some(kube_gateway::api::Endpoint::Chat),
        method: "POST".into(),
        path: "/api/chat".into(),
        requested_model: Some("llama3".into()),
        used_model: Some(model.into()),
        response_model: Some(model.into()),
        status: 200,
        outcome: Outcome::Allowed,
        input_tokens: input,
        input_source: TokenSource::Provider,
        output_tokens: output,
        output_source: TokenSource::Provider,
        cached_tokens: None,
        reasoning_tokens: None,
        finish_reason: Some("stop".into()),
        streamed: true,
        latency: Duration::from_millis(20),
        first_chunk: Some(Duration::from_millis(5)),
        bytes_in: 100,
        bytes_out: 200,
        error: None,
        rules: vec!["emails".into()],
    }
}

fn who() -> Identity {
    Identity {
        namespace: "team-a".into(),
        pod: "app-1".into(),
        container: "app".into(),
        service_account: String::new(),
    }
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kgw-store-{}-{}", std::process::id(), name));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn rollup_sums(store: &Store, table: &str) -> (i64, i64, i64) {
    let sql = format!("SELECT CAST(SUM(requests) AS BIGINT), CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT) FROM {table}");
    match store {
        Store::Sqlite(p, _) => sqlx::query_as(&sql).fetch_one(p).await.unwrap(),
        Store::Postgres(p) => sqlx::query_as(&sql).fetch_one(p).await.unwrap(),
    }
}

/// One stored event, read back column by column.
async fn read_row(store: &Store, id: &str) -> UsageRow {
    macro_rules! read {
        ($pool:expr) => {{
            let r = sqlx::query("SELECT * FROM usage_events WHERE request_id = $1")
                .bind(id)
                .fetch_one($pool)
                .await
                .unwrap();
            UsageRow {
                request_id: r.get("request_id"),
                time_ms: r.get("time_ms"),
                namespace: r.get("namespace"),
                pod: r.get("pod"),
                container: r.get("container"),
                source_ip: r.get("source_ip"),
                destination: r.get("destination"),
                api: r.get("api"),
                endpoint: r.get("endpoint"),
                requested_model: r.get("requested_model"),
                used_model: r.get("used_model"),
                input_tokens: r.get("input_tokens"),
                output_tokens: r.get("output_tokens"),
                cached_tokens: r.get("cached_tokens"),
                reasoning_tokens: r.get("reasoning_tokens"),
                token_source: r.get("token_source"),
                status: r.get("status"),
                outcome: r.get("outcome"),
                rules: r.get("rules"),
                latency_ms: r.get("latency_ms"),
                ttft_ms: r.get("ttft_ms"),
                streamed: r.get("streamed"),
            }
        }};
    }
    use sqlx::Row;
    match store {
        Store::Sqlite(p, _) => read!(p),
        Store::Postgres(p) => read!(p),
    }
}

async fn exercise(url: StoreUrl) {
    // Twice in a row: the second run finds the migrations applied.
    let store = Store::connect(&url)
        .await
        .expect("migrations apply on an empty store");
    let store2 = Store::connect(&url).await.expect("and again");
    drop(store2);
    let rows: Vec<UsageRow> = (0..20)
        .map(|i| {
            UsageRow::new(&record(
                i,
                if i % 2 == 0 { "gemma2:2b" } else { "qwen2.5" },
                10 + i,
                5,
            ))
        })
        .collect();
    assert_eq!(store.write(&rows).await.unwrap(), 20);
    assert_eq!(
        store.write(&rows[..10]).await.unwrap(),
        0,
        "a replayed batch adds nothing"
    );
    // Stored rows, new rows and one id twice in one batch: the new ones count, once.
    let fresh: Vec<UsageRow> = (20..23)
        .map(|i| UsageRow::new(&record(i, "gemma2:2b", 10 + i, 5)))
        .collect();
    let mut mixed = rows[15..].to_vec();
    mixed.extend(fresh.iter().cloned());
    mixed.push(fresh[1].clone());
    assert_eq!(store.write(&mixed).await.unwrap(), 3);
    // Every column round-trips with its type, absent values included.
    let mut odd = UsageRow::new(&record(23, "qwen2.5", 33, 5));
    odd.requested_model = None;
    odd.cached_tokens = Some(3);
    odd.reasoning_tokens = Some(2);
    odd.ttft_ms = None;
    odd.streamed = false;
    // What COPY's text format must escape, and its NULL marker as plain text.
    odd.rules = "emails,\"quoted\" ünïcode\ttab\nnewline\r\\N back\\slash".into();
    odd.container = "\\N".into();
    odd.latency_ms = 12.625;
    assert_eq!(store.write(std::slice::from_ref(&odd)).await.unwrap(), 1);
    let back = read_row(&store, &odd.request_id).await;
    assert_eq!(back, odd, "the stored row is the row written");
    let back = read_row(&store, &rows[3].request_id).await;
    assert_eq!(back, rows[3]);

    let totals = store.totals(0, i64::MAX).await.unwrap();
    assert_eq!(totals.len(), 2);
    let requests: i64 = totals.iter().map(|t| t.requests).sum();
    let input: i64 = totals.iter().map(|t| t.input_tokens).sum();
    assert_eq!(requests, 24);
    assert_eq!(input, (0..24).map(|i| 10 + i).sum::<i64>());
    assert_eq!(totals[0].namespace, "team-a");
    for table in ["usage_hourly", "usage_daily"] {
        assert_eq!(
            rollup_sums(&store, table).await,
            (24, input, 120),
            "{table} agrees with the events"
        );
    }
}

#[tokio::test]
async fn sqlite_store_migrates_writes_idempotently_and_rolls_up() {
    exercise(StoreUrl::Sqlite(tmp("sqlite").join("usage.db"))).await;
}

#[tokio::test]
async fn postgres_store_migrates_writes_idempotently_and_rolls_up() {
    let Some(url) = postgres_url() else { return };
    // A fresh database per run, so migrations meet an empty store.
    let admin = sqlx::PgPool::connect(&url)
        .await
        .expect("PostgreSQL reachable");
    let db = format!("kgw_test_{}", std::process::id());
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .unwrap();
    let base = url
        .rsplit_once('/')
        .map_or(url.as_str(), |(b, _)| b)
        .to_owned();
    exercise(StoreUrl::Postgres(format!("{base}/{db}"))).await;
}

#[tokio::test]
async fn the_writer_spools_while_the_store_is_away_and_replays_exactly_once() {
    let dir = tmp("writer");
    // The store's directory does not exist yet: SQLite cannot open the file.
    let db_dir = dir.join("later");
    let url = StoreUrl::Sqlite(db_dir.join("usage.db"));
    let spool_path = dir.join("usage.spool");
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let cfg = WriterConfig {
        batch_rows: 8,
        flush_every: Duration::from_millis(20),
        retry_every: Duration::from_millis(50),
    };
    let (handle, stats) = writer::spawn(url.clone(), None, Spool::new(&spool_path), cfg, rx);
    for i in 0..30 {
        tx.send(Arc::new(record(i, "m", 1, 1))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stats.spooled.load(std::sync::atomic::Ordering::Relaxed),
        30,
        "all spooled, none lost"
    );
    assert!(!Spool::new(&spool_path).is_empty());
    // The store comes back.
    std::fs::create_dir_all(&db_dir).unwrap();
    for i in 30..40 {
        tx.send(Arc::new(record(i, "m", 1, 1))).await.unwrap();
    }
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Spool::new(&spool_path).len(), 0, "the spool was emptied");
    let store = Store::connect(&url).await.unwrap();
    let totals = store.totals(0, i64::MAX).await.unwrap();
    assert_eq!(
        totals.iter().map(|t| t.requests).sum::<i64>(),
        40,
        "every row exactly once"
    );
}
