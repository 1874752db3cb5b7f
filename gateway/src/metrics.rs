//! Prometheus metrics, named after the OpenTelemetry GenAI semantic conventions where
//! one exists (`gen_ai_client_token_usage`, `gen_ai_client_operation_duration_seconds`,
//! `gen_ai_server_time_to_first_token_seconds`), and `kube_gateway_*` for the rest; when
//! OTLP export is on, every measurement also goes to the same instruments over OTLP
//! (`crate::otel`).
//!
//! Recorded by the usage recorder from finished records, off the request path, so the
//! numbers are the ones the usage store gets. Label sets are bounded: namespace and pod
//! (one per gateway), outcome, rule and budget names from the policy, and model names,
//! which come from the workload and the LLM: the first [`MAX_MODEL_LABELS`] distinct
//! ones are labels, later ones count under [`OTHER_MODELS`]. No label ever holds prompt
//! text or a request id. Gauges (budgets, the store's queue)
//! are read when collected, from a [`LiveState`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::budget::Ledger;
use crate::otel::Otel;
use crate::policy::PolicyStore;
use crate::store::writer::WriterStats;
use crate::usage::{Outcome, UsageRecord};

/// What the gauges read when they are collected (a scrape, an OTLP export): the budget
/// ledger under the policy in force, and the usage writer's state when there is a store.
#[derive(Clone)]
pub struct LiveState {
    pub policy: Arc<PolicyStore>,
    pub ledger: Arc<Ledger>,
    /// Weak: the writer ends (at shutdown) when the last sender is gone, and a reader of
    /// gauges must not be one.
    pub store: Option<(
        Arc<WriterStats>,
        tokio::sync::mpsc::WeakSender<Arc<UsageRecord>>,
    )>,
}

/// One budget's gauges: name, scope, what it counts, used and limit in its window.
pub type BudgetReading = (String, String, &'static str, u64, u64);

impl LiveState {
    pub fn budgets(&self) -> Vec<BudgetReading> {
        self.ledger.gauges(&self.policy.current().budgets)
    }

    /// Records waiting for the writer, and rows spooled and not yet replayed.
    pub fn store(&self) -> Option<(usize, usize)> {
        let (stats, tx) = self.store.as_ref()?;
        let spooled = stats.spooled.load(std::sync::atomic::Ordering::Relaxed);
        let replayed = stats.replayed.load(std::sync::atomic::Ordering::Relaxed);
        let depth = tx
            .upgrade()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity());
        Some((
            depth,
            usize::try_from(spooled.saturating_sub(replayed)).unwrap_or(usize::MAX),
        ))
    }
}

/// Distinct model names a gateway shows as label values. A workload chooses the model
/// names it sends, so without a bound one sending a new name per request would grow the
/// exposition (and a Prometheus server) without end.
pub const MAX_MODEL_LABELS: usize = 64;

/// The label value of every model name past the first [`MAX_MODEL_LABELS`]; also the
/// model of a model-scoped budget's shared count ([`crate::budget::MAX_MODEL_KEYS`]).
pub const OTHER_MODELS: &str = "(other)";

/// The model names shown so far; the first to arrive keep their own label for good.
#[derive(Default)]
struct ModelNames(Mutex<HashSet<String>>);

impl ModelNames {
    /// A record's model names as labels: names already shown keep theirs, new ones get
    /// one while there is room.
    fn labels(&self, r: &UsageRecord) -> ModelLabels {
        let used = r.used_model.as_deref().unwrap_or_default();
        // A rewrite is told by the names, not by their labels (two names past the bound
        // are both `OTHER_MODELS`); from "" when the request named none.
        let rewrite = !used.is_empty() && r.requested_model.as_deref() != Some(used);
        let mut seen = self.0.lock().ok();
        let mut label = |name: Option<&str>| -> String {
            let name = name.unwrap_or_default();
            match seen.as_mut() {
                Some(seen) if seen.contains(name) || seen.len() < MAX_MODEL_LABELS => {
                    seen.insert(name.to_owned());
                    name.to_owned()
                }
                _ => OTHER_MODELS.to_owned(),
            }
        };
        ModelLabels {
            requested: label(r.requested_model.as_deref()),
            used: label(Some(used)),
            response: label(r.response_model.as_deref()),
            rewrite,
        }
    }
}

/// A record's model names as metric labels (bounded).
pub struct ModelLabels {
    pub requested: String,
    pub used: String,
    pub response: String,
    /// The model used is not the one asked for.
    pub rewrite: bool,
}

/// Every GenAI series carries these (the convention's attribute names, dots as `_`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenAi {
    namespace: String,
    pod: String,
    gen_ai_operation_name: &'static str,
    gen_ai_provider_name: &'static str,
    gen_ai_request_model: String,
    gen_ai_response_model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Tokens {
    #[prometheus(flatten)]
    genai: GenAi,
    /// `input` or `output` only, as the convention says.
    gen_ai_token_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Requests {
    namespace: String,
    pod: String,
    outcome: &'static str,
    gen_ai_request_model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rule {
    namespace: String,
    pod: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rewrite {
    namespace: String,
    pod: String,
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pod {
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    namespace: String,
    pod: String,
    budget: String,
    scope: String,
    /// What the limit counts: total_tokens, input_tokens, output_tokens, requests.
    measure: &'static str,
}

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

/// Handles to the series of one kind of request (they share their values with the
/// registry), and its OpenTelemetry attributes when OTLP is on.
struct Series {
    endpoint: &'static str,
    api: &'static str,
    outcome: Outcome,
    requested: Option<String>,
    used: Option<String>,
    response: Option<String>,
    requests: Counter,
    rewrite: Option<Counter>,
    /// Only requests that reached the LLM count tokens and time.
    answered: Option<Answered>,
    otel: Option<crate::otel::SeriesAttributes>,
}

#[derive(Clone)]
struct Answered {
    input: Histogram,
    output: Histogram,
    duration: Histogram,
    ttft: Histogram,
    cached: Counter,
    reasoning: Counter,
}

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    who: Pod,
    token_usage: Hist<Tokens>,
    duration: Hist<GenAi>,
    ttft: Hist<GenAi>,
    cached: Family<GenAi, Counter>,
    reasoning: Family<GenAi, Counter>,
    requests: Family<Requests, Counter>,
    rule_hits: Family<Rule, Counter>,
    rewrites: Family<Rewrite, Counter>,
    budget_used: Family<BudgetLabels, Gauge>,
    budget_limit: Family<BudgetLabels, Gauge>,
    queue_depth: Family<Pod, Gauge>,
    spool_rows: Family<Pod, Gauge<i64, AtomicI64>>,
    captured: Family<Pod, Counter>,
    netflushed: Family<Pod, Counter<u64, AtomicU64>>,
    cache: std::sync::Mutex<Vec<Arc<Series>>>,
    models: ModelNames,
    /// The OTLP exporter, when on: every measurement goes there too.
    otel: Option<Arc<Otel>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The convention's advised buckets (shared with the OTLP instruments).
pub const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
pub const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
pub const TTFT_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

fn token_buckets() -> Histogram {
    Histogram::new(TOKEN_BUCKETS)
}

fn duration_buckets() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn ttft_buckets() -> Histogram {
    Histogram::new(TTFT_BUCKETS)
}

/// The OpenTelemetry operation name of an endpoint.
pub fn operation(endpoint: &str) -> &'static str {
    match endpoint {
        "chat" | "chat_completions" | "responses" => "chat",
        "completions" | "generate" => "text_completion",
        "embeddings" | "embed" | "embeddings_legacy" => "embeddings",
        _ => "other",
    }
}

/// Whether a request of this outcome reached the LLM: only those count tokens and time.
pub fn reached_llm(o: Outcome) -> bool {
    !matches!(o, Outcome::Denied | Outcome::Rejected | Outcome::Unparsed)
}

pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Allowed => "allowed",
        Outcome::Unparsed => "unparsed",
        Outcome::Rejected => "rejected",
        Outcome::UpstreamError => "upstream_error",
        Outcome::Denied => "denied",
        Outcome::Redacted => "redacted",
        Outcome::Blocked => "blocked",
        Outcome::BudgetCut => "budget_cut",
        Outcome::ClientCancelled => "client_cancelled",
    }
}

impl Metrics {
    pub fn new(namespace: &str, pod: &str, otel: Option<Arc<Otel>>) -> Arc<Self> {
        let mut registry = Registry::default();
        let token_usage: Hist<Tokens> = Family::new_with_constructor(token_buckets);
        let duration: Hist<GenAi> = Family::new_with_constructor(duration_buckets);
        let ttft: Hist<GenAi> = Family::new_with_constructor(ttft_buckets);
        let m = Self {
            who: Pod {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
            },
            token_usage,
            duration,
            ttft,
            cached: Family::default(),
            reasoning: Family::default(),
            requests: Family::default(),
            rule_hits: Family::default(),
            rewrites: Family::default(),
            budget_used: Family::default(),
            budget_limit: Family::default(),
            queue_depth: Family::default(),
            spool_rows: Family::default(),
            captured: Family::default(),
            netflushed: Family::default(),
            cache: std::sync::Mutex::new(Vec::new()),
            models: ModelNames::default(),
            otel,
            registry: Registry::default(),
        };
        // First in the exposition, and counted last by `record`: a scrape that counts a
        // request then also reads its tokens, rule hits and rewrites.
        registry.register(
            "kube_gateway_requests",
            "Requests on recognized LLM paths, by outcome",
            m.requests.clone(),
        );
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens used per request (input or output), as the provider counted them or the gateway estimated",
            m.token_usage.clone(),
        );
        registry.register(
            "gen_ai_client_operation_duration_seconds",
            "Time from the request to the end of its answer",
            m.duration.clone(),
        );
        registry.register(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the request to the first chunk of its answer",
            m.ttft.clone(),
        );
        registry.register(
            "kube_gateway_cached_tokens",
            "Input tokens the provider served from its cache",
            m.cached.clone(),
        );
        registry.register(
            "kube_gateway_reasoning_tokens",
            "Output tokens the provider spent on reasoning",
            m.reasoning.clone(),
        );
        registry.register(
            "kube_gateway_rule_hits",
            "Policy rules (and budgets) that acted on a request",
            m.rule_hits.clone(),
        );
        registry.register(
            "kube_gateway_model_rewrites",
            "Requests whose model the gateway changed, from -> to",
            m.rewrites.clone(),
        );
        registry.register(
            "kube_gateway_budget_used",
            "What each budget has used of its current window (this gateway's view)",
            m.budget_used.clone(),
        );
        registry.register(
            "kube_gateway_budget_limit",
            "Each budget's limit per window",
            m.budget_limit.clone(),
        );
        registry.register(
            "kube_gateway_store_queue_depth",
            "Usage records waiting for the store writer",
            m.queue_depth.clone(),
        );
        registry.register(
            "kube_gateway_spool_rows",
            "Usage rows spooled locally while the store is away",
            m.spool_rows.clone(),
        );
        registry.register(
            "kube_gateway_connections_captured",
            "Connections the gateway received with an original destination (transparent mode)",
            m.captured.clone(),
        );
        registry.register(
            "kube_gateway_netflush_destroyed",
            "Workload connections destroyed by netflush so they reconnect through the gateway",
            m.netflushed.clone(),
        );
        Arc::new(Self { registry, ..m })
    }

    /// The series a request of this kind lands in, resolved once and kept: resolving
    /// means cloning and hashing every label (measured: ~7 µs a request on this
    /// machine's recorder, against well under one with the handles kept).
    fn series(&self, r: &UsageRecord) -> Arc<Series> {
        let same = |s: &Series| {
            s.endpoint == r.endpoint
                && s.api == r.api
                && s.outcome == r.outcome
                && s.requested.as_deref() == r.requested_model.as_deref()
                && s.used.as_deref() == r.used_model.as_deref()
                && s.response.as_deref() == r.response_model.as_deref()
        };
        let Ok(mut cache) = self.cache.lock() else {
            return Arc::new(self.resolve(r));
        };
        if let Some(s) = cache.iter().find(|s| same(s)) {
            return s.clone();
        }
        let s = Arc::new(self.resolve(r));
        // Models x outcomes x endpoints can still be many: start over rather than grow.
        if cache.len() >= 256 {
            cache.clear();
        }
        cache.push(s.clone());
        s
    }

    fn resolve(&self, r: &UsageRecord) -> Series {
        let labels = self.models.labels(r);
        let requests = self.requests.get_or_create_owned(&Requests {
            namespace: self.who.namespace.clone(),
            pod: self.who.pod.clone(),
            outcome: outcome_name(r.outcome),
            gen_ai_request_model: labels.requested.clone(),
        });
        let rewrite = labels.rewrite.then(|| {
            self.rewrites.get_or_create_owned(&Rewrite {
                namespace: self.who.namespace.clone(),
                pod: self.who.pod.clone(),
                from: labels.requested.clone(),
                to: labels.used.clone(),
            })
        });
        let answered = reached_llm(r.outcome);
        let genai = GenAi {
            namespace: self.who.namespace.clone(),
            pod: self.who.pod.clone(),
            gen_ai_operation_name: operation(r.endpoint),
            gen_ai_provider_name: r.api,
            // The model asked of the provider (after any rewrite), as the convention means.
            gen_ai_request_model: labels.used.clone(),
            gen_ai_response_model: labels.response.clone(),
        };
        let tokens = |kind| {
            self.token_usage.get_or_create_owned(&Tokens {
                genai: genai.clone(),
                gen_ai_token_type: kind,
            })
        };
        Series {
            endpoint: r.endpoint,
            api: r.api,
            outcome: r.outcome,
            requested: r.requested_model.clone(),
            used: r.used_model.clone(),
            response: r.response_model.clone(),
            requests,
            rewrite,
            answered: answered.then(|| Answered {
                input: tokens("input"),
                output: tokens("output"),
                duration: self.duration.get_or_create_owned(&genai),
                ttft: self.ttft.get_or_create_owned(&genai),
                cached: self.cached.get_or_create_owned(&genai),
                reasoning: self.reasoning.get_or_create_owned(&genai),
            }),
            otel: self.otel.as_ref().map(|o| o.attributes(r, &labels)),
        }
    }

    /// Records a finished request (from the usage recorder), and with OTLP on its span.
    pub fn record(&self, r: &UsageRecord) {
        if r.endpoint == "other" {
            return;
        }
        let s = self.series(r);
        if let (Some(o), Some(a)) = (&self.otel, &s.otel) {
            o.measure(a, r);
            o.span(a, r);
        }
        for rule in &r.rules {
            self.rule_hits
                .get_or_create(&Rule {
                    namespace: self.who.namespace.clone(),
                    pod: self.who.pod.clone(),
                    rule: rule.clone(),
                })
                .inc();
        }
        if let Some(c) = &s.rewrite {
            c.inc();
        }
        if let Some(a) = &s.answered {
            a.input.observe(r.input_tokens as f64);
            a.output.observe(r.output_tokens as f64);
            a.duration.observe(r.latency.as_secs_f64());
            if let Some(t) = r.first_chunk {
                a.ttft.observe(t.as_secs_f64());
            }
            if let Some(c) = r.cached_tokens.filter(|c| *c > 0) {
                a.cached.inc_by(c);
            }
            if let Some(c) = r.reasoning_tokens.filter(|c| *c > 0) {
                a.reasoning.inc_by(c);
            }
        }
        // Last (and first in the exposition): a scrape can fall between these updates.
        s.requests.inc();
    }

    /// A connection arrived with an original destination.
    pub fn captured(&self) {
        self.captured.get_or_create(&self.who).inc();
        if let Some(o) = &self.otel {
            o.captured();
        }
    }

    pub fn netflushed(&self, n: u64) {
        self.netflushed.get_or_create(&self.who).inc_by(n);
        if let Some(o) = &self.otel {
            o.netflushed(n);
        }
    }

    /// Sets the gauges from what `live` reads now (before a scrape).
    pub fn refresh(&self, live: &LiveState) {
        for (budget, scope, measure, used, limit) in live.budgets() {
            self.budget(&budget, &scope, measure, used, limit);
        }
        if let Some((depth, spooled)) = live.store() {
            self.store_state(depth, spooled);
        }
    }

    /// Sets a budget's used and limit gauges.
    fn budget(&self, budget: &str, scope: &str, measure: &'static str, used: u64, limit: u64) {
        let labels = BudgetLabels {
            namespace: self.who.namespace.clone(),
            pod: self.who.pod.clone(),
            budget: budget.to_owned(),
            scope: scope.to_owned(),
            measure,
        };
        self.budget_used
            .get_or_create(&labels)
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        self.budget_limit
            .get_or_create(&labels)
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    fn store_state(&self, queue_depth: usize, spool_rows: usize) {
        self.queue_depth
            .get_or_create(&self.who)
            .set(i64::try_from(queue_depth).unwrap_or(i64::MAX));
        self.spool_rows
            .get_or_create(&self.who)
            .set(i64::try_from(spool_rows).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_follow_the_convention() {
        assert_eq!(operation("chat_completions"), "chat");
        assert_eq!(operation("generate"), "text_completion");
        assert_eq!(operation("embed"), "embeddings");
    }

    fn record(outcome: Outcome, rules: &[&str]) -> UsageRecord {
        UsageRecord {
            request_id: "kgw-x-1".into(),
            time: std::time::SystemTime::UNIX_EPOCH,
            peer: "10.0.0.7:41000".parse().unwrap(),
            destination: "10.0.0.9:11434".into(),
            api: "ollama",
            endpoint: "chat",
            method: "POST".into(),
            path: "/api/chat".into(),
            requested_model: Some("llama3".into()),
            used_model: Some("gemma2:2b".into()),
            response_model: Some("gemma2:2b".into()),
            status: 200,
            outcome,
            input_tokens: 12,
            input_source: crate::TokenSource::Provider,
            output_tokens: 30,
            output_source: crate::TokenSource::Provider,
            cached_tokens: Some(4),
            reasoning_tokens: None,
            finish_reason: Some("stop".into()),
            streamed: true,
            latency: std::time::Duration::from_millis(250),
            first_chunk: Some(std::time::Duration::from_millis(30)),
            bytes_in: 100,
            bytes_out: 200,
            error: None,
            rules: rules.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    #[test]
    fn a_request_shows_in_every_series_it_belongs_to() {
        let m = Metrics::new("ns", "pod", None);
        m.record(&record(Outcome::Redacted, &["emails"]));
        m.record(&record(Outcome::Denied, &["no-jailbreak"]));
        m.captured();
        let text = m.encode();
        let genai = r#"namespace="ns",pod="pod",gen_ai_operation_name="chat",gen_ai_provider_name="ollama",gen_ai_request_model="gemma2:2b",gen_ai_response_model="gemma2:2b""#;
        for line in [
            format!("gen_ai_client_token_usage_sum{{{genai},gen_ai_token_type=\"input\"}} 12.0"),
            format!("gen_ai_client_token_usage_sum{{{genai},gen_ai_token_type=\"output\"}} 30.0"),
            format!("gen_ai_client_operation_duration_seconds_count{{{genai}}} 1"),
            format!("gen_ai_server_time_to_first_token_seconds_sum{{{genai}}} 0.03"),
            format!("kube_gateway_cached_tokens_total{{{genai}}} 4"),
            r#"kube_gateway_requests_total{namespace="ns",pod="pod",outcome="redacted",gen_ai_request_model="llama3"} 1"#.into(),
            r#"kube_gateway_requests_total{namespace="ns",pod="pod",outcome="denied",gen_ai_request_model="llama3"} 1"#.into(),
            r#"kube_gateway_rule_hits_total{namespace="ns",pod="pod",rule="emails"} 1"#.into(),
            r#"kube_gateway_model_rewrites_total{namespace="ns",pod="pod",from="llama3",to="gemma2:2b"} 2"#.into(),
            r#"kube_gateway_connections_captured_total{namespace="ns",pod="pod"} 1"#.into(),
        ] {
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("kgw-x-1"), "no request id in a label");
    }

    /// The sum of a family's samples named `name` (all label sets).
    fn total(text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    #[test]
    fn a_scrape_that_counts_a_request_holds_its_tokens() {
        // Each scrape meets records in flight: the requests counter must never run
        // ahead of the series the same records update.
        let m = Metrics::new("ns", "pod", None);
        let writer = {
            let m = m.clone();
            std::thread::spawn(move || {
                let r = record(Outcome::Redacted, &["emails"]);
                for _ in 0..20_000 {
                    m.record(&r);
                }
            })
        };
        let mut scrapes = 0;
        loop {
            let done = writer.is_finished();
            let text = m.encode();
            let requests = total(&text, "kube_gateway_requests_total");
            for series in [
                "gen_ai_client_token_usage_count",
                "kube_gateway_rule_hits_total",
                "kube_gateway_model_rewrites_total",
            ] {
                // Token usage has an input and an output sample per request.
                let per = if series.starts_with("gen_ai") {
                    2.0
                } else {
                    1.0
                };
                assert!(
                    total(&text, series) >= requests * per,
                    "{series} behind {requests} requests in scrape {scrapes}"
                );
            }
            scrapes += 1;
            if done {
                assert_eq!(requests, 20_000.0);
                break;
            }
        }
        writer.join().unwrap();
    }

    #[test]
    fn model_names_past_the_bound_count_under_other_and_no_token_is_lost() {
        let m = Metrics::new("ns", "pod", None);
        let mut r = record(Outcome::Allowed, &[]);
        let n = MAX_MODEL_LABELS + 10;
        for i in 0..n {
            let name = format!("model-{i}");
            r.requested_model = Some(name.clone());
            r.used_model = Some(name.clone());
            r.response_model = Some(name);
            m.record(&r);
        }
        // A name that had its label keeps it after the bound is reached.
        r.requested_model = Some("model-0".into());
        r.used_model = Some("model-0".into());
        r.response_model = Some("model-0".into());
        m.record(&r);
        let text = m.encode();
        let models: HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("gen_ai_client_token_usage_count{"))
            .filter_map(|l| l.split("gen_ai_request_model=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(models.len(), MAX_MODEL_LABELS + 1, "{models:?}");
        assert!(models.contains(OTHER_MODELS) && models.contains("model-0"));
        assert!(!models.contains(format!("model-{}", n - 1).as_str()));
        let other = format!(
            r#"kube_gateway_requests_total{{namespace="ns",pod="pod",outcome="allowed",gen_ai_request_model="{OTHER_MODELS}"}} 10"#
        );
        assert!(text.contains(&other), "{other} missing:\n{text}");
        assert_eq!(total(&text, "kube_gateway_requests_total"), (n + 1) as f64);
        assert_eq!(
            total(&text, "gen_ai_client_token_usage_sum"),
            ((n + 1) * (12 + 30)) as f64,
            "every token counted somewhere"
        );
        // Names that differ are a rewrite even when both are past the bound.
        r.requested_model = Some("late-a".into());
        r.used_model = Some("late-b".into());
        m.record(&r);
        assert!(m.encode().contains(&format!(
            r#"kube_gateway_model_rewrites_total{{namespace="ns",pod="pod",from="{OTHER_MODELS}",to="{OTHER_MODELS}"}} 1"#
        )));
    }
}
