//! The proxy over real sockets, in front of the demo LLM server: every recognized
//! endpoint, streaming and not, the model rewrite, exact usage, hidden include_usage,
//! pass-through of everything else, and the error answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test tasks end with the test's runtime.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use kube_gateway::{Outcome, TokenSource};
use kube_gateway_ai_demo::text;
use kube_gateway_ai_demo::DemoConfig;
use kube_gateway_policy::ModelRewrite;
use serde_json::{json, Value};

const TARGET: &str = "rewritten-model";

struct Case {
    path: &'static str,
    body: Value,
    /// The prompt text as the demo server counts it.
    prompt: &'static str,
    max: u64,
    stream: bool,
    embedding: bool,
}

fn chat_messages() -> Value {
    json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}])
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for stream in [false, true] {
        out.push(Case {
            path: "/v1/chat/completions",
            body: json!({"model": "gpt-4o-mini", "messages": chat_messages(), "max_tokens": 10, "stream": stream}),
            prompt: "You are terse.\nSay hello",
            max: 10,
            stream,
            embedding: false,
        });
        out.push(Case {
            path: "/v1/completions",
            body: json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "max_tokens": 7, "stream": stream}),
            prompt: "Once upon",
            max: 7,
            stream,
            embedding: false,
        });
        out.push(Case {
            path: "/v1/responses",
            body: json!({"model": "gpt-4.1", "input": "Tell me a story", "max_output_tokens": 50, "stream": stream}),
            prompt: "Tell me a story",
            max: 50,
            stream,
            embedding: false,
        });
        out.push(Case {
            path: "/api/chat",
            body: json!({"model": "llama3.2:1b", "messages": chat_messages(), "options": {"num_predict": 9}, "stream": stream}),
            prompt: "You are terse.\nSay hello",
            max: 9,
            stream,
            embedding: false,
        });
        out.push(Case {
            path: "/api/generate",
            body: json!({"model": "llama3.2:1b", "prompt": "Why is the sky blue?", "stream": stream}),
            prompt: "Why is the sky blue?",
            max: text::DEFAULT_MAX_TOKENS,
            stream,
            embedding: false,
        });
    }
    out.push(Case {
        path: "/v1/embeddings",
        body: json!({"model": "text-embedding-3-small", "input": "embed these words"}),
        prompt: "embed these words",
        max: 0,
        stream: false,
        embedding: true,
    });
    out.push(Case {
        path: "/api/embed",
        body: json!({"model": "nomic-embed-text", "input": "embed these words"}),
        prompt: "embed these words",
        max: 0,
        stream: false,
        embedding: true,
    });
    out.push(Case {
        path: "/api/embeddings",
        body: json!({"model": "nomic-embed-text", "prompt": "embed these words"}),
        prompt: "embed these words",
        max: 0,
        stream: false,
        embedding: true,
    });
    out
}

/// The generated text a client sees in an answer.
fn client_text(path: &str, answer: &Answer, stream: bool) -> String {
    let objects = match (stream, path.starts_with("/api/")) {
        (false, _) => vec![answer.json()],
        (true, false) => answer.sse_objects(),
        (true, true) => answer.ndjson_objects(),
    };
    let mut out = String::new();
    for o in objects {
        for p in [
            "/choices/0/message/content",
            "/choices/0/delta/content",
            "/choices/0/text",
            "/message/content",
            "/response",
            "/delta",
        ] {
            if let Some(s) = o.pointer(p).and_then(Value::as_str) {
                out.push_str(s);
            }
        }
        if !stream {
            if let Some(s) = o
                .pointer("/output/0/content/0/text")
                .and_then(Value::as_str)
            {
                out.push_str(s);
            }
        }
    }
    out
}

#[tokio::test]
async fn every_endpoint_is_rewritten_forwarded_and_metered_exactly() {
    let (demo_addr, demo) = demo(DemoConfig::default()).await;
    let mut cfg = config(demo_addr);
    cfg.rewrite = ModelRewrite::everything_to(TARGET).unwrap();
    let mut gw = gateway(cfg).await;

    for case in cases() {
        let what = format!("{} stream={}", case.path, case.stream);
        let answer = post(gw.addr, case.path, &case.body).await;
        assert_eq!(answer.status, 200, "{what}: {}", answer.text());

        let seen = demo.requests().pop().expect("upstream saw the request");
        assert_eq!(seen.path, case.path, "{what}");
        assert_eq!(
            seen.model.as_deref(),
            Some(TARGET),
            "{what}: upstream got the rewritten model"
        );

        let record = gw.record(case.path).await;
        let asked = case.body["model"].as_str().unwrap();
        assert_eq!(record.requested_model.as_deref(), Some(asked), "{what}");
        assert_eq!(record.used_model.as_deref(), Some(TARGET), "{what}");
        assert_eq!(record.outcome, Outcome::Allowed, "{what}");
        assert_eq!(record.streamed, case.stream, "{what}");
        assert_eq!(
            record.input_tokens,
            text::count_tokens(case.prompt),
            "{what}: input tokens"
        );
        if case.embedding {
            assert_eq!(record.output_tokens, 0, "{what}");
        } else {
            let reply = text::reply(TARGET, case.prompt, case.max);
            assert_eq!(
                record.output_tokens,
                reply.tokens.len() as u64,
                "{what}: output tokens"
            );
            assert_eq!(
                client_text(case.path, &answer, case.stream),
                reply.text(),
                "{what}: client text"
            );
            assert_eq!(record.output_source, TokenSource::Provider, "{what}");
        }
        // The legacy embeddings answer reports no usage: its count is tiktoken's,
        // calibrated by the answers of the same upstream and model before it (the demo
        // counts with tiktoken, so the fit is the identity and the count exact).
        let expected_source = if case.path == "/api/embeddings" {
            TokenSource::Calibrated
        } else {
            TokenSource::Provider
        };
        assert_eq!(record.input_source, expected_source, "{what}");
        assert_eq!(record.status, 200);
        assert!(record.bytes_out > 0 && record.bytes_in > 0, "{what}");
    }
}

#[tokio::test]
async fn injected_include_usage_is_invisible_to_the_client() {
    let (demo_addr, demo) = demo(DemoConfig::default()).await;
    let mut gw = gateway(config(demo_addr)).await;
    let body =
        json!({"model": "gpt-4o", "messages": chat_messages(), "stream": true, "max_tokens": 6});

    let direct = post(demo_addr, "/v1/chat/completions", &body).await;
    let via = post(gw.addr, "/v1/chat/completions", &body).await;
    let upstream_body: Value = serde_json::from_str(&demo.requests().pop().unwrap().body).unwrap();
    assert_eq!(
        upstream_body["stream_options"]["include_usage"], true,
        "gateway asked for usage upstream"
    );

    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("created");
        v.as_object_mut().unwrap().remove("id");
        v
    };
    let direct_events: Vec<Value> = direct.sse_objects().into_iter().map(strip).collect();
    let via_events: Vec<Value> = via.sse_objects().into_iter().map(strip).collect();
    assert_eq!(
        via_events, direct_events,
        "same events as without the gateway"
    );
    assert!(
        !via.text().contains("usage"),
        "no usage field or chunk reaches the client"
    );
    assert!(via.text().ends_with("data: [DONE]\n\n"));

    let record = gw.record("/v1/chat/completions").await;
    assert_eq!(record.input_source, TokenSource::Provider);
    assert_eq!(record.output_tokens, 6);

    // A client that asked for usage gets it untouched.
    let mut asked = body.clone();
    asked["stream_options"] = json!({"include_usage": true});
    let via = post(gw.addr, "/v1/chat/completions", &asked).await;
    let last = via.sse_objects().pop().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert_eq!(last["choices"], json!([]));
}

#[tokio::test]
async fn cached_and_reasoning_details_are_recorded() {
    let (demo_addr, _demo) = demo(DemoConfig::default()).await;
    let mut gw = gateway(config(demo_addr)).await;
    let body = json!({"model": "cache-reason-model", "messages": [{"role": "user", "content": "a somewhat longer prompt with several words in it"}], "max_tokens": 10});
    assert_eq!(
        post(gw.addr, "/v1/chat/completions", &body).await.status,
        200
    );
    let r = gw.record("/v1/chat/completions").await;
    assert_eq!(r.cached_tokens, Some(r.input_tokens / 2));
    assert_eq!(r.reasoning_tokens, Some(r.output_tokens / 2));
    let body =
        json!({"model": "cache-reason-model", "input": "a somewhat longer prompt", "stream": true});
    assert_eq!(post(gw.addr, "/v1/responses", &body).await.status, 200);
    let r = gw.record("/v1/responses").await;
    assert_eq!(r.cached_tokens, Some(r.input_tokens / 2));
    assert_eq!(r.reasoning_tokens, Some(r.output_tokens / 2));
}

#[tokio::test]
async fn stream_chunks_reach_the_client_as_they_are_generated() {
    let delay = Duration::from_millis(60);
    let (demo_addr, _demo) = demo(DemoConfig {
        first_token_delay: delay,
        token_delay: delay,
        ..Default::default()
    })
    .await;
    let gw = gateway(config(demo_addr)).await;
    for (path, body) in [
        (
            "/api/generate",
            json!({"model": "m", "prompt": "p", "options": {"num_predict": 5}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "p"}], "stream": true, "max_tokens": 5}),
        ),
    ] {
        let answer = post(gw.addr, path, &body).await;
        // Five tokens generated 60 ms apart: a proxy that buffered would deliver them in
        // one burst; ours delivers each on its own.
        let token_chunks: Vec<_> = answer.chunks.iter().filter(|(_, c)| c.len() > 1).collect();
        assert!(
            token_chunks.len() >= 5,
            "{path}: {} chunks",
            token_chunks.len()
        );
        let spread = answer.chunks.last().unwrap().0 - answer.chunks.first().unwrap().0;
        assert!(
            spread >= delay * 3,
            "{path}: all chunks arrived within {spread:?}"
        );
    }
}

#[tokio::test]
async fn unrecognized_requests_pass_byte_for_byte_with_their_host() {
    let (demo_addr, demo) = demo(DemoConfig::default()).await;
    let gw = gateway(config(demo_addr)).await;
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let answer = send(
        gw.addr,
        "PUT",
        "/demo/echo?x=1",
        &[("host", "llm.example:11434")],
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.as_ref(), body.as_slice(), "body identical");
    assert_eq!(
        answer.headers["x-demo-host"], "llm.example:11434",
        "Host preserved"
    );
    let seen = demo.requests().pop().unwrap();
    assert_eq!(seen.body_len, body.len());

    // GET on a recognized path is not an LLM call either.
    let answer = send(gw.addr, "GET", "/api/tags", &[], Vec::new()).await;
    assert_eq!(answer.json(), json!({"models": []}));
}

#[tokio::test]
async fn malformed_json_is_forwarded_unchanged_or_refused_when_fail_closed() {
    let (demo_addr, demo) = demo(DemoConfig::default()).await;
    let mut gw = gateway(config(demo_addr)).await;
    let bad = br#"{"model": "m", "messages": [ oops"#.to_vec();
    let answer = send(gw.addr, "POST", "/v1/chat/completions", &[], bad.clone()).await;
    assert_eq!(answer.status, 400, "the upstream's own answer");
    assert_eq!(
        demo.requests().pop().unwrap().body.as_bytes(),
        bad.as_slice()
    );
    assert_eq!(
        gw.record("/v1/chat/completions").await.outcome,
        Outcome::Unparsed
    );
    // JSON the reader refuses ("stream" is not a boolean) that the upstream answers:
    // forwarded unchanged, and the answer's usage is still metered.
    let typo = br#"{"model":"m","stream":"no","messages":[{"role":"user","content":"hi"}]}"#;
    let answer = send(gw.addr, "POST", "/v1/chat/completions", &[], typo.to_vec()).await;
    assert_eq!(answer.status, 200);
    let r = gw.record("/v1/chat/completions").await;
    assert_eq!(r.outcome, Outcome::Unparsed);
    assert!(r.output_tokens > 0, "metered: {r:?}");

    let mut cfg = config(demo_addr);
    cfg.fail_closed = true;
    let mut closed = gateway(cfg).await;
    let before = demo.requests().len();
    let answer = send(closed.addr, "POST", "/api/chat", &[], bad).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.headers["x-kube-gateway-error"], "invalid_json");
    assert!(answer.json()["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert_eq!(demo.requests().len(), before, "never reached the upstream");
    assert_eq!(closed.record("/api/chat").await.outcome, Outcome::Rejected);
}

#[tokio::test]
async fn oversized_bodies_get_413_in_the_callers_dialect() {
    let (demo_addr, demo) = demo(DemoConfig::default()).await;
    let mut cfg = config(demo_addr);
    cfg.limits.body_bytes = 1024;
    let gw = gateway(cfg).await;
    let big = json!({"model": "m", "prompt": "x".repeat(2000)});
    let answer = post(gw.addr, "/v1/completions", &big).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["error"]["code"], "request_too_large");
    let answer = post(gw.addr, "/api/generate", &big).await;
    assert_eq!(answer.status, 413);
    assert!(answer.json()["error"].as_str().unwrap().contains("1024"));
    assert!(demo.requests().is_empty());
    // Chunked bodies (no Content-Length) are held to the same limit.
    let stream = futures_free_chunked(gw.addr, &big.to_string()).await;
    assert!(stream.starts_with("HTTP/1.1 413"), "{stream}");
}

/// Sends a chunked POST by hand and returns the raw answer.
async fn futures_free_chunked(addr: std::net::SocketAddr, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = String::from("POST /api/generate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    for part in body.as_bytes().chunks(300) {
        req.push_str(&format!(
            "{:x}\r\n{}\r\n",
            part.len(),
            String::from_utf8_lossy(part)
        ));
    }
    req.push_str("0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn dead_upstream_gets_502_and_silent_upstream_504() {
    // A port with nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut gw = gateway(config(closed)).await;
    let answer = post(
        gw.addr,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": []}),
    )
    .await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.headers["x-kube-gateway-error"],
        "upstream_unreachable"
    );
    assert_eq!(answer.json()["error"]["type"], "upstream_error");
    let answer = post(gw.addr, "/api/chat", &json!({"model": "m", "messages": []})).await;
    assert_eq!(answer.status, 502);
    assert!(answer.json()["error"].is_string(), "Ollama's error shape");
    assert_eq!(
        gw.record("/v1/chat/completions").await.outcome,
        Outcome::UpstreamError
    );

    // Accepts, reads, never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut cfg = config(silent_addr);
    cfg.limits.response_timeout = Duration::from_millis(300);
    let gw = gateway(cfg).await;
    let answer = post(
        gw.addr,
        "/api/generate",
        &json!({"model": "m", "prompt": "p"}),
    )
    .await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.headers["x-kube-gateway-error"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_dying_mid_stream_ends_the_stream_well_formed() {
    let (demo_addr, _demo) = demo(DemoConfig::default()).await;
    let mut gw = gateway(config(demo_addr)).await;
    let fault = [("x-demo-fault", "reset-midstream")];

    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "p"}], "stream": true});
    let answer = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &fault,
        body.to_string(),
    )
    .await;
    let events = answer.sse_objects();
    assert!(
        events.len() >= 2,
        "tokens before the failure arrived: {}",
        answer.text()
    );
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "upstream_reset", "{}", answer.text());
    assert!(answer.text().ends_with("\n\n"));
    let r = gw.record("/v1/chat/completions").await;
    assert_eq!(r.outcome, Outcome::UpstreamError);
    assert_eq!(
        r.output_source,
        TokenSource::Estimate,
        "no provider usage: estimated from what passed"
    );
    assert_eq!(r.output_tokens, 2);

    let body = json!({"model": "m", "prompt": "p"});
    let answer = send(gw.addr, "POST", "/api/generate", &fault, body.to_string()).await;
    let lines = answer.ndjson_objects();
    assert_eq!(
        lines.len(),
        3,
        "two tokens and the error line: {}",
        answer.text()
    );
    assert!(lines[2]["error"].as_str().unwrap().contains("mid-answer"));
}

#[tokio::test]
async fn upstream_errors_pass_through_and_are_recorded() {
    let (demo_addr, _demo) = demo(DemoConfig::default()).await;
    let mut gw = gateway(config(demo_addr)).await;
    let answer = send(
        gw.addr,
        "POST",
        "/api/chat",
        &[("x-demo-fault", "status-500")],
        json!({"model": "m"}).to_string(),
    )
    .await;
    assert_eq!(answer.status, 500);
    assert_eq!(answer.json()["error"], "demo fault: internal error");
    let r = gw.record("/api/chat").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.error.as_deref(), Some("demo fault: internal error"));
}

/// An upstream that answers every request with one fixed Content-Length response written
/// in a single write, as nginx does: hyper then sees the body end with its last byte.
async fn one_write_upstream(response: &'static str) -> std::net::SocketAddr {
    scripted_upstream(response, usize::MAX, std::sync::Arc::default()).await
}

/// Like [`one_write_upstream`], but closes each connection after `per_connection`
/// answers without saying so (no `Connection: close`), as servers with a keep-alive
/// limit do, and counts the connections it accepted.
async fn scripted_upstream(
    response: &'static str,
    per_connection: usize,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut answered = 0;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(head_end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() < head_end + 4 + len {
                        continue;
                    }
                    buf.drain(..head_end + 4 + len);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{response}",
                        response.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    answered += 1;
                    if answered == per_connection {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn usage_is_read_from_bodies_that_end_with_their_last_byte() {
    let upstream = one_write_upstream(
        r#"{"id":"x","object":"chat.completion","model":"gemma2:2b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":9,"total_tokens":30}}"#,
    )
    .await;
    let mut gw = gateway(config(upstream)).await;
    for _ in 0..20 {
        let answer = post(
            gw.addr,
            "/v1/chat/completions",
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(answer.status, 200);
        let r = gw.record("/v1/chat/completions").await;
        assert_eq!(
            (r.input_tokens, r.input_source),
            (21, TokenSource::Provider)
        );
        assert_eq!(
            (r.output_tokens, r.output_source),
            (9, TokenSource::Provider)
        );
        assert_eq!(r.outcome, Outcome::Allowed);
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    }
}

/// Sends `n` requests one after another on one client connection.
async fn keep_alive_posts(
    addr: std::net::SocketAddr,
    path: &str,
    body: &Value,
    n: usize,
) -> Vec<u16> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for _ in 0..n {
        sender.ready().await.unwrap();
        let req = http::Request::post(path)
            .header("host", "llm")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        statuses.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    statuses
}

const CANNED: &str = r#"{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

#[tokio::test]
async fn a_keep_alive_client_keeps_one_upstream_connection() {
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstream = scripted_upstream(CANNED, usize::MAX, accepted.clone()).await;
    let gw = gateway(config(upstream)).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        keep_alive_posts(gw.addr, "/v1/chat/completions", &body, 10).await,
        vec![200; 10]
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "ten requests, one upstream connection"
    );
    // A second client connection after the first ended reuses the pooled connection.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        keep_alive_posts(gw.addr, "/v1/chat/completions", &body, 3).await,
        vec![200; 3]
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "pooled upstream connection reused"
    );
}

#[tokio::test]
async fn an_upstream_that_closed_a_kept_connection_costs_the_client_nothing() {
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Closes every connection after one answer, silently.
    let upstream = scripted_upstream(CANNED, 1, accepted.clone()).await;
    let mut gw = gateway(config(upstream)).await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for pause in [false, true] {
        let statuses = if pause {
            // Let the gateway notice the close before the next request...
            let mut out = Vec::new();
            for _ in 0..5 {
                out.extend(keep_alive_posts(gw.addr, "/v1/chat/completions", &body, 1).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            out
        } else {
            // ...and not: the next request races the close.
            keep_alive_posts(gw.addr, "/v1/chat/completions", &body, 5).await
        };
        assert_eq!(statuses, vec![200; 5], "pause={pause}");
    }
    for _ in 0..10 {
        let r = gw.record("/v1/chat/completions").await;
        assert_eq!(
            (r.status, r.outcome, r.input_tokens),
            (200, Outcome::Allowed, 3)
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        10,
        "one upstream connection per answer"
    );
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_error_instead_of_hanging() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Sends the head and one event, then keeps the connection open and silent.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
                    event.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let mut cfg = config(upstream);
    cfg.limits.idle_timeout = Duration::from_millis(300);
    let mut gw = gateway(cfg).await;
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        post(gw.addr, "/v1/chat/completions", &body),
    )
    .await
    .expect("the client is not left hanging");
    let events = answer.sse_objects();
    assert_eq!(events[0]["choices"][0]["delta"]["content"], "Hi");
    assert!(
        events[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sent nothing"),
        "{}",
        answer.text()
    );
    assert_eq!(
        gw.record("/v1/chat/completions").await.outcome,
        Outcome::UpstreamError
    );
}
