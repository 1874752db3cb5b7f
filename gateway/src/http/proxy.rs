//! The proxy service: one call per HTTP request. Recognized LLM calls are read, rewritten
//! where the configuration says, forwarded and metered; everything else is forwarded as
//! it came, protocol upgrades included.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{MeteredBody, ProxyBody, Sink};
use super::headers::{is_upgrade, strip_hop_by_hop};
use crate::api::{Endpoint, LlmRequest};
use crate::app::Shared;
use crate::budget::{AdmitError, Ledger};
use crate::config::{Config, Destination};
use crate::error::GatewayError;
use crate::guard;
use crate::meter::{Bounds, BudgetCut, Format, Meter, ESTIMATE_TEXT_BYTES};
use crate::policy::PolicyStore;
use crate::record::{Identity, Outcome};
use crate::recorder::{Exchange, Recorder};
use crate::upstream::Affinity;
use crate::upstream::{Upstream, UpstreamBody};
use kube_gateway_policy::budget::Subject;
use kube_gateway_policy::{Policy, TokenCounter};

/// Shared by every connection of a gateway.
pub struct Proxy {
    config: Arc<Config>,
    /// Whose traffic this proxy serves (one pod's, in node mode).
    identity: Arc<Identity>,
    policy: Arc<PolicyStore>,
    ledger: Arc<Ledger>,
    tokens: TokenCounter,
    upstream: Arc<Upstream>,
    recorder: Recorder,
    next_seq: AtomicU64,
}

/// The connection a request arrived on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The destination as text, for records, formatted once per connection.
    pub destination_name: Arc<str>,
    /// This client connection's upstream connection.
    pub upstream: Affinity,
}

impl Proxy {
    /// How this proxy connects upstream.
    pub fn dialer(&self) -> &crate::upstream::Dialer {
        self.upstream.dialer()
    }

    /// The state of a new client connection to `destination`.
    pub fn connection(&self, peer: SocketAddr, destination: Destination) -> ConnInfo {
        ConnInfo {
            peer,
            destination_name: Arc::from(destination.as_str()),
            upstream: self.upstream.affinity(destination),
        }
    }

    /// A proxy for serving thread `worker` of a gateway, serving `identity` under
    /// `policy` through `upstream`. Request ids carry the worker in their top bits:
    /// threads (and pods) share one id prefix and must never hand out the same id.
    pub fn new(
        shared: &Shared,
        policy: Arc<PolicyStore>,
        identity: Arc<Identity>,
        upstream: Arc<Upstream>,
        worker: u16,
    ) -> Self {
        Self {
            config: shared.config.clone(),
            identity,
            policy,
            ledger: shared.ledger.clone(),
            tokens: shared.tokens.clone(),
            upstream,
            recorder: shared.recorder.clone(),
            next_seq: AtomicU64::new(u64::from(worker) << 48),
        }
    }

    fn exchange(&self, parts: &Parts, conn: &ConnInfo, endpoint: Option<Endpoint>) -> Exchange {
        Exchange {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            workload: self.identity.clone(),
            started_at: SystemTime::now(),
            peer: conn.peer,
            destination: conn.destination_name.clone(),
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            endpoint,
            requested_model: None,
            used_model: None,
            request: None,
            streamed: false,
            status: 0,
            outcome: Outcome::Allowed,
            error: None,
            bytes_in: 0,
            bytes_out: 0,
            latency: Default::default(),
            first_chunk: None,
            collected: Default::default(),
            rules: Vec::new(),
            encoding: None,
            reservation: None,
        }
    }

    /// Handles one request. Never fails: errors become answers in the caller's dialect.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let started = Instant::now();
        match Endpoint::classify(req.method(), req.uri().path()) {
            Some(endpoint) => self.llm(req, endpoint, conn, started).await,
            None => self.other(req, conn, started).await,
        }
    }

    fn reject(
        &self,
        mut ex: Exchange,
        err: GatewayError,
        started: Instant,
        outcome: Outcome,
    ) -> Response<ProxyBody> {
        tracing::debug!(error = %err, "request answered by the gateway");
        let resp: Response<ProxyBody> = err.response(ex.endpoint.map(Endpoint::dialect));
        ex.status = resp.status().as_u16();
        ex.outcome = outcome;
        ex.error = Some(err.to_string());
        ex.latency = started.elapsed();
        self.recorder.record(ex);
        resp
    }

    fn upstream_request(
        &self,
        mut parts: Parts,
        body: UpstreamBody,
        conn: &ConnInfo,
        keep_upgrade: bool,
    ) -> Result<Request<UpstreamBody>, GatewayError> {
        // Origin-form on a connection of its own; the client's Host says which site.
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(path).map_err(|e| GatewayError::Internal(e.to_string()))?;
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers, keep_upgrade);
        // The body was already accepted from the client: do not ask the upstream again.
        parts.headers.remove(header::EXPECT);
        if !parts.headers.contains_key(header::HOST) {
            let host = HeaderValue::from_str(conn.upstream.destination().as_str())
                .map_err(|e| GatewayError::Internal(e.to_string()))?;
            parts.headers.insert(header::HOST, host);
        }
        Ok(Request::from_parts(parts, body))
    }

    /// Budget admission: the prompt's estimated tokens and what the answer may generate
    /// must fit every applicable budget; the reservation rides with the exchange.
    async fn admit(
        &self,
        policy: &Policy,
        req: &LlmRequest,
        ex: &mut Exchange,
    ) -> Result<(), GatewayError> {
        let model = req.model.clone().unwrap_or_default();
        let id = &self.identity;
        let who = Subject {
            namespace: &id.namespace,
            pod: &id.pod,
            model: &model,
        };
        let encoding = ex.encoding.unwrap_or_else(|| policy.encoding_for(&model));
        let input = self.tokens.count(encoding, &req.prompt_text()).unwrap_or(0);
        match self
            .ledger
            .admit_leasing(&policy.budgets, &who, input, req.max_tokens())
            .await
        {
            Ok(reservation) => {
                ex.reservation = Some(reservation);
                Ok(())
            }
            Err(AdmitError::Exhausted(e)) => {
                ex.rules.push(e.budget.clone());
                Err(GatewayError::BudgetExhausted {
                    budget: e.budget,
                    retry_after: e.retry_after,
                })
            }
            Err(AdmitError::Unavailable { budget, error }) => {
                Err(GatewayError::BudgetUnavailable {
                    budget,
                    reason: error.to_string(),
                })
            }
        }
    }

    async fn llm(
        &self,
        req: Request<Incoming>,
        endpoint: Endpoint,
        conn: &ConnInfo,
        started: Instant,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let mut ex = self.exchange(&parts, conn, Some(endpoint));
        let limit = self.config.limits.body_bytes;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return self.reject(
                ex,
                GatewayError::BodyTooLarge { limit },
                started,
                Outcome::Rejected,
            );
        }
        let timeout = self.config.limits.body_timeout;
        let read = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
        let Ok(read) = read else {
            // A client trickling its body holds a connection and a buffer: bounded.
            let err = GatewayError::BodyTimeout { timeout };
            return self.reject(ex, err, started, Outcome::Rejected);
        };
        let original = match read {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return self.reject(
                    ex,
                    GatewayError::BodyTooLarge { limit },
                    started,
                    Outcome::Rejected,
                )
            }
            Err(e) => {
                let err = GatewayError::ClientBody(crate::upstream::root_cause(e.as_ref()));
                return self.reject(ex, err, started, Outcome::Rejected);
            }
        };
        ex.bytes_in = original.len() as u64;

        let mut hide_usage = false;
        let policy = self.policy.current();
        let body = match LlmRequest::parse(endpoint, original.clone()) {
            Ok(mut parsed) => {
                ex.requested_model = parsed.model.clone();
                ex.streamed = parsed.stream;
                // A retried request (same id, or same body) lands on the same split target.
                let key = parts
                    .headers
                    .get("x-request-id")
                    .map_or(&original[..], |v| v.as_bytes());
                match guard::request::apply(&policy, &mut parsed, key) {
                    Ok(applied) => {
                        if !applied.edits.is_empty() {
                            ex.outcome = Outcome::Redacted;
                            ex.rules.extend(applied.edits);
                        }
                        ex.encoding = Some(applied.encoding);
                    }
                    Err(guard::request::Denied { rule, what }) => {
                        ex.rules.push(rule.clone());
                        ex.request = Some(parsed);
                        let denial = GatewayError::PolicyDenied { rule, what };
                        return self.reject(ex, denial, started, Outcome::Denied);
                    }
                }
                // The model the request goes to, also on the record of one a budget refuses
                // (its usage row and metrics then name the model that was asked for).
                ex.used_model = parsed.model.clone();
                if !policy.budgets.is_empty() {
                    if let Err(denial) = self.admit(&policy, &parsed, &mut ex).await {
                        ex.request = Some(parsed);
                        return self.reject(ex, denial, started, Outcome::Denied);
                    }
                }
                hide_usage = parsed.ensure_stream_usage();
                let body = parsed.body();
                ex.request = Some(parsed);
                body
            }
            // Prompt rules cannot judge what they cannot read: under them a body that
            // is not JSON is refused, or it would reach a lenient server unseen.
            Err(e) if self.config.fail_closed || !policy.prompt.is_empty() => {
                return self.reject(
                    ex,
                    GatewayError::MalformedJson(e.to_string()),
                    started,
                    Outcome::Rejected,
                );
            }
            Err(e) => {
                tracing::debug!(error = %e, path = %parts.uri.path(), "unparsed body forwarded unchanged");
                ex.outcome = Outcome::Unparsed;
                original
            }
        };
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let upstream_req =
            match self.upstream_request(parts, Either::Left(Full::new(body)), conn, false) {
                Ok(r) => r,
                Err(e) => return self.reject(ex, e, started, Outcome::UpstreamError),
            };
        let resp = match conn.upstream.send(upstream_req).await {
            Ok(resp) => resp,
            Err(e) => return self.reject(ex, e, started, Outcome::UpstreamError),
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let format = Format::from_content_type(
            parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        );
        if format.is_stream() {
            ex.streamed = true;
        }
        ex.status = parts.status.as_u16();
        // Response rules apply to successful answers; errors pass as they are.
        let rules = parts.status.is_success().then(|| policy.response.clone());
        // A stream draws its budgets as it goes; any other answer settles at its end.
        let cut = ex
            .reservation
            .take_if(|_| format.is_stream())
            .map(|reservation| BudgetCut {
                ledger: self.ledger.clone(),
                reservation,
                used: 0,
                tokens: self.tokens.clone(),
                encoding: ex
                    .encoding
                    .unwrap_or(kube_gateway_policy::Encoding::Cl100kBase),
            });
        let meter = Meter::with_rules(
            endpoint,
            format,
            hide_usage,
            Bounds {
                body: self.config.limits.response_bytes,
                event: self.config.limits.event_bytes,
                text: ESTIMATE_TEXT_BYTES,
            },
            rules,
        )
        .with_budget(cut);
        let reframes = meter.reframes();
        if reframes {
            // Frames may be reshaped (hidden usage, rules, an error frame at a failure).
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let body = MeteredBody::new(
            body,
            Some(meter),
            reframes,
            started,
            ex,
            Sink {
                recorder: self.recorder.clone(),
                ledger: Some(self.ledger.clone()),
            },
            self.config.limits.idle_timeout,
        );
        Response::from_parts(parts, ProxyBody::Metered(Box::new(body)))
    }

    async fn other(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        started: Instant,
    ) -> Response<ProxyBody> {
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let mut ex = self.exchange(&parts, conn, None);
        let upstream_req = match self.upstream_request(parts, Either::Right(body), conn, upgrade) {
            Ok(r) => r,
            Err(e) => return self.reject(ex, e, started, Outcome::UpstreamError),
        };
        let mut resp = match conn.upstream.send(upstream_req).await {
            Ok(resp) => resp,
            Err(e) => return self.reject(ex, e, started, Outcome::UpstreamError),
        };
        ex.status = resp.status().as_u16();
        if let (Some(client_up), http::StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, resp.status())
        {
            let upstream_up = hyper::upgrade::on(&mut resp);
            #[expect(
                clippy::disallowed_methods,
                reason = "an upgraded connection's relay: it ends when either side closes"
            )]
            tokio::spawn(async move {
                match tokio::try_join!(client_up, upstream_up) {
                    Ok((client, upstream)) => {
                        let (mut c, mut u) = (TokioIo::new(client), TokioIo::new(upstream));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
                }
            });
            let (parts, _) = resp.into_parts();
            ex.latency = started.elapsed();
            self.recorder.record(ex);
            return Response::from_parts(parts, ProxyBody::from(Bytes::new()));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let body = MeteredBody::new(
            body,
            None,
            false,
            started,
            ex,
            Sink {
                recorder: self.recorder.clone(),
                ledger: None,
            },
            self.config.limits.idle_timeout,
        );
        Response::from_parts(parts, ProxyBody::Metered(Box::new(body)))
    }
}
