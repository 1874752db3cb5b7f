//! NDJSON framing (`gateway/src/stream/ndjson.rs`) fed an arbitrary stream in arbitrary
//! pieces. Checked against the stream framed at once, which is itself checked against
//! the stream's LF-ended lines: the same lines, the same JSON text of each, no byte lost
//! or added. Framers bounded by `--max-event-bytes` (`Framer::with_max`) give the same
//! frames, a frame too large to hold as one run of oversize pieces (`check_bounded`).
#![no_main]

use kube_gateway::stream::ndjson::{line_json, LineBoundary};
use kube_gateway::stream::Framer;
use kube_gateway_fuzz::{check_bounded, pieces, FRAME_LIMITS};
use libfuzzer_sys::fuzz_target;

/// Every line's bytes, then what was left at the end.
fn frame(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut framer: Framer<LineBoundary> = Framer::new();
    let mut lines = Vec::new();
    for chunk in chunks {
        let out = framer.push(chunk);
        assert!(
            out.all_framed(),
            "an unbounded framer released part of a line"
        );
        let before = lines.len();
        lines.extend(out.complete().map(<[u8]>::to_vec));
        let len: usize = lines[before..].iter().map(Vec::len).sum();
        assert_eq!(len, out.bytes.len(), "bytes beyond the last line's end");
    }
    (lines, framer.take_rest().to_vec())
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = kube_gateway_fuzz::input(data, 0) else {
        return;
    };
    let stream = input.body;
    let (whole, whole_rest) = frame(&[stream]);
    let mut reference: Vec<Vec<u8>> = stream
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    let reference_rest = match reference.last() {
        Some(l) if !l.ends_with(b"\n") => reference.pop().unwrap_or_default(),
        _ => Vec::new(),
    };
    assert_eq!(whole, reference, "lines of the whole stream");
    assert_eq!(whole_rest, reference_rest);

    let chunks = pieces(stream, &input.cuts);
    let (split, split_rest) = frame(&chunks);
    let unbounded = (split.clone(), split_rest.clone());
    for max in FRAME_LIMITS {
        check_bounded::<LineBoundary>(&chunks, max, &unbounded);
    }
    assert_eq!(split, whole, "lines differ");
    assert_eq!(split_rest, whole_rest);
    for line in &split {
        if let Some(json) = line_json(line) {
            assert!(!json.ends_with(b"\n") && !json.is_empty());
            assert!(line.starts_with(json), "line_json is not the line's start");
        }
    }
});
