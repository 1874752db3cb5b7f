//! The admin endpoint: `/healthz` (the process answers), `/readyz` (the gateway is
//! serving) and `/policy` (the policy in force: hash, load time, source).

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

use crate::policy::PolicyStore;

fn answer(
    req: &Request<Incoming>,
    ready: &AtomicBool,
    policy: &PolicyStore,
) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, Bytes::from_static(b"ok\n")),
        (&Method::GET, "/readyz") if ready.load(Ordering::Acquire) => {
            (StatusCode::OK, Bytes::from_static(b"ready\n"))
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"not ready\n"),
        ),
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
pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>, policy: Arc<PolicyStore>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (ready, policy) = (ready.clone(), policy.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = answer(&req, &ready, &policy);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
