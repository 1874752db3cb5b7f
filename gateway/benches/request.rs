//! The request side of the proxy on one request body, as `http::proxy` runs it: parse,
//! `guard::request::apply`, `ensure_stream_usage`, `body()`. Two bodies: the 64 KiB
//! OpenAI chat request of `load.sh`'s workload (a) under `llm-policy.yaml` (a model
//! rewrite, five prompt rules its text does not match), and the 180-byte chat request of
//! workload (c) with a model rewrite only. Beside them, the floor: one copy of the body.
//! `cargo bench -p kube-gateway --bench request`; `KGW_BENCH_REQUEST=FILE` reads the big
//! body from a file (`python3 gateway/benches/llm_bodies.py DIR` writes
//! `DIR/big_request.json`), else one of the same shape is generated here.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kube_gateway::api::{Endpoint, LlmRequest};
use kube_gateway::guard::request::apply;
use kube_gateway_policy::{load, Policy};

mod words;
use words::Words;

const TINY: &str = r#"{"model":"llama3.2:1b","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello to the platform team, briefly."}],"max_tokens":32}"#;

const REWRITE_ONLY: &str = r#"apiVersion: kube-gateway.io/v1alpha1
models:
  rewrite: [{ from: "llama3*", to: "gemma2:2b" }]
"#;

/// Plain prose of exactly `n` ASCII characters.
fn prose(words: &mut Words, n: usize) -> String {
    let mut out = String::with_capacity(n + 16);
    while out.len() < n {
        let (word, stop) = words.next();
        if !out.is_empty() {
            out.push(if stop { '.' } else { ' ' });
        }
        out.push_str(word);
    }
    out.truncate(n);
    out
}

/// A 64 KiB chat request shaped as `llm_bodies.py`'s `big_request.json`: a system
/// message, turns of user and assistant messages (every third with a tool call and its
/// result), a last user message, eight tool definitions.
fn big_request() -> String {
    use serde_json::json;
    const SIZE: usize = 64 * 1024;
    let mut messages = vec![json!({"role": "system", "content": ""})];
    let mut turn = 0;
    while messages.len() < 49 {
        turn += 1;
        messages.push(json!({"role": "user", "content": ""}));
        if turn % 3 == 0 {
            let id = format!("call_{turn:04}");
            messages.push(
                json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": id, "type": "function", "function": {"name": "list_pods",
                "arguments": r#"{"namespace": "team-a", "selector": "app=web"}"#}}]}),
            );
            messages.push(json!({"role": "tool", "tool_call_id": id, "content": ""}));
        }
        messages.push(json!({"role": "assistant", "content": ""}));
    }
    messages.push(json!({"role": "user", "content": ""}));
    let s = json!({"type": "string"});
    let tools: Vec<_> = [
        (
            "get_deployment",
            "Read a deployment's spec and status in a namespace.",
        ),
        (
            "list_pods",
            "List the pods of a namespace matching a label selector.",
        ),
        ("scale_deployment", "Set a deployment's replica count."),
        ("query_metrics", "Run a PromQL query over a time range."),
        ("get_logs", "Fetch the last lines of a container's log."),
        ("open_ticket", "Open a ticket for the on-call team."),
        ("search_docs", "Search the internal runbooks."),
        (
            "get_budget",
            "Read a namespace's token budget and what it has used.",
        ),
    ]
    .iter()
    .map(|(name, desc)| {
        json!({"type": "function", "function": {"name": name, "description": desc,
            "parameters": {"type": "object", "properties": {"namespace": s, "name": s,
            "limit": {"type": "integer", "minimum": 0}}, "required": ["namespace"]}}})
    })
    .collect();
    let mut body = json!({"model": "llama3.2:1b", "messages": messages, "tools": tools,
        "tool_choice": "auto", "temperature": 0.2, "max_tokens": 512, "stream": false});
    let texts: Vec<usize> = (0..body["messages"].as_array().unwrap().len())
        .filter(|&i| body["messages"][i]["content"] == "")
        .collect();
    let share = (SIZE - body.to_string().len()) / texts.len();
    let mut words = Words::new(18);
    for &i in &texts {
        body["messages"][i]["content"] = prose(&mut words, share).into();
    }
    let last = *texts.last().unwrap();
    let short = SIZE - body.to_string().len();
    body["messages"][last]["content"] = prose(&mut words, share + short).into();
    let raw = body.to_string();
    assert_eq!(raw.len(), SIZE);
    raw
}

/// What the proxy does with a request body before it goes upstream.
fn proxy(policy: &Policy, original: &Bytes) -> Bytes {
    let mut req = LlmRequest::parse(Endpoint::ChatCompletions, original.clone()).unwrap();
    apply(policy, &mut req, b"bench").unwrap();
    req.ensure_stream_usage();
    req.body()
}

fn bench(c: &mut Criterion) {
    let big = match std::env::var("KGW_BENCH_REQUEST") {
        Ok(path) => std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")),
        Err(_) => big_request(),
    };
    let llm = load(include_str!("llm-policy.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let rewrite = load(REWRITE_ONLY).unwrap_or_else(|e| panic!("{e}"));
    for (name, body, policy) in [("big", big.as_str(), &llm), ("tiny", TINY, &rewrite)] {
        let original = Bytes::copy_from_slice(body.as_bytes());
        let sent = proxy(policy, &original);
        assert!(
            sent.windows(11).any(|w| w == b"\"gemma2:2b\""),
            "{name}: not rewritten"
        );
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(original.len() as u64));
        g.bench_function("parse_apply_body", |b| b.iter(|| proxy(policy, &original)));
        g.bench_function("floor_copy", |b| b.iter(|| original.to_vec()));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
