//! The install manifests (`deploy/`) and the Kubernetes examples (`ai-demo/k8s/`) against the Kubernetes API types this project
//! compiles with (k8s-openapi, the oldest Kubernetes it supports): `kubectl kustomize`
//! renders the base and each overlay, and every object must deserialize into its typed
//! struct and serialize back to exactly what was rendered. k8s-openapi ignores unknown
//! fields, so the round trip is what catches a misspelled or misplaced field (it would
//! be dropped). Needs `kubectl` (Debian `kubernetes-client`): skipped without it, except
//! under CI=true, where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::serde::de::DeserializeOwned;
use k8s_openapi::serde::Serialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The objects `kubectl kustomize DIR` renders, or None when kubectl is missing here.
fn render(dir: &str) -> Option<Vec<Value>> {
    let out = match Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "kubectl is missing, and CI must check the manifests"
            );
            println!("skipped: kubectl is missing (Debian kubernetes-client)");
            return None;
        }
        Err(e) => panic!("kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // kubectl separates the objects with a `---` line.
    let docs: Vec<Value> = text
        .split("\n---\n")
        .map(|doc| serde_yaml_ng::from_str::<Value>(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    assert!(!docs.is_empty(), "{dir} rendered nothing");
    Some(docs)
}

/// `obj` deserialized as `T` and serialized back: must be what was rendered.
fn round_trip<T: DeserializeOwned + Serialize>(obj: &Value) {
    let typed: T = serde_json::from_value(obj.clone()).unwrap_or_else(|e| {
        panic!(
            "{} {} does not parse: {e}",
            obj["kind"], obj["metadata"]["name"]
        )
    });
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, obj,
        "{} {}: the typed object differs from the rendered one (an unknown or misplaced field?)",
        obj["kind"], obj["metadata"]["name"]
    );
}

/// Checks every object of `dir`; returns the kinds seen, in order.
fn check(dir: &str) -> Option<Vec<String>> {
    let docs = render(dir)?;
    let mut kinds = Vec::new();
    for obj in &docs {
        let api = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        match (api, kind) {
            ("v1", "Namespace") => round_trip::<Namespace>(obj),
            ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(obj),
            ("v1", "Service") => round_trip::<Service>(obj),
            ("v1", "Secret") => round_trip::<Secret>(obj),
            ("v1", "ConfigMap") => round_trip::<ConfigMap>(obj),
            ("v1", "Pod") => round_trip::<Pod>(obj),
            ("apps/v1", "Deployment") => round_trip::<Deployment>(obj),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(obj),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                round_trip::<ClusterRoleBinding>(obj)
            }
            ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(obj),
            // A CRD of the Prometheus operator: no k8s-openapi type. Its shape is checked
            // below and by tests/deploy/test_manifests.py.
            ("monitoring.coreos.com/v1", "ServiceMonitor") => {}
            other => panic!("{dir}: no check for {other:?}: add its type here"),
        }
        kinds.push(kind.to_owned());
    }
    Some(kinds)
}

#[test]
fn the_base_parses_into_its_api_types() {
    let Some(kinds) = check("deploy") else { return };
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Service",
            "DaemonSet"
        ]
    );
}

#[test]
fn the_overlays_parse_into_their_api_types() {
    let Some(kinds) = check("deploy/overlays/monitoring") else {
        return;
    };
    assert!(kinds.iter().any(|k| k == "ServiceMonitor"));
    let Some(kinds) = check("deploy/overlays/postgres") else {
        return;
    };
    assert!(kinds.iter().all(|k| k != "ServiceMonitor"));
}

#[test]
fn the_ai_demo_examples_parse_into_their_api_types() {
    let Some(kinds) = check("ai-demo/k8s") else {
        return;
    };
    for kind in ["Namespace", "ConfigMap", "Service", "Deployment"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in ai-demo/k8s");
    }
}

#[test]
fn the_daemonset_is_the_least_privilege_node_agent() {
    let Some(docs) = render("deploy") else { return };
    let ds = docs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let ds: DaemonSet = serde_json::from_value(ds.clone()).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_pid, Some(true));
    assert_ne!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    assert_eq!(caps.add.unwrap(), ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"]);
    let env = c.env.clone().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node.value_from.clone().unwrap().field_ref.unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
}
