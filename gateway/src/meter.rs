//! The response meter: sees a recognized response's bytes as they pass, reads what they
//! report (model, usage, generated text, finish reason, errors), and releases them to
//! the client at once. Its one rewrite: hiding the usage chunk the gateway asked for.

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use serde_json::value::RawValue;

use crate::api::{ollama, openai, Dialect, Endpoint, Observation};
use std::sync::Arc;

use kube_gateway_policy::ResponseRules;

use crate::error::stream_error_frame;
use crate::guard::response::{Step, StreamGuard};
use crate::record::Collected;
use crate::stream::ndjson::{line_json, LineBoundary};
use crate::stream::sse::{self, SseBoundary};
use crate::stream::Framer;

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

/// Meters one response.
pub struct Meter {
    endpoint: Endpoint,
    framing: Framing,
    /// Drop the usage-only chunk and `"usage":null` fields the client did not ask for.
    hide_usage: bool,
    limit: usize,
    /// The policy's response rules, for this answer.
    guard: Option<StreamGuard>,
    /// Rules for a whole (non-streamed) answer, checked at its end.
    whole_rules: Option<Arc<ResponseRules>>,
    /// A rule ended the answer: nothing more goes to the client.
    ended: bool,
    /// The budget line for a streamed answer.
    cut: Option<BudgetCut>,
    pub collected: Collected,
}

impl Meter {
    pub fn new(endpoint: Endpoint, format: Format, hide_usage: bool, limit: usize) -> Self {
        Self::with_rules(endpoint, format, hide_usage, limit, None)
    }

    /// A meter that also applies response rules (`None` or empty rules: none).
    pub fn with_rules(
        endpoint: Endpoint,
        format: Format,
        hide_usage: bool,
        limit: usize,
        rules: Option<Arc<ResponseRules>>,
    ) -> Self {
        let rules = rules.filter(|r| !r.is_empty() && !endpoint.is_embedding());
        let guard = rules
            .as_ref()
            .filter(|_| format.is_stream())
            .map(|r| StreamGuard::new(r, endpoint));
        let whole_rules = rules.filter(|_| format == Format::Json);
        let framing = match format {
            Format::Sse => Framing::Sse(Framer::new()),
            Format::Ndjson => Framing::Ndjson(Framer::new()),
            Format::Json => Framing::Whole(BytesMut::new()),
            Format::Opaque => Framing::None,
        };
        Self {
            endpoint,
            framing,
            hide_usage: hide_usage && format == Format::Sse,
            limit,
            guard,
            whole_rules,
            ended: false,
            cut: None,
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

    /// Counts an event's text (as `observe` read it) against the budget; at the line,
    /// the event that ends the answer (to send after this one).
    fn budget_step(&mut self, data: &str, text: Option<&str>) -> Option<serde_json::Value> {
        let cut = self.cut.as_mut()?;
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            cut.used += cut.tokens.count(cut.encoding, text).unwrap_or(0);
        }
        if cut.ledger.draw(&mut cut.reservation, cut.used) {
            return None;
        }
        let last = crate::guard::response::length_cut_event(data, self.endpoint)?;
        self.ended = true;
        self.collected.budget_cut = true;
        Some(last)
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
            self.collected.policy_hits = g.hits.clone();
            if g.is_ended() {
                self.collected.blocked = true;
                self.ended = true;
            }
        }
    }

    /// Reads an event's model, usage, text, finish reason and error into what the meter
    /// collected; returns the event's text when a budget is watching (to count it).
    fn observe(&mut self, json: &[u8]) -> Option<String> {
        let obs = match self.endpoint.dialect() {
            Dialect::OpenAi => openai::observe(self.endpoint, json),
            Dialect::Ollama => ollama::observe(self.endpoint, json),
        };
        let obs = obs?;
        let Observation {
            model,
            usage,
            text,
            finish_reason,
            error,
        } = obs;
        let counted = self.cut.as_ref().map(|_| text.clone());
        let c = &mut self.collected;
        if model.is_some() {
            c.model = model;
        }
        c.usage.merge(usage);
        if c.text.len() + text.len() <= self.limit {
            c.text.push_str(&text);
        } else {
            c.truncated = true;
        }
        if finish_reason.is_some() {
            c.finish_reason = finish_reason;
        }
        if error.is_some() {
            c.error = error;
        }
        counted
    }

    /// Takes an upstream chunk; returns what to send the client now (maybe nothing yet).
    pub fn on_data(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.framing {
            Framing::None => chunk,
            Framing::Whole(buf) => {
                if buf.len() + chunk.len() <= self.limit {
                    buf.extend_from_slice(&chunk);
                    if self.whole_rules.is_some() {
                        // Checked whole: released at the end.
                        return Bytes::new();
                    }
                    chunk
                } else {
                    self.collected.truncated = true;
                    if self.whole_rules.take().is_some() {
                        // Too large to hold: what was held goes out unchecked, then the rest.
                        tracing::warn!(
                            limit = self.limit,
                            "answer too large for response rules; forwarded unchecked"
                        );
                        let mut out = BytesMut::from(&buf[..]);
                        out.extend_from_slice(&chunk);
                        return out.freeze();
                    }
                    chunk
                }
            }
            Framing::Ndjson(framer) => {
                let frames = framer.push(&chunk);
                let rewriting = self.guard.is_some() || self.cut.is_some();
                let mut out = rewriting.then(|| BytesMut::with_capacity(frames.bytes.len()));
                for line in frames.iter() {
                    let Some(json) = line_json(line) else {
                        if let Some(out) = out.as_mut() {
                            out.extend_from_slice(line);
                        }
                        continue;
                    };
                    self.collected.frames += 1;
                    let json = json.to_vec();
                    let text = self.observe(&json);
                    let Some(out) = out.as_mut() else { continue };
                    if self.ended {
                        break;
                    }
                    let data = String::from_utf8_lossy(&json).into_owned();
                    let step = match self.guard.as_mut() {
                        Some(guard) => guard.event(&data),
                        None => Step::Keep,
                    };
                    match step {
                        Step::Keep => out.extend_from_slice(line),
                        Step::Replace { objects, end } => {
                            for o in objects {
                                out.extend_from_slice(o.to_string().as_bytes());
                                out.extend_from_slice(b"\n");
                            }
                            self.ended |= end;
                        }
                    }
                    if !self.ended {
                        if let Some(last) = self.budget_step(&data, text.as_deref()) {
                            out.extend_from_slice(last.to_string().as_bytes());
                            out.extend_from_slice(b"\n");
                        }
                    }
                }
                self.note_guard();
                match out {
                    Some(out) => out.freeze(),
                    None => frames.bytes,
                }
            }
            Framing::Sse(framer) => {
                let frames = framer.push(&chunk);
                let events: Vec<(sse::SseEvent, &[u8])> = frames
                    .iter()
                    .map(|raw| (sse::parse_event(raw), raw))
                    .collect();
                let rewriting = self.hide_usage || self.guard.is_some() || self.cut.is_some();
                let mut out = rewriting.then(|| BytesMut::with_capacity(frames.bytes.len()));
                for (event, raw) in events {
                    let mut text = None;
                    if let Some(data) = event.data.as_deref().filter(|_| !event.is_done()) {
                        self.collected.frames += 1;
                        text = self.observe(data.as_bytes());
                    }
                    let Some(out) = out.as_mut() else { continue };
                    if self.ended {
                        break;
                    }
                    let Some(data) = event.data.as_deref().filter(|_| !event.is_done()) else {
                        out.extend_from_slice(raw);
                        continue;
                    };
                    let hidden = if self.hide_usage {
                        without_usage(data)
                    } else {
                        Hidden::Keep
                    };
                    let data = match hidden {
                        Hidden::Drop => continue,
                        Hidden::Keep => std::borrow::Cow::Borrowed(data),
                        Hidden::Rewrite(new) => std::borrow::Cow::Owned(new),
                    };
                    let step = match self.guard.as_mut() {
                        Some(g) => g.event(&data),
                        None => Step::Keep,
                    };
                    match step {
                        Step::Keep if matches!(data, std::borrow::Cow::Borrowed(_)) => {
                            out.extend_from_slice(raw)
                        }
                        Step::Keep => out.extend_from_slice(&sse::with_data(raw, &data)),
                        Step::Replace { objects, end } => {
                            for (i, mut o) in objects.into_iter().enumerate() {
                                if self.hide_usage
                                    && o.get("usage").is_some_and(serde_json::Value::is_null)
                                {
                                    if let Some(map) = o.as_object_mut() {
                                        map.shift_remove("usage");
                                    }
                                }
                                let json = o.to_string();
                                if i == 0 {
                                    out.extend_from_slice(&sse::with_data(raw, &json));
                                } else if let Some(kind) =
                                    o.get("type").and_then(serde_json::Value::as_str)
                                {
                                    out.extend_from_slice(
                                        format!("event: {kind}\ndata: {json}\n\n").as_bytes(),
                                    );
                                } else {
                                    out.extend_from_slice(format!("data: {json}\n\n").as_bytes());
                                }
                            }
                            if end {
                                self.ended = true;
                                if self.endpoint != Endpoint::Responses {
                                    out.extend_from_slice(b"data: [DONE]\n\n");
                                }
                            }
                        }
                    }
                    if !self.ended {
                        if let Some(last) = self.budget_step(&data, text.as_deref()) {
                            match last.get("type").and_then(serde_json::Value::as_str) {
                                Some(kind) => out.extend_from_slice(
                                    format!("event: {kind}\ndata: {last}\n\n").as_bytes(),
                                ),
                                None => out.extend_from_slice(
                                    format!("data: {last}\n\ndata: [DONE]\n\n").as_bytes(),
                                ),
                            }
                        }
                    }
                }
                self.note_guard();
                match out {
                    Some(out) => out.freeze(),
                    None => frames.bytes,
                }
            }
        }
    }

    /// The upstream body ended: reads a whole body, releases any incomplete frame.
    pub fn on_end(&mut self) -> Bytes {
        match std::mem::replace(&mut self.framing, Framing::None) {
            Framing::Whole(buf) => {
                if !self.collected.truncated {
                    self.observe(&buf);
                }
                match self.whole_rules.take() {
                    Some(rules) => match crate::guard::response::whole(&buf, &rules) {
                        Some((body, hits, blocked)) => {
                            self.collected.policy_hits = hits;
                            self.collected.blocked = blocked;
                            Bytes::from(body)
                        }
                        None => buf.freeze(),
                    },
                    None => Bytes::new(),
                }
            }
            Framing::Sse(mut f) => f.take_rest(),
            Framing::Ndjson(mut f) => {
                let rest = f.take_rest();
                // Ollama ends every line; a last line without LF still counts.
                if let Some(json) = line_json(&rest) {
                    let json = json.to_vec();
                    self.observe(&json);
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
    Rewrite(String),
}

/// Removes from one chunk what `include_usage` added: the whole usage-only chunk (no
/// choices), or a `"usage": null` field. Other values keep their exact bytes.
fn without_usage(data: &str) -> Hidden {
    let Ok(mut fields) = serde_json::from_str::<IndexMap<String, Box<RawValue>>>(data) else {
        return Hidden::Keep;
    };
    let Some(usage) = fields.get("usage").map(|u| u.get().trim().to_owned()) else {
        return Hidden::Keep;
    };
    if usage == "null" {
        fields.shift_remove("usage");
        return serde_json::to_string(&fields).map_or(Hidden::Keep, Hidden::Rewrite);
    }
    let no_choices = fields.get("choices").is_some_and(|c| {
        c.get()
            .chars()
            .filter(|ch| !ch.is_whitespace())
            .eq("[]".chars())
    });
    if no_choices {
        Hidden::Drop
    } else {
        Hidden::Keep
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
