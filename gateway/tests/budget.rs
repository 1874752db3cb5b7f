//! Token budgets through the real gateway and demo LLM: requests are admitted until the
//! budget is spent, then refused with 429 and the seconds until the window resets; a
//! stream that crosses the line ends there, well-formed, with `length`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use kube_gateway::Outcome;
use kube_gateway_ai_demo::DemoConfig;
use serde_json::json;

/// A gateway with one pod budget of `limits`; keep the policy file while it runs.
async fn with_budget(limits: &str) -> (TestGateway, PolicyFile) {
    let (demo_addr, _) = demo(DemoConfig::default()).await;
    let policy = policy_file(&format!(
        "apiVersion: kube-gateway.io/v1alpha1\nbudgets:\n  - {{ name: pod-daily, scope: pod, window: day, limits: {limits} }}\n"
    ));
    let mut cfg = config(demo_addr);
    cfg.policy = Some(policy.path.clone());
    cfg.identity.namespace = "team-a".into();
    cfg.identity.pod = "app-1".into();
    (gateway(cfg).await, policy)
}

#[tokio::test]
async fn requests_are_admitted_until_the_budget_is_spent_then_429_until_the_reset() {
    let (mut gw, _policy) = with_budget("{ totalTokens: 100 }").await;
    let ask =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10});
    let mut admitted = 0;
    let refusal = loop {
        let a = post(gw.addr, "/v1/chat/completions", &ask).await;
        if a.status != 200 {
            break a;
        }
        admitted += 1;
        gw.record("/v1/chat/completions").await;
        assert!(admitted < 20, "the budget never ran out");
    };
    // Each call costs 1 prompt token and 10 generated: 9 fit in 100, the 10th cannot.
    assert_eq!(admitted, 9);
    assert_eq!(refusal.status, 429);
    assert_eq!(refusal.json()["error"]["code"], "budget_exhausted");
    assert!(refusal.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("pod-daily"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    let retry: u64 = refusal.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry.abs_diff(to_midnight) <= 2,
        "Retry-After {retry} s, day resets in {to_midnight} s"
    );
    let r = gw.record("/v1/chat/completions").await;
    assert_eq!(
        (r.status, r.outcome, r.input_tokens),
        (429, Outcome::Denied, 0)
    );
    assert_eq!(r.rules, ["pod-daily"]);
    // Ollama callers get the same answer in their format.
    let o = post(
        gw.addr,
        "/api/generate",
        &json!({"model": "m", "prompt": "hi", "stream": false}),
    )
    .await;
    assert_eq!(o.status, 429);
    assert!(o.json()["error"]
        .as_str()
        .unwrap()
        .contains(r#"budget "pod-daily" is spent"#));
}

#[tokio::test]
async fn a_stream_that_crosses_the_line_is_cut_well_formed_with_length() {
    // 1 prompt token + 9 generated = 10: the demo's 24-token answers cross it.
    let (mut gw, _policy) = with_budget("{ totalTokens: 10 }").await;
    let a = post(
        gw.addr,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    assert_eq!(a.status, 200);
    let events = a.sse_objects();
    let text = a.chat_stream_text();
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "length",
        "{}",
        a.text()
    );
    assert!(a.text().ends_with("data: [DONE]\n\n"));
    assert!(
        !a.text().contains("\"usage\""),
        "the hidden usage chunk stays hidden"
    );
    let r = gw.record("/v1/chat/completions").await;
    assert_eq!(r.outcome, Outcome::BudgetCut);
    assert_eq!(r.output_tokens, 9, "cut at the line: {text:?}");
    let next = post(
        gw.addr,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(next.status, 429, "spent once the cut answer ended");

    let (mut gw, _policy) = with_budget("{ outputTokens: 5 }").await;
    let o = post(
        gw.addr,
        "/api/chat",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let lines = o.ndjson_objects();
    let last = lines.last().unwrap();
    assert_eq!(
        (last["done"].clone(), last["done_reason"].clone()),
        (json!(true), json!("length")),
        "{}",
        o.text()
    );
    assert_eq!(lines.len(), 6, "five tokens, then the end");
    // At once: the cut answer's tokens count from the moment it ends.
    let again = post(
        gw.addr,
        "/api/chat",
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(again.status, 429, "spent");
    assert_eq!(gw.record("/api/chat").await.outcome, Outcome::BudgetCut);
}
