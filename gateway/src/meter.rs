//! The response meter: sees a recognized response's bytes as they pass, reads each frame
//! once (model, usage, generated text, finish reason, errors: [`StreamEvent`]), and
//! releases the bytes to the client at once. SSE and NDJSON streams go through one loop;
//! only how a frame's payload is found and how a rewritten frame is written differ
//! ([`Wire`]). What it may rewrite: the usage chunk the gateway asked for (hidden), text
//! the response rules change, and the end of an answer cut at its budget.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kube_gateway_policy::ResponseRules;
use serde_json::Value;

use crate::api::{self, Endpoint, Observation, ShapeReader, StreamEvent};
use crate::error::stream_error_frame;
use crate::guard::response::{self, Step, StreamGuard};
use crate::record::Collected;
use crate::stream::ndjson::{line_json, LineBoundary};
use crate::stream::sse::{self, SseBoundary};
use crate::stream::{Framer, Frames, Output, Piece};

/// How a response body is framed, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Sse,
    Ndjson,
    /// Anything else: forwarded, not read.
    Opaque,
}

impl Format {
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        let essence = content_type
            .and_then(|ct| ct.split(';').next())
            .map(|ct| ct.trim().to_ascii_lowercase());
        match essence.as_deref() {
            Some("text/event-stream") => Format::Sse,
            Some("application/x-ndjson") | Some("application/jsonl") => Format::Ndjson,
            Some("application/json") => Format::Json,
            _ => Format::Opaque,
        }
    }

    pub fn is_stream(self) -> bool {
        matches!(self, Format::Sse | Format::Ndjson)
    }
}

/// The text of an answer kept for a token estimate when the provider reports none.
/// Beyond it only the length is kept, and the estimate scales the kept part's tokens
/// by length: a 20 MB answer costs 1 MiB here, and its estimate stays linear.
pub const ESTIMATE_TEXT_BYTES: usize = 1 << 20;

/// How much a meter holds of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The largest whole (non-streamed) body kept aside to read it.
    pub body: usize,
    /// The largest SSE event or NDJSON line held to read it (`--max-event-bytes`).
    pub event: usize,
    /// The answer's text kept for a token estimate; past it only its length counts.
    pub text: usize,
}

impl Bounds {
    /// The same bound for all three (tests).
    pub fn all(n: usize) -> Self {
        Self {
            body: n,
            event: n,
            text: n,
        }
    }
}

/// Counts a streamed answer's tokens as they pass and draws them from its budgets.
pub struct BudgetCut {
    pub ledger: Arc<crate::budget::Ledger>,
    pub reservation: crate::budget::Reservation,
    pub used: u64,
    pub tokens: kube_gateway_policy::TokenCounter,
    pub encoding: kube_gateway_policy::Encoding,
}

enum Framing {
    Sse(Framer<SseBoundary>),
    Ndjson(Framer<LineBoundary>),
    Whole(BytesMut),
    None,
}

/// How a stream's frames carry their objects, and how rewritten ones are written.
#[derive(Debug, Clone, Copy)]
enum Wire {
    Sse,
    Ndjson,
}

impl Wire {
    /// A frame's JSON payload; `None` for frames that carry none (SSE comments and
    /// `[DONE]`, blank lines).
    fn payload(self, raw: &[u8]) -> Option<Cow<'_, [u8]>> {
        match self {
            Wire::Sse => sse::data(raw).filter(|d| !sse::is_done(d)),
            Wire::Ndjson => line_json(raw).map(Cow::Borrowed),
        }
    }

    /// `json` in place of the frame `raw` (an SSE event keeps its other fields).
    fn replace(self, out: &mut BytesMut, raw: &[u8], json: &str) {
        match self {
            Wire::Sse => out.extend_from_slice(&sse::with_data(raw, json)),
            Wire::Ndjson => {
                out.extend_from_slice(json.as_bytes());
                out.extend_from_slice(b"\n");
            }
        }
    }

    /// The frame `raw` with bytes `span` of its payload `json` (a JSON string) replaced
    /// by `text` as a JSON string, every other byte as it came: when the payload is a
    /// part of the frame (one `data` line, an NDJSON line). `false` for a payload joined
    /// from several `data` lines (it holds line ends: the caller writes the object anew).
    fn splice(
        self,
        out: &mut BytesMut,
        raw: &[u8],
        json: &[u8],
        span: Range<usize>,
        text: &str,
    ) -> bool {
        let at = (json.as_ptr() as usize)
            .checked_sub(raw.as_ptr() as usize)
            .filter(|at| at + json.len() <= raw.len());
        let Some(at) = at else {
            return false;
        };
        out.reserve(raw.len() + text.len() + 2);
        out.extend_from_slice(&raw[..at + span.start]);
        let mut w = out.writer();
        // Writing a string into memory cannot fail.
        let _ = serde_json::to_writer(&mut w, text);
        let out = w.into_inner();
        out.extend_from_slice(&raw[at + span.end..]);
        true
    }

    /// An object of the gateway's after the current frame (an SSE event named by the
    /// object's `type`, as the Responses API names its events).
    fn append(self, out: &mut BytesMut, v: &Value) {
        match (self, v.get("type").and_then(Value::as_str)) {
            (Wire::Sse, Some(kind)) => {
                out.extend_from_slice(format!("event: {kind}\ndata: {v}\n\n").as_bytes())
            }
            (Wire::Sse, None) => out.extend_from_slice(format!("data: {v}\n\n").as_bytes()),
            (Wire::Ndjson, _) => {
                out.extend_from_slice(v.to_string().as_bytes());
                out.extend_from_slice(b"\n");
            }
        }
    }

    /// The end of an answer the gateway ended (OpenAI's `[DONE]`; the Responses API and
    /// NDJSON end with their last object).
    fn end(self, out: &mut BytesMut, endpoint: Endpoint) {
        if matches!(self, Wire::Sse) && endpoint != Endpoint::Responses {
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
    }
}

/// Meters one response.
pub struct Meter {
    endpoint: Endpoint,
    framing: Framing,
    /// Drop the usage-only chunk and `"usage":null` fields the client did not ask for.
    hide_usage: bool,
    bounds: Bounds,
    /// The policy's response rules, for this answer.
    guard: Option<StreamGuard>,
    /// Rules for a whole (non-streamed) answer, checked at its end.
    whole_rules: Option<Arc<ResponseRules>>,
    /// A rule ended the answer: nothing more goes to the client.
    ended: bool,
    /// The budget line for a streamed answer.
    cut: Option<BudgetCut>,
    /// Reads a stream's events against the last one read in full.
    events: ShapeReader,
    pub collected: Collected,
}

impl Meter {
    /// A meter without response rules.
    #[cfg(test)]
    pub fn new(endpoint: Endpoint, format: Format, hide_usage: bool, limit: usize) -> Self {
        Self::with_rules(endpoint, format, hide_usage, Bounds::all(limit), None)
    }

    /// A meter that also applies response rules (`None` or empty rules: none).
    pub fn with_rules(
        endpoint: Endpoint,
        format: Format,
        hide_usage: bool,
        bounds: Bounds,
        rules: Option<Arc<ResponseRules>>,
    ) -> Self {
        let rules = rules.filter(|r| !r.is_empty() && !endpoint.is_embedding());
        let guard = rules
            .as_ref()
            .filter(|_| format.is_stream())
            .map(|r| StreamGuard::new(r, endpoint));
        let whole_rules = rules.filter(|_| format == Format::Json);
        let framing = match format {
            Format::Sse => Framing::Sse(Framer::with_max(bounds.event)),
            Format::Ndjson => Framing::Ndjson(Framer::with_max(bounds.event)),
            Format::Json => Framing::Whole(BytesMut::new()),
            Format::Opaque => Framing::None,
        };
        Self {
            endpoint,
            framing,
            hide_usage: hide_usage && format == Format::Sse,
            bounds,
            guard,
            whole_rules,
            ended: false,
            cut: None,
            events: ShapeReader::new(endpoint),
            collected: Collected::default(),
        }
    }

    /// Output tokens counted as they passed, when a budget is watching this answer.
    pub fn counted_output(&self) -> Option<u64> {
        self.cut.as_ref().map(|c| c.used)
    }

    /// Ends a streamed answer at its budgets' line (its tokens counted as they pass).
    /// Only streams can be cut: the caller keeps the reservation of any other answer.
    pub fn with_budget(mut self, cut: Option<BudgetCut>) -> Self {
        debug_assert!(
            cut.is_none() || matches!(self.framing, Framing::Sse(_) | Framing::Ndjson(_))
        );
        self.cut = cut;
        self
    }

    /// The reservation a stream drew from, to be settled.
    pub fn take_reservation(&mut self) -> Option<crate::budget::Reservation> {
        self.cut.take().map(|c| c.reservation)
    }

    /// Counts an event's text against the budget; at the line, the event that ends the
    /// answer (to send after this one).
    fn budget_step(&mut self, ev: &mut StreamEvent) -> Option<Value> {
        let cut = self.cut.as_mut()?;
        if !ev.obs.text.is_empty() {
            cut.used += cut.tokens.count(cut.encoding, &ev.obs.text).unwrap_or(0);
        }
        if cut.ledger.draw(&mut cut.reservation, cut.used) {
            return None;
        }
        self.ended = true;
        self.collected.budget_cut = true;
        Some(response::length_cut_event(ev, self.endpoint))
    }

    /// Whether this meter may change the body's bytes or length (then no
    /// Content-Length can be forwarded).
    pub fn reframes(&self) -> bool {
        !matches!(self.framing, Framing::Whole(_) | Framing::None) || self.whole_rules.is_some()
    }

    /// A response rule ended the answer: the body must end now.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    fn note_guard(&mut self) {
        if let Some(g) = &self.guard {
            if self.collected.policy_hits.len() != g.hits.len() {
                self.collected.policy_hits.clone_from(&g.hits);
            }
            if g.is_ended() {
                self.collected.blocked = true;
                self.ended = true;
            }
        }
    }

    /// Adds what one object reports to what the meter collected.
    fn collect(&mut self, obs: &Observation) {
        let c = &mut self.collected;
        if let Some(m) = obs
            .model
            .as_deref()
            .filter(|m| c.model.as_deref() != Some(*m))
        {
            c.model = Some(m.to_owned());
        }
        c.usage.merge(obs.usage);
        if !obs.text.is_empty() {
            c.content_events += 1;
        }
        c.text_bytes += obs.text.len() as u64;
        if c.text.len() + obs.text.len() <= self.bounds.text {
            c.text.push_str(&obs.text);
        } else {
            // Whole characters only, up to the bound: the rest is counted by length.
            let room = self.bounds.text.saturating_sub(c.text.len());
            let mut end = room.min(obs.text.len());
            while !obs.text.is_char_boundary(end) {
                end -= 1;
            }
            c.text.push_str(&obs.text[..end]);
        }
        if obs.finish_reason.is_some() {
            c.finish_reason.clone_from(&obs.finish_reason);
        }
        if obs.error.is_some() {
            c.error.clone_from(&obs.error);
        }
    }

    /// Takes an upstream chunk; returns what to send the client now (maybe nothing yet).
    pub fn on_data(&mut self, chunk: Bytes) -> Bytes {
        if self.ended {
            // The answer was ended here: nothing more of it goes out.
            return Bytes::new();
        }
        let (wire, frames) = match &mut self.framing {
            Framing::None => return chunk,
            Framing::Whole(buf) => {
                if buf.len() + chunk.len() <= self.bounds.body {
                    buf.extend_from_slice(&chunk);
                    if self.whole_rules.is_some() {
                        // Checked whole: released at the end.
                        return Bytes::new();
                    }
                    return chunk;
                }
                self.collected.truncated = true;
                if self.whole_rules.take().is_some() {
                    // Too large to hold: what was held goes out unchecked, then the rest.
                    tracing::warn!(
                        limit = self.bounds.body,
                        "answer too large for response rules; forwarded unchecked"
                    );
                    let mut out = BytesMut::from(&buf[..]);
                    out.extend_from_slice(&chunk);
                    return out.freeze();
                }
                return chunk;
            }
            Framing::Sse(framer) => (Wire::Sse, framer.push_bytes(chunk)),
            Framing::Ndjson(framer) => (Wire::Ndjson, framer.push_bytes(chunk)),
        };
        self.frames(wire, frames)
    }

    /// The complete frames of a stream: each read once; rewritten only when something
    /// may change them.
    fn frames(&mut self, wire: Wire, frames: Frames) -> Bytes {
        if self.guard.is_none() && self.cut.is_none() {
            if let Some(first) = frames.single_oversize() {
                // Part of an event too large to read: out as it came, without a copy.
                self.oversize(first);
                return frames.bytes;
            }
        }
        let rewriting = self.hide_usage || self.guard.is_some() || self.cut.is_some();
        if !rewriting {
            for piece in frames.iter() {
                match piece {
                    Piece::Frame(raw) => {
                        if let Some(json) = wire.payload(raw) {
                            self.collected.frames += 1;
                            if let Some(ev) = self.events.parse(&json) {
                                self.collect(&ev.obs);
                                self.events.recycle(ev.obs.text);
                            }
                        }
                    }
                    Piece::Oversize { first, .. } => self.oversize(first),
                }
            }
            return frames.bytes;
        }
        let mut out = Output::new(&frames.bytes);
        for (at, piece) in frames.iter_at() {
            let raw = match piece {
                Piece::Frame(raw) => raw,
                Piece::Oversize { first, .. } => {
                    self.oversize(first);
                    if self.guard.is_some() || self.cut.is_some() {
                        // Rules or a budget cannot pass what they cannot read: the
                        // answer ends here, well-formed, with an error saying why.
                        let message = format!(
                            "an event of the answer is larger than --max-event-bytes ({} bytes); the answer was ended",
                            self.bounds.event
                        );
                        out.buf().extend_from_slice(&stream_error_frame(
                            matches!(wire, Wire::Sse),
                            &message,
                        ));
                        self.collected.error = Some(message);
                        self.ended = true;
                        break;
                    }
                    // Only the hidden usage could change it: it goes out as it came.
                    out.keep(at);
                    continue;
                }
            };
            let json = wire.payload(raw);
            if json.is_some() {
                self.collected.frames += 1;
            }
            let event = json.as_deref().and_then(|json| self.events.parse(json));
            if let Some(ev) = &event {
                self.collect(&ev.obs);
            }
            if self.ended {
                break;
            }
            match event {
                Some(mut ev) => {
                    self.rewrite(wire, raw, at, &mut ev, &mut out);
                    self.events.recycle(ev.obs.text);
                }
                // No object, or not JSON: as it came.
                None => out.keep(at),
            }
        }
        self.note_guard();
        out.finish()
    }

    /// A frame too large to hold started (`first`) or went on.
    fn oversize(&mut self, first: bool) {
        if first {
            self.collected.oversize_events += 1;
            tracing::warn!(
                max_event_bytes = self.bounds.event,
                "an answer's event is larger than --max-event-bytes: forwarded unread"
            );
        }
    }

    /// One event of an answer the meter may rewrite.
    fn rewrite(
        &mut self,
        wire: Wire,
        raw: &[u8],
        at: Range<usize>,
        ev: &mut StreamEvent,
        out: &mut Output,
    ) {
        let mut changed = false;
        if self.hide_usage {
            match hide_usage(ev.value()) {
                Hidden::Drop => return,
                Hidden::Changed => changed = true,
                Hidden::Keep => {}
            }
        }
        let step = match self.guard.as_mut() {
            Some(guard) => guard.event(ev),
            None => Step::Keep,
        };
        match step {
            Step::Keep if !changed => out.keep(at),
            Step::Keep => wire.replace(out.buf(), raw, &ev.value().to_string()),
            Step::Text(text) => {
                // Only the text changes: the new string goes where the old one was.
                let spliced = !changed
                    && ev
                        .text_span()
                        .is_some_and(|span| wire.splice(out.buf(), raw, ev.json(), span, &text));
                if !spliced {
                    let mut v = ev.value().clone();
                    response::set_text(&mut v, self.endpoint, text);
                    wire.replace(out.buf(), raw, &v.to_string());
                }
            }
            Step::Replace { objects, end } => {
                for (i, mut o) in objects.into_iter().enumerate() {
                    if self.hide_usage {
                        hide_usage(&mut o);
                    }
                    if i == 0 {
                        wire.replace(out.buf(), raw, &o.to_string());
                    } else {
                        wire.append(out.buf(), &o);
                    }
                }
                if end {
                    self.ended = true;
                    wire.end(out.buf(), self.endpoint);
                }
            }
        }
        if !self.ended {
            if let Some(last) = self.budget_step(ev) {
                wire.append(out.buf(), &last);
                wire.end(out.buf(), self.endpoint);
            }
        }
    }

    /// The upstream body ended: reads a whole body, releases any incomplete frame.
    pub fn on_end(&mut self) -> Bytes {
        if self.ended {
            return Bytes::new();
        }
        match std::mem::replace(&mut self.framing, Framing::None) {
            Framing::Whole(buf) => match self.whole_rules.take() {
                // Held for the rules (never truncated then): one parse for both.
                Some(rules) => {
                    let Some(mut ev) = StreamEvent::parse(self.endpoint, &buf) else {
                        return buf.freeze();
                    };
                    self.collect(&ev.obs);
                    // Read as a value only when a rule will change it.
                    if response::acts_on_whole(&buf, &rules) == Some(false) {
                        return buf.freeze();
                    }
                    match response::whole(ev.value(), self.endpoint, &rules) {
                        Some((hits, blocked)) => {
                            self.collected.policy_hits = hits;
                            self.collected.blocked = blocked;
                            Bytes::from(ev.value().to_string())
                        }
                        None => buf.freeze(),
                    }
                }
                None => {
                    if !self.collected.truncated {
                        if let Some(obs) = api::observe(self.endpoint, &buf) {
                            self.collect(&obs);
                        }
                    }
                    Bytes::new()
                }
            },
            Framing::Sse(mut f) => f.take_rest(),
            Framing::Ndjson(mut f) => {
                let rest = f.take_rest();
                // Ollama ends every line; a last line without LF still counts.
                if let Some(obs) = line_json(&rest).and_then(|j| api::observe(self.endpoint, j)) {
                    self.collect(&obs);
                }
                rest
            }
            Framing::None => Bytes::new(),
        }
    }

    /// The upstream failed mid-body. For a stream, the frame that ends it well-formed
    /// (any incomplete frame is dropped: it would corrupt the error that follows).
    pub fn on_upstream_error(&mut self, message: &str) -> Option<Bytes> {
        self.collected.error = Some(message.to_owned());
        let sse = match std::mem::replace(&mut self.framing, Framing::None) {
            Framing::Sse(_) => true,
            Framing::Ndjson(_) => false,
            Framing::Whole(_) | Framing::None => return None,
        };
        Some(stream_error_frame(sse, message))
    }
}

enum Hidden {
    Keep,
    Drop,
    Changed,
}

/// Removes from one chunk what `include_usage` added: the whole usage-only chunk (no
/// choices), or a `"usage": null` field. A changed chunk is written anew from the
/// parsed object: the same JSON, keys in their order (number and escape spellings are
/// serde_json's).
fn hide_usage(v: &mut Value) -> Hidden {
    let Some(fields) = v.as_object_mut() else {
        return Hidden::Keep;
    };
    match fields.get("usage") {
        None => Hidden::Keep,
        Some(Value::Null) => {
            fields.shift_remove("usage");
            Hidden::Changed
        }
        Some(_) => match fields.get("choices") {
            Some(Value::Array(choices)) if choices.is_empty() => Hidden::Drop,
            _ => Hidden::Keep,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(meter: &mut Meter, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&meter.on_data(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&meter.on_end());
        out
    }

    const WITH_USAGE: &[u8] = b"data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n\
data: [DONE]\n\n";

    const WITHOUT_USAGE: &[u8] = b"data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: [DONE]\n\n";

    #[test]
    fn hidden_usage_leaves_the_client_view_of_a_plain_stream() {
        for cut in 0..=WITH_USAGE.len() {
            let mut m = Meter::new(Endpoint::ChatCompletions, Format::Sse, true, 1 << 20);
            let (a, b) = WITH_USAGE.split_at(cut);
            assert_eq!(run(&mut m, &[a, b]), WITHOUT_USAGE, "split at {cut}");
            assert_eq!(m.collected.usage.input, Some(5));
            assert_eq!(m.collected.usage.output, Some(1));
            assert_eq!(m.collected.text, "Hi");
            assert_eq!(m.collected.finish_reason.as_deref(), Some("stop"));
        }
    }

    #[test]
    fn asked_for_usage_passes_untouched() {
        let mut m = Meter::new(Endpoint::ChatCompletions, Format::Sse, false, 1 << 20);
        assert_eq!(run(&mut m, &[WITH_USAGE]), WITH_USAGE);
        assert_eq!(m.collected.usage.input, Some(5));
        assert_eq!(m.collected.frames, 3);
        // The role-only and usage-only events carry no text: one content event.
        assert_eq!(m.collected.content_events, 1);
    }

    #[test]
    fn whole_json_is_forwarded_chunk_by_chunk_and_read_at_the_end() {
        let body = br#"{"model":"m","message":{"content":"ok"},"done":true,"prompt_eval_count":3,"eval_count":1}"#;
        let mut m = Meter::new(Endpoint::Chat, Format::Json, false, 1 << 20);
        let first = m.on_data(Bytes::copy_from_slice(&body[..10]));
        assert_eq!(&first[..], &body[..10], "forwarded at once");
        m.on_data(Bytes::copy_from_slice(&body[10..]));
        assert!(m.on_end().is_empty());
        assert_eq!(m.collected.usage.input, Some(3));
        assert_eq!(m.collected.text, "ok");
    }

    #[test]
    fn oversize_json_is_forwarded_but_marked() {
        let mut m = Meter::new(Endpoint::Chat, Format::Json, false, 4);
        assert_eq!(
            &m.on_data(Bytes::from_static(b"{\"a\":1}"))[..],
            b"{\"a\":1}"
        );
        m.on_end();
        assert!(m.collected.truncated);
        assert_eq!(m.collected.usage, crate::api::ReportedUsage::default());
    }

    #[test]
    fn upstream_error_ends_streams_with_an_error_frame() {
        let mut m = Meter::new(Endpoint::Chat, Format::Ndjson, false, 1 << 20);
        let out = m.on_data(Bytes::from_static(
            b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"mess",
        ));
        assert!(out.ends_with(b"\n"));
        let end = m.on_upstream_error("upstream closed").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&end).unwrap();
        assert!(v["error"].as_str().unwrap().contains("upstream closed"));
        let mut s = Meter::new(Endpoint::ChatCompletions, Format::Sse, false, 1 << 20);
        let ev = s.on_upstream_error("x").unwrap();
        assert!(ev.starts_with(b"data: {\"error\":"));
        assert!(ev.ends_with(b"\n\n"));
        let mut j = Meter::new(Endpoint::Chat, Format::Json, false, 1 << 20);
        assert!(j.on_upstream_error("x").is_none());
    }

    /// An SSE stream with one content event of `n` bytes of text between two small ones.
    fn with_big_event(n: usize) -> Vec<u8> {
        let chunk = |text: &str| {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
            )
        };
        let mut s = chunk("a ");
        s.push_str(&chunk(&"b".repeat(n)));
        s.push_str(&chunk("c"));
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    fn response_rules() -> Arc<ResponseRules> {
        kube_gateway_policy::load("apiVersion: kube-gateway.io/v1alpha1\nresponseRules:\n  - name: r\n    match: { literals: [rabbit] }\n    action: redact\n    mask: '***'\n")
            .unwrap()
            .response
            .clone()
    }

    fn bounded(format: Format, event: usize, rules: Option<Arc<ResponseRules>>) -> Meter {
        let endpoint = match format {
            Format::Ndjson => Endpoint::Chat,
            _ => Endpoint::ChatCompletions,
        };
        let bounds = Bounds {
            body: 1 << 20,
            event,
            text: 1 << 20,
        };
        Meter::with_rules(endpoint, format, false, bounds, rules)
    }

    #[test]
    fn an_event_over_the_limit_passes_unread_when_nothing_rewrites() {
        let stream = with_big_event(10_000);
        let chunks: Vec<&[u8]> = stream.chunks(512).collect();
        let mut m = bounded(Format::Sse, 4_096, None);
        assert_eq!(run(&mut m, &chunks), stream, "the bytes pass unchanged");
        assert_eq!(m.collected.oversize_events, 1);
        // The small events were read; the big one was not.
        assert_eq!(m.collected.text, "a c");
        assert!(!m.is_ended());
        // Under the limit, the same stream is read whole.
        let mut whole = bounded(Format::Sse, 16_384, None);
        run(&mut whole, &chunks);
        assert_eq!(whole.collected.oversize_events, 0);
        assert_eq!(whole.collected.text.len(), 10_003);
    }

    #[test]
    fn an_event_over_the_limit_ends_a_ruled_answer_well_formed() {
        let stream = with_big_event(10_000);
        let chunks: Vec<&[u8]> = stream.chunks(512).collect();
        let mut m = bounded(Format::Sse, 4_096, Some(response_rules()));
        let out = run(&mut m, &chunks);
        assert!(m.is_ended());
        let text = String::from_utf8(out).unwrap();
        let events: Vec<&str> = text.split_terminator("\n\n").collect();
        assert_eq!(events.len(), 2, "{text}");
        assert!(events[0].contains("\"a \""));
        let err: Value = serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--max-event-bytes"),
            "{err}"
        );
        assert!(m.collected.error.as_deref().unwrap().contains("4096 bytes"));
    }

    #[test]
    fn an_ndjson_line_over_the_limit_in_both_modes() {
        let line = |t: &str| format!("{{\"message\":{{\"content\":\"{t}\"}},\"done\":false}}\n");
        let stream = format!(
            "{}{}{{\"done\":true,\"eval_count\":7,\"prompt_eval_count\":2}}\n",
            line("a"),
            line(&"b".repeat(10_000))
        )
        .into_bytes();
        let chunks: Vec<&[u8]> = stream.chunks(700).collect();
        let mut pass = bounded(Format::Ndjson, 4_096, None);
        assert_eq!(run(&mut pass, &chunks), stream);
        assert_eq!(pass.collected.oversize_events, 1);
        assert_eq!(
            pass.collected.usage.output,
            Some(7),
            "lines after it are read"
        );
        let mut ruled = bounded(Format::Ndjson, 4_096, Some(response_rules()));
        let out = String::from_utf8(run(&mut ruled, &chunks)).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let err: Value = serde_json::from_str(lines[1]).unwrap();
        assert!(err["error"].as_str().unwrap().contains("--max-event-bytes"));
    }

    #[test]
    fn text_past_its_bound_is_counted_by_length() {
        let stream = with_big_event(3_000);
        let mut m = Meter::with_rules(
            Endpoint::ChatCompletions,
            Format::Sse,
            false,
            Bounds {
                body: 1 << 20,
                event: 1 << 20,
                text: 1_000,
            },
            None,
        );
        run(&mut m, &[&stream]);
        assert_eq!(m.collected.text.len(), 1_000);
        assert_eq!(m.collected.text_bytes, 3_003);
    }

    #[test]
    fn a_changed_text_is_spliced_into_the_event_as_it_came() {
        // Spellings a re-serialization would change (an exponent, an escaped slash, the
        // space after a colon) stay as they came; only the text differs.
        let ev = |t: &str| {
            format!("data: {{\"x\": 1E2,\"u\":\"a\\/b\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}}}}]}}\n\n")
        };
        let stream = format!("{}{}data: [DONE]\n\n", ev("a rabbit"), ev(" ran"));
        let expected = format!("{}{}data: [DONE]\n\n", ev("a ***"), ev(" ran"));
        let mut m = bounded(Format::Sse, 1 << 20, Some(response_rules()));
        let out = run(&mut m, &[stream.as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(m.collected.policy_hits, ["r"]);

        let line = |t: &str| {
            format!("{{\"message\":{{\"content\":\"{t}\"}},\"n\":1.50,\"done\":false}}\n")
        };
        let stream = format!("{}{}", line("one rabbit"), line("."));
        let mut m = bounded(Format::Ndjson, 1 << 20, Some(response_rules()));
        let out = run(&mut m, &[stream.as_bytes()]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{}{}", line("one ***"), line("."))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// A text spliced into an event's bytes reads as the event parsed, its text set
        /// and written anew: the same object, whatever the texts hold (escapes, quotes,
        /// characters past ASCII) and wherever the text sits among other fields.
        #[test]
        fn a_spliced_text_reads_as_the_rewritten_object(
            old in "[a-z\"\\\n\u{e9}\u{1f600}/ ]{0,12}",
            new in "[a-z\"\\\n\u{e9}\u{1f600}/ ]{0,12}",
            escaped_slash in proptest::bool::ANY,
            before in proptest::bool::ANY,
            ndjson in proptest::bool::ANY,
        ) {
            let mut quoted = serde_json::to_string(&old).unwrap();
            if escaped_slash {
                quoted = quoted.replace('/', "\\/");
            }
            let (endpoint, json) = if ndjson {
                (Endpoint::Chat, format!(r#"{{"model":"m","message":{{"role":"assistant","content":{quoted}}},"done":false}}"#))
            } else if before {
                (Endpoint::ChatCompletions, format!(r#"{{"choices":[{{"delta":{{"content":{quoted}}},"index":0}}],"x":{{"content":"y"}}}}"#))
            } else {
                (Endpoint::ChatCompletions, format!(r#"{{"id":"c","x":[{{"content":"y"}}],"choices":[{{"index":0,"delta":{{"role":"r","content":{quoted}}},"finish_reason":null}}]}}"#))
            };
            let raw = if ndjson { format!("{json}\n") } else { format!("data: {json}\n\n") };
            let wire = if ndjson { Wire::Ndjson } else { Wire::Sse };
            let payload = wire.payload(raw.as_bytes()).unwrap();
            let mut ev = StreamEvent::parse(endpoint, &payload).unwrap();
            proptest::prop_assert_eq!(&ev.obs.text, &old);
            let span = ev.text_span().unwrap();
            // The reader's note of the text's place is the pointer's.
            let pointer = crate::api::event::text_pointer(endpoint);
            proptest::prop_assert_eq!(Some(span.clone()), crate::api::span::string_span(ev.json(), pointer));
            let mut out = BytesMut::new();
            proptest::prop_assert!(wire.splice(&mut out, raw.as_bytes(), ev.json(), span, &new));
            let spliced: Value = serde_json::from_slice(wire.payload(&out).unwrap().as_ref()).unwrap();
            let mut expected = ev.value().clone();
            response::set_text(&mut expected, endpoint, new);
            proptest::prop_assert_eq!(spliced, expected);
        }
    }

    #[test]
    fn an_event_of_several_data_lines_is_rewritten_on_one() {
        // Its data holds a line end: spliced, it would break the event.
        let stream = "data: {\"choices\":[{\"index\":0,\ndata: \"delta\":{\"content\":\"a rabbit\"}}]}\n\ndata: [DONE]\n\n";
        let mut m = bounded(Format::Sse, 1 << 20, Some(response_rules()));
        let out = String::from_utf8(run(&mut m, &[stream.as_bytes()])).unwrap();
        let first = out.split("\n\n").next().unwrap();
        assert_eq!(first.lines().count(), 1, "{out}");
        let v: Value = serde_json::from_str(first.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["choices"][0]["delta"]["content"], "a ***");
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type(Some("text/event-stream; charset=utf-8")),
            Format::Sse
        );
        assert_eq!(
            Format::from_content_type(Some("application/x-ndjson")),
            Format::Ndjson
        );
        assert_eq!(
            Format::from_content_type(Some("Application/JSON")),
            Format::Json
        );
        assert_eq!(Format::from_content_type(None), Format::Opaque);
    }
}
