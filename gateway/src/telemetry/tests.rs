//! Unit tests of the telemetry sinks: what a record puts in each Prometheus series.

use std::collections::HashSet;

use super::*;
use crate::budget::OTHER_MODELS;
use crate::record::TokenSource;

fn record(outcome: Outcome, rules: &[&str]) -> UsageRecord {
    UsageRecord {
        request_id: "kgw-x-1".into(),
        workload: std::sync::Arc::new(crate::record::Identity {
            namespace: "ns".into(),
            pod: "pod".into(),
            ..Default::default()
        }),
        started_at: std::time::SystemTime::UNIX_EPOCH,
        peer: "10.0.0.7:41000".parse().unwrap(),
        destination: "10.0.0.9:11434".into(),
        endpoint: Some(Endpoint::Chat),
        method: "POST".into(),
        path: "/api/chat".into(),
        requested_model: Some("llama3".into()),
        used_model: Some("gemma2:2b".into()),
        response_model: Some("gemma2:2b".into()),
        status: 200,
        outcome,
        input_tokens: 12,
        input_source: TokenSource::Provider,
        output_tokens: 30,
        output_source: TokenSource::Provider,
        cached_tokens: Some(4),
        reasoning_tokens: None,
        finish_reason: Some("stop".into()),
        streamed: true,
        latency: std::time::Duration::from_millis(250),
        first_chunk: Some(std::time::Duration::from_millis(30)),
        bytes_in: 100,
        bytes_out: 200,
        error: None,
        rules: rules.iter().map(|r| (*r).to_owned()).collect(),
    }
}

#[test]
fn a_request_shows_in_every_series_it_belongs_to() {
    let m = Telemetry::new("ns", "pod", None);
    m.record(&record(Outcome::Redacted, &["emails"]));
    m.record(&record(Outcome::Denied, &["no-jailbreak"]));
    m.captured();
    let text = m.encode();
    let genai = r#"namespace="ns",pod="pod",gen_ai_operation_name="chat",gen_ai_provider_name="ollama",gen_ai_request_model="gemma2:2b",gen_ai_response_model="gemma2:2b""#;
    for line in [
        format!("gen_ai_client_token_usage_sum{{{genai},gen_ai_token_type=\"input\"}} 12.0"),
        format!("gen_ai_client_token_usage_sum{{{genai},gen_ai_token_type=\"output\"}} 30.0"),
        format!("gen_ai_client_operation_duration_seconds_count{{{genai}}} 1"),
        format!("gen_ai_server_time_to_first_token_seconds_sum{{{genai}}} 0.03"),
        format!("kube_gateway_cached_tokens_total{{{genai}}} 4"),
        r#"kube_gateway_requests_total{namespace="ns",pod="pod",outcome="redacted",gen_ai_request_model="llama3"} 1"#.into(),
        r#"kube_gateway_requests_total{namespace="ns",pod="pod",outcome="denied",gen_ai_request_model="llama3"} 1"#.into(),
        r#"kube_gateway_rule_hits_total{namespace="ns",pod="pod",rule="emails"} 1"#.into(),
        r#"kube_gateway_model_rewrites_total{namespace="ns",pod="pod",from="llama3",to="gemma2:2b"} 2"#.into(),
        r#"kube_gateway_connections_captured_total{namespace="ns",pod="pod"} 1"#.into(),
    ] {
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    assert!(!text.contains("kgw-x-1"), "no request id in a label");
}

/// The sum of a family's samples named `name` (all label sets).
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_scrape_that_counts_a_request_holds_its_tokens() {
    // Each scrape meets records in flight: the requests counter must never run
    // ahead of the series the same records update.
    let m = Telemetry::new("ns", "pod", None);
    let writer = {
        let m = m.clone();
        std::thread::spawn(move || {
            let r = record(Outcome::Redacted, &["emails"]);
            for _ in 0..20_000 {
                m.record(&r);
            }
        })
    };
    let mut scrapes = 0;
    loop {
        let done = writer.is_finished();
        let text = m.encode();
        let requests = total(&text, "kube_gateway_requests_total");
        for series in [
            "gen_ai_client_token_usage_count",
            "kube_gateway_rule_hits_total",
            "kube_gateway_model_rewrites_total",
        ] {
            // Token usage has an input and an output sample per request.
            let per = if series.starts_with("gen_ai") {
                2.0
            } else {
                1.0
            };
            assert!(
                total(&text, series) >= requests * per,
                "{series} behind {requests} requests in scrape {scrapes}"
            );
        }
        scrapes += 1;
        if done {
            assert_eq!(requests, 20_000.0);
            break;
        }
    }
    writer.join().unwrap();
}

#[test]
fn model_names_past_the_bound_count_under_other_and_no_token_is_lost() {
    let m = Telemetry::new("ns", "pod", None);
    let mut r = record(Outcome::Allowed, &[]);
    let n = MAX_MODEL_LABELS + 10;
    for i in 0..n {
        let name = format!("model-{i}");
        r.requested_model = Some(name.clone());
        r.used_model = Some(name.clone());
        r.response_model = Some(name);
        m.record(&r);
    }
    // A name that had its label keeps it after the bound is reached.
    r.requested_model = Some("model-0".into());
    r.used_model = Some("model-0".into());
    r.response_model = Some("model-0".into());
    m.record(&r);
    let text = m.encode();
    let models: HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("gen_ai_client_token_usage_count{"))
        .filter_map(|l| l.split("gen_ai_request_model=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(models.len(), MAX_MODEL_LABELS + 1, "{models:?}");
    assert!(models.contains(OTHER_MODELS) && models.contains("model-0"));
    assert!(!models.contains(format!("model-{}", n - 1).as_str()));
    let other = format!(
        r#"kube_gateway_requests_total{{namespace="ns",pod="pod",outcome="allowed",gen_ai_request_model="{OTHER_MODELS}"}} 10"#
    );
    assert!(text.contains(&other), "{other} missing:\n{text}");
    assert_eq!(total(&text, "kube_gateway_requests_total"), (n + 1) as f64);
    assert_eq!(
        total(&text, "gen_ai_client_token_usage_sum"),
        ((n + 1) * (12 + 30)) as f64,
        "every token counted somewhere"
    );
    // Names that differ are a rewrite even when both are past the bound.
    r.requested_model = Some("late-a".into());
    r.used_model = Some("late-b".into());
    m.record(&r);
    assert!(m.encode().contains(&format!(
        r#"kube_gateway_model_rewrites_total{{namespace="ns",pod="pod",from="{OTHER_MODELS}",to="{OTHER_MODELS}"}} 1"#
    )));
}

#[test]
fn an_unparsed_request_reached_the_llm_and_counts_its_tokens() {
    // Forwarded unchanged: the provider may report usage, and the store keeps it; the
    // series must count the same tokens (the store and Prometheus agree, unfiltered).
    let m = Telemetry::new("ns", "pod", None);
    m.record(&record(Outcome::Unparsed, &[]));
    m.record(&record(Outcome::Denied, &[]));
    let text = m.encode();
    assert_eq!(
        total(&text, "gen_ai_client_token_usage_sum"),
        42.0,
        "{text}"
    );
    assert_eq!(
        total(&text, "gen_ai_client_operation_duration_seconds_count"),
        1.0
    );
    assert_eq!(total(&text, "kube_gateway_requests_total"), 2.0);
}

#[test]
fn other_traffic_is_not_an_llm_call() {
    let m = Telemetry::new("ns", "pod", None);
    let mut r = record(Outcome::Allowed, &[]);
    r.endpoint = None;
    m.record(&r);
    assert_eq!(total(&m.encode(), "kube_gateway_requests_total"), 0.0);
}

#[test]
fn tokens_are_counted_by_how_they_were_counted() {
    let m = Telemetry::new("ns", "pod", None);
    m.record(&record(Outcome::Allowed, &[]));
    let mut estimated = record(Outcome::Allowed, &[]);
    estimated.input_source = TokenSource::Calibrated;
    estimated.output_source = TokenSource::ContentEvents;
    m.record(&estimated);
    // A refusal reached no model: none of its tokens count.
    m.record(&record(Outcome::Denied, &[]));
    let text = m.encode();
    let line = |kind: &str, source: &str, n: u64| {
        format!(
            r#"kube_gateway_tokens_by_source_total{{namespace="ns",pod="pod",gen_ai_token_type="{kind}",source="{source}"}} {n}"#
        )
    };
    for l in [
        line("input", "provider", 12),
        line("output", "provider", 30),
        line("input", "calibrated", 12),
        line("output", "content_events", 30),
    ] {
        assert!(text.contains(&l), "{l} missing:\n{text}");
    }
    // The same tokens as the GenAI histograms, split by source.
    assert_eq!(
        total(&text, "kube_gateway_tokens_by_source_total"),
        total(&text, "gen_ai_client_token_usage_sum")
    );
}
