//! Ledger keys: a budget's key for a subject, bounded for budgets scoped per model
//! (the workload picks the model names: past [`MAX_MODEL_KEYS`] names in a window, the
//! next ones share one entry, [`OTHER_MODELS`]).

use std::collections::HashMap;

use kube_gateway_policy::budget::{Budget, Scope, Subject};

use super::ledger::Entry;

/// The model name of every name past a bound: a model-scoped budget's shared count
/// ([`MAX_MODEL_KEYS`]), and the metrics' label of names past theirs
/// ([`crate::telemetry::MAX_MODEL_LABELS`]).
pub const OTHER_MODELS: &str = "(other)";

/// Model names a model-scoped budget counts apart in one window; the ones after share
/// the key of [`OTHER_MODELS`], so a workload sending a new name per request neither
/// grows the ledger without end nor gets a fresh budget for each name.
pub const MAX_MODEL_KEYS: usize = 256;

/// The ledger key of budget `b` for `who`: its own, or for a model-scoped budget already
/// counting [`MAX_MODEL_KEYS`] names in this window, the shared one. A new key first
/// clears the budget's entries of ended windows.
pub(super) fn bounded_key(
    counts: &mut HashMap<String, Entry>,
    b: &Budget,
    who: &Subject<'_>,
    start: i64,
) -> String {
    let key = b.key(who);
    if b.scope != Scope::Model || counts.contains_key(&key) {
        return key;
    }
    let prefix = b.key_prefix();
    counts.retain(|k, e| e.start >= start || !k.starts_with(&prefix));
    let counted = counts.keys().filter(|k| k.starts_with(&prefix)).count();
    if counted < MAX_MODEL_KEYS {
        return key;
    }
    b.key(&Subject {
        model: OTHER_MODELS,
        ..*who
    })
}
