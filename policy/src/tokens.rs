//! Token counting with tiktoken-rs, for estimates when a provider reports no usage and
//! for prompt estimates before a request is sent. Each encoding is built once, on first
//! use, and shared by every caller.

use std::sync::{Arc, OnceLock};

use tiktoken_rs::CoreBPE;

/// The BPE encodings the counter knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// GPT-4, GPT-3.5 and, as the closest public stand-in, open models.
    Cl100kBase,
    /// GPT-4o, GPT-4.1, the o-series and GPT-5.
    O200kBase,
}

impl Encoding {
    /// The encoding a model name most likely uses.
    pub fn for_model(model: &str) -> Self {
        let model = model.rsplit('/').next().unwrap_or(model);
        const O200K_PREFIXES: [&str; 7] =
            ["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4"];
        if O200K_PREFIXES.iter().any(|p| model.starts_with(p)) || model.starts_with("chatgpt-4o") {
            Encoding::O200kBase
        } else {
            Encoding::Cl100kBase
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::O200kBase => "o200k_base",
        }
    }
}

/// The embedded BPE data of an encoding could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer {encoding} could not be built: {message}")]
pub struct TokenizerError {
    pub encoding: &'static str,
    pub message: String,
}

/// Counts tokens. Cheap to clone; clones share the built encodings.
#[derive(Clone, Default)]
pub struct TokenCounter {
    inner: Arc<Encoders>,
}

#[derive(Default)]
struct Encoders {
    cl100k: OnceLock<Result<CoreBPE, String>>,
    o200k: OnceLock<Result<CoreBPE, String>>,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter").finish_non_exhaustive()
    }
}

impl TokenCounter {
    pub fn new() -> Self {
        Self::default()
    }

    fn encoder(&self, encoding: Encoding) -> Result<&CoreBPE, TokenizerError> {
        let (cell, build): (&OnceLock<builders::R>, fn() -> builders::R) = match encoding {
            Encoding::Cl100kBase => (&self.inner.cl100k, builders::cl100k),
            Encoding::O200kBase => (&self.inner.o200k, builders::o200k),
        };
        cell.get_or_init(build)
            .as_ref()
            .map_err(|message| TokenizerError {
                encoding: encoding.name(),
                message: message.clone(),
            })
    }

    /// Builds an encoding now, so the first request does not pay for it.
    pub fn warm(&self, encoding: Encoding) -> Result<(), TokenizerError> {
        self.encoder(encoding).map(|_| ())
    }

    /// Tokens in `text` under `encoding`. Special-token text counts as ordinary text,
    /// since it came from a user, not from a template.
    pub fn count(&self, encoding: Encoding, text: &str) -> Result<u64, TokenizerError> {
        if text.is_empty() {
            return Ok(0);
        }
        Ok(self.encoder(encoding)?.encode_ordinary(text).len() as u64)
    }

    /// Tokens in `text` for `model`.
    pub fn count_for_model(&self, model: &str, text: &str) -> Result<u64, TokenizerError> {
        self.count(Encoding::for_model(model), text)
    }

    /// `text` cut into its tokens' strings, in order; they concatenate back to `text`
    /// wherever a token boundary falls on a character boundary.
    pub fn pieces(&self, encoding: Encoding, text: &str) -> Result<Vec<String>, TokenizerError> {
        let bpe = self.encoder(encoding)?;
        let tokens = bpe.encode_ordinary(text);
        let mut out = Vec::with_capacity(tokens.len());
        let mut pending: Vec<u32> = Vec::new();
        for token in tokens {
            pending.push(token);
            // A multi-byte character can span tokens: hold them until they decode.
            if let Ok(piece) = bpe.decode(&pending) {
                out.push(piece);
                pending.clear();
            }
        }
        if !pending.is_empty() {
            out.push(bpe.decode(&pending).map_err(|e| TokenizerError {
                encoding: encoding.name(),
                message: e.to_string(),
            })?);
        }
        Ok(out)
    }
}

/// Builders kept apart so the error type stays a plain string.
mod builders {
    use tiktoken_rs::CoreBPE;
    pub type R = Result<CoreBPE, String>;
    pub fn cl100k() -> R {
        tiktoken_rs::cl100k_base().map_err(|e| e.to_string())
    }
    pub fn o200k() -> R {
        tiktoken_rs::o200k_base().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_encoding_by_model() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("openai/gpt-5"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("o3-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("llama3.2:1b"), Encoding::Cl100kBase);
    }

    #[test]
    fn counts_known_strings() {
        let c = TokenCounter::new();
        // Reference counts from the published cl100k_base / o200k_base vocabularies.
        assert_eq!(c.count(Encoding::Cl100kBase, "hello world").unwrap(), 2);
        assert_eq!(c.count(Encoding::O200kBase, "hello world").unwrap(), 2);
        assert_eq!(c.count(Encoding::Cl100kBase, "").unwrap(), 0);
        assert_eq!(
            c.count(Encoding::Cl100kBase, "<|endoftext|>").unwrap(),
            c.pieces(Encoding::Cl100kBase, "<|endoftext|>")
                .unwrap()
                .len() as u64
        );
    }

    #[test]
    fn pieces_concatenate_back() {
        let c = TokenCounter::new();
        let text = "Grüße, 世界! tokens🙂 and more";
        let pieces = c.pieces(Encoding::Cl100kBase, text).unwrap();
        assert_eq!(pieces.concat(), text);
        assert!(pieces.len() as u64 <= c.count(Encoding::Cl100kBase, text).unwrap());
    }
}
