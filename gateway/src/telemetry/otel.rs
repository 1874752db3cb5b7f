//! OpenTelemetry export: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard OTLP
//! variables apply: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `..._METRICS_ENDPOINT`,
//! headers, timeout, `OTEL_METRIC_EXPORT_INTERVAL`), over OTLP/HTTP:
//! - one span per LLM request, with the GenAI semantic conventions' attributes and a
//!   `gen_ai.guardrail.rule` event per policy rule that acted;
//! - the metrics the admin endpoint exposes, as OpenTelemetry instruments under the
//!   names they come from (`gen_ai.client.token.usage`, `kube_gateway.requests`, ...),
//!   the same attributes as the Prometheus labels but namespace and pod, which are
//!   resource attributes (`k8s.namespace.name`, `k8s.pod.name`).
//!
//! `OTEL_TRACES_EXPORTER=none` or `OTEL_METRICS_EXPORTER=none` turns one of the two off;
//! `OTEL_TRACES_SAMPLER` (and `_ARG`) samples spans, `OTEL_BSP_*` sizes their batches.
//! Built from the same finished records as the usage store, by the recorder, off the
//! request path; the exporters send from threads of their own. No prompt or completion
//! text. Metrics go through the SDK and the OTLP crate. Spans do not: a span per request
//! through the SDK's tracer, batch processor and the OTLP crate's conversion cost several
//! times what writing its protobuf does ([`protobuf`], [`span_export`]); the SDK still
//! picks the ids and the sampling decision.

use std::sync::Arc;

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _, ObservableGauge};
use opentelemetry::trace::{SamplingDecision, SpanKind};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Config as TraceConfig, IdGenerator, ShouldSample};
use opentelemetry_sdk::Resource;

use super::labels::{operation, ModelLabels};
use super::{Gauges, DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS};
use crate::api::Endpoint;
use crate::record::{Outcome, UsageRecord};

mod protobuf;
mod span_export;

use protobuf::{Attr, SpanFields};
use span_export::{SpanQueue, SpanTarget};

/// The environment variable that turns the export on.
pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The OTLP export could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct OtelError(String);

/// The span and metric exporters of this gateway.
pub struct Otel {
    /// The namespace and pod on the resource (`run`: the one it serves; `node`: none).
    resource_pod: (String, String),
    /// Spans, unless `OTEL_TRACES_EXPORTER=none`.
    traces: Option<Traces>,
    /// Metrics, unless `OTEL_METRICS_EXPORTER=none`.
    metrics: Option<(Instruments, SdkMeterProvider)>,
}

/// A request's span runs from its arrival to the end of its answer. Guardrail events are
/// stamped at the end: by then every rule that acted has.
fn span_window(r: &UsageRecord) -> (std::time::SystemTime, std::time::SystemTime) {
    (r.started_at, r.ended_at())
}

/// Whether the standard `OTEL_{TRACES,METRICS}_EXPORTER` variable `var` asks for the
/// OTLP export (`otlp`, the default) or none (`none`); any other exporter is an error.
fn exporter_wanted(var: &str) -> Result<bool, OtelError> {
    exporter_choice(var, std::env::var(var).ok().as_deref())
}

fn exporter_choice(var: &str, value: Option<&str>) -> Result<bool, OtelError> {
    match value.map(str::trim) {
        None | Some("") | Some("otlp") => Ok(true),
        Some("none") => Ok(false),
        Some(other) => Err(OtelError(format!(
            "{var}={other}: only otlp and none are supported"
        ))),
    }
}

/// The OpenTelemetry attributes of one kind of request (endpoint, outcome, models), built
/// once per kind by [`Otel::attributes`].
pub struct SeriesAttributes {
    requests: Vec<KeyValue>,
    rewrite: Option<Vec<KeyValue>>,
    genai: Vec<KeyValue>,
    input: Vec<KeyValue>,
    output: Vec<KeyValue>,
    span_name: String,
    /// The span attributes every request of this kind has, encoded.
    span: Vec<u8>,
}

/// The span export, with the SDK's standard `OTEL_TRACES_SAMPLER` (and `_ARG`) choice
/// and its ids.
struct Traces {
    queue: SpanQueue,
    sampler: Box<dyn ShouldSample>,
    ids: Box<dyn IdGenerator>,
}

/// The metric instruments; each mirrors the Prometheus series of the same name.
struct Instruments {
    token_usage: Histogram<u64>,
    duration: Histogram<f64>,
    ttft: Histogram<f64>,
    cached: Counter<u64>,
    reasoning: Counter<u64>,
    requests: Counter<u64>,
    rule_hits: Counter<u64>,
    rewrites: Counter<u64>,
    captured: Counter<u64>,
    netflushed: Counter<u64>,
    records_dropped: Counter<u64>,
    connections_refused: Counter<u64>,
    /// Observed at each export from the live state; kept so their callbacks stay.
    _gauges: [ObservableGauge<u64>; 4],
}

impl Instruments {
    fn new(meter: &Meter, live: Arc<dyn Gauges>) -> Self {
        let budgets = |name: &'static str, description: &'static str, pick: fn(u64, u64) -> u64| {
            let live = live.clone();
            meter
                .u64_observable_gauge(name)
                .with_description(description)
                .with_callback(move |g| {
                    for (budget, scope, measure, used, limit) in live.budgets() {
                        g.observe(
                            pick(used, limit),
                            &[
                                KeyValue::new("budget", budget),
                                KeyValue::new("scope", scope),
                                KeyValue::new("measure", measure),
                            ],
                        );
                    }
                })
                .build()
        };
        let store =
            |name: &'static str, description: &'static str, pick: fn((usize, usize)) -> usize| {
                let live = live.clone();
                meter
                    .u64_observable_gauge(name)
                    .with_description(description)
                    .with_callback(move |g| {
                        if let Some(state) = live.store() {
                            g.observe(u64::try_from(pick(state)).unwrap_or(u64::MAX), &[]);
                        }
                    })
                    .build()
            };
        Self {
            token_usage: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Tokens used per request (input or output), as the provider counted them or the gateway estimated")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("Time from the request to the end of its answer")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            ttft: meter
                .f64_histogram("gen_ai.server.time_to_first_token")
                .with_unit("s")
                .with_description("Time from the request to the first chunk of its answer")
                .with_boundaries(TTFT_BUCKETS.to_vec())
                .build(),
            cached: meter
                .u64_counter("kube_gateway.cached_tokens")
                .with_unit("{token}")
                .with_description("Input tokens the provider served from its cache")
                .build(),
            reasoning: meter
                .u64_counter("kube_gateway.reasoning_tokens")
                .with_unit("{token}")
                .with_description("Output tokens the provider spent on reasoning")
                .build(),
            requests: meter
                .u64_counter("kube_gateway.requests")
                .with_description("Requests on recognized LLM paths, by outcome")
                .build(),
            rule_hits: meter
                .u64_counter("kube_gateway.rule_hits")
                .with_description("Policy rules (and budgets) that acted on a request")
                .build(),
            rewrites: meter
                .u64_counter("kube_gateway.model_rewrites")
                .with_description("Requests whose model the gateway changed, from -> to")
                .build(),
            captured: meter
                .u64_counter("kube_gateway.connections_captured")
                .with_description("Connections the gateway received with an original destination (transparent mode)")
                .build(),
            netflushed: meter
                .u64_counter("kube_gateway.netflush_destroyed")
                .with_description("Workload connections destroyed by netflush so they reconnect through the gateway")
                .build(),
            records_dropped: meter
                .u64_counter("kube_gateway.usage_records_dropped")
                .with_description("Usage records dropped because the recorder's queue was full (they reach no sink)")
                .build(),
            connections_refused: meter
                .u64_counter("kube_gateway.connections_refused")
                .with_description("Client connections closed at accept because --max-connections were open")
                .build(),
            _gauges: [
                budgets(
                    "kube_gateway.budget_used",
                    "What each budget has used of its current window (this gateway's view)",
                    |used, _| used,
                ),
                budgets(
                    "kube_gateway.budget_limit",
                    "Each budget's limit per window",
                    |_, limit| limit,
                ),
                store(
                    "kube_gateway.store_queue_depth",
                    "Usage records waiting for the store writer",
                    |(depth, _)| depth,
                ),
                store(
                    "kube_gateway.spool_rows",
                    "Usage rows spooled locally while the store is away",
                    |(_, spooled)| spooled,
                ),
            ],
        }
    }
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel").finish_non_exhaustive()
    }
}

impl Otel {
    /// The exporters, when the environment asks for them. `live` is what the gauges
    /// read at each export.
    pub fn from_env(
        namespace: &str,
        pod: &str,
        live: Arc<dyn Gauges>,
    ) -> Result<Option<Self>, OtelError> {
        let Some(endpoint) = std::env::var_os(ENDPOINT).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let traces_on = exporter_wanted("OTEL_TRACES_EXPORTER")?;
        let metrics_on = exporter_wanted("OTEL_METRICS_EXPORTER")?;
        if !traces_on && !metrics_on {
            return Ok(None);
        }
        let mut resource = Resource::builder().with_service_name("kube-gateway");
        if !namespace.is_empty() {
            resource =
                resource.with_attribute(KeyValue::new("k8s.namespace.name", namespace.to_owned()));
        }
        if !pod.is_empty() {
            resource = resource.with_attribute(KeyValue::new("k8s.pod.name", pod.to_owned()));
        }
        let resource = resource.build();
        let traces = if traces_on {
            // The SDK's defaults, which read the sampler variables.
            let TraceConfig {
                sampler,
                id_generator,
                ..
            } = TraceConfig::default();
            Some(Traces {
                queue: SpanQueue::start(SpanTarget::from_env()?, &resource, "kube-gateway")?,
                sampler,
                ids: id_generator,
            })
        } else {
            None
        };
        let metrics = if metrics_on {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .build()
                .map_err(|e| OtelError(e.to_string()))?;
            let meters = SdkMeterProvider::builder()
                .with_reader(PeriodicReader::builder(exporter).build())
                .with_resource(resource)
                .build();
            let instruments = Instruments::new(&meters.meter("kube-gateway"), live);
            Some((instruments, meters))
        } else {
            None
        };
        tracing::info!(
            endpoint = %endpoint.to_string_lossy(),
            spans = traces_on,
            metrics = metrics_on,
            "OpenTelemetry: export over OTLP/HTTP (one span per LLM request; the metrics)"
        );
        Ok(Some(Self {
            resource_pod: (namespace.to_owned(), pod.to_owned()),
            traces,
            metrics,
        }))
    }

    /// The attribute sets of one kind of request, built once: the metrics' recorder keeps
    /// them with its Prometheus handles, so a request costs no label building or string
    /// copies here (measured: building them was the largest share of the OTLP cost).
    /// The metrics carry the bounded model labels the Prometheus series carry; the span
    /// the names themselves (a span is one request, no series to grow).
    pub fn attributes(
        &self,
        r: &UsageRecord,
        endpoint: Endpoint,
        labels: &ModelLabels,
    ) -> SeriesAttributes {
        let text = |s: &str| -> Value { Value::String(Arc::<str>::from(s).into()) };
        let operation = operation(endpoint);
        let genai = |used: &str, response: &str| {
            vec![
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("gen_ai.provider.name", endpoint.dialect().as_str()),
                // The model asked of the provider (after any rewrite), as the convention
                // means.
                KeyValue::new("gen_ai.request.model", text(used)),
                KeyValue::new("gen_ai.response.model", text(response)),
            ]
        };
        // A record of another pod than the resource's (the node agent serves many) names
        // its pod on every series and span; the resource's own pod is not repeated.
        let w = &r.workload;
        let who: Vec<KeyValue> = if (w.namespace.as_str(), w.pod.as_str())
            == (self.resource_pod.0.as_str(), self.resource_pod.1.as_str())
        {
            Vec::new()
        } else {
            vec![
                KeyValue::new("k8s.namespace.name", text(&w.namespace)),
                KeyValue::new("k8s.pod.name", text(&w.pod)),
            ]
        };
        let mut metric = genai(&labels.used, &labels.response);
        metric.extend(who.iter().cloned());
        let with_type = |kind: &'static str| {
            let mut a = metric.clone();
            a.push(KeyValue::new("gen_ai.token.type", kind));
            a
        };
        let used_name = r.used_model.as_deref().unwrap_or_default();
        let requested_name = r.requested_model.as_deref().unwrap_or_default();
        // The GenAI attributes, but the response model only when there is one.
        let mut span = genai(used_name, r.response_model.as_deref().unwrap_or_default());
        if r.response_model.is_none() {
            span.pop();
        }
        span.extend(who.iter().cloned());
        // Not `labels.rewrite` on purpose: that counts a change *to* a model (from ""
        // when the request named none); the span names the model asked for whenever one
        // was and the model used differs.
        if r.requested_model.is_some() && r.requested_model != r.used_model {
            span.push(KeyValue::new(
                "kube_gateway.requested_model",
                text(requested_name),
            ));
        }
        SeriesAttributes {
            requests: [
                KeyValue::new("outcome", r.outcome.as_str()),
                KeyValue::new("gen_ai.request.model", text(&labels.requested)),
            ]
            .into_iter()
            .chain(who.iter().cloned())
            .collect(),
            rewrite: labels.rewrite.then(|| {
                [
                    KeyValue::new("from", text(&labels.requested)),
                    KeyValue::new("to", text(&labels.used)),
                ]
                .into_iter()
                .chain(who.iter().cloned())
                .collect()
            }),
            input: with_type("input"),
            output: with_type("output"),
            genai: metric,
            span_name: format!("{operation} {used_name}"),
            span: protobuf::span_attributes(&span),
        }
    }

    /// The measurements of one finished request (on a recognized path), in the series
    /// `a` of its kind: the same as the Prometheus series get.
    pub fn measure(&self, a: &SeriesAttributes, r: &UsageRecord) {
        let Some((m, _)) = &self.metrics else {
            return;
        };
        m.requests.add(1, &a.requests);
        for rule in &r.rules {
            m.rule_hits.add(1, &[KeyValue::new("rule", rule.clone())]);
        }
        if let Some(rewrite) = &a.rewrite {
            m.rewrites.add(1, rewrite);
        }
        if !r.outcome.reached_llm() {
            return;
        }
        m.token_usage.record(r.input_tokens, &a.input);
        m.token_usage.record(r.output_tokens, &a.output);
        m.duration.record(r.latency.as_secs_f64(), &a.genai);
        if let Some(t) = r.first_chunk {
            m.ttft.record(t.as_secs_f64(), &a.genai);
        }
        if let Some(c) = r.cached_tokens.filter(|c| *c > 0) {
            m.cached.add(c, &a.genai);
        }
        if let Some(c) = r.reasoning_tokens.filter(|c| *c > 0) {
            m.reasoning.add(c, &a.genai);
        }
    }

    pub fn captured(&self) {
        if let Some((m, _)) = &self.metrics {
            m.captured.add(1, &[]);
        }
    }

    pub fn netflushed(&self, n: u64) {
        if let Some((m, _)) = &self.metrics {
            m.netflushed.add(n, &[]);
        }
    }

    pub fn connection_refused(&self) {
        if let Some((m, _)) = &self.metrics {
            m.connections_refused.add(1, &[]);
        }
    }

    pub fn record_dropped(&self) {
        if let Some((m, _)) = &self.metrics {
            m.records_dropped.add(1, &[]);
        }
    }

    /// The span of one finished request (on a recognized path), `a` the attributes of its
    /// kind: a root CLIENT span, written straight into the export batch. Namespace and
    /// pod are the resource's attributes, not repeated on every span.
    pub fn span(&self, a: &SeriesAttributes, r: &UsageRecord) {
        let Some(t) = &self.traces else {
            return;
        };
        let trace_id = t.ids.new_trace_id();
        let sampling =
            t.sampler
                .should_sample(None, trace_id, &a.span_name, &SpanKind::Client, &[], &[]);
        if sampling.decision != SamplingDecision::RecordAndSample {
            return;
        }
        let (start, end) = span_window(r);
        let outcome = r.outcome.as_str();
        let reasons = r.finish_reason.as_deref().map(|f| [f]);
        // Two slots at the end for the optional ones below; never sent as they are.
        let free = ("", Attr::Int(0));
        let mut attributes = [
            (
                "gen_ai.usage.input_tokens",
                Attr::Int(r.input_tokens as i64),
            ),
            (
                "gen_ai.usage.output_tokens",
                Attr::Int(r.output_tokens as i64),
            ),
            ("kube_gateway.outcome", Attr::Str(outcome)),
            ("kube_gateway.request_id", Attr::Str(&r.request_id)),
            ("http.response.status_code", Attr::Int(i64::from(r.status))),
            ("server.address", Attr::Str(&r.destination)),
            free,
            free,
        ];
        // Then those known for this request, in an array on the stack: no allocation.
        let mut n = attributes.len() - 2;
        let optional = [
            reasons
                .as_ref()
                .map(|f| ("gen_ai.response.finish_reasons", Attr::Strs(f))),
            r.first_chunk.map(|t| {
                (
                    "kube_gateway.time_to_first_chunk_s",
                    Attr::Double(t.as_secs_f64()),
                )
            }),
        ];
        for extra in optional.into_iter().flatten() {
            attributes[n] = extra;
            n += 1;
        }
        let rules: Vec<[(&str, Attr<'_>); 2]> = r
            .rules
            .iter()
            .map(|rule| {
                [
                    ("gen_ai.guardrail.rule.name", Attr::Str(rule)),
                    ("gen_ai.guardrail.action", Attr::Str(outcome)),
                ]
            })
            .collect();
        let events: Vec<protobuf::SpanEvent<'_>> = rules
            .iter()
            .map(|attributes| ("gen_ai.guardrail.rule", end, &attributes[..]))
            .collect();
        let error = matches!(r.outcome, Outcome::UpstreamError)
            .then(|| r.error.as_deref().unwrap_or_default());
        let fields = SpanFields {
            trace_id: trace_id.to_bytes(),
            span_id: t.ids.new_span_id().to_bytes(),
            name: &a.span_name,
            start,
            end,
            shared: &a.span,
            attributes: &attributes[..n],
            events: &events,
            error,
        };
        t.queue.push(|out| protobuf::span(out, &fields));
    }

    /// Sends what is batched and the metrics' last values (at shutdown).
    pub fn shutdown(&self) {
        if let Some(t) = &self.traces {
            t.queue.shutdown();
        }
        if let Some((_, meters)) = &self.metrics {
            if let Err(e) = meters.shutdown() {
                tracing::warn!(error = %e, "OpenTelemetry: metrics not exported at shutdown");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{exporter_choice, span_window};
    use crate::record::{Outcome, TokenSource, UsageRecord};
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_span_starts_when_the_request_arrived_and_ends_with_its_answer() {
        let arrived = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let r = UsageRecord {
            request_id: "kgw-x-1".into(),
            workload: std::sync::Arc::new(crate::record::Identity {
                namespace: "ns".into(),
                pod: "pod".into(),
                ..Default::default()
            }),
            started_at: arrived,
            peer: "10.0.0.7:41000".parse().unwrap(),
            destination: "10.0.0.9:11434".into(),
            endpoint: None,
            method: "POST".into(),
            path: "/".into(),
            requested_model: None,
            used_model: None,
            response_model: None,
            status: 200,
            outcome: Outcome::Allowed,
            input_tokens: 0,
            input_source: TokenSource::None,
            output_tokens: 0,
            output_source: TokenSource::None,
            cached_tokens: None,
            reasoning_tokens: None,
            finish_reason: None,
            streamed: false,
            latency: Duration::from_millis(250),
            first_chunk: None,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
            rules: vec![],
        };
        let (start, end) = span_window(&r);
        assert_eq!(start, arrived);
        assert_eq!(end, arrived + Duration::from_millis(250));
    }

    #[test]
    fn an_exporter_is_otlp_unless_none_and_nothing_else_is_accepted() {
        let v = "OTEL_TRACES_EXPORTER";
        assert!(exporter_choice(v, None).unwrap());
        assert!(exporter_choice(v, Some("")).unwrap());
        assert!(exporter_choice(v, Some("otlp")).unwrap());
        assert!(!exporter_choice(v, Some("none")).unwrap());
        let e = exporter_choice(v, Some("jaeger")).unwrap_err().to_string();
        assert!(e.contains("OTEL_TRACES_EXPORTER=jaeger"), "{e}");
    }

    #[test]
    fn another_pods_series_name_the_pod_and_the_resources_own_do_not() {
        let otel = super::Otel {
            resource_pod: ("team-a".into(), "app-1".into()),
            traces: None,
            metrics: None,
        };
        let labels = crate::telemetry::ModelLabels {
            requested: "m".into(),
            used: "m".into(),
            response: "m".into(),
            rewrite: false,
        };
        let record = |ns: &str, pod: &str| UsageRecord {
            request_id: "kgw-x-1".into(),
            workload: std::sync::Arc::new(crate::record::Identity {
                namespace: ns.into(),
                pod: pod.into(),
                ..Default::default()
            }),
            started_at: SystemTime::UNIX_EPOCH,
            peer: "10.0.0.7:41000".parse().unwrap(),
            destination: "10.0.0.9:11434".into(),
            endpoint: Some(crate::api::Endpoint::Chat),
            method: "POST".into(),
            path: "/api/chat".into(),
            requested_model: Some("m".into()),
            used_model: Some("m".into()),
            response_model: Some("m".into()),
            status: 200,
            outcome: Outcome::Allowed,
            input_tokens: 1,
            input_source: TokenSource::Provider,
            output_tokens: 1,
            output_source: TokenSource::Provider,
            cached_tokens: None,
            reasoning_tokens: None,
            finish_reason: None,
            streamed: false,
            latency: Duration::from_millis(1),
            first_chunk: None,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
            rules: vec![],
        };
        let keys = |a: &super::SeriesAttributes| -> Vec<String> {
            a.requests.iter().map(|kv| kv.key.to_string()).collect()
        };
        let own = otel.attributes(
            &record("team-a", "app-1"),
            crate::api::Endpoint::Chat,
            &labels,
        );
        assert!(!keys(&own).contains(&"k8s.pod.name".to_owned()));
        let other = otel.attributes(
            &record("team-b", "chat-7"),
            crate::api::Endpoint::Chat,
            &labels,
        );
        assert!(keys(&other).contains(&"k8s.pod.name".to_owned()));
        assert!(other
            .genai
            .iter()
            .any(|kv| kv.key.as_str() == "k8s.namespace.name" && kv.value.as_str() == "team-b"));
    }
}
