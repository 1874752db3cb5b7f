//! Telemetry: the Prometheus series and the OTLP export (metrics and spans) side by
//! side, fed from the same finished records by the recorder, off the request path, so
//! the numbers are the ones the usage store gets. Labels shared by both are decided once
//! per kind of request ([`labels`]); neither sink drives the other. Gauges (budgets, the
//! store's queue) are read when collected through [`Gauges`], so telemetry imports
//! neither the ledger nor the store.

pub mod labels;
pub mod otel;
mod prometheus;

use std::sync::{Arc, Mutex};

use crate::api::Endpoint;
use crate::record::{Identity, Outcome, UsageRecord};

pub use labels::{ModelLabels, MAX_MODEL_LABELS};
pub use otel::{Otel, OtelError};
pub use prometheus::{DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS};

/// One budget's gauges: name, scope, what it counts, used and limit in its window.
pub type BudgetReading = (String, String, &'static str, u64, u64);

/// What the gauges read when they are collected (a scrape, an OTLP export).
pub trait Gauges: Send + Sync {
    /// Every limited measure of every budget key in its current window.
    fn budgets(&self) -> Vec<BudgetReading>;
    /// Records waiting for the store writer, and rows spooled and not yet replayed;
    /// `None` without a store.
    fn store(&self) -> Option<(usize, usize)>;
    /// Pods the node agent serves now.
    fn attached_pods(&self) -> usize;
    /// Client connections open now.
    fn open_connections(&self) -> usize;
}

/// The series handles and OTLP attributes of one kind of request, resolved once.
struct Series {
    workload: Arc<Identity>,
    endpoint: Endpoint,
    outcome: Outcome,
    requested: Option<String>,
    used: Option<String>,
    response: Option<String>,
    prometheus: prometheus::PromSeries,
    otel: Option<otel::SeriesAttributes>,
}

/// The gateway's telemetry sinks.
pub struct Telemetry {
    prometheus: prometheus::Prometheus,
    otel: Option<Arc<Otel>>,
    models: labels::ModelNames,
    /// Resolving a series means cloning and hashing every label (measured: ~7 µs a
    /// request on this machine's recorder, against well under one with the handles
    /// kept).
    cache: Mutex<Vec<Arc<Series>>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("otel", &self.otel.is_some())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Prometheus series for this gateway's namespace and pod, and the OTLP export when
    /// one is given.
    pub fn new(namespace: &str, pod: &str, otel: Option<Arc<Otel>>) -> Arc<Self> {
        Arc::new(Self {
            prometheus: prometheus::Prometheus::new(namespace, pod),
            otel,
            models: labels::ModelNames::default(),
            cache: Mutex::new(Vec::new()),
        })
    }

    pub fn otel(&self) -> Option<&Arc<Otel>> {
        self.otel.as_ref()
    }

    /// The series a request of this kind lands in, resolved once and kept.
    fn series(&self, r: &UsageRecord, endpoint: Endpoint) -> Arc<Series> {
        let same = |s: &Series| {
            s.endpoint == endpoint
                && s.outcome == r.outcome
                && (Arc::ptr_eq(&s.workload, &r.workload) || s.workload == r.workload)
                && s.requested.as_deref() == r.requested_model.as_deref()
                && s.used.as_deref() == r.used_model.as_deref()
                && s.response.as_deref() == r.response_model.as_deref()
        };
        let resolve = || {
            let labels = self.models.labels(r);
            Series {
                workload: r.workload.clone(),
                endpoint,
                outcome: r.outcome,
                requested: r.requested_model.clone(),
                used: r.used_model.clone(),
                response: r.response_model.clone(),
                prometheus: self.prometheus.series(r, &labels),
                otel: self
                    .otel
                    .as_ref()
                    .map(|o| o.attributes(r, endpoint, &labels)),
            }
        };
        let Ok(mut cache) = self.cache.lock() else {
            return Arc::new(resolve());
        };
        if let Some(s) = cache.iter().find(|s| same(s)) {
            return s.clone();
        }
        let s = Arc::new(resolve());
        // Models x outcomes x endpoints can still be many: start over rather than grow.
        if cache.len() >= 256 {
            cache.clear();
        }
        cache.push(s.clone());
        s
    }

    /// Records a finished request (from the recorder): its series, and with OTLP on its
    /// measurements and span. Traffic on other paths is not an LLM call: none of these.
    pub fn record(&self, r: &UsageRecord) {
        let Some(endpoint) = r.endpoint else { return };
        let s = self.series(r, endpoint);
        if let (Some(o), Some(a)) = (&self.otel, &s.otel) {
            o.measure(a, r);
            o.span(a, r);
        }
        self.prometheus.record(&s.prometheus, r);
    }

    /// A usage record was dropped: the recorder's queue was full.
    pub fn record_dropped(&self) {
        self.prometheus.record_dropped();
        if let Some(o) = &self.otel {
            o.record_dropped();
        }
    }

    /// A connection arrived with an original destination.
    pub fn captured(&self) {
        self.prometheus.captured();
        if let Some(o) = &self.otel {
            o.captured();
        }
    }

    /// A client connection was closed at accept: `--max-connections` were open.
    pub fn connection_refused(&self) {
        self.prometheus.connection_refused();
        if let Some(o) = &self.otel {
            o.connection_refused();
        }
    }

    /// Workload connections netflush destroyed.
    pub fn netflushed(&self, n: u64) {
        self.prometheus.netflushed(n);
        if let Some(o) = &self.otel {
            o.netflushed(n);
        }
    }

    /// The Prometheus text exposition, its gauges read from `live` now.
    pub fn scrape(&self, live: &dyn Gauges) -> String {
        self.prometheus.refresh(live);
        self.prometheus.encode()
    }

    /// The Prometheus text exposition as it stands (gauges as last read).
    pub fn encode(&self) -> String {
        self.prometheus.encode()
    }

    /// Sends what the OTLP export has batched (at shutdown).
    pub fn shutdown(&self) {
        if let Some(o) = &self.otel {
            o.shutdown();
        }
    }
}

#[cfg(test)]
mod tests;
