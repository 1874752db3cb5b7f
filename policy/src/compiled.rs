//! The compiled policy: immutable, shared behind an `Arc`, swapped whole on reload.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::budget::Budget;
use crate::limits::MaxTokens;
use crate::model::{ModelPattern, ModelRules};
use crate::prompt::PromptRules;
use crate::response::ResponseRules;
use crate::tokens::Encoding;

/// Which format a policy was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V1Alpha1,
    /// The kube-vip/kube-gateway proof of concept's JSON.
    ProofOfConcept,
}

/// A validated, compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub models: ModelRules,
    pub max_tokens: MaxTokens,
    pub prompt: PromptRules,
    pub response: Arc<ResponseRules>,
    /// Which encoding estimates use for which models (first match), before the defaults.
    pub tokenizers: Vec<(ModelPattern, Encoding)>,
    /// Token and request budgets; a request is counted against every one that applies.
    pub budgets: Vec<Budget>,
    pub format: Format,
    /// SHA-256 of the source text, hex.
    pub hash: String,
    /// Things the operator should know (ignored settings of the older format).
    pub notes: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            models: ModelRules::default(),
            max_tokens: MaxTokens::default(),
            prompt: PromptRules::default(),
            response: Arc::new(ResponseRules::empty()),
            tokenizers: Vec::new(),
            budgets: Vec::new(),
            format: Format::V1Alpha1,
            hash: String::new(),
            notes: Vec::new(),
        }
    }
}

impl Policy {
    /// The encoding token estimates use for `model`.
    pub fn encoding_for(&self, model: &str) -> Encoding {
        self.tokenizers
            .iter()
            .find(|(p, _)| p.matches(model))
            .map_or_else(|| Encoding::for_model(model), |(_, e)| *e)
    }

    /// A human summary of what the policy does, for `kube-gateway policy check`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let format = match self.format {
            Format::V1Alpha1 => "kube-gateway.io/v1alpha1",
            Format::ProofOfConcept => "proof-of-concept JSON (converted)",
        };
        let _ = writeln!(
            s,
            "policy {} ({format})",
            &self.hash[..self.hash.len().min(12)]
        );
        let m = &self.models;
        let _ = writeln!(
            s,
            "  models: {} rewrite, {} split, {} allow, {} deny",
            m.rewrite.len(),
            m.splits.len(),
            m.allow.len(),
            m.deny.len()
        );
        match (self.max_tokens.default, self.max_tokens.per_model.len()) {
            (None, 0) => {}
            (d, n) => {
                let d = d.map_or("none".to_owned(), |d| d.to_string());
                let _ = writeln!(s, "  max tokens: default {d}, {n} per-model");
            }
        }
        let _ = writeln!(s, "  prompt rules: {}", self.prompt.len());
        let _ = writeln!(s, "  response rules: {}", self.response.len());
        for b in &self.budgets {
            let l = &b.limits;
            let limit =
                |name: &str, v: Option<u64>| v.map(|v| format!(" {name} {v}")).unwrap_or_default();
            let _ = writeln!(
                s,
                "  budget {}: per {:?} per {}:{}{}{}{}",
                b.name,
                b.scope,
                b.window.name(),
                limit("total", l.total_tokens),
                limit("input", l.input_tokens),
                limit("output", l.output_tokens),
                limit("requests", l.requests)
            );
        }
        if !self.tokenizers.is_empty() {
            let _ = writeln!(s, "  tokenizer overrides: {}", self.tokenizers.len());
        }
        for note in &self.notes {
            let _ = writeln!(s, "  note: {note}");
        }
        s
    }
}
