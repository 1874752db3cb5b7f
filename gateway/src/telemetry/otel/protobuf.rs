//! The OTLP trace export request (`ExportTraceServiceRequest`, protobuf), written
//! straight from what the gateway knows of a finished request. Going through the SDK
//! (a span object per request, handed to a batch thread, converted by the OTLP crate
//! into owned protobuf structs and only then encoded) cost several times the encoding
//! itself, measured under load. A span's bytes are written once here; the tests decode
//! them with the official protobuf types and compare them with what the SDK and the OTLP
//! crate make of the same span.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::{Array, KeyValue, Value};
use opentelemetry_sdk::Resource;
use prost::encoding::{encode_key, encode_varint, WireType};

/// `SpanFlags`: the W3C `sampled` trace flag, and `ContextHasIsRemote` with the parent
/// not remote (these spans have none), as the SDK sets them for a root span.
const ROOT_SPAN_FLAGS: u32 = 0x01 | 0x100;

/// `Span.SpanKind` CLIENT: the gateway calls the LLM on the workload's behalf.
const KIND_CLIENT: u64 = 3;

/// The resource's part of every request, encoded once: the `Resource` message and the
/// resource's schema URL.
#[derive(Debug, Default, Clone)]
pub struct EncodedResource {
    message: Vec<u8>,
    schema_url: String,
}

impl EncodedResource {
    pub fn new(resource: &Resource) -> Self {
        let mut message = Vec::new();
        for (key, value) in resource.iter() {
            value_attr(&mut message, 1, key.as_str(), value);
        }
        Self {
            message,
            schema_url: resource.schema_url().unwrap_or_default().to_owned(),
        }
    }
}

/// An attribute value borrowed from the record it describes (no copy until written).
#[derive(Debug, Clone, Copy)]
pub enum Attr<'a> {
    Str(&'a str),
    Int(i64),
    Double(f64),
    Strs(&'a [&'a str]),
}

/// A span event: name, time, attributes.
pub type SpanEvent<'a> = (&'a str, SystemTime, &'a [(&'a str, Attr<'a>)]);

/// One finished span as the gateway makes them: a root CLIENT span.
#[derive(Debug)]
pub struct SpanFields<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub name: &'a str,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Attributes shared by every span of its kind, encoded once by [`span_attributes`].
    pub shared: &'a [u8],
    /// This span's own attributes, after the shared ones.
    pub attributes: &'a [(&'a str, Attr<'a>)],
    pub events: &'a [SpanEvent<'a>],
    /// The status: unset, or an error and its description.
    pub error: Option<&'a str>,
}

/// The encoded `Span.attributes` entries of `attributes`, for [`SpanFields::shared`].
pub fn span_attributes(attributes: &[KeyValue]) -> Vec<u8> {
    let mut out = Vec::new();
    for kv in attributes {
        value_attr(&mut out, 9, kv.key.as_str(), &kv.value);
    }
    out
}

/// Appends `span` to `out` as a `ScopeSpans.spans` entry.
pub fn span(out: &mut Vec<u8>, span: &SpanFields<'_>) {
    nested(out, 2, |out| {
        bytes(out, 1, &span.trace_id, false);
        bytes(out, 2, &span.span_id, false);
        string(out, 5, span.name);
        uint(out, 6, KIND_CLIENT);
        fixed64(out, 7, nanos(span.start));
        fixed64(out, 8, nanos(span.end));
        out.extend_from_slice(span.shared);
        for (key, value) in span.attributes {
            attr(out, 9, key, *value);
        }
        for (name, time, attributes) in span.events {
            nested(out, 11, |out| {
                fixed64(out, 1, nanos(*time));
                string(out, 2, name);
                for (key, value) in *attributes {
                    attr(out, 3, key, *value);
                }
            });
        }
        // Always present, if empty, as the OTLP crate sends it.
        nested(out, 15, |out| {
            if let Some(message) = span.error {
                string(out, 2, message);
                uint(out, 3, 2);
            }
        });
        fixed32(out, 16, ROOT_SPAN_FLAGS);
    });
}

/// Appends to `out` the export request of `spans` (entries written by [`span`]): one
/// `ResourceSpans` with one `ScopeSpans`, of the instrumentation scope `scope`.
pub fn export_request(out: &mut Vec<u8>, resource: &EncodedResource, scope: &str, spans: &[u8]) {
    let mut head = Vec::with_capacity(resource.message.len() + scope.len() + 16);
    // The resource is always present, if empty, as the OTLP crate sends it.
    bytes(&mut head, 1, &resource.message, true);
    let mut scope_head = Vec::with_capacity(scope.len() + 4);
    nested(&mut scope_head, 1, |out| string(out, 1, scope));
    let scope_len = scope_head.len() + spans.len();
    let mut tail = Vec::new();
    string(&mut tail, 3, &resource.schema_url);
    // Lengths first, so the spans are copied once, never shifted along.
    let len = head.len() + 1 + varint_len(scope_len) + scope_len + tail.len();
    out.reserve(len + 11);
    encode_key(1, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
    out.extend_from_slice(&head);
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(scope_len as u64, out);
    out.extend_from_slice(&scope_head);
    out.extend_from_slice(spans);
    out.extend_from_slice(&tail);
}

fn varint_len(n: usize) -> usize {
    prost::encoding::encoded_len_varint(n as u64)
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A `KeyValue` message in field `field`, its `AnyValue` body written by `value`.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
    nested(out, field, |out| {
        string(out, 1, key);
        nested(out, 2, value);
    });
}

/// A `KeyValue` from the API's owned value (the resource's, a kind's shared ones).
fn value_attr(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    key_value(out, field, key, |out| any_value(out, value));
}

/// A `KeyValue` from a value borrowed from the record.
fn attr(out: &mut Vec<u8>, field: u32, key: &str, value: Attr<'_>) {
    key_value(out, field, key, |out| match value {
        Attr::Str(s) => any_str(out, s),
        Attr::Int(i) => any_int(out, i),
        Attr::Double(f) => any_double(out, f),
        Attr::Strs(v) => any_array(out, v, |out, s| any_str(out, s)),
    });
}

/// The body of an `AnyValue`: its one `value` field, sent even when it holds a default
/// (a `oneof` member always is).
fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => any_str(out, s.as_str()),
        Value::Bool(b) => varint(out, 2, u64::from(*b)),
        Value::I64(i) => any_int(out, *i),
        Value::F64(f) => any_double(out, *f),
        Value::Array(array) => match array {
            Array::Bool(v) => any_array(out, v, |out, b| varint(out, 2, u64::from(*b))),
            Array::I64(v) => any_array(out, v, |out, i| any_int(out, *i)),
            Array::F64(v) => any_array(out, v, |out, f| any_double(out, *f)),
            Array::String(v) => any_array(out, v, |out, s| any_str(out, s.as_str())),
            // The API's array kinds are non-exhaustive; one it adds later is sent empty
            // rather than mis-encoded.
            _ => nested(out, 5, |_| {}),
        },
        // Likewise for a value kind added later: an `AnyValue` with no value.
        _ => {}
    }
}

fn any_str(out: &mut Vec<u8>, s: &str) {
    bytes(out, 1, s.as_bytes(), true);
}

fn any_int(out: &mut Vec<u8>, i: i64) {
    varint(out, 3, i as u64);
}

fn any_double(out: &mut Vec<u8>, f: f64) {
    encode_key(4, WireType::SixtyFourBit, out);
    out.extend_from_slice(&f.to_le_bytes());
}

/// An `ArrayValue` body: an `AnyValue` per element, each written by `element`.
fn any_array<T>(out: &mut Vec<u8>, values: &[T], element: impl Fn(&mut Vec<u8>, &T)) {
    nested(out, 5, |out| {
        for v in values {
            nested(out, 1, |out| element(out, v));
        }
    });
}

/// A length-delimited field whose body `body` writes, in place. Its length, a varint of
/// unknown size beforehand, is given one byte, enough for most (attributes, values);
/// a longer body is shifted along to make room.
fn nested(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(field, WireType::LengthDelimited, out);
    out.push(0);
    let start = out.len();
    body(out);
    let len = out.len() - start;
    if len < 0x80 {
        out[start - 1] = len as u8;
        return;
    }
    let mut prefix = [0u8; 10];
    let mut free = &mut prefix[..];
    encode_varint(len as u64, &mut free);
    let n = 10 - free.len();
    out.extend_from_slice(&prefix[1..n]);
    out[start - 1..].rotate_right(n - 1);
    out[start - 1..start - 1 + n].copy_from_slice(&prefix[..n]);
}

/// A string or bytes field; proto3 leaves an empty one out unless `always` (a `oneof`).
fn bytes(out: &mut Vec<u8>, field: u32, value: &[u8], always: bool) {
    if value.is_empty() && !always {
        return;
    }
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.extend_from_slice(value);
}

fn string(out: &mut Vec<u8>, field: u32, value: &str) {
    bytes(out, field, value.as_bytes(), false);
}

/// An unsigned or enum field, left out when zero (proto3).
fn uint(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        varint(out, field, value);
    }
}

fn varint(out: &mut Vec<u8>, field: u32, value: u64) {
    encode_key(field, WireType::Varint, out);
    encode_varint(value, out);
}

fn fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        encode_key(field, WireType::SixtyFourBit, out);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn fixed32(out: &mut Vec<u8>, field: u32, value: u32) {
    if value != 0 {
        encode_key(field, WireType::ThirtyTwoBit, out);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{
        Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{InstrumentationScope, StringValue};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;

    fn to_value(a: Attr<'_>) -> Value {
        match a {
            Attr::Str(s) => Value::from(s.to_owned()),
            Attr::Int(i) => Value::I64(i),
            Attr::Double(f) => Value::F64(f),
            Attr::Strs(v) => Value::Array(
                v.iter()
                    .map(|s| StringValue::from((*s).to_owned()))
                    .collect::<Vec<_>>()
                    .into(),
            ),
        }
    }

    fn to_kvs(attributes: &[(&str, Attr<'_>)]) -> Vec<KeyValue> {
        attributes
            .iter()
            .map(|(k, v)| KeyValue::new((*k).to_owned(), to_value(*v)))
            .collect()
    }

    /// The same span as the SDK records it (a root CLIENT span, sampled).
    fn sdk_span(f: &SpanFields<'_>, shared: &[KeyValue]) -> SpanData {
        let mut attributes = shared.to_vec();
        attributes.extend(to_kvs(f.attributes));
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(f.trace_id),
                SpanId::from_bytes(f.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: Cow::Owned(f.name.to_owned()),
            start_time: f.start,
            end_time: f.end,
            attributes,
            dropped_attributes_count: 0,
            events: {
                let mut events = SpanEvents::default();
                events.events = f
                    .events
                    .iter()
                    .map(|(name, time, a)| Event::new((*name).to_owned(), *time, to_kvs(a), 0))
                    .collect();
                events
            },
            links: SpanLinks::default(),
            status: match f.error {
                Some(m) => Status::error(m.to_owned()),
                None => Status::Unset,
            },
            instrumentation_scope: InstrumentationScope::builder("kube-gateway").build(),
        }
    }

    /// What we send for `spans` (each with its shared attributes), decoded, and what the
    /// OTLP crate sends for the SDK's spans.
    fn both(
        resource: &Resource,
        spans: &[(SpanFields<'_>, Vec<KeyValue>)],
    ) -> (ExportTraceServiceRequest, ExportTraceServiceRequest) {
        let mut entries = Vec::new();
        for (f, _) in spans {
            span(&mut entries, f);
        }
        let mut out = Vec::new();
        export_request(
            &mut out,
            &EncodedResource::new(resource),
            "kube-gateway",
            &entries,
        );
        let ours = ExportTraceServiceRequest::decode(out.as_slice())
            .unwrap_or_else(|e| panic!("our encoding does not decode: {e}"));
        let sdk = spans
            .iter()
            .map(|(f, shared)| sdk_span(f, shared))
            .collect();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                sdk,
                &ResourceAttributesWithSchema::from(resource),
            ),
        };
        (ours, theirs)
    }

    #[test]
    fn gateway_spans_decode_to_what_the_sdk_and_the_otlp_crate_send() {
        let resource = Resource::builder()
            .with_service_name("kube-gateway")
            .with_attribute(KeyValue::new("k8s.pod.name", "pod-0"))
            .with_schema_url([], "https://opentelemetry.io/schemas/1.30.0")
            .build();
        let shared = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.request.model", "gemma2:2b"),
            KeyValue::new("empty", ""),
            KeyValue::new("unicode", "héllo ✓ 模型"),
            KeyValue::new("flag", false),
            KeyValue::new("zero", 0_i64),
            KeyValue::new("ratio", 0.0_f64),
            KeyValue::new("bools", Value::Array(vec![true, false].into())),
            KeyValue::new("ints", Value::Array(vec![0_i64, -1, i64::MAX].into())),
            KeyValue::new("floats", Value::Array(vec![1.5_f64].into())),
            KeyValue::new("none", Value::Array(Vec::<StringValue>::new().into())),
        ];
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let long = "y".repeat(20_000);
        let own = [
            ("gen_ai.usage.input_tokens", Attr::Int(21)),
            ("negative", Attr::Int(-7)),
            ("kube_gateway.request_id", Attr::Str("kgw-5f58-0")),
            ("blank", Attr::Str("")),
            ("gen_ai.response.finish_reasons", Attr::Strs(&["stop", ""])),
            ("no_reasons", Attr::Strs(&[])),
            ("kube_gateway.time_to_first_chunk_s", Attr::Double(0.000_85)),
        ];
        let long_own = [
            ("long", Attr::Str(&long)),
            ("medium", Attr::Str(&long[..200])),
        ];
        let rule = [("gen_ai.guardrail.rule.name", Attr::Str("no-secrets"))];
        let events: [SpanEvent<'_>; 2] = [
            (
                "gen_ai.guardrail.rule",
                start + Duration::from_millis(3),
                &rule,
            ),
            ("bare", UNIX_EPOCH, &[]),
        ];
        let fields = |n: u8| SpanFields {
            trace_id: [n; 16],
            span_id: [n + 1; 8],
            name: "chat gemma2:2b",
            start,
            end: start + Duration::from_millis(u64::from(n) * 7),
            shared: &[],
            attributes: &[],
            events: &[],
            error: None,
        };
        let shared_bytes = span_attributes(&shared);
        let spans = vec![
            (
                SpanFields {
                    shared: &shared_bytes,
                    attributes: &own,
                    events: &events,
                    ..fields(1)
                },
                shared.clone(),
            ),
            (
                SpanFields {
                    error: Some("upstream refused: connection reset"),
                    ..fields(2)
                },
                vec![],
            ),
            (
                SpanFields {
                    attributes: &long_own,
                    start: UNIX_EPOCH - Duration::from_secs(1),
                    error: Some(""),
                    ..fields(3)
                },
                vec![],
            ),
        ];
        let (ours, theirs) = both(&resource, &spans);
        assert_eq!(ours, theirs);
        assert_eq!(theirs.resource_spans[0].scope_spans[0].spans.len(), 3);

        // Nothing at all: one empty resource with an empty scope, as the crate sends.
        let empty = Resource::builder_empty().build();
        let (ours, _) = both(&empty, &[]);
        let spans = &ours.resource_spans[0].scope_spans[0];
        assert!(spans.spans.is_empty());
        assert_eq!(
            spans.scope.as_ref().map(|s| s.name.as_str()),
            Some("kube-gateway")
        );
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<String>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("NaN is never equal to itself", |f| !f.is_nan())
                .prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            proptest::collection::vec(any::<String>().prop_map(StringValue::from), 0..4)
                .prop_map(|v| Value::Array(v.into())),
            proptest::collection::vec(any::<i64>(), 0..4).prop_map(|v| Value::Array(v.into())),
        ]
    }

    proptest! {
        #[test]
        fn any_attributes_decode_to_what_the_sdk_and_the_otlp_crate_send(
            shared in proptest::collection::vec(("[a-z._]{0,12}", value()), 0..8),
            strings in proptest::collection::vec(("[a-z._]{0,12}", any::<String>()), 0..6),
            ints in proptest::collection::vec(("[a-z._]{0,12}", any::<i64>()), 0..4),
            name in any::<String>(),
            error in proptest::option::of(any::<String>()),
            nanos in any::<u64>(),
        ) {
            let shared: Vec<KeyValue> =
                shared.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect();
            let shared_bytes = span_attributes(&shared);
            let mut own: Vec<(&str, Attr<'_>)> =
                strings.iter().map(|(k, v)| (k.as_str(), Attr::Str(v))).collect();
            own.extend(ints.iter().map(|(k, v)| (k.as_str(), Attr::Int(*v))));
            let start = UNIX_EPOCH + Duration::from_nanos(nanos);
            let f = SpanFields {
                trace_id: [7; 16],
                span_id: [9; 8],
                name: &name,
                start,
                end: start,
                shared: &shared_bytes,
                attributes: &own,
                events: &[],
                error: error.as_deref(),
            };
            let (ours, theirs) = both(&Resource::builder_empty().build(), &[(f, shared)]);
            prop_assert_eq!(ours, theirs);
        }
    }
}
