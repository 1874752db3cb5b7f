//! The admin endpoint: `/healthz` (the process answers), `/readyz` (the gateway is
//! serving, its policy loaded, its store reachable), `/policy` (the policy in force:
//! hash, load time, source) and `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::accept;
use crate::live::Live;
use crate::telemetry::Telemetry;

/// What the admin endpoint reports on.
#[derive(Clone)]
pub struct AdminState {
    pub ready: Arc<AtomicBool>,
    pub telemetry: Arc<Telemetry>,
    /// The policy in force, and what the gauges read.
    pub live: Live,
}

impl AdminState {
    /// Why the gateway is not ready, if it is not.
    fn not_ready(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("not serving yet\n");
        }
        match self.live.store_connected() {
            Some(false) => Some("usage store unreachable (usage is spooled)\n"),
            Some(true) | None => None,
        }
    }

    /// Gauges read at scrape time, then the exposition.
    fn metrics(&self) -> String {
        self.telemetry.scrape(&self.live)
    }
}

fn answer(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let policy = &state.live.policy;
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, Bytes::from_static(b"ok\n")),
        (&Method::GET, "/readyz") => match state.not_ready() {
            None => (StatusCode::OK, Bytes::from_static(b"ready\n")),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(why.as_bytes()),
            ),
        },
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return resp;
        }
        (&Method::GET, "/policy") => {
            let info = policy.info();
            let loaded = info
                .loaded_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let body = serde_json::json!({
                "hash": info.hash,
                "loaded_at_unix": loaded.as_secs_f64(),
                "source": info.source.as_ref().map(|p| p.display().to_string()),
                "format": info.format,
            });
            (StatusCode::OK, Bytes::from(body.to_string()))
        }
        _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp
}

/// Serves the admin endpoint until the listener fails.
pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let (stream, _) = accept::next("admin", || listener.accept()).await;
        let state = state.clone();
        #[expect(
            clippy::disallowed_methods,
            reason = "one admin connection: it ends when its client closes it"
        )]
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = answer(&req, &state);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Before the gateway can start: `/healthz` answers, `/readyz` says why it is not ready
/// (`reason`, kept current by the caller), everything else is 503. Each answer closes
/// its connection, so no probe stays on this responder once the gateway takes over.
pub async fn serve_not_ready(listener: TcpListener, reason: Arc<std::sync::Mutex<String>>) {
    loop {
        let (stream, _) = accept::next("admin", || listener.accept()).await;
        let reason = reason.clone();
        #[expect(
            clippy::disallowed_methods,
            reason = "one not-ready answer: its connection closes after it"
        )]
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
                    _ => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "not ready: {}\n",
                            reason.lock().map(|r| r.clone()).unwrap_or_default()
                        ),
                    ),
                };
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
