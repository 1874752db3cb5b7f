//! The budget ledger: what each budget window has used. Before a request, admission
//! checks every applicable budget and reserves the prompt's estimated tokens plus the
//! output it may still make; after, the reservation is settled with the exact usage.
//! In memory, per gateway (shared PostgreSQL leases come with their own module).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube_gateway_policy::budget::{Budget, Subject};

/// The time, injected so tests can move it.
pub trait Clock: Send + Sync {
    /// UTC milliseconds since the epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    input: u64,
    output: u64,
    requests: u64,
}

#[derive(Debug, Clone)]
struct Charge {
    key: String,
    window_start: i64,
}

/// What an admitted request holds in the ledger until it is settled.
#[derive(Debug, Clone, Default)]
pub struct Reservation {
    charges: Vec<Charge>,
    input: u64,
    output: u64,
    /// Output tokens the answer may make before the tightest budget is spent.
    pub room: Option<u64>,
}

/// A budget has no room for the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub budget: String,
    /// Seconds until the budget's window resets.
    pub retry_after: u64,
}

/// The in-memory ledger: per budget key, the counts of its current window only (a new
/// window replaces the old one, so the ledger never grows past its keys).
pub struct Ledger {
    clock: Arc<dyn Clock>,
    counts: Mutex<HashMap<String, (i64, Counts)>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

impl Reservation {
    /// The prompt tokens it was admitted with (the estimate).
    pub fn input_estimate(&self) -> u64 {
        self.input
    }
}

impl Ledger {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a request estimated at `input` prompt tokens that may generate up to
    /// `max_output` (if it says), or names the budget that has no room.
    pub fn admit(
        &self,
        budgets: &[Budget],
        who: &Subject<'_>,
        input: u64,
        max_output: Option<u64>,
    ) -> Result<Reservation, Exhausted> {
        let now = self.clock.now_ms();
        let Ok(mut counts) = self.counts.lock() else {
            return Ok(Reservation::default());
        };
        let mut room: Option<u64> = None;
        let mut charges = Vec::new();
        for b in budgets.iter().filter(|b| b.applies(who.model)) {
            let start = b.window.start(now);
            let key = b.key(who);
            let used = match counts.get(&key) {
                Some((s, c)) if *s == start => *c,
                _ => Counts::default(),
            };
            let l = &b.limits;
            let over = |limit: Option<u64>, used: u64, want: u64| {
                limit.is_some_and(|l| used.saturating_add(want) > l)
            };
            // Room for the prompt and at least one generated token.
            if over(l.requests, used.requests, 1)
                || over(l.input_tokens, used.input, input)
                || over(l.output_tokens, used.output, 1)
                || over(l.total_tokens, used.input + used.output, input + 1)
            {
                let end = b.window.end(now);
                return Err(Exhausted {
                    budget: b.name.clone(),
                    retry_after: u64::try_from((end - now + 999) / 1000).unwrap_or(1).max(1),
                });
            }
            let mut left = None::<u64>;
            if let Some(o) = l.output_tokens {
                left = Some(o - used.output);
            }
            if let Some(t) = l.total_tokens {
                let t_left = t - (used.input + used.output + input);
                left = Some(left.map_or(t_left, |x| x.min(t_left)));
            }
            if let Some(left) = left {
                room = Some(room.map_or(left, |r| r.min(left)));
            }
            charges.push(Charge {
                key,
                window_start: start,
            });
        }
        // Hold what the request may generate when it says; an open-ended request holds
        // nothing up front (holding the whole room would refuse its neighbours until it
        // settles): the cut on streams and the settlement keep it honest.
        let output = match (max_output, room) {
            (Some(m), Some(r)) => m.min(r),
            (Some(m), None) => m,
            (None, _) => 0,
        };
        for c in &charges {
            let slot = counts
                .entry(c.key.clone())
                .or_insert((c.window_start, Counts::default()));
            if slot.0 != c.window_start {
                *slot = (c.window_start, Counts::default());
            }
            slot.1.requests += 1;
            slot.1.input += input;
            slot.1.output += output;
        }
        Ok(Reservation {
            charges,
            input,
            output,
            room,
        })
    }

    /// Replaces a reservation's estimate with what the request really used.
    pub fn settle(&self, r: &Reservation, input: u64, output: u64) {
        let Ok(mut counts) = self.counts.lock() else {
            return;
        };
        for c in &r.charges {
            // A reservation from a window that has since ended settles nothing.
            if let Some((start, e)) = counts.get_mut(&c.key) {
                if *start == c.window_start {
                    e.input = e.input.saturating_sub(r.input).saturating_add(input);
                    e.output = e.output.saturating_sub(r.output).saturating_add(output);
                }
            }
        }
    }

    /// Used tokens and requests of a budget key in the window holding now.
    pub fn used(&self, budget: &Budget, who: &Subject<'_>) -> (u64, u64, u64) {
        let start = budget.window.start(self.clock.now_ms());
        self.counts
            .lock()
            .ok()
            .and_then(|c| c.get(&budget.key(who)).copied())
            .filter(|(s, _)| *s == start)
            .map_or((0, 0, 0), |(_, c)| (c.input, c.output, c.requests))
    }
}

/// One budget key's state, as `kube-gateway usage` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BudgetState {
    pub budget: String,
    pub scope: String,
    pub window: &'static str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub requests: u64,
    pub limit: String,
    /// When the window resets, UTC milliseconds.
    pub resets_at_ms: i64,
}

/// The state of `budget` for every scope that used it, from the stored usage of its
/// current window.
pub fn state(budget: &Budget, spent: &[crate::store::Spent], now_ms: i64) -> Vec<BudgetState> {
    let mut by_key: HashMap<String, (u64, u64, u64)> = HashMap::new();
    for s in spent.iter().filter(|s| budget.applies(&s.model)) {
        let who = Subject {
            namespace: &s.namespace,
            pod: &s.pod,
            model: &s.model,
        };
        let e = by_key.entry(budget.key(&who)).or_default();
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        e.0 += n(s.input_tokens);
        e.1 += n(s.output_tokens);
        e.2 += n(s.requests);
    }
    let l = &budget.limits;
    let limit = [
        ("total", l.total_tokens),
        ("input", l.input_tokens),
        ("output", l.output_tokens),
        ("requests", l.requests),
    ]
    .iter()
    .filter_map(|(n, v)| v.map(|v| format!("{n} {v}")))
    .collect::<Vec<_>>()
    .join(", ");
    let mut out: Vec<BudgetState> = by_key
        .into_iter()
        .map(|(key, (input, output, requests))| BudgetState {
            budget: budget.name.clone(),
            scope: key.rsplit('|').next().unwrap_or_default().to_owned(),
            window: budget.window.name(),
            input_tokens: input,
            output_tokens: output,
            requests,
            limit: limit.clone(),
            resets_at_ms: budget.window.end(now_ms),
        })
        .collect();
    out.sort_by(|a, b| a.scope.cmp(&b.scope));
    out
}

/// Budget states as an aligned table.
pub fn render(states: &[BudgetState]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from("\n");
    let _ = writeln!(
        s,
        "{:<20} {:<32} {:<7} {:>9} {:>9} {:>8}  {:<28} RESETS AT (UTC)",
        "BUDGET", "SCOPE", "WINDOW", "INPUT", "OUTPUT", "REQUESTS", "LIMIT"
    );
    for b in states {
        let _ = writeln!(
            s,
            "{:<20} {:<32} {:<7} {:>9} {:>9} {:>8}  {:<28} {}",
            b.budget,
            b.scope,
            b.window,
            b.input_tokens,
            b.output_tokens,
            b.requests,
            b.limit,
            kube_gateway_policy::budget::utc_minute(b.resets_at_ms)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
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
        }
    }

    const WHO: Subject<'static> = Subject {
        namespace: "ns",
        pod: "p",
        model: "m",
    };

    #[test]
    fn admits_until_spent_then_names_the_budget_and_the_reset() {
        // 15 s into a minute (1_000_000_020_000 is minute-aligned).
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000_020_000 + 15_000)));
        let ledger = Ledger::new(clock.clone());
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
        let e = ledger.admit(&b, &WHO, 1, None).unwrap_err();
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
            ledger.counts.lock().unwrap().len(),
            1,
            "one entry per key, whatever the windows"
        );
    }

    #[test]
    fn open_ended_requests_do_not_hold_the_whole_room() {
        let ledger = Ledger::new(Arc::new(FakeClock(AtomicI64::new(0))));
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
    fn state_sums_stored_usage_per_scope_key() {
        let spent = |ns: &str, pod: &str, model: &str, i, o, r| crate::store::Spent {
            namespace: ns.into(),
            pod: pod.into(),
            model: model.into(),
            input_tokens: i,
            output_tokens: o,
            requests: r,
        };
        let rows = [
            spent("a", "p1", "m1", 1, 10, 1),
            spent("a", "p2", "m1", 2, 20, 2),
            spent("b", "p3", "m2", 4, 40, 4),
        ];
        let b = Budget {
            scope: Scope::Namespace,
            ..budget(Limits {
                total_tokens: Some(100),
                ..Default::default()
            })
        };
        let st = state(&b, &rows, 0);
        assert_eq!(st.len(), 2);
        assert_eq!(
            (
                st[0].scope.as_str(),
                st[0].input_tokens,
                st[0].output_tokens,
                st[0].requests
            ),
            ("namespace/a", 3, 30, 3)
        );
        assert_eq!(st[0].limit, "total 100");
        assert_eq!(st[0].resets_at_ms, 60_000);
        let only_m2 = Budget {
            models: vec![kube_gateway_policy::ModelPattern::new("m2").unwrap()],
            ..b
        };
        assert_eq!(state(&only_m2, &rows, 0).len(), 1);
        assert!(render(&st).contains("namespace/a"));
    }

    #[test]
    fn the_tightest_budget_wins_and_requests_count() {
        let ledger = Ledger::new(Arc::new(FakeClock(AtomicI64::new(0))));
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
        assert_eq!(ledger.admit(&b, &WHO, 1, None).unwrap_err().budget, "req");
    }
}
