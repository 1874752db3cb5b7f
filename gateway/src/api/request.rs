//! A recognized request's JSON body: typed where the gateway acts (model, stream,
//! stream options, the prompt's texts, max tokens), bytes everywhere else. The body is
//! read once, into where its members and texts are; what the gateway changes is spliced
//! over those bytes, every other byte reaches the upstream as the client wrote it, and
//! the original bytes are forwarded unchanged unless something changed.

mod object;
mod prompt;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;

use super::Endpoint;
use kube_gateway_policy::Role;
use object::{Object, Raw, Splices};
use prompt::{Field, Prompts};

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
    /// The model the client asked for (`None` when the body names none).
    pub model: Option<String>,
    /// Whether the answer will stream, with the endpoint's default applied.
    pub stream: bool,
    /// The body as it came.
    original: Bytes,
    /// Its top-level members, in their order, as spans of `original`.
    object: Object,
    /// The texts of the endpoint's prompt fields, in `prompt_fields` order.
    prompt: [Field; 2],
    /// Changed values: a member's whole value, or one text's string.
    splices: Splices,
    /// Members the gateway added, written last (name, JSON value).
    added: Vec<(&'static str, String)>,
    /// A prompt field is there but its texts could not be read (see `parse`).
    prompt_unread: bool,
}

/// The fields that hold an endpoint's prompt, with the role of their bare strings.
fn prompt_fields(endpoint: Endpoint) -> &'static [(&'static str, Role)] {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Chat => &[("messages", Role::User)],
        Endpoint::Completions => &[("prompt", Role::User)],
        Endpoint::Embeddings | Endpoint::Embed => &[("input", Role::User)],
        Endpoint::Responses => &[("instructions", Role::System), ("input", Role::User)],
        Endpoint::Generate => &[("system", Role::System), ("prompt", Role::User)],
        Endpoint::LegacyEmbeddings => &[("prompt", Role::User)],
    }
}

impl LlmRequest {
    pub fn parse(endpoint: Endpoint, body: impl Into<Bytes>) -> Result<Self, ParseError> {
        let body: Bytes = body.into();
        let slots = prompt_fields(endpoint);
        let mut prompts = Prompts::new(&body, slots);
        let mut prompt_unread = false;
        let (object, prompt) = match Object::read(&body, &mut prompts) {
            Ok(object) => (object, prompts.fields),
            // A body serde_json reads only raw: a prompt with a lone surrogate escape, a
            // number past f64 or nesting past 128 levels in it. Its other fields are read
            // as before this reader existed; such a prompt field has no texts, and is
            // marked unread (prompt rules refuse it: an upstream may still read it).
            Err(_) => {
                let object = Object::read(&body, &mut Raw)
                    .map_err(|e| ParseError::NotAnObject(e.to_string()))?;
                let mut prompt: [Field; 2] = Default::default();
                for (i, (name, role)) in slots.iter().enumerate() {
                    if let Some(m) = object.get(&body, name) {
                        match prompt::read(&body, m.value.clone(), *role) {
                            Ok(field) => prompt[i] = field,
                            Err(_) => prompt_unread = true,
                        }
                    }
                }
                (object, prompt)
            }
        };
        let mut req = Self {
            endpoint,
            model: None,
            stream: endpoint.streams_by_default(),
            original: body,
            object,
            prompt,
            splices: Splices::default(),
            added: Vec::new(),
            prompt_unread,
        };
        req.model = req.field::<Option<String>>("model")?.flatten();
        if let Some(stream) = req.field::<Option<bool>>("stream")?.flatten() {
            req.stream = stream;
        }
        Ok(req)
    }

    /// The JSON of a top-level field as it is now (the last, when the name repeats).
    fn value(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        if let Some((_, json)) = self.added.iter().find(|(n, _)| *n == name) {
            return Some(Cow::Borrowed(json.as_bytes()));
        }
        let range = self.object.get(&self.original, name)?.value.clone();
        if let Some(json) = self.splices.exact(&range) {
            return Some(Cow::Borrowed(json.as_bytes()));
        }
        if self.splices.touch(&range) {
            let mut out = Vec::with_capacity(range.len());
            self.splices.write(&self.original, range, &mut out);
            return Some(Cow::Owned(out));
        }
        Some(Cow::Borrowed(&self.original[range]))
    }

    /// A top-level field, typed; `None` when absent.
    fn field<T: for<'de> Deserialize<'de>>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, ParseError> {
        self.value(name)
            .map(|raw| {
                serde_json::from_slice(&raw).map_err(|e| ParseError::FieldType {
                    field: name,
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    /// The raw JSON of a top-level field as it is now.
    pub fn raw_field(&self, name: &str) -> Option<Cow<'_, str>> {
        match self.value(name)? {
            Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
            Cow::Owned(v) => String::from_utf8(v).ok().map(Cow::Owned),
        }
    }

    /// Sets a top-level field to `json`: spliced over its value, or added last.
    fn set(&mut self, name: &'static str, json: String) {
        if let Some((_, old)) = self.added.iter_mut().find(|(n, _)| *n == name) {
            *old = json;
            return;
        }
        match self.object.get(&self.original, name) {
            Some(m) => self.splices.replace(m.value.clone(), json),
            None => self.added.push((name, json)),
        }
    }

    /// Replaces the model.
    pub fn set_model(&mut self, model: &str) {
        if let Ok(json) = serde_json::to_string(model) {
            self.set("model", json);
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
        let options = self.value("stream_options");
        let asked = options.as_deref().is_some_and(|o| {
            // Duplicates are not an answer: the whole option is written anew below.
            !object::repeated(o, "include_usage")
                && object::member(o, "include_usage")
                    .and_then(|v| serde_json::from_slice::<Option<bool>>(v).ok())
                    .flatten()
                    .unwrap_or(false)
        });
        if asked {
            return false;
        }
        // Keep whatever other stream options the client set.
        let json = match options {
            Some(o) => object::with_member(&o, "include_usage", "true".to_owned()),
            None => r#"{"include_usage":true}"#.to_owned(),
        };
        self.set("stream_options", json);
        true
    }

    /// The body to send upstream: the original bytes when nothing changed, else those
    /// bytes with the changes spliced in (written anew when a name repeats).
    pub fn body(&self) -> Bytes {
        if self.splices.is_empty() && self.added.is_empty() {
            return self.original.clone();
        }
        Bytes::from(
            self.object
                .write(&self.original, &self.splices, &self.added),
        )
    }

    /// A prompt text as it is now: its string's characters, or what replaced them.
    fn text<'a>(original: &'a [u8], t: &'a prompt::Text) -> Option<&'a str> {
        match &t.owned {
            Some(s) => Some(s),
            // A prompt's text runs to kilobytes: checked in SIMD steps.
            None => simdutf8::basic::from_utf8(&original[t.span.start + 1..t.span.end - 1]).ok(),
        }
    }

    /// Whether a prompt field could not be read into texts: JSON that serde_json reads
    /// only raw (a lone surrogate escape, a number past f64, nesting past 128 levels).
    /// Rules cannot judge such a prompt; a server may still read it (Go's JSON decoder
    /// turns a lone surrogate into U+FFFD).
    pub fn prompt_unread(&self) -> bool {
        self.prompt_unread
    }

    /// Calls `f` on every text of the prompt with the role that wrote it. `f` keeps the
    /// text, replaces it, or stops the walk. A replaced text's JSON string is spliced over
    /// the old one; every other byte is kept.
    pub fn visit_prompt<F>(&mut self, mut f: F)
    where
        F: FnMut(Role, &str) -> Visit,
    {
        let Self {
            original,
            prompt,
            splices,
            ..
        } = self;
        for t in prompt.iter_mut().flat_map(|p| p.texts.iter_mut()) {
            let Some(text) = Self::text(original, t) else {
                continue;
            };
            match f(t.role(), text) {
                Visit::Keep => {}
                Visit::Replace(new) => {
                    if let Ok(json) = serde_json::to_string(&new) {
                        splices.replace(t.span.clone(), json);
                        t.owned = Some(new);
                    }
                }
                Visit::Stop => return,
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
            // serde_json refuses as a value (a lone surrogate escape) must not hide it.
            Endpoint::Chat | Endpoint::Generate => positive(self.value("options").and_then(|o| {
                object::member(&o, "num_predict").and_then(|v| serde_json::from_slice(v).ok())
            })),
            Endpoint::Embeddings | Endpoint::Embed | Endpoint::LegacyEmbeddings => None,
        }
    }

    /// Sets the generation limit, in the field this dialect and client use.
    pub fn set_max_tokens(&mut self, n: u64) {
        let field = match self.endpoint {
            Endpoint::ChatCompletions => {
                // Newer models accept only max_completion_tokens; keep what the client used.
                if self.value("max_completion_tokens").is_some()
                    || self.value("max_tokens").is_none()
                {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                }
            }
            Endpoint::Completions => "max_tokens",
            Endpoint::Responses => "max_output_tokens",
            Endpoint::Chat | Endpoint::Generate => {
                let json = match self.value("options") {
                    Some(o) => object::with_member(&o, "num_predict", n.to_string()),
                    None => format!(r#"{{"num_predict":{n}}}"#),
                };
                self.set("options", json);
                return;
            }
            Endpoint::Embeddings | Endpoint::Embed | Endpoint::LegacyEmbeddings => return,
        };
        self.set(field, n.to_string());
    }

    /// The prompt's texts as they are now, in order.
    fn texts(&self) -> impl Iterator<Item = (&prompt::Text, &str)> {
        self.prompt
            .iter()
            .flat_map(|p| &p.texts)
            .filter_map(|t| Some((t, Self::text(&self.original, t)?)))
    }

    /// The prompt's text, for token estimates: every text the model will read.
    pub fn prompt_text(&self) -> String {
        let len = self.texts().map(|(_, s)| s.len() + 1).sum();
        let mut out = String::with_capacity(len);
        for (_, s) in self.texts() {
            push_line(&mut out, s);
        }
        out
    }
}

/// Appends a text, on a line of its own after the first.
fn push_line(out: &mut String, s: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(s);
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
        let mut shape = PromptShape::default();
        // Which prompt field is a list of messages, which are system text.
        let (list, system): (Option<usize>, Option<usize>) = match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Chat => (Some(0), None),
            Endpoint::Responses => (Some(1), Some(0)),
            Endpoint::Generate => (None, Some(0)),
            _ => (None, None),
        };
        if let Some(field) = system.map(|i| &self.prompt[i]) {
            for t in &field.texts {
                if let Some(s) = Self::text(&self.original, t) {
                    push_line(&mut shape.system, s);
                }
            }
        }
        if let Some(field) = list.map(|i| &self.prompt[i]) {
            if let Some((items, system)) = field.list {
                shape.messages = items;
                shape.system_messages = system;
            }
            for t in field.texts.iter().filter(|t| t.system_message) {
                if let Some(s) = Self::text(&self.original, t) {
                    push_line(&mut shape.system, s);
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
