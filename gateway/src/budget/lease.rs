//! The lease protocol of shared budgets. With a shared store, a gateway admits only
//! against slices it leased of each window's limits: admission costs a round trip only
//! when the slice in hand is too small, refills run in the background when half a slice
//! is left, and a stream may overdraw by at most one slice while a refill is under way.
//! The store is reached only through [`LeaseBackend`] (PostgreSQL implements it in
//! `store/`; the tests use an in-memory one).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kube_gateway_policy::budget::{Budget, Subject};

use super::ledger::{Charge, Entry, Exhausted, Ledger, Refusal, Reservation};

/// The measures a budget can limit, in this order everywhere: total, input and output
/// tokens, requests.
pub type Measures = [u64; 4];

/// The outcome of one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// What this lease gave, per measure.
    pub granted: Measures,
    /// What all gateways together hold of the window after it, per measure.
    pub leased: Measures,
}

/// A lease could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("budget lease store failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("budget lease task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a backend's calls return.
pub type LeaseFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LeaseError>> + Send + 'a>>;

/// Where shared budget windows are leased from. The sum of all leases of a window never
/// passes its limits.
pub trait LeaseBackend: Send + Sync {
    /// Leases up to `want` of each measure of a budget window, never past `limits`
    /// (`None`: unlimited, so nothing is leased of it).
    fn lease<'a>(
        &'a self,
        key: &'a str,
        window_start: i64,
        want: Measures,
        limits: [Option<u64>; 4],
    ) -> LeaseFuture<'a, Grant>;

    /// Returns what a gateway leased and did not use.
    fn give_back<'a>(
        &'a self,
        key: &'a str,
        window_start: i64,
        unused: Measures,
    ) -> LeaseFuture<'a, ()>;
}

/// How long a gateway that found a shared window's limits all leased waits before asking
/// again (another gateway may give its unused slice back meanwhile).
const DRY_MS: i64 = 1_000;

/// This gateway's lease of a shared budget window.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Lease {
    /// What this gateway has leased, per measure.
    pub(super) granted: Measures,
    /// Until when the cluster had nothing more to lease of a measure.
    pub(super) dry_until: [i64; 4],
    /// A lease for this window is under way.
    pub(super) refilling: bool,
}

/// A lease a gateway needs from the shared store.
#[derive(Debug, Clone)]
pub struct Ask {
    pub(super) budget: String,
    pub(super) key: String,
    pub(super) window_start: i64,
    pub(super) want: Measures,
    pub(super) limits: [Option<u64>; 4],
}

/// Why [`Ledger::admit_leasing`] did not admit.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("budget {:?} is spent", .0.budget)]
    Exhausted(Exhausted),
    #[error("budget {budget:?} needs a lease and its store failed: {error}")]
    Unavailable {
        budget: String,
        #[source]
        error: LeaseError,
    },
}

/// Budgets shared through a store.
pub(super) struct Shared {
    pub(super) backend: Arc<dyn LeaseBackend>,
    /// The runtime the store's connections live on; leases run there.
    pub(super) runtime: tokio::runtime::Handle,
}

impl Ledger {
    /// [`Ledger::admit`], leasing first where shared budgets need it: a request costs a
    /// database round trip only when the slices in hand are too small. Gateways racing
    /// for the last of a window get a few tries before the request is refused.
    pub async fn admit_leasing(
        self: &Arc<Self>,
        budgets: &[Budget],
        who: &Subject<'_>,
        input: u64,
        max_output: Option<u64>,
    ) -> Result<Reservation, AdmitError> {
        for _ in 0..3 {
            match self.admit(budgets, who, input, max_output) {
                Ok(r) => return Ok(r),
                Err(Refusal::Exhausted(e)) => return Err(AdmitError::Exhausted(e)),
                Err(Refusal::Lease(asks)) => {
                    let budget = asks.first().map(|a| a.budget.clone()).unwrap_or_default();
                    if let Err(error) = self.lease(asks).await {
                        return Err(AdmitError::Unavailable { budget, error });
                    }
                }
            }
        }
        match self.admit(budgets, who, input, max_output) {
            Ok(r) => Ok(r),
            Err(Refusal::Exhausted(e)) => Err(AdmitError::Exhausted(e)),
            Err(r @ Refusal::Lease(_)) => Err(AdmitError::Exhausted(Exhausted {
                budget: r.budget().to_owned(),
                retry_after: 1,
            })),
        }
    }

    /// Shared budgets: a background lease when less than half a slice is left in hand.
    pub(super) fn refill(&self, e: &mut Entry, c: &Charge, now: i64) -> Option<Ask> {
        if self.shared.is_none() || e.lease.refilling {
            return None;
        }
        let ask = c.ask(e, [0; 4], |slice| slice / 2, now)?;
        e.lease.refilling = true;
        Some(ask)
    }

    pub(super) fn spawn_leases(self: &Arc<Self>, asks: Vec<Ask>) {
        let Some(shared) = &self.shared else { return };
        if asks.is_empty() {
            return;
        }
        let this = self.clone();
        #[expect(
            clippy::disallowed_methods,
            reason = "a background refill: at most one a window at a time (refilling), bounded by the store's timeouts"
        )]
        shared.runtime.spawn(async move {
            if let Err(e) = this.lease_now(asks).await {
                tracing::warn!(error = %e, "budget lease failed; serving from the slices in hand");
            }
        });
    }

    /// Leases what `asks` name from the shared store (on the store's runtime).
    #[expect(
        clippy::disallowed_methods,
        reason = "awaited right here, on the runtime the store's connections belong to"
    )]
    pub async fn lease(self: &Arc<Self>, asks: Vec<Ask>) -> Result<(), LeaseError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let this = self.clone();
        shared
            .runtime
            .spawn(async move { this.lease_now(asks).await })
            .await?
    }

    async fn lease_now(&self, asks: Vec<Ask>) -> Result<(), LeaseError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        for ask in asks {
            let result = shared
                .backend
                .lease(&ask.key, ask.window_start, ask.want, ask.limits)
                .await;
            let now = self.clock.now_ms();
            let mut counts = self.entries();
            let e = counts.entry(ask.key.clone()).or_default();
            if e.start != ask.window_start {
                if e.start > ask.window_start {
                    // A lease of a window that has ended: nothing to keep.
                    continue;
                }
                *e = Entry {
                    start: ask.window_start,
                    ..Entry::default()
                };
            }
            e.lease.refilling = false;
            let grant = result?;
            for m in 0..4 {
                e.lease.granted[m] += grant.granted[m];
                if grant.granted[m] < ask.want[m] {
                    e.lease.dry_until[m] = now + DRY_MS;
                }
            }
            tracing::debug!(key = %ask.key, granted = ?grant.granted, leased = ?grant.leased, "budget lease");
        }
        Ok(())
    }

    /// Shared budgets: gives every unused leased slice back (on shutdown).
    pub async fn release(self: &Arc<Self>) {
        let Some(shared) = &self.shared else { return };
        let unused: Vec<(String, i64, Measures)> = self
            .entries()
            .iter_mut()
            .filter_map(|(key, e)| {
                let used = e.used();
                let back: Measures =
                    std::array::from_fn(|m| e.lease.granted[m].saturating_sub(used[m]));
                e.lease.granted = std::array::from_fn(|m| e.lease.granted[m] - back[m]);
                back.iter()
                    .any(|b| *b > 0)
                    .then(|| (key.clone(), e.start, back))
            })
            .collect();
        for (key, start, back) in unused {
            match shared.backend.give_back(&key, start, back).await {
                Ok(()) => tracing::debug!(key = %key, unused = ?back, "budget lease given back"),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "could not give a budget lease back; it lapses with its window")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use kube_gateway_policy::budget::{Limits, Scope, Window};

    use super::*;
    use crate::budget::SystemClock;

    /// Leases kept in memory, with the store's rule: the sum of a window's leases never
    /// passes its limits.
    #[derive(Default)]
    struct Memory(Mutex<HashMap<(String, i64), Measures>>);

    impl LeaseBackend for Memory {
        fn lease<'a>(
            &'a self,
            key: &'a str,
            window_start: i64,
            want: Measures,
            limits: [Option<u64>; 4],
        ) -> LeaseFuture<'a, Grant> {
            let mut windows = self.0.lock().unwrap();
            let held = windows.entry((key.to_owned(), window_start)).or_default();
            let mut granted = [0; 4];
            for m in 0..4 {
                if let Some(limit) = limits[m] {
                    granted[m] = want[m].min(limit.saturating_sub(held[m]));
                    held[m] += granted[m];
                }
            }
            let leased = *held;
            Box::pin(async move { Ok(Grant { granted, leased }) })
        }

        fn give_back<'a>(
            &'a self,
            key: &'a str,
            window_start: i64,
            unused: Measures,
        ) -> LeaseFuture<'a, ()> {
            if let Some(held) = self
                .0
                .lock()
                .unwrap()
                .get_mut(&(key.to_owned(), window_start))
            {
                for m in 0..4 {
                    held[m] = held[m].saturating_sub(unused[m]);
                }
            }
            Box::pin(async { Ok(()) })
        }
    }

    /// A backend whose lease task dies.
    struct Panics;

    impl LeaseBackend for Panics {
        fn lease<'a>(
            &'a self,
            _: &'a str,
            _: i64,
            _: Measures,
            _: [Option<u64>; 4],
        ) -> LeaseFuture<'a, Grant> {
            Box::pin(async { panic!("the lease backend crashed") })
        }

        fn give_back<'a>(&'a self, _: &'a str, _: i64, _: Measures) -> LeaseFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    fn budget(total: u64) -> Budget {
        Budget {
            name: "shared".into(),
            scope: Scope::Namespace,
            models: vec![],
            window: Window::Hour,
            limits: Limits {
                total_tokens: Some(total),
                ..Default::default()
            },
            slice_percent: 5,
        }
    }

    const WHO: Subject<'static> = Subject {
        namespace: "ns",
        pod: "p",
        model: "m",
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gateways_sharing_a_window_spend_within_limit_plus_one_slice_each() {
        let backend = Arc::new(Memory::default());
        let gateways: Vec<Arc<Ledger>> = (0..3)
            .map(|_| {
                Arc::new(Ledger::shared(
                    Arc::new(SystemClock),
                    backend.clone(),
                    tokio::runtime::Handle::current(),
                ))
            })
            .collect();
        let b = [budget(1_000)];
        let (mut spent, mut refused) = (0, 0);
        for i in 0..300 {
            let ledger = &gateways[i % gateways.len()];
            match ledger.admit_leasing(&b, &WHO, 5, Some(5)).await {
                Ok(r) => {
                    ledger.settle(&r, 5, 5);
                    spent += 10;
                }
                Err(AdmitError::Exhausted(e)) => {
                    assert_eq!(e.budget, "shared");
                    refused += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let slice = 50;
        assert!(spent <= 1_000 + 3 * slice, "spent {spent}");
        assert!(
            spent >= 1_000 - 3 * slice,
            "the window was usable: spent {spent}"
        );
        assert!(refused > 0);
        for g in &gateways {
            g.release().await;
        }
        let held = backend
            .0
            .lock()
            .unwrap()
            .values()
            .map(|m| m[0])
            .sum::<u64>();
        assert!(held <= spent, "held {held} of {spent} after giving back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_lease_task_is_reported_as_such() {
        let ledger = Arc::new(Ledger::shared(
            Arc::new(SystemClock),
            Arc::new(Panics),
            tokio::runtime::Handle::current(),
        ));
        match ledger
            .admit_leasing(&[budget(1_000)], &WHO, 5, Some(5))
            .await
        {
            Err(AdmitError::Unavailable {
                budget,
                error: LeaseError::Task(e),
            }) => {
                assert_eq!(budget, "shared");
                assert!(e.is_panic());
            }
            other => panic!("expected a failed lease task, got {other:?}"),
        }
    }
}
