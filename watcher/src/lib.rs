//! kube-gateway's watcher: turns the Pods of one node and the policy ConfigMaps into the
//! desired set of workloads the node agent serves ([`WorkloadSet`], published on a
//! `tokio::sync::watch` channel). Level-triggered: the set is recomputed from the
//! reflectors' caches, never from single events. It opens no sockets of its own and
//! knows nothing of eBPF: the gateway depends on it, never the reverse.

pub mod annotations;
pub mod config;
pub mod events;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod mock_api;
pub mod resolve;
mod run;
pub mod selector;
pub mod sources;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Resource;
use kube_gateway_policy::Policy;

// The client the agent builds and hands in: the same kube the watcher was built with.
pub use config::{WatcherConfig, DEFAULT_DEBOUNCE, REPORTING_CONTROLLER};
pub use events::{EventError, PodEvents, Reporter};
pub use kube;
pub use run::{run, WatcherError};

/// Who a workload is: the identity every usage row, metric label and log line of its
/// traffic carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub node: String,
}

impl WorkloadId {
    /// The pod as an Event's `regarding` (`v1` `Pod`, namespace, name, uid).
    pub fn object_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(Pod::api_version(&()).into_owned()),
            kind: Some(Pod::kind(&()).into_owned()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()),
            resource_version: None,
            field_path: None,
        }
    }
}

/// One annotated pod the agent should serve, with its resolved policy.
#[derive(Debug, Clone)]
pub struct Workload {
    pub id: WorkloadId,
    /// The pod's IPs (`status.podIPs`).
    pub ips: Vec<IpAddr>,
    /// `kube-gateway.io/ai-model`: every model this pod asks for is rewritten to it,
    /// unless its policy's own model rules decide.
    pub model: Option<String>,
    /// `kube-gateway.io/netflush`: destroy the pod's established connections on attach.
    pub netflush: bool,
    /// The policy resolved for this pod (see [`annotations`] and the README's
    /// precedence table), already compiled.
    pub policy: Arc<Policy>,
    /// Where the policy came from (`configmap/NS/NAME`, ...), for logs and Events.
    pub policy_sources: Vec<String>,
}

impl Workload {
    /// Whether serving `self` instead of `other` changes what is attached (not only
    /// the policy): a different pod, or different attach-time settings.
    pub fn attachment_differs(&self, other: &Workload) -> bool {
        self.id != other.id || self.netflush != other.netflush
    }

    /// Whether `self` and `other` serve the pod the same way: same identity, addresses,
    /// settings, policy sources and policy (by the hash of its text; the `ai-model`
    /// fallback is in [`Workload::model`]). The watcher publishes a new set only when
    /// some workload differs by this.
    pub fn same_as(&self, other: &Workload) -> bool {
        self.id == other.id
            && self.ips == other.ips
            && self.model == other.model
            && self.netflush == other.netflush
            && self.policy_sources == other.policy_sources
            && self.policy.hash == other.policy.hash
    }
}

/// The desired set: pod UID -> workload.
pub type WorkloadSet = Arc<BTreeMap<String, Arc<Workload>>>;
