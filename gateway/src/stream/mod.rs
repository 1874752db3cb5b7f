//! Incremental framing of streamed responses: SSE events and NDJSON lines are found as
//! bytes arrive, however the upstream's reads split them.
//!
//! A framer releases bytes as soon as the frame they end is complete. A client cannot
//! act on part of an event, so this adds no latency it can see, and it lets the gateway
//! end a broken stream with a well-formed error frame instead of after half a frame.

pub mod ndjson;
pub mod sse;

use bytes::{Bytes, BytesMut};

/// Finds where frames end.
pub trait Boundary: Default {
    /// The end (exclusive) of the first frame ending in `buf[from..]`, or `None` when the
    /// bytes so far end none. Called with increasing `from` over a growing buffer, and
    /// with `from` restarted at 0 after the caller removed the bytes before it.
    fn scan(&mut self, buf: &[u8], from: usize) -> Option<usize>;
}

/// Complete frames released by one push: their bytes and where each ends in them.
#[derive(Debug, Default)]
pub struct Frames {
    pub bytes: Bytes,
    pub ends: Vec<usize>,
}

impl Frames {
    /// Each frame's raw bytes.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let frame = &self.bytes[start..end];
            start = end;
            frame
        })
    }
}

/// Buffers a stream's bytes until they make complete frames.
#[derive(Debug, Default)]
pub struct Framer<B: Boundary> {
    buf: BytesMut,
    scanned: usize,
    boundary: B,
}

impl<B: Boundary> Framer<B> {
    pub fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            boundary: B::default(),
        }
    }

    /// Adds a chunk and releases every frame it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Frames {
        self.buf.extend_from_slice(chunk);
        let mut ends = Vec::new();
        let mut from = self.scanned;
        while let Some(end) = self.boundary.scan(&self.buf, from) {
            ends.push(end);
            from = end;
        }
        let complete = ends.last().copied().unwrap_or(0);
        self.scanned = self.buf.len() - complete;
        Frames {
            bytes: self.buf.split_to(complete).freeze(),
            ends,
        }
    }

    /// Bytes held for an incomplete frame.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// At the end of the stream: whatever incomplete frame is left.
    pub fn take_rest(&mut self) -> Bytes {
        self.scanned = 0;
        self.boundary = B::default();
        self.buf.split().freeze()
    }
}
