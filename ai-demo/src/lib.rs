//! The demo LLM server: a deterministic stand-in for Ollama and OpenAI-compatible
//! servers, speaking every endpoint kube-gateway recognizes, streaming and not, with
//! exact tiktoken usage so tests can hold the gateway to it (or, with its own tokenizer,
//! usage no tiktoken estimate matches, like an open model's server). Also the local demo
//! driver.

// A test double, not the product: its tasks end with their connection or the process.
#![allow(clippy::disallowed_methods)]

pub mod body;
pub mod local;
pub mod ollama;
pub mod openai;
pub mod server;
pub mod text;
pub mod tokenizer;
pub mod ttfc;

pub use server::{serve, spawn, DemoConfig, DemoServer, RequestLog};
pub use tokenizer::Tokenizer;
