//! The policy model of kube-gateway and its evaluation. Pure: no sockets, no async
//! runtime, no Kubernetes; the gateway feeds it text and applies its decisions.

pub mod detect;
pub mod matcher;
pub mod model;
pub mod response;
pub mod tokens;

pub use model::{ModelRewrite, ModelRewriteError, RewriteRule};
pub use tokens::{Encoding, TokenCounter};
