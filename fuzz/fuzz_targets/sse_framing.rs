//! SSE framing (`gateway/src/stream/sse.rs`) fed an arbitrary stream in arbitrary
//! pieces. Checked against the stream framed at once, which is itself checked against
//! a plain reading of the event-stream rules (an event ends at a blank line; lines end
//! in LF, CR or CRLF): the same frames, the same parsed events, no byte lost or added;
//! rewriting an event's data keeps its other fields. Framers bounded by
//! `--max-event-bytes` (`Framer::with_max`) give the same frames, a frame too large to
//! hold as one run of oversize pieces (`check_bounded`).
//!
//! One difference is allowed, and pinned by `gateway/tests/fuzz_regressions.rs`: an
//! event ending in a CR is released at that CR, so when the LF of that CRLF comes in the
//! next read it starts the next frame (or is what is left at the end) instead of ending
//! this one. The events and the bytes are the same.
#![no_main]

use kube_gateway::stream::sse::{self, parse_event, with_data, SseBoundary, SseEvent};
use kube_gateway::stream::Framer;
use kube_gateway_fuzz::{check_bounded, pieces, FRAME_LIMITS};
use libfuzzer_sys::fuzz_target;

/// Every frame's bytes, then what was left at the end.
fn frame(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut framer: Framer<SseBoundary> = Framer::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        let out = framer.push(chunk);
        assert!(
            out.all_framed(),
            "an unbounded framer released part of a frame"
        );
        let mut len = 0;
        for f in out.complete() {
            assert!(!f.is_empty(), "an empty frame");
            len += f.len();
            frames.push(f.to_vec());
        }
        assert_eq!(len, out.bytes.len(), "bytes beyond the last frame's end");
    }
    (frames, framer.take_rest().to_vec())
}

/// Where each event of a whole stream ends, read line by line.
fn reference_ends(s: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut i = 0;
    let mut line_start = true;
    while i < s.len() {
        match s[i] {
            b'\r' | b'\n' => {
                let crlf = s[i] == b'\r' && s.get(i + 1) == Some(&b'\n');
                i += if crlf { 2 } else { 1 };
                if line_start {
                    ends.push(i);
                }
                line_start = true;
            }
            _ => {
                line_start = false;
                i += 1;
            }
        }
    }
    ends
}

/// Frames with an LF that starts a frame (or the rest) after a frame ending in CR moved
/// back to that frame, as framing the whole stream at once places it.
fn crlf_joined(mut frames: Vec<Vec<u8>>, mut rest: Vec<u8>) -> (Vec<Vec<u8>>, Vec<u8>) {
    for i in 1..=frames.len() {
        let (before, after) = frames.split_at_mut(i);
        let next = after.first_mut().unwrap_or(&mut rest);
        let prev = &mut before[i - 1];
        if prev.ends_with(b"\r") && next.first() == Some(&b'\n') {
            prev.push(next.remove(0));
        }
    }
    frames.retain(|f| !f.is_empty());
    (frames, rest)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = kube_gateway_fuzz::input(data, 0) else {
        return;
    };
    let stream = input.body;
    let (whole, whole_rest) = frame(&[stream]);
    let mut at = 0;
    let ends: Vec<usize> = whole
        .iter()
        .map(|f| {
            at += f.len();
            at
        })
        .collect();
    assert_eq!(ends, reference_ends(stream), "frames of the whole stream");
    assert_eq!(&stream[at..], &whole_rest[..]);

    let chunks = pieces(stream, &input.cuts);
    let (split, split_rest) = frame(&chunks);
    let unbounded = (split.clone(), split_rest.clone());
    for max in FRAME_LIMITS {
        check_bounded::<SseBoundary>(&chunks, max, &unbounded);
    }
    let mut joined = split.concat();
    joined.extend_from_slice(&split_rest);
    assert_eq!(joined, stream, "bytes lost or added");
    let events = |frames: &[Vec<u8>]| frames.iter().map(|f| parse_event(f)).collect::<Vec<_>>();
    assert_eq!(events(&split), events(&whole), "events differ");
    assert_eq!(
        crlf_joined(split, split_rest),
        (whole.clone(), whole_rest),
        "frames differ"
    );

    for raw in &whole {
        let ev = parse_event(raw);
        let bytes = sse::data(raw).map(|d| String::from_utf8_lossy(&d).into_owned());
        assert_eq!(
            bytes, ev.data,
            "the data bytes differ from the parsed event's"
        );
        let rewritten = parse_event(&with_data(raw, "{\"a\":1}"));
        let expected = SseEvent {
            event: ev.event.clone(),
            data: ev.data.as_ref().map(|_| "{\"a\":1}".to_owned()),
        };
        assert_eq!(rewritten, expected, "with_data changed more than the data");
    }
});
