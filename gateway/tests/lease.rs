//! Shared budgets against a real PostgreSQL: leases never hand out more than a window's
//! limit however many gateways ask at once, unused slices come back, and gateways that
//! each spend from their own slices stay within limit + gateways x slice together.
//!
//! Needs `KGW_TEST_POSTGRES_URL` (CI starts a private cluster and sets it); without it
//! the tests skip, saying so, except under CI=true where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test tasks end with the test's runtime.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;

mod common;
use common::postgres_url;

use kube_gateway::budget::{AdmitError, Ledger, SystemClock};
use kube_gateway::store::{Store, StoreUrl};
use kube_gateway_policy::budget::{Budget, Limits, Scope, Subject, Window};

async fn store() -> Option<Store> {
    let url = postgres_url()?;
    Some(
        Store::connect(&StoreUrl::Postgres(url))
            .await
            .expect("PostgreSQL"),
    )
}

/// A key no other run of these tests uses.
fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test]
async fn concurrent_leases_never_pass_the_limit_and_unused_slices_come_back() {
    let Some(store) = store().await else { return };
    let key = unique("lease");
    let limits = [Some(100), None, None, Some(10)];
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                let mut got = [0u64; 4];
                loop {
                    let g = store.lease(&key, 0, [7, 7, 7, 1], limits).await.unwrap();
                    if g.granted == [0; 4] {
                        return got;
                    }
                    for (sum, g) in got.iter_mut().zip(g.granted) {
                        *sum += g;
                    }
                }
            })
        })
        .collect();
    let mut total = [0u64; 4];
    for t in tasks {
        let got = t.await.unwrap();
        for (sum, g) in total.iter_mut().zip(got) {
            *sum += g;
        }
    }
    assert_eq!(
        total,
        [100, 0, 0, 10],
        "exactly the limits, nothing of unlimited measures"
    );
    store.give_back(&key, 0, [30, 0, 0, 2]).await.unwrap();
    let g = store.lease(&key, 0, [50, 0, 0, 5], limits).await.unwrap();
    assert_eq!(g.granted, [30, 0, 0, 2], "what came back, no more");
    assert_eq!(g.leased, [100, 0, 0, 10]);
    let other_window = store
        .lease(&key, 60_000, [50, 0, 0, 5], limits)
        .await
        .unwrap();
    assert_eq!(
        other_window.granted,
        [50, 0, 0, 5],
        "each window has its own limits"
    );
}

/// Spends like a gateway would: admit (leasing when needed), stream in steps of `step`
/// tokens drawing from the ledger until the line or `answer` tokens, settle.
async fn spend(
    ledger: &Arc<Ledger>,
    b: &[Budget],
    who: &Subject<'_>,
    answer: u64,
    step: u64,
) -> Option<u64> {
    let mut r = match ledger.admit_leasing(b, who, 10, None).await {
        Ok(r) => r,
        Err(AdmitError::Exhausted(_)) => return None,
        Err(e) => panic!("{e}"),
    };
    let mut out = 0;
    while out < answer {
        out += step;
        if !ledger.draw(&mut r, out) {
            break;
        }
        tokio::task::yield_now().await;
    }
    ledger.settle(&r, 10, out);
    Some(10 + out)
}

#[tokio::test]
async fn gateways_sharing_a_budget_stay_within_limit_plus_one_slice_each() {
    let Some(store) = store().await else { return };
    const GATEWAYS: u64 = 4;
    let limit = 5_000;
    let budget = vec![Budget {
        name: unique("shared"),
        scope: Scope::Namespace,
        models: vec![],
        window: Window::Month,
        limits: Limits {
            total_tokens: Some(limit),
            ..Limits::default()
        },
        slice_percent: 4,
    }];
    let slice = budget[0].slice(limit);
    let ledgers: Vec<Arc<Ledger>> = (0..GATEWAYS)
        .map(|_| {
            Arc::new(Ledger::shared(
                Arc::new(SystemClock),
                Arc::new(store.clone()),
                tokio::runtime::Handle::current(),
            ))
        })
        .collect();
    // Each gateway runs 6 concurrent clients until the budget refuses them.
    let mut clients = Vec::new();
    for (g, ledger) in ledgers.iter().enumerate() {
        for c in 0..6 {
            let (ledger, budget) = (ledger.clone(), budget.clone());
            clients.push(tokio::spawn(async move {
                let pod = format!("pod-{g}");
                let who = Subject {
                    namespace: "team",
                    pod: &pod,
                    model: "m",
                };
                let mut spent = 0;
                let mut served = 0;
                // Answers of 20-90 tokens in steps of 3, as a stream would come.
                while let Some(n) =
                    spend(&ledger, &budget, &who, 20 + (c * 13 + served) % 71, 3).await
                {
                    spent += n;
                    served += 1;
                }
                (spent, served)
            }));
        }
    }
    let mut spent = 0;
    let mut served = 0;
    for c in clients {
        let (s, n) = c.await.unwrap();
        spent += s;
        served += n;
    }
    let bound = limit + GATEWAYS * slice;
    eprintln!("{served} answers spent {spent} tokens of {limit} (bound {bound}, slice {slice})");
    assert!(
        spent <= bound,
        "spent {spent} > limit + gateways x slice = {bound}"
    );
    assert!(
        spent >= limit - GATEWAYS * 2 * slice,
        "spent {spent}: the budget was mostly usable"
    );
    for l in &ledgers {
        l.release().await;
    }
    // After everyone gave back, what the store holds as leased is at most what was spent.
    let g = store
        .lease(
            &budget[0].key(&Subject {
                namespace: "team",
                pod: "",
                model: "",
            }),
            Window::Month.start(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64,
            ),
            [0; 4],
            [Some(limit), None, None, None],
        )
        .await
        .unwrap();
    assert!(
        g.leased[0] <= spent.min(limit),
        "leased {:?} after release, spent {spent}",
        g.leased
    );
}
