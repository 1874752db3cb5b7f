//! Helpers the fuzz targets share: reading an input's header (choices and cut points,
//! with `arbitrary`), cutting its body into the pieces a network read (or an
//! upstream's token stream) might deliver it in, and the check of a bounded framer
//! against an unbounded one (a choice picks an endpoint from `Endpoint::ALL`).
//!
//! Every target's input is a few header bytes, then the body as it is, so that seeds
//! are easy to write by hand (`fuzz/corpus/README.md`): one byte per choice, one byte
//! for the number of cuts (0-16), two bytes per cut, then the body.

use arbitrary::Unstructured;
use kube_gateway::stream::{Boundary, Framer, Piece};

/// An input: its choice bytes, its cuts, its body.
pub struct Input<'a> {
    pub choices: Vec<u8>,
    pub cuts: Vec<u16>,
    pub body: &'a [u8],
}

/// Reads `n_choices` choice bytes, the cuts, and the rest as the body.
pub fn input(data: &[u8], n_choices: usize) -> Option<Input<'_>> {
    let mut u = Unstructured::new(data);
    let mut choices = Vec::with_capacity(n_choices);
    for _ in 0..n_choices {
        choices.push(u.arbitrary::<u8>().ok()?);
    }
    let n = u.int_in_range(0..=16u8).ok()?;
    let mut cuts = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        cuts.push(u.arbitrary::<u16>().ok()?);
    }
    Some(Input {
        choices,
        cuts,
        body: u.take_rest(),
    })
}

/// `data` cut at `cuts` (each taken modulo `data.len() + 1`, in sorted order): the
/// pieces, empty ones included, whose concatenation is `data`.
pub fn pieces<'a>(data: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (data.len() + 1))
        .collect();
    at.sort_unstable();
    let mut out = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for c in at {
        out.push(&data[start..c]);
        start = c;
    }
    out.push(&data[start..]);
    out
}

/// [`pieces`] of a text, each cut moved back to a character boundary.
pub fn text_pieces<'a>(text: &'a str, cuts: &[u16]) -> Vec<&'a str> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|&c| {
            let mut i = usize::from(c) % (text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            i
        })
        .collect();
    at.sort_unstable();
    let mut out = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for c in at {
        out.push(&text[start..c]);
        start = c;
    }
    out.push(&text[start..]);
    out
}

/// The limits the bounded framers are fuzzed with: small, so that ordinary inputs cross
/// them (the framer's logic does not depend on the size).
pub const FRAME_LIMITS: [usize; 3] = [1, 7, 64];

/// Frames `chunks` holding at most `max` bytes of one frame, checking that no more is
/// ever held, and checks the result against `unbounded` (the frames and the rest an
/// unbounded framer gives for the same pieces): a frame too large to hold comes out as
/// one run of oversize pieces (first marked once, longer than `max`), the rest as it
/// came; rebuilt, the same frames and rest.
pub fn check_bounded<B: Boundary>(
    chunks: &[&[u8]],
    max: usize,
    unbounded: &(Vec<Vec<u8>>, Vec<u8>),
) {
    let mut framer: Framer<B> = Framer::with_max(max);
    // Complete frames, a run counted as one once something after it shows it ended.
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut run: Option<Vec<u8>> = None;
    let close = |run: &mut Option<Vec<u8>>, frames: &mut Vec<Vec<u8>>| {
        if let Some(r) = run.take() {
            assert!(
                r.len() > max,
                "an oversize run of {} bytes, limit {max}",
                r.len()
            );
            frames.push(r);
        }
    };
    for chunk in chunks {
        let out = framer.push(chunk);
        let mut len = 0;
        for piece in out.iter() {
            match piece {
                Piece::Frame(f) => {
                    close(&mut run, &mut frames);
                    assert!(!f.is_empty(), "an empty frame");
                    len += f.len();
                    frames.push(f.to_vec());
                }
                Piece::Oversize { bytes, first } => {
                    len += bytes.len();
                    if first {
                        close(&mut run, &mut frames);
                        run = Some(Vec::new());
                    }
                    run.as_mut()
                        .expect("an oversize piece without a first one")
                        .extend_from_slice(bytes);
                }
            }
        }
        assert_eq!(len, out.bytes.len(), "bytes outside the pieces");
        assert!(framer.pending() <= max, "held {} > {max}", framer.pending());
    }
    let rest = framer.take_rest().to_vec();
    let (whole, whole_rest) = unbounded;
    match run {
        None => assert_eq!((&frames, &rest), (whole, whole_rest), "bounded by {max}"),
        Some(run) => {
            assert!(
                run.len() > max,
                "an oversize run of {} bytes, limit {max}",
                run.len()
            );
            // The last run either ended its frame exactly at a read's end, or is the
            // start of the unfinished rest.
            let mut with_run = frames.clone();
            with_run.push(run.clone());
            let ended = with_run == *whole && rest == *whole_rest;
            let unfinished = frames == *whole && [run, rest].concat() == *whole_rest;
            assert!(ended || unfinished, "bounded by {max}: the frames differ");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_join_to_the_input() {
        let data = b"abcdef";
        assert_eq!(pieces(data, &[4, 2, 9]).concat(), data);
        assert_eq!(pieces(data, &[4, 2]), [&b"ab"[..], b"cd", b"ef"]);
        let i = input(b"\x07\x01\x02\x00body", 1).unwrap();
        assert_eq!(
            (i.choices, i.cuts.len(), i.body),
            (vec![7], 1, &b"body"[..])
        );
        assert_eq!(pieces(b"", &[3]), [&b""[..], b""]);
        let text = "aé€b";
        for c in 0..10 {
            assert_eq!(text_pieces(text, &[c, c + 1]).concat(), text);
        }
    }
}
