//! Kubernetes Events (`events.k8s.io/v1`) kube-gateway posts: `PolicyInvalid` on a
//! ConfigMap the watcher refused, and for the node agent, through [`PodEvents`],
//! `GatewayAttached`, `GatewayDetached` and `AttachFailed` on pods.
//!
//! Posted by hand rather than through `kube::runtime::events::Recorder`: the Recorder
//! folds every later event with the same reason on the same object into the first
//! one's series, keeping the first note, so a second `AttachFailed` with another cause
//! would show the old cause. Here an identical event (same object, reason and note)
//! repeated within [`REPEAT_WINDOW`] bumps the first one's `series` instead, as
//! client-go's recorder does; a different note is a new Event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;

use crate::config::REPORTING_CONTROLLER;
use crate::WorkloadId;

/// How long an identical event counts as a repeat of the first.
pub const REPEAT_WINDOW: SignedDuration = SignedDuration::from_mins(10);
/// The most an Event's note may hold (the API refuses more).
const NOTE_MAX: usize = 1024;

/// Event reasons and their actions.
pub mod reason {
    /// On a ConfigMap whose policy does not validate.
    pub const POLICY_INVALID: &str = "PolicyInvalid";
    /// On a pod the agent started capturing.
    pub const GATEWAY_ATTACHED: &str = "GatewayAttached";
    /// On a pod the agent stopped capturing.
    pub const GATEWAY_DETACHED: &str = "GatewayDetached";
    /// On a pod the agent could not attach to.
    pub const ATTACH_FAILED: &str = "AttachFailed";
    /// The action of [`POLICY_INVALID`].
    pub const ACTION_VALIDATE: &str = "ValidatePolicy";
    /// The action of [`GATEWAY_ATTACHED`] and [`ATTACH_FAILED`].
    pub const ACTION_ATTACH: &str = "Attach";
    /// The action of [`GATEWAY_DETACHED`].
    pub const ACTION_DETACH: &str = "Detach";
}

/// Who posts: the Events' `reportingController` and `reportingInstance`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    pub controller: String,
    pub instance: String,
}

impl Reporter {
    /// kube-gateway ([`REPORTING_CONTROLLER`]) as `instance` (the agent's pod name).
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            controller: REPORTING_CONTROLLER.to_owned(),
            instance: instance.into(),
        }
    }
}

/// An Event could not be posted.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("cannot post Event {reason} on {regarding}: {source}")]
    Create {
        reason: String,
        regarding: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot count a repeat of Event {name} ({reason}) on {regarding}: {source}")]
    Repeat {
        name: String,
        reason: String,
        regarding: String,
        #[source]
        source: kube::Error,
    },
}

/// What one Event says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Say<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: &'a str,
}

/// An Event posted recently, for repeats.
#[derive(Debug)]
struct Posted {
    name: String,
    namespace: String,
    count: i32,
    first: Timestamp,
}

/// Posts Events, folding identical repeats into a series.
pub(crate) struct Poster {
    client: Client,
    reporter: Reporter,
    now: fn() -> Timestamp,
    /// (regarding uid, resourceVersion, reason, note) -> the Event posted for it.
    recent: Mutex<HashMap<(String, String, String, String), Posted>>,
}

fn describe(r: &ObjectReference) -> String {
    format!(
        "{} {}/{}",
        r.kind.as_deref().unwrap_or("object"),
        r.namespace.as_deref().unwrap_or(""),
        r.name.as_deref().unwrap_or("")
    )
}

/// `note` cut to what the API takes, at a character boundary.
fn fit(note: &str) -> String {
    if note.len() <= NOTE_MAX {
        return note.to_owned();
    }
    let mut end = NOTE_MAX - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

impl Poster {
    pub(crate) fn new(client: Client, reporter: Reporter) -> Self {
        Self::with_clock(client, reporter, Timestamp::now)
    }

    /// With a clock of the caller's (tests pin it to compare whole request bodies).
    pub(crate) fn with_clock(client: Client, reporter: Reporter, now: fn() -> Timestamp) -> Self {
        Self {
            client,
            reporter,
            now,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// The Event as first posted.
    fn event(&self, say: Say<'_>, regarding: &ObjectReference, now: Timestamp) -> Event {
        let name = regarding
            .name
            .as_deref()
            .unwrap_or(&self.reporter.controller);
        Event {
            metadata: ObjectMeta {
                // client-go's naming: the object's name and the time, in hex nanoseconds.
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(say.action.to_owned()),
            reason: Some(say.reason.to_owned()),
            note: Some(fit(say.note)),
            type_: Some(if say.warning { "Warning" } else { "Normal" }.to_owned()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(self.reporter.instance.clone()),
            ..Event::default()
        }
    }

    /// Posts `say` about `regarding`, or counts it as a repeat of the same Event.
    pub(crate) async fn post(
        &self,
        say: Say<'_>,
        regarding: &ObjectReference,
    ) -> Result<(), EventError> {
        let now = (self.now)();
        let key = (
            regarding.uid.clone().unwrap_or_default(),
            regarding.resource_version.clone().unwrap_or_default(),
            say.reason.to_owned(),
            say.note.to_owned(),
        );
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let repeat = {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            recent.retain(|_, p| p.first + REPEAT_WINDOW > now);
            recent.get_mut(&key).map(|p| {
                p.count += 1;
                (p.name.clone(), p.namespace.clone(), p.count)
            })
        };
        if let Some((name, ns, count)) = repeat {
            let series = serde_json::json!({
                "series": { "count": count, "lastObservedTime": MicroTime(now) }
            });
            let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                .await
                .map_err(|source| EventError::Repeat {
                    name,
                    reason: say.reason.to_owned(),
                    regarding: describe(regarding),
                    source,
                })?;
            return Ok(());
        }
        let event = self.event(say, regarding, now);
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let created = api
            .create(&PostParams::default(), &event)
            .await
            .map_err(|source| EventError::Create {
                reason: say.reason.to_owned(),
                regarding: describe(regarding),
                source,
            })?;
        let posted = Posted {
            name: created
                .metadata
                .name
                .or(event.metadata.name)
                .unwrap_or_default(),
            namespace,
            count: 1,
            first: now,
        };
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, posted);
        Ok(())
    }
}

/// Events on pods, for the node agent: `GatewayAttached`, `GatewayDetached`,
/// `AttachFailed`. Cheap to clone; RBAC: `create` and `patch` on `events` in the API
/// group `events.k8s.io`.
#[derive(Clone)]
pub struct PodEvents {
    poster: Arc<Poster>,
}

impl PodEvents {
    /// Posting through `client` as `reporter` ([`Reporter::new`] with the agent's pod
    /// name).
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            poster: Arc::new(Poster::new(client, reporter)),
        }
    }

    #[cfg(test)]
    pub(crate) fn with_clock(client: Client, reporter: Reporter, now: fn() -> Timestamp) -> Self {
        Self {
            poster: Arc::new(Poster::with_clock(client, reporter, now)),
        }
    }

    /// `GatewayAttached` (Normal): the pod's LLM connections are captured from now on.
    pub async fn attached(&self, w: &WorkloadId) -> Result<(), EventError> {
        let note = format!(
            "kube-gateway on node {} captures this pod's LLM connections",
            w.node
        );
        self.say(
            w,
            false,
            reason::GATEWAY_ATTACHED,
            reason::ACTION_ATTACH,
            &note,
        )
        .await
    }

    /// `GatewayDetached` (Normal): the pod's connections go direct again.
    pub async fn detached(&self, w: &WorkloadId) -> Result<(), EventError> {
        let note = format!(
            "kube-gateway on node {} no longer captures this pod's connections",
            w.node
        );
        self.say(
            w,
            false,
            reason::GATEWAY_DETACHED,
            reason::ACTION_DETACH,
            &note,
        )
        .await
    }

    /// `AttachFailed` (Warning), saying why in `reason`.
    pub async fn attach_failed(&self, w: &WorkloadId, reason: &str) -> Result<(), EventError> {
        let note = format!("kube-gateway on node {} cannot attach: {reason}", w.node);
        self.say(w, true, reason::ATTACH_FAILED, reason::ACTION_ATTACH, &note)
            .await
    }

    async fn say(
        &self,
        w: &WorkloadId,
        warning: bool,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), EventError> {
        let say = Say {
            warning,
            reason,
            action,
            note,
        };
        self.poster.post(say, &w.object_reference()).await
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
