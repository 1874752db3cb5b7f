//! The span export: spans encoded by [`protobuf`](super::protobuf) as the recorder
//! finishes requests, batched, and posted over OTLP/HTTP by a thread of its own. It reads
//! the standard variables the OTLP crate reads for traces (endpoint, headers, timeout;
//! `http/protobuf` only, uncompressed) and rejects what it cannot honour instead of
//! ignoring it. A slow or absent collector costs spans (counted, logged), never the
//! recorder's time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use opentelemetry_sdk::Resource;
use percent_encoding::percent_decode_str;
use reqwest::blocking::Client;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use super::protobuf::{export_request, EncodedResource};
use super::OtelError;

/// Where and how spans are sent, from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanTarget {
    pub url: reqwest::Url,
    pub headers: HeaderMap,
    pub timeout: Duration,
    /// Spans a request carries at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub batch: usize,
    /// Spans waiting to be sent at most (`OTEL_BSP_MAX_QUEUE_SIZE`); past them spans
    /// are dropped (and counted) rather than holding up the recorder when the collector
    /// is slow or away.
    pub queue: usize,
    /// How long a batch that is not full waits (`OTEL_BSP_SCHEDULE_DELAY`).
    pub delay: Duration,
}

/// The OTLP default export timeout, and the batch span processor's defaults.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_BATCH: usize = 512;
const DEFAULT_QUEUE: usize = 2048;
const DEFAULT_DELAY: Duration = Duration::from_secs(5);

impl SpanTarget {
    /// The target the process environment names.
    pub fn from_env() -> Result<Self, OtelError> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    /// The target the variables `var` returns name: each trace-specific variable wins over
    /// its general `OTEL_EXPORTER_OTLP_*` form.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, OtelError> {
        let pick = |suffix: &str| {
            let specific = format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}");
            let general = format!("OTEL_EXPORTER_OTLP_{suffix}");
            var(&specific)
                .map(|v| (specific, v))
                .or_else(|| var(&general).map(|v| (general, v)))
        };
        // The trace endpoint is used as given; the general one gets the signal's path.
        let url = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var(super::ENDPOINT),
        ) {
            (Some(url), _) => url,
            (None, Some(base)) => format!("{}/v1/traces", base.trim().trim_end_matches('/')),
            (None, None) => "http://localhost:4318/v1/traces".to_owned(),
        };
        let url = reqwest::Url::parse(url.trim())
            .map_err(|e| OtelError(format!("trace endpoint {url}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OtelError(format!(
                "trace endpoint {url}: only http:// and https:// are supported"
            )));
        }
        if let Some((name, protocol)) = pick("PROTOCOL") {
            if protocol.trim() != "http/protobuf" {
                return Err(OtelError(format!(
                    "{name}={protocol}: only http/protobuf is supported"
                )));
            }
        }
        if let Some((name, compression)) = pick("COMPRESSION") {
            if compression.trim() != "none" {
                return Err(OtelError(format!(
                    "{name}={compression}: compression is not supported (none only)"
                )));
            }
        }
        let headers = match pick("HEADERS") {
            Some((name, list)) => {
                parse_headers(&list).map_err(|e| OtelError(format!("{name}: {e}")))?
            }
            None => HeaderMap::new(),
        };
        let number = |name: String, value: String| {
            value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| OtelError(format!("{name}={value}: not a positive whole number")))
        };
        let timeout = match pick("TIMEOUT") {
            Some((name, ms)) => Duration::from_millis(number(name, ms)?),
            None => DEFAULT_TIMEOUT,
        };
        let bsp = |name: &str| var(name).map(|v| number(name.to_owned(), v)).transpose();
        let queue = bsp("OTEL_BSP_MAX_QUEUE_SIZE")?.map_or(DEFAULT_QUEUE, |n| n as usize);
        // A batch larger than the queue could never fill: the specification caps it.
        let batch = bsp("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")?
            .map_or(DEFAULT_BATCH, |n| n as usize)
            .min(queue);
        let delay = bsp("OTEL_BSP_SCHEDULE_DELAY")?.map_or(DEFAULT_DELAY, Duration::from_millis);
        Ok(Self {
            url,
            headers,
            timeout,
            batch,
            queue,
            delay,
        })
    }
}

/// `key=value,key2=value2`, values percent-encoded (the OTLP exporter specification).
fn parse_headers(list: &str) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let value = percent_decode_str(value.trim())
            .decode_utf8()
            .map_err(|e| format!("{key}: {e}"))?;
        let name = HeaderName::from_bytes(key.trim().as_bytes())
            .map_err(|_| format!("{key:?} is not a header name"))?;
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("the value of {key} is not a header value"))?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Encoded spans: the pending batch being written, or one on its way.
#[derive(Debug, Default)]
struct Batch {
    spans: Vec<u8>,
    count: usize,
}

impl Batch {
    /// The spans written so far, leaving an empty batch of the same capacity.
    fn take(&mut self) -> Option<Batch> {
        if self.count == 0 {
            return None;
        }
        // The next batch likely needs what this one took.
        let capacity = self.spans.len();
        Some(Batch {
            spans: std::mem::replace(&mut self.spans, Vec::with_capacity(capacity)),
            count: std::mem::take(&mut self.count),
        })
    }
}

/// The span export: the recorder writes each span into the pending batch; a thread of
/// its own posts full batches (and, after the schedule delay, whatever is pending) as
/// OTLP export requests.
#[derive(Debug)]
pub struct SpanQueue {
    pending: Arc<Mutex<Batch>>,
    /// None once shut down.
    queue: Mutex<Option<SyncSender<Batch>>>,
    sender: Mutex<Option<JoinHandle<()>>>,
    dropped: Arc<AtomicU64>,
    /// Set at shutdown: spans pushed after it are dropped, and the sender stops trying a
    /// collector that has failed.
    closed: Arc<AtomicBool>,
    batch: usize,
}

impl SpanQueue {
    /// Starts the sender, for spans of `resource` in the instrumentation scope `scope`.
    pub fn start(
        target: SpanTarget,
        resource: &Resource,
        scope: &'static str,
    ) -> Result<Self, OtelError> {
        let pending = Arc::new(Mutex::new(Batch::default()));
        let dropped = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let batch = target.batch;
        // The queue in whole batches, the one being filled included.
        let (tx, rx) = sync_channel::<Batch>((target.queue / batch).saturating_sub(1).max(1));
        let sender = Sender {
            target,
            resource: EncodedResource::new(resource),
            scope,
            pending: pending.clone(),
            dropped: dropped.clone(),
            closed: closed.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("kube-gateway-otlp".into())
            .spawn(move || sender.run(rx))
            .map_err(|e| OtelError(format!("span sender thread: {e}")))?;
        Ok(Self {
            pending,
            queue: Mutex::new(Some(tx)),
            sender: Mutex::new(Some(handle)),
            dropped,
            closed,
            batch,
        })
    }

    /// Adds the span `write` appends (see [`protobuf::span`](super::protobuf::span)).
    pub fn push(&self, write: impl FnOnce(&mut Vec<u8>)) {
        if self.closed.load(Ordering::Relaxed) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let full = {
            let Ok(mut pending) = self.pending.lock() else {
                return;
            };
            write(&mut pending.spans);
            pending.count += 1;
            if pending.count < self.batch {
                return;
            }
            pending.take()
        };
        if let Some(batch) = full {
            self.send(batch);
        }
    }

    fn send(&self, batch: Batch) {
        let count = batch.count;
        let sent = match self.queue.lock() {
            Ok(queue) => match queue.as_ref() {
                Some(tx) => tx.try_send(batch).is_ok(),
                None => false,
            },
            Err(_) => false,
        };
        if !sent {
            let before = self.dropped.fetch_add(count as u64, Ordering::Relaxed);
            if before == 0 {
                tracing::warn!(
                    spans = count,
                    "OpenTelemetry: the span export is behind (collector slow or away): spans dropped"
                );
            }
        }
    }

    /// Spans dropped so far because the export was behind or had failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends what is pending and waits for the sender to finish (at shutdown).
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let rest = self.pending.lock().ok().and_then(|mut p| p.take());
        if let Some(batch) = rest {
            self.send(batch);
        }
        // Closing the queue ends the sender once it has sent what is queued.
        if let Ok(mut queue) = self.queue.lock() {
            queue.take();
        }
        let handle = self.sender.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::warn!("OpenTelemetry: the span sender panicked");
            }
        }
        // A span pushed while this ran is counted, not lost without a trace.
        let late = self.pending.lock().ok().and_then(|mut p| p.take());
        if let Some(batch) = late {
            self.dropped
                .fetch_add(batch.count as u64, Ordering::Relaxed);
        }
        let dropped = self.dropped();
        if dropped > 0 {
            tracing::warn!(spans = dropped, "OpenTelemetry: spans dropped in all");
        }
    }
}

/// The sender thread's side.
struct Sender {
    target: SpanTarget,
    resource: EncodedResource,
    scope: &'static str,
    pending: Arc<Mutex<Batch>>,
    dropped: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
}

/// At shutdown a post waits this long at most: stopping is not held up for the export
/// timeout once per queued batch.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

impl Sender {
    fn run(self, rx: Receiver<Batch>) {
        // Built (and dropped) here: the blocking client runs a runtime of its own, which
        // must not live inside the gateway's.
        let client = match Client::builder().timeout(self.target.timeout).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "OpenTelemetry: no HTTP client: spans are not exported");
                return;
            }
        };
        let mut failing = false;
        loop {
            let batch = match rx.recv_timeout(self.target.delay) {
                Ok(batch) => Some(batch),
                Err(RecvTimeoutError::Timeout) => {
                    self.pending.lock().ok().and_then(|mut p| p.take())
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let Some(batch) = batch else { continue };
            let closing = self.closed.load(Ordering::Relaxed);
            if closing && failing {
                self.dropped
                    .fetch_add(batch.count as u64, Ordering::Relaxed);
                continue;
            }
            let timeout = if closing {
                self.target.timeout.min(SHUTDOWN_TIMEOUT)
            } else {
                self.target.timeout
            };
            match self.post(&client, &batch, timeout) {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("OpenTelemetry: span export works again");
                }
                Ok(()) => {}
                Err(e) => {
                    self.dropped
                        .fetch_add(batch.count as u64, Ordering::Relaxed);
                    if !failing {
                        failing = true;
                        tracing::warn!(error = %e, spans = batch.count, "OpenTelemetry: span export failed: spans dropped");
                    }
                }
            }
        }
    }

    fn post(&self, client: &Client, batch: &Batch, timeout: Duration) -> Result<(), String> {
        let mut body = Vec::with_capacity(batch.spans.len() + 512);
        export_request(&mut body, &self.resource, self.scope, &batch.spans);
        let response = client
            .post(self.target.url.clone())
            .headers(self.target.headers.clone())
            .header(CONTENT_TYPE, "application/x-protobuf")
            .timeout(timeout)
            .body(body)
            .send()
            .map_err(|e| format!("{}: {e}", self.target.url))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().unwrap_or_default();
        Err(format!(
            "{}: {status} {}",
            self.target.url,
            text.chars().take(200).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::time::{Instant, UNIX_EPOCH};

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    use super::super::protobuf::{span, SpanFields};
    use super::*;

    /// An OTLP/HTTP receiver answering `status` to each request, keeping the bodies.
    fn receiver(status: u16) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut conn = conn;
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let lower = line.to_ascii_lowercase();
                            if let Some(v) = lower.strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).unwrap();
                        kept.lock().unwrap().push(body);
                        let head = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                        if conn.write_all(head.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, bodies)
    }

    fn queue(url: &str) -> SpanQueue {
        let target = SpanTarget::from_vars(|name| match name {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some(url.to_owned()),
            "OTEL_BSP_SCHEDULE_DELAY" => Some("300".to_owned()),
            _ => None,
        })
        .unwrap();
        let resource = Resource::builder()
            .with_service_name("kube-gateway")
            .build();
        SpanQueue::start(target, &resource, "kube-gateway").unwrap()
    }

    fn push(q: &SpanQueue, n: u8) {
        let f = SpanFields {
            trace_id: [n; 16],
            span_id: [n; 8],
            name: "chat gemma2:2b",
            start: UNIX_EPOCH,
            end: UNIX_EPOCH,
            shared: &[],
            attributes: &[],
            events: &[],
            error: None,
        };
        q.push(|out| span(out, &f));
    }

    /// The spans in each request received.
    fn spans(bodies: &Mutex<Vec<Vec<u8>>>) -> Vec<usize> {
        bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                let r = ExportTraceServiceRequest::decode(b.as_slice()).unwrap();
                r.resource_spans[0].scope_spans[0].spans.len()
            })
            .collect()
    }

    #[test]
    fn a_full_batch_goes_at_once_the_rest_on_the_timer_and_nothing_is_left_at_shutdown() {
        let (url, bodies) = receiver(200);
        let q = queue(&url);
        for i in 0..DEFAULT_BATCH + 3 {
            push(&q, i as u8);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while spans(&bodies) != [DEFAULT_BATCH, 3] {
            assert!(Instant::now() < deadline, "sent: {:?}", spans(&bodies));
            std::thread::sleep(Duration::from_millis(20));
        }
        push(&q, 1);
        q.shutdown();
        assert_eq!(spans(&bodies), [DEFAULT_BATCH, 3, 1]);
        assert_eq!(q.dropped(), 0);
        // After shutdown a span is dropped and counted, never sent nor blocking.
        push(&q, 2);
        for _ in 0..DEFAULT_BATCH {
            push(&q, 3);
        }
        assert_eq!(q.dropped(), DEFAULT_BATCH as u64 + 1);
    }

    #[test]
    fn spans_a_collector_refuses_or_cannot_take_are_counted_as_dropped() {
        let (url, bodies) = receiver(503);
        let q = queue(&url);
        for i in 0..2 * DEFAULT_BATCH + 5 {
            push(&q, i as u8);
        }
        q.shutdown();
        // Tried (not necessarily each batch: once stopping, a failed collector is not
        // tried again), and every span counted.
        let tried = spans(&bodies);
        assert!(!tried.is_empty() && tried.iter().all(|n| *n == DEFAULT_BATCH || *n == 5));
        assert_eq!(q.dropped(), 2 * DEFAULT_BATCH as u64 + 5);

        // Nobody listening.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let q = queue(&format!("http://127.0.0.1:{port}/v1/traces"));
        for i in 0..7 {
            push(&q, i);
        }
        q.shutdown();
        assert_eq!(q.dropped(), 7);
    }

    #[test]
    fn a_collector_that_never_answers_holds_shutdown_for_two_seconds_not_the_export_timeout() {
        // Accepts and keeps connections, reads nothing, answers nothing.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let held: Vec<_> = listener.incoming().flatten().collect();
            drop(held);
        });
        let q = queue(&url);
        assert_eq!(
            q_timeout(&url),
            Duration::from_secs(10),
            "the default export timeout"
        );
        for i in 0..5 {
            push(&q, i);
        }
        let started = Instant::now();
        q.shutdown();
        let took = started.elapsed();
        assert!(
            took >= SHUTDOWN_TIMEOUT && took < Duration::from_secs(6),
            "shutdown took {took:?}"
        );
        assert_eq!(q.dropped(), 5);
    }

    fn q_timeout(url: &str) -> Duration {
        target(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)])
            .unwrap()
            .timeout
    }

    fn target(vars: &[(&str, &str)]) -> Result<SpanTarget, OtelError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        SpanTarget::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_general_endpoint_gets_the_traces_path_and_the_specific_one_is_used_as_given() {
        let general = target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]);
        assert_eq!(
            general.unwrap().url.as_str(),
            "http://collector:4318/v1/traces"
        );
        let specific = target(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://wrong:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://collector/custom",
            ),
        ]);
        assert_eq!(specific.unwrap().url.as_str(), "https://collector/custom");
        let e = target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]).unwrap_err();
        assert!(e.to_string().contains("collector:4318"), "{e}");
    }

    #[test]
    fn headers_and_timeout_come_from_the_specific_variable_first() {
        let t = target(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-general=1"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "api-key=a%20b%3Dc, x-tenant = t1",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ])
        .unwrap();
        assert_eq!(t.headers.get("api-key").unwrap(), "a b=c");
        assert_eq!(t.headers.get("x-tenant").unwrap(), "t1");
        assert!(t.headers.get("x-general").is_none());
        assert_eq!(t.timeout, Duration::from_millis(2500));
        let defaults = target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c")]).unwrap();
        assert_eq!(defaults.timeout, DEFAULT_TIMEOUT);
        assert_eq!(
            (defaults.batch, defaults.queue, defaults.delay),
            (DEFAULT_BATCH, DEFAULT_QUEUE, DEFAULT_DELAY)
        );
        let bsp = target(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
        ])
        .unwrap();
        // A batch never exceeds the queue.
        assert_eq!(
            (bsp.batch, bsp.queue, bsp.delay),
            (100, 100, Duration::from_millis(250))
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_an_error_naming_the_variable() {
        for (var, value, says) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "only http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
                "gzip",
                "not supported",
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "no-equals-sign",
                "not key=value",
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "10s",
                "positive whole number",
            ),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0", "positive whole number"),
            ("OTEL_BSP_SCHEDULE_DELAY", "-1", "positive whole number"),
        ] {
            let e = target(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"), (var, value)])
                .unwrap_err()
                .to_string();
            assert!(e.contains(var) && e.contains(says), "{var}={value}: {e}");
        }
        let ok = target(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ]);
        assert!(ok.is_ok());
    }
}
