//! Reading a stream's events by their shape. The events of one LLM stream are the same
//! object over and over: the same keys in the same order, the same envelope (`id`,
//! `model`, `created`), and a different piece of text. Once an event has been read in
//! full ([`StreamEvent::parse`]), it becomes the stream's [`Template`]: its bytes and
//! the place of each literal the dialect's reader ignores or takes as the text or the
//! model. A later event is read against it: compared byte for byte, and where the two
//! differ, only inside such a literal, that literal is scanned in the new event (a
//! string or number of the same kind), so the event is read without a parse. Anything
//! else that differs (a key, a finish reason, a usage count, the structure) sends the
//! event to the full read, which then makes the next template.
//!
//! Why this is exact: an event that equals the template but for literals replaced by
//! valid literals of the same kind has the template's structure, keys and every value
//! the reader looks at except those literals; what the reader reports then differs from
//! the template's report only by the text and model literals, whose new values are
//! read here. Every replaced literal is checked as a JSON literal (escapes, control
//! characters, UTF-8, number syntax) and anything doubtful goes to the full read; the
//! `shape_reader` property test and the `usage_extraction` fuzz target hold the two
//! reads to the same report.

use super::event::StreamEvent;
use super::{Endpoint, Observation};

/// Reads one stream's events, keeping the last fully read one as the template.
#[derive(Debug)]
pub struct ShapeReader {
    endpoint: Endpoint,
    template: Option<Template>,
    /// Templates in a row that no event matched: the stream's events do not share a
    /// shape, so building more mostly costs a walk each.
    barren: u32,
    /// Events to read in full before building a template again (after barren ones).
    wait: u32,
    /// An event's text buffer handed back, for the next event's text.
    spare: String,
}

/// The largest text buffer kept for the next event (a stream's events are a few words).
const SPARE_ROOM: usize = 1024;

/// Templates in a row without a match before building one only every
/// [`BARREN_EVERY`] events.
const BARREN_LIMIT: u32 = 3;
const BARREN_EVERY: u32 = 32;

impl ShapeReader {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            template: None,
            barren: 0,
            wait: 0,
            spare: String::new(),
        }
    }

    /// Takes back an event's text once the caller is done with it: the next event's
    /// text is read into its room instead of a new allocation.
    pub fn recycle(&mut self, text: String) {
        if text.capacity() <= SPARE_ROOM && text.capacity() > self.spare.capacity() {
            self.spare = text;
        }
    }

    /// Reads one object as [`StreamEvent::parse`] does: the same report, and the same
    /// text span when the reader saw it.
    pub fn parse<'a>(&mut self, json: &'a [u8]) -> Option<StreamEvent<'a>> {
        if let Some(t) = &mut self.template {
            if let Some(ev) = t.read(self.endpoint, json, &mut self.spare) {
                t.hits += 1;
                return Some(ev);
            }
        }
        let ev = StreamEvent::parse(self.endpoint, json)?;
        self.learn(&ev);
        Some(ev)
    }

    /// Makes `ev` (just read in full) the template, when it can be one.
    fn learn(&mut self, ev: &StreamEvent<'_>) {
        if !supported(self.endpoint) || !ev.read_by_type() {
            return;
        }
        if self.wait > 0 {
            self.wait -= 1;
            return;
        }
        match self.template.take() {
            Some(old) if old.hits == 0 => self.barren += 1,
            Some(_) => self.barren = 0,
            None => {}
        }
        if self.barren >= BARREN_LIMIT {
            self.wait = BARREN_EVERY;
        }
        self.template = Template::build(self.endpoint, ev.json(), &ev.obs);
    }
}

/// The endpoints whose stream events are read by shape (the Responses API's events
/// change shape with their type; embeddings do not stream).
fn supported(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Chat | Endpoint::Generate
    )
}

/// What a literal of the template is to the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Ignored: any literal of the same kind may take its place.
    Ignored,
    /// The generated text.
    Text,
    /// The model's name.
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Num,
}

/// A literal that may differ from event to event: its bytes in the template.
#[derive(Debug, Clone, Copy)]
struct Literal {
    start: usize,
    end: usize,
    kind: Kind,
    role: Role,
}

/// One fully read event of the stream.
#[derive(Debug)]
pub struct Template {
    bytes: Vec<u8>,
    /// In order of place.
    literals: Vec<Literal>,
    obs: Observation,
    /// The text literal, if there is one.
    text: Option<usize>,
    /// Whether the text literal is at the endpoint's text pointer (its span is then the
    /// one a rewrite splices).
    text_at_pointer: bool,
    hits: u64,
}

impl Template {
    /// A template of `json`, which the dialect's typed reader read as `obs`; `None`
    /// when its shape is one this reader does not take (see [`Walk`]).
    pub fn build(endpoint: Endpoint, json: &[u8], obs: &Observation) -> Option<Self> {
        if !supported(endpoint) || std::str::from_utf8(json).is_err() {
            return None;
        }
        let mut walk = Walk {
            endpoint,
            b: json,
            i: 0,
            literals: Vec::with_capacity(16),
            texts: 0,
            text_at_pointer: false,
        };
        let top = match endpoint.dialect() {
            super::Dialect::OpenAi => Ctx::OpenAiTop,
            super::Dialect::Ollama => Ctx::OllamaTop,
        };
        walk.value(top, 0)?;
        walk.ws();
        if walk.i != json.len() || walk.texts > 1 {
            return None;
        }
        // What the reader reported must be what the literals say (a check of the
        // walk's model of the reader, not something the reading relies on).
        let text = walk.literals.iter().position(|l| l.role == Role::Text);
        let text_value =
            text.map(|ti| decode(&json[walk.literals[ti].start..walk.literals[ti].end]));
        match text_value {
            Some(Some(t)) if t == obs.text => {}
            None if obs.text.is_empty() => {}
            _ => return None,
        }
        if let Some(m) = walk.literals.iter().find(|l| l.role == Role::Model) {
            if decode(&json[m.start..m.end]).as_deref() != obs.model.as_deref() {
                return None;
            }
        }
        Some(Self {
            bytes: json.to_vec(),
            literals: walk.literals,
            obs: obs.clone(),
            text,
            text_at_pointer: walk.text_at_pointer && text.is_some(),
            hits: 0,
        })
    }

    /// `json` read as [`StreamEvent::parse`] reads it, when it is this template with
    /// some of its literals replaced by others of the same kind; with the text's span
    /// when it is at the endpoint's text pointer.
    /// `spare`: room for the text, taken (a stream's events hand it back, see
    /// [`ShapeReader::recycle`]). The event is built where it is returned: it is a
    /// couple of hundred bytes, and moving it was a tenth of a line's reading.
    pub fn read<'a>(
        &self,
        endpoint: Endpoint,
        json: &'a [u8],
        spare: &mut String,
    ) -> Option<StreamEvent<'a>> {
        let t = &self.bytes[..];
        let (mut i, mut j) = (0, 0);
        let mut k = 0;
        let mut text = None;
        let mut model = None;
        // How far the template's text literal moved (literals before it changed length).
        let mut text_shift = 0isize;
        loop {
            let same = common_prefix(&json[i..], &t[j..]);
            i += same;
            j += same;
            if i == json.len() && j == t.len() {
                break;
            }
            // The first difference: it must fall in a literal of the template.
            while self.literals.get(k).is_some_and(|l| l.end < j) {
                k += 1;
            }
            let lit = self.literals.get(k)?;
            let inside = lit.start <= j && (j < lit.end || (lit.kind == Kind::Num && j == lit.end));
            if !inside {
                return None;
            }
            // The same literal in the new event starts where the template's did,
            // shifted as the literals before it were.
            let start = i - (j - lit.start);
            let (end, escaped) = match lit.kind {
                Kind::Str => string_scan(json, start)?,
                Kind::Num => (number_end(json, start)?, false),
            };
            match lit.role {
                Role::Text => text = Some((start..end, escaped)),
                Role::Model => model = Some(start..end),
                Role::Ignored => {}
            }
            i = end;
            j = lit.end;
            if self.text.is_some_and(|ti| k < ti) {
                text_shift = i as isize - j as isize;
            }
            k += 1;
        }
        let mut span = None;
        let text = match text {
            Some((r, escaped)) => {
                let mut decoded = std::mem::take(spare);
                if escaped {
                    decode_into(&json[r.clone()], &mut decoded)?;
                } else {
                    // No escape: the text is the string's bytes (checked as UTF-8 here).
                    decoded.clear();
                    decoded.push_str(std::str::from_utf8(&json[r.start + 1..r.end - 1]).ok()?);
                }
                span = Some(r);
                decoded
            }
            None => self.obs.text.clone(),
        };
        if span.is_none() {
            if let Some(l) = self.text.and_then(|ti| self.literals.get(ti)) {
                // The template's text, moved with what changed before it.
                let start = l.start.checked_add_signed(text_shift)?;
                span = Some(start..start + (l.end - l.start));
            }
        }
        let model = match model {
            Some(r) => {
                let m = decode(&json[r])?;
                if self.obs.model.as_deref() == Some(m.as_str()) {
                    self.obs.model.clone()
                } else {
                    Some(m.into())
                }
            }
            None => self.obs.model.clone(),
        };
        let obs = Observation {
            model,
            usage: self.obs.usage,
            text,
            finish_reason: self.obs.finish_reason.clone(),
            error: self.obs.error.clone(),
        };
        Some(StreamEvent::read(
            endpoint,
            json,
            obs,
            span.filter(|_| self.text_at_pointer),
        ))
    }
}

/// The length of the longest common prefix of `a` and `b`, sixteen bytes at a time; the
/// last few bytes as one overlapping word (a byte loop there cost as much as the rest).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut i = 0;
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        let (Some(x), Some(y)) = (x.first_chunk::<16>(), y.first_chunk::<16>()) else {
            break;
        };
        let d = u128::from_le_bytes(*x) ^ u128::from_le_bytes(*y);
        if d != 0 {
            return i + (d.trailing_zeros() / 8) as usize;
        }
        i += 16;
    }
    let word = |s: &[u8], at: usize| s[at..].first_chunk::<8>().map(|w| u64::from_le_bytes(*w));
    // Words at `i`, then the last eight bytes: those before `i` are equal, so the first
    // difference in an overlapping word is at or after `i`.
    while i < n && n >= 8 {
        let at = i.min(n - 8);
        let (Some(x), Some(y)) = (word(a, at), word(b, at)) else {
            break;
        };
        let d = x ^ y;
        if d != 0 {
            return at + (d.trailing_zeros() / 8) as usize;
        }
        i = at + 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// The end (past the closing quote) of the JSON string starting at `at`; `None` when
/// there is none, or it holds what only the full read decides: a `\u` escape (a lone
/// surrogate reads differently in an ignored field and in the text), a control
/// character, bytes that are not UTF-8 (the typed read does not check an ignored
/// string's bytes; the full read decides what such an event reports).
fn string_end(json: &[u8], at: usize) -> Option<usize> {
    string_scan(json, at).map(|(end, _)| end)
}

/// [`string_end`], and whether the string holds an escape (one without is its own text).
fn string_scan(json: &[u8], at: usize) -> Option<(usize, bool)> {
    if json.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    let mut ascii = true;
    let mut escaped = false;
    loop {
        i += plain_run(&json[i..]);
        let c = *json.get(i)?;
        match c {
            b'"' => break,
            b'\\' => {
                match json.get(i + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    _ => return None,
                }
                escaped = true;
                i += 2;
            }
            0..=0x1f => return None,
            // Past a plain run, nothing else is left: a byte past ASCII.
            _ => {
                ascii = false;
                i += 1;
            }
        }
    }
    if !ascii && std::str::from_utf8(&json[at + 1..i]).is_err() {
        return None;
    }
    Some((i + 1, escaped))
}

/// How many of `bytes`' first bytes are plain string bytes: printable ASCII other than
/// `"` and `\`, which need no look one by one (a stream's strings are mostly such
/// bytes). Eight at a time, then the last few one by one.
fn plain_run(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // The high bit of each byte of `x` below `n` (n <= 0x80). A borrow only starts at
    // such a byte and only runs upward, so the lowest bit set is exact: the first one.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    let mut n = 0;
    for w in bytes.chunks_exact(8) {
        let Some(w) = w.first_chunk::<8>() else { break };
        let x = u64::from_le_bytes(*w);
        let special = x & HIGH
            | below(x, 0x20)
            | below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1);
        if special != 0 {
            return n + (special.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    let plain = |b: &u8| (0x20..0x80).contains(b) && *b != b'"' && *b != b'\\';
    n + bytes[n..].iter().take_while(|b| plain(b)).count()
}

/// The end of the JSON number starting at `at` (RFC 8259's grammar); `None` when there
/// is none there.
fn number_end(json: &[u8], at: usize) -> Option<usize> {
    let digits = |mut i: usize| {
        let from = i;
        while json.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > from).then_some(i)
    };
    let mut i = at;
    if json.get(i) == Some(&b'-') {
        i += 1;
    }
    i = match json.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits(i)?,
        _ => return None,
    };
    if json.get(i) == Some(&b'.') {
        i = digits(i + 1)?;
    }
    if matches!(json.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(json.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        i = digits(i)?;
    }
    Some(i)
}

/// The text of a JSON string literal (quotes included) with only the escapes
/// [`string_end`] takes.
fn decode(quoted: &[u8]) -> Option<String> {
    let mut out = String::new();
    decode_into(quoted, &mut out)?;
    Some(out)
}

/// [`decode`] into `out` (cleared first), reusing its room.
fn decode_into(quoted: &[u8], out: &mut String) -> Option<()> {
    out.clear();
    let inner = quoted.get(1..quoted.len().checked_sub(1)?)?;
    let text = std::str::from_utf8(inner).ok()?;
    if !text.contains('\\') {
        out.push_str(text);
        return Some(());
    }
    out.reserve(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '"' => '"',
            '\\' => '\\',
            '/' => '/',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            _ => return None,
        });
    }
    Some(())
}

/// Where a value sits, as the dialect's typed reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// The reader skips it: its literals may change.
    Ignored,
    /// The reader reads it: it must not change.
    Read,
    OpenAiTop,
    OpenAiChoices,
    OpenAiChoice,
    /// A choice's `message` or `delta` (`at_pointer`: the delta, whose content is the
    /// text pointer's).
    OpenAiMessage {
        at_pointer: bool,
    },
    OllamaTop,
    OllamaMessage,
    /// The text, if it is a string (`at_pointer`: at the endpoint's text pointer).
    Text {
        at_pointer: bool,
    },
    Model,
}

/// Nesting deeper than this is not taken (the typed reader's own limit is 128).
const MAX_DEPTH: usize = 64;

/// One walk over an event the typed reader accepted, noting its changeable literals.
struct Walk<'a> {
    endpoint: Endpoint,
    b: &'a [u8],
    i: usize,
    literals: Vec<Literal>,
    texts: usize,
    text_at_pointer: bool,
}

impl Walk<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn value(&mut self, ctx: Ctx, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        let start = self.i;
        match *self.b.get(self.i)? {
            b'"' => {
                let end = string_end(self.b, start)?;
                let role = match ctx {
                    Ctx::Ignored => Some(Role::Ignored),
                    Ctx::Text { at_pointer } => {
                        self.texts += 1;
                        self.text_at_pointer = at_pointer;
                        Some(Role::Text)
                    }
                    Ctx::Model => Some(Role::Model),
                    _ => None,
                };
                if let Some(role) = role {
                    self.literals.push(Literal {
                        start,
                        end,
                        kind: Kind::Str,
                        role,
                    });
                }
                self.i = end;
            }
            b'{' => self.object(ctx, depth)?,
            b'[' => self.array(ctx, depth)?,
            b't' | b'f' | b'n' => {
                let word: &[u8] = match self.b[start] {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                if !self.b[start..].starts_with(word) {
                    return None;
                }
                self.i += word.len();
            }
            _ => {
                let end = number_end(self.b, start)?;
                if ctx == Ctx::Ignored {
                    self.literals.push(Literal {
                        start,
                        end,
                        kind: Kind::Num,
                        role: Role::Ignored,
                    });
                }
                self.i = end;
            }
        }
        Some(())
    }

    fn object(&mut self, ctx: Ctx, depth: usize) -> Option<()> {
        self.i += 1;
        // The keys of a choice that carry its text: exactly one may be there.
        let mut carriers = 0;
        let mut first = true;
        loop {
            self.ws();
            if self.b.get(self.i) == Some(&b'}') && first {
                self.i += 1;
                break;
            }
            if !first {
                self.ws();
                match self.b.get(self.i)? {
                    b',' => self.i += 1,
                    b'}' => {
                        self.i += 1;
                        break;
                    }
                    _ => return None,
                }
                self.ws();
            }
            first = false;
            let key_start = self.i;
            let key_end = string_end(self.b, key_start)?;
            let key = &self.b[key_start + 1..key_end - 1];
            // An escaped key reads as another key than its bytes say.
            if key.contains(&b'\\') {
                return None;
            }
            self.i = key_end;
            self.expect(b':')?;
            let child = match ctx {
                Ctx::Ignored => Ctx::Ignored,
                Ctx::OpenAiTop => match key {
                    b"model" => Ctx::Model,
                    b"choices" => Ctx::OpenAiChoices,
                    // Responses API events: their type decides how they read.
                    b"type" | b"delta" | b"output" | b"response" => return None,
                    b"usage" | b"status" | b"error" => Ctx::Read,
                    _ => Ctx::Ignored,
                },
                Ctx::OpenAiChoice => match key {
                    b"text" => {
                        carriers += 1;
                        Ctx::Text {
                            at_pointer: self.endpoint == Endpoint::Completions,
                        }
                    }
                    b"message" => {
                        carriers += 1;
                        Ctx::OpenAiMessage { at_pointer: false }
                    }
                    b"delta" => {
                        carriers += 1;
                        Ctx::OpenAiMessage {
                            at_pointer: self.endpoint == Endpoint::ChatCompletions,
                        }
                    }
                    b"finish_reason" => Ctx::Read,
                    _ => Ctx::Ignored,
                },
                Ctx::OpenAiMessage { at_pointer } => match key {
                    b"content" => Ctx::Text { at_pointer },
                    _ => Ctx::Ignored,
                },
                Ctx::OllamaTop => match key {
                    b"model" => Ctx::Model,
                    b"message" => Ctx::OllamaMessage,
                    b"response" => Ctx::Text {
                        at_pointer: self.endpoint == Endpoint::Generate,
                    },
                    b"done" | b"done_reason" | b"prompt_eval_count" | b"eval_count" | b"error" => {
                        Ctx::Read
                    }
                    _ => Ctx::Ignored,
                },
                Ctx::OllamaMessage => match key {
                    b"content" => Ctx::Text {
                        at_pointer: self.endpoint == Endpoint::Chat,
                    },
                    _ => Ctx::Ignored,
                },
                // Read values (usage, finish reasons) and anything else: as they are.
                _ => Ctx::Read,
            };
            self.value(child, depth + 1)?;
        }
        // `message` or `delta` beside `text` (or each other): the reader joins or
        // chooses between them; such a choice is read in full.
        (carriers <= 1).then_some(())
    }

    fn array(&mut self, ctx: Ctx, depth: usize) -> Option<()> {
        self.i += 1;
        let mut n = 0;
        loop {
            self.ws();
            if n == 0 && self.b.get(self.i) == Some(&b']') {
                self.i += 1;
                break;
            }
            if n > 0 {
                self.expect(b',')?;
            }
            let child = match ctx {
                Ctx::Ignored => Ctx::Ignored,
                Ctx::OpenAiChoices => Ctx::OpenAiChoice,
                _ => Ctx::Read,
            };
            self.value(child, depth + 1)?;
            n += 1;
            self.ws();
            match self.b.get(self.i)? {
                b']' => {
                    self.i += 1;
                    break;
                }
                b',' => {}
                _ => return None,
            }
        }
        // More than one choice: their texts are joined; read in full.
        (ctx != Ctx::OpenAiChoices || n <= 1).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Reads `events` in order with one reader; checks each against the full read and
    /// returns how many the template read.
    fn read_all(endpoint: Endpoint, events: &[Vec<u8>]) -> u64 {
        let mut reader = ShapeReader::new(endpoint);
        let mut by_shape = 0;
        for e in events {
            let before = reader.template.as_ref().map_or(0, |t| t.hits);
            let fast = reader.parse(e);
            let full = StreamEvent::parse(endpoint, e);
            assert_eq!(
                fast.as_ref().map(|ev| &ev.obs),
                full.as_ref().map(|ev| &ev.obs),
                "{}",
                String::from_utf8_lossy(e)
            );
            assert_eq!(
                fast.as_ref().and_then(StreamEvent::text_span),
                full.as_ref().and_then(StreamEvent::text_span),
                "{}",
                String::from_utf8_lossy(e)
            );
            if reader.template.as_ref().map_or(0, |t| t.hits) > before {
                by_shape += 1;
            }
            // As the meter does: the next event's text goes into this one's room.
            if let Some(ev) = fast {
                reader.recycle(ev.obs.text);
            }
        }
        by_shape
    }

    fn chunk(content: &str, extra: serde_json::Value) -> Vec<u8> {
        let mut v = json!({"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,
            "model":"m","choices":[{"index":0,"delta":{"content":content},"logprobs":null,"finish_reason":null}]});
        if let (Some(o), Some(x)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        v.to_string().into_bytes()
    }

    #[test]
    fn openai_chunks_after_the_first_are_read_by_shape() {
        let events: Vec<Vec<u8>> = ["Hel", "lo", " wor", "ld, \"quoted\"\nnew line", "é😀", ""]
            .iter()
            .enumerate()
            .map(|(n, t)| {
                chunk(
                    t,
                    json!({"obfuscation": "x".repeat(n + 1), "created": 1700000000 + n}),
                )
            })
            .collect();
        assert_eq!(read_all(Endpoint::ChatCompletions, &events), 5);
    }

    #[test]
    fn ollama_lines_whose_timestamps_change_are_read_by_shape() {
        let line = |content: &str, at: u32| {
            format!(r#"{{"model":"m","created_at":"2026-12-07T10:00:{at:02}.1234Z","message":{{"role":"assistant","content":{}}},"done":false}}"#,
                serde_json::to_string(content).unwrap()).into_bytes()
        };
        let mut events: Vec<Vec<u8>> = (0..20).map(|n| line(&format!("w{n} "), n)).collect();
        events.push(br#"{"model":"m","created_at":"2026-12-07T10:00:21Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":20}"#.to_vec());
        assert_eq!(read_all(Endpoint::Chat, &events), 19);
        let gen: Vec<Vec<u8>> = (0..5)
            .map(|n| {
                format!(r#"{{"model":"m","created_at":"t{n}","response":"r{n}","done":false}}"#)
                    .into_bytes()
            })
            .collect();
        assert_eq!(read_all(Endpoint::Generate, &gen), 4);
    }

    #[test]
    fn what_the_reader_reads_differently_goes_to_the_full_read() {
        let base = chunk("a", json!({}));
        let cases: Vec<Vec<u8>> = vec![
            // The finish reason, usage, and the model changed.
            String::from_utf8(chunk("b", json!({})))
                .unwrap()
                .replace("\"finish_reason\":null", "\"finish_reason\":\"stop\"")
                .into_bytes(),
            chunk(
                "b",
                json!({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
            ),
            String::from_utf8(chunk("b", json!({})))
                .unwrap()
                .replace("\"model\":\"m\"", "\"model\":\"other\"")
                .into_bytes(),
            // An escape the template does not decode, a control character, bad bytes.
            chunk("\u{1}", json!({})),
            String::from_utf8(chunk("b", json!({})))
                .unwrap()
                .replace("\"b\"", "\"\\ud83d\"")
                .into_bytes(),
            String::from_utf8(chunk("b", json!({})))
                .unwrap()
                .replace("\"b\"", "\"\u{7}\"")
                .into_bytes(),
            [&base[..base.len() - 2], b"\xff", &base[base.len() - 2..]].concat(),
            // A number where a string was, trailing bytes, truncated.
            String::from_utf8(chunk("b", json!({})))
                .unwrap()
                .replace("\"content\":\"b\"", "\"content\":5")
                .into_bytes(),
            [&chunk("b", json!({}))[..], b"x"].concat(),
            chunk("b", json!({}))[..40].to_vec(),
        ];
        for case in cases {
            // Each after a template that matches the base.
            read_all(Endpoint::ChatCompletions, &[base.clone(), case]);
        }
    }

    #[test]
    fn shapes_the_reader_joins_or_chooses_get_no_template() {
        let no_template = |endpoint, json: &str| {
            let obs = StreamEvent::parse(endpoint, json.as_bytes()).unwrap().obs;
            assert!(
                Template::build(endpoint, json.as_bytes(), &obs).is_none(),
                "{json}"
            );
        };
        // Two choices, message beside delta, text beside delta, an escaped key, the
        // Responses API, a response beside a message.
        no_template(
            Endpoint::ChatCompletions,
            r#"{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}"#,
        );
        no_template(
            Endpoint::ChatCompletions,
            r#"{"choices":[{"message":{},"delta":{"content":"a"}}]}"#,
        );
        no_template(
            Endpoint::ChatCompletions,
            r#"{"choices":[{"message":{"content":[{"text":"a"}]},"delta":{"content":"a"}}]}"#,
        );
        no_template(
            Endpoint::Completions,
            r#"{"choices":[{"text":"a","delta":{"content":"b"}}]}"#,
        );
        no_template(
            Endpoint::ChatCompletions,
            r#"{"mod\u0065l":"m","choices":[{"delta":{"content":"a"}}]}"#,
        );
        no_template(
            Endpoint::Responses,
            r#"{"type":"response.output_text.delta","delta":"a"}"#,
        );
        no_template(
            Endpoint::Chat,
            r#"{"message":{"content":"a"},"response":"b","done":false}"#,
        );
        // Content parts: their text is not one literal (read in full).
        no_template(
            Endpoint::ChatCompletions,
            r#"{"choices":[{"delta":{"content":[{"type":"text","text":"a"}]}}]}"#,
        );
    }

    /// A JSON string with what streams carry: quotes, backslashes, line ends, control
    /// characters (written as `\u` escapes), non-ASCII and astral characters.
    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("a".to_owned()),
                Just(" ".to_owned()),
                Just("\"".to_owned()),
                Just("\\".to_owned()),
                Just("\n".to_owned()),
                Just("\u{1}".to_owned()),
                Just("é".to_owned()),
                Just("😀".to_owned()),
                Just("/".to_owned()),
                "[a-z0-9]{1,6}",
            ],
            0..6,
        )
        .prop_map(|parts| parts.concat())
    }

    /// What may change from one event to the next: each is an edit of the JSON text.
    #[derive(Debug, Clone)]
    enum Edit {
        Text(String),
        Envelope(String),
        Created(i64),
        Model(String),
        Finish(Option<String>),
        Usage(Option<u64>),
        Raw(usize, u8),
        Cut(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            6 => text().prop_map(Edit::Text),
            2 => text().prop_map(Edit::Envelope),
            2 => any::<i64>().prop_map(Edit::Created),
            1 => "[a-z:0-9]{0,8}".prop_map(Edit::Model),
            1 => proptest::option::of("stop|length|x").prop_map(Edit::Finish),
            1 => proptest::option::of(0u64..1000).prop_map(Edit::Usage),
            1 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Raw(at, b)),
            1 => any::<usize>().prop_map(Edit::Cut),
        ]
    }

    /// A stream's state: edits carry over from event to event, as in a stream; a raw
    /// byte or a cut spoils only the event it comes with.
    struct Stream {
        text: String,
        envelope: String,
        created: i64,
        model: String,
        finish: serde_json::Value,
        usage: serde_json::Value,
    }

    impl Stream {
        fn new() -> Self {
            Self {
                text: String::new(),
                envelope: "fp".into(),
                created: 1,
                model: "m".into(),
                finish: serde_json::Value::Null,
                usage: serde_json::Value::Null,
            }
        }

        fn next(&mut self, shape_of: Endpoint, edits: &[Edit]) -> Vec<u8> {
            let (mut raw, mut cut) = (None, None);
            for e in edits {
                match e {
                    Edit::Text(t) => self.text.clone_from(t),
                    Edit::Envelope(t) => self.envelope.clone_from(t),
                    Edit::Created(n) => self.created = *n,
                    Edit::Model(m) => self.model.clone_from(m),
                    Edit::Finish(f) => {
                        self.finish = f.clone().map_or(serde_json::Value::Null, |f| json!(f))
                    }
                    Edit::Usage(n) => {
                        self.usage = n.map_or(
                            serde_json::Value::Null,
                            |n| json!({"prompt_tokens": n, "completion_tokens": 1}),
                        )
                    }
                    Edit::Raw(at, b) => raw = Some((*at, *b)),
                    Edit::Cut(at) => cut = Some(*at),
                }
            }
            let v = match shape_of.dialect() {
                super::super::Dialect::OpenAi => {
                    json!({"id": self.envelope, "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": self.text}, "finish_reason": self.finish}],
                    "usage": self.usage})
                }
                super::super::Dialect::Ollama => {
                    json!({"model": self.model, "created_at": self.envelope, "n": self.created,
                    "message": {"role": "assistant", "content": self.text}, "done": !self.finish.is_null(),
                    "done_reason": self.finish, "eval_count": self.usage.get("prompt_tokens")})
                }
            };
            let mut bytes = v.to_string().into_bytes();
            if let Some((at, b)) = raw {
                let at = at % (bytes.len() + 1);
                bytes.insert(at, b);
            }
            if let Some(at) = cut {
                bytes.truncate(at % (bytes.len() + 1));
            }
            bytes
        }
    }

    proptest! {
        /// Any sequence of events of one stream reads by shape exactly as in full.
        #[test]
        fn events_read_by_shape_report_what_a_full_read_does(
            endpoint in endpoint(),
            shape_of in endpoint(),
            steps in proptest::collection::vec(proptest::collection::vec(edit(), 0..3), 1..12),
        ) {
            let mut stream = Stream::new();
            let events: Vec<Vec<u8>> = steps.iter().map(|edits| stream.next(shape_of, edits)).collect();
            read_all(endpoint, &events);
        }
    }

    /// The endpoints read by shape.
    fn endpoint() -> impl Strategy<Value = Endpoint> {
        proptest::sample::select(vec![
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Chat,
            Endpoint::Generate,
        ])
    }

    fn base() -> impl Strategy<Value = Vec<Edit>> {
        (
            text(),
            text(),
            any::<i64>(),
            "[a-z]{0,3}",
            proptest::option::of("stop|length"),
            proptest::option::of(0u64..9),
        )
            .prop_map(|(t, e, c, m, f, u)| {
                vec![
                    Edit::Text(t),
                    Edit::Envelope(e),
                    Edit::Created(c),
                    Edit::Model(m),
                    Edit::Finish(f),
                    Edit::Usage(u),
                ]
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        /// One event, then the same with one thing changed: whatever it is, the second
        /// reads by shape as in full (a literal the reader reads, taken for one it
        /// ignores, fails here).
        #[test]
        fn one_change_reads_by_shape_as_in_full(endpoint in endpoint(), first in base(), change in edit()) {
            let mut stream = Stream::new();
            let a = stream.next(endpoint, &first);
            let b = stream.next(endpoint, &[change]);
            read_all(endpoint, &[a, b]);
        }
    }

    proptest! {
        /// The word-at-a-time scan stops where a byte-by-byte one does: at the first
        /// quote, backslash, control byte or non-ASCII one.
        #[test]
        fn a_plain_run_ends_at_the_first_special_byte(
            bytes in proptest::collection::vec(
                prop_oneof![0x20u8..=0x7f, Just(b'"'), Just(b'\\'), 0u8..0x20, 0x80u8..=0xff],
                0..64),
            plain in 0usize..40,
        ) {
            // Mostly plain bytes, so that runs are long enough to reach whole words.
            let mut s = vec![b'a'; plain];
            s.extend(bytes);
            let special = |b: u8| !(0x20..0x80).contains(&b) || b == b'"' || b == b'\\';
            let first = s.iter().position(|&b| special(b)).unwrap_or(s.len());
            prop_assert_eq!(plain_run(&s), first);
        }
    }

    #[test]
    fn a_changed_finish_reason_or_count_is_read_in_full() {
        for (endpoint, edits) in [
            (
                Endpoint::ChatCompletions,
                [
                    Edit::Finish(Some("stop".into())),
                    Edit::Finish(Some("length".into())),
                ],
            ),
            (
                Endpoint::ChatCompletions,
                [Edit::Usage(Some(1)), Edit::Usage(Some(2))],
            ),
            (
                Endpoint::Chat,
                [
                    Edit::Finish(Some("stop".into())),
                    Edit::Finish(Some("length".into())),
                ],
            ),
            (Endpoint::Chat, [Edit::Usage(Some(1)), Edit::Usage(Some(2))]),
        ] {
            let mut stream = Stream::new();
            let events: Vec<Vec<u8>> = edits
                .iter()
                .map(|e| stream.next(endpoint, std::slice::from_ref(e)))
                .collect();
            assert_eq!(read_all(endpoint, &events), 0, "{endpoint:?}");
        }
    }

    #[test]
    fn the_property_reads_most_events_by_shape() {
        // Plain edits of text and envelope (the common case): all but the first by shape.
        let mut stream = Stream::new();
        let events: Vec<Vec<u8>> = (0..50)
            .map(|n| {
                stream.next(
                    Endpoint::ChatCompletions,
                    &[Edit::Text(format!("w{n}")), Edit::Created(n)],
                )
            })
            .collect();
        assert_eq!(read_all(Endpoint::ChatCompletions, &events), 49);
    }

    #[test]
    fn the_text_span_is_the_endpoints_pointers_only() {
        // Found by the usage_extraction fuzz target: a Generate-shaped line read as a
        // chat line (whose text pointer is /message/content) had its `response` span.
        let line = |r: &str| {
            format!(r#"{{"model":"m","response":"{r}","done":true,"pdone":false}}"#).into_bytes()
        };
        for endpoint in [Endpoint::Chat, Endpoint::Generate] {
            read_all(endpoint, &[line("a"), line(""), line("bc")]);
        }
        let chunk = |field: &str, t: &str| {
            format!(r#"{{"choices":[{{"{field}":{{"content":"{t}"}}}}]}}"#).into_bytes()
        };
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions] {
            read_all(endpoint, &[chunk("message", "a"), chunk("message", "b")]);
            read_all(endpoint, &[chunk("delta", "a"), chunk("delta", "b")]);
        }
        let text = |t: &str| format!(r#"{{"choices":[{{"text":"{t}"}}]}}"#).into_bytes();
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions] {
            read_all(endpoint, &[text("a"), text("b")]);
        }
    }

    #[test]
    fn literals_scan_as_json_does() {
        assert_eq!(string_end(br#""a\"b" "#, 0), Some(6));
        assert_eq!(string_end(br#""a\u0041""#, 0), None);
        assert_eq!(string_end(b"\"a\x01\"", 0), None);
        assert_eq!(string_end(b"\"\xff\"", 0), None);
        assert_eq!(string_end(br#""abc"#, 0), None);
        for (n, end) in [
            ("0,", Some(1)),
            ("-0.5e+3}", Some(7)),
            ("12", Some(2)),
            ("01", Some(1)),
            ("-", None),
            ("1.", None),
            ("1e", None),
            (".5", None),
        ] {
            assert_eq!(number_end(n.as_bytes(), 0), end, "{n}");
        }
        assert_eq!(decode(br#""a\n\"\\\/b""#).as_deref(), Some("a\n\"\\/b"));
        assert_eq!(common_prefix(b"abcdefghijkl", b"abcdefghiXkl"), 9);
        assert_eq!(common_prefix(b"abc", b"abcd"), 3);
        // Every length and place of the first difference, through the wide, the
        // overlapping and the byte-wise comparisons.
        let a: Vec<u8> = (0..70u8).collect();
        for len in 0..a.len() {
            assert_eq!(common_prefix(&a[..len], &a), len);
            for at in 0..len {
                let mut b = a[..len].to_vec();
                b[at] ^= 0x40;
                assert_eq!(common_prefix(&a[..len], &b), at, "length {len}, at {at}");
            }
        }
    }
}
