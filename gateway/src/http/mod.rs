//! The HTTP/1.x side of a connection: hyper serves it, the proxy answers each request.

pub mod body;
pub mod headers;
pub mod proxy;

use std::convert::Infallible;
use std::sync::Arc;

use crate::drain::DrainWatch;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

pub use proxy::{ConnInfo, Proxy};

/// Serves one client connection until it closes (or the gateway drains it).
pub async fn serve(
    stream: TcpStream,
    conn: ConnInfo,
    proxy: Arc<Proxy>,
    limits: &crate::config::Limits,
    mut drain: DrainWatch,
) {
    let conn = Arc::new(conn);
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, &conn).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // hyper starts this clock whenever it waits for a request head, so it also ends
        // keep-alive connections idle that long.
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.header_bytes)
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        r = connection.as_mut() => r,
        () = drain.signaled() => {
            // Finish the request in flight, then close instead of keeping alive.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}
