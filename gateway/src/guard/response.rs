//! Response rules applied to answers in each dialect's shapes. Streams: each event's
//! text (as [`StreamEvent`] read it, once) goes through the policy's streaming filter
//! and the event carries what it releases; held text is put into the final event; a
//! block ends the answer with a notice, `finish_reason: "content_filter"` (Ollama
//! `done_reason`) and a well-formed end. Whole answers are checked whole.

use std::sync::Arc;

use kube_gateway_policy::{Emit, ResponseFilter, ResponseRules};
use serde_json::{json, Value};

use crate::api::event::text_pointer;
use crate::api::span::KeyIs;
use crate::api::{Dialect, Endpoint, StreamEvent};

/// The text that replaces a blocked answer's remainder.
pub fn notice(rule: &str) -> String {
    format!("[response blocked by policy rule {rule}]")
}

/// Sets an event's generated text where its endpoint carries it, creating the field
/// where a final chat chunk has an empty delta.
pub fn set_text(v: &mut Value, endpoint: Endpoint, text: String) {
    if let Some(Value::String(s)) = v.pointer_mut(text_pointer(endpoint)) {
        *s = text;
    } else if let Some(delta) = v
        .pointer_mut("/choices/0/delta")
        .and_then(Value::as_object_mut)
    {
        delta.insert("content".into(), Value::String(text));
    }
}

/// Applies the whole-text filter to every generated text of a complete object (a whole
/// answer, or a Responses API event that repeats the full text). Returns the rules hit
/// and the blocking rule, if any.
fn filter_whole(
    v: &mut Value,
    rules: &Arc<ResponseRules>,
    hits: &mut Vec<String>,
) -> Option<String> {
    let mut blocked = None;
    walk_texts(v, &mut |s: &mut String| {
        let (emit, h) = rules.apply(s);
        hits.extend(h);
        *s = match &emit.blocked {
            Some(rule) => format!("{}{}", emit.text, notice(rule)),
            None => emit.text,
        };
        if blocked.is_none() {
            blocked = emit.blocked;
        }
    });
    blocked
}

/// Whether a rule acts on any generated text of a whole answer (as [`whole`] would find
/// one), read from its bytes: most answers pass untouched, and then no value is built.
/// Every member is read, duplicates too, so it can only say yes more often than
/// [`whole`] (which reads the last of duplicate keys); `None` when serde_json does not
/// read the bytes (the caller takes the value path, as before).
pub fn acts_on_whole(json: &[u8], rules: &ResponseRules) -> Option<bool> {
    use serde::de::DeserializeSeed;
    let mut hit = false;
    let mut de = serde_json::Deserializer::from_slice(json);
    Scan {
        rules,
        hit: &mut hit,
        text: false,
    }
    .deserialize(&mut de)
    .ok()?;
    de.end().ok()?;
    Some(hit)
}

/// One value of [`acts_on_whole`]'s walk; `text`: it is a text field's value.
struct Scan<'a> {
    rules: &'a ResponseRules,
    hit: &'a mut bool,
    text: bool,
}

impl Scan<'_> {
    fn nested(&mut self, text: bool) -> Scan<'_> {
        Scan {
            rules: self.rules,
            hit: &mut *self.hit,
            text,
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Scan<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        if self.text && !*self.hit && self.rules.acts_on(s) {
            *self.hit = true;
        }
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(text) = map.next_key_seed(KeyIs(&TEXT_KEYS))? {
            map.next_value_seed(self.nested(text))?;
        }
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self.nested(false))?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// The members that carry generated text: `content`, `text` and Ollama's `response`.
const TEXT_KEYS: [&str; 3] = ["content", "text", "response"];

fn is_text_key(key: &str) -> bool {
    TEXT_KEYS.contains(&key)
}

/// Generated text fields: `content`, `text` and Ollama's `response`, when strings.
fn walk_texts(v: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match v {
        Value::Object(o) => {
            for (k, val) in o.iter_mut() {
                match (k.as_str(), val) {
                    (k, Value::String(s)) if is_text_key(k) => f(s),
                    (_, other) => walk_texts(other, f),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| walk_texts(i, f)),
        _ => {}
    }
}

/// Makes an object the last of its answer, ended for `reason`.
fn mark_finished(v: &mut Value, endpoint: Endpoint, reason: &str) {
    match endpoint.dialect() {
        Dialect::OpenAi => {
            if let Some(choice) = v.pointer_mut("/choices/0").and_then(Value::as_object_mut) {
                choice.insert("finish_reason".into(), json!(reason));
            }
        }
        Dialect::Ollama => {
            if let Some(o) = v.as_object_mut() {
                o.insert("done".into(), json!(true));
                o.insert("done_reason".into(), json!(reason));
            }
        }
    }
}

/// The Responses API event that ends an answer early, for `reason`.
fn incomplete(reason: &str) -> Value {
    json!({"type": "response.incomplete",
        "response": {"status": "incomplete", "incomplete_details": {"reason": reason}}})
}

/// The event that ends an answer cut at a budget: shaped like `ev` (the event just
/// sent), with no text and `finish_reason: "length"` (Ollama `done_reason`); for the
/// Responses API a `response.incomplete`.
pub fn length_cut_event(ev: &mut StreamEvent, endpoint: Endpoint) -> Value {
    if endpoint == Endpoint::Responses {
        return incomplete("max_output_tokens");
    }
    let mut v = ev.value().clone();
    set_text(&mut v, endpoint, String::new());
    if let Some(delta) = v
        .pointer_mut("/choices/0/delta")
        .and_then(Value::as_object_mut)
    {
        delta.remove("content");
        delta.remove("role");
    }
    mark_finished(&mut v, endpoint, "length");
    v
}

/// A whole (non-streamed) answer through the rules, rewritten in place: the rules hit
/// and whether a rule blocked it; `None` when no rule acted (the original bytes stand).
pub fn whole(
    v: &mut Value,
    endpoint: Endpoint,
    rules: &Arc<ResponseRules>,
) -> Option<(Vec<String>, bool)> {
    let mut hits = Vec::new();
    let blocked = filter_whole(v, rules, &mut hits);
    if hits.is_empty() {
        return None;
    }
    if blocked.is_some() {
        mark_finished(v, endpoint, "content_filter");
    }
    Some((hits, blocked.is_some()))
}

/// What to send for one stream event.
pub enum Step {
    /// Send the event as it is.
    Keep,
    /// Send the event with this generated text in place of its own.
    Text(String),
    /// Send these objects instead (in order); with `end`, the answer ends after them.
    Replace { objects: Vec<Value>, end: bool },
}

/// The response rules of one streamed answer.
pub struct StreamGuard {
    filter: ResponseFilter,
    rules: Arc<ResponseRules>,
    endpoint: Endpoint,
    pub hits: Vec<String>,
    pub blocked: Option<String>,
}

impl StreamGuard {
    pub fn new(rules: &Arc<ResponseRules>, endpoint: Endpoint) -> Self {
        Self {
            filter: rules.stream(),
            rules: rules.clone(),
            endpoint,
            hits: Vec::new(),
            blocked: None,
        }
    }

    pub fn is_ended(&self) -> bool {
        self.blocked.is_some()
    }

    /// The rules hit so far, as the filter counts them.
    fn sync_hits(&mut self) {
        if self.filter.hit_count() != self.hits.len() {
            self.hits = self.filter.hits();
        }
    }

    /// One event, as the meter parsed it.
    pub fn event(&mut self, ev: &mut StreamEvent) -> Step {
        if self.blocked.is_some() {
            return Step::Replace {
                objects: Vec::new(),
                end: true,
            };
        }
        let responses = self.endpoint == Endpoint::Responses;
        // Responses API events that repeat the full text are checked whole (only these
        // need the parsed object to be read; other events use what `obs` holds).
        let (delta, done) = match responses.then(|| ev.kind()).flatten() {
            Some(kind) => (
                kind == "response.output_text.delta",
                kind == "response.output_text.done",
            ),
            None => (false, false),
        };
        if responses && !delta {
            let mut extra = Vec::new();
            if done {
                let rest = self.filter.finish();
                if !rest.text.is_empty() {
                    let mut delta = ev.value().clone();
                    delta["type"] = json!("response.output_text.delta");
                    if let Some(o) = delta.as_object_mut() {
                        o.remove("text");
                    }
                    delta["delta"] = json!(rest.text);
                    extra.push(delta);
                }
            }
            // The text these repeat was filtered as it streamed: its hits are counted
            // there. A block found only here (text no delta carried) still ends the answer.
            let mut v = ev.value().clone();
            let mut hits = Vec::new();
            let blocked = filter_whole(&mut v, &self.rules, &mut hits);
            extra.push(v);
            if let Some(rule) = blocked {
                if !self.hits.contains(&rule) {
                    self.hits.push(rule.clone());
                }
                self.blocked = Some(rule);
                extra.push(incomplete("content_filter"));
            }
            return Step::Replace {
                objects: extra,
                end: self.blocked.is_some(),
            };
        }
        let text = ev.obs.text.as_str();
        let last = ev.obs.finish_reason.is_some();
        let released = self.filter.push_released(text);
        if !last && released.blocked.is_none() && released.text == text {
            // Most events go out as they came: nothing to copy.
            self.sync_hits();
            return Step::Keep;
        }
        let mut emit = Emit {
            text: released.text.to_owned(),
            blocked: released.blocked,
        };
        if last && emit.blocked.is_none() {
            let rest = self.filter.finish();
            emit.text.push_str(&rest.text);
            emit.blocked = rest.blocked;
        }
        self.sync_hits();
        match emit.blocked {
            Some(rule) => {
                let mut v = ev.value().clone();
                set_text(
                    &mut v,
                    self.endpoint,
                    format!("{}{}", emit.text, notice(&rule)),
                );
                mark_finished(&mut v, self.endpoint, "content_filter");
                self.blocked = Some(rule);
                let mut objects = vec![v];
                if responses {
                    objects.push(incomplete("content_filter"));
                }
                Step::Replace { objects, end: true }
            }
            // Nothing changed: the event goes as it is.
            None if emit.text == text => Step::Keep,
            None => Step::Text(emit.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_gateway_policy::load;
    use proptest::prelude::*;

    fn rules() -> Arc<ResponseRules> {
        load("apiVersion: kube-gateway.io/v1alpha1\nresponseRules:\n  - name: rabbits\n    match: { literals: [rabbit] }\n    action: redact\n    mask: '***'\n  - name: stop\n    match: { literals: [FORBIDDEN] , caseSensitive: true }\n    action: block\n")
            .unwrap()
            .response
            .clone()
    }

    fn event(endpoint: Endpoint, v: Value) -> StreamEvent<'static> {
        let json = v.to_string().into_bytes().leak();
        StreamEvent::parse(endpoint, json).unwrap()
    }

    fn chat(content: &str) -> StreamEvent<'static> {
        event(
            Endpoint::ChatCompletions,
            json!({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]}),
        )
    }

    fn texts(steps: Vec<Step>, originals: &mut [StreamEvent]) -> String {
        let mut out = String::new();
        for (step, orig) in steps.into_iter().zip(originals.iter_mut()) {
            let objs = match step {
                Step::Keep => vec![orig.value().clone()],
                Step::Text(text) => {
                    let mut v = orig.value().clone();
                    set_text(&mut v, Endpoint::ChatCompletions, text);
                    vec![v]
                }
                Step::Replace { objects, .. } => objects,
            };
            for o in objs {
                if let Some(t) = o
                    .pointer(text_pointer(Endpoint::ChatCompletions))
                    .and_then(Value::as_str)
                {
                    out.push_str(t);
                }
            }
        }
        out
    }

    #[test]
    fn a_word_split_across_openai_chunks_is_masked() {
        let r = rules();
        let mut g = StreamGuard::new(&r, Endpoint::ChatCompletions);
        let events = vec![
            chat("a rab"),
            chat("bit ran"),
            event(
                Endpoint::ChatCompletions,
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            ),
        ];
        let mut events = events;
        let steps: Vec<Step> = events.iter_mut().map(|e| g.event(e)).collect();
        assert_eq!(texts(steps, &mut events), "a *** ran");
        assert_eq!(g.hits, ["rabbits"]);
    }

    #[test]
    fn block_ends_an_ollama_stream_with_done_reason() {
        let r = rules();
        let mut g = StreamGuard::new(&r, Endpoint::Chat);
        let mut line = event(
            Endpoint::Chat,
            json!({"model": "m", "message": {"role": "assistant", "content": "this is FORBIDDEN text"}, "done": false}),
        );
        let Step::Replace { objects, end } = g.event(&mut line) else {
            panic!("not replaced")
        };
        assert!(end);
        assert_eq!(objects[0]["done"], true);
        assert_eq!(objects[0]["done_reason"], "content_filter");
        assert_eq!(
            objects[0]["message"]["content"],
            "this is [response blocked by policy rule stop]"
        );
    }

    #[test]
    fn whole_answers_are_rewritten() {
        let body = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "one rabbit"}, "finish_reason": "stop"}]});
        let mut v = body;
        let (hits, blocked) = whole(&mut v, Endpoint::ChatCompletions, &rules()).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "one ***");
        assert_eq!((hits, blocked), (vec!["rabbits".to_owned()], false));
        let mut clean = json!({"response": "clean"});
        assert!(whole(&mut clean, Endpoint::Generate, &rules()).is_none());
    }

    /// Any JSON value whose member names include the text fields, whose strings the
    /// rules hit or not, escaped or not.
    fn answer() -> impl Strategy<Value = Value> {
        let key = prop::sample::select(vec![
            "content",
            "text",
            "response",
            "role",
            "message",
            "choices",
            "tool_calls",
        ]);
        let string = prop::sample::select(vec![
            "clean",
            "one rabbit",
            "a FORBIDDEN word",
            "rab\"bit",
            "rabbit\n",
            "\u{e9}t\u{e9}",
            "forbidden",
            "",
        ])
        .prop_map(|s| Value::String(s.to_owned()));
        let leaf = prop_oneof![
            string,
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (-1e9f64..1e9).prop_map(|n| json!(n)),
        ];
        leaf.prop_recursive(5, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..5).prop_map(|members| {
                    Value::Object(
                        members
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect(),
                    )
                }),
            ]
        })
    }

    proptest! {
        /// The byte scan says a rule acts exactly when the value walk finds a hit.
        #[test]
        fn the_byte_scan_agrees_with_the_value_walk(v in answer()) {
            let bytes = v.to_string();
            let scanned = acts_on_whole(bytes.as_bytes(), &rules());
            let mut walked = v.clone();
            let acted = whole(&mut walked, Endpoint::ChatCompletions, &rules()).is_some();
            prop_assert_eq!(scanned, Some(acted), "{}", bytes);
        }
    }

    #[test]
    fn the_byte_scan_reads_duplicates_and_refuses_what_serde_refuses() {
        let r = rules();
        // The walk reads the last `content` (clean); the scan may say yes, never no.
        assert_eq!(
            acts_on_whole(br#"{"content":"a rabbit","content":"clean"}"#, &r),
            Some(true)
        );
        assert_eq!(acts_on_whole(br#"{"content":"clean"}"#, &r), Some(false));
        assert_eq!(
            acts_on_whole(br#"{"content":"rab\u0062it"}"#, &r),
            Some(true)
        );
        assert_eq!(acts_on_whole(br#"{"role":"rabbit"}"#, &r), Some(false));
        assert_eq!(acts_on_whole(br#"{"content":"clean"} x"#, &r), None);
        assert_eq!(acts_on_whole(br#"{"content":"#, &r), None);
    }

    #[test]
    fn a_block_in_a_responses_event_that_repeats_the_text_ends_the_answer() {
        // Text no delta carried (here a completed response, straight away) is checked
        // whole; a block there ends the answer like a block in a delta does.
        let r = rules();
        let mut g = StreamGuard::new(&r, Endpoint::Responses);
        let mut completed = event(
            Endpoint::Responses,
            json!({"type": "response.completed", "response": {"output": [
            {"type": "message", "content": [{"type": "output_text", "text": "a FORBIDDEN word"}]}]}}),
        );
        let Step::Replace { objects, end } = g.event(&mut completed) else {
            panic!("the event must be rewritten")
        };
        assert!(end, "the answer ends");
        assert!(g.is_ended());
        assert_eq!(g.hits, ["stop"]);
        let text = objects[0].to_string();
        assert!(
            !text.contains("FORBIDDEN word") && text.contains(&notice("stop")),
            "{text}"
        );
        assert_eq!(objects.last().unwrap()["type"], "response.incomplete");
    }
}
