//! The reconciler: desired workloads (from the watcher) against attached ones. Attach:
//! find the pod's cgroup and network namespace, bind its listener inside the namespace,
//! serve it with its own identity and policy, then point the eBPF hooks of its cgroup
//! at the listener (listening first: a captured connect must find it there), and flush
//! its older connections if asked. Detach: the hooks first (new connects go direct),
//! then the listener, after its connections drained. A policy change swaps the pod's
//! policy whole; the next request of that pod sees it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kube_gateway_bpf::{Capture, CaptureFilter};
use kube_gateway_watcher::{Workload, WorkloadSet};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::pod;
use crate::app::Shared;
use crate::listener::Gateway;
use crate::netns::NetNs;
use crate::policy::PolicyStore;
use crate::record::Identity;

/// What the reconciler needs besides the desired set.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The host's cgroup v2 tree (mounted from the node).
    pub cgroup_root: PathBuf,
    /// Where each pod's listener binds, inside the pod's network namespace.
    pub listen: SocketAddr,
    /// What the capture takes (the same for every pod).
    pub filter: CaptureFilter,
}

/// Why a pod could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no cgroup for pod uid {uid} under {root} (not on this node, or not started)")]
    NoCgroup { uid: String, root: PathBuf },
    #[error("the pod's network namespace: {0}")]
    NetNs(#[source] std::io::Error),
    #[error("cannot listen on {addr} in the pod's network namespace: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF: {0}")]
    Capture(#[from] kube_gateway_bpf::CaptureError),
    #[error("cannot read the cgroup tree: {0}")]
    Cgroups(#[source] std::io::Error),
}

/// One pod the agent serves.
pub struct Attached {
    pub workload: Arc<Workload>,
    pub cgroup: PathBuf,
    policy: Arc<PolicyStore>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Attaches and detaches pods to converge on the desired set.
pub struct Reconciler {
    settings: NodeSettings,
    shared: Shared,
    capture: Capture,
    attached: BTreeMap<String, Attached>,
    /// Serving-thread numbers for request ids (each pod's proxy has its own).
    next_worker: u16,
}

/// What one pass did, for logs, Events and tests.
#[derive(Debug, Default)]
pub struct Pass {
    pub attached: Vec<Arc<Workload>>,
    pub detached: Vec<Arc<Workload>>,
    /// Pods whose policy changed (swapped in place).
    pub updated: Vec<Arc<Workload>>,
    pub failed: Vec<(Arc<Workload>, String)>,
}

impl Reconciler {
    pub fn new(settings: NodeSettings, shared: Shared, capture: Capture) -> Self {
        Self {
            settings,
            shared,
            capture,
            attached: BTreeMap::new(),
            next_worker: 1,
        }
    }

    /// The pods served now, by UID.
    pub fn attached(&self) -> &BTreeMap<String, Attached> {
        &self.attached
    }

    /// One pass: converge on `desired`.
    pub async fn reconcile(&mut self, desired: &WorkloadSet) -> Pass {
        let mut pass = Pass::default();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(uid, a)| {
                desired
                    .get(*uid)
                    .is_none_or(|w| w.attachment_differs(&a.workload))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some(a) = self.attached.remove(&uid) {
                pass.detached.push(a.workload.clone());
                self.detach(a).await;
            }
        }
        for (uid, w) in desired.iter() {
            match self.attached.get_mut(uid) {
                Some(a) => {
                    if !Arc::ptr_eq(&a.workload.policy, &w.policy) {
                        a.policy
                            .install_resolved(w.policy.clone(), w.policy_sources.join(","));
                        pass.updated.push(w.clone());
                    }
                    a.workload = w.clone();
                }
                None => match self.attach(w.clone()).await {
                    Ok(a) => {
                        self.attached.insert(uid.clone(), a);
                        pass.attached.push(w.clone());
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %w.id.namespace, pod = %w.id.name, error = %e, "cannot attach to the pod");
                        pass.failed.push((w.clone(), e.to_string()));
                    }
                },
            }
        }
        pass
    }

    async fn attach(&mut self, w: Arc<Workload>) -> Result<Attached, AttachError> {
        let root = &self.settings.cgroup_root;
        let cgroup = pod::pod_cgroup(root, &w.id.uid)
            .map_err(AttachError::Cgroups)?
            .ok_or_else(|| AttachError::NoCgroup {
                uid: w.id.uid.clone(),
                root: root.clone(),
            })?;
        let netns_path = pod::pod_netns(&cgroup).map_err(AttachError::NetNs)?;
        let netns = Arc::new(NetNs::enter(&netns_path).map_err(AttachError::NetNs)?);
        let addr = self.settings.listen;
        let listener = netns
            .listen(addr)
            .await
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| AttachError::Listen { addr, source })?;
        let policy = Arc::new(PolicyStore::resolved(
            w.policy.clone(),
            w.policy_sources.join(","),
        ));
        let identity = Arc::new(Identity {
            namespace: w.id.namespace.clone(),
            pod: w.id.name.clone(),
            container: String::new(),
            service_account: w.id.service_account.clone(),
        });
        let worker = self.next_worker;
        self.next_worker = self.next_worker.wrapping_add(1).max(1);
        let gateway = Gateway::for_pod(
            self.shared.clone(),
            listener,
            policy.clone(),
            identity,
            netns.clone(),
            worker,
        );
        let (stop, mut stopped) = watch::channel(false);
        #[expect(
            clippy::disallowed_methods,
            reason = "a pod's gateway: stopped and awaited when the pod is detached"
        )]
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        if let Err(e) = self.capture.attach_workload(&cgroup) {
            let _ = stop.send(true);
            let _ = task.await;
            return Err(e.into());
        }
        if w.netflush {
            let (cg, filter) = (cgroup.clone(), self.settings.filter.clone());
            match netns
                .run(move || crate::netflush::flush(&cg, &filter).map_err(std::io::Error::other))
                .await
            {
                Ok(f) => {
                    self.shared.telemetry().netflushed(f.destroyed as u64);
                    tracing::info!(pod = %w.id.name, matched = f.matched, destroyed = f.destroyed, "netflush")
                }
                Err(e) => tracing::warn!(pod = %w.id.name, error = %e, "netflush failed"),
            }
        }
        tracing::info!(namespace = %w.id.namespace, pod = %w.id.name, uid = %w.id.uid, cgroup = %cgroup.display(), "gateway attached");
        Ok(Attached {
            workload: w,
            cgroup,
            policy,
            stop,
            task,
        })
    }

    async fn detach(&mut self, a: Attached) {
        // New connects go direct from now on; the listener drains what it has.
        self.capture.detach_workload(&a.cgroup);
        let _ = a.stop.send(true);
        if let Err(e) = a.task.await {
            tracing::warn!(pod = %a.workload.id.name, error = %e, "the pod's gateway ended badly");
        }
        tracing::info!(namespace = %a.workload.id.namespace, pod = %a.workload.id.name, "gateway detached");
    }

    /// Detaches every pod (shutdown); what was detached.
    pub async fn detach_all(&mut self) -> Vec<Arc<Workload>> {
        let all = std::mem::take(&mut self.attached);
        let mut gone = Vec::with_capacity(all.len());
        for (_, a) in all {
            gone.push(a.workload.clone());
            self.detach(a).await;
        }
        gone
    }
}
