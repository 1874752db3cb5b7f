//! What the watcher is told by its caller. The library reads no environment: the
//! gateway's CLI reads the variables named in [`env`] and passes the values in.

use std::time::Duration;

/// The environment the node agent reads for the watcher (documentation and names only;
/// nothing here calls `std::env`).
///
/// | variable | fills | set in the DaemonSet by |
/// |---|---|---|
/// | `NODE_NAME` | [`WatcherConfig::node_name`] | the downward API, `spec.nodeName` |
/// | `POD_NAME` | [`WatcherConfig::reporting_instance`] (the Events' `reportingInstance`) | the downward API, `metadata.name` |
///
/// The Kubernetes client itself ([`kube::Client::try_default`], called by the gateway)
/// reads `KUBECONFIG`, or in a pod `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`
/// and the service account's token and CA under
/// `/var/run/secrets/kubernetes.io/serviceaccount/`.
pub mod env {
    /// The node this agent serves (`spec.nodeName`).
    pub const NODE_NAME: &str = "NODE_NAME";
    /// The agent's own pod name, which reports its Events.
    pub const POD_NAME: &str = "POD_NAME";
}

/// The name Events carry as their `reportingController`.
pub const REPORTING_CONTROLLER: &str = "kube-gateway";

/// The debounce [`WatcherConfig::new`] uses.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);

/// How the watcher runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherConfig {
    /// The node whose pods are watched (`spec.nodeName=<node_name>`).
    pub node_name: String,
    /// After a change, how long to gather further changes before the set is recomputed
    /// and published. Counted from the first change, not extended by later ones, so a
    /// steady stream of changes still publishes at this pace; the recompute reads the
    /// caches, so the last change is always in it.
    pub debounce: Duration,
    /// The Events' `reportingInstance`: the agent's pod name (else the node name).
    pub reporting_instance: String,
}

impl WatcherConfig {
    /// For `node_name`, with [`DEFAULT_DEBOUNCE`] and the node name as reporting
    /// instance.
    pub fn new(node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        Self {
            reporting_instance: format!("{REPORTING_CONTROLLER}-{node_name}"),
            node_name,
            debounce: DEFAULT_DEBOUNCE,
        }
    }
}
