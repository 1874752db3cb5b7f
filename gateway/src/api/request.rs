//! A recognized request's JSON body: typed where the gateway acts (model, stream,
//! stream options), raw everywhere else, so every field the client sent reaches the
//! upstream unchanged. The original bytes are forwarded unless something changed.

use bytes::Bytes;
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Endpoint;

/// Why a body could not be read as a request of its endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("field `{field}` has the wrong type: {message}")]
    FieldType {
        field: &'static str,
        message: String,
    },
}

/// A parsed LLM request.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub endpoint: Endpoint,
    /// The body's top-level fields in their original order, values as the client wrote them.
    fields: IndexMap<String, Box<RawValue>>,
    /// The model the client asked for (`None` when the body names none).
    pub model: Option<String>,
    /// Whether the answer will stream, with the endpoint's default applied.
    pub stream: bool,
    changed: bool,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

impl LlmRequest {
    pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Self, ParseError> {
        let fields: IndexMap<String, Box<RawValue>> =
            serde_json::from_slice(body).map_err(|e| ParseError::NotAnObject(e.to_string()))?;
        let mut req = Self {
            endpoint,
            fields,
            model: None,
            stream: endpoint.streams_by_default(),
            changed: false,
        };
        req.model = req.field::<Option<String>>("model")?.flatten();
        if let Some(stream) = req.field::<Option<bool>>("stream")?.flatten() {
            req.stream = stream;
        }
        Ok(req)
    }

    /// A top-level field, typed; `None` when absent.
    pub fn field<T: for<'de> Deserialize<'de>>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, ParseError> {
        self.fields
            .get(name)
            .map(|raw| {
                serde_json::from_str(raw.get()).map_err(|e| ParseError::FieldType {
                    field: name,
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    /// The raw JSON of a top-level field.
    pub fn raw_field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(|raw| raw.get())
    }

    /// Whether anything was changed since parsing.
    pub fn changed(&self) -> bool {
        self.changed
    }

    fn set_raw(&mut self, name: &str, json: String) {
        match RawValue::from_string(json) {
            Ok(raw) => {
                self.fields.insert(name.to_owned(), raw);
                self.changed = true;
            }
            // Only ever called with serializer output, which is valid JSON.
            Err(e) => tracing::error!(field = name, error = %e, "internal: invalid JSON for field"),
        }
    }

    /// Replaces the model.
    pub fn set_model(&mut self, model: &str) {
        if let Ok(json) = serde_json::to_string(model) {
            self.set_raw("model", json);
            self.model = Some(model.to_owned());
        }
    }

    /// For an OpenAI stream, asks the upstream to end with a usage chunk. Returns true when
    /// the client had not asked for it, so the gateway must hide that chunk from it.
    pub fn ensure_stream_usage(&mut self) -> bool {
        if !self.stream
            || !matches!(
                self.endpoint,
                Endpoint::ChatCompletions | Endpoint::Completions
            )
        {
            return false;
        }
        let wanted = self
            .field::<StreamOptions>("stream_options")
            .ok()
            .flatten()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        if wanted {
            return false;
        }
        // Keep whatever other stream options the client set.
        let mut options: IndexMap<String, Box<RawValue>> = self
            .raw_field("stream_options")
            .and_then(|raw| serde_json::from_str(raw).ok())
            .unwrap_or_default();
        let Ok(yes) = RawValue::from_string("true".to_owned()) else {
            return false;
        };
        options.insert("include_usage".to_owned(), yes);
        match serde_json::to_string(&options) {
            Ok(json) => {
                self.set_raw("stream_options", json);
                true
            }
            Err(_) => false,
        }
    }

    /// The body to send upstream: `original` when nothing changed, else re-serialized.
    pub fn body(&self, original: Bytes) -> Bytes {
        if !self.changed {
            return original;
        }
        match serde_json::to_vec(&self.fields) {
            Ok(v) => Bytes::from(v),
            Err(_) => original,
        }
    }

    /// The prompt's text, for token estimates: every text the model will read.
    pub fn prompt_text(&self) -> String {
        let mut out = String::new();
        let keys: &[&str] = match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Chat => &["messages"],
            Endpoint::Completions => &["prompt"],
            Endpoint::Embeddings | Endpoint::Embed => &["input"],
            Endpoint::Responses => &["instructions", "input"],
            Endpoint::Generate => &["system", "prompt"],
            Endpoint::LegacyEmbeddings => &["prompt"],
        };
        for key in keys {
            if let Some(Ok(value)) = self
                .raw_field(key)
                .map(serde_json::from_str::<serde_json::Value>)
            {
                collect_text(&value, &mut out);
            }
        }
        out
    }
}

/// Appends the text a model reads from a prompt value: strings, message `content`,
/// and the `text` of content parts; images and other parts are skipped.
fn collect_text(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(s);
        }
        Value::Array(items) => items.iter().for_each(|i| collect_text(i, out)),
        Value::Object(o) => {
            for key in ["content", "text"] {
                if let Some(v) = o.get(key) {
                    collect_text(v, out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_body_is_forwarded_as_is() {
        let body = Bytes::from_static(br#"{ "model" : "a",  "x": [1, 2.50, {"y": null}] }"#);
        let req = LlmRequest::parse(Endpoint::ChatCompletions, &body).unwrap();
        assert_eq!(req.model.as_deref(), Some("a"));
        assert!(!req.stream);
        assert_eq!(req.body(body.clone()), body);
    }

    #[test]
    fn model_rewrite_keeps_every_other_field_verbatim() {
        let body = Bytes::from_static(
            br#"{"model":"a","temperature":0.70,"x":{"deep":[1e3, "\u00e9"]},"zzz":true}"#,
        );
        let mut req = LlmRequest::parse(Endpoint::Chat, &body).unwrap();
        assert!(req.stream, "Ollama chat streams by default");
        req.set_model("b");
        assert_eq!(
            &req.body(body)[..],
            br#"{"model":"b","temperature":0.70,"x":{"deep":[1e3, "\u00e9"]},"zzz":true}"#
        );
    }

    #[test]
    fn stream_usage_is_added_once_and_keeps_other_options() {
        let body =
            Bytes::from_static(br#"{"model":"a","stream":true,"stream_options":{"other":1}}"#);
        let mut req = LlmRequest::parse(Endpoint::ChatCompletions, &body).unwrap();
        assert!(req.ensure_stream_usage());
        let out = req.body(body);
        assert_eq!(
            &out[..],
            br#"{"model":"a","stream":true,"stream_options":{"other":1,"include_usage":true}}"#
        );
        let mut again = LlmRequest::parse(Endpoint::ChatCompletions, &out).unwrap();
        assert!(!again.ensure_stream_usage());
        let plain = LlmRequest::parse(Endpoint::ChatCompletions, br#"{"model":"a"}"#);
        assert!(!plain.unwrap().ensure_stream_usage(), "not a stream");
    }

    #[test]
    fn bad_bodies_are_typed_errors() {
        assert!(matches!(
            LlmRequest::parse(Endpoint::Chat, b"[1]"),
            Err(ParseError::NotAnObject(_))
        ));
        assert!(matches!(
            LlmRequest::parse(Endpoint::Chat, br#"{"model":"a""#),
            Err(ParseError::NotAnObject(_))
        ));
        assert!(matches!(
            LlmRequest::parse(Endpoint::Chat, br#"{"model":5}"#),
            Err(ParseError::FieldType { field: "model", .. })
        ));
    }

    #[test]
    fn prompt_text_reads_messages_parts_and_prompts() {
        let req = LlmRequest::parse(
            Endpoint::ChatCompletions,
            br#"{"model":"a","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"u"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(req.prompt_text(), "be brief\nhi");
        let gen = LlmRequest::parse(
            Endpoint::Generate,
            br#"{"model":"a","system":"s","prompt":"p"}"#,
        )
        .unwrap();
        assert_eq!(gen.prompt_text(), "s\np");
    }
}
