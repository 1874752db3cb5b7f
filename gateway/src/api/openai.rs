//! The OpenAI dialect: what its responses and stream events report (model, usage,
//! generated text, finish reason, errors), and its error body.

use serde::Deserialize;
use serde_json::json;

use std::ops::Range;

use super::span::{Content, Spanned};
use super::{Endpoint, Observation, ReportedUsage};

#[derive(Deserialize, Default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

/// Chat/completions usage and Responses API usage share this shape loosely.
#[derive(Deserialize, Default)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

impl Usage {
    fn reported(self, embeddings: bool) -> ReportedUsage {
        let cached = self
            .prompt_tokens_details
            .or(self.input_tokens_details)
            .and_then(|d| d.cached_tokens);
        let reasoning = self
            .completion_tokens_details
            .or(self.output_tokens_details)
            .and_then(|d| d.reasoning_tokens);
        ReportedUsage {
            input: self.prompt_tokens.or(self.input_tokens),
            // Embeddings generate nothing; their usage has no completion count.
            output: self
                .completion_tokens
                .or(self.output_tokens)
                .or(embeddings.then_some(0)),
            cached,
            reasoning,
        }
    }
}

#[derive(Deserialize, Default)]
struct Message {
    content: Option<Content>,
}

#[derive(Deserialize)]
struct Choice {
    text: Option<Spanned>,
    message: Option<Message>,
    delta: Option<Message>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ContentPart {
    text: Option<String>,
}

#[derive(Deserialize)]
struct OutputItem {
    #[serde(default)]
    content: Vec<ContentPart>,
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    message: Option<String>,
}

/// Any OpenAI response object, stream chunk or Responses API event.
#[derive(Deserialize, Default)]
struct Object {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    // Responses API
    #[serde(rename = "type")]
    kind: Option<String>,
    delta: Option<serde_json::Value>,
    output: Option<Vec<OutputItem>>,
    status: Option<String>,
    response: Option<Box<Object>>,
    error: Option<serde_json::Value>,
}

fn content_text(content: &Content, out: &mut String) {
    match content {
        Content::Text(s) => out.push_str(&s.text),
        Content::Other(serde_json::Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
            .for_each(|t| out.push_str(t)),
        _ => {}
    }
}

fn error_message(error: serde_json::Value) -> String {
    match error {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => "error".to_owned(),
        other => serde_json::from_value::<ErrorBody>(other.clone())
            .ok()
            .and_then(|e| e.message)
            .unwrap_or_else(|| other.to_string()),
    }
}

/// Reads one JSON object of an OpenAI response: the whole body, or one SSE `data`.
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
    let first = obj.choices.first();
    let span = match endpoint {
        Endpoint::ChatCompletions => match first.and_then(|c| c.delta.as_ref()?.content.as_ref()) {
            Some(Content::Text(s)) => s.span_in(json),
            _ => None,
        },
        Endpoint::Completions => first.and_then(|c| c.text.as_ref()?.span_in(json)),
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

fn read(endpoint: Endpoint, mut obj: Object) -> Observation {
    let mut obs = Observation {
        error: obj.error.take().filter(|e| !e.is_null()).map(error_message),
        ..Observation::default()
    };
    // A Responses API stream event wraps the response in `response`.
    let (obj, event) = match obj.response {
        Some(inner) => (*inner, obj.kind),
        None => {
            let kind = obj.kind.clone();
            (obj, kind)
        }
    };
    obs.model = obj.model.map(Into::into);
    if let Some(usage) = obj.usage {
        obs.usage = usage.reported(endpoint.is_embedding());
    }
    for choice in obj.choices {
        if let Some(t) = choice.text {
            obs.text.push_str(&t.text);
        }
        if let Some(c) = choice.message.or(choice.delta).and_then(|m| m.content) {
            content_text(&c, &mut obs.text);
        }
        if choice.finish_reason.is_some() {
            obs.finish_reason = choice.finish_reason;
        }
    }
    match event.as_deref() {
        Some("response.output_text.delta") => {
            if let Some(serde_json::Value::String(d)) = obj.delta.as_ref() {
                obs.text.push_str(d);
            }
        }
        // Deltas already carried the text of a stream; the final event repeats it.
        Some(_) => {}
        None => {
            for item in obj.output.iter().flatten() {
                for part in &item.content {
                    if let Some(t) = &part.text {
                        obs.text.push_str(t);
                    }
                }
            }
        }
    }
    if endpoint == Endpoint::Responses {
        if let Some(status) = obj.status.filter(|s| s != "in_progress") {
            obs.finish_reason = Some(status);
        }
    }
    obs
}

/// An error body in OpenAI's format.
pub fn error_body(message: &str, kind: &str, code: &str) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_usage_with_details() {
        let body = br#"{"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10,
            "prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":1}}}"#;
        let obs = observe(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!(obs.model.as_deref(), Some("m"));
        assert_eq!(obs.text, "hi");
        assert_eq!(obs.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            obs.usage,
            ReportedUsage {
                input: Some(7),
                output: Some(3),
                cached: Some(2),
                reasoning: Some(1)
            }
        );
    }

    #[test]
    fn reads_stream_chunks_and_usage_chunk() {
        let chunk = br#"{"model":"m","choices":[{"index":0,"delta":{"content":"to"},"finish_reason":null}],"usage":null}"#;
        let obs = observe(Endpoint::ChatCompletions, chunk).unwrap();
        assert_eq!(obs.text, "to");
        assert_eq!(obs.usage, ReportedUsage::default());
        let last =
            br#"{"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let obs = observe(Endpoint::ChatCompletions, last).unwrap();
        assert_eq!(obs.usage.output, Some(2));
    }

    #[test]
    fn reads_responses_api_events_and_bodies() {
        let delta = br#"{"type":"response.output_text.delta","delta":"ab","sequence_number":3}"#;
        assert_eq!(observe(Endpoint::Responses, delta).unwrap().text, "ab");
        let done = br#"{"type":"response.completed","response":{"model":"m","status":"completed","output":[{"content":[{"type":"output_text","text":"ab"}]}],
            "usage":{"input_tokens":4,"output_tokens":2,"input_tokens_details":{"cached_tokens":0},"output_tokens_details":{"reasoning_tokens":1}}}}"#;
        let obs = observe(Endpoint::Responses, done).unwrap();
        assert_eq!(
            obs.text, "",
            "the final event repeats text the deltas carried"
        );
        assert_eq!(obs.usage.input, Some(4));
        assert_eq!(obs.usage.reasoning, Some(1));
        assert_eq!(obs.finish_reason.as_deref(), Some("completed"));
        let body = br#"{"model":"m","status":"completed","output":[{"content":[{"type":"output_text","text":"ab"}]}],"usage":{"input_tokens":4,"output_tokens":2}}"#;
        assert_eq!(observe(Endpoint::Responses, body).unwrap().text, "ab");
    }

    #[test]
    fn embeddings_report_no_output() {
        let body = br#"{"object":"list","data":[],"model":"e","usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        let obs = observe(Endpoint::Embeddings, body).unwrap();
        assert_eq!(obs.usage.input, Some(5));
        assert_eq!(obs.usage.output, Some(0));
    }

    #[test]
    fn reads_errors() {
        let e = br#"{"error":{"message":"bad","type":"x"}}"#;
        assert_eq!(
            observe(Endpoint::ChatCompletions, e)
                .unwrap()
                .error
                .as_deref(),
            Some("bad")
        );
        assert!(observe(Endpoint::ChatCompletions, b"not json").is_none());
    }
}
