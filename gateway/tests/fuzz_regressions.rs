//! Inputs the fuzz targets (`fuzz/`) found, minimized, checked here so that what they
//! showed stays fixed (or, for the SSE framer, stays as documented) without running the
//! fuzzer.

use bytes::Bytes;
use kube_gateway::api::{observe, Endpoint, LlmRequest, StreamEvent};
use kube_gateway::meter::{Bounds, Format, Meter};
use kube_gateway::stream::sse::{parse_event, SseBoundary};
use kube_gateway::stream::Framer;

fn metered(hide_usage: bool, body: &[u8]) -> (Vec<u8>, Meter) {
    let mut m = Meter::with_rules(
        Endpoint::ChatCompletions,
        Format::Sse,
        hide_usage,
        Bounds::all(1 << 20),
        None,
    );
    let mut out = m.on_data(Bytes::copy_from_slice(body)).to_vec();
    out.extend_from_slice(&m.on_end());
    (out, m)
}

/// `usage_extraction`: a byte that is not UTF-8 where serde_json does not look (an
/// ignored field) let `observe` read the object but not `StreamEvent::parse`, so a usage
/// chunk counted when the meter only read frames, and neither counted nor hidden when it
/// hid the usage the client had not asked for.
#[test]
fn a_usage_chunk_with_a_stray_byte_reads_the_same_either_way() {
    let chunk: &[u8] =
        b"{\"id\":\"c\xff\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}";
    let ev = StreamEvent::parse(Endpoint::ChatCompletions, chunk).expect("parsed");
    assert_eq!(
        Some(ev.obs.clone()),
        observe(Endpoint::ChatCompletions, chunk)
    );
    assert_eq!(
        (ev.obs.usage.input, ev.obs.usage.output),
        (Some(5), Some(1))
    );

    let mut body = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: ".to_vec();
    body.extend_from_slice(chunk);
    body.extend_from_slice(b"\n\ndata: [DONE]\n\n");
    let (sent, read_only) = metered(false, &body);
    assert_eq!(sent, body);
    let (hidden, hiding) = metered(true, &body);
    assert_eq!(hiding.collected.usage, read_only.collected.usage);
    assert_eq!(hiding.collected.usage.input, Some(5));
    assert_eq!(
        hidden,
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n",
        "the usage chunk is hidden"
    );
}

fn frames(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut framer: Framer<SseBoundary> = Framer::new();
    let mut out = Vec::new();
    for c in chunks {
        out.extend(framer.push(c).complete().map(<[u8]>::to_vec));
    }
    (out, framer.take_rest().to_vec())
}

/// `sse_framing`: an event ending in a CR goes out at that CR; when the LF of that CRLF
/// comes in the next read, it starts the next frame (or is left at the end) instead of
/// ending this one. The events and the bytes are those of the stream framed at once:
/// the fuzz target allows this difference and nothing else.
#[test]
fn a_crlf_split_between_reads_moves_its_lf_to_the_next_frame() {
    let stream: &[u8] = b"data: a\r\n\r\ndata: b\r\n\r\n";
    let whole = frames(&[stream]);
    assert_eq!(whole.0, [&b"data: a\r\n\r\n"[..], b"data: b\r\n\r\n"]);
    let split = frames(&[&stream[..10], &stream[10..]]);
    assert_eq!(split.0, [&b"data: a\r\n\r"[..], b"\ndata: b\r\n\r\n"]);
    let events = |f: &[Vec<u8>]| f.iter().map(|r| parse_event(r)).collect::<Vec<_>>();
    assert_eq!(events(&split.0), events(&whole.0));
    let at_end = frames(&[&stream[..21], &stream[21..]]);
    assert_eq!(at_end.1, b"\n", "the last LF is left over");
    assert_eq!(at_end.0.concat(), &stream[..21]);
}

/// `request_policy`: Ollama's `num_predict` was read through a whole `options` value,
/// which serde_json refuses for a lone surrogate escape in any option; the client's limit
/// then read as none, and the policy's ceiling replaced a lower one the client had set.
#[test]
fn num_predict_reads_past_an_option_serde_json_refuses() {
    let body = r#"{"model":"m","options":{"stop":["\ude00"],"num_predict":20}}"#;
    let req = LlmRequest::parse(Endpoint::Generate, body).expect("parsed");
    assert_eq!(req.max_tokens(), Some(20));
    let mut set = req.clone();
    set.set_max_tokens(10);
    assert_eq!(
        set.raw_field("options").as_deref(),
        Some(r#"{"stop":["\ude00"],"num_predict":10}"#)
    );
    let again = LlmRequest::parse(Endpoint::Generate, set.body()).expect("parsed");
    assert_eq!(again.max_tokens(), Some(10));
}
