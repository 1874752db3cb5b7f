//! The request parser and the request side of a policy (`gateway/src/api/request.rs`,
//! `gateway/src/guard/request.rs`) on arbitrary bytes, for every endpoint. Parsing never
//! panics; a request the policy lets through re-parses from the body sent upstream, names
//! the model the policy chose, asks at most the policy's max tokens (never more than the
//! client asked), passes the same policy again (not denied; nothing left to redact;
//! with the proof of concept's replace rules, not edited at all), and keeps every field
//! the policy does not own byte for byte. An empty policy forwards the bytes as they came.
//!
//! With the full policy a second pass may still replace: a mask can make the word
//! boundary a replace rule needs, and replacements apply once. It once found that a mask
//! could uncover a card number (`PIN 1218` + 19 more digits); redactions now run until
//! they settle (`PromptRules::edit`).
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use kube_gateway::api::{Endpoint, LlmRequest};
use kube_gateway::guard::request::apply;
use kube_gateway_policy::{load, ModelDecision, Policy};
use libfuzzer_sys::fuzz_target;

/// Masks and replacements share no text with any rule, so a second pass finds nothing.
const POLICIES: [&str; 3] = [
    "apiVersion: kube-gateway.io/v1alpha1\n",
    r#"apiVersion: kube-gateway.io/v1alpha1
models:
  splits: [{ from: "llama3.2:1b", to: { "gemma2:2b": 90, "qwen2.5:1.5b": 10 } }]
  rewrite: [{ from: "gpt-4*", to: gpt-4o-mini }, { from: llama3, to: "gemma2:2b" }]
  deny: ["*-70b*"]
maxTokens: { default: 512, models: [{ model: "gpt-4o*", max: 64 }, { model: "qwen*", max: 1 }] }
promptRules:
  - { name: no-jailbreak, roles: [user], match: { literals: ["ignore previous instructions"] }, action: deny }
  - { name: emails, match: { detector: email }, action: redact }
  - { name: cards, match: { detector: credit-card }, action: redact, mask: "[card]" }
  - { name: keys, match: { detector: openai-key }, action: redact }
  - { name: words, match: { literals: [kubernetes, K8S], caseSensitive: false }, action: replace, replacement: "(cluster)" }
  - { name: pins, match: { regex: "PIN [0-9]{4}" }, action: redact, mask: "(pin)" }
"#,
    r#"{"request": {"maxTokens": "50", "modelReplace": [{"orig": "llama3.2:1b", "new": "gemma2:2b"}],
  "userPromptReplace": [{"orig": "Kubernetes", "new": "k8s", "caseSensitive": true},
                        {"orig": "weather", "new": "climate", "caseSensitive": false}]},
 "response": {"bannedWords": ["darn"]}}"#,
];

fn policies() -> &'static [Policy] {
    static P: OnceLock<Vec<Policy>> = OnceLock::new();
    P.get_or_init(|| {
        POLICIES
            .iter()
            .map(|p| load(p).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    })
}

/// The top-level fields the policy may write, per endpoint.
fn owned(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::ChatCompletions => &["model", "messages", "max_tokens", "max_completion_tokens"],
        Endpoint::Completions => &["model", "prompt", "max_tokens"],
        Endpoint::Embeddings | Endpoint::Embed => &["model", "input"],
        Endpoint::Responses => &["model", "instructions", "input", "max_output_tokens"],
        Endpoint::Chat => &["model", "messages", "options"],
        Endpoint::Generate => &["model", "system", "prompt", "options"],
        Endpoint::LegacyEmbeddings => &["model", "prompt"],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = kube_gateway_fuzz::input(data, 3) else {
        return;
    };
    let endpoint = Endpoint::ALL[usize::from(input.choices[0]) % Endpoint::ALL.len()];
    let which = usize::from(input.choices[1]) % POLICIES.len();
    let policy = &policies()[which];
    let original = Bytes::copy_from_slice(input.body);
    let Ok(mut req) = LlmRequest::parse(endpoint, original.clone()) else {
        return;
    };
    let asked_model = req.model.clone();
    let asked_max = req.max_tokens();
    let fields: Vec<String> =
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&original)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
    let decision = policy
        .models
        .decide(asked_model.as_deref().unwrap_or(""), &input.choices[2..]);
    let Ok(applied) = apply(policy, &mut req, &input.choices[2..]) else {
        assert!(
            which != 0,
            "the empty policy denied {:?}",
            String::from_utf8_lossy(&original)
        );
        return;
    };
    let sent = req.body();
    if which == 0 {
        assert_eq!(sent, original, "the empty policy changed the body");
        assert!(applied.edits.is_empty());
    }
    let again = LlmRequest::parse(endpoint, sent.clone()).unwrap_or_else(|e| {
        panic!(
            "the body sent upstream does not parse ({e}): {}",
            String::from_utf8_lossy(&sent)
        )
    });
    assert_eq!(
        again.model, req.model,
        "the model sent is not the one chosen"
    );
    match decision {
        ModelDecision::Use {
            model,
            changed: true,
        } => {
            assert_eq!(again.model.as_deref(), Some(model.as_str()))
        }
        ModelDecision::Use { changed: false, .. } => assert_eq!(again.model, asked_model),
        ModelDecision::Denied { rule } => panic!("model denied by {rule} was let through"),
    }
    assert_eq!(again.stream, req.stream);
    if !endpoint.is_embedding() {
        let model = again.model.clone().unwrap_or_default();
        if let Some(limit) = policy.max_tokens.limit(&model) {
            let sent_max = again.max_tokens();
            match asked_max {
                Some(a) if a <= limit => assert_eq!(sent_max, Some(a), "a lower limit raised"),
                _ => assert_eq!(sent_max, Some(limit), "the limit not applied"),
            }
        } else {
            assert_eq!(again.max_tokens(), asked_max);
        }
    }
    // Every other top-level field is as the client wrote it.
    for name in &fields {
        if owned(endpoint).contains(&name.as_str()) {
            continue;
        }
        assert_eq!(
            again.raw_field(name).as_deref(),
            LlmRequest::parse(endpoint, original.clone())
                .ok()
                .and_then(|r| r.raw_field(name).map(|f| f.into_owned()))
                .as_deref(),
            "field {name} changed"
        );
    }
    // What was sent passes the same policy unchanged: nothing left to deny or edit.
    let mut second = again.clone();
    match apply(policy, &mut second, &input.choices[2..]) {
        Ok(a) => assert!(
            a.edits.is_empty() || (which == 1 && a.edits.iter().all(|e| e == "words")),
            "edited twice by {:?}: {}",
            a.edits,
            String::from_utf8_lossy(&sent)
        ),
        Err(d) => panic!(
            "what was sent is denied by {} ({}): {}",
            d.rule,
            d.what,
            String::from_utf8_lossy(&sent)
        ),
    }
    assert_eq!(second.model, again.model);
    // Asking for usage on a stream: added once, then seen as asked.
    let mut streamed = again;
    if streamed.ensure_stream_usage() {
        let body = streamed.body();
        let mut third = LlmRequest::parse(endpoint, body.clone()).unwrap_or_else(|e| {
            panic!(
                "include_usage broke the body ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        assert!(!third.ensure_stream_usage(), "include_usage not seen");
    }
});
