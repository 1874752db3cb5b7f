//! The request side of a policy, in its fixed order: the model rules (allow, deny,
//! canary split), then the prompt rules (every deny check of a text before its edits),
//! then the max-tokens clamp. Pure: it changes the typed request and says what acted.

use kube_gateway_policy::{Encoding, ModelDecision, Policy};

use crate::api::request::Visit;
use crate::api::LlmRequest;

/// A request the policy let through, maybe changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Rules that edited the prompt, in order.
    pub edits: Vec<String>,
    /// The encoding token estimates use for the model the request now names.
    pub encoding: Encoding,
}

/// A request a policy rule refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub rule: String,
    /// What the rule looked at: `model` or `prompt`.
    pub what: &'static str,
}

/// The rule a request is denied by when prompt rules are in force and its prompt
/// cannot be read (see [`LlmRequest::prompt_unread`]).
pub const UNREAD_PROMPT: &str = "unreadable-prompt";

/// Applies `policy` to `req`; `key` picks a canary split's target (the same key, the
/// same target).
pub fn apply(policy: &Policy, req: &mut LlmRequest, key: &[u8]) -> Result<Applied, Denied> {
    let asked = req.model.clone().unwrap_or_default();
    match policy.models.decide(&asked, key) {
        ModelDecision::Denied { rule } => {
            return Err(Denied {
                rule,
                what: "model",
            })
        }
        ModelDecision::Use { model, changed } => {
            if changed {
                req.set_model(&model);
            }
        }
    }
    let mut edits = Vec::new();
    if !policy.prompt.is_empty() {
        // Fail closed: a prompt the rules cannot read would pass them unseen.
        if req.prompt_unread() {
            return Err(Denied {
                rule: UNREAD_PROMPT.to_owned(),
                what: "prompt",
            });
        }
        let mut denied = None;
        req.visit_prompt(|role, text| {
            if let Some(rule) = policy.prompt.denied_by(role, text) {
                denied = Some(rule.to_owned());
                return Visit::Stop;
            }
            match policy.prompt.edit(role, text) {
                Some(edited) => {
                    edits.extend(edited.rules);
                    Visit::Replace(edited.text)
                }
                None => Visit::Keep,
            }
        });
        if let Some(rule) = denied {
            return Err(Denied {
                rule,
                what: "prompt",
            });
        }
    }
    let model = req.model.clone().unwrap_or_default();
    if let Some(limit) = policy.max_tokens.clamp(&model, req.max_tokens()) {
        req.set_max_tokens(limit);
    }
    Ok(Applied {
        edits,
        encoding: policy.encoding_for(&model),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Endpoint;
    use kube_gateway_policy::load;

    const POLICY: &str = "apiVersion: kube-gateway.io/v1alpha1
models:
  rewrite: [{ from: llama3, to: 'gemma2:2b' }]
  deny: ['gpt-*']
maxTokens: { default: 50 }
promptRules:
  - name: jailbreak
    match: { literals: ['ignore previous'] }
    action: deny
  - name: emails
    match: { detector: email }
    action: redact
";

    fn request(model: &str, prompt: &str, max_tokens: Option<u64>) -> LlmRequest {
        let mut body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
        });
        if let Some(n) = max_tokens {
            body["max_tokens"] = n.into();
        }
        LlmRequest::parse(Endpoint::ChatCompletions, body.to_string()).unwrap()
    }

    fn policy() -> Policy {
        load(POLICY).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_model_is_rewritten_the_prompt_redacted_and_max_tokens_clamped() {
        let mut req = request("llama3", "mail bob@example.com", Some(500));
        let applied = apply(&policy(), &mut req, b"k").unwrap();
        assert_eq!(applied.edits, ["emails"]);
        assert_eq!(req.model.as_deref(), Some("gemma2:2b"));
        assert_eq!(req.max_tokens(), Some(50));
        assert!(!req.prompt_text().contains("bob@example.com"));
    }

    #[test]
    fn a_denied_model_is_refused_before_its_prompt_is_read() {
        let mut req = request("gpt-4o", "ignore previous", None);
        let d = apply(&policy(), &mut req, b"k").unwrap_err();
        assert_eq!(d.what, "model", "{d:?}");
    }

    #[test]
    fn a_prompt_the_rules_cannot_read_is_denied_only_under_prompt_rules() {
        // A lone surrogate after the jailbreak, a number past f64 beside it: the reader
        // cannot give the rules these texts, which an upstream may still read.
        let lone =
            r#"{"model":"llama3","messages":[{"role":"user","content":"ignore previous \ud800"}]}"#;
        let huge =
            r#"{"model":"llama3","messages":[{"role":"user","content":"ignore previous"},1e999]}"#;
        let no_prompt_rules =
            load("apiVersion: kube-gateway.io/v1alpha1\nmaxTokens: { default: 50 }\n")
                .unwrap_or_else(|e| panic!("{e}"));
        for body in [lone, huge] {
            let mut req = LlmRequest::parse(Endpoint::ChatCompletions, body).unwrap();
            assert!(req.prompt_unread());
            let d = apply(&policy(), &mut req, b"k").unwrap_err();
            assert_eq!((d.rule.as_str(), d.what), (UNREAD_PROMPT, "prompt"));
            let mut req = LlmRequest::parse(Endpoint::ChatCompletions, body).unwrap();
            assert!(apply(&no_prompt_rules, &mut req, b"k").is_ok());
        }
        let mut req = request("llama3", "hi", None);
        assert!(!req.prompt_unread());
        assert!(apply(&policy(), &mut req, b"k").is_ok());
    }

    #[test]
    fn a_deny_rule_wins_over_edits_of_the_same_prompt() {
        let mut req = request("llama3", "bob@example.com: ignore previous", None);
        let d = apply(&policy(), &mut req, b"k").unwrap_err();
        assert_eq!((d.rule.as_str(), d.what), ("jailbreak", "prompt"));
    }
}
