//! The watch loop against the mocked API: the exact requests it makes, the sets it
//! publishes as pods change, the Event a broken ConfigMap gets (once per version).

use std::future::Future;
use std::time::Duration;

use http::Method;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::*;
use crate::annotations::AI;
use crate::fixtures::*;
use crate::mock_api::{client, FakeApi};

const PODS: &str = "/api/v1/pods";
const CONFIGMAPS: &str = "/api/v1/configmaps";
const CHAT_CONFIGMAPS: &str = "/api/v1/namespaces/chat/configmaps";
const CHAT_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/chat/events";

fn fixed() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

/// Runs the watcher against `fake` while `scenario` plays; the scenario drops its
/// receiver when done, which must end the watcher with `Ok`.
async fn with_watcher<F, Fut>(fake: &FakeApi, scenario: F)
where
    F: FnOnce(watch::Receiver<WorkloadSet>) -> Fut,
    Fut: Future<Output = ()>,
{
    let (client, handle) = client();
    let (tx, rx) = watch::channel(WorkloadSet::default());
    let poster = Poster::with_clock(client.clone(), Reporter::new("kube-gateway-node-a"), fixed);
    let config = WatcherConfig {
        debounce: Duration::from_millis(20),
        ..WatcherConfig::new(NODE)
    };
    let play = async {
        tokio::select! {
            () = fake.serve(handle) => panic!("the watcher's client went away"),
            () = scenario(rx) => {}
        }
    };
    let (result, ()) = tokio::join!(run_with(client, config, tx, poster), play);
    result.expect("the watcher ends cleanly when nobody listens");
}

/// The next published set, as pod names.
async fn next_set(rx: &mut watch::Receiver<WorkloadSet>) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("a set is published")
        .unwrap();
    rx.borrow_and_update()
        .values()
        .map(|w| w.id.name.clone())
        .collect()
}

/// Waits until `what` holds (the fake's state changes as the watcher acts).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

fn requests(fake: &FakeApi) -> Vec<(Method, String)> {
    let mut r: Vec<_> = fake.seen().into_iter().map(|s| (s.method, s.uri)).collect();
    r.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.as_str().cmp(b.0.as_str())));
    r
}

fn event_posts(fake: &FakeApi) -> Vec<Value> {
    fake.seen()
        .into_iter()
        .filter(|s| s.method == Method::POST)
        .map(|s| s.body.unwrap())
        .collect()
}

#[tokio::test]
async fn lists_and_watches_exactly_this_node_and_the_labelled_configmaps() {
    let fake = &FakeApi::new();
    fake.list(
        PODS,
        vec![
            pod_json("chat", "bot", "10.0.0.7", &[(AI, "true")], &[]),
            pod_json("chat", "plain", "10.0.0.8", &[], &[]),
        ],
    );
    fake.list(
        CONFIGMAPS,
        vec![policy_configmap_json(
            "chat", "broken", "7", None, BAD_REGEX,
        )],
    );
    fake.list(
        CHAT_CONFIGMAPS,
        vec![
            configmap_json(
                "chat",
                "bot-kube-gateway",
                "3",
                &[],
                &[],
                &[("config", POC_JSON)],
            ),
            configmap_json(
                "chat",
                "unrelated",
                "4",
                &[],
                &[],
                &[("config", "not a policy")],
            ),
        ],
    );
    with_watcher(fake, |mut rx| async move {
        // The first set waits for the per-pod ConfigMaps of the pods' namespace.
        assert_eq!(next_set(&mut rx).await, ["bot"]);
        let set = rx.borrow().clone();
        let bot = &set["uid-bot"];
        assert_eq!(bot.policy_sources, ["configmap/chat/bot-kube-gateway"]);
        assert_eq!(
            bot.policy.models.rewrite.apply("llama3.2:1b"),
            Some("gemma2:2b")
        );
        until("the Event is posted", || !event_posts(fake).is_empty()).await;
        until("every watch is open", || {
            [PODS, CONFIGMAPS, CHAT_CONFIGMAPS]
                .iter()
                .all(|p| fake.watching(p))
        })
        .await;
    })
    .await;

    // kube-core writes its queries after `?&` (its serializer starts on a non-empty
    // string); the API server ignores the empty pair.
    let get = |uri: &str| (Method::GET, uri.to_owned());
    let mut expected = vec![
        get("/api/v1/configmaps?&labelSelector=kube-gateway.io%2Fpolicy&resourceVersion=0&resourceVersionMatch=NotOlderThan"),
        get("/api/v1/configmaps?&watch=true&timeoutSeconds=290&labelSelector=kube-gateway.io%2Fpolicy&allowWatchBookmarks=true&resourceVersion=100"),
        get("/api/v1/namespaces/chat/configmaps?&resourceVersion=0&resourceVersionMatch=NotOlderThan"),
        get("/api/v1/namespaces/chat/configmaps?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=100"),
        get("/api/v1/pods?&fieldSelector=spec.nodeName%3Dnode-a&resourceVersion=0&resourceVersionMatch=NotOlderThan"),
        get("/api/v1/pods?&watch=true&timeoutSeconds=290&fieldSelector=spec.nodeName%3Dnode-a&allowWatchBookmarks=true&resourceVersion=100"),
        (Method::POST, format!("{CHAT_EVENTS}?")),
    ];
    expected.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(requests(fake), expected);

    let message = &kube_gateway_policy::load(BAD_REGEX).unwrap_err().0[0].message;
    let posts = event_posts(fake);
    assert_eq!(posts.len(), 1);
    assert_eq!(
        posts[0],
        json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": { "name": "broken.18fae27693b40000", "namespace": "chat" },
            "eventTime": "2027-01-15T08:00:00.000000Z",
            "action": "ValidatePolicy",
            "reason": "PolicyInvalid",
            "type": "Warning",
            "note": format!(
                "policy not valid: data[\"policy.yaml\"].promptRules[0].match.regex: {message}; \
                 ignored: no earlier version was valid"
            ),
            "regarding": {
                "apiVersion": "v1", "kind": "ConfigMap", "namespace": "chat",
                "name": "broken", "uid": "uid-cm-broken", "resourceVersion": "7",
            },
            "reportingController": "kube-gateway",
            "reportingInstance": "kube-gateway-node-a",
        })
    );
}

#[tokio::test]
async fn a_broken_configmap_is_reported_once_per_version_and_the_last_good_stays() {
    let fake = &FakeApi::new();
    fake.list(
        PODS,
        vec![pod_json("chat", "bot", "10.0.0.7", &[(AI, "true")], &[])],
    );
    fake.list(
        CONFIGMAPS,
        vec![policy_configmap_json("chat", "p", "1", None, REWRITE_GPT4)],
    );
    fake.list(CHAT_CONFIGMAPS, vec![]);
    with_watcher(fake, |mut rx| async move {
        assert_eq!(next_set(&mut rx).await, ["bot"]);
        assert_eq!(rx.borrow()["uid-bot"].policy_sources, ["configmap/chat/p"]);
        until("the watch is open", || fake.watching(CONFIGMAPS)).await;

        fake.push(
            CONFIGMAPS,
            "MODIFIED",
            policy_configmap_json("chat", "p", "2", None, BAD_REGEX),
        );
        until("the Event is posted", || event_posts(fake).len() == 1).await;
        let note = event_posts(fake)[0]["note"].as_str().unwrap().to_owned();
        assert!(
            note.ends_with("the last good version (resourceVersion 1) stays in force"),
            "{note}"
        );
        // Any other change recomputes the set; the same version is not reported again.
        fake.push(
            PODS,
            "ADDED",
            pod_json("chat", "plain", "10.0.0.9", &[], &[]),
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(event_posts(fake).len(), 1);
        // A new version that is still broken: reported again.
        fake.push(
            CONFIGMAPS,
            "MODIFIED",
            policy_configmap_json("chat", "p", "3", None, BAD_REGEX),
        );
        until("the next version's Event", || event_posts(fake).len() == 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(event_posts(fake).len(), 2);
        assert_eq!(event_posts(fake)[1]["regarding"]["resourceVersion"], "3");
        // The pod kept the last good policy all along: nothing was published.
        assert!(!rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow()["uid-bot"].policy.models.rewrite.apply("gpt-4"),
            Some("gpt-4o-mini")
        );
    })
    .await;
}

#[tokio::test]
async fn run_publishes_annotated_pods_and_follows_their_annotation() {
    let fake = &FakeApi::new();
    fake.list(
        PODS,
        vec![
            pod_json("chat", "bot", "10.0.0.7", &[(AI, "true")], &[]),
            pod_json("chat", "plain", "10.0.0.8", &[], &[]),
        ],
    );
    fake.list(CONFIGMAPS, vec![]);
    fake.list(CHAT_CONFIGMAPS, vec![]);
    fake.list("/api/v1/namespaces/ml/configmaps", vec![]);
    with_watcher(fake, |mut rx| async move {
        assert_eq!(
            next_set(&mut rx).await,
            ["bot"],
            "annotated in, not annotated out"
        );
        let bot = rx.borrow()["uid-bot"].clone();
        until("the pod watch is open", || fake.watching(PODS)).await;

        // A change that alters nothing served publishes nothing.
        fake.push(
            PODS,
            "ADDED",
            pod_json("chat", "idle", "10.0.0.10", &[], &[]),
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!rx.has_changed().unwrap());

        // Annotating a pod adds it; one in another namespace waits for that namespace.
        fake.push(
            PODS,
            "MODIFIED",
            pod_json("chat", "plain", "10.0.0.8", &[(AI, "true")], &[]),
        );
        assert_eq!(next_set(&mut rx).await, ["bot", "plain"]);
        assert!(
            Arc::ptr_eq(&bot, &rx.borrow()["uid-bot"]),
            "an unchanged workload is kept"
        );
        fake.push(
            PODS,
            "ADDED",
            pod_json("ml", "trainer", "10.0.0.11", &[(AI, "true")], &[]),
        );
        assert_eq!(next_set(&mut rx).await, ["bot", "plain", "trainer"]);
        assert!(fake.watching("/api/v1/namespaces/ml/configmaps"));

        // Removing the annotation removes the pod; deleting one too.
        fake.push(
            PODS,
            "MODIFIED",
            pod_json("chat", "bot", "10.0.0.7", &[], &[]),
        );
        assert_eq!(next_set(&mut rx).await, ["plain", "trainer"]);
        fake.push(
            PODS,
            "DELETED",
            pod_json("ml", "trainer", "10.0.0.11", &[(AI, "true")], &[]),
        );
        assert_eq!(next_set(&mut rx).await, ["plain"]);
        // The namespace without annotated pods is no longer watched.
        until("the ml watch is closed", || {
            !fake.watching("/api/v1/namespaces/ml/configmaps")
        })
        .await;
        assert!(fake.watching(CHAT_CONFIGMAPS));
    })
    .await;
}

#[tokio::test]
async fn the_first_set_is_published_even_when_empty() {
    let fake = &FakeApi::new();
    fake.list(PODS, vec![pod_json("chat", "plain", "10.0.0.8", &[], &[])]);
    fake.list(CONFIGMAPS, vec![]);
    with_watcher(fake, |mut rx| async move {
        assert!(next_set(&mut rx).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_watcher_without_a_node_refuses_to_start() {
    let (client, _handle) = client();
    let (tx, _rx) = watch::channel(WorkloadSet::default());
    let config = WatcherConfig::new("");
    let e = run(client, config, tx).await.unwrap_err();
    assert!(matches!(e, WatcherError::NoNodeName));
}
