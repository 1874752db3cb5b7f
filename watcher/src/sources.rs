//! Policy ConfigMaps compiled, each version once: the last good policy of every
//! ConfigMap, and the versions refused (each reported once, as a [`Rejection`]).
//!
//! A ConfigMap whose new version does not validate keeps serving its last good version
//! (policy and selector together); one that was never valid is ignored. Deleting a
//! ConfigMap forgets it: a new one of the same name starts without a last good version.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::core::Selector;
use kube::{Resource, ResourceExt};
use kube_gateway_policy::{load, Policy, PolicyError};

use crate::annotations::{POD_CONFIGMAP_KEY, POD_CONFIGMAP_SUFFIX, POLICY_KEY, SELECTOR};
use crate::selector;

/// Which convention a policy ConfigMap follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    /// Labelled `kube-gateway.io/policy`, key `policy.yaml`, pods chosen by the
    /// `kube-gateway.io/selector` annotation.
    Labelled,
    /// The proof of concept's `<pod>-kube-gateway`, key `config`, for that pod only.
    PerPod,
}

impl SourceKind {
    /// The data key the policy is read from.
    pub fn key(self) -> &'static str {
        match self {
            SourceKind::Labelled => POLICY_KEY,
            SourceKind::PerPod => POD_CONFIGMAP_KEY,
        }
    }
}

/// The last good version of one policy ConfigMap, compiled.
#[derive(Debug)]
pub struct PolicySource {
    pub kind: SourceKind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The version this was compiled from.
    pub resource_version: String,
    /// The pods it applies to ([`SourceKind::Labelled`]); `None`: every annotated pod
    /// of its namespace.
    pub selector: Option<Selector>,
    /// Its text, kept to compile per-pod variants (the `ai-model` fallback).
    pub text: Arc<str>,
    /// Compiled as written.
    pub policy: Arc<Policy>,
}

impl PolicySource {
    /// `configmap/NS/NAME`, as [`crate::Workload::policy_sources`] lists it.
    pub fn label(&self) -> String {
        format!("configmap/{}/{}", self.namespace, self.name)
    }
}

/// A ConfigMap version that was refused: the Event to post on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The ConfigMap, at the refused version (`resourceVersion` set).
    pub configmap: ObjectReference,
    /// Every problem, each with its path (`data["policy.yaml"].promptRules[0]...`).
    pub problems: Vec<PolicyError>,
    /// The version still in force, if an earlier one was good.
    pub kept: Option<String>,
}

impl Rejection {
    /// The Event's note: the problems, and what stays in force.
    pub fn note(&self) -> String {
        let problems: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        let outcome = match &self.kept {
            Some(rv) => format!("the last good version (resourceVersion {rv}) stays in force"),
            None => "ignored: no earlier version was valid".to_owned(),
        };
        format!("policy not valid: {}; {outcome}", problems.join("; "))
    }
}

#[derive(Debug)]
struct Entry {
    /// The newest version looked at (compiled or refused).
    seen: String,
    good: Option<Arc<PolicySource>>,
}

/// Every policy ConfigMap's last good version, by kind and uid.
#[derive(Debug, Default)]
pub struct Sources {
    entries: HashMap<(SourceKind, String), Entry>,
}

impl Sources {
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings the state up to the ConfigMaps in the caches (labelled ones and per-pod
    /// ones): new versions are compiled, ConfigMaps gone are forgotten. Returns the
    /// versions refused that were not seen before.
    pub fn update<'a>(
        &mut self,
        labelled: impl IntoIterator<Item = &'a ConfigMap>,
        per_pod: impl IntoIterator<Item = &'a ConfigMap>,
    ) -> Vec<Rejection> {
        let mut rejections = Vec::new();
        let mut present = std::collections::HashSet::new();
        let all = labelled
            .into_iter()
            .map(|c| (SourceKind::Labelled, c))
            .chain(per_pod.into_iter().map(|c| (SourceKind::PerPod, c)));
        for (kind, cm) in all {
            let (Some(uid), Some(rv)) = (cm.uid(), cm.resource_version()) else {
                continue;
            };
            let key = (kind, uid);
            present.insert(key.clone());
            if self.entries.get(&key).is_some_and(|e| e.seen == rv) {
                continue;
            }
            let entry = self.entries.entry(key).or_insert(Entry {
                seen: String::new(),
                good: None,
            });
            entry.seen = rv;
            match compile(kind, cm) {
                Ok(source) => entry.good = Some(Arc::new(source)),
                Err(problems) => rejections.push(Rejection {
                    configmap: reference(cm),
                    problems,
                    kept: entry.good.as_ref().map(|g| g.resource_version.clone()),
                }),
            }
        }
        self.entries.retain(|k, _| present.contains(k));
        rejections
    }

    /// The good labelled policies of `namespace`.
    pub fn labelled_in(&self, namespace: &str) -> Vec<&PolicySource> {
        self.entries
            .iter()
            .filter_map(|((kind, _), e)| {
                let g = e.good.as_deref()?;
                (*kind == SourceKind::Labelled && g.namespace == namespace).then_some(g)
            })
            .collect()
    }

    /// The good per-pod policy of `pod` (`<pod>-kube-gateway`) in `namespace`.
    pub fn per_pod(&self, namespace: &str, pod: &str) -> Option<&PolicySource> {
        let name = format!("{pod}{POD_CONFIGMAP_SUFFIX}");
        self.entries.iter().find_map(|((kind, _), e)| {
            let g = e.good.as_deref()?;
            (*kind == SourceKind::PerPod && g.namespace == namespace && g.name == name).then_some(g)
        })
    }
}

/// `data["KEY"]`, the path of a ConfigMap's data key.
fn data_path(key: &str) -> String {
    format!("data[{key:?}]")
}

fn compile(kind: SourceKind, cm: &ConfigMap) -> Result<PolicySource, Vec<PolicyError>> {
    let key = kind.key();
    let mut problems = Vec::new();
    let selector = match (kind, cm.annotations().get(SELECTOR)) {
        (SourceKind::Labelled, Some(text)) => match selector::parse(text) {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(PolicyError {
                    path: format!("metadata.annotations[{SELECTOR:?}]"),
                    message: e.to_string(),
                });
                None
            }
        },
        _ => None,
    };
    let text = cm.data.as_ref().and_then(|d| d.get(key));
    let policy = match text {
        None => {
            problems.push(PolicyError {
                path: data_path(key),
                message: "missing: the policy goes under this key".to_owned(),
            });
            None
        }
        Some(text) => match load(text) {
            Ok(p) => Some(p),
            Err(errors) => {
                problems.extend(errors.0.into_iter().map(|e| PolicyError {
                    path: if e.path.is_empty() {
                        data_path(key)
                    } else {
                        format!("{}.{}", data_path(key), e.path)
                    },
                    message: e.message,
                }));
                None
            }
        },
    };
    match (policy, text) {
        (Some(policy), Some(text)) if problems.is_empty() => Ok(PolicySource {
            kind,
            namespace: cm.namespace().unwrap_or_default(),
            name: cm.name_any(),
            uid: cm.uid().unwrap_or_default(),
            resource_version: cm.resource_version().unwrap_or_default(),
            selector: selector.filter(|s| !s.selects_all()),
            text: Arc::from(text.as_str()),
            policy: Arc::new(policy),
        }),
        _ => Err(problems),
    }
}

/// The ConfigMap as an Event's `regarding`, at its version.
fn reference(cm: &ConfigMap) -> ObjectReference {
    ObjectReference {
        api_version: Some(ConfigMap::api_version(&()).into_owned()),
        kind: Some(ConfigMap::kind(&()).into_owned()),
        namespace: cm.namespace(),
        name: Some(cm.name_any()),
        uid: cm.uid(),
        resource_version: cm.resource_version(),
        field_path: None,
    }
}

#[cfg(test)]
#[path = "sources_tests.rs"]
mod tests;
