//! Deterministic text for the demo server: the reply a model gives to a prompt, cut into
//! tokens with tiktoken (cl100k_base), the prompt text of each request shape, and
//! embedding vectors. Same model and prompt, same answer, byte for byte.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::tokenizer::{own_pieces, Tokenizer};

const WORDS: [&str; 32] = [
    "cluster",
    "gateway",
    "token",
    "policy",
    "stream",
    "model",
    "budget",
    "kernel",
    "socket",
    "prompt",
    "answer",
    "latency",
    "namespace",
    "pod",
    "request",
    "usage",
    "filter",
    "rewrite",
    "secure",
    "observe",
    "measure",
    "route",
    "shared",
    "bound",
    "transparent",
    "container",
    "workload",
    "network",
    "metric",
    "ledger",
    "quiet",
    "fast",
];

/// The default reply length, in tokens, when the request sets no maximum.
pub const DEFAULT_MAX_TOKENS: u64 = 24;

fn bpe() -> &'static CoreBPE {
    static BPE: OnceLock<CoreBPE> = OnceLock::new();
    BPE.get_or_init(|| match tiktoken_rs::cl100k_base() {
        Ok(bpe) => bpe,
        // The vocabulary is compiled into tiktoken-rs; failing here is a broken build.
        Err(e) => panic!("cl100k_base vocabulary failed to load: {e}"),
    })
}

/// Tokens in `text`, as the demo server counts them (cl100k_base, ordinary text).
pub fn count_tokens(text: &str) -> u64 {
    bpe().encode_ordinary(text).len() as u64
}

/// The cl100k_base ids of `text` (ordinary text).
pub fn token_ids(text: &str) -> Vec<u64> {
    bpe()
        .encode_ordinary(text)
        .into_iter()
        .map(u64::from)
        .collect()
}

/// The text of one cl100k_base id (lossy where a token is part of a character).
pub fn decode(id: u64) -> String {
    u32::try_from(id)
        .ok()
        .and_then(|id| bpe().decode_bytes(&[id]).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// A generated reply: its tokens' text, and whether the maximum cut it short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub tokens: Vec<String>,
    pub truncated: bool,
}

impl Reply {
    pub fn text(&self) -> String {
        self.tokens.concat()
    }

    pub fn finish_reason(&self) -> &'static str {
        if self.truncated {
            "length"
        } else {
            "stop"
        }
    }
}

/// The reply `model` gives to `prompt`, at most `max_tokens` tokens long (cl100k_base).
pub fn reply(model: &str, prompt: &str, max_tokens: u64) -> Reply {
    reply_with(Tokenizer::Tiktoken, model, prompt, max_tokens)
}

/// The reply `model` gives to `prompt`, cut into `tokenizer`'s tokens, at most
/// `max_tokens` of them.
pub fn reply_with(tokenizer: Tokenizer, model: &str, prompt: &str, max_tokens: u64) -> Reply {
    let mut seed = fnv1a(&[model, prompt]);
    let mut text = format!("Demo reply from {model}:");
    let words = 12 + (seed % 8) as usize;
    for _ in 0..words {
        seed = seed.rotate_left(5) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        text.push(' ');
        text.push_str(WORDS[(seed % WORDS.len() as u64) as usize]);
    }
    text.push('.');
    let max = usize::try_from(max_tokens).unwrap_or(usize::MAX);
    if tokenizer == Tokenizer::Own {
        let pieces = own_pieces(&text);
        return Reply {
            truncated: max < pieces.len(),
            tokens: pieces.into_iter().take(max).map(str::to_owned).collect(),
        };
    }
    let bpe = bpe();
    let ids = bpe.encode_ordinary(&text);
    let keep = ids.len().min(max);
    // The text is ASCII, so every token decodes on its own.
    let tokens = ids[..keep]
        .iter()
        .map(|id| bpe.decode(&[*id]).unwrap_or_default())
        .collect();
    Reply {
        tokens,
        truncated: keep < ids.len(),
    }
}

/// A deterministic unit-ish embedding of `text` for `model`.
pub fn embedding(model: &str, text: &str) -> Vec<f32> {
    let mut seed = fnv1a(&[model, text]);
    (0..8)
        .map(|_| {
            seed = seed.rotate_left(7) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            // 1/1024 steps keep the values exact in f32 and in JSON.
            ((seed % 2049) as f32 - 1024.0) / 1024.0
        })
        .collect()
}

/// The text of a message `content`: a string, or an array of parts whose text parts count.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| match part {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("text").and_then(Value::as_str),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The text of a list of chat messages, one line per message.
pub fn messages_text(messages: Option<&Value>) -> String {
    messages
        .and_then(Value::as_array)
        .map(|msgs| {
            msgs.iter()
                .map(|m| m.get("content").map(content_text).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// The texts of an embeddings `input`: a string or an array of strings.
pub fn inputs(input: Option<&Value>) -> Vec<String> {
    match input {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| i.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_is_deterministic_and_bounded() {
        let a = reply("m", "hi", 100);
        assert_eq!(a, reply("m", "hi", 100));
        assert_ne!(a.text(), reply("n", "hi", 100).text());
        assert!(!a.truncated);
        assert_eq!(count_tokens(&a.text()), a.tokens.len() as u64);
        let cut = reply("m", "hi", 3);
        assert_eq!(cut.tokens.len(), 3);
        assert!(cut.truncated);
        assert_eq!(cut.finish_reason(), "length");
    }

    #[test]
    fn own_replies_are_the_same_text_in_own_tokens() {
        let cl = reply("m", "hi", 1000);
        let own = reply_with(Tokenizer::Own, "m", "hi", 1000);
        assert_eq!(own.text(), cl.text());
        assert_eq!(own.tokens.len() as u64, Tokenizer::Own.count(&own.text()));
        assert!(own.tokens.len() > cl.tokens.len());
        let cut = reply_with(Tokenizer::Own, "m", "hi", 7);
        assert_eq!(cut.tokens.len(), 7);
        assert!(cut.truncated);
        assert_eq!(cut.tokens[..], own.tokens[..7]);
    }

    #[test]
    fn content_parts_count_only_text() {
        let v: Value = serde_json::json!([{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]);
        assert_eq!(content_text(&v), "a\nb");
    }
}
