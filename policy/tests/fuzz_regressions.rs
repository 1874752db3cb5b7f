//! Regressions found by the fuzz targets (`fuzz/`): each input that broke a property,
//! minimized, checked here so that it stays fixed without running the fuzzer.

use kube_gateway_policy::load;

/// `response_filter`: a regex that looks behind its match (`\b`, `(?m)^`) saw the start
/// of the held-back text as the start of the answer, so a stream masked what the whole
/// answer did not contain.
#[test]
fn a_held_regex_match_keeps_the_text_before_it() {
    let policy = load(
        "apiVersion: kube-gateway.io/v1alpha1\nresponseRules:\n  - { name: pin, match: { regex: '\\bPIN [0-9]{4}\\b' }, action: redact, mask: '#' }\n  - { name: line, match: { regex: '(?m)^halt' }, action: redact, mask: '#' }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for answer in ["xPIN 1234 ok", "no halt here", "aPIN 1234"] {
        let (whole, _) = policy.response.apply(answer);
        assert_eq!(whole.text, answer, "nothing to mask in {answer:?}");
        for cut in 1..answer.len() {
            let mut f = policy.response.stream();
            let mut out = f.push(&answer[..cut]).text;
            out.push_str(&f.push(&answer[cut..]).text);
            out.push_str(&f.finish().text);
            assert_eq!(out, whole.text, "{answer:?} cut at {cut}");
        }
    }
    // Where the whole answer has a match, the stream masks the same.
    let (whole, _) = policy.response.apply("a PIN 1234\nhalt");
    assert_eq!(whole.text, "a #\n#");
}

/// `policy_loader`: a regex with an empty branch (`e>>>||...`) matched empty text at the
/// start of a whole answer, which stopped its search there, while a stream whose held
/// text began at the `e` found the real match: the two disagreed. Such a regex is now
/// refused, naming the rule.
#[test]
fn a_regex_that_can_match_empty_text_is_refused() {
    let err = load(
        r#"{"apiVersion": "kube-gateway.io/v1alpha1", "responseRules": [{"name": "pin", "match": {"regex": "e>>>>||or>>\\bPIN-0[ 9]{4}\\b"}, "action": "redact"}]}"#,
    )
    .unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].path, "responseRules[0].match.regex");
    assert!(
        err.0[0].message.contains("empty text"),
        "{}",
        err.0[0].message
    );
}
