//! Compiling policy ConfigMaps: last good versions, refusals reported once.

use super::*;
use crate::fixtures::*;

fn none() -> std::iter::Empty<&'static ConfigMap> {
    std::iter::empty()
}

#[test]
fn a_valid_configmap_is_compiled_with_its_selector() {
    let mut s = Sources::new();
    let cm = policy_configmap("chat", "p", "1", Some("app=chat"), REWRITE_GPT4);
    assert!(s.update([&cm], none()).is_empty());
    let found = s.labelled_in("chat");
    assert_eq!(found.len(), 1);
    let p = found[0];
    assert_eq!((p.name.as_str(), p.resource_version.as_str()), ("p", "1"));
    assert_eq!(p.selector.as_ref().unwrap().to_string(), "app=chat");
    assert_eq!(p.policy.models.rewrite.apply("gpt-4"), Some("gpt-4o-mini"));
    assert_eq!(p.label(), "configmap/chat/p");
    assert!(s.labelled_in("other").is_empty());
}

#[test]
fn an_empty_selector_means_the_whole_namespace() {
    let mut s = Sources::new();
    let cm = policy_configmap("chat", "p", "1", Some(" "), REWRITE_GPT4);
    assert!(s.update([&cm], none()).is_empty());
    assert!(s.labelled_in("chat")[0].selector.is_none());
}

#[test]
fn never_valid_is_ignored_and_reported_with_the_field_path() {
    let mut s = Sources::new();
    let cm = policy_configmap("chat", "broken", "7", None, BAD_REGEX);
    let r = s.update([&cm], none());
    assert_eq!(r.len(), 1);
    let r = &r[0];
    assert_eq!(r.kept, None);
    assert_eq!(r.problems.len(), 1);
    assert_eq!(
        r.problems[0].path,
        "data[\"policy.yaml\"].promptRules[0].match.regex"
    );
    assert_eq!(r.configmap.kind.as_deref(), Some("ConfigMap"));
    assert_eq!(r.configmap.api_version.as_deref(), Some("v1"));
    assert_eq!(r.configmap.name.as_deref(), Some("broken"));
    assert_eq!(r.configmap.namespace.as_deref(), Some("chat"));
    assert_eq!(r.configmap.uid.as_deref(), Some("uid-cm-broken"));
    assert_eq!(r.configmap.resource_version.as_deref(), Some("7"));
    assert!(r
        .note()
        .starts_with("policy not valid: data[\"policy.yaml\"].promptRules[0].match.regex: "));
    assert!(
        r.note()
            .ends_with("; ignored: no earlier version was valid"),
        "{}",
        r.note()
    );
    assert!(s.labelled_in("chat").is_empty());
}

#[test]
fn invalid_new_version_keeps_the_last_good_and_is_reported_once() {
    let mut s = Sources::new();
    let good = policy_configmap("chat", "p", "1", None, REWRITE_GPT4);
    assert!(s.update([&good], none()).is_empty());

    let bad = policy_configmap("chat", "p", "2", None, BAD_REGEX);
    let r = s.update([&bad], none());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kept.as_deref(), Some("1"));
    assert!(r[0]
        .note()
        .ends_with("the last good version (resourceVersion 1) stays in force"));
    let kept = s.labelled_in("chat");
    assert_eq!(kept[0].resource_version, "1");
    assert_eq!(
        kept[0].policy.models.rewrite.apply("gpt-4"),
        Some("gpt-4o-mini")
    );

    // The same version again (a recompute, a relist): no second report.
    assert!(s.update([&bad], none()).is_empty());
    // A new valid version replaces the last good one.
    let fixed = policy_configmap("chat", "p", "3", None, DENY_70B);
    assert!(s.update([&fixed], none()).is_empty());
    let now = s.labelled_in("chat");
    assert_eq!(now[0].resource_version, "3");
    assert!(now[0].policy.models.rewrite.is_empty());
}

#[test]
fn a_bad_selector_is_refused_and_the_last_good_selector_stays() {
    let mut s = Sources::new();
    let good = policy_configmap("chat", "p", "1", Some("app=chat"), REWRITE_GPT4);
    s.update([&good], none());
    let bad = policy_configmap("chat", "p", "2", Some("app in chat"), REWRITE_GPT4);
    let r = s.update([&bad], none());
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].problems[0].path,
        "metadata.annotations[\"kube-gateway.io/selector\"]"
    );
    assert_eq!(
        s.labelled_in("chat")[0]
            .selector
            .as_ref()
            .unwrap()
            .to_string(),
        "app=chat"
    );
}

#[test]
fn a_missing_key_is_a_problem_at_that_key() {
    let mut s = Sources::new();
    let cm: ConfigMap = serde_json::from_value(configmap_json(
        "chat",
        "p",
        "1",
        &[(POLICY_LABEL_FOR_TESTS, "")],
        &[],
        &[("other.yaml", REWRITE_GPT4)],
    ))
    .unwrap();
    let r = s.update([&cm], none());
    assert_eq!(r[0].problems[0].path, "data[\"policy.yaml\"]");
}

const POLICY_LABEL_FOR_TESTS: &str = crate::annotations::POLICY_LABEL;

#[test]
fn deleting_forgets_the_last_good_version() {
    let mut s = Sources::new();
    let good = policy_configmap("chat", "p", "1", None, REWRITE_GPT4);
    s.update([&good], none());
    s.update(none(), none());
    assert!(s.labelled_in("chat").is_empty());
    // Recreated broken (a new uid would do the same): nothing to fall back on.
    let bad = policy_configmap("chat", "p", "5", None, BAD_REGEX);
    assert_eq!(s.update([&bad], none())[0].kept, None);
}

#[test]
fn the_proof_of_concept_configmap_is_read_from_config() {
    let mut s = Sources::new();
    let cm = per_pod_configmap("chat", "bot", "4", POC_JSON);
    assert!(s.update(none(), [&cm]).is_empty());
    let p = s.per_pod("chat", "bot").unwrap();
    assert_eq!(p.kind, SourceKind::PerPod);
    assert_eq!(p.policy.format, kube_gateway_policy::Format::ProofOfConcept);
    assert_eq!(
        p.policy.models.rewrite.apply("llama3.2:1b"),
        Some("gemma2:2b")
    );
    assert!(s.per_pod("chat", "other").is_none());
    assert!(
        s.labelled_in("chat").is_empty(),
        "a per-pod ConfigMap is not a labelled one"
    );
}

#[test]
fn a_proof_of_concept_error_keeps_its_own_path() {
    let mut s = Sources::new();
    let cm = per_pod_configmap("chat", "bot", "1", r#"{"request":{"maxTokens":"lots"}}"#);
    let r = s.update(none(), [&cm]);
    assert_eq!(r[0].problems[0].path, "data[\"config\"].request.maxTokens");
}
