//! The watch loop: reflectors over this node's Pods, the labelled policy ConfigMaps
//! and, per namespace of annotated pods, the proof of concept's per-pod ConfigMaps;
//! on any change (debounced), the whole desired set recomputed from the caches and
//! published if it differs.
//!
//! What is watched, and why so:
//! - Pods: `spec.nodeName=<node>`, all namespaces. The apiserver filters, so each
//!   agent receives its own node's pods only.
//! - Policy ConfigMaps: label `kube-gateway.io/policy`, all namespaces. Few objects;
//!   the apiserver filters by label.
//! - Per-pod ConfigMaps (`<pod>-kube-gateway`): they carry no label, and a field
//!   selector names one object, with no "or", so neither selector can gather them in
//!   one watch; a cluster-wide unfiltered ConfigMap watch would send every ConfigMap
//!   change of the cluster to every node. They are watched per namespace that holds an
//!   annotated pod of this node, and only names ending in `-kube-gateway` are kept.
//!   kube-rs speaks HTTP/1.1, one connection per watch, so one watch per namespace
//!   (usually a handful) rather than one per pod (up to the node's ~110). A namespace's
//!   watch stops when its last annotated pod leaves the node.
//!
//! Lists are served from the apiserver's watch cache (`resourceVersion=0`, unpaged),
//! as client-go's informers do, so a thousand agents starting together do not each
//! read from etcd.
//!
//! Nothing is published until the pods, the policy ConfigMaps and the per-pod
//! ConfigMaps of the first pods' namespaces are listed: a partial first set would make
//! a restarted agent detach pods it is about to attach again. The first set is always
//! published (so an empty one is seen), later ones only when they differ. A pod whose
//! namespace's per-pod ConfigMaps are not listed yet waits for them.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::{self, BoxFuture};
use futures_util::stream::{self, AbortHandle, BoxStream, FuturesUnordered, SelectAll};
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::annotations::{POD_CONFIGMAP_SUFFIX, POLICY_LABEL};
use crate::config::WatcherConfig;
use crate::events::{reason, Poster, Reporter, Say};
use crate::resolve::{self, Finals};
use crate::sources::{Rejection, Sources};
use crate::WorkloadSet;

/// Why [`run`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatcherError {
    #[error("no node name: the watcher serves one node (NODE_NAME, from spec.nodeName)")]
    NoNodeName,
    #[error("the {what} watch ended; watches retry with backoff and should not end")]
    WatchEnded { what: &'static str },
}

type Item<K> = Result<watcher::Event<K>, watcher::Error>;

/// Watches `config.node_name`'s pods and the policy ConfigMaps, and publishes the
/// desired set on `tx` until every receiver is gone (then returns `Ok`). API errors
/// are logged and retried with backoff; ConfigMaps that do not validate get a
/// `PolicyInvalid` Event, once per version.
pub async fn run(
    client: Client,
    config: WatcherConfig,
    tx: watch::Sender<WorkloadSet>,
) -> Result<(), WatcherError> {
    let reporter = Reporter::new(config.reporting_instance.clone());
    let poster = Poster::new(client.clone(), reporter);
    run_with(client, config, tx, poster).await
}

/// Watch settings shared by every cache: lists from the watch cache, unpaged (the
/// apiserver serves `resourceVersion=0` only without a limit).
fn cache_config() -> watcher::Config {
    let mut config = watcher::Config::default().any_semantic();
    config.page_size = None;
    config
}

/// Notes what an item means for readiness; whether the cache changed.
fn observe<K>(ready: &mut bool, item: &Item<K>, what: &str) -> bool {
    match item {
        Ok(watcher::Event::InitDone) => {
            *ready = true;
            true
        }
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => false,
        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => true,
        Err(e) => {
            tracing::warn!(watch = what, error = %e, "watch failed; retrying with backoff");
            false
        }
    }
}

/// One namespace's per-pod ConfigMap watch.
struct NamespaceWatch {
    generation: u64,
    store: Store<ConfigMap>,
    ready: bool,
    abort: AbortHandle,
}

type NamespaceItem = (String, u64, Item<ConfigMap>);

/// Whether a namespace watch keeps this event (per-pod ConfigMaps only).
fn per_pod_only(ev: &watcher::Event<ConfigMap>) -> bool {
    match ev {
        watcher::Event::Apply(cm) | watcher::Event::Delete(cm) | watcher::Event::InitApply(cm) => {
            cm.name_any().ends_with(POD_CONFIGMAP_SUFFIX)
        }
        watcher::Event::Init | watcher::Event::InitDone => true,
    }
}

/// Everything the loop keeps between changes.
struct State {
    client: Client,
    config: WatcherConfig,
    poster: Arc<Poster>,
    pods: Store<Pod>,
    pods_ready: bool,
    policies: Store<ConfigMap>,
    policies_ready: bool,
    namespaces: HashMap<String, NamespaceWatch>,
    next_generation: u64,
    sources: Sources,
    finals: Finals,
    published: bool,
}

impl State {
    fn start_namespace(
        &mut self,
        ns: &str,
        streams: &mut SelectAll<BoxStream<'static, NamespaceItem>>,
    ) {
        let (store, writer) = reflector::store();
        let generation = self.next_generation;
        self.next_generation += 1;
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let name = ns.to_owned();
        let watch = watcher(api, cache_config())
            .default_backoff()
            .try_filter(|ev| future::ready(per_pod_only(ev)))
            .modify(|cm| cm.managed_fields_mut().clear())
            .reflect(writer)
            .map(move |item| (name.clone(), generation, item));
        let (watch, abort) = stream::abortable(watch);
        streams.push(watch.boxed());
        let watch = NamespaceWatch {
            generation,
            store,
            ready: false,
            abort,
        };
        self.namespaces.insert(ns.to_owned(), watch);
        tracing::debug!(namespace = ns, "watching per-pod policy ConfigMaps");
    }

    /// Starts and stops namespace watches to follow the annotated pods.
    fn follow_namespaces(&mut self, streams: &mut SelectAll<BoxStream<'static, NamespaceItem>>) {
        let pods = self.pods.state();
        let needed =
            resolve::namespaces_to_watch(pods.iter().map(|p| &**p), &self.config.node_name);
        self.namespaces.retain(|ns, w| {
            let keep = needed.contains(ns);
            if !keep {
                w.abort.abort();
            }
            keep
        });
        for ns in needed {
            if !self.namespaces.contains_key(&ns) {
                self.start_namespace(&ns, streams);
            }
        }
    }

    /// Recomputes the desired set and publishes it if it changed; returns the
    /// ConfigMap versions refused for the first time.
    fn recompute(&mut self, tx: &watch::Sender<WorkloadSet>) -> Vec<Rejection> {
        if !(self.pods_ready && self.policies_ready) {
            return Vec::new();
        }
        if !self.published && !self.namespaces.values().all(|w| w.ready) {
            return Vec::new();
        }
        let pods = self.pods.state();
        let labelled = self.policies.state();
        let per_pod: Vec<Arc<ConfigMap>> = self
            .namespaces
            .values()
            .filter(|w| w.ready)
            .flat_map(|w| w.store.state())
            .collect();
        let rejections = self
            .sources
            .update(labelled.iter().map(|c| &**c), per_pod.iter().map(|c| &**c));
        let ready = |ns: &str| self.namespaces.get(ns).is_some_and(|w| w.ready);
        let desired = resolve::desired(
            pods.iter().map(|p| &**p),
            &self.config.node_name,
            &self.sources,
            ready,
            &mut self.finals,
        );
        let first = !self.published;
        let count = desired.len();
        let changed = tx.send_if_modified(|current| {
            if !first && resolve::same_set(current, &desired) {
                return false;
            }
            // Workloads that did not change stay the same `Arc`s, for cheap comparisons.
            let next = desired
                .into_iter()
                .map(|(uid, w)| match current.get(&uid) {
                    Some(old) if old.same_as(&w) => (uid, old.clone()),
                    _ => (uid, w),
                })
                .collect();
            *current = Arc::new(next);
            true
        });
        if changed {
            tracing::info!(workloads = count, "desired workload set published");
        }
        self.published = true;
        rejections
    }
}

/// A `PolicyInvalid` Event for `r`, posted off the loop's path.
fn post_rejection(poster: Arc<Poster>, r: Rejection) -> BoxFuture<'static, ()> {
    async move {
        let note = r.note();
        tracing::warn!(
            configmap = %format!(
                "{}/{}",
                r.configmap.namespace.as_deref().unwrap_or(""),
                r.configmap.name.as_deref().unwrap_or("")
            ),
            %note,
            "policy ConfigMap refused"
        );
        let say = Say {
            warning: true,
            reason: reason::POLICY_INVALID,
            action: reason::ACTION_VALIDATE,
            note: &note,
        };
        if let Err(e) = poster.post(say, &r.configmap).await {
            tracing::warn!(error = %e, "cannot post the PolicyInvalid Event");
        }
    }
    .boxed()
}

/// [`run`] with the Event poster given (tests pin its clock).
pub(crate) async fn run_with(
    client: Client,
    config: WatcherConfig,
    tx: watch::Sender<WorkloadSet>,
    poster: Poster,
) -> Result<(), WatcherError> {
    if config.node_name.is_empty() {
        return Err(WatcherError::NoNodeName);
    }
    let (pod_store, pod_writer) = reflector::store();
    let pod_watch = cache_config().fields(&format!("spec.nodeName={}", config.node_name));
    let mut pods = watcher(Api::<Pod>::all(client.clone()), pod_watch)
        .default_backoff()
        .modify(|p| p.managed_fields_mut().clear())
        .reflect(pod_writer)
        .boxed();
    let (policy_store, policy_writer) = reflector::store();
    let mut policies = watcher(
        Api::<ConfigMap>::all(client.clone()),
        cache_config().labels(POLICY_LABEL),
    )
    .default_backoff()
    .modify(|cm| cm.managed_fields_mut().clear())
    .reflect(policy_writer)
    .boxed();
    let debounce = config.debounce;
    let mut state = State {
        client,
        config,
        poster: Arc::new(poster),
        pods: pod_store,
        pods_ready: false,
        policies: policy_store,
        policies_ready: false,
        namespaces: HashMap::new(),
        next_generation: 0,
        sources: Sources::new(),
        finals: Finals::new(),
        published: false,
    };
    let mut namespace_streams: SelectAll<BoxStream<'static, NamespaceItem>> = SelectAll::new();
    let mut posts: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    let mut due: Option<Instant> = None;
    loop {
        let changed = tokio::select! {
            item = pods.next() => {
                let item = item.ok_or(WatcherError::WatchEnded { what: "Pod" })?;
                observe(&mut state.pods_ready, &item, "Pod")
            }
            item = policies.next() => {
                let item = item.ok_or(WatcherError::WatchEnded { what: "policy ConfigMap" })?;
                observe(&mut state.policies_ready, &item, "policy ConfigMap")
            }
            Some((ns, generation, item)) = namespace_streams.next(), if !namespace_streams.is_empty() => {
                match state.namespaces.get_mut(&ns) {
                    Some(w) if w.generation == generation => {
                        observe(&mut w.ready, &item, "per-pod ConfigMap")
                    }
                    _ => false,
                }
            }
            Some(()) = posts.next(), if !posts.is_empty() => false,
            () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                due = None;
                // Namespace watches first: one just started holds back the first set.
                if state.pods_ready {
                    state.follow_namespaces(&mut namespace_streams);
                }
                for r in state.recompute(&tx) {
                    posts.push(post_rejection(state.poster.clone(), r));
                }
                false
            }
            () = tx.closed() => return Ok(()),
        };
        if changed && due.is_none() {
            due = Some(Instant::now() + debounce);
        }
    }
}

#[cfg(test)]
#[path = "run_tests.rs"]
mod tests;
