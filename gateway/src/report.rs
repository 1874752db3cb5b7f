//! `kube-gateway usage`: usage totals and budget states read from the store, rendered
//! as an aligned table, CSV or JSON.

use std::fmt::Write as _;

use kube_gateway_policy::Policy;

use crate::budget::{state, BudgetState};
use crate::cli::UsageArgs;
use crate::store::{BadStoreUrl, Store, StoreError, StoreUrl, UsageTotal};

/// The report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Url(#[from] BadStoreUrl),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("cannot render JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Reads the last `args.hours` of usage (and, with a policy, its budgets' windows) and
/// renders them as the arguments ask.
pub fn usage(args: &UsageArgs, policy: Option<&Policy>) -> Result<String, ReportError> {
    let url: StoreUrl = args.store.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (totals, budgets) = rt.block_on(async {
        let store = Store::connect(&url).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let from = now - i64::try_from(args.hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
        let totals = store.totals(from, now + 1).await?;
        let mut budgets = Vec::new();
        for b in policy.iter().flat_map(|p| p.budgets.iter()) {
            let spent = store.spent_since(b.window.start(now)).await?;
            budgets.extend(state(b, &spent, now));
        }
        Ok::<_, StoreError>((totals, budgets))
    })?;
    let mut out = if args.json {
        serde_json::to_string_pretty(&totals)? + "\n"
    } else if args.csv {
        render_csv(&totals)
    } else {
        render_table(&totals)
    };
    if !budgets.is_empty() {
        out += &if args.json {
            serde_json::to_string_pretty(&budgets)? + "\n"
        } else {
            render_budgets(&budgets)
        };
    }
    Ok(out)
}

/// Renders totals as an aligned table, with a total line.
fn render_table(totals: &[UsageTotal]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<20} {:<28} {:<24} {:>9} {:>12} {:>12}",
        "NAMESPACE", "POD", "MODEL", "REQUESTS", "INPUT", "OUTPUT"
    );
    for t in totals {
        let _ = writeln!(
            s,
            "{:<20} {:<28} {:<24} {:>9} {:>12} {:>12}",
            t.namespace, t.pod, t.model, t.requests, t.input_tokens, t.output_tokens
        );
    }
    let sum = |f: fn(&UsageTotal) -> i64| totals.iter().map(f).sum::<i64>();
    let _ = writeln!(
        s,
        "{:<20} {:<28} {:<24} {:>9} {:>12} {:>12}",
        "TOTAL",
        "",
        "",
        sum(|t| t.requests),
        sum(|t| t.input_tokens),
        sum(|t| t.output_tokens)
    );
    s
}

/// Renders totals as CSV with a header line.
fn render_csv(totals: &[UsageTotal]) -> String {
    let quote = |v: &str| {
        if v.contains([',', '"', '\n']) {
            format!("\"{}\"", v.replace('"', "\"\""))
        } else {
            v.to_owned()
        }
    };
    let mut s = String::from("namespace,pod,model,requests,input_tokens,output_tokens\n");
    for t in totals {
        s.push_str(&format!(
            "{},{},{},{},{},{}\n",
            quote(&t.namespace),
            quote(&t.pod),
            quote(&t.model),
            t.requests,
            t.input_tokens,
            t.output_tokens
        ));
    }
    s
}

/// Budget states as an aligned table.
fn render_budgets(states: &[BudgetState]) -> String {
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

    #[test]
    fn tables_total_and_csv_quotes() {
        let t = |pod: &str, r, i, o| UsageTotal {
            namespace: "ns".into(),
            pod: pod.into(),
            model: "m".into(),
            requests: r,
            input_tokens: i,
            output_tokens: o,
        };
        let rows = [t("a", 1, 10, 20), t("b,c", 2, 5, 5)];
        let table = render_table(&rows);
        assert!(table
            .lines()
            .last()
            .unwrap()
            .split_whitespace()
            .eq(["TOTAL", "3", "15", "25"]));
        assert!(render_csv(&rows).contains("ns,\"b,c\",m,2,5,5\n"));
    }

    #[test]
    fn budget_states_render_their_scope_and_limit() {
        let s = BudgetState {
            budget: "b".into(),
            scope: "namespace/a".into(),
            window: "minute",
            input_tokens: 3,
            output_tokens: 30,
            requests: 3,
            limit: "total 100".into(),
            resets_at_ms: 60_000,
        };
        let out = render_budgets(&[s]);
        assert!(
            out.contains("namespace/a") && out.contains("total 100"),
            "{out}"
        );
    }
}
