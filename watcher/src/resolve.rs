//! From cached Pods and compiled policy sources to the desired [`WorkloadSet`]: which
//! pods are served, and with which policy. No I/O: the same caches give the same set.
//!
//! Precedence, for an annotated pod (the README's table):
//!
//! | | source | applies to |
//! |---|---|---|
//! | a | ConfigMaps labelled `kube-gateway.io/policy` in the pod's namespace, key `policy.yaml` | the pods their `kube-gateway.io/selector` matches; none: every annotated pod of the namespace |
//! | b | the proof of concept's ConfigMap `<pod>-kube-gateway`, key `config` | that pod |
//! | c | the pod's `kube-gateway.io/ai-model` annotation | that pod: every model it asks for is rewritten to it, after the policy's own rewrites |
//!
//! (a) wins over (b); (c) is added to whichever policy applies (or to an empty one).
//! Several labelled ConfigMaps matching one pod do not merge: one is chosen (see
//! [`choose`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::core::SelectorExt;
use kube::ResourceExt;
use kube_gateway_policy::{load, ModelRewrite, Policy};

use crate::annotations::{AI, AI_MODEL, NETFLUSH};
use crate::sources::{PolicySource, Sources};
use crate::{Workload, WorkloadId, WorkloadSet};

/// How [`Workload::policy_sources`] names the `ai-model` annotation.
pub const AI_MODEL_SOURCE: &str = "annotation/kube-gateway.io/ai-model";

/// Whether the pod asks for the gateway (`kube-gateway.io/ai: "true"`).
pub fn annotated(pod: &Pod) -> bool {
    pod.annotations().get(AI).is_some_and(|v| v == "true")
}

/// Whether the pod is being deleted.
fn deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// The pod's IPs (`status.podIPs`, else `status.podIP`); unparsable ones skipped.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let mut ips: Vec<IpAddr> = listed.filter_map(|ip| ip.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips
}

/// Whether `pod` is to be served on `node`: annotated, on `node`, Running, with an IP,
/// not being deleted.
pub fn eligible(pod: &Pod, node: &str) -> bool {
    let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Running");
    annotated(pod) && on_node && running && !deleting(pod) && !pod_ips(pod).is_empty()
}

/// The namespaces whose per-pod ConfigMaps must be watched: those of the annotated
/// pods on `node` that are not being deleted (Pending ones included, so their
/// ConfigMap is known when they start running).
pub fn namespaces_to_watch<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    node: &str,
) -> std::collections::BTreeSet<String> {
    pods.into_iter()
        .filter(|p| annotated(p) && !deleting(p))
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter_map(|p| p.namespace())
        .collect()
}

/// The `ai-model` annotation, if it names a model.
fn model_annotation(pod: &Pod) -> Option<String> {
    let m = pod.annotations().get(AI_MODEL)?.trim();
    (!m.is_empty()).then(|| m.to_owned())
}

/// The policy source of `pod`, by precedence: the most specific labelled ConfigMap of
/// its namespace that selects it, else its per-pod ConfigMap, else none.
///
/// Among labelled ConfigMaps the most specific wins: one whose selector matches the
/// pod beats one without a selector (which applies to the whole namespace); among
/// equals, the first by name. Merging their rule lists was rejected: a pod's policy
/// would then depend on every ConfigMap of the namespace, in an order nobody chose,
/// and adding a namespace-wide ConfigMap could silently change what a pod's own
/// ConfigMap does. With one winner, `kubectl get cm -l kube-gateway.io/policy` and the
/// pod's labels say which policy applies, and the Workload names it.
pub fn choose<'a>(pod: &Pod, sources: &'a Sources) -> Option<&'a PolicySource> {
    let namespace = pod.namespace()?;
    let labels = pod.labels();
    let selected = sources
        .labelled_in(&namespace)
        .into_iter()
        .filter(|s| s.selector.as_ref().is_none_or(|sel| sel.matches(labels)));
    selected
        .min_by(|a, b| (a.selector.is_none(), &a.name).cmp(&(b.selector.is_none(), &b.name)))
        .or_else(|| sources.per_pod(&namespace, &pod.name_any()))
}

/// Compiled per-pod variants of policies (a policy plus an `ai-model` fallback), so an
/// unchanged pod keeps the same `Arc<Policy>` and nothing is compiled twice.
#[derive(Debug, Default)]
pub struct Finals {
    memo: HashMap<(String, String), Arc<Policy>>,
    /// The policy of pods without any source: one, shared.
    empty: Arc<Policy>,
}

impl Finals {
    pub fn new() -> Self {
        Self::default()
    }

    /// The final policy: `source`'s (or the empty one) with every model rewritten to
    /// `model` where its own rewrites change nothing, as the gateway's `--model` does.
    fn policy(
        &mut self,
        source: Option<&PolicySource>,
        model: Option<&str>,
        used: &mut HashSet<(String, String)>,
    ) -> Arc<Policy> {
        let Some(model) = model else {
            return source.map_or_else(|| self.empty.clone(), |s| s.policy.clone());
        };
        let version = source.map_or(String::new(), |s| {
            format!("{}@{}", s.uid, s.resource_version)
        });
        let key = (version, model.to_owned());
        used.insert(key.clone());
        if let Some(p) = self.memo.get(&key) {
            return p.clone();
        }
        // The text compiled before, so it compiles again; were it not to, the policy as
        // written still applies, without the fallback.
        let base = match source {
            None => Some(Policy::default()),
            Some(s) => load(&s.text).ok(),
        };
        let (Some(mut policy), Ok(fallback)) = (base, ModelRewrite::everything_to(model)) else {
            return source.map_or_else(|| self.empty.clone(), |s| s.policy.clone());
        };
        policy.models.rewrite = std::mem::take(&mut policy.models.rewrite).then(&fallback);
        let policy = Arc::new(policy);
        self.memo.insert(key, policy.clone());
        policy
    }
}

/// The workload `pod` makes, if it is [`eligible`] on `node`.
fn workload(
    pod: &Pod,
    node: &str,
    sources: &Sources,
    finals: &mut Finals,
    used: &mut HashSet<(String, String)>,
) -> Option<Workload> {
    if !eligible(pod, node) {
        return None;
    }
    let source = choose(pod, sources);
    let model = model_annotation(pod);
    let policy = finals.policy(source, model.as_deref(), used);
    let mut policy_sources: Vec<String> = source.iter().map(|s| s.label()).collect();
    if model.is_some() {
        policy_sources.push(AI_MODEL_SOURCE.to_owned());
    }
    let spec = pod.spec.as_ref();
    Some(Workload {
        id: WorkloadId {
            namespace: pod.namespace()?,
            name: pod.name_any(),
            uid: pod.uid()?,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            node: node.to_owned(),
        },
        ips: pod_ips(pod),
        model,
        netflush: pod.annotations().get(NETFLUSH).is_some_and(|v| v == "true"),
        policy,
        policy_sources,
    })
}

/// The desired set from the cached pods: every eligible pod whose namespace `ready`
/// says is known (its per-pod ConfigMaps listed), with its resolved policy.
pub fn desired<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    node: &str,
    sources: &Sources,
    ready: impl Fn(&str) -> bool,
    finals: &mut Finals,
) -> BTreeMap<String, Arc<Workload>> {
    let mut used = HashSet::new();
    let set = pods
        .into_iter()
        .filter(|p| p.namespace().is_some_and(|ns| ready(&ns)))
        .filter_map(|p| workload(p, node, sources, finals, &mut used))
        .map(|w| (w.id.uid.clone(), Arc::new(w)))
        .collect();
    finals.memo.retain(|k, _| used.contains(k));
    set
}

/// Whether two sets serve the same pods the same way (same policies by hash and
/// source, same addresses and settings).
pub fn same_set(a: &WorkloadSet, b: &BTreeMap<String, Arc<Workload>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((ka, wa), (kb, wb))| ka == kb && wa.same_as(wb))
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
