//! The gateway's request-level errors, where each came from, and the one mapping from an
//! error to the HTTP answer a client gets, in its own API's format.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::api::{ollama, openai, Dialect};

/// Who caused an error: decides the status family and whether a retry is sane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorOrigin {
    Client,
    Upstream,
    Internal,
}

/// A request the gateway could not carry through.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("request body exceeds the gateway's limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request body could not be read: {0}")]
    ClientBody(String),
    #[error("request body did not arrive within {timeout:?}")]
    BodyTimeout { timeout: Duration },
    #[error("request body is not valid JSON for this API: {0}")]
    MalformedJson(String),
    #[error("upstream {upstream} could not be reached: {reason}")]
    UpstreamConnect { upstream: String, reason: String },
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    UpstreamTimeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} failed: {reason}")]
    UpstreamReset { upstream: String, reason: String },
    #[error("the gateway could not build the upstream request: {0}")]
    Internal(String),
    /// A policy rule refused the request. The message names the rule, never the prompt.
    #[error("request denied by policy rule {rule:?} ({what})")]
    PolicyDenied { rule: String, what: &'static str },
    /// A token or request budget has no room left in its window.
    #[error("budget {budget:?} is spent; it resets in {retry_after} s")]
    BudgetExhausted { budget: String, retry_after: u64 },
    /// A shared budget needs a lease and the shared store cannot be reached.
    #[error("budget {budget:?} is shared and its store is unreachable: {reason}")]
    BudgetUnavailable { budget: String, reason: String },
}

impl GatewayError {
    /// Who caused the error (not `std::error::Error::source`, the underlying error).
    pub fn origin(&self) -> ErrorOrigin {
        match self {
            GatewayError::BodyTooLarge { .. }
            | GatewayError::ClientBody(_)
            | GatewayError::BodyTimeout { .. }
            | GatewayError::MalformedJson(_)
            | GatewayError::PolicyDenied { .. }
            | GatewayError::BudgetExhausted { .. } => ErrorOrigin::Client,
            GatewayError::UpstreamConnect { .. }
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::UpstreamReset { .. } => ErrorOrigin::Upstream,
            GatewayError::Internal(_) | GatewayError::BudgetUnavailable { .. } => {
                ErrorOrigin::Internal
            }
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::ClientBody(_) | GatewayError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            GatewayError::UpstreamConnect { .. } | GatewayError::UpstreamReset { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::PolicyDenied { .. } => StatusCode::FORBIDDEN,
            GatewayError::BudgetExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BudgetUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable machine-readable code, also sent as `x-kube-gateway-error`.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BodyTooLarge { .. } => "request_too_large",
            GatewayError::ClientBody(_) => "request_body_unreadable",
            GatewayError::BodyTimeout { .. } => "request_body_timeout",
            GatewayError::MalformedJson(_) => "invalid_json",
            GatewayError::UpstreamConnect { .. } => "upstream_unreachable",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::UpstreamReset { .. } => "upstream_reset",
            GatewayError::Internal(_) => "gateway_internal",
            GatewayError::PolicyDenied { .. } => "policy_denied",
            GatewayError::BudgetExhausted { .. } => "budget_exhausted",
            GatewayError::BudgetUnavailable { .. } => "budget_unavailable",
        }
    }

    /// OpenAI's error `type` for this error.
    fn openai_type(&self) -> &'static str {
        match self.origin() {
            ErrorOrigin::Client => "invalid_request_error",
            ErrorOrigin::Upstream => "upstream_error",
            ErrorOrigin::Internal => "server_error",
        }
    }

    /// The error as the caller's API writes errors (plain text for other traffic).
    pub fn body(&self, dialect: Option<Dialect>) -> (Bytes, &'static str) {
        let message = format!("kube-gateway: {self}");
        match dialect {
            Some(Dialect::OpenAi) => (
                Bytes::from(
                    openai::error_body(&message, self.openai_type(), self.code()).to_string(),
                ),
                "application/json",
            ),
            Some(Dialect::Ollama) => (
                Bytes::from(ollama::error_body(&message).to_string()),
                "application/json",
            ),
            None => (Bytes::from(message + "\n"), "text/plain; charset=utf-8"),
        }
    }

    /// The whole HTTP answer.
    pub fn response<B: From<Bytes>>(&self, dialect: Option<Dialect>) -> Response<B> {
        let (body, content_type) = self.body(dialect);
        let mut resp = Response::new(B::from(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(
            "x-kube-gateway-error",
            HeaderValue::from_static(self.code()),
        );
        match self {
            GatewayError::BudgetExhausted { retry_after, .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            GatewayError::BudgetUnavailable { .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

/// The frame that ends a stream whose upstream failed mid-way, in the stream's format.
/// SSE streams (OpenAI) get an error event, NDJSON streams (Ollama) an error line.
pub fn stream_error_frame(sse: bool, message: &str) -> Bytes {
    let message = format!("kube-gateway: {message}");
    if sse {
        Bytes::from(format!(
            "data: {}\n\n",
            openai::error_body(&message, "upstream_error", "upstream_reset")
        ))
    } else {
        Bytes::from(format!("{}\n", ollama::error_body(&message)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn answers_in_each_dialect() {
        let e = GatewayError::UpstreamTimeout {
            upstream: "10.0.0.1:11434".into(),
            timeout: Duration::from_secs(3),
        };
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        let (body, _) = e.body(Some(Dialect::OpenAi));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "upstream_timeout");
        assert_eq!(v["error"]["type"], "upstream_error");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not answer"));
        let (body, _) = e.body(Some(Dialect::Ollama));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("10.0.0.1:11434"));
        let resp: Response<Bytes> = GatewayError::BodyTooLarge { limit: 5 }.response(None);
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers()["x-kube-gateway-error"], "request_too_large");
    }

    #[test]
    fn the_origin_is_not_the_underlying_error() {
        let e = GatewayError::UpstreamConnect {
            upstream: "u".into(),
            reason: "refused".into(),
        };
        assert_eq!(e.origin(), ErrorOrigin::Upstream);
        // `source()` is std's: these errors carry their cause as text, not as a source.
        assert!(e.source().is_none());
    }
}
