//! The recorder: finishes each exchange off the request path (token estimates where the
//! provider reported nothing, calibrated by the answers where it did; the budget
//! settlement, with those counts; the access log line) and fans the record out to its
//! sinks: telemetry, the store writer's queue, and subscribers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube_gateway_policy::{Encoding, TokenCounter};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

use crate::api::{Endpoint, LlmRequest};
use crate::budget::{Ledger, Reservation};
use crate::estimate::{Calibration, Key, Method, Prompt};
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

/// Our tiktoken counts of an exchange's prompt and answer: what an estimate and the
/// calibration both need, and the slow part of finishing a record (done on a blocking
/// thread when long; see [`Exchange::is_heavy`]).
#[derive(Debug, Clone, Default)]
pub struct Counted {
    /// The prompt's count and layout; `None` when there is no prompt to count.
    prompt: Option<Prompt>,
    /// The answer's count, scaled when only part of its text was kept; `None` for an
    /// embedding or an exchange with no parsed request.
    completion: Option<u64>,
}

impl Exchange {
    /// Whether the request reached a model whose tokens are worth counting.
    fn llm(&self) -> bool {
        // A request the gateway refused never reached a model: it used no tokens.
        self.endpoint.is_some() && self.outcome.reached_llm() && self.request.is_some()
    }

    /// Counts the prompt and the answer with tiktoken. Done for answers with usage too:
    /// they pair our count with the provider's for the calibration.
    pub fn count(&self, tokens: &TokenCounter) -> Counted {
        let Some(request) = self.request.as_ref().filter(|_| self.llm()) else {
            return Counted::default();
        };
        let c = &self.collected;
        let model = self
            .used_model
            .as_deref()
            .or(c.model.as_deref())
            .unwrap_or_default();
        let encoding = self.encoding.unwrap_or_else(|| Encoding::for_model(model));
        let count = |text: &str| tokens.count(encoding, text).unwrap_or(0);
        let shape = request.prompt_shape();
        let prompt = Prompt {
            tokens: count(&request.prompt_text()),
            system_tokens: if shape.system.is_empty() {
                0
            } else {
                count(&shape.system)
            },
            messages: shape.messages,
            system_messages: shape.system_messages,
        };
        let embedding = self.endpoint.is_some_and(Endpoint::is_embedding);
        Counted {
            prompt: Some(prompt),
            completion: (!embedding).then(|| scaled(count(&c.text), c)),
        }
    }

    /// The calibration's key for this exchange: its destination and the model that
    /// answered (the one asked for, else).
    fn key(&self) -> Key<'_> {
        let answered = self.collected.model.as_deref();
        Key {
            upstream: &self.destination,
            model: answered.or(self.used_model.as_deref()).unwrap_or_default(),
        }
    }

    /// The stream's content events, when every one was read.
    fn events(&self) -> Option<u64> {
        let c = &self.collected;
        (self.streamed && !c.truncated && c.oversize_events == 0).then_some(c.content_events)
    }

    /// Whether the provider reported every count the record has: it needs none of ours.
    fn fully_reported(&self) -> bool {
        let usage = &self.collected.usage;
        let embedding = self.endpoint.is_some_and(Endpoint::is_embedding);
        usage.input.is_some() && (usage.output.is_some() || embedding)
    }

    /// A copy to learn from after the record is delivered (small plain answers only:
    /// long ones teach no more, and the queue's memory stays bounded at
    /// [`LESSONS`] x [`HEAVY_BYTES`]).
    fn lesson(&self) -> Option<Exchange> {
        (self.llm() && self.outcome == Outcome::Allowed && !self.is_heavy()).then(|| Exchange {
            // Settled with the record, never by a lesson.
            reservation: None,
            ..self.clone()
        })
    }

    /// Teaches the calibration what this exchange shows: our counts against the
    /// provider's, and the stream's events against either.
    pub fn teach(&self, counted: &Counted, calibration: &mut Calibration) {
        // Only a plain answer's text is the text the provider counted (a rule may have
        // rewritten or cut it), and only all of it.
        let c = &self.collected;
        if self.outcome != Outcome::Allowed {
            return;
        }
        let whole_text = c.text_bytes == c.text.len() as u64;
        let ours_completion = counted.completion.filter(|_| whole_text);
        let key = self.key();
        calibration.observe(
            key,
            &counted.prompt.unwrap_or_default(),
            c.usage.input,
            ours_completion.unwrap_or(0),
            c.usage.output,
        );
        match (self.events(), c.usage.output, ours_completion) {
            (Some(n), Some(truth), _) if whole_text => calibration.observe_events(key, n, truth),
            (Some(n), None, Some(ours)) => calibration.observe_events_against_fit(key, n, ours),
            _ => {}
        }
    }

    /// Finishes the record: the provider's counts where it reported them, the best
    /// estimate where it did not (after [`Self::teach`], so a stream's own events count
    /// towards trusting them).
    pub fn finish(
        self,
        counted: Counted,
        calibration: &Calibration,
        id_prefix: &str,
        log_bodies: bool,
    ) -> (UsageRecord, Option<String>) {
        let events = self.events();
        let estimate = counted
            .prompt
            .map(|p| calibration.estimate(self.key(), &p, counted.completion.unwrap_or(0), events));
        let c = self.collected;
        let (input_tokens, input_source) = match (c.usage.input, estimate) {
            (Some(n), _) => (n, TokenSource::Provider),
            (None, Some(e)) => (e.prompt.tokens, source(e.prompt.method)),
            (None, None) => (0, TokenSource::None),
        };
        let (output_tokens, output_source) = match (c.usage.output, estimate) {
            (Some(n), _) => (n, TokenSource::Provider),
            (None, Some(e)) if counted.completion.is_some() => {
                (e.completion.tokens, source(e.completion.method))
            }
            _ => (0, TokenSource::None),
        };
        let bodies = log_bodies
            .then(|| self.request.as_ref().map(LlmRequest::prompt_text))
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

/// The record's name for how an estimate was made.
fn source(method: Method) -> TokenSource {
    match method {
        Method::ContentEvents => TokenSource::ContentEvents,
        Method::Calibrated => TokenSource::Calibrated,
        Method::Tiktoken => TokenSource::Estimate,
    }
}

/// The tokens of an answer whose text was kept in part ([`crate::meter::ESTIMATE_TEXT_BYTES`]):
/// the kept part's count scaled by the whole text's length.
fn scaled(kept_tokens: u64, c: &Collected) -> u64 {
    let kept = c.text.len() as u128;
    let whole = u128::from(c.text_bytes);
    if kept == 0 || whole <= kept {
        return kept_tokens;
    }
    u64::try_from(u128::from(kept_tokens) * whole / kept).unwrap_or(u64::MAX)
}

impl Exchange {
    /// Whether finishing this exchange means counting enough text to hold up the
    /// records behind it: then it is counted on a blocking thread. Any exchange with a
    /// prompt is counted (answers with usage teach the calibration).
    fn is_heavy(&self) -> bool {
        self.llm() && self.collected.text.len() as u64 + self.bytes_in > HEAVY_BYTES
    }
}

/// Answers with usage waiting to teach the calibration; more are not kept (a lesson
/// missed costs nothing but a sample).
const LESSONS: usize = 64;

/// Answers with usage that all teach the calibration; after them one in
/// [`LESSON_EVERY`] does, and at most [`LESSONS_PER_SECOND`]. Every lesson counts its
/// text with the tokenizer on a blocking thread: at tens of thousands of answers a
/// second, lessons from all of them cost the gateway a tenth of its CPU (one in 16 still
/// cost 5 % of the tiny request's) and teach a settled fit nothing new.
const LESSONS_FIRST: u64 = 1024;
const LESSON_EVERY: u64 = 16;
const LESSONS_PER_SECOND: u32 = 50;

/// Decides which answers with usage teach the calibration.
struct LessonGate {
    reported: u64,
    second: tokio::time::Instant,
    this_second: u32,
}

impl LessonGate {
    fn new(now: tokio::time::Instant) -> Self {
        Self {
            reported: 0,
            second: now,
            this_second: 0,
        }
    }

    /// Whether the next answer with usage, arriving `now`, teaches.
    fn teaches(&mut self, now: tokio::time::Instant) -> bool {
        self.reported += 1;
        if self.reported <= LESSONS_FIRST {
            return true;
        }
        if !self.reported.is_multiple_of(LESSON_EVERY) {
            return false;
        }
        if now.duration_since(self.second) >= Duration::from_secs(1) {
            self.second = now;
            self.this_second = 0;
        }
        self.this_second += 1;
        self.this_second <= LESSONS_PER_SECOND
    }
}

/// Text past which an estimate leaves the recorder's task: counting 64 KiB takes a few
/// milliseconds; more would delay every record queued behind it.
const HEAVY_BYTES: u64 = 64 * 1024;

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
    let sinks = Sinks {
        // Unique across restarts and pods (the store keys on request ids; pids repeat
        // in containers).
        id_prefix: Arc::from(&uuid::Uuid::new_v4().simple().to_string()[..16]),
        tokens,
        log_bodies,
        store,
        ledger,
        telemetry: telemetry.clone(),
        out: out.clone(),
    };
    #[expect(
        clippy::disallowed_methods,
        reason = "the recorder: its handle goes to the caller, which awaits it at shutdown"
    )]
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Exchanges whose estimates are long, counted one at a time on a blocking
        // thread (owned here: the task waits for them before it ends).
        // With them, in arrival order, the answers the provider counted: already
        // recorded, kept to teach the calibration (`false`: a lesson, not a record). An
        // answer with usage never waits for a lesson, nor for the tokenizer's first
        // build; one to estimate waits for the lessons before it (it needs the
        // tokenizer anyway), so it is corrected by all that came before.
        let mut queue: VecDeque<(Exchange, bool)> = VecDeque::new();
        let mut lessons = 0usize;
        let mut gate = LessonGate::new(tokio::time::Instant::now());
        let mut counting: JoinSet<(Exchange, Counted, bool)> = JoinSet::new();
        // Owned by this task alone, so it takes no lock: the blocking thread only
        // counts, and the counts come back here to teach it and be corrected by it, in
        // the order they finish (a long answer's lesson lands a little late, harmlessly).
        let mut calibration = Calibration::new();
        let mut open = true;
        // The background thread frees what the exchanges held (answers' text).
        let mut purge = tokio::time::interval(crate::alloc::PURGE_EVERY);
        while open || !queue.is_empty() || !counting.is_empty() {
            if counting.is_empty() {
                if let Some((exchange, record)) = queue.pop_front() {
                    lessons -= usize::from(!record);
                    let tokens = sinks.tokens.clone();
                    counting.spawn_blocking(move || {
                        let counted = exchange.count(&tokens);
                        (exchange, counted, record)
                    });
                }
            }
            tokio::select! {
                _ = tick.tick(), if open => {
                    // This tick's access lines go out as one write.
                    let _batch = crate::logging::AccessBatch::begin();
                    loop {
                    match rx.try_recv() {
                        Ok(exchange) if exchange.fully_reported() => {
                            let lesson = (gate.teaches(tokio::time::Instant::now()) && lessons < LESSONS)
                                .then(|| exchange.lesson())
                                .flatten();
                            let finished = sinks.finish(exchange, Counted::default(), &calibration);
                            sinks.deliver(finished).await;
                            if let Some(lesson) = lesson {
                                lessons += 1;
                                queue.push_back((lesson, false));
                            }
                        }
                        Ok(exchange) if exchange.is_heavy() || !queue.is_empty() || !counting.is_empty() => {
                            queue.push_back((exchange, true));
                        }
                        Ok(exchange) => {
                            let counted = exchange.count(&sinks.tokens);
                            exchange.teach(&counted, &mut calibration);
                            let finished = sinks.finish(exchange, counted, &calibration);
                            sinks.deliver(finished).await;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                    }
                },
                _ = purge.tick() => crate::alloc::purge(),
                Some(done) = counting.join_next(), if !counting.is_empty() => match done {
                    Ok((exchange, counted, record)) => {
                        exchange.teach(&counted, &mut calibration);
                        if record {
                            let finished = sinks.finish(exchange, counted, &calibration);
                            sinks.deliver(finished).await;
                        }
                    }
                    // Counting does not panic on any text; if it ever did, say so loudly.
                    Err(e) => tracing::error!(error = %e, "usage estimate failed: record lost"),
                },
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

/// A finished record, its access-log bodies, and the budget reservation to settle.
struct Finished {
    record: UsageRecord,
    bodies: Option<String>,
    reservation: Option<Reservation>,
}

/// Where the recorder sends records, and what it needs to finish them.
#[derive(Clone)]
struct Sinks {
    id_prefix: Arc<str>,
    tokens: TokenCounter,
    log_bodies: bool,
    store: Option<mpsc::Sender<Arc<UsageRecord>>>,
    ledger: Arc<Ledger>,
    telemetry: Option<Arc<Telemetry>>,
    out: broadcast::Sender<Arc<UsageRecord>>,
}

impl Sinks {
    fn finish(
        &self,
        mut exchange: Exchange,
        counted: Counted,
        calibration: &Calibration,
    ) -> Finished {
        let reservation = exchange.reservation.take();
        let (record, bodies) =
            exchange.finish(counted, calibration, &self.id_prefix, self.log_bodies);
        Finished {
            record,
            bodies,
            reservation,
        }
    }

    async fn deliver(&self, f: Finished) {
        let Finished {
            record,
            bodies,
            reservation,
        } = f;
        if let Some(r) = reservation {
            self.ledger
                .settle(&r, record.input_tokens, record.output_tokens);
        }
        crate::access::log(&record, bodies.as_deref());
        // Metrics, and the OTLP span when that export is on.
        if let Some(t) = &self.telemetry {
            t.record(&record);
        }
        let record = Arc::new(record);
        if let Some(store) = &self.store {
            // Waits when the writer is behind: backpressure stays here, never on the
            // request path.
            if store.send(record.clone()).await.is_err() {
                tracing::error!(request_id = %record.request_id, "usage writer gone: row not stored");
            }
        }
        // No subscriber is fine: the access log above is the record then.
        let _ = self.out.send(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::SystemClock;

    #[test]
    fn the_first_answers_all_teach_then_one_in_sixteen_at_most_fifty_a_second() {
        let start = tokio::time::Instant::now();
        let mut gate = LessonGate::new(start);
        assert!((0..LESSONS_FIRST).all(|_| gate.teaches(start)));
        // 1,600 answers spread over 100 s: one in 16 teaches, well under the cap.
        let slow = (0..1600u64)
            .filter(|n| gate.teaches(start + Duration::from_millis(n * 62)))
            .count();
        assert_eq!(slow, 100);
        // 16,000 answers within one second: the cap, then nothing until the next second.
        let t = start + Duration::from_secs(200);
        let fast = (0..16_000).filter(|_| gate.teaches(t)).count();
        assert_eq!(fast, LESSONS_PER_SECOND as usize);
        let next = t + Duration::from_secs(1);
        assert_eq!((0..16).filter(|_| gate.teaches(next)).count(), 1);
    }

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

    #[test]
    fn an_answer_kept_in_part_is_estimated_by_its_whole_length() {
        let mut c = Collected {
            text: "word ".repeat(1000),
            ..Default::default()
        };
        c.text_bytes = c.text.len() as u64 * 20;
        assert_eq!(scaled(1000, &c), 20_000);
        c.text_bytes = c.text.len() as u64;
        assert_eq!(scaled(1000, &c), 1000);
    }

    /// A chat exchange of `prompt` answered with `answer`, with `usage` (input, output)
    /// when the provider reported it.
    fn chat(prompt: &str, answer: &str, streamed: bool, usage: Option<(u64, u64)>) -> Exchange {
        let mut ex = exchange(0);
        ex.endpoint = Some(Endpoint::ChatCompletions);
        ex.path = "/v1/chat/completions".into();
        let body = serde_json::json!({"model": "m", "stream": streamed,
            "messages": [{"role": "user", "content": prompt}]});
        ex.request = Some(LlmRequest::parse(Endpoint::ChatCompletions, body.to_string()).unwrap());
        ex.streamed = streamed;
        ex.collected.model = Some("m".into());
        ex.collected.text = answer.into();
        ex.collected.text_bytes = answer.len() as u64;
        ex.collected.usage.input = usage.map(|u| u.0);
        ex.collected.usage.output = usage.map(|u| u.1);
        ex
    }

    #[test]
    fn answers_without_usage_get_the_best_count_and_say_how_it_was_made() {
        let tokens = TokenCounter::new();
        let mut cal = Calibration::new();
        let ours = |t: &str| tokens.count(Encoding::for_model("m"), t).unwrap();
        // A server whose tokenizer counts twice ours, with a 9-token chat template, and
        // one token per content event; its streams report usage (they teach the events).
        let finish = |cal: &mut Calibration, ex: Exchange| {
            let counted = ex.count(&tokens);
            ex.teach(&counted, cal);
            ex.finish(counted, cal, "t", false).0
        };
        for i in 1..=crate::estimate::MIN_SAMPLES as usize {
            let prompt = "how do pods talk to each other ".repeat(i * 3);
            let answer = "through the cluster network and services ".repeat(i * 2);
            let truth = (2 * ours(&prompt) + 9, 2 * ours(&answer));
            let mut ex = chat(&prompt, &answer, true, Some(truth));
            ex.collected.content_events = truth.1;
            let r = finish(&mut cal, ex);
            assert_eq!(
                (r.input_tokens, r.output_tokens),
                truth,
                "provider counts stay"
            );
            assert_eq!(r.token_source(), TokenSource::Provider);
        }
        let prompt = "what is a service mesh, and why would I want one? ".repeat(4);
        let answer = "a layer of proxies beside each workload ".repeat(5);
        let mut streamed = chat(&prompt, &answer, true, None);
        streamed.collected.content_events = 77;
        let r = finish(&mut cal, streamed);
        assert_eq!(
            (r.output_tokens, r.output_source),
            (77, TokenSource::ContentEvents)
        );
        assert_eq!(r.input_source, TokenSource::Calibrated);
        let want = 2 * ours(&prompt) + 9;
        assert!(
            r.input_tokens.abs_diff(want) <= 1,
            "{} vs {want}",
            r.input_tokens
        );
        assert_eq!(r.token_source(), TokenSource::Calibrated);
        // Not streamed: no events, the completion fit.
        let r = finish(&mut cal, chat(&prompt, &answer, false, None));
        assert_eq!(
            (r.output_tokens, r.output_source),
            (2 * ours(&answer), TokenSource::Calibrated)
        );
        // Another upstream has learnt nothing: tiktoken as is, named as before.
        let mut elsewhere = chat(&prompt, &answer, false, None);
        elsewhere.destination = Arc::from("10.0.0.10:8080");
        let r = finish(&mut cal, elsewhere);
        assert_eq!(
            (
                r.input_tokens,
                r.input_source,
                r.output_tokens,
                r.output_source
            ),
            (
                ours(&prompt),
                TokenSource::Estimate,
                ours(&answer),
                TokenSource::Estimate
            )
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_with_usage_are_recorded_at_once_and_teach_afterwards() {
        let tokens = TokenCounter::new();
        let ours = |t: &str| tokens.count(Encoding::for_model("m"), t).unwrap();
        let (recorder, usage, _task) = spawn_recorder(
            tokens.clone(),
            false,
            1024,
            None,
            Arc::new(Ledger::new(Arc::new(SystemClock))),
            None,
        );
        let mut usage = usage.subscribe();
        for i in 1..=crate::estimate::MIN_SAMPLES as usize {
            let prompt = "how do pods talk to each other ".repeat(i * 3);
            let truth = (3 * ours(&prompt) + 9, 7);
            recorder.record(chat(&prompt, "ok", false, Some(truth)));
            let r = usage.recv().await.unwrap();
            assert_eq!(
                (r.input_tokens, r.input_source),
                (truth.0, TokenSource::Provider)
            );
        }
        // Their lessons are counted after them, off the recorder's task; an answer
        // without usage waits for the lessons before it, and is corrected by them.
        let prompt = "what is a service mesh? ".repeat(6);
        recorder.record(chat(&prompt, "a mesh", false, None));
        let r = usage.recv().await.unwrap();
        let want = 3 * ours(&prompt) + 9;
        assert_eq!(r.input_source, TokenSource::Calibrated);
        assert!(
            r.input_tokens.abs_diff(want) <= 1,
            "{} vs {want}",
            r.input_tokens
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pathological_answer_does_not_hold_up_the_records_behind_it() {
        let (recorder, usage, _task) = spawn_recorder(
            TokenCounter::new(),
            false,
            1024,
            None,
            Arc::new(Ledger::new(Arc::new(SystemClock))),
            None,
        );
        let mut usage = usage.subscribe();
        // An answer without usage, one unbroken "word" (kept: 1 MiB of a 20 MB answer).
        let mut slow = exchange(0);
        slow.request = Some(
            LlmRequest::parse(
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            )
            .unwrap(),
        );
        slow.collected.text = "a".repeat(crate::meter::ESTIMATE_TEXT_BYTES);
        slow.collected.text_bytes = 20 << 20;
        assert!(slow.is_heavy());
        recorder.record(slow);
        for seq in 1..=100 {
            let mut ex = exchange(seq);
            ex.collected.usage.input = Some(3);
            ex.collected.usage.output = Some(5);
            assert!(!ex.is_heavy());
            recorder.record(ex);
        }
        // The 100 ordinary records come out first, while the long estimate runs apart.
        let order: Vec<u64> = {
            let mut v = Vec::new();
            for _ in 0..=100 {
                let r = usage.recv().await.unwrap();
                v.push(r.request_id.rsplit('-').next().unwrap().parse().unwrap());
            }
            v
        };
        assert_eq!(order.last(), Some(&0), "{order:?}");
        assert_eq!(order[..100], (1..=100).collect::<Vec<u64>>()[..]);
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
