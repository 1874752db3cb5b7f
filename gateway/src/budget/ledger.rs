//! The budget ledger: what each budget window has used. Before a request, admission
//! checks every applicable budget and reserves the prompt's estimated tokens plus the
//! output it says it may make; a streamed answer draws its tokens as they pass and is cut
//! at the line; after, the reservation is settled with the exact usage. Per gateway by
//! default; shared through a [`super::LeaseBackend`] when a shared store is configured.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kube_gateway_policy::budget::{Budget, Limits, Subject};

use super::clock::Clock;
use super::keys::bounded_key;
use super::lease::{Ask, Lease, LeaseBackend, Measures, Shared};
use super::state::Spent;

/// Indexes into [`Measures`].
const TOTAL: usize = 0;
const INPUT: usize = 1;
const OUTPUT: usize = 2;
const REQUESTS: usize = 3;

fn limits_of(l: &Limits) -> [Option<u64>; 4] {
    [l.total_tokens, l.input_tokens, l.output_tokens, l.requests]
}

/// One budget key's window.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Entry {
    pub(super) start: i64,
    pub(super) input: u64,
    pub(super) output: u64,
    pub(super) requests: u64,
    pub(super) lease: Lease,
}

impl Entry {
    pub(super) fn used(&self) -> Measures {
        let mut used = [0; 4];
        used[TOTAL] = self.input + self.output;
        used[INPUT] = self.input;
        used[OUTPUT] = self.output;
        used[REQUESTS] = self.requests;
        used
    }
}

#[derive(Debug, Clone)]
pub(super) struct Charge {
    budget: String,
    key: String,
    window_start: i64,
    limits: [Option<u64>; 4],
    slice: Measures,
}

impl Charge {
    fn new(b: &Budget, key: String, window_start: i64) -> Self {
        let limits = limits_of(&b.limits);
        Self {
            budget: b.name.clone(),
            key,
            window_start,
            limits,
            slice: limits.map(|l| l.map_or(0, |l| b.slice(l))),
        }
    }

    /// A lease of what `used` is short of, plus a slice, for each measure at or past
    /// `granted - margin`; `None` when nothing is short.
    pub(super) fn ask(
        &self,
        e: &Entry,
        want: Measures,
        margin: impl Fn(u64) -> u64,
        now: i64,
    ) -> Option<Ask> {
        let used = e.used();
        let mut ask = [0; 4];
        for m in 0..4 {
            if self.limits[m].is_some()
                && e.lease.dry_until[m] <= now
                && used[m] + want[m] + margin(self.slice[m]) > e.lease.granted[m]
            {
                ask[m] = (used[m] + want[m]).saturating_sub(e.lease.granted[m]) + self.slice[m];
            }
        }
        ask.iter().any(|a| *a > 0).then(|| Ask {
            budget: self.budget.clone(),
            key: self.key.clone(),
            window_start: self.window_start,
            want: ask,
            limits: self.limits,
        })
    }
}

/// What an admitted request holds in the ledger until it is settled.
#[derive(Debug, Clone, Default)]
pub struct Reservation {
    charges: Vec<Charge>,
    input: u64,
    output: u64,
    /// Output tokens a stream drew past `output` as they passed.
    drawn: u64,
    /// Output tokens the answer may make before the tightest budget is spent (in this
    /// gateway's hands, for shared budgets).
    pub room: Option<u64>,
}

/// A budget has no room for the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub budget: String,
    /// Seconds until the budget's window resets.
    pub retry_after: u64,
}

/// Why admission did not admit.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The budget is spent.
    Exhausted(Exhausted),
    /// Shared budgets: this gateway's slices are too small; lease (`Ledger::lease`) and
    /// ask again.
    Lease(Vec<Ask>),
}

impl Refusal {
    /// The budget refused when leasing did not help.
    pub fn budget(&self) -> &str {
        match self {
            Refusal::Exhausted(e) => &e.budget,
            Refusal::Lease(asks) => asks.first().map_or("", |a| a.budget.as_str()),
        }
    }
}

/// The ledger: per budget key, the counts of its current window only (a new window
/// replaces the old one, so the ledger never grows past its keys).
pub struct Ledger {
    pub(super) clock: Arc<dyn Clock>,
    counts: Mutex<HashMap<String, Entry>>,
    pub(super) shared: Option<Shared>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// The prompt tokens it was admitted with (the estimate).
    pub fn input_estimate(&self) -> u64 {
        self.input
    }
}

impl Ledger {
    /// A ledger of this gateway's own.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            counts: Mutex::new(HashMap::new()),
            shared: None,
        }
    }

    /// A ledger whose budgets are shared with other gateways through `store`, whose
    /// connections belong to `runtime`.
    pub fn shared(
        clock: Arc<dyn Clock>,
        backend: Arc<dyn LeaseBackend>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            shared: Some(Shared { backend, runtime }),
            ..Self::new(clock)
        }
    }

    /// The entries. A panic while they were held (poisoning the lock) leaves plain
    /// counts at worst one update short: go on with them rather than admit requests
    /// against nothing (an empty reservation would let everything through).
    pub(super) fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.counts.lock().unwrap_or_else(|poisoned| {
            tracing::error!("budget ledger: a thread panicked while updating it; counting on");
            self.counts.clear_poison();
            poisoned.into_inner()
        })
    }

    /// What a measure may reach at admission: the limit, or the slices in hand.
    fn cap(&self, e: &Entry, c: &Charge, m: usize) -> Option<u64> {
        c.limits[m].map(|l| match self.shared {
            Some(_) => e.lease.granted[m].min(l),
            None => l,
        })
    }

    /// Admits a request estimated at `input` prompt tokens that may generate up to
    /// `max_output` (if it says), names the budget that has no room, or, for shared
    /// budgets, asks for leases first.
    pub fn admit(
        self: &Arc<Self>,
        budgets: &[Budget],
        who: &Subject<'_>,
        input: u64,
        max_output: Option<u64>,
    ) -> Result<Reservation, Refusal> {
        let now = self.clock.now_ms();
        let mut counts = self.entries();
        let mut room: Option<u64> = None;
        let mut charges = Vec::new();
        let mut asks = Vec::new();
        // Room for the prompt and at least one generated token.
        let mut want = [0; 4];
        (want[TOTAL], want[INPUT], want[OUTPUT], want[REQUESTS]) = (input + 1, input, 1, 1);
        for b in budgets.iter().filter(|b| b.applies(who.model)) {
            let start = b.window.start(now);
            let charge = Charge::new(b, bounded_key(&mut counts, b, who, start), start);
            let e = match counts.get(&charge.key) {
                Some(e) if e.start == start => *e,
                _ => Entry {
                    start,
                    ..Entry::default()
                },
            };
            let used = e.used();
            let short = (0..4).any(|m| {
                self.cap(&e, &charge, m)
                    .is_some_and(|c| used[m] + want[m] > c)
            });
            if short {
                match self.shared.as_ref().and(charge.ask(&e, want, |_| 0, now)) {
                    Some(ask) => asks.push(ask),
                    None => {
                        let end = b.window.end(now);
                        return Err(Refusal::Exhausted(Exhausted {
                            budget: b.name.clone(),
                            retry_after: u64::try_from((end - now + 999) / 1000)
                                .unwrap_or(1)
                                .max(1),
                        }));
                    }
                }
                continue;
            }
            let left_of = |m: usize| self.cap(&e, &charge, m).map(|c| c - used[m]);
            let left = match (left_of(OUTPUT), left_of(TOTAL).map(|t| t - input)) {
                (Some(o), Some(t)) => Some(o.min(t)),
                (o, t) => o.or(t),
            };
            if let Some(left) = left {
                room = Some(room.map_or(left, |r| r.min(left)));
            }
            charges.push(charge);
        }
        if !asks.is_empty() {
            return Err(Refusal::Lease(asks));
        }
        // Hold what the request may generate when it says; an open-ended request holds
        // nothing up front (holding the whole room would refuse its neighbours until it
        // settles): streams draw as they go, and the settlement keeps it honest.
        let output = match (max_output, room) {
            (Some(m), Some(r)) => m.min(r),
            (Some(m), None) => m,
            (None, _) => 0,
        };
        let mut refills = Vec::new();
        for c in &charges {
            let e = counts.entry(c.key.clone()).or_default();
            if e.start != c.window_start {
                *e = Entry {
                    start: c.window_start,
                    ..Entry::default()
                };
            }
            e.requests += 1;
            e.input += input;
            e.output += output;
            refills.extend(self.refill(e, c, now));
        }
        drop(counts);
        self.spawn_leases(refills);
        Ok(Reservation {
            charges,
            input,
            output,
            drawn: 0,
            room,
        })
    }

    /// A streamed answer has generated `counted` tokens so far: draws what passes its
    /// reservation. `false`: a budget's line is reached, end the answer.
    pub fn draw(self: &Arc<Self>, r: &mut Reservation, counted: u64) -> bool {
        let extra = counted.saturating_sub(r.output + r.drawn);
        if extra == 0 {
            return true;
        }
        r.drawn += extra;
        let now = self.clock.now_ms();
        let mut counts = self.entries();
        let mut within = true;
        let mut refills = Vec::new();
        for c in &r.charges {
            let Some(e) = counts.get_mut(&c.key).filter(|e| e.start == c.window_start) else {
                continue;
            };
            e.output += extra;
            let used = e.used();
            for m in [TOTAL, OUTPUT] {
                // A stream cannot wait for a lease: it may overdraw one slice meanwhile.
                let line = match self.shared {
                    Some(_) => c.limits[m].map(|l| (e.lease.granted[m] + c.slice[m]).min(l)),
                    None => c.limits[m],
                };
                if line.is_some_and(|l| used[m] >= l) {
                    within = false;
                }
            }
            refills.extend(self.refill(e, c, now));
        }
        drop(counts);
        self.spawn_leases(refills);
        within
    }

    /// Replaces a reservation's estimate with what the request really used.
    pub fn settle(self: &Arc<Self>, r: &Reservation, input: u64, output: u64) {
        let now = self.clock.now_ms();
        let mut counts = self.entries();
        let mut refills = Vec::new();
        for c in &r.charges {
            // A reservation from a window that has since ended settles nothing.
            if let Some(e) = counts.get_mut(&c.key).filter(|e| e.start == c.window_start) {
                e.input = e.input.saturating_sub(r.input).saturating_add(input);
                e.output = e
                    .output
                    .saturating_sub(r.output + r.drawn)
                    .saturating_add(output);
                refills.extend(self.refill(e, c, now));
            }
        }
        drop(counts);
        self.spawn_leases(refills);
    }

    /// Used tokens and requests of a budget key in the window holding now.
    pub fn used(&self, budget: &Budget, who: &Subject<'_>) -> (u64, u64, u64) {
        let start = budget.window.start(self.clock.now_ms());
        self.entries()
            .get(&budget.key(who))
            .copied()
            .filter(|e| e.start == start)
            .map_or((0, 0, 0), |e| (e.input, e.output, e.requests))
    }

    /// Each budget key's use of its current window, for the metrics: (budget, scope,
    /// measure, used, limit) for every limited measure.
    pub fn gauges(&self, budgets: &[Budget]) -> Vec<(String, String, &'static str, u64, u64)> {
        let now = self.clock.now_ms();
        let counts = self.entries();
        let mut out = Vec::new();
        for b in budgets {
            let prefix = b.key_prefix();
            let start = b.window.start(now);
            let limits = limits_of(&b.limits);
            for (key, e) in counts.iter() {
                let Some(scope) = key.strip_prefix(&prefix) else {
                    continue;
                };
                let used = if e.start == start { e.used() } else { [0; 4] };
                for (m, measure) in ["total_tokens", "input_tokens", "output_tokens", "requests"]
                    .into_iter()
                    .enumerate()
                {
                    if let Some(limit) = limits[m] {
                        out.push((b.name.clone(), scope.to_owned(), measure, used[m], limit));
                    }
                }
            }
        }
        out
    }

    /// Starts a gateway's own ledger from the stored usage of each budget's current
    /// window (`spent`: the rows since that window's start), so a restart does not
    /// reset its budgets.
    pub fn seed(&self, budget: &Budget, spent: &[Spent]) {
        let start = budget.window.start(self.clock.now_ms());
        let mut counts = self.entries();
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        for s in spent.iter().filter(|s| budget.applies(&s.model)) {
            let who = Subject {
                namespace: &s.namespace,
                pod: &s.pod,
                model: &s.model,
            };
            let e = counts.entry(budget.key(&who)).or_default();
            if e.start != start {
                *e = Entry {
                    start,
                    ..Entry::default()
                };
            }
            e.input += n(s.input_tokens);
            e.output += n(s.output_tokens);
            e.requests += n(s.requests);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{MAX_MODEL_KEYS, OTHER_MODELS};
    use kube_gateway_policy::budget::{Limits, Scope, Window};
    use std::sync::atomic::{AtomicI64, Ordering};

    struct FakeClock(AtomicI64);
    impl Clock for FakeClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn budget(limits: Limits) -> Budget {
        Budget {
            name: "b".into(),
            scope: Scope::Pod,
            models: vec![],
            window: Window::Minute,
            limits,
            slice_percent: 5,
        }
    }

    fn exhausted(r: Refusal) -> Exhausted {
        match r {
            Refusal::Exhausted(e) => e,
            Refusal::Lease(a) => panic!("a gateway's own ledger asked for a lease: {a:?}"),
        }
    }

    const WHO: Subject<'static> = Subject {
        namespace: "ns",
        pod: "p",
        model: "m",
    };

    #[test]
    fn a_model_scoped_budget_counts_names_apart_up_to_a_bound_then_shares_one_entry() {
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000_020_000)));
        let ledger = Arc::new(Ledger::new(clock.clone()));
        let b = [Budget {
            scope: Scope::Model,
            ..budget(Limits {
                requests: Some(1),
                ..Default::default()
            })
        }];
        let names: Vec<String> = (0..MAX_MODEL_KEYS + 5).map(|i| format!("m{i}")).collect();
        fn who(model: &str) -> Subject<'_> {
            Subject {
                namespace: "ns",
                pod: "p",
                model,
            }
        }
        for name in &names[..MAX_MODEL_KEYS] {
            ledger.admit(&b, &who(name), 1, Some(1)).unwrap();
        }
        // Each of those names has spent its own budget.
        exhausted(ledger.admit(&b, &who("m0"), 1, Some(1)).unwrap_err());
        // The next name takes the shared entry, and the one after finds it spent.
        ledger
            .admit(&b, &who(&names[MAX_MODEL_KEYS]), 1, Some(1))
            .unwrap();
        let e = exhausted(
            ledger
                .admit(&b, &who(&names[MAX_MODEL_KEYS + 1]), 1, Some(1))
                .unwrap_err(),
        );
        assert_eq!(e.budget, "b");
        assert_eq!(ledger.entries().len(), MAX_MODEL_KEYS + 1);
        assert_eq!(ledger.used(&b[0], &who(OTHER_MODELS)), (1, 1, 1));
        // A new window: a new name clears the ended one's entries, then has its own.
        clock.0.fetch_add(60_000, Ordering::Relaxed);
        ledger
            .admit(&b, &who(&names[MAX_MODEL_KEYS + 2]), 1, Some(1))
            .unwrap();
        assert_eq!(ledger.entries().len(), 1);
        assert_eq!(
            ledger.used(&b[0], &who(&names[MAX_MODEL_KEYS + 2])),
            (1, 1, 1)
        );
    }

    #[test]
    fn admits_until_spent_then_names_the_budget_and_the_reset() {
        // 15 s into a minute (1_000_000_020_000 is minute-aligned).
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000_020_000 + 15_000)));
        let ledger = Arc::new(Ledger::new(clock.clone()));
        let b = [budget(Limits {
            total_tokens: Some(100),
            ..Default::default()
        })];
        let r = ledger.admit(&b, &WHO, 30, Some(20)).unwrap();
        assert_eq!(r.room, Some(70));
        ledger.settle(&r, 30, 20);
        let r = ledger.admit(&b, &WHO, 30, None).unwrap();
        assert_eq!(r.room, Some(20), "the answer may use what is left");
        ledger.settle(&r, 30, 20);
        assert_eq!(ledger.used(&b[0], &WHO), (60, 40, 2));
        let e = exhausted(ledger.admit(&b, &WHO, 1, None).unwrap_err());
        assert_eq!(e.budget, "b");
        assert_eq!(e.retry_after, 45, "the minute resets in 45 s");
        clock.0.fetch_add(45_000, Ordering::Relaxed);
        let late = ledger.admit(&b, &WHO, 1, None).unwrap();
        assert_eq!(
            ledger.used(&b[0], &WHO),
            (1, 0, 1),
            "a new window, the old one gone"
        );
        ledger.settle(&r, 0, 0);
        assert_eq!(
            ledger.used(&b[0], &WHO),
            (1, 0, 1),
            "a reservation of the old window settles nothing"
        );
        ledger.settle(&late, 1, 3);
        assert_eq!(ledger.used(&b[0], &WHO), (1, 3, 1));
        assert_eq!(
            ledger.entries().len(),
            1,
            "one entry per key, whatever the windows"
        );
    }

    #[test]
    fn open_ended_requests_do_not_hold_the_whole_room() {
        let ledger = Arc::new(Ledger::new(Arc::new(FakeClock(AtomicI64::new(0)))));
        let b = [budget(Limits {
            total_tokens: Some(100),
            ..Default::default()
        })];
        let first = ledger.admit(&b, &WHO, 10, None).unwrap();
        assert_eq!(first.room, Some(90));
        let second = ledger
            .admit(&b, &WHO, 10, None)
            .expect("its neighbour is not refused");
        assert_eq!(second.room, Some(80));
        assert_eq!(ledger.used(&b[0], &WHO), (20, 0, 2));
        ledger.settle(&first, 10, 70);
        assert_eq!(ledger.used(&b[0], &WHO), (20, 70, 2));
    }

    #[test]
    fn the_tightest_budget_wins_and_requests_count() {
        let ledger = Arc::new(Ledger::new(Arc::new(FakeClock(AtomicI64::new(0)))));
        let b = [
            budget(Limits {
                output_tokens: Some(500),
                ..Default::default()
            }),
            Budget {
                name: "req".into(),
                ..budget(Limits {
                    requests: Some(2),
                    total_tokens: Some(50),
                    ..Default::default()
                })
            },
        ];
        let r = ledger.admit(&b, &WHO, 10, Some(1000)).unwrap();
        assert_eq!(r.room, Some(40));
        ledger.settle(&r, 10, 5);
        ledger.admit(&b, &WHO, 1, None).unwrap();
        assert_eq!(ledger.admit(&b, &WHO, 1, None).unwrap_err().budget(), "req");
    }

    #[test]
    fn concurrent_streams_draw_from_one_line() {
        // Two open-ended streams admitted together: each may not spend the room both saw.
        let ledger = Arc::new(Ledger::new(Arc::new(FakeClock(AtomicI64::new(0)))));
        let b = [budget(Limits {
            total_tokens: Some(100),
            ..Default::default()
        })];
        let mut a = ledger.admit(&b, &WHO, 10, None).unwrap();
        let mut c = ledger.admit(&b, &WHO, 10, None).unwrap();
        assert_eq!((a.room, c.room), (Some(90), Some(80)));
        let mut spent = (0, 0);
        let mut open = (true, true);
        while open.0 || open.1 {
            if open.0 {
                spent.0 += 7;
                open.0 = ledger.draw(&mut a, spent.0);
            }
            if open.1 {
                spent.1 += 7;
                open.1 = ledger.draw(&mut c, spent.1);
            }
        }
        let (i, o, _) = ledger.used(&b[0], &WHO);
        assert!(i + o >= 100, "drawn up to the line: {}", i + o);
        assert!(
            i + o < 100 + 2 * 7,
            "past it by at most one step a stream: {}",
            i + o
        );
        ledger.settle(&a, 10, spent.0);
        ledger.settle(&c, 10, spent.1);
        assert_eq!(ledger.used(&b[0], &WHO), (20, spent.0 + spent.1, 2));
        assert!(ledger.admit(&b, &WHO, 1, None).is_err());
    }

    #[test]
    fn a_reserved_answer_draws_only_past_its_reservation() {
        let ledger = Arc::new(Ledger::new(Arc::new(FakeClock(AtomicI64::new(0)))));
        let b = [budget(Limits {
            output_tokens: Some(50),
            ..Default::default()
        })];
        let mut r = ledger.admit(&b, &WHO, 5, Some(30)).unwrap();
        assert!(ledger.draw(&mut r, 30));
        assert_eq!(ledger.used(&b[0], &WHO).1, 30, "the reservation covered it");
        assert!(ledger.draw(&mut r, 45));
        assert!(!ledger.draw(&mut r, 50), "the line");
        ledger.settle(&r, 5, 50);
        assert_eq!(ledger.used(&b[0], &WHO), (5, 50, 1));
    }

    #[test]
    fn a_restarted_ledger_starts_from_the_stored_window() {
        let ledger = Arc::new(Ledger::new(Arc::new(FakeClock(AtomicI64::new(0)))));
        let b = budget(Limits {
            total_tokens: Some(100),
            ..Default::default()
        });
        let row = |pod: &str, model: &str| Spent {
            namespace: "ns".into(),
            pod: pod.into(),
            model: model.into(),
            input_tokens: 40,
            output_tokens: 50,
            requests: 3,
        };
        ledger.seed(&b, &[row("p", "m"), row("other", "m")]);
        assert_eq!(ledger.used(&b, &WHO), (40, 50, 3));
        let r = ledger
            .admit(std::slice::from_ref(&b), &WHO, 5, None)
            .unwrap();
        assert_eq!(r.room, Some(5));
        assert!(ledger
            .admit(std::slice::from_ref(&b), &WHO, 10, None)
            .is_err());
    }

    #[test]
    fn a_poisoned_ledger_still_refuses_what_is_spent() {
        let ledger = Arc::new(Ledger::new(Arc::new(FakeClock(AtomicI64::new(0)))));
        let b = [budget(Limits {
            requests: Some(1),
            ..Default::default()
        })];
        ledger.admit(&b, &WHO, 1, Some(1)).unwrap();
        let l = ledger.clone();
        let panicked = std::thread::spawn(move || {
            let _held = l.counts.lock().unwrap();
            panic!("a bug while the entries are held");
        })
        .join();
        assert!(panicked.is_err() && ledger.counts.is_poisoned());
        exhausted(ledger.admit(&b, &WHO, 1, Some(1)).unwrap_err());
        assert_eq!(ledger.used(&b[0], &WHO), (1, 1, 1));
    }
}
