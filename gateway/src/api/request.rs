//! A recognized request's JSON body: typed where the gateway acts (model, stream,
//! stream options), raw everywhere else, so every field the client sent reaches the
//! upstream unchanged. The original bytes are forwarded unless something changed.

use bytes::Bytes;
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Endpoint;
use kube_gateway_policy::Role;

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

    /// Calls `f` on every text of the prompt with the role that wrote it. `f` keeps the
    /// text, replaces it, or stops the walk. Fields with a replaced text are
    /// re-serialized; the others keep their bytes.
    pub fn visit_prompt<F>(&mut self, mut f: F)
    where
        F: FnMut(Role, &str) -> Visit,
    {
        let fields: &[(&str, Role)] = match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Chat => &[("messages", Role::User)],
            Endpoint::Completions => &[("prompt", Role::User)],
            Endpoint::Embeddings | Endpoint::Embed => &[("input", Role::User)],
            Endpoint::Responses => &[("instructions", Role::System), ("input", Role::User)],
            Endpoint::Generate => &[("system", Role::System), ("prompt", Role::User)],
            Endpoint::LegacyEmbeddings => &[("prompt", Role::User)],
        };
        for (field, role) in fields {
            let Some(Ok(mut value)) = self
                .raw_field(field)
                .map(serde_json::from_str::<serde_json::Value>)
            else {
                continue;
            };
            let mut changed = false;
            let stop = walk(&mut value, *role, &mut f, &mut changed);
            if changed {
                if let Ok(json) = serde_json::to_string(&value) {
                    self.set_raw(field, json);
                }
            }
            if stop {
                return;
            }
        }
    }

    /// The generation limit the client asked for, and the field that holds it.
    pub fn max_tokens(&self) -> Option<u64> {
        let positive = |v: Option<i64>| v.filter(|n| *n > 0).map(|n| n as u64);
        match self.endpoint {
            Endpoint::ChatCompletions => {
                positive(self.field("max_completion_tokens").ok().flatten())
                    .or(positive(self.field("max_tokens").ok().flatten()))
            }
            Endpoint::Completions => positive(self.field("max_tokens").ok().flatten()),
            Endpoint::Responses => positive(self.field("max_output_tokens").ok().flatten()),
            // Ollama: -1 (and -2) mean no limit. Only `num_predict` is read: another option
            // serde_json's Value refuses (a lone surrogate escape) must not hide it.
            Endpoint::Chat | Endpoint::Generate => positive(
                self.field::<IndexMap<String, Box<RawValue>>>("options")
                    .ok()
                    .flatten()
                    .and_then(|o| {
                        o.get("num_predict")
                            .and_then(|raw| serde_json::from_str::<i64>(raw.get()).ok())
                    }),
            ),
            Endpoint::Embeddings | Endpoint::Embed | Endpoint::LegacyEmbeddings => None,
        }
    }

    /// Sets the generation limit, in the field this dialect and client use.
    pub fn set_max_tokens(&mut self, n: u64) {
        let field = match self.endpoint {
            Endpoint::ChatCompletions => {
                // Newer models accept only max_completion_tokens; keep what the client used.
                if self.raw_field("max_completion_tokens").is_some()
                    || self.raw_field("max_tokens").is_none()
                {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                }
            }
            Endpoint::Completions => "max_tokens",
            Endpoint::Responses => "max_output_tokens",
            Endpoint::Chat | Endpoint::Generate => {
                let mut options: IndexMap<String, Box<RawValue>> = self
                    .raw_field("options")
                    .and_then(|raw| serde_json::from_str(raw).ok())
                    .unwrap_or_default();
                if let Ok(v) = RawValue::from_string(n.to_string()) {
                    options.insert("num_predict".to_owned(), v);
                }
                if let Ok(json) = serde_json::to_string(&options) {
                    self.set_raw("options", json);
                }
                return;
            }
            Endpoint::Embeddings | Endpoint::Embed | Endpoint::LegacyEmbeddings => return,
        };
        self.set_raw(field, n.to_string());
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

/// How a prompt is laid out, beyond its text: what a server's chat template and its
/// handling of system text make of it (token estimates fit per-message overhead and
/// learn whether a server counts system text: Gemma's template drops it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptShape {
    /// The text of system (and developer) messages, instructions and `system` fields.
    pub system: String,
    /// Messages (chat `messages`, the Responses API's `input` items); 0 for a plain prompt.
    pub messages: u64,
    /// Of those, system or developer messages.
    pub system_messages: u64,
}

impl LlmRequest {
    /// The prompt's layout (see [`PromptShape`]).
    pub fn prompt_shape(&self) -> PromptShape {
        use serde_json::Value;
        let mut shape = PromptShape::default();
        let parse = |key: &str| {
            self.raw_field(key)
                .and_then(|raw| serde_json::from_str::<Value>(raw).ok())
        };
        let (list, system_fields): (&str, &[&str]) = match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Chat => ("messages", &[]),
            Endpoint::Responses => ("input", &["instructions"]),
            Endpoint::Generate => ("", &["system"]),
            _ => ("", &[]),
        };
        for key in system_fields {
            if let Some(v) = parse(key) {
                collect_text(&v, &mut shape.system);
            }
        }
        if let Some(Value::Array(items)) = (!list.is_empty()).then(|| parse(list)).flatten() {
            for item in &items {
                shape.messages += 1;
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                if Role::from_message_role(role) == Role::System {
                    shape.system_messages += 1;
                    collect_text(item, &mut shape.system);
                }
            }
        }
        shape
    }
}

/// What a prompt visitor does with a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visit {
    Keep,
    Replace(String),
    Stop,
}

/// Walks a prompt value: strings are texts of `role`; messages carry their own role;
/// content parts with `text` are texts; images and other parts are left alone.
fn walk<F>(value: &mut serde_json::Value, role: Role, f: &mut F, changed: &mut bool) -> bool
where
    F: FnMut(Role, &str) -> Visit,
{
    use serde_json::Value;
    match value {
        Value::String(s) => match f(role, s) {
            Visit::Keep => false,
            Visit::Replace(new) => {
                *s = new;
                *changed = true;
                false
            }
            Visit::Stop => true,
        },
        Value::Array(items) => items.iter_mut().any(|i| walk(i, role, f, changed)),
        Value::Object(o) => {
            let role = o
                .get("role")
                .and_then(Value::as_str)
                .map_or(role, Role::from_message_role);
            for key in ["content", "text"] {
                if let Some(v) = o.get_mut(key) {
                    if walk(v, role, f, changed) {
                        return true;
                    }
                }
            }
            false
        }
        _ => false,
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

#[cfg(test)]
mod prompt_tests {
    use super::*;

    fn texts(req: &mut LlmRequest) -> Vec<(Role, String)> {
        let mut out = Vec::new();
        req.visit_prompt(|role, text| {
            out.push((role, text.to_owned()));
            Visit::Keep
        });
        out
    }

    #[test]
    fn visits_every_text_with_its_role() {
        let mut chat = LlmRequest::parse(
            Endpoint::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"developer","content":"rules"},{"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:x"}}]},{"role":"assistant","content":"ok"},{"role":"tool","content":"42"}]}"#,
        )
        .unwrap();
        assert_eq!(
            texts(&mut chat),
            vec![
                (Role::System, "rules".into()),
                (Role::User, "look".into()),
                (Role::Assistant, "ok".into()),
                (Role::Tool, "42".into())
            ]
        );
        let mut gen = LlmRequest::parse(
            Endpoint::Generate,
            br#"{"model":"m","system":"s","prompt":"p","images":["aGk="]}"#,
        )
        .unwrap();
        assert_eq!(
            texts(&mut gen),
            vec![(Role::System, "s".into()), (Role::User, "p".into())]
        );
        let mut resp = LlmRequest::parse(Endpoint::Responses, br#"{"model":"m","instructions":"i","input":[{"role":"user","content":[{"type":"input_text","text":"t"}]}]}"#).unwrap();
        assert_eq!(
            texts(&mut resp),
            vec![(Role::System, "i".into()), (Role::User, "t".into())]
        );
    }

    #[test]
    fn replacing_a_text_rewrites_only_its_field() {
        let body = Bytes::from_static(br#"{"model":"m","temperature":0.50,"messages":[{"role":"user","content":"my secret"}]}"#);
        let mut req = LlmRequest::parse(Endpoint::Chat, &body).unwrap();
        req.visit_prompt(|_, t| Visit::Replace(t.replace("secret", "[X]")));
        assert_eq!(
            &req.body(body)[..],
            br#"{"model":"m","temperature":0.50,"messages":[{"role":"user","content":"my [X]"}]}"#
        );
    }

    #[test]
    fn max_tokens_read_and_set_per_dialect() {
        let mut c = LlmRequest::parse(
            Endpoint::ChatCompletions,
            br#"{"model":"m","max_tokens":500}"#,
        )
        .unwrap();
        assert_eq!(c.max_tokens(), Some(500));
        c.set_max_tokens(100);
        assert_eq!(c.raw_field("max_tokens"), Some("100"));
        let mut fresh = LlmRequest::parse(Endpoint::ChatCompletions, br#"{"model":"m"}"#).unwrap();
        fresh.set_max_tokens(64);
        assert_eq!(fresh.raw_field("max_completion_tokens"), Some("64"));
        let mut o = LlmRequest::parse(
            Endpoint::Chat,
            br#"{"model":"m","options":{"temperature":0,"num_predict":-1}}"#,
        )
        .unwrap();
        assert_eq!(o.max_tokens(), None, "-1 is unlimited");
        o.set_max_tokens(50);
        assert_eq!(
            o.raw_field("options"),
            Some(r#"{"temperature":0,"num_predict":50}"#)
        );
        let mut r = LlmRequest::parse(Endpoint::Responses, br#"{"model":"m"}"#).unwrap();
        r.set_max_tokens(7);
        assert_eq!(r.max_tokens(), Some(7));
    }
}
