//! OpenTelemetry export: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard OTLP
//! variables apply: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, headers, timeout), one span per
//! LLM request goes out over OTLP/HTTP, with the GenAI semantic conventions' attributes
//! and a `gen_ai.guardrail.rule` event per policy rule that acted. Built from the same
//! finished records as the usage store and the metrics, by the recorder, off the request
//! path; the exporter batches on its own thread. No prompt or completion text.

use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::metrics::outcome_name;
use crate::usage::{Outcome, UsageRecord};

/// The environment variable that turns the export on.
pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The OTLP span export could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct OtelError(String);

/// The span exporter of this gateway.
pub struct Otel {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    namespace: String,
    pod: String,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel").finish_non_exhaustive()
    }
}

impl Otel {
    /// The exporter, when the environment asks for one.
    pub fn from_env(namespace: &str, pod: &str) -> Result<Option<Self>, OtelError> {
        let Some(endpoint) = std::env::var_os(ENDPOINT).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| OtelError(e.to_string()))?;
        let mut resource = Resource::builder().with_service_name("kube-gateway");
        if !namespace.is_empty() {
            resource =
                resource.with_attribute(KeyValue::new("k8s.namespace.name", namespace.to_owned()));
        }
        if !pod.is_empty() {
            resource = resource.with_attribute(KeyValue::new("k8s.pod.name", pod.to_owned()));
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        tracing::info!(endpoint = %endpoint.to_string_lossy(), "OpenTelemetry: one span per LLM request over OTLP/HTTP");
        Ok(Some(Self {
            tracer: provider.tracer("kube-gateway"),
            provider,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
        }))
    }

    /// The span of one finished request.
    pub fn span(&self, r: &UsageRecord) {
        if r.endpoint == "other" {
            return;
        }
        let operation = crate::metrics::operation(r.endpoint);
        let model = r.used_model.clone().unwrap_or_default();
        let end = r.time;
        let start = end.checked_sub(r.latency).unwrap_or(end);
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.provider.name", r.api),
            KeyValue::new("gen_ai.request.model", model.clone()),
            KeyValue::new("gen_ai.usage.input_tokens", r.input_tokens as i64),
            KeyValue::new("gen_ai.usage.output_tokens", r.output_tokens as i64),
            KeyValue::new("kube_gateway.outcome", outcome_name(r.outcome)),
            KeyValue::new("kube_gateway.request_id", r.request_id.clone()),
            KeyValue::new("http.response.status_code", i64::from(r.status)),
            KeyValue::new("server.address", r.destination.clone()),
        ];
        if let Some(m) = &r.response_model {
            attributes.push(KeyValue::new("gen_ai.response.model", m.clone()));
        }
        if let Some(f) = &r.finish_reason {
            attributes.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(vec![opentelemetry::StringValue::from(f.clone())].into()),
            ));
        }
        if let Some(requested) = r.requested_model.as_ref().filter(|m| **m != model) {
            attributes.push(KeyValue::new(
                "kube_gateway.requested_model",
                requested.clone(),
            ));
        }
        if let Some(t) = r.first_chunk {
            attributes.push(KeyValue::new(
                "kube_gateway.time_to_first_chunk_s",
                t.as_secs_f64(),
            ));
        }
        if !self.namespace.is_empty() {
            attributes.push(KeyValue::new("k8s.namespace.name", self.namespace.clone()));
        }
        if !self.pod.is_empty() {
            attributes.push(KeyValue::new("k8s.pod.name", self.pod.clone()));
        }
        let mut span = self
            .tracer
            .span_builder(format!("{operation} {model}"))
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attributes)
            .start(&self.tracer);
        for rule in &r.rules {
            span.add_event_with_timestamp(
                "gen_ai.guardrail.rule",
                end,
                vec![
                    KeyValue::new("gen_ai.guardrail.rule.name", rule.clone()),
                    KeyValue::new("gen_ai.guardrail.action", outcome_name(r.outcome)),
                ],
            );
        }
        if matches!(r.outcome, Outcome::UpstreamError) {
            span.set_status(Status::error(r.error.clone().unwrap_or_default()));
        }
        span.end_with_timestamp(end);
    }

    /// Sends what is batched (at shutdown).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OpenTelemetry: spans not flushed at shutdown");
        }
    }
}
