//! Wiring: one gateway's shared parts, started once, in the order they depend on each
//! other: the policy (and its watcher), the token counter, the store and its writer, the
//! budget ledger, telemetry, and the recorder that feeds them. Every serving thread gets
//! a handle ([`Shared`]); the runtime awaits the tasks started here at shutdown.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use kube_gateway_policy::{Encoding, Policy, TokenCounter};
use tokio::sync::broadcast;

use crate::budget::{Ledger, SystemClock};
use crate::config::Config;
use crate::live::Live;
use crate::policy::PolicyStore;
use crate::record::{Identity, UsageRecord};
use crate::recorder::{self, Recorder};
use crate::store::spool::Spool;
use crate::store::writer::WriterConfig;
use crate::store::{Store, StoreUrl};
use crate::telemetry::{Otel, Telemetry};

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
    Otel(#[from] crate::telemetry::OtelError),
}

/// What every serving thread of one gateway shares.
#[derive(Clone)]
pub struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) policy: Arc<PolicyStore>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) tokens: TokenCounter,
    /// The usage writer, awaited on shutdown so every record is stored or spooled.
    writer: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// The recorder, awaited on shutdown so every record reaches the metrics and spans.
    recorder_task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    pub(crate) recorder: Recorder,
    usage: broadcast::Sender<Arc<UsageRecord>>,
    pub(crate) ready: Arc<AtomicBool>,
    /// Whose traffic `run` serves (node mode gives each pod its own).
    pub(crate) identity: Arc<Identity>,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) live: Live,
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
            #[expect(
                clippy::disallowed_methods,
                reason = "the policy watcher lives as long as the background runtime it runs on, which stops at shutdown"
            )]
            tokio::spawn(crate::policy::watch(
                policy.clone(),
                path.clone(),
                config.policy_reload,
            ));
        }
        let tokens = TokenCounter::new();
        // An encoding's tables are ~20 MB: built when first needed (an estimate, off the
        // request path), except that budgets count prompts on the request path, so a
        // policy with budgets has it built now.
        if !policy.current().budgets.is_empty() {
            tokens.warm(Encoding::Cl100kBase)?;
        }
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
                    WriterConfig::default(),
                    rx,
                );
                (Some(tx), Some(handle), Some(stats))
            }
            None => (None, None, None),
        };
        let ledger = Arc::new(ledger);
        let live = Live {
            policy: policy.clone(),
            ledger: ledger.clone(),
            store: writer_stats.zip(store_tx.as_ref().map(|tx| tx.downgrade())),
            attached_pods: Arc::default(),
            open_connections: Arc::default(),
            pod_policies: Arc::default(),
        };
        let otel = Otel::from_env(
            &config.identity.namespace,
            &config.identity.pod,
            Arc::new(live.clone()),
        )?
        .map(Arc::new);
        let telemetry = Telemetry::new(
            &config.identity.namespace,
            &config.identity.pod,
            otel.clone(),
        );
        let (recorder, usage, recorder_task) = recorder::spawn_recorder(
            tokens.clone(),
            config.log_bodies,
            65_536,
            store_tx.clone(),
            ledger.clone(),
            // Without an admin endpoint or an OTLP export nobody can read them: nothing
            // is recorded.
            (config.admin.is_some() || otel.is_some()).then(|| telemetry.clone()),
        );
        let identity = Arc::new(config.identity.clone());
        Ok(Self {
            config: Arc::new(config),
            policy,
            ledger,
            tokens,
            recorder,
            usage,
            ready: Arc::new(AtomicBool::new(false)),
            identity,
            writer: Arc::new(std::sync::Mutex::new(writer)),
            recorder_task: Arc::new(std::sync::Mutex::new(Some(recorder_task))),
            telemetry,
            live,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
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
            return Ledger::shared(clock, Arc::new(store), tokio::runtime::Handle::current());
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
