//! The gateway's accept loop: each connection gets its upstream (original destination or
//! the fixed one), is sniffed, and goes to the HTTP proxy or the opaque relay.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube_gateway_policy::{Encoding, TokenCounter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use crate::admin;
use crate::config::{Config, Destination, UpstreamMode};
use crate::drain::{Drain, DrainWatch};
use crate::http::{self, ConnInfo, Proxy};
use crate::sniff::{self, Protocol};
use crate::usage::{self, UsageRecord};
use crate::{orig_dst, relay};

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] kube_gateway_policy::tokens::TokenizerError),
}

/// How long in-flight connections get to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// A bound, not yet running gateway.
pub struct Gateway {
    config: Arc<Config>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    proxy: Arc<Proxy>,
    usage: broadcast::Sender<Arc<UsageRecord>>,
    ready: Arc<AtomicBool>,
}

impl Gateway {
    /// Binds the listeners and starts the usage recorder. Must run inside a tokio runtime.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let admin = match config.admin {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?,
            ),
            None => None,
        };
        let tokens = TokenCounter::new();
        // Built now so the first estimate does not pay for it.
        tokens.warm(Encoding::Cl100kBase)?;
        let (recorder, usage) = usage::spawn_recorder(tokens, config.log_bodies, 65_536);
        let config = Arc::new(config);
        let proxy = Arc::new(Proxy::new(config.clone(), recorder));
        Ok(Self {
            config,
            listener,
            admin,
            proxy,
            usage,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Finished usage records, as the recorder produces them.
    pub fn subscribe_usage(&self) -> broadcast::Receiver<Arc<UsageRecord>> {
        self.usage.subscribe()
    }

    /// Serves until `shutdown` completes, then drains in-flight connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        if let Some(admin) = self.admin {
            tokio::spawn(admin::serve(admin, self.ready.clone()));
        }
        let drain = Drain::default();
        self.ready.store(true, Ordering::Release);
        tracing::info!(listen = %self.config.listen, upstream = ?self.config.upstream, "gateway ready");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let (config, proxy, watcher) = (self.config.clone(), self.proxy.clone(), drain.watch());
                        tokio::spawn(connection(stream, peer, config, proxy, watcher));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        self.ready.store(false, Ordering::Release);
        drop(self.listener);
        tracing::info!("shutting down: draining connections");
        if tokio::time::timeout(DRAIN, drain.drain()).await.is_err() {
            tracing::warn!("drain deadline passed; closing remaining connections");
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<Config>,
    proxy: Arc<Proxy>,
    drain: DrainWatch,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    let destination = match &config.upstream {
        UpstreamMode::Fixed(d) => d.clone(),
        UpstreamMode::OriginalDst => match orig_dst::original_dst(&stream) {
            Ok(addr) if Some(addr) == stream.local_addr().ok() => {
                tracing::warn!(%peer, "connection was not redirected (it names the gateway itself); closing");
                return;
            }
            Ok(addr) => Destination::from(addr),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "no original destination for this connection; closing");
                return;
            }
        },
    };
    match sniff::sniff(&stream, config.limits.sniff_timeout).await {
        Protocol::Http1 => http::serve(stream, ConnInfo { peer, destination }, proxy, drain).await,
        Protocol::Opaque => match relay::relay(stream, &destination, &config.limits).await {
            Ok((up, down)) => tracing::debug!(%peer, %destination, up, down, "relayed"),
            Err(e) => tracing::debug!(%peer, %destination, error = %e, "relay ended"),
        },
    }
}
