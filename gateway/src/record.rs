//! The usage record: what one request did, as every sink sees it. A leaf: it imports
//! only the API's vocabulary (`api`), and everything downstream of the proxy (recorder,
//! budgets, store, telemetry) imports it. Names for rows, labels and logs are rendered
//! here, once, from the enums.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::api::{Dialect, Endpoint, ReportedUsage};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Forwarded and answered.
    Allowed,
    /// A recognized path whose body could not be parsed: forwarded unchanged (fail-open).
    Unparsed,
    /// Refused by the gateway before reaching the upstream (too large, malformed).
    Rejected,
    /// The upstream could not be reached, timed out or failed mid-answer.
    UpstreamError,
    /// Refused by a policy rule (model or prompt).
    Denied,
    /// Forwarded with a prompt or an answer rewritten by a policy rule.
    Redacted,
    /// The answer was ended by a response rule.
    Blocked,
    /// A streamed answer was ended at its budget's line.
    BudgetCut,
    /// The client went away before the answer ended.
    ClientCancelled,
}

impl Outcome {
    /// Every outcome, for what is rendered from the whole set (SQL filters, tests).
    pub const ALL: [Outcome; 9] = [
        Outcome::Allowed,
        Outcome::Unparsed,
        Outcome::Rejected,
        Outcome::UpstreamError,
        Outcome::Denied,
        Outcome::Redacted,
        Outcome::Blocked,
        Outcome::BudgetCut,
        Outcome::ClientCancelled,
    ];

    /// Whether the request was sent on to the LLM. The one definition: token counts,
    /// metrics, spans, budgets and the store's budget queries all follow it. An unparsed
    /// request was forwarded unchanged, so it reached the LLM (and may have spent
    /// tokens); only the gateway's own refusals did not.
    pub fn reached_llm(self) -> bool {
        match self {
            Outcome::Denied | Outcome::Rejected => false,
            Outcome::Allowed
            | Outcome::Unparsed
            | Outcome::UpstreamError
            | Outcome::Redacted
            | Outcome::Blocked
            | Outcome::BudgetCut
            | Outcome::ClientCancelled => true,
        }
    }

    /// The name in rows, labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Unparsed => "unparsed",
            Outcome::Rejected => "rejected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Denied => "denied",
            Outcome::Redacted => "redacted",
            Outcome::Blocked => "blocked",
            Outcome::BudgetCut => "budget_cut",
            Outcome::ClientCancelled => "client_cancelled",
        }
    }
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where a token count came from, best first (a fixed set: safe as a label value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TokenSource {
    /// The provider's own usage report.
    Provider,
    /// The stream's content events, one token each: a rule this upstream and model's
    /// answers were shown to follow (output counts only).
    ContentEvents,
    /// Counted by the gateway with tiktoken, then mapped through the fit learnt from
    /// this upstream and model's answers that did report usage.
    Calibrated,
    /// Counted by the gateway with tiktoken, as is (nothing to correct it with yet). The
    /// name predates the others: rows and dashboards already hold it.
    Estimate,
    /// Not an LLM call, or nothing to count.
    None,
}

impl TokenSource {
    /// Every source, best first.
    pub const ALL: [TokenSource; 5] = [
        TokenSource::Provider,
        TokenSource::ContentEvents,
        TokenSource::Calibrated,
        TokenSource::Estimate,
        TokenSource::None,
    ];

    /// The name in rows and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Provider => "provider",
            TokenSource::ContentEvents => "content_events",
            TokenSource::Calibrated => "calibrated",
            TokenSource::Estimate => "estimate",
            TokenSource::None => "none",
        }
    }
}

impl Serialize for TokenSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What the meter collected over a whole response.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    pub model: Option<String>,
    pub usage: ReportedUsage,
    /// Generated text, kept for estimates (its first `Bounds::text` bytes).
    pub text: String,
    /// The generated text's whole length, kept or not.
    pub text_bytes: u64,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    /// SSE events or NDJSON lines seen.
    pub frames: u64,
    /// The response body was larger than the meter keeps; usage may be missing.
    pub truncated: bool,
    /// Response rules that matched, in order.
    pub policy_hits: Vec<String>,
    /// A response rule ended the answer.
    pub blocked: bool,
    /// A budget ended the answer.
    pub budget_cut: bool,
    /// Stream events larger than `--max-event-bytes`, forwarded unread.
    pub oversize_events: u64,
    /// Objects read that carried generated text (a stream's content events; 1 for a
    /// whole answer with text): one token each on servers such as llama.cpp's.
    pub content_events: u64,
}

/// The name of a request's API family in rows, labels and logs (`other`: not an LLM
/// call).
pub fn api_name(endpoint: Option<Endpoint>) -> &'static str {
    endpoint.map_or("other", |e| e.dialect().as_str())
}

/// The name of a request's endpoint in rows, labels and logs.
pub fn endpoint_name(endpoint: Option<Endpoint>) -> &'static str {
    endpoint.map_or("other", Endpoint::as_str)
}

/// Whose traffic a record is: the labels of its usage row, metric series and log line.
/// One per gateway in `kube-gateway run` (from the pod's environment); one per served
/// pod in `kube-gateway node`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Identity {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub service_account: String,
}

/// A finished usage record: what the access log shows and the store keeps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    /// Whose traffic this was.
    pub workload: Arc<Identity>,
    /// When the request arrived (its span starts here and ends `latency` later).
    pub started_at: SystemTime,
    pub peer: SocketAddr,
    pub destination: String,
    /// The recognized endpoint; `None` for anything passed through.
    #[serde(serialize_with = "serialize_endpoint")]
    pub endpoint: Option<Endpoint>,
    pub method: String,
    pub path: String,
    pub requested_model: Option<String>,
    pub used_model: Option<String>,
    pub response_model: Option<String>,
    pub status: u16,
    pub outcome: Outcome,
    pub input_tokens: u64,
    pub input_source: TokenSource,
    pub output_tokens: u64,
    pub output_source: TokenSource,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    pub streamed: bool,
    pub latency: Duration,
    pub first_chunk: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub error: Option<String>,
    /// Policy rules that acted, in order.
    pub rules: Vec<String>,
}

fn serialize_endpoint<S: serde::Serializer>(e: &Option<Endpoint>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(endpoint_name(*e))
}

impl UsageRecord {
    /// The API family, for a recognized call.
    pub fn dialect(&self) -> Option<Dialect> {
        self.endpoint.map(Endpoint::dialect)
    }

    pub fn api_name(&self) -> &'static str {
        api_name(self.endpoint)
    }

    pub fn endpoint_name(&self) -> &'static str {
        endpoint_name(self.endpoint)
    }

    /// When the answer ended.
    pub fn ended_at(&self) -> SystemTime {
        self.started_at + self.latency
    }

    /// Where the row's tokens came from: the worse of its two counts' sources (a row
    /// with one count estimated is an estimate), `none` only when neither was counted.
    pub fn token_source(&self) -> TokenSource {
        [self.input_source, self.output_source]
            .into_iter()
            .filter(|s| *s != TokenSource::None)
            .max()
            .unwrap_or(TokenSource::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_gateways_own_refusals_did_not_reach_the_llm() {
        let not: Vec<_> = Outcome::ALL
            .into_iter()
            .filter(|o| !o.reached_llm())
            .collect();
        assert_eq!(not, [Outcome::Rejected, Outcome::Denied]);
        assert!(Outcome::Unparsed.reached_llm(), "forwarded unchanged");
    }

    #[test]
    fn names_render_once_and_serialize_the_same() {
        for o in Outcome::ALL {
            assert_eq!(
                serde_json::to_value(o).unwrap(),
                serde_json::json!(o.as_str())
            );
        }
        for s in TokenSource::ALL {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert_eq!(api_name(None), "other");
        assert_eq!(api_name(Some(Endpoint::Chat)), "ollama");
        assert_eq!(
            endpoint_name(Some(Endpoint::ChatCompletions)),
            "chat_completions"
        );
    }
}
