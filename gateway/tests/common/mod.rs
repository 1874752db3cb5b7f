//! Shared set-up for the integration tests: a real demo LLM server, a real gateway on
//! loopback sockets, and a small HTTP/1.1 client that records when each chunk arrived.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
// Test fixtures: their tasks end with the test's runtime.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube_gateway::{Config, Destination, Gateway, UsageRecord};
use kube_gateway_ai_demo::{DemoConfig, DemoServer};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

pub async fn demo(config: DemoConfig) -> (SocketAddr, Arc<DemoServer>) {
    kube_gateway_ai_demo::spawn("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("demo server starts")
}

/// A running gateway and its usage records.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub usage: broadcast::Receiver<Arc<UsageRecord>>,
}

pub async fn gateway(config: Config) -> TestGateway {
    if std::env::var("KGW_TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    }
    let gw = Gateway::bind(config).await.expect("gateway binds");
    let addr = gw.local_addr().unwrap();
    let usage = gw.subscribe_usage();
    tokio::spawn(gw.run(std::future::pending()));
    TestGateway { addr, usage }
}

/// A policy file in a directory of its own, removed when dropped. Tests run in
/// parallel threads of one process, so names built from the pid and the clock can
/// collide (they did: two tests then read each other's budgets).
pub struct PolicyFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn policy_file(text: &str) -> PolicyFile {
    let dir = tempfile::Builder::new()
        .prefix("kgw-policy-")
        .tempdir()
        .expect("a temporary directory");
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, text).expect("policy file written");
    PolicyFile { _dir: dir, path }
}

/// An explicit-mode configuration in front of `upstream`.
pub fn config(upstream: SocketAddr) -> Config {
    Config::explicit("127.0.0.1:0".parse().unwrap(), Destination::from(upstream))
}

impl TestGateway {
    /// The next usage record for `path`, skipping others.
    pub async fn record(&mut self, path: &str) -> Arc<UsageRecord> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let rec = tokio::time::timeout(left, self.usage.recv())
                .await
                .unwrap_or_else(|_| panic!("no usage record for {path} within 10 s"))
                .expect("usage channel open");
            if rec.path == path {
                return rec;
            }
        }
    }
}

/// An HTTP answer with the time each body chunk arrived.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub chunks: Vec<(Duration, Bytes)>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The JSON objects of the SSE `data:` lines (not `[DONE]`).
    pub fn sse_objects(&self) -> Vec<serde_json::Value> {
        self.text()
            .split("\n\n")
            .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad SSE data ({e}): {d}")))
            .collect()
    }

    /// The generated text of an OpenAI chat stream: its deltas' content, joined.
    pub fn chat_stream_text(&self) -> String {
        self.sse_objects()
            .iter()
            .filter_map(|e| {
                e.pointer("/choices/0/delta/content")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }

    pub fn ndjson_objects(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line ({e}): {l}"))
            })
            .collect()
    }
}

/// Sends one request on a fresh connection and reads the whole answer.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body: Bytes = body.into();
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let started = Instant::now();
    let resp = sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .expect("response");
    let (parts, mut incoming) = resp.into_parts();
    let mut chunks = Vec::new();
    let mut all = Vec::new();
    while let Some(frame) = incoming.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            all.extend_from_slice(&data);
            chunks.push((started.elapsed(), data));
        }
    }
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(all),
        chunks,
    }
}

pub async fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Answer {
    send(addr, "POST", path, &[], body.to_string()).await
}

/// The PostgreSQL the tests may use (`KGW_TEST_POSTGRES_URL`; CI starts a private
/// cluster). Without it the caller skips, saying so, except under CI=true: a failure.
pub fn postgres_url() -> Option<String> {
    match std::env::var("KGW_TEST_POSTGRES_URL") {
        Ok(u) => Some(u),
        Err(_) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI must provide KGW_TEST_POSTGRES_URL")
        }
        Err(_) => {
            eprintln!("skipping the PostgreSQL part: KGW_TEST_POSTGRES_URL is not set");
            None
        }
    }
}
