//! Events on pods against the mocked API: the exact requests, repeats folded.

use http::Method;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::*;
use crate::mock_api::{client, FakeApi};

/// 2027-01-15T08:00:00Z.
fn fixed() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn workload() -> WorkloadId {
    WorkloadId {
        namespace: "chat".into(),
        name: "bot".into(),
        uid: "uid-bot".into(),
        service_account: "chat-sa".into(),
        node: "node-a".into(),
    }
}

fn pod_ref() -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod", "namespace": "chat", "name": "bot", "uid": "uid-bot"})
}

#[tokio::test]
async fn pod_events_are_posted_and_identical_repeats_counted() {
    let (client, handle) = client();
    let fake = FakeApi::new();
    let events = PodEvents::with_clock(client, Reporter::new("kube-gateway-node-a"), fixed);
    let w = workload();
    let script = async {
        events.attached(&w).await.unwrap();
        events.attached(&w).await.unwrap();
        events
            .attach_failed(&w, "no cgroup for pod uid-bot")
            .await
            .unwrap();
        events.detached(&w).await.unwrap();
    };
    tokio::select! {
        () = fake.serve(handle) => panic!("the client went away"),
        () = script => {}
    }
    let seen = fake.seen();
    let path = "/apis/events.k8s.io/v1/namespaces/chat/events";
    let created = |reason: &str, action: &str, kind: &str, note: &str| {
        json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": { "name": "bot.18fae27693b40000", "namespace": "chat" },
            "eventTime": "2027-01-15T08:00:00.000000Z",
            "action": action,
            "reason": reason,
            "note": note,
            "type": kind,
            "regarding": pod_ref(),
            "reportingController": "kube-gateway",
            "reportingInstance": "kube-gateway-node-a",
        })
    };
    assert_eq!(seen.len(), 4, "{seen:#?}");
    assert_eq!(
        (&seen[0].method, seen[0].uri.as_str()),
        (&Method::POST, &*format!("{path}?"))
    );
    assert_eq!(
        seen[0].body.as_ref().unwrap(),
        &created(
            "GatewayAttached",
            "Attach",
            "Normal",
            "kube-gateway on node node-a captures this pod's LLM connections"
        )
    );
    // The same event again: the first one's series, not a new Event.
    assert_eq!(seen[1].method, Method::PATCH);
    assert_eq!(seen[1].uri, format!("{path}/bot.18fae27693b40000?"));
    assert_eq!(
        seen[1].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        seen[1].body.as_ref().unwrap(),
        &json!({"series": {"count": 2, "lastObservedTime": "2027-01-15T08:00:00.000000Z"}})
    );
    assert_eq!(seen[2].method, Method::POST);
    assert_eq!(
        seen[2].body.as_ref().unwrap(),
        &created(
            "AttachFailed",
            "Attach",
            "Warning",
            "kube-gateway on node node-a cannot attach: no cgroup for pod uid-bot"
        )
    );
    assert_eq!(
        seen[3].body.as_ref().unwrap(),
        &created(
            "GatewayDetached",
            "Detach",
            "Normal",
            "kube-gateway on node node-a no longer captures this pod's connections"
        )
    );
}

#[tokio::test]
async fn a_refused_post_is_an_error_naming_the_pod() {
    let (client, mut handle) = client();
    let events = PodEvents::with_clock(client, Reporter::new("i"), fixed);
    let w = workload();
    let serve = async {
        let (_, reply) = handle.next_request().await.unwrap();
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": "Forbidden", "code": 403, "message": "forbidden"});
        reply.send_response(
            http::Response::builder()
                .status(403)
                .body(http_body_util::BodyExt::boxed(http_body_util::Full::new(
                    bytes::Bytes::from(body.to_string()),
                )))
                .unwrap(),
        );
    };
    let (result, ()) = tokio::join!(events.attached(&w), serve);
    let e = result.unwrap_err();
    assert!(matches!(e, EventError::Create { .. }));
    assert!(
        e.to_string()
            .starts_with("cannot post Event GatewayAttached on Pod chat/bot: "),
        "{e}"
    );
}

#[test]
fn long_notes_are_cut_at_a_character_boundary() {
    let long = "é".repeat(600);
    let cut = fit(&long);
    assert!(cut.len() <= NOTE_MAX);
    assert!(cut.ends_with('…'));
    assert_eq!(fit("short"), "short");
}
