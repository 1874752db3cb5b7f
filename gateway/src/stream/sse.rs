//! Server-sent events (OpenAI streams): events end at a blank line; lines end in LF, CR
//! or CRLF; `data` lines join with LF (the WHATWG event-stream rules).

use std::borrow::Cow;

use super::Boundary;

/// Event boundaries of an SSE stream.
#[derive(Debug)]
pub struct SseBoundary {
    at_line_start: bool,
    /// The last byte seen was a CR: an LF right after it belongs to the same line end.
    after_cr: bool,
}

impl Default for SseBoundary {
    fn default() -> Self {
        Self {
            at_line_start: true,
            after_cr: false,
        }
    }
}

impl Boundary for SseBoundary {
    fn scan(&mut self, buf: &[u8], from: usize) -> Option<usize> {
        let mut i = from;
        while i < buf.len() {
            if !self.at_line_start && !self.after_cr {
                // Inside a line only a line end changes the state: jump to the next one.
                i += memchr::memchr2(b'\n', b'\r', &buf[i..])?;
            }
            let b = buf[i];
            i += 1;
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    if self.at_line_start {
                        // A blank line: the event ends here (with the LF of a CRLF if seen).
                        if self.after_cr && buf.get(i) == Some(&b'\n') {
                            self.after_cr = false;
                            i += 1;
                        }
                        return Some(i);
                    }
                    self.at_line_start = true;
                }
                _ => self.at_line_start = false,
            }
        }
        None
    }
}

/// One event's fields.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    /// The `data` lines joined by LF; `None` when the event had no data line.
    pub data: Option<String>,
}

impl SseEvent {
    /// Whether this is OpenAI's end-of-stream marker.
    pub fn is_done(&self) -> bool {
        self.data.as_deref().is_some_and(|d| is_done(d.as_bytes()))
    }
}

/// Whether an event's data is OpenAI's end-of-stream marker.
pub fn is_done(data: &[u8]) -> bool {
    data == b"[DONE]"
}

fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = raw;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        let mut next = end;
        if rest.get(end) == Some(&b'\r') && rest.get(end + 1) == Some(&b'\n') {
            next += 2;
        } else if end < rest.len() {
            next += 1;
        }
        rest = &rest[next..];
        Some(line)
    })
}

/// A line's field name and value (one space after the colon is not part of it).
fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b':', line) {
        Some(p) => {
            let v = &line[p + 1..];
            (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
        }
        None => (line, &b""[..]),
    }
}

/// An event's data (its `data` lines joined by LF), as bytes: borrowed from `raw` when
/// one line holds it, as it does in every LLM stream. `None` when it has no data line.
/// The same data as [`parse_event`]'s, without its reading of invalid UTF-8 as U+FFFD
/// (the JSON readers after it do that).
pub fn data(raw: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in lines(raw) {
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (name, value) = field(line);
        if name != b"data" {
            continue;
        }
        data = Some(match data {
            None => Cow::Borrowed(value),
            Some(joined) => {
                let mut joined = joined.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
    data
}

/// Parses one event's raw bytes (as released by the framer).
pub fn parse_event(raw: &[u8]) -> SseEvent {
    let mut ev = SseEvent::default();
    for line in lines(raw) {
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (name, value) = field(line);
        let value = String::from_utf8_lossy(value);
        match name {
            b"data" => match &mut ev.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => ev.data = Some(value.into_owned()),
            },
            b"event" => ev.event = Some(value.into_owned()),
            _ => {}
        }
    }
    ev
}

/// Rebuilds an event with new data, keeping its other lines as they were.
pub fn with_data(raw: &[u8], data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut wrote_data = false;
    for line in lines(raw) {
        if line.is_empty() {
            continue;
        }
        if line.starts_with(b"data:") || line == b"data" {
            if !std::mem::replace(&mut wrote_data, true) {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(data.as_bytes());
                out.push(b'\n');
            }
            continue;
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Framer;
    use proptest::prelude::*;

    const STREAM: &[u8] = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: response.created\ndata: {\"b\":\ndata: 2}\r\n\r\ndata: x\rdata: y\r\rid: 7\ndata: [DONE]\n\n";

    fn events_of(chunks: &[&[u8]]) -> (Vec<SseEvent>, Vec<u8>) {
        let mut framer: Framer<SseBoundary> = Framer::new();
        let mut events = Vec::new();
        let mut bytes = Vec::new();
        for chunk in chunks {
            let frames = framer.push(chunk);
            bytes.extend_from_slice(&frames.bytes);
            events.extend(frames.complete().map(parse_event));
        }
        bytes.extend_from_slice(&framer.take_rest());
        (events, bytes)
    }

    #[test]
    fn data_is_borrowed_from_one_line_and_joined_from_several() {
        let one = b"event: x\r\ndata: {\"a\":1}\r\n: note\r\n\r\n";
        assert!(matches!(data(one), Some(Cow::Borrowed(b"{\"a\":1}"))));
        let two = b"data:a\ndata\ndata: b\n\n";
        assert_eq!(data(two).as_deref(), Some(&b"a\n\nb"[..]));
        assert_eq!(data(b": only a comment\n\n"), None);
        for raw in [&one[..], two, b"data: \xff\n\n"] {
            let lossy = data(raw).map(|d| String::from_utf8_lossy(&d).into_owned());
            assert_eq!(lossy, parse_event(raw).data);
        }
    }

    #[test]
    fn parses_fields_comments_and_line_endings() {
        let (events, bytes) = events_of(&[STREAM]);
        assert_eq!(bytes, STREAM);
        let data: Vec<_> = events.iter().map(|e| e.data.clone()).collect();
        assert_eq!(
            data,
            vec![
                Some("{\"a\":1}".to_owned()),
                None,
                Some("{\"b\":\n2}".to_owned()),
                Some("x\ny".to_owned()),
                Some("[DONE]".to_owned())
            ]
        );
        assert_eq!(events[2].event.as_deref(), Some("response.created"));
        assert!(events[4].is_done());
    }

    #[test]
    fn every_single_split_gives_the_same_events_and_bytes() {
        let whole = events_of(&[STREAM]);
        for cut in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(cut);
            assert_eq!(events_of(&[a, b]), whole, "split at byte {cut}");
        }
    }

    #[test]
    fn byte_by_byte_gives_the_same_events() {
        let chunks: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(events_of(&chunks), events_of(&[STREAM]));
    }

    #[test]
    fn incomplete_event_is_held_until_its_end() {
        let mut framer: Framer<SseBoundary> = Framer::new();
        assert!(framer.push(b"data: {\"a\"").bytes.is_empty());
        assert_eq!(framer.pending(), 10);
        let frames = framer.push(b":1}\n\ndata: next");
        assert_eq!(&frames.bytes[..], b"data: {\"a\":1}\n\n");
        assert_eq!(&framer.take_rest()[..], b"data: next");
    }

    #[test]
    fn with_data_replaces_only_data() {
        let raw = b"event: x\ndata: {\"a\":1,\ndata: \"usage\":null}\nid: 3\n\n";
        assert_eq!(
            with_data(raw, "{\"a\":1}"),
            b"event: x\ndata: {\"a\":1}\nid: 3\n\n"
        );
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(0..STREAM.len(), 0..12)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for c in cuts {
                chunks.push(&STREAM[start..c]);
                start = c;
            }
            chunks.push(&STREAM[start..]);
            prop_assert_eq!(events_of(&chunks), events_of(&[STREAM]));
        }
    }
}
