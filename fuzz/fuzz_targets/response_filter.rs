//! The streaming response filter (`policy/src/response.rs`) on arbitrary text pushed in
//! arbitrary pieces: what comes out, joined, equals the whole-text filter's output (the
//! same text, the same blocking rule, the same hits), nothing comes out after a block,
//! and (for rules a mask cannot help match: literals, no `\b`) no rule matches anything
//! that came out.
#![no_main]

use std::sync::{Arc, OnceLock};

use kube_gateway_fuzz::text_pieces;
use kube_gateway_policy::{load, ResponseRules};
use libfuzzer_sys::fuzz_target;

/// The first set's masks share no text with its rules and cannot make a word boundary, so
/// its output can be checked for matches.
const POLICIES: [&str; 3] = [
    r##"apiVersion: kube-gateway.io/v1alpha1
responseRules:
  - { name: animals, match: { literals: [rabbit, rat, "ünïcödé"], caseSensitive: false }, action: redact, mask: "#" }
  - { name: bar, match: { literals: [bar, aa], caseSensitive: true }, action: redact, mask: "#" }
  - { name: bees, match: { regex: "b{2,3}" }, action: redact, mask: "#" }
  - { name: stop, match: { literals: [STOP], caseSensitive: true }, action: block }
"##,
    r##"apiVersion: kube-gateway.io/v1alpha1
responseRules:
  - { name: emails, match: { detector: email }, action: redact, mask: "#" }
  - { name: cards, match: { detector: credit-card }, action: redact, mask: "#" }
  - { name: ips, match: { detector: ipv4 }, action: redact, mask: "#" }
  - { name: keys, match: { detector: openai-key }, action: block }
  - { name: aws, match: { detector: aws-access-key }, action: block }
  - { name: bearer, match: { detector: bearer-token }, action: redact, mask: "#" }
  - { name: jwt, match: { detector: jwt }, action: redact, mask: "#" }
"##,
    r##"apiVersion: kube-gateway.io/v1alpha1
responseRules:
  - { name: pin, match: { regex: '\bPIN [0-9]{4}\b' }, action: redact, mask: "#" }
  - { name: word, match: { regex: '(?i)pass(word)?\s?[:=]\s{0,2}\w{1,8}' }, action: redact, mask: "#" }
  - { name: greek, match: { regex: 'αβ{1,3}γ?' }, action: redact, mask: "#" }
  - { name: end, match: { regex: '(?m)^halt$' }, action: block }
"##,
];

fn rules() -> &'static [Arc<ResponseRules>] {
    static R: OnceLock<Vec<Arc<ResponseRules>>> = OnceLock::new();
    R.get_or_init(|| {
        POLICIES
            .iter()
            .map(|p| load(p).unwrap_or_else(|e| panic!("{e}")).response.clone())
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = kube_gateway_fuzz::input(data, 1) else {
        return;
    };
    let Ok(answer) = std::str::from_utf8(input.body) else {
        return;
    };
    let which = usize::from(input.choices[0]) % POLICIES.len();
    let rules = &rules()[which];
    let (whole, whole_hits) = rules.apply(answer);

    let mut filter = rules.stream();
    let mut text = String::new();
    let mut blocked = None;
    for piece in text_pieces(answer, &input.cuts) {
        let emit = filter.push(piece);
        if blocked.is_some() {
            assert!(
                emit.text.is_empty() && emit.blocked.is_none(),
                "text after a block"
            );
        }
        text.push_str(&emit.text);
        blocked = blocked.or(emit.blocked);
        assert_eq!(filter.is_ended(), blocked.is_some());
    }
    let last = filter.finish();
    if blocked.is_some() {
        assert!(
            last.text.is_empty() && last.blocked.is_none(),
            "text after a block"
        );
    }
    text.push_str(&last.text);
    blocked = blocked.or(last.blocked);
    assert_eq!(filter.held(), 0, "text held after the end");

    assert_eq!(text, whole.text, "streamed and whole text differ");
    assert_eq!(blocked, whole.blocked, "streamed and whole blocks differ");
    assert_eq!(filter.hits(), whole_hits, "streamed and whole hits differ");
    if which != 0 {
        return;
    }
    let (_, hits) = rules.apply(&text);
    assert!(hits.is_empty(), "{hits:?} match what came out: {text:?}");
});
