//! How the demo server counts tokens: tiktoken's cl100k_base (the default: usage a
//! tiktoken estimate matches exactly), or a tokenizer of its own, the llama.cpp-like mode
//! (`ai-demo serve --own-tokenizer`) in which a tiktoken estimate is measurably wrong, so
//! a test can tell the gateway's exact counts from its estimates. Also the tokenize
//! endpoints, in the shapes llama.cpp's server and llama-cpp-python's serve.

use http::StatusCode;
use serde_json::{json, Value};

use crate::body::{self, DemoResponse};
use crate::server::DemoRequest;

/// Tokens a chat prompt costs on top of its text under [`Tokenizer::Own`]: a fixed chat
/// template (role markers, turn ends, the generation prompt), as real servers count the
/// prompt they render, not the messages' text.
pub const CHAT_TEMPLATE_TOKENS: u64 = 9;

/// Tokens a plain completion prompt costs on top of its text under [`Tokenizer::Own`]:
/// the beginning-of-sequence token.
pub const BOS_TOKENS: u64 = 1;

/// The id of the beginning-of-sequence token (`add_special`).
pub const BOS_ID: u64 = 1;

/// The demo server's tokenizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tokenizer {
    /// cl100k_base: usage counts equal the gateway's tiktoken estimates; streams carry
    /// usage when asked (`stream_options.include_usage`), as OpenAI's do.
    #[default]
    Tiktoken,
    /// The demo's own scheme ([`own_pieces`]), about twice cl100k's counts on English,
    /// and the llama.cpp-like mode: streams never carry usage (even when asked), each
    /// content event carries exactly one token, prompts count a fixed template
    /// ([`CHAT_TEMPLATE_TOKENS`], [`BOS_TOKENS`]); whole answers still report usage.
    Own,
}

impl Tokenizer {
    /// Tokens in `text`.
    pub fn count(self, text: &str) -> u64 {
        match self {
            Tokenizer::Tiktoken => crate::text::count_tokens(text),
            Tokenizer::Own => own_pieces(text).len() as u64,
        }
    }

    /// Tokens of a prompt as the usage reports them: `chat` prompts are rendered into a
    /// chat template first (under [`Tokenizer::Own`]).
    pub fn prompt_tokens(self, prompt: &str, chat: bool) -> u64 {
        match self {
            Tokenizer::Tiktoken => self.count(prompt),
            Tokenizer::Own => {
                let overhead = if chat {
                    CHAT_TEMPLATE_TOKENS
                } else {
                    BOS_TOKENS
                };
                self.count(prompt) + overhead
            }
        }
    }

    /// Whether streams may carry usage.
    pub fn streams_report_usage(self) -> bool {
        self == Tokenizer::Tiktoken
    }
}

/// The demo's own tokenizer: `text` cut into pieces whose concatenation is `text`.
///
/// - a run of ASCII letters and digits is cut into pieces of at most 3 characters;
/// - one space right before such a run belongs to the run's first piece (as
///   SentencePiece's `▁` does): " cluster" is " clu", "ste", "r";
/// - every other character (punctuation, newlines, a space before anything else,
///   anything outside ASCII) is a piece of its own.
///
/// English words are ~5 characters, one cl100k token each but two pieces here: a tiktoken
/// count is about half the truth, the kind of error the gateway makes on open models.
pub fn own_pieces(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let alnum = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_alphanumeric);
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        if alnum(i) || (bytes[i] == b' ' && alnum(i + 1)) {
            if bytes[i] == b' ' {
                i += 1;
            }
            let mut taken = 0;
            while taken < 3 && alnum(i) {
                i += 1;
                taken += 1;
            }
        } else {
            // One character, however many bytes (pieces stay valid UTF-8).
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
        pieces.push(&text[start..i]);
    }
    pieces
}

/// A piece's id: a hash of its text past the special ids (deterministic, not invertible:
/// the demo has no detokenize endpoint).
fn piece_id(piece: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in piece.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    256 + hash % 262_144
}

/// The ids of `text` under `tokenizer` (cl100k ranks under [`Tokenizer::Tiktoken`]).
pub fn token_ids(tokenizer: Tokenizer, text: &str) -> Vec<u64> {
    match tokenizer {
        Tokenizer::Tiktoken => crate::text::token_ids(text),
        Tokenizer::Own => own_pieces(text).into_iter().map(piece_id).collect(),
    }
}

/// The tokenize endpoints (POST), with the server's tokenizer:
///
/// - `/tokenize` as llama.cpp's server: `{"content": "...", "add_special": false,
///   "with_pieces": false}` -> `{"tokens": [ids]}`, or with `with_pieces`
///   `{"tokens": [{"id": id, "piece": "..."}]}`; `add_special` puts the
///   beginning-of-sequence id first;
/// - `/extras/tokenize` as llama-cpp-python's: `{"input": "..."}` -> `{"tokens": [ids]}`
///   and `/extras/tokenize/count` -> `{"count": n}`.
///
/// Text only: no chat template is applied (neither real server applies one here).
pub fn tokenize(req: &DemoRequest) -> DemoResponse {
    let tokenizer = req.server.config.tokenizer;
    let field = if req.path == "/tokenize" {
        "content"
    } else {
        "input"
    };
    let Some(text) = req.body.get(field).and_then(Value::as_str) else {
        return body::json(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"code": 400, "message": format!("\"{field}\" must be a string"),
                              "type": "invalid_request_error"}}),
        );
    };
    let flag = |name: &str| req.body.get(name).and_then(Value::as_bool).unwrap_or(false);
    match req.path.as_str() {
        "/extras/tokenize/count" => body::json(
            StatusCode::OK,
            &json!({"count": token_ids(tokenizer, text).len()}),
        ),
        "/tokenize" if flag("with_pieces") => {
            let mut tokens: Vec<Value> = Vec::new();
            if flag("add_special") {
                tokens.push(json!({"id": BOS_ID, "piece": ""}));
            }
            match tokenizer {
                Tokenizer::Own => tokens.extend(
                    own_pieces(text)
                        .into_iter()
                        .map(|p| json!({"id": piece_id(p), "piece": p})),
                ),
                Tokenizer::Tiktoken => tokens.extend(
                    crate::text::token_ids(text)
                        .into_iter()
                        .map(|id| json!({"id": id, "piece": crate::text::decode(id)})),
                ),
            }
            body::json(StatusCode::OK, &json!({ "tokens": tokens }))
        }
        _ => {
            let mut ids = Vec::new();
            if req.path == "/tokenize" && flag("add_special") {
                ids.push(BOS_ID);
            }
            ids.extend(token_ids(tokenizer, text));
            body::json(StatusCode::OK, &json!({ "tokens": ids }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_lossless_and_follow_the_rules() {
        assert_eq!(own_pieces(" cluster"), [" clu", "ste", "r"]);
        assert_eq!(own_pieces("Hi, pod42!"), ["Hi", ",", " pod", "42", "!"]);
        assert_eq!(own_pieces("a  b\n"), ["a", " ", " b", "\n"]);
        assert_eq!(own_pieces("héllo"), ["h", "é", "llo"]);
        assert!(own_pieces("").is_empty());
        for text in ["Demo reply from m: token budget.", "x\u{1F600}y  z", " "] {
            assert_eq!(own_pieces(text).concat(), text);
        }
    }

    #[test]
    fn own_counts_are_far_from_tiktoken() {
        let text = crate::text::reply("m", "hello", 200).text();
        let own = Tokenizer::Own.count(&text) as f64;
        let tiktoken = Tokenizer::Tiktoken.count(&text) as f64;
        // A tiktoken estimate is off by far more than any threshold a test would hold.
        assert!(own > 1.5 * tiktoken, "own {own} vs tiktoken {tiktoken}");
    }

    #[test]
    fn prompts_count_a_template() {
        let own = Tokenizer::Own;
        assert_eq!(own.prompt_tokens("hi pod", true), 2 + CHAT_TEMPLATE_TOKENS);
        assert_eq!(own.prompt_tokens("hi pod", false), 2 + BOS_TOKENS);
        let tt = Tokenizer::Tiktoken;
        assert_eq!(tt.prompt_tokens("hi there", true), tt.count("hi there"));
        assert!(!own.streams_report_usage());
        assert!(tt.streams_report_usage());
    }

    use std::sync::Arc;

    use http_body_util::BodyExt;

    use crate::server::{DemoConfig, DemoServer, Fault};

    /// The server's answer to POST `path` with `body` (streams read to their end).
    async fn call(tokenizer: Tokenizer, path: &str, body: Value) -> (StatusCode, String) {
        let server: Arc<DemoServer> = DemoServer::new(DemoConfig {
            tokenizer,
            ..Default::default()
        });
        let req = DemoRequest {
            path: path.to_owned(),
            body,
            fault: Fault::None,
            server,
        };
        let resp = match path {
            "/v1/chat/completions" | "/v1/completions" => crate::openai::completions(req),
            "/v1/responses" => crate::openai::responses(req),
            "/api/chat" | "/api/generate" => crate::ollama::generate(req),
            _ => tokenize(&req),
        };
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// The JSON of each `data:` line of an SSE stream, `[DONE]` left out.
    fn sse_data(text: &str) -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    fn chat(stream: bool, include_usage: bool) -> Value {
        json!({"model": "gemma3", "max_tokens": 40, "stream": stream,
               "stream_options": {"include_usage": include_usage},
               "messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Say something about clusters."}]})
    }

    #[tokio::test]
    async fn own_mode_streams_carry_no_usage_even_when_asked_and_one_token_per_event() {
        let (_, whole) = call(Tokenizer::Own, "/v1/chat/completions", chat(false, false)).await;
        let whole: Value = serde_json::from_str(&whole).unwrap();
        let usage = &whole["usage"];
        let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(
            usage["completion_tokens"],
            json!(Tokenizer::Own.count(text))
        );
        let prompt = "Be brief.\nSay something about clusters.";
        assert_eq!(
            usage["prompt_tokens"],
            json!(Tokenizer::Own.count(prompt) + CHAT_TEMPLATE_TOKENS)
        );
        // The same request streamed, usage asked for: none comes, and the content events
        // are exactly the completion's tokens, the same text.
        let (_, stream) = call(Tokenizer::Own, "/v1/chat/completions", chat(true, true)).await;
        let events = sse_data(&stream);
        assert!(events.iter().all(|e| e.get("usage").is_none()), "{stream}");
        let contents: Vec<&str> = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(json!(contents.len()), usage["completion_tokens"]);
        assert_eq!(contents.concat(), text);
        // And the default mode still honours include_usage, with tiktoken's counts.
        let (_, stream) = call(
            Tokenizer::Tiktoken,
            "/v1/chat/completions",
            chat(true, true),
        )
        .await;
        let last = sse_data(&stream).pop().unwrap();
        assert_eq!(
            last["usage"]["prompt_tokens"],
            json!(crate::text::count_tokens(prompt))
        );
    }

    #[tokio::test]
    async fn own_mode_ollama_and_responses_streams_carry_no_counts() {
        let body = json!({"model": "gemma3", "messages": [{"role": "user", "content": "hi"}]});
        let (_, ndjson) = call(Tokenizer::Own, "/api/chat", body.clone()).await;
        let lines: Vec<Value> = ndjson
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let last = lines.last().unwrap();
        assert_eq!(last["done"], json!(true));
        assert!(last.get("eval_count").is_none() && last.get("prompt_eval_count").is_none());
        let mut whole = body.clone();
        whole["stream"] = json!(false);
        let (_, whole) = call(Tokenizer::Own, "/api/chat", whole).await;
        let whole: Value = serde_json::from_str(&whole).unwrap();
        assert_eq!(
            whole["eval_count"],
            json!(lines.len() - 1),
            "one token a line"
        );
        assert_eq!(whole["prompt_eval_count"], json!(1 + CHAT_TEMPLATE_TOKENS));

        let body =
            json!({"model": "gemma3", "input": "hi", "stream": true, "max_output_tokens": 1000});
        let (_, sse) = call(Tokenizer::Own, "/v1/responses", body).await;
        let done = sse_data(&sse).pop().unwrap();
        assert_eq!(done["type"], json!("response.completed"));
        assert_eq!(done["response"]["usage"], Value::Null);
    }

    #[tokio::test]
    async fn tokenize_endpoints_answer_in_llama_cpp_shapes() {
        let text = "Say something about clusters.";
        let ids = token_ids(Tokenizer::Own, text);
        let (status, out) = call(Tokenizer::Own, "/tokenize", json!({"content": text})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({"tokens": ids})
        );
        let (_, out) = call(
            Tokenizer::Own,
            "/tokenize",
            json!({"content": "a cluster", "add_special": true, "with_pieces": true}),
        )
        .await;
        let out: Value = serde_json::from_str(&out).unwrap();
        let pieces: Vec<&str> = out["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["piece"].as_str().unwrap())
            .collect();
        assert_eq!(pieces, ["", "a", " clu", "ste", "r"]);
        assert_eq!(out["tokens"][0]["id"], json!(BOS_ID));
        let (_, out) = call(Tokenizer::Own, "/extras/tokenize", json!({"input": text})).await;
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({"tokens": ids})
        );
        let (_, out) = call(
            Tokenizer::Own,
            "/extras/tokenize/count",
            json!({"input": text}),
        )
        .await;
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({"count": ids.len()})
        );
        let (status, _) = call(Tokenizer::Own, "/tokenize", json!({"input": text})).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "llama.cpp's field is content"
        );
        // The default mode tokenizes with cl100k_base.
        let (_, out) = call(Tokenizer::Tiktoken, "/tokenize", json!({"content": text})).await;
        let n = serde_json::from_str::<Value>(&out).unwrap()["tokens"]
            .as_array()
            .unwrap()
            .len() as u64;
        assert_eq!(n, crate::text::count_tokens(text));
    }

    #[test]
    fn ids_are_deterministic_and_past_the_specials() {
        let a = token_ids(Tokenizer::Own, "the cluster");
        assert_eq!(a, token_ids(Tokenizer::Own, "the cluster"));
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|id| *id >= 256));
        assert_eq!(
            token_ids(Tokenizer::Tiktoken, "the cluster").len() as u64,
            crate::text::count_tokens("the cluster")
        );
    }
}
