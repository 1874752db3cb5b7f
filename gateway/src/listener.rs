//! The gateway's accept loop: each connection gets its upstream (original destination or
//! the fixed one), is sniffed, and goes to the HTTP proxy or the opaque relay.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use crate::admin;
use crate::app::{Shared, StartError};
use crate::config::{Config, Destination, UpstreamMode};
use crate::drain::{Drain, DrainWatch};
use crate::http::{self, Proxy};
use crate::netns::NetNs;
use crate::policy::PolicyStore;
use crate::record::Identity;
use crate::record::UsageRecord;
use crate::sniff::{self, Protocol};
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;
use crate::{accept, orig_dst, relay};

/// How long in-flight connections get to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Binds a listening socket. With `reuse_port`, several threads can each bind one on the
/// same address and the kernel spreads connections across them.
pub fn bind_listener(
    addr: SocketAddr,
    reuse_port: bool,
) -> Result<std::net::TcpListener, StartError> {
    let listen = |source| StartError::Listen { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(listen)?;
    socket.set_reuse_address(true).map_err(listen)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(listen)?;
    }
    socket.set_nonblocking(true).map_err(listen)?;
    socket.bind(&addr.into()).map_err(listen)?;
    socket.listen(1024).map_err(listen)?;
    Ok(socket.into())
}

/// One serving thread's gateway: a listener and its own upstream pool.
pub struct Gateway {
    shared: Shared,
    /// Set while serving (`None`: a pod's gateway, whose readiness is the agent's).
    ready: Option<Arc<AtomicBool>>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    proxy: Arc<Proxy>,
}

impl Gateway {
    /// A single-threaded gateway: binds, starts the recorder. Must run inside a runtime.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let listener = bind_listener(config.listen, false)?;
        let admin = config.admin.map(|a| bind_listener(a, false)).transpose()?;
        let shared = Shared::start(config).await?;
        Self::from_listeners(shared, listener, admin, 0)
    }

    /// A gateway on an already bound listener. Must run inside the runtime that serves it.
    pub fn from_listeners(
        shared: Shared,
        listener: std::net::TcpListener,
        admin: Option<std::net::TcpListener>,
        worker: u16,
    ) -> Result<Self, StartError> {
        let addr = shared.config.listen;
        let to_tokio = |l: std::net::TcpListener| {
            TcpListener::from_std(l).map_err(|source| StartError::Listen { addr, source })
        };
        let listener = to_tokio(listener)?;
        let admin = admin.map(to_tokio).transpose()?;
        let proxy = Arc::new(Proxy::new(
            &shared,
            shared.policy.clone(),
            shared.identity.clone(),
            Upstream::new(&shared.config.limits, None),
            worker,
        ));
        Ok(Self {
            ready: Some(shared.ready.clone()),
            shared,
            listener,
            admin,
            proxy,
        })
    }

    /// One pod's gateway in node mode: a listener bound in the pod's network namespace,
    /// the pod's policy and identity, upstream connections made from its namespace.
    /// It reports no readiness of its own (the agent's is the node's).
    pub fn for_pod(
        shared: Shared,
        listener: TcpListener,
        policy: Arc<PolicyStore>,
        identity: Arc<Identity>,
        netns: Arc<NetNs>,
        worker: u16,
    ) -> Self {
        let upstream = Upstream::new(&shared.config.limits, Some(netns));
        let proxy = Arc::new(Proxy::new(&shared, policy, identity, upstream, worker));
        Self {
            ready: None,
            shared,
            listener,
            admin: None,
            proxy,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Finished usage records, as the recorder produces them.
    pub fn subscribe_usage(&self) -> broadcast::Receiver<Arc<UsageRecord>> {
        self.shared.subscribe_usage()
    }

    /// Serves until `shutdown` completes, then drains in-flight connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let config = self.shared.config.clone();
        let admin = self.admin.map(|admin| {
            #[expect(
                clippy::disallowed_methods,
                reason = "the admin server: aborted when this gateway stops serving"
            )]
            tokio::spawn(admin::serve(
                admin,
                admin::AdminState {
                    ready: self.shared.ready.clone(),
                    telemetry: self.shared.telemetry.clone(),
                    live: self.shared.live.clone(),
                },
            ))
        });
        let drain = Drain::default();
        if let Some(ready) = &self.ready {
            ready.store(true, Ordering::Release);
        }
        tracing::debug!(listen = %config.listen, "serving thread ready");
        tokio::pin!(shutdown);
        let mut purge = tokio::time::interval(crate::alloc::PURGE_EVERY);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = purge.tick() => crate::alloc::purge(),
                (stream, peer) = accept::next("gateway", || self.listener.accept()) => {
                    let Some(slot) = Slot::take(&self.shared.live.open_connections, config.limits.max_connections) else {
                        // Closed at once (a reset, not a hang), so a flood costs one
                        // accept each and the connections already open keep their room.
                        self.shared.telemetry.connection_refused();
                        tracing::warn!(%peer, max = config.limits.max_connections, "connection refused: --max-connections are open");
                        drop(stream);
                        continue;
                    };
                    let (config, proxy, watcher) = (config.clone(), self.proxy.clone(), drain.watch());
                    let telemetry = self.shared.telemetry.clone();
                    #[expect(clippy::disallowed_methods, reason = "a client connection: the drain watch it holds makes shutdown wait for it")]
                    tokio::spawn(async move {
                        connection(stream, peer, config, proxy, watcher, telemetry).await;
                        drop(slot);
                    });
                }
            }
        }
        if let Some(ready) = &self.ready {
            ready.store(false, Ordering::Release);
        }
        drop(self.listener);
        tracing::info!("shutting down: draining connections");
        if tokio::time::timeout(DRAIN, drain.drain()).await.is_err() {
            tracing::warn!("drain deadline passed; closing remaining connections");
        }
        if let Some(admin) = admin {
            admin.abort();
        }
    }
}

/// One of `--max-connections`, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<Config>,
    proxy: Arc<Proxy>,
    drain: DrainWatch,
    telemetry: Arc<Telemetry>,
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
            Ok(addr) => {
                telemetry.captured();
                Destination::from(addr)
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "no original destination for this connection; closing");
                return;
            }
        },
    };
    match sniff::sniff(&stream, config.limits.sniff_timeout).await {
        Protocol::Http1 => {
            let conn = proxy.connection(peer, destination);
            http::serve(stream, conn, proxy, &config.limits, drain).await
        }
        Protocol::Opaque => {
            match relay::relay(stream, &destination, &config.limits, proxy.dialer()).await {
                Ok((up, down)) => tracing::debug!(%peer, %destination, up, down, "relayed"),
                Err(e) => tracing::debug!(%peer, %destination, error = %e, "relay ended"),
            }
        }
    }
}
