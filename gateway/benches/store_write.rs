//! The usage store's batch write on its own: rows a second into SQLite (and PostgreSQL
//! when `KGW_TEST_POSTGRES_URL` names one), 500-row batches as the writer makes them,
//! with the CPU the writing took: this process's (the caller's encoding and the database
//! driver's threads) and, for a PostgreSQL server on this machine, the server's.
//! `cargo bench -p kube-gateway --bench store_write`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kube_gateway::store::{Store, StoreUrl, UsageRow};

const BATCH: usize = 500;

fn row(run: u64, i: u64) -> UsageRow {
    UsageRow {
        // Each run its own ids: a database kept from an earlier run must not turn the
        // inserts into skipped duplicates. Shaped as a gateway's: two serving threads
        // each counting in its own range (the thread in the top bits), in decimal. (How
        // ids sort matters to the key index: one ascending range costs PostgreSQL about
        // half the server CPU a row of this shape.)
        request_id: format!("{run:016x}-{}", ((i % 2) << 48) | (i / 2)),
        time_ms: 1_795_000_000_000 + i as i64,
        namespace: "team-a".into(),
        pod: "chat-7d9f-abcde".into(),
        container: "app".into(),
        source_ip: "10.0.3.17".into(),
        destination: "10.96.0.12:11434".into(),
        api: "openai".into(),
        endpoint: "chat_completions".into(),
        requested_model: Some("llama3.2:1b".into()),
        used_model: Some(["gemma2:2b", "llama3.2:1b", "qwen2.5:0.5b"][i as usize % 3].into()),
        input_tokens: 21 + (i % 7) as i64,
        output_tokens: 9 + (i % 11) as i64,
        cached_tokens: Some(0),
        reasoning_tokens: None,
        token_source: "provider".into(),
        status: 200,
        outcome: "allowed".into(),
        rules: String::new(),
        latency_ms: 1.25,
        ttft_ms: Some(0.8),
        streamed: false,
    }
}

/// User + system CPU in a `/proc/PID/stat` text (fields after the command name).
fn stat_cpu(stat: &str) -> Duration {
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((field(11) + field(12)) * 10)
}

/// This process's CPU time (all threads).
fn cpu() -> Duration {
    stat_cpu(&std::fs::read_to_string("/proc/self/stat").unwrap())
}

/// CPU time of every `postgres` process on this machine (a local server's share).
fn postgres_cpu() -> Duration {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter(|stat| stat.contains(" (postgres) "))
        .map(|stat| stat_cpu(&stat))
        .sum()
}

fn bench_store(c: &mut Criterion, name: &str, url: StoreUrl) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(Store::connect(&url)).expect("store");
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut next = 0u64;
    let mut batch = || {
        let rows: Vec<UsageRow> = (next..next + BATCH as u64).map(|i| row(run, i)).collect();
        next += BATCH as u64;
        rows
    };
    let mut g = c.benchmark_group("store_write");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function(name, |b| {
        b.iter_batched(
            &mut batch,
            |rows| rt.block_on(store.write(&rows)).expect("write"),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
    // CPU a row, over a fixed run (criterion reports wall time only).
    let rows = 100 * BATCH;
    let (t0, c0, p0) = (Instant::now(), cpu(), postgres_cpu());
    for _ in 0..100 {
        let b = batch();
        rt.block_on(store.write(&b)).expect("write");
    }
    let (wall, used, server) = (t0.elapsed(), cpu() - c0, postgres_cpu() - p0);
    let per_row = |d: Duration| d.as_secs_f64() * 1e6 / rows as f64;
    println!(
        "store_write/{name}: {rows} rows, {:.2} us wall, {:.2} us CPU here and {:.2} us in local postgres processes a row",
        per_row(wall),
        per_row(used),
        per_row(server)
    );
}

fn stores(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("kgw-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    bench_store(c, "sqlite", StoreUrl::Sqlite(dir.join("usage.db")));
    match std::env::var("KGW_TEST_POSTGRES_URL") {
        Ok(url) => bench_store(c, "postgres", StoreUrl::Postgres(url)),
        Err(_) => println!("store_write/postgres: skipped (set KGW_TEST_POSTGRES_URL)"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, stores);
criterion_main!(benches);
