//! The response side of the proxy on one streamed answer, as `MeteredBody` runs it:
//! `Meter::on_data` on each chunk, then `on_end`. The two streams of `load.sh`'s
//! workload (b): 1,000 NDJSON lines (Ollama `/api/chat`) and 1,000 SSE events (OpenAI
//! chat), under `llm-policy.yaml`'s response rules; beside them, the same streams with
//! no rules (framing and usage only) and the floor, one copy of the bytes.
//! `cargo bench -p kube-gateway --bench stream`; `KGW_BENCH_STREAMS=DIR` reads
//! `DIR/stream.ndjson` and `DIR/stream.sse` (`python3 gateway/benches/llm_bodies.py DIR`
//! writes them), else streams of the same shape are generated here.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kube_gateway::api::Endpoint;
use kube_gateway::meter::{Bounds, Format, Meter, ESTIMATE_TEXT_BYTES};
use kube_gateway_policy::ResponseRules;

mod words;
use words::Words;

const EVENTS: usize = 1_000;
/// The size of the reads the gateway gets from a loopback upstream in `load.sh` (its
/// answers arrive in a few large reads).
const CHUNK: usize = 16 * 1024;

/// The `i`th streamed word: one in 100 is a word the policy masks (as in llm_bodies.py).
fn token(words: &mut Words, i: usize) -> String {
    let (word, _) = words.next();
    let w = if i % 100 == 50 { "darn" } else { word };
    format!(" {w}")
}

fn ndjson() -> Vec<u8> {
    let mut words = Words::new(0x9e37_79b9_7f4a_7c15);
    let mut out = String::new();
    for i in 0..=EVENTS {
        let at = format!("2026-12-03T12:00:{:012.9}Z", i as f64 * 2.5 / 1000.0);
        let line = if i < EVENTS {
            serde_json::json!({"model": "gemma2:2b", "created_at": at,
                "message": {"role": "assistant", "content": token(&mut words, i)}, "done": false})
        } else {
            serde_json::json!({"model": "gemma2:2b", "created_at": at,
                "message": {"role": "assistant", "content": ""}, "done_reason": "stop",
                "done": true, "total_duration": 2_500_000_000u64, "prompt_eval_count": 24,
                "eval_count": EVENTS, "eval_duration": 2_400_000_000u64})
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

fn sse() -> Vec<u8> {
    let mut words = Words::new(0x9e37_79b9_7f4a_7c15);
    let chunk = |choices: serde_json::Value, usage: serde_json::Value| {
        let v = serde_json::json!({"id": "chatcmpl-bench-sse", "object": "chat.completion.chunk",
            "created": 1_700_000_000, "model": "gemma2:2b", "system_fingerprint": "fp_bench",
            "choices": choices, "usage": usage});
        format!("data: {v}\n\n")
    };
    let mut out = chunk(
        serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
            "logprobs": null, "finish_reason": null}]),
        serde_json::Value::Null,
    );
    for i in 0..EVENTS {
        out.push_str(&chunk(
            serde_json::json!([{"index": 0, "delta": {"content": token(&mut words, i)},
                "logprobs": null, "finish_reason": null}]),
            serde_json::Value::Null,
        ));
    }
    out.push_str(&chunk(
        serde_json::json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]),
        serde_json::Value::Null,
    ));
    out.push_str(&chunk(
        serde_json::json!([]),
        serde_json::json!({"prompt_tokens": 24, "completion_tokens": EVENTS,
            "total_tokens": 24 + EVENTS}),
    ));
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

fn stream(name: &str, generate: fn() -> Vec<u8>) -> Vec<u8> {
    match std::env::var_os("KGW_BENCH_STREAMS") {
        Some(dir) => std::fs::read(std::path::Path::new(&dir).join(name)).unwrap(),
        None => generate(),
    }
}

fn rules() -> Arc<ResponseRules> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/llm-policy.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    kube_gateway_policy::load(&text).unwrap().response.clone()
}

/// One answer through a fresh meter, in `CHUNK`-byte reads; `sent` takes each piece
/// that goes to the client.
fn relay(
    endpoint: Endpoint,
    format: Format,
    rules: Option<&Arc<ResponseRules>>,
    chunks: &[Bytes],
    mut sent: impl FnMut(Bytes),
) {
    let bounds = Bounds {
        body: 16 << 20,
        event: 4 << 20,
        text: ESTIMATE_TEXT_BYTES,
    };
    let mut meter = Meter::with_rules(endpoint, format, false, bounds, rules.cloned());
    for c in chunks {
        sent(meter.on_data(c.clone()));
    }
    sent(meter.on_end());
}

/// What the client gets of one answer.
fn relayed(
    endpoint: Endpoint,
    format: Format,
    rules: Option<&Arc<ResponseRules>>,
    chunks: &[Bytes],
) -> Vec<u8> {
    let mut out = Vec::new();
    relay(endpoint, format, rules, chunks, |b| {
        out.extend_from_slice(&b)
    });
    out
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn bench(c: &mut Criterion) {
    let rules = rules();
    let streams = [
        (
            "ndjson",
            "stream.ndjson",
            Endpoint::Chat,
            Format::Ndjson,
            ndjson as fn() -> Vec<u8>,
        ),
        (
            "sse",
            "stream.sse",
            Endpoint::ChatCompletions,
            Format::Sse,
            sse,
        ),
    ];
    for (name, file, endpoint, format, generate) in streams {
        let body = stream(file, generate);
        let chunks: Vec<Bytes> = body.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
        // What the rules do to it: the ten masked words masked, nothing else changed.
        assert_eq!(
            relayed(endpoint, format, None, &chunks),
            body,
            "{name}: no rules"
        );
        let masked = relayed(endpoint, format, Some(&rules), &chunks);
        assert_eq!(count(&body, b" darn\""), EVENTS / 100, "{name}");
        assert_eq!(count(&masked, b" darn"), 0, "{name}");
        assert_eq!(count(&masked, b" ****\""), EVENTS / 100, "{name}");
        assert_eq!(masked.len(), body.len(), "{name}");
        let mut g = c.benchmark_group(format!("stream_{name}_{EVENTS}"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function("llm_policy", |b| {
            b.iter(|| relay(endpoint, format, Some(&rules), &chunks, drop))
        });
        g.bench_function("no_rules", |b| {
            b.iter(|| relay(endpoint, format, None, &chunks, drop))
        });
        g.bench_function("floor_copy", |b| {
            b.iter(|| {
                chunks
                    .iter()
                    .map(|c| std::hint::black_box(c.to_vec()).len())
                    .sum::<usize>()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
