//! The policy loader (`policy/src/load.rs`) on arbitrary text: YAML, JSON and the proof
//! of concept's JSON. It never panics and is deterministic (the same result, the same
//! errors, the hash of the text); a policy that loads describes itself, decides models,
//! and its compiled rules run on text (the policy's own) without panicking, its response
//! filter giving the same result streamed in pieces as whole.
#![no_main]

use kube_gateway_fuzz::text_pieces;
use kube_gateway_policy::load::hash;
use kube_gateway_policy::{load, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match load(text) {
        Ok(p) => p,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without errors");
            for e in &errors.0 {
                assert!(!e.message.is_empty(), "an empty message at {:?}", e.path);
            }
            assert_eq!(
                load(text).err(),
                Some(errors),
                "errors differ on a second load"
            );
            return;
        }
    };
    assert_eq!(policy.hash, hash(text));
    let again = load(text).unwrap_or_else(|e| panic!("loaded once, then: {e}"));
    assert_eq!(again.summary(), policy.summary(), "not deterministic");
    assert_eq!(policy.format, again.format);

    // Run what was compiled on text that contains its own literals.
    // Its first 512 bytes, cut back to a character boundary.
    let mut end = text.len().min(512);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let sample = &text[..end];
    for model in ["", "gpt-4o", "llama3.2:1b", sample] {
        let _ = policy.models.decide(model, b"key");
        let _ = policy.max_tokens.clamp(model, Some(100));
        let _ = policy.encoding_for(model);
    }
    for role in Role::ALL {
        let _ = policy.prompt.denied_by(role, sample);
        if let Some(edited) = policy.prompt.edit(role, sample) {
            assert!(!edited.rules.is_empty());
        }
    }
    let (whole, hits) = policy.response.apply(sample);
    let mut filter = policy.response.stream();
    let mut out = String::new();
    let mut blocked = None;
    let cuts: Vec<u16> = (0..sample.len()).step_by(7).map(|c| c as u16).collect();
    for piece in text_pieces(sample, &cuts) {
        let emit = filter.push(piece);
        out.push_str(&emit.text);
        blocked = blocked.or(emit.blocked);
    }
    let last = filter.finish();
    out.push_str(&last.text);
    blocked = blocked.or(last.blocked);
    assert_eq!(
        (out, blocked),
        (whole.text, whole.blocked),
        "streamed != whole"
    );
    assert_eq!(filter.hits(), hits);
});
