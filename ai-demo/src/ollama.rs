//! The Ollama API of the demo server: `/api/chat`, `/api/generate` (streaming NDJSON by
//! default, as Ollama does), `/api/embed` and the older `/api/embeddings`.

use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde_json::{json, Value};

use crate::body::{self, DemoResponse};
use crate::server::{DemoRequest, Emitter, Fault};
use crate::text::{self, DEFAULT_MAX_TOKENS};

pub fn error(status: StatusCode, message: &str) -> DemoResponse {
    body::json(status, &json!({"error": message}))
}

pub fn tags() -> DemoResponse {
    body::json(StatusCode::OK, &json!({"models": []}))
}

pub fn version() -> DemoResponse {
    body::json(
        StatusCode::OK,
        &json!({"version": "0.0.0-kube-gateway-demo"}),
    )
}

/// An RFC 3339 UTC timestamp, as Ollama writes `created_at`.
fn created_at() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date crate in the demo.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// `/api/chat` and `/api/generate`.
pub fn generate(req: DemoRequest) -> DemoResponse {
    let Some(model) = req.model() else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    if req.fault == Fault::Status500 {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "demo fault: internal error",
        );
    }
    let chat = req.path == "/api/chat";
    let prompt = if chat {
        text::messages_text(req.body.get("messages"))
    } else {
        [req.body.get("system"), req.body.get("prompt")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let max = req
        .body
        .pointer("/options/num_predict")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let tokenizer = req.server.config.tokenizer;
    let reply = text::reply_with(tokenizer, &model, &prompt, max);
    let prompt_tokens = tokenizer.prompt_tokens(&prompt, chat);
    let piece = move |content: &str| {
        if chat {
            json!({"message": {"role": "assistant", "content": content}})
        } else {
            json!({"response": content})
        }
    };
    // `counts`: false for the last line of a stream in the llama.cpp-like mode.
    let done_fields = move |mut v: Value, reply: &text::Reply, counts: bool| {
        v["done_reason"] = json!(reply.finish_reason());
        v["done"] = json!(true);
        v["total_duration"] = json!(1_000_000u64);
        v["load_duration"] = json!(1_000u64);
        if counts {
            v["prompt_eval_count"] = json!(prompt_tokens);
        }
        v["prompt_eval_duration"] = json!(10_000u64);
        if counts {
            v["eval_count"] = json!(reply.tokens.len());
        }
        v["eval_duration"] = json!(100_000u64);
        v
    };
    let head = move |mut v: Value| {
        let mut out = json!({"model": model, "created_at": created_at()});
        if let (Some(o), Some(extra)) = (out.as_object_mut(), v.as_object_mut()) {
            o.append(extra);
        }
        out
    };
    // Ollama streams unless told not to.
    let stream = req
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if !stream {
        let v = done_fields(head(piece(&reply.text())), &reply, true);
        return body::json(StatusCode::OK, &v);
    }
    let (resp, tx) = body::stream("application/x-ndjson");
    let mut emit = Emitter::new(tx, &req);
    tokio::spawn(async move {
        for token in &reply.tokens {
            let mut v = head(piece(token));
            v["done"] = json!(false);
            if !emit.token(format!("{v}\n")).await {
                return;
            }
        }
        let last = done_fields(head(piece("")), &reply, tokenizer.streams_report_usage());
        emit.frame(format!("{last}\n")).await;
    });
    resp
}

/// `/api/embed` (batch, with counts) and `/api/embeddings` (older: one prompt, no counts).
pub fn embed(req: DemoRequest) -> DemoResponse {
    let Some(model) = req.model() else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    if req.path == "/api/embeddings" {
        let prompt = req.body.get("prompt").and_then(Value::as_str).unwrap_or("");
        return body::json(
            StatusCode::OK,
            &json!({"embedding": text::embedding(&model, prompt)}),
        );
    }
    let inputs = text::inputs(req.body.get("input"));
    let embeddings: Vec<Vec<f32>> = inputs.iter().map(|i| text::embedding(&model, i)).collect();
    let tokenizer = req.server.config.tokenizer;
    let tokens: u64 = inputs.iter().map(|i| tokenizer.count(i)).sum();
    body::json(
        StatusCode::OK,
        &json!({"model": model, "embeddings": embeddings, "total_duration": 1_000_000u64,
                "load_duration": 1_000u64, "prompt_eval_count": tokens}),
    )
}
