//! Upstream connections. A client connection is tied to one upstream connection for its
//! lifetime (taken on its first request from this thread's idle pool, or connected), so
//! a keep-alive client costs no pool work per request and the upstream sees the same
//! connection pattern as without the gateway. When the client connection ends, its
//! upstream connection goes back to the pool for the next client of that destination.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{Destination, Limits};
use crate::error::GatewayError;
use crate::netns::NetNs;

/// A request body going upstream: rewritten bytes, or the client's own stream.
pub type UpstreamBody = Either<Full<Bytes>, Incoming>;

type Sender = SendRequest<UpstreamBody>;

/// Idle connections kept per destination; more are closed.
const MAX_IDLE_PER_DESTINATION: usize = 64;

/// Connects and pools upstream connections for one serving thread.
pub struct Upstream {
    connect_timeout: Duration,
    dialer: Dialer,
    response_timeout: Duration,
    idle: Mutex<HashMap<Destination, Vec<Sender>>>,
}

/// The upstream side of one client connection.
pub struct Affinity {
    upstream: Arc<Upstream>,
    destination: Destination,
    sender: Mutex<Option<Sender>>,
}

impl Upstream {
    /// Upstream connections with `limits`, made in `netns` when given (node mode).
    pub fn new(limits: &Limits, netns: Option<Arc<NetNs>>) -> Arc<Self> {
        Arc::new(Self {
            connect_timeout: limits.connect_timeout,
            dialer: Dialer {
                mark: limits.upstream_mark,
                netns,
            },
            response_timeout: limits.response_timeout,
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// How this pool connects (the opaque relay dials the same way).
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// The upstream side of a new client connection to `destination` (connects lazily).
    pub fn affinity(self: &Arc<Self>, destination: Destination) -> Affinity {
        Affinity {
            upstream: self.clone(),
            destination,
            sender: Mutex::new(None),
        }
    }

    fn checkout(&self, dest: &Destination) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(dest)?;
        // Connections the upstream closed, or still busy, are dropped (closing them).
        while let Some(s) = list.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    fn checkin(&self, dest: &Destination, sender: Sender) {
        if !sender.is_ready() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry(dest.clone()).or_default();
            if list.len() < MAX_IDLE_PER_DESTINATION {
                list.push(sender);
            }
        }
    }

    async fn connect(&self, dest: &Destination) -> Result<Sender, GatewayError> {
        let unreachable = |reason: String| GatewayError::UpstreamConnect {
            upstream: dest.to_string(),
            reason,
        };
        let stream = match tokio::time::timeout(self.connect_timeout, self.dialer.dial(dest)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(GatewayError::UpstreamTimeout {
                    upstream: dest.to_string(),
                    timeout: self.connect_timeout,
                })
            }
        };
        // Delayed ACKs cost tens of milliseconds a request without it.
        stream
            .set_nodelay(true)
            .map_err(|e| unreachable(e.to_string()))?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(root_cause(&e)))?;
        #[expect(
            clippy::disallowed_methods,
            reason = "the connection's driver: it ends with the connection, when the pool drops its sender"
        )]
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

impl Affinity {
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    fn take(&self) -> Option<Sender> {
        self.sender.lock().ok().and_then(|mut s| s.take())
    }

    fn keep(&self, sender: Sender) {
        if let Ok(mut s) = self.sender.lock() {
            *s = Some(sender);
        }
    }

    /// Sends `req`; waits at most the response timeout for the response headers.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        let timeout = self.upstream.response_timeout;
        match tokio::time::timeout(timeout, self.send_inner(req)).await {
            Ok(result) => result,
            Err(_) => Err(GatewayError::UpstreamTimeout {
                upstream: self.destination.to_string(),
                timeout,
            }),
        }
    }

    async fn send_inner(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        let up = &self.upstream;
        let dest = &self.destination;
        // A kept or pooled connection; it finishes the previous answer first if need be.
        let mut reused = None;
        if let Some(mut s) = self.take().or_else(|| up.checkout(dest)) {
            if s.ready().await.is_ok() {
                reused = Some(s);
            }
        }
        let mut is_reused = reused.is_some();
        let mut sender = match reused {
            Some(s) => s,
            None => up.connect(dest).await?,
        };
        loop {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.keep(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // The upstream closed a kept-alive connection before taking the
                    // request: it was never sent, so a fresh connection may carry it.
                    Some(unsent) if is_reused => {
                        req = unsent;
                        is_reused = false;
                        sender = up.connect(dest).await?;
                    }
                    _ => {
                        return Err(GatewayError::UpstreamReset {
                            upstream: dest.to_string(),
                            reason: root_cause(&e.into_error()),
                        })
                    }
                },
            }
        }
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        if let Some(sender) = self.take() {
            self.upstream.checkin(&self.destination, sender);
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

/// Makes upstream connections: marked so the capture never redirects them, and in
/// node mode from the served pod's network namespace (the LLM sees the pod's address;
/// its NetworkPolicies apply).
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    pub mark: Option<u32>,
    pub netns: Option<Arc<NetNs>>,
}

impl Dialer {
    /// Connects to `dest`, trying each address it resolves to.
    pub async fn dial(&self, dest: &Destination) -> std::io::Result<TcpStream> {
        if self.mark.is_none() && self.netns.is_none() {
            return TcpStream::connect(dest.as_str()).await;
        }
        let mut last = None;
        for addr in tokio::net::lookup_host(dest.as_str()).await? {
            let socket = match &self.netns {
                Some(ns) => {
                    tokio::net::TcpSocket::from_std_stream(ns.socket_for(addr).await?.into())
                }
                None if addr.is_ipv4() => tokio::net::TcpSocket::new_v4()?,
                None => tokio::net::TcpSocket::new_v6()?,
            };
            if let Some(mark) = self.mark {
                socket2::SockRef::from(&socket).set_mark(mark)?;
            }
            match socket.connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the upstream")
        }))
    }
}
