//! What is read while the gateway serves, from the parts that own it: the policy in
//! force, the budget ledger, and the usage writer's state. The admin endpoint reports
//! from it, and it answers telemetry's gauges (so telemetry imports neither the ledger
//! nor the store).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use kube_gateway_policy::Policy;
use tokio::sync::mpsc::WeakSender;

use crate::budget::Ledger;
use crate::policy::PolicyStore;
use crate::record::UsageRecord;
use crate::store::writer::WriterStats;
use crate::telemetry::{BudgetReading, Gauges};

/// The live state of one gateway.
#[derive(Clone)]
pub struct Live {
    pub policy: Arc<PolicyStore>,
    pub ledger: Arc<Ledger>,
    /// Weak: the writer ends (at shutdown) when the last sender is gone, and a reader of
    /// gauges must not be one.
    pub store: Option<(Arc<WriterStats>, WeakSender<Arc<UsageRecord>>)>,
    /// Pods the node agent serves now (`kube-gateway node`; 0 in `run`).
    pub attached_pods: Arc<AtomicUsize>,
    /// Client connections open now, across serving threads (and pods).
    pub open_connections: Arc<AtomicUsize>,
    /// The policies of the pods the node agent serves (their budgets are gauged too),
    /// swapped whole after each pass.
    pub pod_policies: Arc<ArcSwap<Vec<Arc<Policy>>>>,
}

impl Live {
    /// Whether the usage store is reachable (`None`: there is no store).
    pub fn store_connected(&self) -> Option<bool> {
        self.store
            .as_ref()
            .map(|(stats, _)| stats.connected.load(Ordering::Relaxed))
    }
}

impl Gauges for Live {
    fn budgets(&self) -> Vec<BudgetReading> {
        let mut readings = self.ledger.gauges(&self.policy.current().budgets);
        for p in self.pod_policies.load().iter() {
            readings.extend(self.ledger.gauges(&p.budgets));
        }
        // Pods sharing a policy (or a budget) would read it twice.
        readings.sort();
        readings.dedup();
        readings
    }

    fn attached_pods(&self) -> usize {
        self.attached_pods.load(Ordering::Relaxed)
    }

    fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Records waiting for the writer, and rows spooled and not yet replayed.
    fn store(&self) -> Option<(usize, usize)> {
        let (stats, tx) = self.store.as_ref()?;
        let spooled = stats.spooled.load(Ordering::Relaxed);
        let replayed = stats.replayed.load(Ordering::Relaxed);
        let depth = tx
            .upgrade()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity());
        Some((
            depth,
            usize::try_from(spooled.saturating_sub(replayed)).unwrap_or(usize::MAX),
        ))
    }
}
