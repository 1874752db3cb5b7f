//! What the usage recorder spends on metrics and tracing for each finished request, on
//! its own thread and without the noise of a loaded proxy: `Telemetry::record` with the
//! Prometheus series only, then with the OTLP metrics, the OTLP spans, and both. The
//! exporter threads' own cost is not in these figures: `gateway/benches/store.sh`
//! (COMPARE=metrics) measures the whole gateway.
//! `cargo bench -p kube-gateway --bench telemetry`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use kube_gateway::api::Endpoint;
use kube_gateway::budget::{Ledger, SystemClock};
use kube_gateway::live::Live;
use kube_gateway::policy::PolicyStore;
use kube_gateway::telemetry::{Otel, Telemetry};
use kube_gateway::{Outcome, TokenSource, UsageRecord};
use kube_gateway_policy::model::ModelRewrite;
use kube_gateway_policy::Policy;

/// An address nobody listens on: the exporters' posts fail at once, which changes
/// nothing measured here (their threads are not the recorder's).
fn nobody() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn record(i: u64) -> UsageRecord {
    UsageRecord {
        request_id: format!("kgw-5f5831a7c9a54957-{i}"),
        workload: Arc::new(kube_gateway::record::Identity {
            namespace: "team-a".into(),
            pod: "chat-7d9f-abcde".into(),
            ..Default::default()
        }),
        started_at: SystemTime::now(),
        peer: SocketAddr::from(([10, 0, 3, 17], 40_000)),
        destination: "10.96.0.12:11434".into(),
        endpoint: Some(Endpoint::ChatCompletions),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        requested_model: Some("llama3.2:1b".into()),
        used_model: Some("gemma2:2b".into()),
        response_model: Some("gemma2:2b".into()),
        status: 200,
        outcome: Outcome::Allowed,
        input_tokens: 21 + i % 7,
        input_source: TokenSource::Provider,
        output_tokens: 9 + i % 11,
        output_source: TokenSource::Provider,
        cached_tokens: Some(0),
        reasoning_tokens: None,
        finish_reason: Some("stop".into()),
        streamed: false,
        latency: Duration::from_micros(900 + i % 300),
        first_chunk: Some(Duration::from_micros(850 + i % 300)),
        bytes_in: 180,
        bytes_out: 299,
        error: None,
        rules: Vec::new(),
    }
}

fn metrics(otlp: bool, exports: &[(&str, &str)], sink: SocketAddr) -> Arc<Telemetry> {
    for var in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
    ] {
        std::env::remove_var(var);
    }
    std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "1000");
    if otlp {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{sink}"));
    }
    for (k, v) in exports {
        std::env::set_var(k, v);
    }
    let live = Live {
        policy: Arc::new(PolicyStore::new(
            Policy::default(),
            None,
            ModelRewrite::default(),
        )),
        ledger: Arc::new(Ledger::new(Arc::new(SystemClock))),
        store: None,
        attached_pods: Arc::default(),
        open_connections: Arc::default(),
        pod_policies: Arc::default(),
    };
    let otel = Otel::from_env("team-a", "chat-7d9f-abcde", Arc::new(live))
        .unwrap()
        .map(Arc::new);
    Telemetry::new("team-a", "chat-7d9f-abcde", otel)
}

/// Name, whether OTLP is on, and the variable that turns one of its exports off.
type Config = (&'static str, bool, &'static [(&'static str, &'static str)]);

fn bench(c: &mut Criterion) {
    let sink = nobody();
    let configs: [Config; 4] = [
        ("prometheus", false, &[]),
        (
            "prometheus + otlp metrics",
            true,
            &[("OTEL_TRACES_EXPORTER", "none")],
        ),
        (
            "prometheus + otlp spans",
            true,
            &[("OTEL_METRICS_EXPORTER", "none")],
        ),
        ("prometheus + otlp metrics and spans", true, &[]),
    ];
    let records: Vec<UsageRecord> = (0..1024).map(record).collect();
    let mut group = c.benchmark_group("record");
    for (name, otlp, exports) in configs {
        let m = metrics(otlp, exports, sink);
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                m.record(&records[i % records.len()]);
                i += 1;
            })
        });
        m.shutdown();
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
