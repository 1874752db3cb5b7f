//! Policy hot paths: evaluating a typical chat request (5 messages, 2 KiB, 20 literal
//! and 5 regex rules), the streaming response filter, and token counting throughput.
//! `cargo bench -p kube-gateway-policy --bench policy`.
#![allow(clippy::expect_used)]

use std::alloc::System;
use std::hint::black_box;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kube_gateway_policy::{load, Encoding, Role, TokenCounter};

/// Counts allocations, so the benchmark can report how many an evaluation makes.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn policy_text() -> String {
    let mut s = String::from("apiVersion: kube-gateway.io/v1alpha1\nmodels:\n  rewrite:\n    - { from: \"llama3*\", to: gemma2:2b }\nmaxTokens: { default: 512 }\npromptRules:\n");
    for i in 0..20 {
        let action = if i % 4 == 0 { "deny" } else { "redact" };
        s.push_str(&format!("  - name: lit{i}\n    match: {{ literals: [\"forbidden phrase {i}\"] }}\n    action: {action}\n"));
    }
    for (i, re) in [
        r"\bproject-[a-z]{4,12}\b",
        r"(?i)password:\s*\S+",
        r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",
        r"\bACME-[0-9]{6}\b",
        r"(?i)\binternal only\b",
    ]
    .iter()
    .enumerate()
    {
        s.push_str(&format!(
            "  - name: re{i}\n    match: {{ regex: '{re}' }}\n    action: redact\n"
        ));
    }
    s.push_str("responseRules:\n  - name: words\n    match: { literals: [darn, heck, rabbit, carrot] }\n    action: redact\n");
    s
}

fn messages() -> Vec<(Role, String)> {
    let para = "The cluster runs several workloads that call a language model to summarise logs, \
                draft incident reports and answer questions about deployments. Please keep answers short. ";
    let mut msgs = vec![(Role::System, para.repeat(3))];
    for i in 0..4 {
        let role = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        msgs.push((
            role,
            format!(
                "{} note {i}: the password: hunter2 was rotated.",
                para.repeat(2)
            ),
        ));
    }
    msgs
}

fn evaluate(c: &mut Criterion) {
    let policy = load(&policy_text()).expect("bench policy loads");
    let msgs = messages();
    let bytes: usize = msgs.iter().map(|(_, t)| t.len()).sum();
    let evaluate = || {
        let decision = policy
            .models
            .decide(black_box("llama3.2:1b"), b"request-id");
        let mut edited = 0;
        for (role, text) in &msgs {
            if policy.prompt.denied_by(*role, text).is_some() {
                return (decision, 0, None);
            }
            if let Some(e) = policy.prompt.edit(*role, text) {
                edited += e.text.len();
            }
        }
        (
            decision,
            edited,
            policy.max_tokens.clamp("gemma2:2b", Some(4096)),
        )
    };
    // Warm first: the regex engines build their search caches on first use.
    black_box(evaluate());
    let region = Region::new(GLOBAL);
    black_box(evaluate());
    let stats = region.change();
    eprintln!(
        "request evaluation: {} allocations, {} bytes (5 messages, 4 of them edited)",
        stats.allocations + stats.reallocations,
        stats.bytes_allocated
    );
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("chat_5_messages_20_literals_5_regexes", |b| {
        b.iter(evaluate)
    });
    g.finish();

    let answer = "Here is what happened: a rabbit ate the carrot, darn. ".repeat(40);
    let mut g = c.benchmark_group("response");
    g.throughput(Throughput::Bytes(answer.len() as u64));
    g.bench_function("stream_filter_8_byte_chunks", |b| {
        b.iter(|| {
            let mut f = policy.response.stream();
            let mut out = 0;
            for chunk in answer.as_bytes().chunks(8) {
                out += f.push(std::str::from_utf8(chunk).unwrap_or("")).text.len();
            }
            out + f.finish().text.len()
        })
    });
    // The response rules of load.sh's stream workloads (gateway/benches/llm-policy.yaml)
    // on token-sized pieces, as a model streams them.
    let llm = load(
        "apiVersion: kube-gateway.io/v1alpha1\nresponseRules:\n\
         - { name: profanity, match: { literals: [darn, heck], caseSensitive: false }, action: redact, mask: '****' }\n\
         - { name: leaked-keys, match: { detector: openai-key }, action: redact }\n\
         - { name: ssn, match: { regex: '\\b\\d{3}-\\d{2}-\\d{4}\\b' }, action: redact }\n",
    )
    .expect("response rules");
    let tokens: Vec<&str> = answer.split_inclusive(' ').collect();
    g.bench_function("stream_filter_llm_policy_word_tokens", |b| {
        b.iter(|| {
            let mut f = llm.response.stream();
            let mut out = 0;
            for t in &tokens {
                out += f.push_released(t).text.len();
            }
            out + f.finish().text.len()
        })
    });
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let counter = TokenCounter::new();
    let text =
        "Kubernetes schedules pods onto nodes; the gateway counts tokens for every call. 数字 🙂 "
            .repeat(200);
    let _ = counter.count(Encoding::Cl100kBase, "warm");
    let _ = counter.count(Encoding::O200kBase, "warm");
    let mut g = c.benchmark_group("tokens");
    g.throughput(Throughput::Bytes(text.len() as u64));
    for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
        g.bench_function(enc.name(), |b| {
            b.iter(|| counter.count(enc, black_box(&text)))
        });
    }
    g.finish();
}

criterion_group!(benches, evaluate, tokens);
criterion_main!(benches);
