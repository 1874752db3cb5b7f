//! Usage extraction (`gateway/src/api/{event,openai,ollama}.rs` through the response
//! meter, `gateway/src/meter.rs`) from arbitrary bodies: SSE, NDJSON and whole JSON, in
//! every endpoint's dialect, fed in arbitrary pieces. What the meter collects (model,
//! usage, text, finish reason, errors, frames) and what it sends on do not depend on
//! how the body was split; a meter that hides nothing sends the body unchanged; each
//! object reads the same from its bytes as from its parsed value, and the same read by
//! its stream's shape (`gateway/src/api/shape.rs`, the body's lines as the stream).
#![no_main]

use bytes::Bytes;
use kube_gateway::api::{observe, Endpoint, ShapeReader, StreamEvent};
use kube_gateway::meter::{Bounds, Format, Meter};
use kube_gateway::record::Collected;
use kube_gateway_fuzz::pieces;
use libfuzzer_sys::fuzz_target;

const FORMATS: [Format; 3] = [Format::Sse, Format::Ndjson, Format::Json];

fn meter(endpoint: Endpoint, format: Format, hide: bool, chunks: &[&[u8]]) -> (Vec<u8>, Collected) {
    let mut m = Meter::with_rules(endpoint, format, hide, Bounds::all(1 << 20), None);
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&m.on_data(Bytes::copy_from_slice(c)));
    }
    out.extend_from_slice(&m.on_end());
    (out, m.collected)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = kube_gateway_fuzz::input(data, 3) else {
        return;
    };
    let endpoint = Endpoint::ALL[usize::from(input.choices[0]) % Endpoint::ALL.len()];
    let format = FORMATS[usize::from(input.choices[1]) % FORMATS.len()];
    let hide_usage = input.choices[2] & 1 == 1;
    let body = input.body;

    // One object, read from its bytes and from its parsed value.
    if let Some(obs) = observe(endpoint, body) {
        let ev = StreamEvent::parse(endpoint, body).unwrap_or_else(|| {
            panic!("observed but not parsed: {}", String::from_utf8_lossy(body))
        });
        assert_eq!(ev.obs, obs);
        assert_eq!(ev.reread(), Some(obs), "bytes and value read differently");
    }

    // Its lines as one stream's events: each read against the one before it (by
    // shape) reports what it reports read alone.
    let mut reader = ShapeReader::new(endpoint);
    for line in body.split(|&b| b == b'\n') {
        let by_shape = reader.parse(line).map(|ev| (ev.text_span(), ev.obs));
        let alone = StreamEvent::parse(endpoint, line).map(|ev| (ev.text_span(), ev.obs));
        assert_eq!(by_shape, alone, "{}", String::from_utf8_lossy(line));
    }

    let (whole_out, whole) = meter(endpoint, format, hide_usage, &[body]);
    let chunks = pieces(body, &input.cuts);
    let (split_out, split) = meter(endpoint, format, hide_usage, &chunks);
    assert_eq!(split, whole, "what was collected depends on the split");
    assert_eq!(split_out, whole_out, "what was sent depends on the split");
    if !hide_usage || format != Format::Sse {
        assert_eq!(
            whole_out, body,
            "a meter that hides nothing changed the body"
        );
    }
    if format == Format::Json {
        assert_eq!(whole.frames, 0);
        assert_eq!(
            observe(endpoint, body).map(|o| o.usage).unwrap_or_default(),
            whole.usage
        );
    }
});
