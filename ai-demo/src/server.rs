//! The demo server's listener, configuration, request log and routing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::body::{self, DemoResponse};
use crate::tokenizer::{self, Tokenizer};
use crate::{ollama, openai};

/// How the demo server paces its answers and counts their tokens.
#[derive(Debug, Clone, Default)]
pub struct DemoConfig {
    /// Wait before the first generated token of a stream.
    pub first_token_delay: Duration,
    /// Wait between generated tokens of a stream.
    pub token_delay: Duration,
    /// How tokens are counted; [`Tokenizer::Own`] is the llama.cpp-like mode (streams
    /// without usage, one token per content event, a chat template in the prompt count).
    pub tokenizer: Tokenizer,
}

/// What the server saw of one request: the log tests read to check the gateway.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    /// The model the request asked for, if its body named one.
    pub model: Option<String>,
    pub body_len: usize,
    /// The body as received (lossy UTF-8), so tests can see exactly what arrived.
    pub body: String,
}

/// A running demo server's shared state.
#[derive(Debug, Default)]
pub struct DemoServer {
    pub config: DemoConfig,
    log: Mutex<Vec<RequestLog>>,
}

impl DemoServer {
    pub fn new(config: DemoConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            log: Mutex::new(Vec::new()),
        })
    }

    /// Every request seen so far, oldest first.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn record(&self, entry: RequestLog) {
        tracing::info!(method = %entry.method, path = %entry.path, model = ?entry.model, "demo request");
        if let Ok(mut log) = self.log.lock() {
            log.push(entry);
        }
    }
}

/// A fault the client asked for with the `x-demo-fault` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Abort the connection after two generated tokens.
    ResetMidstream,
    /// Answer 500 in the dialect's error format.
    Status500,
}

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, server: Arc<DemoServer>) -> std::io::Result<()> {
    // Build the tokenizer now so the first request's timing is not its build time.
    crate::text::count_tokens("warm up");
    loop {
        let (stream, _peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(route(req, server).await) }
            });
            // Connection errors (a client gone) are the client's business.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds `addr` and serves in a background task; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    config: DemoConfig,
) -> std::io::Result<(SocketAddr, Arc<DemoServer>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let server = DemoServer::new(config);
    let s = server.clone();
    tokio::spawn(async move {
        if let Err(e) = serve(listener, s).await {
            tracing::error!(error = %e, "demo server stopped");
        }
    });
    Ok((local, server))
}

/// A parsed request as the handlers see it.
pub struct DemoRequest {
    pub path: String,
    pub body: serde_json::Value,
    pub fault: Fault,
    pub server: Arc<DemoServer>,
}

impl DemoRequest {
    /// The model the body names, if it names a non-empty one.
    pub fn model(&self) -> Option<String> {
        self.body
            .get("model")
            .and_then(serde_json::Value::as_str)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
    }
}

async fn route(req: Request<Incoming>, server: Arc<DemoServer>) -> DemoResponse {
    // The request log does not list the reads of itself.
    if req.method() == Method::GET && req.uri().path() == "/demo/requests" {
        let log = serde_json::to_value(server.requests()).unwrap_or_default();
        return body::json(StatusCode::OK, &log);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let fault = match req
        .headers()
        .get("x-demo-fault")
        .and_then(|h| h.to_str().ok())
    {
        Some("reset-midstream") => Fault::ResetMidstream,
        Some("status-500") => Fault::Status500,
        _ => Fault::None,
    };
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return body::text(StatusCode::BAD_REQUEST, "body read failed\n"),
    };
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    server.record(RequestLog {
        method: method.to_string(),
        path: path.clone(),
        host: host.clone(),
        model: parsed
            .as_ref()
            .and_then(|v| v.get("model"))
            .and_then(|m| m.as_str())
            .map(str::to_owned),
        body_len: bytes.len(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    });

    match (&method, path.as_str()) {
        // Echoes the body byte for byte, for pass-through tests.
        (_, "/demo/echo") => {
            let mut resp = body::raw(StatusCode::OK, "application/octet-stream", bytes);
            if let Some(h) = host.and_then(|h| http::HeaderValue::from_str(&h).ok()) {
                resp.headers_mut().insert("x-demo-host", h);
            }
            return resp;
        }
        (&Method::GET, "/v1/models") => return openai::models(),
        (&Method::GET, "/api/tags") => return ollama::tags(),
        (&Method::GET, "/api/version") => return ollama::version(),
        (&Method::GET, "/") => return body::text(StatusCode::OK, "Ollama is running"),
        _ => {}
    }

    let dialect_is_ollama = path.starts_with("/api/");
    let Some(body) = parsed.filter(serde_json::Value::is_object) else {
        return if dialect_is_ollama {
            ollama::error(StatusCode::BAD_REQUEST, "invalid JSON body")
        } else {
            openai::error(
                StatusCode::BAD_REQUEST,
                "We could not parse the JSON body of your request.",
            )
        };
    };
    let req = DemoRequest {
        path: path.clone(),
        body,
        fault,
        server,
    };
    if method != Method::POST {
        return body::text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n");
    }
    match path.as_str() {
        "/v1/chat/completions" | "/v1/completions" => openai::completions(req),
        "/v1/responses" => openai::responses(req),
        "/v1/embeddings" => openai::embeddings(req),
        "/api/chat" | "/api/generate" => ollama::generate(req),
        "/api/embed" | "/api/embeddings" => ollama::embed(req),
        "/tokenize" | "/extras/tokenize" | "/extras/tokenize/count" => tokenizer::tokenize(&req),
        _ => body::text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// Paces and sends the frames of a stream, applying the requested fault.
pub struct Emitter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    config: DemoConfig,
    fault: Fault,
    tokens_sent: usize,
}

impl Emitter {
    pub fn new(tx: mpsc::Sender<Result<Bytes, std::io::Error>>, req: &DemoRequest) -> Self {
        Self {
            tx,
            config: req.server.config.clone(),
            fault: req.fault,
            tokens_sent: 0,
        }
    }

    /// Sends a frame now. False when the client has gone.
    pub async fn frame(&self, bytes: impl Into<Bytes>) -> bool {
        self.tx.send(Ok(bytes.into())).await.is_ok()
    }

    /// Sends a frame that carries a generated token, after the pacing delay.
    pub async fn token(&mut self, bytes: impl Into<Bytes>) -> bool {
        let delay = if self.tokens_sent == 0 {
            self.config.first_token_delay
        } else {
            self.config.token_delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.fault == Fault::ResetMidstream && self.tokens_sent == 2 {
            // Let the tokens already sent reach the wire before the connection dies.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = self
                .tx
                .send(Err(std::io::Error::other("demo fault: reset mid-stream")))
                .await;
            return false;
        }
        self.tokens_sent += 1;
        self.frame(bytes).await
    }
}
