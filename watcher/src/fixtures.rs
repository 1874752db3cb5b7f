//! Test objects: Pods and ConfigMaps as the API server would send them, and policy
//! texts, shared by the unit tests and the mocked-API tests.

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use serde_json::{json, Value};

use crate::annotations::{AI, POLICY_LABEL, SELECTOR};

/// The node the tests serve.
pub const NODE: &str = "node-a";

/// A valid policy: `gpt-4*` becomes `gpt-4o-mini`.
pub const REWRITE_GPT4: &str =
    "apiVersion: kube-gateway.io/v1alpha1\nmodels:\n  rewrite:\n    - { from: \"gpt-4*\", to: gpt-4o-mini }\n";
/// A valid policy that denies `*-70b*` models.
pub const DENY_70B: &str = "apiVersion: kube-gateway.io/v1alpha1\nmodels:\n  deny: [\"*-70b*\"]\n";
/// A policy that does not validate: the regex at `promptRules[0].match.regex`.
pub const BAD_REGEX: &str = "apiVersion: kube-gateway.io/v1alpha1\npromptRules:\n  - name: broken\n    match: { regex: \"(\" }\n    action: deny\n";
/// The proof of concept's JSON: `llama3.2:1b` becomes `gemma2:2b`.
pub const POC_JSON: &str =
    r#"{"request":{"modelReplace":[{"orig":"llama3.2:1b","new":"gemma2:2b"}]},"response":{}}"#;

/// A pod's JSON on [`NODE`], Running with IP `ip`, annotated with `annotations`.
pub fn pod_json(
    ns: &str,
    name: &str,
    ip: &str,
    annotations: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> Value {
    let map = |pairs: &[(&str, &str)]| -> serde_json::Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect()
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": ns,
            "name": name,
            "uid": format!("uid-{name}"),
            "resourceVersion": "1",
            "annotations": map(annotations),
            "labels": map(labels),
        },
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": "chat-sa",
            "containers": [{ "name": "app", "image": "app:1" }],
        },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

/// [`pod_json`] as a Pod.
pub fn pod(ns: &str, name: &str, annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(pod_json(ns, name, "10.0.0.7", annotations, labels)).unwrap()
}

/// An annotated pod (`kube-gateway.io/ai: "true"`) with `labels`.
pub fn ai_pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
    pod(ns, name, &[(AI, "true")], labels)
}

/// A ConfigMap's JSON.
pub fn configmap_json(
    ns: &str,
    name: &str,
    rv: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    data: &[(&str, &str)],
) -> Value {
    let map = |pairs: &[(&str, &str)]| -> serde_json::Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect()
    };
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "namespace": ns,
            "name": name,
            "uid": format!("uid-cm-{name}"),
            "resourceVersion": rv,
            "labels": map(labels),
            "annotations": map(annotations),
        },
        "data": map(data),
    })
}

/// A labelled policy ConfigMap's JSON (`policy.yaml`), with its selector if any.
pub fn policy_configmap_json(
    ns: &str,
    name: &str,
    rv: &str,
    selector: Option<&str>,
    policy: &str,
) -> Value {
    let annotations: Vec<(&str, &str)> = selector.map(|s| (SELECTOR, s)).into_iter().collect();
    configmap_json(
        ns,
        name,
        rv,
        &[(POLICY_LABEL, "")],
        &annotations,
        &[("policy.yaml", policy)],
    )
}

/// [`policy_configmap_json`] as a ConfigMap.
pub fn policy_configmap(
    ns: &str,
    name: &str,
    rv: &str,
    selector: Option<&str>,
    policy: &str,
) -> ConfigMap {
    serde_json::from_value(policy_configmap_json(ns, name, rv, selector, policy)).unwrap()
}

/// The proof of concept's `<pod>-kube-gateway` ConfigMap, key `config`.
pub fn per_pod_configmap(ns: &str, pod: &str, rv: &str, config: &str) -> ConfigMap {
    let name = format!("{pod}-kube-gateway");
    serde_json::from_value(configmap_json(
        ns,
        &name,
        rv,
        &[],
        &[],
        &[("config", config)],
    ))
    .unwrap()
}
