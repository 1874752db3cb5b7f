//! One response object (a whole body, an SSE event's data, an NDJSON line) read once, in
//! its endpoint's dialect: what it reports ([`Observation`]: model, usage, text,
//! finish reason, error) and, when the gateway may rewrite the frame, the parsed object
//! itself, so that hiding usage, the response rules and a budget cut all work on that
//! one parse. Where each dialect carries its generated text is decided here, by
//! endpoint.

use std::borrow::Cow;

use serde_json::Value;

use super::{ollama, openai, Dialect, Endpoint, Observation};

/// Reads what one object reports, from its bytes (frames nobody rewrites). Bytes that
/// are not UTF-8 read as U+FFFD, as in [`StreamEvent::parse`].
pub fn observe(endpoint: Endpoint, json: &[u8]) -> Option<Observation> {
    let read = |json: &[u8]| match endpoint.dialect() {
        Dialect::OpenAi => openai::observe(endpoint, json),
        Dialect::Ollama => ollama::observe(endpoint, json),
    };
    read(json).or_else(|| match String::from_utf8_lossy(json) {
        Cow::Owned(text) => read(text.as_bytes()),
        Cow::Borrowed(_) => None,
    })
}

/// A frame's object, parsed once, with what it reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub value: Value,
    pub obs: Observation,
}

impl StreamEvent {
    /// Parses one object; `None` when it is not JSON. JSON of another shape than its
    /// dialect's reports nothing, but rules still see (and may rewrite) its texts.
    ///
    /// Bytes that are not UTF-8 read as U+FFFD, as in [`observe`]: a frame reports the
    /// same whether or not the gateway may rewrite it (a byte serde_json skips unchecked
    /// in an ignored field, say an `id`, made [`observe`] count a usage chunk this did
    /// not, which then reached a client that had not asked for it).
    pub fn parse(endpoint: Endpoint, json: &[u8]) -> Option<Self> {
        let value: Value = match serde_json::from_slice(json) {
            Ok(v) => v,
            Err(_) => match String::from_utf8_lossy(json) {
                Cow::Owned(text) => serde_json::from_str(&text).ok()?,
                Cow::Borrowed(_) => return None,
            },
        };
        let obs = match endpoint.dialect() {
            Dialect::OpenAi => openai::observe_value(endpoint, &value),
            Dialect::Ollama => ollama::observe_value(endpoint, &value),
        }
        .unwrap_or_default();
        Some(Self { value, obs })
    }

    /// The object's `type` (Responses API events).
    pub fn kind(&self) -> Option<&str> {
        self.value.get("type").and_then(Value::as_str)
    }
}

/// Where a stream event of `endpoint` carries its generated text (a JSON pointer).
pub fn text_pointer(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "/choices/0/delta/content",
        Endpoint::Completions => "/choices/0/text",
        Endpoint::Responses => "/delta",
        Endpoint::Chat => "/message/content",
        Endpoint::Generate => "/response",
        // Embeddings generate no text.
        Endpoint::Embeddings | Endpoint::Embed | Endpoint::LegacyEmbeddings => "/response",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parsed_event_reports_what_its_bytes_do() {
        let cases: [(Endpoint, &[u8]); 4] = [
            (
                Endpoint::ChatCompletions,
                br#"{"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            ),
            (
                Endpoint::Responses,
                br#"{"type":"response.output_text.delta","delta":"ab"}"#,
            ),
            (
                Endpoint::Chat,
                br#"{"model":"m","message":{"content":"x"},"done":true,"eval_count":2}"#,
            ),
            (Endpoint::Generate, br#"{"response":"y","done":false}"#),
        ];
        for (endpoint, json) in cases {
            let ev = StreamEvent::parse(endpoint, json).unwrap();
            assert_eq!(
                Some(ev.obs.clone()),
                observe(endpoint, json),
                "{endpoint:?}"
            );
            let text = ev
                .value
                .pointer(text_pointer(endpoint))
                .and_then(Value::as_str);
            assert_eq!(text, Some(ev.obs.text.as_str()), "{endpoint:?}");
        }
        assert!(StreamEvent::parse(Endpoint::Chat, b"not json").is_none());
    }
}
