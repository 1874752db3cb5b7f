//! Incremental framing of streamed responses: SSE events and NDJSON lines are found as
//! bytes arrive, however the upstream's reads split them.
//!
//! A framer releases bytes as soon as the frame they end is complete. A client cannot
//! act on part of an event, so this adds no latency it can see, and it lets the gateway
//! end a broken stream with a well-formed error frame instead of after half a frame.

pub mod ndjson;
mod output;
pub mod sse;

pub use output::Output;

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Finds where frames end.
pub trait Boundary: Default {
    /// The end (exclusive) of the first frame ending in `buf[from..]`, or `None` when the
    /// bytes so far end none. Called with increasing `from` over a growing buffer, and
    /// with `from` restarted at 0 after the caller removed the bytes before it.
    fn scan(&mut self, buf: &[u8], from: usize) -> Option<usize>;
}

/// One piece of a stream released by a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A complete frame.
    Frame(&'a [u8]),
    /// Part of a frame larger than the framer holds, released as it came (its first
    /// piece is the one with `first` set).
    Oversize { bytes: &'a [u8], first: bool },
}

#[derive(Debug, Clone, Copy)]
struct Cut {
    end: usize,
    kind: CutKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CutKind {
    Frame,
    OversizeFirst,
    Oversize,
}

/// The pieces released by one push: their bytes and where each ends in them.
#[derive(Debug, Default)]
pub struct Frames {
    pub bytes: Bytes,
    cuts: Vec<Cut>,
}

impl Frames {
    /// Each piece, in order.
    pub fn iter(&self) -> impl Iterator<Item = Piece<'_>> {
        self.iter_at().map(|(_, piece)| piece)
    }

    /// Each piece with where it is in [`bytes`](Self::bytes), in order.
    pub fn iter_at(&self) -> impl Iterator<Item = (Range<usize>, Piece<'_>)> {
        let mut start = 0;
        self.cuts.iter().map(move |cut| {
            let at = start..cut.end;
            let bytes = &self.bytes[at.clone()];
            start = cut.end;
            let piece = match cut.kind {
                CutKind::Frame => Piece::Frame(bytes),
                CutKind::OversizeFirst => Piece::Oversize { bytes, first: true },
                CutKind::Oversize => Piece::Oversize {
                    bytes,
                    first: false,
                },
            };
            (at, piece)
        })
    }

    /// The complete frames only.
    pub fn complete(&self) -> impl Iterator<Item = &[u8]> {
        self.iter().filter_map(|p| match p {
            Piece::Frame(f) => Some(f),
            Piece::Oversize { .. } => None,
        })
    }

    /// `Some(first)` when the push released nothing but one piece of an oversize frame.
    pub fn single_oversize(&self) -> Option<bool> {
        match self.cuts.as_slice() {
            [Cut {
                kind: CutKind::OversizeFirst,
                ..
            }] => Some(true),
            [Cut {
                kind: CutKind::Oversize,
                ..
            }] => Some(false),
            _ => None,
        }
    }

    /// Whether every piece is a complete frame.
    pub fn all_framed(&self) -> bool {
        self.cuts.iter().all(|c| c.kind == CutKind::Frame)
    }
}

/// Buffers a stream's bytes until they make complete frames, holding at most `max`
/// bytes of one frame: past that, the frame's bytes are released as they come
/// ([`Piece::Oversize`]) until its end, so one huge event costs at most `max` plus a
/// read, never its own size.
#[derive(Debug)]
pub struct Framer<B: Boundary> {
    buf: BytesMut,
    scanned: usize,
    boundary: B,
    max: usize,
    /// The frame being read is over `max`: its bytes go out as they arrive.
    oversize: bool,
}

impl<B: Boundary> Default for Framer<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Boundary> Framer<B> {
    /// A framer without a size limit.
    pub fn new() -> Self {
        Self::with_max(usize::MAX)
    }

    /// A framer holding at most `max` bytes of one frame.
    pub fn with_max(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            boundary: B::default(),
            max,
            oversize: false,
        }
    }

    /// Adds a chunk and releases every frame it completes (and the bytes of a frame
    /// too large to hold).
    pub fn push(&mut self, chunk: &[u8]) -> Frames {
        self.extend(chunk);
        let held = std::mem::take(&mut self.buf);
        let cuts = self.cuts(&held, self.scanned);
        self.buf = held;
        let released = cuts.last().map_or(0, |c| c.end);
        Frames {
            bytes: self.buf.split_to(released).freeze(),
            cuts,
        }
    }

    /// [`push`](Self::push) for a chunk the caller owns: with nothing held from earlier
    /// chunks, the frames it completes go out as slices of it (no copy); only its
    /// unfinished tail is kept.
    pub fn push_bytes(&mut self, chunk: Bytes) -> Frames {
        if !self.buf.is_empty() || self.oversize {
            return self.push(&chunk);
        }
        let cuts = self.cuts(&chunk, 0);
        let released = cuts.last().map_or(0, |c| c.end);
        self.extend(&chunk[released..]);
        Frames {
            bytes: chunk.slice(..released),
            cuts,
        }
    }

    /// Where the frames of `buf` (what the framer holds, this chunk included) end, from
    /// `from` on; its unfinished rest is one more piece when it is part of a frame too
    /// large to hold. Notes what was scanned for the next push.
    fn cuts(&mut self, buf: &[u8], mut from: usize) -> Vec<Cut> {
        let mut cuts = Vec::new();
        while let Some(end) = self.boundary.scan(buf, from) {
            // The end of an oversize frame is released as its last piece.
            let kind = if std::mem::take(&mut self.oversize) {
                CutKind::Oversize
            } else {
                CutKind::Frame
            };
            cuts.push(Cut { end, kind });
            from = end;
        }
        let complete = cuts.last().map_or(0, |c| c.end);
        let pending = buf.len() - complete;
        if pending > 0 && (self.oversize || pending > self.max) {
            let kind = if std::mem::replace(&mut self.oversize, true) {
                CutKind::Oversize
            } else {
                CutKind::OversizeFirst
            };
            cuts.push(Cut {
                end: buf.len(),
                kind,
            });
            self.scanned = 0;
        } else {
            self.scanned = pending;
        }
        cuts
    }

    /// Appends `chunk`. A frame past 64 KiB gets room for the whole limit (plus this
    /// chunk) at once: growing by doubling would leave a trail of freed buffers (as much
    /// again as the last one) that the allocator returns only later, and copy the frame
    /// at each step. Room not written to costs no memory: the pages are never touched.
    fn extend(&mut self, chunk: &[u8]) {
        let need = self.buf.len() + chunk.len();
        // Small buffers (every ordinary event) grow as BytesMut does, reusing its space.
        if need > self.buf.capacity() && need > 64 * 1024 && self.max != usize::MAX {
            let cap = self.max.saturating_add(chunk.len()).max(need);
            let mut grown = BytesMut::with_capacity(cap);
            grown.extend_from_slice(&self.buf);
            self.buf = grown;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held for an incomplete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// At the end of the stream: whatever incomplete frame is left.
    pub fn take_rest(&mut self) -> Bytes {
        self.scanned = 0;
        self.oversize = false;
        self.boundary = B::default();
        self.buf.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Frames of 10, 3,000 and 40 bytes, then an unfinished one.
    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        for n in [10, 3_000, 40] {
            s.extend(std::iter::repeat_n(b'x', n - 1));
            s.push(b'\n');
        }
        s.extend_from_slice(b"tail");
        s
    }

    /// Pushes `chunks`; returns what came out as (piece, oversize, first) and the most
    /// bytes held at once.
    fn run(max: usize, chunks: &[&[u8]]) -> (Vec<(Vec<u8>, bool, bool)>, usize) {
        run_with::<ndjson::LineBoundary>(max, chunks, false)
    }

    /// `run` for any framing; `owned`: each chunk given as `Bytes` (`push_bytes`).
    fn run_with<B: Boundary>(
        max: usize,
        chunks: &[&[u8]],
        owned: bool,
    ) -> (Vec<(Vec<u8>, bool, bool)>, usize) {
        let mut f: Framer<B> = Framer::with_max(max);
        let mut out = Vec::new();
        let mut held = 0;
        for c in chunks {
            let frames = if owned {
                f.push_bytes(Bytes::copy_from_slice(c))
            } else {
                f.push(c)
            };
            held = held.max(f.pending());
            for p in frames.iter() {
                out.push(match p {
                    Piece::Frame(b) => (b.to_vec(), false, false),
                    Piece::Oversize { bytes, first } => (bytes.to_vec(), true, first),
                });
            }
        }
        out.push((f.take_rest().to_vec(), false, false));
        (out, held)
    }

    #[test]
    fn a_frame_over_the_limit_is_released_as_it_comes() {
        let s = stream();
        let chunks: Vec<&[u8]> = s.chunks(100).collect();
        let (out, held) = run(1_000, &chunks);
        assert!(held <= 1_000 + 100, "held {held}");
        let bytes: Vec<u8> = out.iter().flat_map(|p| p.0.clone()).collect();
        assert_eq!(bytes, s);
        // The small frames are frames; the big one is oversize pieces, the first marked.
        assert_eq!(out[0], (s[..10].to_vec(), false, false));
        let big: Vec<_> = out.iter().filter(|p| p.1).collect();
        assert!(big.len() > 1);
        assert!(big[0].2 && big[1..].iter().all(|p| !p.2));
        assert_eq!(big.iter().map(|p| p.0.len()).sum::<usize>(), 3_000);
        assert!(out.contains(&(s[3_010..3_050].to_vec(), false, false)));
        assert_eq!(out.last().unwrap().0, b"tail");
    }

    #[test]
    fn the_buffer_grows_once_past_64_kib_and_never_past_the_limit_and_a_read() {
        let max = 200_000;
        let mut f: Framer<ndjson::LineBoundary> = Framer::with_max(max);
        let mut big = vec![b'x'; 1_000_000];
        big.push(b'\n');
        let mut out = 0;
        let mut widest_capacity = 0;
        for chunk in big.chunks(10_000) {
            out += f.push(chunk).bytes.len();
            widest_capacity = widest_capacity.max(f.buf.capacity());
        }
        assert_eq!(out, big.len());
        // Doubling alone would have reached 262,144 (past the limit) on the way.
        assert!(widest_capacity <= max + 10_000, "{widest_capacity}");

        // While the frame is held: past 64 KiB, one allocation for it (after BytesMut's
        // own last doubling), not a trail of doublings (128, 256, 512 KiB, 1 MB).
        let max = 1_000_000;
        let mut f: Framer<ndjson::LineBoundary> = Framer::with_max(max);
        let mut sizes = Vec::new();
        for chunk in vec![b'x'; 2 * max].chunks(1_000) {
            f.push(chunk);
            if f.oversize {
                break;
            }
            if f.buf.capacity() > 64 * 1024 && sizes.last() != Some(&f.buf.capacity()) {
                sizes.push(f.buf.capacity());
            }
        }
        assert_eq!(sizes, [128_000, max + 1_000]);
    }

    proptest! {
        /// Any chunking: the bytes come out unchanged and in order; a frame within the
        /// limit is always one frame; nothing larger than the limit plus a chunk is held.
        #[test]
        fn any_chunking_keeps_bytes_and_small_frames(cuts in proptest::collection::vec(0usize..3_054, 0..20)) {
            let s = stream();
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            let mut widest = 0;
            for c in cuts.into_iter().chain([s.len()]) {
                chunks.push(&s[start..c]);
                widest = widest.max(c - start);
                start = c;
            }
            let (out, held) = run(1_000, &chunks);
            prop_assert!(held <= 1_000 + widest);
            let bytes: Vec<u8> = out.iter().flat_map(|p| p.0.clone()).collect();
            prop_assert_eq!(&bytes, &s);
            prop_assert!(out.contains(&(s[..10].to_vec(), false, false)));
            prop_assert!(out.contains(&(s[3_010..3_050].to_vec(), false, false)));
            prop_assert!(out.iter().filter(|p| p.2).count() <= 1);
        }

        /// A chunk given as `Bytes` frames exactly as one given as a slice: the same
        /// pieces, the same bytes held, SSE and NDJSON, under any limit.
        #[test]
        fn owned_chunks_frame_as_borrowed_ones(
            events in proptest::collection::vec(
                prop_oneof![Just("data: a\n\n"), Just("data: bb\r\n\r\n"), Just("x\n"),
                    Just(": c\n\n"), Just("data: d\ndata: e\n\n"), Just("yy"), Just("\r")],
                0..40),
            cuts in proptest::collection::vec(0usize..400, 0..12),
            max in prop_oneof![Just(4usize), Just(16), Just(1_000)],
        ) {
            let s: Vec<u8> = events.concat().into_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(s.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for c in cuts.into_iter().chain([s.len()]) {
                chunks.push(&s[start..c]);
                start = c;
            }
            prop_assert_eq!(
                run_with::<ndjson::LineBoundary>(max, &chunks, true),
                run_with::<ndjson::LineBoundary>(max, &chunks, false)
            );
            prop_assert_eq!(
                run_with::<sse::SseBoundary>(max, &chunks, true),
                run_with::<sse::SseBoundary>(max, &chunks, false)
            );
        }
    }
}
