//! The bytes a rewritten stream sends for one push of frames: the input's own bytes while
//! its frames go out as they came (shared, not copied), a new buffer from the first frame
//! that changes. Under response rules most events go out as they came, and copying every
//! one into a new buffer cost as much as reading it.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// The output of one push, built frame by frame in order.
pub struct Output<'a> {
    src: &'a Bytes,
    buf: BytesMut,
    /// Bytes of `src` that go out as they came, not yet copied into `buf`.
    run: Range<usize>,
}

impl<'a> Output<'a> {
    pub fn new(src: &'a Bytes) -> Self {
        Self {
            src,
            buf: BytesMut::new(),
            run: 0..0,
        }
    }

    /// `src[range]` goes out as it came. Ranges come in order and do not overlap.
    pub fn keep(&mut self, range: Range<usize>) {
        if self.run.is_empty() {
            self.run = range;
        } else if self.run.end == range.start {
            self.run.end = range.end;
        } else {
            // Something between went out changed, or not at all.
            self.flush();
            self.run = range;
        }
    }

    /// The buffer to write a changed frame into, after what was kept before it.
    pub fn buf(&mut self) -> &mut BytesMut {
        self.flush();
        &mut self.buf
    }

    fn flush(&mut self) {
        if self.buf.capacity() == 0 {
            // Room for the whole push, as if every frame were copied: one allocation.
            self.buf.reserve(self.src.len() + 256);
        }
        self.buf.extend_from_slice(&self.src[self.run.clone()]);
        self.run = self.run.end..self.run.end;
    }

    /// What goes out: a slice of the input when only kept frames did.
    pub fn finish(mut self) -> Bytes {
        if self.buf.is_empty() {
            return self.src.slice(self.run);
        }
        self.flush();
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_frames_are_the_input_itself() {
        let src = Bytes::from_static(b"one\ntwo\nthree\n");
        let mut out = Output::new(&src);
        out.keep(0..4);
        out.keep(4..8);
        out.keep(8..14);
        let sent = out.finish();
        assert_eq!(sent, src);
        assert_eq!(sent.as_ptr(), src.as_ptr(), "not copied");
    }

    #[test]
    fn changed_dropped_and_kept_frames_go_out_in_order() {
        let src = Bytes::from_static(b"one\ntwo\nthree\nfour\n");
        let mut out = Output::new(&src);
        out.keep(0..4);
        out.buf().extend_from_slice(b"TWO\n");
        // three dropped
        out.keep(14..19);
        out.buf().extend_from_slice(b"five\n");
        assert_eq!(out.finish(), Bytes::from_static(b"one\nTWO\nfour\nfive\n"));

        let mut out = Output::new(&src);
        out.keep(0..4);
        // two and three dropped: the gap is not sent.
        out.keep(14..19);
        assert_eq!(out.finish(), Bytes::from_static(b"one\nfour\n"));

        let mut out = Output::new(&src);
        out.keep(4..8);
        assert_eq!(out.finish(), Bytes::from_static(b"two\n"));
        assert_eq!(Output::new(&src).finish(), Bytes::new());
    }
}
