//! The policy model of kube-gateway and its evaluation. Pure: no sockets, no async
//! runtime, no Kubernetes; the gateway feeds it text and applies its decisions.

pub mod budget;
pub mod compiled;
pub mod detect;
pub mod doc;
pub mod limits;
pub mod load;
pub mod matcher;
pub mod model;
pub mod prompt;
pub mod response;
mod starts;
pub mod tokens;

pub use compiled::{Format, Policy};
pub use load::{load, PolicyError, PolicyErrors};
pub use model::{
    ModelDecision, ModelPattern, ModelRewrite, ModelRewriteError, ModelRules, RewriteRule, Split,
};
pub use prompt::{PromptAction, Role};
pub use response::{Emit, Released, ResponseFilter, ResponseRules};
pub use tokens::{Encoding, TokenCounter};
