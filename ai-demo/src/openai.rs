//! The OpenAI API of the demo server: chat completions, completions, responses and
//! embeddings, streaming as SSE with `stream_options.include_usage` honoured.
//!
//! Usage is exact under the server's tokenizer (cl100k_base unless `--own-tokenizer`,
//! whose streams carry no usage even when asked: [`Tokenizer::Own`]). Models whose name
//! contains `cache` report half the prompt as cached; models whose name contains `reason`
//! report half the completion as reasoning, so the gateway's handling of those details
//! can be tested.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::StatusCode;
use serde_json::{json, Value};

use crate::body::{self, DemoResponse};
use crate::server::{DemoRequest, Emitter, Fault};
use crate::text::{self, Reply, DEFAULT_MAX_TOKENS};
use crate::tokenizer::Tokenizer;

pub fn error(status: StatusCode, message: &str) -> DemoResponse {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    body::json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
    )
}

pub fn models() -> DemoResponse {
    body::json(
        StatusCode::OK,
        &json!({"object": "list", "data": [{"id": "demo", "object": "model", "created": 0, "owned_by": "kube-gateway"}]}),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn max_tokens(body: &Value, keys: &[&str]) -> u64 {
    keys.iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
        .unwrap_or(DEFAULT_MAX_TOKENS)
}

struct Counts {
    prompt: u64,
    completion: u64,
    cached: u64,
    reasoning: u64,
}

impl Counts {
    fn new(tokenizer: Tokenizer, chat: bool, model: &str, prompt: &str, reply: &Reply) -> Self {
        let prompt = tokenizer.prompt_tokens(prompt, chat);
        let completion = reply.tokens.len() as u64;
        Self {
            prompt,
            completion,
            cached: if model.contains("cache") {
                prompt / 2
            } else {
                0
            },
            reasoning: if model.contains("reason") {
                completion / 2
            } else {
                0
            },
        }
    }

    fn chat(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        })
    }

    fn responses(&self) -> Value {
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.prompt + self.completion
        })
    }
}

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn no_model() -> DemoResponse {
    error(
        StatusCode::BAD_REQUEST,
        "you must provide a model parameter",
    )
}

/// `/v1/chat/completions` and `/v1/completions`.
pub fn completions(req: DemoRequest) -> DemoResponse {
    let Some(model) = req.model() else {
        return no_model();
    };
    if req.fault == Fault::Status500 {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "demo fault: internal error",
        );
    }
    let chat = req.path == "/v1/chat/completions";
    let prompt = if chat {
        text::messages_text(req.body.get("messages"))
    } else {
        text::inputs(req.body.get("prompt")).join("\n")
    };
    let max = max_tokens(&req.body, &["max_completion_tokens", "max_tokens"]);
    let tokenizer = req.server.config.tokenizer;
    let reply = text::reply_with(tokenizer, &model, &prompt, max);
    let counts = Counts::new(tokenizer, chat, &model, &prompt, &reply);
    let usage = if chat {
        counts.chat()
    } else {
        json!({"prompt_tokens": counts.prompt, "completion_tokens": counts.completion,
               "total_tokens": counts.prompt + counts.completion})
    };
    let (id, object) = if chat {
        (format!("chatcmpl-demo{}", now()), "chat.completion")
    } else {
        (format!("cmpl-demo{}", now()), "text_completion")
    };
    let created = now();
    let stream = req
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !stream {
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": reply.text(), "refusal": null},
                   "logprobs": null, "finish_reason": reply.finish_reason()})
        } else {
            json!({"text": reply.text(), "index": 0, "logprobs": null, "finish_reason": reply.finish_reason()})
        };
        return body::json(
            StatusCode::OK,
            &json!({"id": id, "object": object, "created": created, "model": model,
                    "choices": [choice], "usage": usage, "system_fingerprint": "fp_demo"}),
        );
    }
    // llama.cpp-like: no usage on a stream, whatever was asked.
    let include_usage = tokenizer.streams_report_usage()
        && req
            .body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let (resp, tx) = body::stream("text/event-stream; charset=utf-8");
    let mut emit = Emitter::new(tx, &req);
    tokio::spawn(async move {
        let chunk = |choice: Value| {
            let mut c = json!({"id": id, "object": chunk_object, "created": created, "model": model,
                               "system_fingerprint": "fp_demo", "choices": [choice]});
            if include_usage {
                c["usage"] = Value::Null;
            }
            sse(&c)
        };
        if chat && !emit
            .frame(chunk(
                json!({"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
                                    "logprobs": null, "finish_reason": null}),
            ))
            .await
        {
            return;
        }
        for token in &reply.tokens {
            let choice = if chat {
                json!({"index": 0, "delta": {"content": token}, "logprobs": null, "finish_reason": null})
            } else {
                json!({"text": token, "index": 0, "logprobs": null, "finish_reason": null})
            };
            if !emit.token(chunk(choice)).await {
                return;
            }
        }
        let last = if chat {
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reply.finish_reason()})
        } else {
            json!({"text": "", "index": 0, "logprobs": null, "finish_reason": reply.finish_reason()})
        };
        if !emit.frame(chunk(last)).await {
            return;
        }
        if include_usage {
            let u = json!({"id": id, "object": chunk_object, "created": created, "model": model,
                           "system_fingerprint": "fp_demo", "choices": [], "usage": usage});
            if !emit.frame(sse(&u)).await {
                return;
            }
        }
        emit.frame("data: [DONE]\n\n").await;
    });
    resp
}

/// Text of a Responses API `input`: a string, or items whose content holds text.
fn responses_input(body: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(i) = body.get("instructions").and_then(Value::as_str) {
        parts.push(i.to_owned());
    }
    match body.get("input") {
        Some(Value::String(s)) => parts.push(s.clone()),
        Some(Value::Array(items)) => {
            for item in items {
                if let Some(c) = item.get("content") {
                    parts.push(text::content_text(c));
                }
            }
        }
        _ => {}
    }
    parts.join("\n")
}

/// `/v1/responses`.
pub fn responses(req: DemoRequest) -> DemoResponse {
    let Some(model) = req.model() else {
        return no_model();
    };
    if req.fault == Fault::Status500 {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "demo fault: internal error",
        );
    }
    let prompt = responses_input(&req.body);
    let tokenizer = req.server.config.tokenizer;
    let reply = text::reply_with(
        tokenizer,
        &model,
        &prompt,
        max_tokens(&req.body, &["max_output_tokens"]),
    );
    let counts = Counts::new(tokenizer, true, &model, &prompt, &reply);
    let created = now();
    let id = format!("resp_demo{created}");
    let msg_id = format!("msg_demo{created}");
    let status = if reply.truncated {
        "incomplete"
    } else {
        "completed"
    };
    let message = |text: &str, status: &str| {
        json!({"type": "message", "id": msg_id, "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": created, "status": status,
               "model": model, "output": output, "usage": usage, "error": null,
               "incomplete_details": if reply.truncated { json!({"reason": "max_output_tokens"}) } else { Value::Null }})
    };
    let full = response(
        status,
        json!([message(&reply.text(), "completed")]),
        counts.responses(),
    );
    if !req
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return body::json(StatusCode::OK, &full);
    }
    // llama.cpp-like: the stream's last event carries no usage either.
    let full = if tokenizer.streams_report_usage() {
        full
    } else {
        let mut f = full;
        f["usage"] = Value::Null;
        f
    };
    let created_ev = response("in_progress", json!([]), Value::Null);
    let item_added = message("", "in_progress");
    let (resp, tx) = body::stream("text/event-stream; charset=utf-8");
    let mut emit = Emitter::new(tx, &req);
    let msg_id2 = msg_id.clone();
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut event = |kind: &str, mut data: Value| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(seq);
            seq += 1;
            format!("event: {kind}\ndata: {data}\n\n")
        };
        let head = [
            event("response.created", json!({"response": created_ev})),
            event(
                "response.output_item.added",
                json!({"output_index": 0, "item": item_added}),
            ),
            event(
                "response.content_part.added",
                json!({"item_id": msg_id2, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            ),
        ];
        for frame in head {
            if !emit.frame(frame).await {
                return;
            }
        }
        for token in &reply.tokens {
            let ev = event(
                "response.output_text.delta",
                json!({"item_id": msg_id2, "output_index": 0,
                "content_index": 0, "delta": token}),
            );
            if !emit.token(ev).await {
                return;
            }
        }
        let text = reply.text();
        let tail = [
            event(
                "response.output_text.done",
                json!({"item_id": msg_id2, "output_index": 0, "content_index": 0, "text": text}),
            ),
            event(
                "response.content_part.done",
                json!({"item_id": msg_id2, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": text, "annotations": []}}),
            ),
            event(
                "response.output_item.done",
                json!({"output_index": 0, "item": full["output"][0]}),
            ),
            event(
                if reply.truncated {
                    "response.incomplete"
                } else {
                    "response.completed"
                },
                json!({"response": full}),
            ),
        ];
        for frame in tail {
            if !emit.frame(frame).await {
                return;
            }
        }
    });
    resp
}

/// `/v1/embeddings`, with `encoding_format` float or base64 (the official client's default).
pub fn embeddings(req: DemoRequest) -> DemoResponse {
    let Some(model) = req.model() else {
        return no_model();
    };
    let inputs = text::inputs(req.body.get("input"));
    if inputs.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "input must be a string or an array of strings",
        );
    }
    let base64 = req.body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let v = text::embedding(&model, input);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokenizer = req.server.config.tokenizer;
    let tokens: u64 = inputs.iter().map(|i| tokenizer.count(i)).sum();
    body::json(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}
