//! The Ollama dialect: what its responses and NDJSON lines report, and its error body.

use serde::Deserialize;
use serde_json::json;

use std::ops::Range;

use super::span::Spanned;
use super::{Endpoint, Observation, ReportedUsage};

#[derive(Deserialize)]
struct Message {
    content: Option<Spanned>,
}

/// Any Ollama response object or stream line.
#[derive(Deserialize, Default)]
struct Object {
    model: Option<String>,
    message: Option<Message>,
    response: Option<Spanned>,
    done: Option<bool>,
    done_reason: Option<String>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    error: Option<serde_json::Value>,
}

/// Reads one JSON object of an Ollama response: the whole body, or one NDJSON line.
pub fn observe(endpoint: Endpoint, json: &[u8]) -> Option<Observation> {
    observe_spanned(endpoint, json).map(|(obs, _)| obs)
}

/// [`observe`], and where in `json` the text a rewrite replaces is (the string at the
/// endpoint's text pointer), when it could be seen without another pass.
pub fn observe_spanned(
    endpoint: Endpoint,
    json: &[u8],
) -> Option<(Observation, Option<Range<usize>>)> {
    let obj: Object = serde_json::from_slice(json).ok()?;
    let span = match endpoint {
        Endpoint::Chat => obj
            .message
            .as_ref()
            .and_then(|m| m.content.as_ref()?.span_in(json)),
        Endpoint::Generate => obj.response.as_ref().and_then(|r| r.span_in(json)),
        _ => None,
    };
    Some((read(endpoint, obj), span))
}

/// [`observe`] of an object already parsed (a frame the gateway may rewrite).
pub fn observe_value(endpoint: Endpoint, value: &serde_json::Value) -> Option<Observation> {
    Object::deserialize(value)
        .ok()
        .map(|obj| read(endpoint, obj))
}

fn read(endpoint: Endpoint, obj: Object) -> Observation {
    let mut obs = Observation {
        model: obj.model.map(Into::into),
        error: obj.error.filter(|e| !e.is_null()).map(|e| match e {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        }),
        ..Observation::default()
    };
    if let Some(t) = obj.message.and_then(|m| m.content) {
        obs.text.push_str(&t.text);
    }
    if let Some(t) = obj.response {
        obs.text.push_str(&t.text);
    }
    let done = obj.done.unwrap_or(false);
    if done {
        obs.finish_reason = Some(obj.done_reason.unwrap_or_else(|| "stop".to_owned()));
    }
    obs.usage = ReportedUsage {
        input: obj.prompt_eval_count,
        // Ollama reports eval_count on the final object; embeddings generate nothing.
        output: obj
            .eval_count
            .or((endpoint == Endpoint::Embed && obj.prompt_eval_count.is_some()).then_some(0)),
        cached: None,
        reasoning: None,
    };
    obs
}

/// An error body in Ollama's format.
pub fn error_body(message: &str) -> serde_json::Value {
    json!({"error": message})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stream_lines_and_final_counts() {
        let line = br#"{"model":"m","created_at":"t","message":{"role":"assistant","content":"He"},"done":false}"#;
        let obs = observe(Endpoint::Chat, line).unwrap();
        assert_eq!(obs.text, "He");
        assert_eq!(obs.finish_reason, None);
        let last = br#"{"model":"m","response":"","done":true,"done_reason":"length","prompt_eval_count":9,"eval_count":4}"#;
        let obs = observe(Endpoint::Generate, last).unwrap();
        assert_eq!(obs.finish_reason.as_deref(), Some("length"));
        assert_eq!(obs.usage.input, Some(9));
        assert_eq!(obs.usage.output, Some(4));
    }

    #[test]
    fn embed_counts_input_only() {
        let body = br#"{"model":"e","embeddings":[[0.1]],"prompt_eval_count":3}"#;
        let obs = observe(Endpoint::Embed, body).unwrap();
        assert_eq!((obs.usage.input, obs.usage.output), (Some(3), Some(0)));
        let legacy = br#"{"embedding":[0.1]}"#;
        assert_eq!(
            observe(Endpoint::LegacyEmbeddings, legacy).unwrap().usage,
            ReportedUsage::default()
        );
    }

    #[test]
    fn reads_errors() {
        let obs = observe(Endpoint::Chat, br#"{"error":"model not found"}"#).unwrap();
        assert_eq!(obs.error.as_deref(), Some("model not found"));
    }
}
