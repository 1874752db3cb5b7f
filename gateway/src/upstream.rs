//! The upstream HTTP client: one pool, keyed by destination, keep-alive and
//! `TCP_NODELAY` on, connection errors mapped to the gateway's error types.

use std::error::Error as _;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{Destination, Limits};
use crate::error::GatewayError;

/// A request body going upstream: rewritten bytes, or the client's own stream.
pub type UpstreamBody = Either<Full<Bytes>, Incoming>;

/// The pooled upstream client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, UpstreamBody>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(limits: &Limits) -> Self {
        let mut connector = HttpConnector::new();
        // Delayed ACKs cost tens of milliseconds a request without it.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http1_preserve_header_case(true)
            // The client's Host header is forwarded as it is; only a request without one gets one.
            .set_host(true)
            .build(connector);
        Self {
            client,
            connect_timeout: limits.connect_timeout,
            response_timeout: limits.response_timeout,
        }
    }

    /// Sends `req` to `dest`; waits at most the response timeout for the headers.
    pub async fn send(
        &self,
        dest: &Destination,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        let fut = self.client.request(req);
        match tokio::time::timeout(self.response_timeout, fut).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(dest, &e, self.connect_timeout)),
            Err(_) => Err(GatewayError::UpstreamTimeout {
                upstream: dest.to_string(),
                timeout: self.response_timeout,
            }),
        }
    }
}

/// The innermost cause's text, which names what really happened.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn classify(
    dest: &Destination,
    e: &hyper_util::client::legacy::Error,
    connect_timeout: Duration,
) -> GatewayError {
    let timed_out = {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = e.source();
        let mut found = false;
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                found |= io.kind() == std::io::ErrorKind::TimedOut;
            }
            found |= err.to_string().contains("timed out");
            cur = err.source();
        }
        found
    };
    let reason = root_cause(e);
    if e.is_connect() && timed_out {
        GatewayError::UpstreamTimeout {
            upstream: dest.to_string(),
            timeout: connect_timeout,
        }
    } else if e.is_connect() {
        GatewayError::UpstreamConnect {
            upstream: dest.to_string(),
            reason,
        }
    } else {
        GatewayError::UpstreamReset {
            upstream: dest.to_string(),
            reason,
        }
    }
}
