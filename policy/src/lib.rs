//! The policy model of kube-gateway and its evaluation. Pure: no sockets, no async
//! runtime, no Kubernetes; the gateway feeds it text and applies its decisions.

pub mod detect;
pub mod limits;
pub mod matcher;
pub mod model;
pub mod prompt;
pub mod response;
pub mod tokens;

pub use model::{
    ModelDecision, ModelPattern, ModelRewrite, ModelRewriteError, ModelRules, RewriteRule, Split,
};
pub use tokens::{Encoding, TokenCounter};
