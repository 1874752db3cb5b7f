//! Budgets as stored usage shows them: what a restarted gateway seeds its ledger from,
//! and what `kube-gateway usage` reports.

use std::collections::HashMap;

use kube_gateway_policy::budget::{Budget, Subject};

/// Admitted usage per namespace, pod and model since a time: what budgets count (the
/// store's budget query answers with these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spent {
    pub namespace: String,
    pub pod: String,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub requests: i64,
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
pub fn state(budget: &Budget, spent: &[Spent], now_ms: i64) -> Vec<BudgetState> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube_gateway_policy::budget::{Limits, Scope, Window};

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

    #[test]
    fn state_sums_stored_usage_per_scope_key() {
        let spent = |ns: &str, pod: &str, model: &str, i, o, r| Spent {
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
    }
}
