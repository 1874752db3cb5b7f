//! Newline-delimited JSON (Ollama streams): one object a line, LF-terminated.

use super::Boundary;

/// Line boundaries of an NDJSON stream.
#[derive(Debug, Default)]
pub struct LineBoundary;

impl Boundary for LineBoundary {
    fn scan(&mut self, buf: &[u8], from: usize) -> Option<usize> {
        memchr::memchr(b'\n', &buf[from..]).map(|p| from + p + 1)
    }
}

/// A line's JSON text without its line end; `None` for a blank line.
pub fn line_json(raw: &[u8]) -> Option<&[u8]> {
    let trimmed = raw.strip_suffix(b"\n").unwrap_or(raw);
    let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
    (!trimmed.iter().all(u8::is_ascii_whitespace)).then_some(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Framer;

    const STREAM: &[u8] = b"{\"message\":{\"content\":\"a\"},\"done\":false}\n\n{\"x\":\"\\n\"}\r\n{\"done\":true,\"eval_count\":2}\n";

    fn lines_of(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut framer: Framer<LineBoundary> = Framer::new();
        let mut out = Vec::new();
        for chunk in chunks {
            let frames = framer.push(chunk);
            out.extend(frames.complete().filter_map(line_json).map(<[u8]>::to_vec));
        }
        out
    }

    #[test]
    fn every_split_gives_the_same_lines() {
        let whole = lines_of(&[STREAM]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[1], b"{\"x\":\"\\n\"}");
        for cut in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(cut);
            assert_eq!(lines_of(&[a, b]), whole, "split at byte {cut}");
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(lines_of(&bytes), whole);
    }
}
