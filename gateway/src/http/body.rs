//! Response bodies sent to clients: the gateway's own answers, and upstream bodies that
//! pass through a meter chunk by chunk and leave a usage record when they end, fail or
//! are abandoned by the client.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use std::sync::Arc;

use crate::budget::Ledger;
use crate::meter::Meter;
use crate::record::Outcome;
use crate::recorder::{Exchange, Recorder};
use crate::upstream::root_cause;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the gateway answers with.
pub enum ProxyBody {
    Full(Full<Bytes>),
    Metered(Box<MeteredBody>),
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::Full(Full::new(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(f) => Pin::new(f).poll_frame(cx).map_err(|never| match never {}),
            ProxyBody::Metered(m) => Pin::new(m.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(f) => f.is_end_stream(),
            ProxyBody::Metered(m) => m.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(f) => f.size_hint(),
            ProxyBody::Metered(m) => m.size_hint(),
        }
    }
}

/// Where a finished exchange goes.
#[derive(Clone)]
pub struct Sink {
    pub recorder: Recorder,
    /// Settles the exchange's budget reservation the moment the answer ends.
    pub ledger: Option<Arc<Ledger>>,
}

/// An upstream body on its way to the client.
pub struct MeteredBody {
    inner: Incoming,
    /// `None` for traffic the gateway does not read (bytes are only counted).
    meter: Option<Meter>,
    /// Whether frames may be reshaped (stream formats); else sizes pass unchanged.
    reframes: bool,
    started: Instant,
    first_chunk: Option<Duration>,
    bytes_out: u64,
    exchange: Option<Exchange>,
    sink: Sink,
    done: bool,
    idle_timeout: Duration,
    /// When the upstream last sent something (or the body began).
    last_heard: tokio::time::Instant,
    /// Fires when the upstream has been silent for `idle_timeout`. Armed only when the
    /// body has to wait: an answer that is already there never touches the timer wheel.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl MeteredBody {
    pub fn new(
        inner: Incoming,
        meter: Option<Meter>,
        reframes: bool,
        started: Instant,
        exchange: Exchange,
        sink: Sink,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            sink,
            idle_timeout,
            last_heard: tokio::time::Instant::now(),
            idle: None,
            inner,
            meter,
            reframes,
            started,
            first_chunk: None,
            bytes_out: 0,
            exchange: Some(exchange),
            done: false,
        }
    }

    fn finish(&mut self, outcome: Option<Outcome>, error: Option<String>) {
        let Some(mut ex) = self.exchange.take() else {
            return;
        };
        if let Some(o) = outcome {
            ex.outcome = o;
        }
        if error.is_some() {
            ex.error = error;
        }
        ex.latency = self.started.elapsed();
        ex.first_chunk = self.first_chunk;
        ex.bytes_out = self.bytes_out;
        let counted = self.meter.as_ref().and_then(Meter::counted_output);
        if let Some(mut m) = self.meter.take() {
            if let Some(r) = m.take_reservation() {
                ex.reservation = Some(r);
            }
            ex.collected = m.collected;
        }
        // Budgets see what this answer used now, not at the recorder's next tick: the
        // next request may already be waiting. Without any count yet, the recorder
        // settles with its estimate.
        if let (Some(ledger), Some(r)) = (&self.sink.ledger, ex.reservation.take()) {
            let u = &ex.collected.usage;
            match u.output.or(counted) {
                Some(output) => ledger.settle(&r, u.input.unwrap_or(r.input_estimate()), output),
                None => ex.reservation = Some(r),
            }
        }
        let c = &mut ex.collected;
        if c.blocked {
            ex.outcome = Outcome::Blocked;
        } else if c.budget_cut {
            ex.outcome = Outcome::BudgetCut;
        } else if !c.policy_hits.is_empty() && ex.outcome == Outcome::Allowed {
            ex.outcome = Outcome::Redacted;
        }
        ex.rules.append(&mut c.policy_hits);
        self.sink.recorder.record(ex);
    }

    /// Ends the answer after an upstream failure: a stream gets a well-formed error
    /// frame; any other body is cut, since aborting is the only honest signal there.
    fn fail(&mut self, reason: String) -> Option<Result<Frame<Bytes>, BoxError>> {
        tracing::warn!(error = %reason, "upstream body failed");
        self.done = true;
        let end = self
            .meter
            .as_mut()
            .and_then(|m| m.on_upstream_error(&reason));
        self.finish(Some(Outcome::UpstreamError), Some(reason.clone()));
        Some(match end {
            Some(frame) => Ok(self.emit(frame)),
            None => Err(reason.into()),
        })
    }

    fn emit(&mut self, data: Bytes) -> Frame<Bytes> {
        self.bytes_out += data.len() as u64;
        Frame::data(data)
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(item) => item,
                Poll::Pending => {
                    let deadline = this.last_heard + this.idle_timeout;
                    let idle = match &mut this.idle {
                        Some(idle) => {
                            if idle.deadline() != deadline {
                                idle.as_mut().reset(deadline);
                            }
                            idle
                        }
                        None => this
                            .idle
                            .insert(Box::pin(tokio::time::sleep_until(deadline))),
                    };
                    if idle.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(this.fail(format!(
                            "upstream sent nothing for {:?}; answer ended",
                            this.idle_timeout
                        )));
                    }
                    return Poll::Pending;
                }
            };
            this.last_heard = tokio::time::Instant::now();
            match polled {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    if this.first_chunk.is_none() {
                        this.first_chunk = Some(this.started.elapsed());
                    }
                    let out = match this.meter.as_mut() {
                        Some(m) => m.on_data(data),
                        None => data,
                    };
                    if this.meter.as_ref().is_some_and(Meter::is_ended) {
                        // A response rule ended the answer: end the body here; dropping
                        // the upstream body closes that connection.
                        this.done = true;
                        this.finish(None, None);
                        return Poll::Ready((!out.is_empty()).then(|| Ok(this.emit(out))));
                    }
                    // A frame the meter is still completing sends nothing yet.
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(this.emit(out))));
                    }
                }
                Some(Err(e)) => {
                    let reason = format!("upstream failed mid-answer: {}", root_cause(&e));
                    tracing::warn!(error = %reason, "upstream body failed");
                    this.done = true;
                    let end = this
                        .meter
                        .as_mut()
                        .and_then(|m| m.on_upstream_error(&reason));
                    this.finish(Some(Outcome::UpstreamError), Some(reason));
                    return Poll::Ready(match end {
                        Some(frame) => Some(Ok(this.emit(frame))),
                        // Not a stream: aborting the connection is the only honest signal.
                        None => Some(Err(e.into())),
                    });
                }
                None => {
                    this.done = true;
                    let rest = this.meter.as_mut().map(Meter::on_end).unwrap_or_default();
                    let frame = (!rest.is_empty()).then(|| this.emit(rest));
                    this.finish(None, None);
                    return Poll::Ready(frame.map(Ok));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (!self.reframes && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.reframes {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if self.exchange.is_none() {
            return;
        }
        if !self.reframes && self.inner.is_end_stream() {
            // hyper stops polling a body that says it has ended (a Content-Length body
            // after its last byte, or an empty one): it ended normally, read it.
            if let Some(m) = self.meter.as_mut() {
                // Only framed streams hold bytes back, and those never end here.
                let _ = m.on_end();
            }
            self.finish(None, None);
        } else {
            // Dropped before its end: the client went away. The record still goes out.
            self.finish(
                Some(Outcome::ClientCancelled),
                Some("client closed the connection".into()),
            );
        }
    }
}
