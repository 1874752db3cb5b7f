//! The policy document as written: `kube-gateway.io/v1alpha1` (YAML or JSON), and the
//! JSON format of the kube-vip/kube-gateway proof of concept. Plain data; unknown fields
//! are errors. [`crate::load`] turns a document into a compiled [`crate::Policy`].

use indexmap::IndexMap;
use serde::Deserialize;

use crate::detect::Detector;
use crate::prompt::Role;

pub const API_VERSION: &str = "kube-gateway.io/v1alpha1";

/// A `kube-gateway.io/v1alpha1` policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyDoc {
    pub api_version: String,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub models: ModelsDoc,
    #[serde(default)]
    pub max_tokens: MaxTokensDoc,
    #[serde(default)]
    pub prompt_rules: Vec<PromptRuleDoc>,
    #[serde(default)]
    pub response_rules: Vec<ResponseRuleDoc>,
    #[serde(default)]
    pub tokenizers: Vec<TokenizerDoc>,
    #[serde(default)]
    pub budgets: Vec<BudgetDoc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeDoc {
    Pod,
    Namespace,
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowDoc {
    Minute,
    Hour,
    Day,
    Month,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsDoc {
    #[serde(default)]
    pub total_tokens: Option<u64>,
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub requests: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetDoc {
    pub name: String,
    pub scope: ScopeDoc,
    /// Only requests for these models count; empty: all.
    #[serde(default)]
    pub models: Vec<String>,
    pub window: WindowDoc,
    pub limits: LimitsDoc,
    /// With a shared (PostgreSQL) store: the share of each limit a gateway leases at a
    /// time, in percent (1-100).
    #[serde(default, rename = "slicePercent")]
    pub slice_percent: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsDoc {
    #[serde(default)]
    pub rewrite: Vec<RewriteDoc>,
    #[serde(default)]
    pub splits: Vec<SplitDoc>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteDoc {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitDoc {
    pub from: String,
    /// Target model to weight, in order.
    pub to: IndexMap<String, u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxTokensDoc {
    #[serde(default)]
    pub default: Option<u64>,
    #[serde(default)]
    pub models: Vec<ModelMaxDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMaxDoc {
    pub model: String,
    pub max: u64,
}

/// What a rule matches: exactly one of literals, regex, detector.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchDoc {
    #[serde(default)]
    pub literals: Vec<String>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub detector: Option<Detector>,
    /// For literals; regexes say `(?i)` themselves.
    #[serde(default)]
    pub case_sensitive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptActionDoc {
    Deny,
    Redact,
    Replace,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PromptRuleDoc {
    pub name: String,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(rename = "match")]
    pub matches: MatchDoc,
    pub action: PromptActionDoc,
    #[serde(default)]
    pub mask: Option<String>,
    #[serde(default)]
    pub replacement: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseActionDoc {
    Redact,
    Block,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResponseRuleDoc {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: MatchDoc,
    pub action: ResponseActionDoc,
    #[serde(default)]
    pub mask: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum EncodingDoc {
    #[serde(rename = "cl100k_base")]
    Cl100kBase,
    #[serde(rename = "o200k_base")]
    O200kBase,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerDoc {
    pub model: String,
    pub encoding: EncodingDoc,
}

/// The proof of concept's policy (kube-vip/kube-gateway `policy.json`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyDoc {
    #[serde(default)]
    pub request: LegacyRequest,
    #[serde(default)]
    pub response: LegacyResponse,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LegacyRequest {
    /// Written as a string there ("50").
    #[serde(default)]
    pub max_tokens: Option<String>,
    #[serde(default)]
    pub debug: bool,
    #[serde(default)]
    pub model_replace: Vec<LegacyReplace>,
    #[serde(default)]
    pub user_prompt_replace: Vec<LegacyPromptReplace>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyReplace {
    pub orig: String,
    pub new: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LegacyPromptReplace {
    pub orig: String,
    pub new: String,
    #[serde(default)]
    pub case_sensitive: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LegacyResponse {
    #[serde(default)]
    pub debug: bool,
    #[serde(default)]
    pub banned_words: Vec<String>,
}
