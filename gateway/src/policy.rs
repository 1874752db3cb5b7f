//! The policy in force: compiled off the request path, swapped in whole and atomically,
//! and reloaded when its file changes. A broken version is refused with its errors
//! logged; the last good policy stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use kube_gateway_policy::{load, ModelRewrite, Policy, PolicyErrors};
use serde::Serialize;

/// What is known about the policy in force.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyInfo {
    /// SHA-256 of its text (empty for the built-in empty policy).
    pub hash: String,
    pub loaded_at: SystemTime,
    pub source: Option<PathBuf>,
    pub format: &'static str,
}

/// The shared, swappable policy.
pub struct PolicyStore {
    current: ArcSwap<Policy>,
    info: ArcSwap<PolicyInfo>,
    /// `--model`: applies where the policy's own model rules change nothing.
    fallback: ModelRewrite,
}

/// A policy file could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy {path} is not valid:\n{errors}")]
    Invalid { path: PathBuf, errors: PolicyErrors },
}

/// Reads and compiles a policy file.
pub fn load_file(path: &Path) -> Result<Policy, PolicyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyLoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    load(&text).map_err(|errors| PolicyLoadError::Invalid {
        path: path.to_owned(),
        errors,
    })
}

fn format_name(p: &Policy) -> &'static str {
    match p.format {
        kube_gateway_policy::Format::V1Alpha1 => "v1alpha1",
        kube_gateway_policy::Format::ProofOfConcept => "proof-of-concept",
    }
}

impl PolicyStore {
    pub fn new(initial: Policy, source: Option<PathBuf>, fallback: ModelRewrite) -> Self {
        let info = PolicyInfo {
            hash: initial.hash.clone(),
            loaded_at: SystemTime::now(),
            source,
            format: format_name(&initial),
        };
        let store = Self {
            current: ArcSwap::from_pointee(Policy::default()),
            info: ArcSwap::from_pointee(info),
            fallback,
        };
        store.current.store(Arc::new(store.prepare(initial)));
        store
    }

    fn prepare(&self, mut policy: Policy) -> Policy {
        policy.models.rewrite = std::mem::take(&mut policy.models.rewrite).then(&self.fallback);
        policy
    }

    /// The policy in force (cheap: one atomic load).
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn info(&self) -> Arc<PolicyInfo> {
        self.info.load_full()
    }

    /// A store of a policy compiled and resolved elsewhere (a pod's, from the watcher:
    /// final as it is, no fallback to add), shared rather than copied.
    pub fn resolved(policy: Arc<Policy>, source: String) -> Self {
        let store = Self::new(Policy::default(), None, ModelRewrite::default());
        store.install_resolved(policy, source);
        store
    }

    /// Puts a resolved policy (see [`PolicyStore::resolved`]) in force for every request
    /// that starts from now on.
    pub fn install_resolved(&self, policy: Arc<Policy>, source: String) {
        let info = PolicyInfo {
            hash: policy.hash.clone(),
            loaded_at: SystemTime::now(),
            source: Some(PathBuf::from(source)),
            format: format_name(&policy),
        };
        self.current.store(policy);
        self.info.store(Arc::new(info));
    }

    /// Puts `policy` in force for every request that starts from now on.
    pub fn install(&self, policy: Policy) {
        let source = self.info().source.clone();
        let info = PolicyInfo {
            hash: policy.hash.clone(),
            loaded_at: SystemTime::now(),
            source,
            format: format_name(&policy),
        };
        self.current.store(Arc::new(self.prepare(policy)));
        self.info.store(Arc::new(info));
    }
}

/// Watches `path`: when its content changes, the new version is compiled and swapped in,
/// or refused with its errors logged. Polling reads the file, which also follows the
/// symlink swaps Kubernetes does for mounted ConfigMaps.
pub async fn watch(store: Arc<PolicyStore>, path: PathBuf, every: Duration) {
    let mut last_seen = store.info().hash.clone();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "policy file unreadable; keeping the policy in force");
                continue;
            }
        };
        let hash = kube_gateway_policy::load::hash(&text);
        if hash == last_seen {
            continue;
        }
        last_seen = hash;
        // Compiling may take milliseconds: off the serving tasks.
        let compiled = tokio::task::spawn_blocking(move || load(&text)).await;
        match compiled {
            Ok(Ok(policy)) => {
                tracing::info!(path = %path.display(), hash = %policy.hash, "policy reloaded");
                store.install(policy);
            }
            Ok(Err(errors)) => {
                tracing::error!(
                    path = %path.display(),
                    in_force = %store.info().hash,
                    errors = %errors,
                    "policy change refused; the last good policy stays in force"
                );
            }
            Err(e) => tracing::error!(error = %e, "policy compilation task failed"),
        }
    }
}
