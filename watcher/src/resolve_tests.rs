//! Resolution without any API: which pods, which policy, by precedence.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::annotations::{AI, AI_MODEL, NETFLUSH};
use crate::fixtures::*;

fn sources(labelled: &[ConfigMap], per_pod: &[ConfigMap]) -> Sources {
    let mut s = Sources::new();
    let rejected = s.update(labelled, per_pod);
    assert!(rejected.is_empty(), "{rejected:?}");
    s
}

fn resolve_all(pods: &[Pod], s: &Sources) -> BTreeMap<String, Arc<Workload>> {
    desired(pods, NODE, s, |_| true, &mut Finals::new())
}

fn one(pod: &Pod, s: &Sources) -> Arc<Workload> {
    let set = resolve_all(std::slice::from_ref(pod), s);
    set.into_values().next().expect("the pod is in the set")
}

#[test]
fn only_annotated_running_pods_with_an_ip_on_this_node() {
    let ok = ai_pod("chat", "ok", &[]);
    let plain = pod("chat", "plain", &[], &[]);
    let off = pod("chat", "off", &[(AI, "false")], &[]);
    let mut pending = ai_pod("chat", "pending", &[]);
    pending.status.as_mut().unwrap().phase = Some("Pending".into());
    let mut no_ip = ai_pod("chat", "no-ip", &[]);
    no_ip.status.as_mut().unwrap().pod_ip = None;
    no_ip.status.as_mut().unwrap().pod_ips = None;
    let mut elsewhere = ai_pod("chat", "elsewhere", &[]);
    elsewhere.spec.as_mut().unwrap().node_name = Some("node-b".into());
    let mut deleting = ai_pod("chat", "deleting", &[]);
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let pods = [ok, plain, off, pending, no_ip, elsewhere, deleting];
    let set = resolve_all(&pods, &Sources::new());
    let names: Vec<&str> = set.values().map(|w| w.id.name.as_str()).collect();
    assert_eq!(names, ["ok"]);
    assert_eq!(
        namespaces_to_watch(&pods, NODE)
            .into_iter()
            .collect::<Vec<_>>(),
        ["chat"],
        "pending pods count for the namespaces to watch"
    );
}

#[test]
fn the_workload_carries_the_pods_identity_and_settings() {
    let p = pod("chat", "bot", &[(AI, "true"), (NETFLUSH, "true")], &[]);
    let w = one(&p, &Sources::new());
    assert_eq!(
        w.id,
        WorkloadId {
            namespace: "chat".into(),
            name: "bot".into(),
            uid: "uid-bot".into(),
            service_account: "chat-sa".into(),
            node: NODE.into(),
        }
    );
    assert_eq!(w.ips, ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]);
    assert!(w.netflush);
    assert_eq!(w.model, None);
    assert!(w.policy_sources.is_empty());
    assert!(w.policy.models.is_empty(), "no source: the empty policy");
}

#[test]
fn a_labelled_configmap_applies_to_the_pods_its_selector_matches() {
    let s = sources(
        &[policy_configmap(
            "chat",
            "p",
            "1",
            Some("app=chat,tier in (a,b)"),
            REWRITE_GPT4,
        )],
        &[],
    );
    let matched = ai_pod("chat", "m", &[("app", "chat"), ("tier", "b")]);
    let unmatched = ai_pod("chat", "u", &[("app", "chat"), ("tier", "c")]);
    let other_ns = ai_pod("other", "o", &[("app", "chat"), ("tier", "a")]);
    assert_eq!(one(&matched, &s).policy_sources, ["configmap/chat/p"]);
    assert_eq!(
        one(&matched, &s).policy.models.rewrite.apply("gpt-4"),
        Some("gpt-4o-mini")
    );
    assert!(one(&unmatched, &s).policy_sources.is_empty());
    assert!(
        one(&other_ns, &s).policy_sources.is_empty(),
        "ConfigMaps apply in their namespace only"
    );
}

#[test]
fn without_a_selector_it_applies_to_every_annotated_pod_of_the_namespace() {
    let s = sources(
        &[policy_configmap("chat", "all", "1", None, REWRITE_GPT4)],
        &[],
    );
    for labels in [&[][..], &[("app", "x")][..]] {
        assert_eq!(
            one(&ai_pod("chat", "any", labels), &s).policy_sources,
            ["configmap/chat/all"]
        );
    }
}

#[test]
fn the_most_specific_configmap_wins_then_the_first_by_name() {
    let s = sources(
        &[
            policy_configmap("chat", "a-namespace-wide", "1", None, DENY_70B),
            policy_configmap("chat", "z-chat", "1", Some("app=chat"), REWRITE_GPT4),
            policy_configmap("chat", "y-chat-too", "1", Some("app"), REWRITE_GPT4),
            policy_configmap("chat", "b-namespace-wide", "1", None, DENY_70B),
        ],
        &[],
    );
    // Two selectors match: the first by name of them; the namespace-wide ones lose.
    let chat = ai_pod("chat", "c", &[("app", "chat")]);
    assert_eq!(one(&chat, &s).policy_sources, ["configmap/chat/y-chat-too"]);
    // No selector matches: the first namespace-wide one by name.
    let other = ai_pod("chat", "o", &[("role", "batch")]);
    assert_eq!(
        one(&other, &s).policy_sources,
        ["configmap/chat/a-namespace-wide"]
    );
}

#[test]
fn labelled_configmaps_beat_the_per_pod_configmap() {
    let per_pod = per_pod_configmap("chat", "bot", "1", POC_JSON);
    let labelled = policy_configmap("chat", "p", "1", Some("app=chat"), REWRITE_GPT4);
    let s = sources(&[labelled], &[per_pod]);
    let selected = ai_pod("chat", "bot", &[("app", "chat")]);
    assert_eq!(one(&selected, &s).policy_sources, ["configmap/chat/p"]);
    let not_selected = ai_pod("chat", "bot", &[("app", "other")]);
    let w = one(&not_selected, &s);
    assert_eq!(w.policy_sources, ["configmap/chat/bot-kube-gateway"]);
    assert_eq!(
        w.policy.models.rewrite.apply("llama3.2:1b"),
        Some("gemma2:2b")
    );
    assert!(one(&ai_pod("chat", "someone-else", &[]), &s)
        .policy_sources
        .is_empty());
}

#[test]
fn the_ai_model_annotation_rewrites_what_the_policy_leaves() {
    let s = sources(
        &[policy_configmap("chat", "p", "1", None, REWRITE_GPT4)],
        &[],
    );
    let p = pod("chat", "bot", &[(AI, "true"), (AI_MODEL, "gemma2:2b")], &[]);
    let w = one(&p, &s);
    assert_eq!(w.model.as_deref(), Some("gemma2:2b"));
    assert_eq!(w.policy_sources, ["configmap/chat/p", AI_MODEL_SOURCE]);
    let rewrite = &w.policy.models.rewrite;
    assert_eq!(
        rewrite.apply("gpt-4"),
        Some("gpt-4o-mini"),
        "the policy's own rewrite first"
    );
    assert_eq!(
        rewrite.apply("llama3"),
        Some("gemma2:2b"),
        "then the annotation for the rest"
    );
    // The source's compiled policy is untouched (other pods share it).
    assert_eq!(
        s.labelled_in("chat")[0]
            .policy
            .models
            .rewrite
            .apply("llama3"),
        None
    );
}

#[test]
fn the_ai_model_annotation_alone_rewrites_every_model() {
    let p = pod("chat", "bot", &[(AI, "true"), (AI_MODEL, "gemma2:2b")], &[]);
    let w = one(&p, &Sources::new());
    assert_eq!(w.policy_sources, [AI_MODEL_SOURCE]);
    assert_eq!(w.policy.models.rewrite.apply("gpt-4"), Some("gemma2:2b"));
    let blank = pod("chat", "bot", &[(AI, "true"), (AI_MODEL, "  ")], &[]);
    assert_eq!(
        one(&blank, &Sources::new()).model,
        None,
        "a blank model is no model"
    );
}

#[test]
fn an_invalid_new_version_leaves_the_pod_on_the_last_good_policy() {
    let mut s = Sources::new();
    let pods = [ai_pod("chat", "bot", &[])];
    s.update(
        [&policy_configmap("chat", "p", "1", None, REWRITE_GPT4)],
        [],
    );
    let mut finals = Finals::new();
    let before = desired(&pods, NODE, &s, |_| true, &mut finals);
    let rejected = s.update([&policy_configmap("chat", "p", "2", None, BAD_REGEX)], []);
    assert_eq!(rejected.len(), 1);
    let after = desired(&pods, NODE, &s, |_| true, &mut finals);
    let w = &after["uid-bot"];
    assert_eq!(w.policy.models.rewrite.apply("gpt-4"), Some("gpt-4o-mini"));
    assert!(same_set(&Arc::new(before), &after), "nothing to publish");
}

#[test]
fn a_configmap_never_valid_does_not_hide_the_next_source() {
    let mut s = Sources::new();
    let broken = policy_configmap("chat", "a-broken", "1", Some("app=chat"), BAD_REGEX);
    let wide = policy_configmap("chat", "z-wide", "1", None, REWRITE_GPT4);
    assert_eq!(s.update([&broken, &wide], []).len(), 1);
    let w = one(&ai_pod("chat", "bot", &[("app", "chat")]), &s);
    assert_eq!(w.policy_sources, ["configmap/chat/z-wide"]);
}

#[test]
fn pods_of_namespaces_not_yet_listed_wait() {
    let pods = [ai_pod("chat", "a", &[]), ai_pod("ml", "b", &[])];
    let set = desired(
        &pods,
        NODE,
        &Sources::new(),
        |ns| ns == "ml",
        &mut Finals::new(),
    );
    assert_eq!(
        set.values().map(|w| w.id.name.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
}

#[test]
fn unchanged_pods_keep_the_same_compiled_policy() {
    let s = sources(
        &[policy_configmap("chat", "p", "1", None, REWRITE_GPT4)],
        &[],
    );
    let pods = [
        pod("chat", "a", &[(AI, "true"), (AI_MODEL, "m1")], &[]),
        pod("chat", "b", &[(AI, "true")], &[]),
    ];
    let mut finals = Finals::new();
    let first = desired(&pods, NODE, &s, |_| true, &mut finals);
    let second = desired(&pods, NODE, &s, |_| true, &mut finals);
    let bare = [ai_pod("chat", "c", &[])];
    let none = Sources::new();
    let (x, y) = (
        desired(&bare, NODE, &none, |_| true, &mut finals),
        desired(&bare, NODE, &none, |_| true, &mut finals),
    );
    assert!(
        Arc::ptr_eq(&x["uid-c"].policy, &y["uid-c"].policy),
        "one empty policy"
    );
    for uid in ["uid-a", "uid-b"] {
        assert!(
            Arc::ptr_eq(&first[uid].policy, &second[uid].policy),
            "{uid} recompiled"
        );
    }
    assert!(Arc::ptr_eq(
        &second["uid-b"].policy,
        &s.labelled_in("chat")[0].policy
    ));
}

#[test]
fn same_set_sees_every_change_that_matters() {
    let s = sources(
        &[policy_configmap("chat", "p", "1", None, REWRITE_GPT4)],
        &[],
    );
    let base = [ai_pod("chat", "a", &[])];
    let set = Arc::new(resolve_all(&base, &s));
    assert!(same_set(&set, &resolve_all(&base, &s)));
    let mut moved = base[0].clone();
    moved.status.as_mut().unwrap().pod_ips = None;
    moved.status.as_mut().unwrap().pod_ip = Some("10.0.0.8".into());
    assert!(!same_set(&set, &resolve_all(&[moved], &s)));
    let model = pod("chat", "a", &[(AI, "true"), (AI_MODEL, "m")], &[]);
    assert!(!same_set(&set, &resolve_all(&[model], &s)));
    let changed = sources(&[policy_configmap("chat", "p", "2", None, DENY_70B)], &[]);
    assert!(!same_set(&set, &resolve_all(&base, &changed)));
    assert!(!same_set(&set, &BTreeMap::new()));
}
