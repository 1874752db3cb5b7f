//! `kube-gateway node`: the node agent (one per node, a DaemonSet, in the shape of
//! Istio ambient's ztunnel). It serves every pod of its node that the watcher puts in
//! the desired set: for each, a listener inside the pod's network namespace, the eBPF
//! connect hooks on the pod's cgroup pointing at it, upstream connections made from the
//! pod's namespace, and the pod's own identity and policy on every request. The
//! reconciler diffs the desired set against what is attached and converges; a restart
//! re-derives everything (the hooks are links held by the process: they go with it).

pub mod pod;
mod reconcile;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kube_gateway_bpf::{Capture, CaptureFilter, LoadConfig};
use kube_gateway_watcher::{PodEvents, Reporter, WatcherConfig, WorkloadSet};
use tokio::sync::watch;

use crate::app::{Shared, StartError};
use crate::config::Config;

pub use reconcile::{AttachError, NodeSettings, Pass, Reconciler};

/// `kube-gateway node`'s configuration, parsed and validated.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// What every pod's gateway shares: store, limits, admin endpoint, logging.
    pub base: Config,
    pub node_name: String,
    /// The host's cgroup v2 tree.
    pub cgroup_root: PathBuf,
    /// The agent's own cgroup (default: found in the host tree by its PID).
    pub gateway_cgroup: Option<PathBuf>,
    pub filter: CaptureFilter,
}

/// The node agent could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("the agent's own cgroup: {0}")]
    OwnCgroup(#[source] std::io::Error),
    #[error("eBPF: {0}")]
    Capture(#[from] kube_gateway_bpf::CaptureError),
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube_gateway_watcher::kube::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the pod listener must be IPv4 (IPv6 connects reach it v4-mapped)")]
    Listen,
}

/// How long the watcher's errors wait before it is started again.
const WATCHER_RESTART: Duration = Duration::from_secs(2);

/// How long a pass that could not attach every pod waits before it tries again (a pod
/// just started may have no process in its cgroup yet).
const RETRY: Duration = Duration::from_secs(2);

/// Runs the node agent until `shutdown` completes.
pub fn serve<F>(config: NodeConfig, shutdown: F) -> Result<(), NodeError>
where
    F: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)?;
    rt.block_on(run(config, shutdown))
}

async fn run<F>(config: NodeConfig, shutdown: F) -> Result<(), NodeError>
where
    F: Future<Output = ()>,
{
    let std::net::SocketAddr::V4(listen) = config.base.listen else {
        return Err(NodeError::Listen);
    };
    let gateway_cgroup = match &config.gateway_cgroup {
        Some(p) => p.clone(),
        None => pod::own_cgroup(&config.cgroup_root).map_err(NodeError::OwnCgroup)?,
    };
    let capture = Capture::load(&LoadConfig {
        gateway_cgroup,
        gateway: listen,
        filter: config.filter.clone(),
    })?;
    let admin = config
        .base
        .admin
        .map(|a| crate::listener::bind_listener(a, false))
        .transpose()?;
    let shared = Shared::start(config.base.clone()).await?;
    let client = kube_gateway_watcher::kube::Client::try_default().await?;
    let events = PodEvents::new(
        client.clone(),
        Reporter::new(format!("kube-gateway-{}", config.node_name)),
    );
    let (tx, mut desired) = watch::channel::<WorkloadSet>(Arc::default());
    let node = config.node_name.clone();
    #[expect(
        clippy::disallowed_methods,
        reason = "the watcher: aborted when the agent stops (it also ends once the receiver is gone)"
    )]
    let watcher = tokio::spawn(async move {
        loop {
            let result = kube_gateway_watcher::run(
                client.clone(),
                WatcherConfig::new(node.clone()),
                tx.clone(),
            )
            .await;
            match result {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "watcher ended; starting it again"),
            }
            tokio::time::sleep(WATCHER_RESTART).await;
        }
    });
    let admin_task = match admin {
        Some(l) => {
            let l = tokio::net::TcpListener::from_std(l).map_err(NodeError::Runtime)?;
            let state = crate::admin::AdminState {
                ready: shared.ready.clone(),
                telemetry: shared.telemetry.clone(),
                live: shared.live.clone(),
            };
            #[expect(
                clippy::disallowed_methods,
                reason = "the admin server: aborted when the agent stops"
            )]
            Some(tokio::spawn(crate::admin::serve(l, state)))
        }
        None => None,
    };
    let settings = NodeSettings {
        cgroup_root: config.cgroup_root.clone(),
        listen: config.base.listen,
        filter: config.filter.clone(),
    };
    let mut reconciler = Reconciler::new(settings, shared.clone(), capture);
    tracing::info!(node = %config.node_name, listen = %listen, "node agent started; waiting for the watcher's first set");
    tokio::pin!(shutdown);
    // Level-triggered: a pass runs on every new set, and again while a pod of the
    // current set could not be attached.
    let mut retry = false;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = desired.changed() => {
                if changed.is_err() {
                    tracing::error!("the watcher is gone; stopping");
                    break;
                }
            }
            () = tokio::time::sleep(RETRY), if retry => {}
        }
        let set = desired.borrow_and_update().clone();
        let pass = reconciler.reconcile(&set).await;
        retry = !pass.failed.is_empty();
        shared
            .live
            .attached_pods
            .store(reconciler.attached().len(), Ordering::Relaxed);
        shared.live.pod_policies.store(Arc::new(
            reconciler
                .attached()
                .values()
                .map(|a| a.workload.policy.clone())
                .collect(),
        ));
        report(&events, &pass).await;
        // Ready once the first set (the watcher's caches are synced) is served.
        shared.ready.store(true, Ordering::Release);
    }
    shared.ready.store(false, Ordering::Release);
    watcher.abort();
    let detached = Pass {
        detached: reconciler.detach_all().await,
        ..Pass::default()
    };
    report(&events, &detached).await;
    if let Some(t) = admin_task {
        t.abort();
    }
    // Every handle of the shared parts but the one `finish` takes goes first.
    drop(reconciler);
    crate::runtime::finish(shared).await;
    Ok(())
}

/// Kubernetes Events on the pods a pass acted on. Failing to post one is logged, never
/// fatal.
async fn report(events: &PodEvents, pass: &Pass) {
    for w in &pass.detached {
        if let Err(e) = events.detached(&w.id).await {
            tracing::warn!(error = %e, "cannot post the GatewayDetached event");
        }
    }
    for w in &pass.attached {
        if let Err(e) = events.attached(&w.id).await {
            tracing::warn!(error = %e, "cannot post the GatewayAttached event");
        }
    }
    for (w, why) in &pass.failed {
        if let Err(e) = events.attach_failed(&w.id, why).await {
            tracing::warn!(error = %e, "cannot post the AttachFailed event");
        }
    }
}
