//! kube-gateway: a transparent LLM guardrail proxy. It recognizes OpenAI and Ollama API
//! calls on intercepted connections, applies the configured rewrites, forwards them to
//! their original destination, streams answers back unbuffered, and records usage.

pub mod admin;
pub mod api;
pub mod budget;
pub mod cli;
pub mod config;
pub mod drain;
pub mod error;
pub mod guard;
pub mod http;
pub mod listener;
pub mod meter;
pub mod metrics;
pub mod netflush;
pub mod orig_dst;
pub mod otel;
pub mod policy;
pub mod relay;
pub mod runtime;
pub mod sniff;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod upstream;
pub mod usage;

pub use config::{Config, Destination, Limits, UpstreamMode};
pub use listener::{Gateway, Shared, StartError};
pub use usage::{Outcome, TokenSource, UsageRecord};
