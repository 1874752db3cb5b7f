//! The LLM APIs the gateway understands: which requests are LLM calls (decided once from
//! method and path), how their bodies are read, and what their responses report.

pub mod event;
pub mod ollama;
pub mod openai;
pub mod request;
pub mod shape;
pub mod span;

use http::Method;

pub use event::{observe, StreamEvent};
pub use request::{LlmRequest, ParseError, PromptShape};
pub use shape::ShapeReader;

/// The API family of a recognized request; errors are answered in its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    OpenAi,
    Ollama,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Ollama => "ollama",
        }
    }
}

/// A recognized endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// OpenAI `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI `/v1/completions`.
    Completions,
    /// OpenAI `/v1/embeddings`.
    Embeddings,
    /// OpenAI `/v1/responses`.
    Responses,
    /// Ollama `/api/chat`.
    Chat,
    /// Ollama `/api/generate`.
    Generate,
    /// Ollama `/api/embed`.
    Embed,
    /// Ollama `/api/embeddings` (the older single-prompt form).
    LegacyEmbeddings,
}

impl Endpoint {
    /// Every recognized endpoint.
    pub const ALL: [Endpoint; 8] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Chat,
        Endpoint::Generate,
        Endpoint::Embed,
        Endpoint::LegacyEmbeddings,
    ];

    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::Responses => Dialect::OpenAi,
            Endpoint::Chat | Endpoint::Generate | Endpoint::Embed | Endpoint::LegacyEmbeddings => {
                Dialect::Ollama
            }
        }
    }

    /// The name used in logs, metrics and the usage store.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Chat => "chat",
            Endpoint::Generate => "generate",
            Endpoint::Embed => "embed",
            Endpoint::LegacyEmbeddings => "embeddings_legacy",
        }
    }

    /// Whether a request streams when it does not say (Ollama streams by default).
    pub fn streams_by_default(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Generate)
    }

    pub fn is_embedding(self) -> bool {
        matches!(
            self,
            Endpoint::Embeddings | Endpoint::Embed | Endpoint::LegacyEmbeddings
        )
    }

    /// Recognizes an LLM call from its method and path; anything else is passed through.
    pub fn classify(method: &Method, path: &str) -> Option<Endpoint> {
        if method != Method::POST {
            return None;
        }
        Some(match path {
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            "/api/chat" => Endpoint::Chat,
            "/api/generate" => Endpoint::Generate,
            "/api/embed" => Endpoint::Embed,
            "/api/embeddings" => Endpoint::LegacyEmbeddings,
            _ => return None,
        })
    }
}

/// Token counts a provider reported; `None` where it said nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportedUsage {
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub cached: Option<u64>,
    pub reasoning: Option<u64>,
}

impl ReportedUsage {
    /// Later reports win field by field (a final usage chunk overrides nothing it omits).
    pub fn merge(&mut self, other: ReportedUsage) {
        self.input = other.input.or(self.input);
        self.output = other.output.or(self.output);
        self.cached = other.cached.or(self.cached);
        self.reasoning = other.reasoning.or(self.reasoning);
    }
}

/// What one parsed response object (a whole body, an SSE event or an NDJSON line) says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Shared: a stream's events mostly name the same model, read once.
    pub model: Option<std::sync::Arc<str>>,
    pub usage: ReportedUsage,
    /// Generated text carried by this object.
    pub text: String,
    pub finish_reason: Option<String>,
    /// The object is an error report.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_only_post_on_known_paths() {
        assert_eq!(
            Endpoint::classify(&Method::POST, "/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::classify(&Method::POST, "/api/embeddings"),
            Some(Endpoint::LegacyEmbeddings)
        );
        assert_eq!(
            Endpoint::classify(&Method::GET, "/v1/chat/completions"),
            None
        );
        assert_eq!(
            Endpoint::classify(&Method::POST, "/v1/chat/completions/"),
            None
        );
        assert_eq!(Endpoint::classify(&Method::POST, "/api/tags"), None);
    }
}
