//! kube-gateway: a transparent LLM guardrail proxy. It recognizes OpenAI and Ollama API
//! calls on intercepted connections, applies the configured rewrites, forwards them to
//! their original destination, streams answers back unbuffered, and records usage.
//!
//! A request goes one way through the modules: `listener` (accept, sniff) -> `http`
//! (server side, proxy) -> `api` (dialect, typed request) -> `guard` (policy) and
//! `budget` (admission) -> `upstream` -> `meter` (each response frame, once) ->
//! `recorder` -> sinks: `store`, `telemetry` and the `access` log, which never import each other. `record`
//! is the leaf they all share. `app` wires the parts; `runtime` runs them.

pub mod accept;
pub mod access;
pub mod admin;
pub mod alloc;
pub mod api;
pub mod app;
pub mod budget;
pub mod cli;
pub mod config;
pub mod drain;
pub mod error;
pub mod estimate;
pub mod guard;
pub mod http;
pub mod listener;
pub mod live;
pub mod logging;
pub mod meter;
pub mod netflush;
pub mod netns;
pub mod node;
pub mod orig_dst;
pub mod policy;
pub mod record;
pub mod recorder;
pub mod relay;
pub mod report;
pub mod runtime;
pub mod sniff;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod upstream;

pub use app::{Shared, StartError};
pub use config::{Config, Destination, Limits, UpstreamMode};
pub use listener::Gateway;
pub use record::{Outcome, TokenSource, UsageRecord};
