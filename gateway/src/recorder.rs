//! The recorder: finishes each exchange off the request path (token estimates where the
//! provider reported nothing, the budget settlement, the access log line) and fans the
//! record out to its sinks: telemetry, the store writer's queue, and subscribers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube_gateway_policy::{Encoding, TokenCounter};
use tokio::sync::{broadcast, mpsc};

use crate::api::{Endpoint, LlmRequest};
use crate::budget::{Ledger, Reservation};
use crate::record::{Collected, Identity, Outcome, TokenSource, UsageRecord};
use crate::telemetry::Telemetry;

/// What the request path knows when an exchange ends.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Sequence number; the recorder turns it into the request id.
    pub seq: u64,
    /// Whose traffic this is.
    pub workload: Arc<Identity>,
    pub started_at: SystemTime,
    pub peer: SocketAddr,
    /// Shared by every request of a connection.
    pub destination: Arc<str>,
    pub method: http::Method,
    pub path: String,
    pub endpoint: Option<Endpoint>,
    pub requested_model: Option<String>,
    pub used_model: Option<String>,
    /// The parsed request, kept for a prompt estimate if the provider reports none.
    pub request: Option<LlmRequest>,
    pub streamed: bool,
    pub status: u16,
    pub outcome: Outcome,
    pub error: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency: Duration,
    pub first_chunk: Option<Duration>,
    pub collected: Collected,
    /// Policy rules that acted, in order.
    pub rules: Vec<String>,
    /// The encoding estimates use (the policy may set it per model).
    pub encoding: Option<Encoding>,
    /// What the request holds in the budget ledger, settled when the record is finished.
    pub reservation: Option<Reservation>,
}

impl Exchange {
    /// Finishes the record, estimating what the provider did not report.
    pub fn finish(
        self,
        id_prefix: &str,
        tokens: &TokenCounter,
        log_bodies: bool,
    ) -> (UsageRecord, Option<String>) {
        let c = self.collected;
        let model = self
            .used_model
            .clone()
            .or_else(|| c.model.clone())
            .unwrap_or_default();
        let encoding = self.encoding.unwrap_or_else(|| Encoding::for_model(&model));
        let count = |text: &str| tokens.count(encoding, text).unwrap_or(0);
        // A request the gateway refused never reached a model: it used no tokens.
        let llm = self.endpoint.is_some() && self.outcome.reached_llm();
        // Reading the prompt's text costs a parse: only when an estimate or the log needs it.
        let prompt_text = || self.request.as_ref().map(LlmRequest::prompt_text);
        let (input_tokens, input_source) = match c.usage.input {
            Some(n) => (n, TokenSource::Provider),
            None => match prompt_text() {
                Some(text) if llm => (count(&text), TokenSource::Estimate),
                _ => (0, TokenSource::None),
            },
        };
        let embedding = self.endpoint.is_some_and(Endpoint::is_embedding);
        let (output_tokens, output_source) = match c.usage.output {
            Some(n) => (n, TokenSource::Provider),
            None if llm && !embedding && self.request.is_some() => {
                (count(&c.text), TokenSource::Estimate)
            }
            None => (0, TokenSource::None),
        };
        let bodies = log_bodies
            .then(prompt_text)
            .flatten()
            .map(|p| format!("prompt={p:?} completion={:?}", c.text));
        let record = UsageRecord {
            request_id: format!("kgw-{id_prefix}-{}", self.seq),
            workload: self.workload,
            started_at: self.started_at,
            peer: self.peer,
            destination: self.destination.to_string(),
            endpoint: self.endpoint,
            method: self.method.to_string(),
            path: self.path,
            requested_model: self.requested_model,
            used_model: self.used_model,
            response_model: c.model,
            status: self.status,
            outcome: self.outcome,
            input_tokens,
            input_source,
            output_tokens,
            output_source,
            cached_tokens: c.usage.cached,
            reasoning_tokens: c.usage.reasoning,
            finish_reason: c.finish_reason,
            streamed: self.streamed,
            latency: self.latency,
            first_chunk: self.first_chunk,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            error: self.error.or(c.error),
            rules: self.rules,
        };
        (record, bodies)
    }
}

/// Hands finished exchanges to the recorder task without waiting.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Exchange>,
    dropped: Arc<AtomicU64>,
    telemetry: Option<Arc<Telemetry>>,
}

impl Recorder {
    /// Queues an exchange. The request path never waits: if the queue is full the
    /// exchange is counted as dropped (`kube_gateway_usage_records_dropped_total`) and
    /// logged loudly, never lost silently.
    pub fn record(&self, exchange: Exchange) {
        if let Err(e) = self.tx.try_send(exchange) {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(t) = &self.telemetry {
                t.record_dropped();
            }
            let ex = match e {
                mpsc::error::TrySendError::Full(ex) | mpsc::error::TrySendError::Closed(ex) => ex,
            };
            tracing::error!(seq = ex.seq, path = %ex.path, dropped_total = n, "usage queue full: usage record dropped");
        }
    }
}

/// How often the recorder drains its queue. Draining on a tick instead of waking per
/// record keeps the request path free of cross-thread wake-ups.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// Starts the recorder task. Finished records are broadcast to subscribers.
pub fn spawn_recorder(
    tokens: TokenCounter,
    log_bodies: bool,
    capacity: usize,
    store: Option<mpsc::Sender<Arc<UsageRecord>>>,
    ledger: Arc<Ledger>,
    telemetry: Option<Arc<Telemetry>>,
) -> (
    Recorder,
    broadcast::Sender<Arc<UsageRecord>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = mpsc::channel::<Exchange>(capacity);
    let (out, _) = broadcast::channel(4096);
    let out2 = out.clone();
    let sink_telemetry = telemetry.clone();
    // Unique across restarts and pods (the store keys on request ids; pids repeat in
    // containers).
    let id_prefix = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    #[expect(
        clippy::disallowed_methods,
        reason = "the recorder: its handle goes to the caller, which awaits it at shutdown"
    )]
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match rx.try_recv() {
                    Ok(mut exchange) => {
                        let reservation = exchange.reservation.take();
                        let (record, bodies) = exchange.finish(&id_prefix, &tokens, log_bodies);
                        if let Some(r) = reservation {
                            ledger.settle(&r, record.input_tokens, record.output_tokens);
                        }
                        access_log(&record, bodies);
                        // Metrics, and the OTLP span when that export is on.
                        if let Some(t) = &sink_telemetry {
                            t.record(&record);
                        }
                        let record = Arc::new(record);
                        if let Some(store) = &store {
                            // Waits when the writer is behind: backpressure stays here,
                            // never on the request path.
                            if store.send(record.clone()).await.is_err() {
                                tracing::error!(request_id = %record.request_id, "usage writer gone: row not stored");
                            }
                        }
                        // No subscriber is fine: the access log above is the record then.
                        let _ = out2.send(record);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
        }
    });
    (
        Recorder {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            telemetry,
        },
        out,
        task,
    )
}

fn access_log(r: &UsageRecord, bodies: Option<String>) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    tracing::info!(
        target: "access",
        request_id = %r.request_id,
        namespace = %r.workload.namespace,
        pod = %r.workload.pod,
        service_account = %r.workload.service_account,
        api = r.api_name(),
        endpoint = r.endpoint_name(),
        method = %r.method,
        path = %r.path,
        peer = %r.peer,
        destination = %r.destination,
        requested_model = r.requested_model.as_deref().unwrap_or(""),
        used_model = r.used_model.as_deref().unwrap_or(""),
        status = r.status,
        outcome = r.outcome.as_str(),
        input_tokens = r.input_tokens,
        input_source = r.input_source.as_str(),
        output_tokens = r.output_tokens,
        output_source = r.output_source.as_str(),
        cached_tokens = r.cached_tokens.unwrap_or(0),
        reasoning_tokens = r.reasoning_tokens.unwrap_or(0),
        streamed = r.streamed,
        latency_ms = ms(r.latency),
        first_chunk_ms = r.first_chunk.map(ms).unwrap_or(-1.0),
        bytes_in = r.bytes_in,
        bytes_out = r.bytes_out,
        error = r.error.as_deref().unwrap_or(""),
        rules = r.rules.join(",").as_str(),
        bodies = bodies.as_deref().unwrap_or(""),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::SystemClock;

    fn exchange(seq: u64) -> Exchange {
        Exchange {
            seq,
            workload: std::sync::Arc::new(crate::record::Identity {
                namespace: "ns".into(),
                pod: "pod".into(),
                ..Default::default()
            }),
            started_at: SystemTime::now(),
            peer: SocketAddr::from(([10, 0, 0, 7], 41_000)),
            destination: Arc::from("10.0.0.9:11434"),
            method: http::Method::POST,
            path: "/api/chat".into(),
            endpoint: Some(Endpoint::Chat),
            requested_model: Some("m".into()),
            used_model: Some("m".into()),
            request: None,
            streamed: false,
            status: 200,
            outcome: Outcome::Allowed,
            error: None,
            bytes_in: 10,
            bytes_out: 20,
            latency: Duration::from_millis(5),
            first_chunk: None,
            collected: Collected::default(),
            rules: Vec::new(),
            encoding: None,
            reservation: None,
        }
    }

    #[tokio::test]
    async fn records_dropped_on_a_full_queue_are_counted_where_a_scrape_sees_them() {
        let telemetry = Telemetry::new("ns", "pod", None);
        let (recorder, usage, _task) = spawn_recorder(
            TokenCounter::new(),
            false,
            2,
            None,
            Arc::new(Ledger::new(Arc::new(SystemClock))),
            Some(telemetry.clone()),
        );
        let mut usage = usage.subscribe();
        // No await between these: the recorder task cannot drain, the queue holds two.
        for seq in 0..5 {
            recorder.record(exchange(seq));
        }
        let line = r#"kube_gateway_usage_records_dropped_total{namespace="ns",pod="pod"} 3"#;
        let text = telemetry.encode();
        assert!(text.contains(line), "{line} missing:\n{text}");
        // The two queued ones are recorded as usual.
        for seq in 0..2 {
            let r = usage.recv().await.unwrap();
            assert!(
                r.request_id.ends_with(&format!("-{seq}")),
                "{}",
                r.request_id
            );
        }
    }
}
