//! Prometheus series, named after the OpenTelemetry GenAI semantic conventions where
//! one exists (`gen_ai_client_token_usage`, `gen_ai_client_operation_duration_seconds`,
//! `gen_ai_server_time_to_first_token_seconds`), and `kube_gateway_*` for the rest.
//!
//! Label sets are bounded: namespace and pod (one per gateway), outcome, rule and budget
//! names from the policy, and model names (bounded in [`super::labels`]). Gauges
//! (budgets, the store's queue) are set from [`super::Gauges`] before each scrape.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::labels::{operation, ModelLabels};
use super::Gauges;
use crate::record::UsageRecord;

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
struct Sourced {
    namespace: String,
    pod: String,
    gen_ai_token_type: &'static str,
    /// How the count was made: one of `TokenSource::ALL`'s names (bounded).
    source: &'static str,
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
/// registry).
pub(super) struct PromSeries {
    requests: Counter,
    rewrite: Option<Counter>,
    /// Only requests that reached the LLM count tokens and time.
    answered: Option<Answered>,
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

/// The gateway's Prometheus series.
pub(super) struct Prometheus {
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
    records_dropped: Family<Pod, Counter>,
    attached_pods: Family<Pod, Gauge>,
    connections_open: Family<Pod, Gauge>,
    tokens_by_source: Family<Sourced, Counter<u64, AtomicU64>>,
    connections_refused: Family<Pod, Counter>,
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

impl Prometheus {
    pub(super) fn new(namespace: &str, pod: &str) -> Self {
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
            records_dropped: Family::default(),
            attached_pods: Family::default(),
            connections_open: Family::default(),
            tokens_by_source: Family::default(),
            connections_refused: Family::default(),
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
        registry.register(
            "kube_gateway_tokens_by_source",
            "Tokens of requests that reached the LLM, by how they were counted (provider, content_events, calibrated, estimate)",
            m.tokens_by_source.clone(),
        );
        registry.register(
            "kube_gateway_connections_open",
            "Client connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "kube_gateway_connections_refused",
            "Client connections closed at accept because --max-connections were open",
            m.connections_refused.clone(),
        );
        registry.register(
            "kube_gateway_attached_pods",
            "Pods the node agent serves now (kube-gateway node)",
            m.attached_pods.clone(),
        );
        registry.register(
            "kube_gateway_usage_records_dropped",
            "Usage records dropped because the recorder's queue was full (they reach no sink)",
            m.records_dropped.clone(),
        );
        Self { registry, ..m }
    }

    /// The series of one kind of request (`labels` its bounded model names).
    pub(super) fn series(&self, r: &UsageRecord, labels: &ModelLabels) -> PromSeries {
        let requests = self.requests.get_or_create_owned(&Requests {
            namespace: r.workload.namespace.clone(),
            pod: r.workload.pod.clone(),
            outcome: r.outcome.as_str(),
            gen_ai_request_model: labels.requested.clone(),
        });
        let rewrite = labels.rewrite.then(|| {
            self.rewrites.get_or_create_owned(&Rewrite {
                namespace: r.workload.namespace.clone(),
                pod: r.workload.pod.clone(),
                from: labels.requested.clone(),
                to: labels.used.clone(),
            })
        });
        let answered = r
            .endpoint
            .filter(|_| r.outcome.reached_llm())
            .map(|endpoint| {
                let genai = GenAi {
                    namespace: r.workload.namespace.clone(),
                    pod: r.workload.pod.clone(),
                    gen_ai_operation_name: operation(endpoint),
                    gen_ai_provider_name: endpoint.dialect().as_str(),
                    // The model asked of the provider (after any rewrite), as the convention
                    // means.
                    gen_ai_request_model: labels.used.clone(),
                    gen_ai_response_model: labels.response.clone(),
                };
                let tokens = |kind| {
                    self.token_usage.get_or_create_owned(&Tokens {
                        genai: genai.clone(),
                        gen_ai_token_type: kind,
                    })
                };
                Answered {
                    input: tokens("input"),
                    output: tokens("output"),
                    duration: self.duration.get_or_create_owned(&genai),
                    ttft: self.ttft.get_or_create_owned(&genai),
                    cached: self.cached.get_or_create_owned(&genai),
                    reasoning: self.reasoning.get_or_create_owned(&genai),
                }
            });
        PromSeries {
            requests,
            rewrite,
            answered,
        }
    }

    /// Records a finished request in the series `s` of its kind.
    pub(super) fn record(&self, s: &PromSeries, r: &UsageRecord) {
        for rule in &r.rules {
            self.rule_hits
                .get_or_create(&Rule {
                    namespace: r.workload.namespace.clone(),
                    pod: r.workload.pod.clone(),
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
            for (kind, source, n) in [
                ("input", r.input_source, r.input_tokens),
                ("output", r.output_source, r.output_tokens),
            ] {
                if n > 0 {
                    self.tokens_by_source
                        .get_or_create(&Sourced {
                            namespace: r.workload.namespace.clone(),
                            pod: r.workload.pod.clone(),
                            gen_ai_token_type: kind,
                            source: source.as_str(),
                        })
                        .inc_by(n);
                }
            }
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

    /// A usage record was dropped (the recorder's queue was full).
    pub(super) fn connection_refused(&self) {
        self.connections_refused.get_or_create(&self.who).inc();
    }

    pub(super) fn record_dropped(&self) {
        self.records_dropped.get_or_create(&self.who).inc();
    }

    /// A connection arrived with an original destination.
    pub(super) fn captured(&self) {
        self.captured.get_or_create(&self.who).inc();
    }

    pub(super) fn netflushed(&self, n: u64) {
        self.netflushed.get_or_create(&self.who).inc_by(n);
    }

    /// Sets the gauges from what `live` reads now (before a scrape).
    pub(super) fn refresh(&self, live: &dyn Gauges) {
        for (budget, scope, measure, used, limit) in live.budgets() {
            self.budget(&budget, &scope, measure, used, limit);
        }
        self.attached_pods
            .get_or_create(&self.who)
            .set(i64::try_from(live.attached_pods()).unwrap_or(i64::MAX));
        self.connections_open
            .get_or_create(&self.who)
            .set(i64::try_from(live.open_connections()).unwrap_or(i64::MAX));
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
    pub(super) fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
