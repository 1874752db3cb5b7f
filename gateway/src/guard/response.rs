//! Response rules applied to answers in each dialect's shapes. Streams: each event's
//! text delta goes through the policy's streaming filter and the event carries what it
//! releases; held text is put into the final event; a block ends the answer with a
//! notice, `finish_reason: "content_filter"` (Ollama `done_reason`) and a well-formed
//! end. Whole answers are checked whole.

use std::sync::Arc;

use kube_gateway_policy::{ResponseFilter, ResponseRules};
use serde_json::{json, Value};

use crate::api::Endpoint;

/// The text that replaces a blocked answer's remainder.
pub fn notice(rule: &str) -> String {
    format!("[response blocked by policy rule {rule}]")
}

/// Where a stream event of each shape carries its generated text.
fn delta_text(v: &mut Value) -> Option<&mut String> {
    let is_text_delta = v.get("type").and_then(Value::as_str) == Some("response.output_text.delta");
    let ptr = if is_text_delta {
        "/delta"
    } else if v.pointer("/choices/0/delta").is_some() {
        "/choices/0/delta/content"
    } else if v.pointer("/choices/0/text").is_some() {
        "/choices/0/text"
    } else if v.pointer("/message/content").is_some() {
        "/message/content"
    } else {
        "/response"
    };
    match v.pointer_mut(ptr) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// Whether this event is the one that ends the generated text.
fn is_final(v: &Value) -> bool {
    v.pointer("/choices/0/finish_reason")
        .is_some_and(|f| !f.is_null())
        || v.get("done").and_then(Value::as_bool) == Some(true)
        || v.get("type").and_then(Value::as_str) == Some("response.output_text.done")
}

/// Sets the text of a final or delta event, creating the field where a final OpenAI
/// chunk has an empty delta.
fn set_text(v: &mut Value, text: String) {
    if let Some(s) = delta_text(v) {
        *s = text;
    } else if let Some(delta) = v
        .pointer_mut("/choices/0/delta")
        .and_then(Value::as_object_mut)
    {
        delta.insert("content".into(), Value::String(text));
    }
}

/// The Responses API event that ends an answer early, for `reason`.
fn incomplete(reason: &str) -> Value {
    json!({"type": "response.incomplete",
        "response": {"status": "incomplete", "incomplete_details": {"reason": reason}}})
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

/// Generated text fields: `content`, `text` and Ollama's `response`, when strings.
fn walk_texts(v: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match v {
        Value::Object(o) => {
            for (k, val) in o.iter_mut() {
                match (k.as_str(), val) {
                    ("content" | "text" | "response", Value::String(s)) => f(s),
                    (_, other) => walk_texts(other, f),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| walk_texts(i, f)),
        _ => {}
    }
}

fn mark_blocked(v: &mut Value) {
    mark_finished(v, "content_filter");
}

/// Makes an event the last of its answer, ended for `reason`.
fn mark_finished(v: &mut Value, reason: &str) {
    if let Some(choice) = v.pointer_mut("/choices/0").and_then(Value::as_object_mut) {
        choice.insert("finish_reason".into(), json!(reason));
    }
    if v.get("done").is_some()
        || v.get("message").is_some()
        || v.get("response").is_some_and(Value::is_string)
    {
        v["done"] = json!(true);
        v["done_reason"] = json!(reason);
    }
}

/// The event that ends an answer cut at a budget: shaped like `json` (the event just
/// sent), with no text and `finish_reason: "length"` (Ollama `done_reason`); for the
/// Responses API a `response.incomplete`.
pub fn length_cut_event(json: &str, endpoint: Endpoint) -> Option<Value> {
    if endpoint == Endpoint::Responses {
        return Some(incomplete("max_output_tokens"));
    }
    let mut v: Value = serde_json::from_str(json).ok()?;
    set_text(&mut v, String::new());
    if let Some(delta) = v
        .pointer_mut("/choices/0/delta")
        .and_then(Value::as_object_mut)
    {
        delta.remove("content");
        delta.remove("role");
    }
    mark_finished(&mut v, "length");
    Some(v)
}

/// A whole (non-streamed) answer through the rules: the new body, the rules hit, and
/// whether a rule blocked it.
pub fn whole(body: &[u8], rules: &Arc<ResponseRules>) -> Option<(Vec<u8>, Vec<String>, bool)> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let mut hits = Vec::new();
    let blocked = filter_whole(&mut v, rules, &mut hits);
    if hits.is_empty() {
        return None;
    }
    if blocked.is_some() {
        mark_blocked(&mut v);
    }
    Some((serde_json::to_vec(&v).ok()?, hits, blocked.is_some()))
}

/// What to send for one stream event.
pub enum Step {
    /// Send the event as it came.
    Keep,
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

    /// One event's JSON.
    pub fn event(&mut self, json: &str) -> Step {
        if self.blocked.is_some() {
            return Step::Replace {
                objects: Vec::new(),
                end: true,
            };
        }
        let Ok(mut v) = serde_json::from_str::<Value>(json) else {
            return Step::Keep;
        };
        let responses = self.endpoint == Endpoint::Responses;
        let kind = v.get("type").and_then(Value::as_str).map(str::to_owned);
        // Responses API events that repeat the full text are checked whole.
        if responses && kind.as_deref() != Some("response.output_text.delta") {
            let mut extra = Vec::new();
            if kind.as_deref() == Some("response.output_text.done") {
                let rest = self.filter.finish();
                if !rest.text.is_empty() {
                    let mut delta = v.clone();
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
        let fin = is_final(&v);
        let text = delta_text(&mut v).map(std::mem::take).unwrap_or_default();
        let mut emit = self.filter.push(&text);
        if fin && emit.blocked.is_none() {
            let rest = self.filter.finish();
            emit.text.push_str(&rest.text);
            emit.blocked = rest.blocked;
        }
        self.hits = self.filter.hits();
        match emit.blocked {
            Some(rule) => {
                set_text(&mut v, format!("{}{}", emit.text, notice(&rule)));
                mark_blocked(&mut v);
                self.blocked = Some(rule);
                let mut objects = vec![v];
                if responses {
                    objects.push(incomplete("content_filter"));
                }
                Step::Replace { objects, end: true }
            }
            None if emit.text == text => {
                // Nothing changed: put the text back and keep the original bytes.
                Step::Keep
            }
            None => {
                set_text(&mut v, emit.text);
                Step::Replace {
                    objects: vec![v],
                    end: false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_gateway_policy::load;

    fn rules() -> Arc<ResponseRules> {
        load("apiVersion: kube-gateway.io/v1alpha1\nresponseRules:\n  - name: rabbits\n    match: { literals: [rabbit] }\n    action: redact\n    mask: '***'\n  - name: stop\n    match: { literals: [FORBIDDEN] , caseSensitive: true }\n    action: block\n")
            .unwrap()
            .response
            .clone()
    }

    fn chat(content: &str) -> String {
        json!({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
            .to_string()
    }

    fn texts(steps: Vec<Step>, originals: &[String]) -> String {
        let mut out = String::new();
        for (step, orig) in steps.into_iter().zip(originals) {
            let objs = match step {
                Step::Keep => vec![serde_json::from_str::<Value>(orig).unwrap()],
                Step::Replace { objects, .. } => objects,
            };
            for mut o in objs {
                if let Some(t) = delta_text(&mut o) {
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
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).to_string(),
        ];
        let steps: Vec<Step> = events.iter().map(|e| g.event(e)).collect();
        assert_eq!(texts(steps, &events), "a *** ran");
        assert_eq!(g.hits, ["rabbits"]);
    }

    #[test]
    fn block_ends_an_ollama_stream_with_done_reason() {
        let r = rules();
        let mut g = StreamGuard::new(&r, Endpoint::Chat);
        let line = json!({"model": "m", "message": {"role": "assistant", "content": "this is FORBIDDEN text"}, "done": false}).to_string();
        let Step::Replace { objects, end } = g.event(&line) else {
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
        let (out, hits, blocked) = whole(body.to_string().as_bytes(), &rules()).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "one ***");
        assert_eq!((hits, blocked), (vec!["rabbits".to_owned()], false));
        assert!(whole(br#"{"response":"clean"}"#, &rules()).is_none());
    }

    #[test]
    fn a_block_in_a_responses_event_that_repeats_the_text_ends_the_answer() {
        // Text no delta carried (here a completed response, straight away) is checked
        // whole; a block there ends the answer like a block in a delta does.
        let r = rules();
        let mut g = StreamGuard::new(&r, Endpoint::Responses);
        let completed = json!({"type": "response.completed", "response": {"output": [
            {"type": "message", "content": [{"type": "output_text", "text": "a FORBIDDEN word"}]}]}})
        .to_string();
        let Step::Replace { objects, end } = g.event(&completed) else {
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
