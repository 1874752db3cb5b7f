//! The gateway's accept loop: each connection gets its upstream (original destination or
//! the fixed one), is sniffed, and goes to the HTTP proxy or the opaque relay.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube_gateway_policy::{Encoding, Policy, TokenCounter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use crate::admin;
use crate::budget::{Ledger, SystemClock};
use crate::config::{Config, Destination, UpstreamMode};
use crate::drain::{Drain, DrainWatch};
use crate::http::{self, Proxy};
use crate::policy::PolicyStore;
use crate::sniff::{self, Protocol};
use crate::store::spool::Spool;
use crate::store::writer::WriterConfig;
use crate::store::{Store, StoreUrl};
use crate::usage::{self, Recorder, UsageRecord};
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
    #[error("cannot start a serving thread: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyLoadError),
    #[error("eBPF capture: {0}")]
    Capture(#[from] kube_gateway_bpf::CaptureError),
    #[error(transparent)]
    Otel(#[from] crate::otel::OtelError),
}

/// How long in-flight connections get to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// What every serving thread of one gateway shares.
#[derive(Clone)]
pub struct Shared {
    config: Arc<Config>,
    policy: Arc<PolicyStore>,
    ledger: Arc<Ledger>,
    tokens: TokenCounter,
    /// The usage writer, awaited on shutdown so every record is stored or spooled.
    writer: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// The recorder, awaited on shutdown so every record reaches the metrics and spans.
    recorder_task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    recorder: Recorder,
    usage: broadcast::Sender<Arc<UsageRecord>>,
    ready: Arc<AtomicBool>,
    metrics: Arc<crate::metrics::Metrics>,
    otel: Option<Arc<crate::otel::Otel>>,
    live: crate::metrics::LiveState,
}

impl Shared {
    /// Loads the policy, starts the usage recorder and the policy watcher on the
    /// current tokio runtime.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let initial = match &config.policy {
            Some(path) => crate::policy::load_file(path)?,
            None => Policy::default(),
        };
        for note in &initial.notes {
            tracing::warn!(note = %note, "policy");
        }
        let policy = Arc::new(PolicyStore::new(
            initial,
            config.policy.clone(),
            config.rewrite.clone(),
        ));
        if let Some(path) = &config.policy {
            tracing::info!(path = %path.display(), hash = %policy.info().hash, "policy loaded");
            tokio::spawn(crate::policy::watch(
                policy.clone(),
                path.clone(),
                config.policy_reload,
            ));
        }
        let tokens = TokenCounter::new();
        // Built now so the first estimate does not pay for it.
        tokens.warm(Encoding::Cl100kBase)?;
        let mut ledger = Ledger::new(Arc::new(SystemClock));
        let (store_tx, writer, writer_stats) = match &config.store {
            Some(sc) => {
                let store = match Store::connect(&sc.url).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        // Serving does not wait for the store: usage is spooled until it is back.
                        tracing::warn!(error = %e, spool = %sc.spool.display(), "usage store unavailable at start; spooling");
                        None
                    }
                };
                ledger = budget_ledger(&sc.url, store.as_ref(), &policy.current()).await;
                let (tx, rx) = tokio::sync::mpsc::channel(8192);
                let (handle, stats) = crate::store::writer::spawn(
                    sc.url.clone(),
                    store,
                    Spool::new(&sc.spool),
                    config.identity.clone(),
                    WriterConfig::default(),
                    rx,
                );
                (Some(tx), Some(handle), Some(stats))
            }
            None => (None, None, None),
        };
        let ledger = Arc::new(ledger);
        let live = crate::metrics::LiveState {
            policy: policy.clone(),
            ledger: ledger.clone(),
            store: writer_stats.zip(store_tx.as_ref().map(|tx| tx.downgrade())),
        };
        let otel = crate::otel::Otel::from_env(
            &config.identity.namespace,
            &config.identity.pod,
            live.clone(),
        )?
        .map(Arc::new);
        let metrics = crate::metrics::Metrics::new(
            &config.identity.namespace,
            &config.identity.pod,
            otel.clone(),
        );
        let (recorder, usage, recorder_task) = usage::spawn_recorder(
            tokens.clone(),
            config.log_bodies,
            65_536,
            store_tx.clone(),
            ledger.clone(),
            // Without an admin endpoint or an OTLP export nobody can read them: nothing
            // is recorded.
            (config.admin.is_some() || otel.is_some()).then(|| metrics.clone()),
        );
        Ok(Self {
            config: Arc::new(config),
            policy,
            ledger,
            tokens,
            recorder,
            usage,
            ready: Arc::new(AtomicBool::new(false)),
            writer: Arc::new(std::sync::Mutex::new(writer)),
            recorder_task: Arc::new(std::sync::Mutex::new(Some(recorder_task))),
            metrics,
            otel,
            live,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    pub fn otel(&self) -> Option<Arc<crate::otel::Otel>> {
        self.otel.clone()
    }

    /// The budget ledger (its shared leases are given back once nothing is served).
    pub fn ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }

    /// The usage writer's task: it ends once every recorder is gone and all is stored.
    pub fn take_writer(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.writer.lock().ok().and_then(|mut w| w.take())
    }

    /// The recorder's task: it ends once every serving thread is gone and all is recorded.
    pub fn take_recorder(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.recorder_task.lock().ok().and_then(|mut w| w.take())
    }

    pub fn policy(&self) -> &Arc<PolicyStore> {
        &self.policy
    }

    /// Finished usage records, as the recorder produces them.
    pub fn subscribe_usage(&self) -> broadcast::Receiver<Arc<UsageRecord>> {
        self.usage.subscribe()
    }
}

/// The budget ledger for a store: shared through PostgreSQL (leases), or this gateway's
/// own, started from the stored usage of each budget's current window.
async fn budget_ledger(url: &StoreUrl, store: Option<&Store>, policy: &Policy) -> Ledger {
    let clock = Arc::new(SystemClock);
    if let StoreUrl::Postgres(_) = url {
        // Without the store at start, leases connect when it is back (and budgets
        // needing one answer 503 until then).
        let store = match store {
            Some(s) => Some(s.clone()),
            None => Store::lazy(url).ok(),
        };
        if let Some(store) = store {
            return Ledger::shared(clock, store, tokio::runtime::Handle::current());
        }
    }
    let ledger = Ledger::new(clock.clone());
    if let Some(store) = store {
        let now = crate::budget::Clock::now_ms(&*clock);
        for b in &policy.budgets {
            match store.spent_since(b.window.start(now)).await {
                Ok(spent) => ledger.seed(b, &spent),
                Err(e) => {
                    tracing::warn!(budget = %b.name, error = %e, "cannot read this window's usage; the budget starts from zero")
                }
            }
        }
    }
    ledger
}

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
            shared.config.clone(),
            shared.policy.clone(),
            shared.recorder.clone(),
            worker,
            shared.ledger.clone(),
            shared.tokens.clone(),
        ));
        Ok(Self {
            shared,
            listener,
            admin,
            proxy,
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
        self.shared.subscribe_usage()
    }

    /// Serves until `shutdown` completes, then drains in-flight connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let config = self.shared.config.clone();
        if let Some(admin) = self.admin {
            tokio::spawn(admin::serve(
                admin,
                admin::AdminState {
                    ready: self.shared.ready.clone(),
                    metrics: self.shared.metrics.clone(),
                    live: self.shared.live.clone(),
                },
            ));
        }
        let drain = Drain::default();
        self.shared.ready.store(true, Ordering::Release);
        tracing::debug!(listen = %config.listen, "serving thread ready");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let (config, proxy, watcher) = (config.clone(), self.proxy.clone(), drain.watch());
                        let metrics = self.shared.metrics.clone();
                        tokio::spawn(connection(stream, peer, config, proxy, watcher, metrics));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        self.shared.ready.store(false, Ordering::Release);
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
    metrics: Arc<crate::metrics::Metrics>,
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
                metrics.captured();
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
            http::serve(stream, conn, proxy, drain).await
        }
        Protocol::Opaque => match relay::relay(stream, &destination, &config.limits).await {
            Ok((up, down)) => tracing::debug!(%peer, %destination, up, down, "relayed"),
            Err(e) => tracing::debug!(%peer, %destination, error = %e, "relay ended"),
        },
    }
}
