//! A scripted Kubernetes API behind kube's `Client`, over `tower_test`'s mock service:
//! answers lists from canned objects, keeps watches open so tests can push events
//! into them, answers Event writes, and logs every request exactly (method, path and
//! query, body) for the tests to compare.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_test::mock::Handle;

pub type MockBody = BoxBody<Bytes, Infallible>;

/// One request as the API server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: Method,
    /// Path and query, as sent.
    pub uri: String,
    pub content_type: Option<String>,
    pub body: Option<Value>,
}

/// What the fake answers, and what it saw.
#[derive(Default)]
pub struct FakeApi {
    /// Path (no query) -> the items a list returns.
    lists: Mutex<HashMap<String, Vec<Value>>>,
    /// Path (no query) -> the open watch's sender of raw lines.
    watches: Mutex<HashMap<String, mpsc::UnboundedSender<Bytes>>>,
    seen: Mutex<Vec<Seen>>,
}

/// A client talking to a fake API, and the handle that serves it.
pub fn client() -> (Client, Handle<Request<Body>, Response<MockBody>>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    (Client::new(service, "default"), handle)
}

fn full(status: StatusCode, body: &Value) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// `path`'s lists return `items` (at resourceVersion 100).
    pub fn list(&self, path: &str, items: Vec<Value>) {
        self.lists.lock().unwrap().insert(path.to_owned(), items);
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Whether a watch on `path` is open (started, and its client still reading).
    pub fn watching(&self, path: &str) -> bool {
        self.watches
            .lock()
            .unwrap()
            .get(path)
            .is_some_and(|tx| !tx.is_closed())
    }

    /// Sends a watch event (`ADDED`, `MODIFIED`, `DELETED`) on `path`'s open watch.
    pub fn push(&self, path: &str, kind: &str, object: Value) {
        let line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap();
        let mut line = line;
        line.push(b'\n');
        let watches = self.watches.lock().unwrap();
        let tx = watches
            .get(path)
            .unwrap_or_else(|| panic!("no watch open on {path}"));
        tx.send(Bytes::from(line)).unwrap();
    }

    /// Serves requests until the client goes away.
    pub async fn serve(&self, mut handle: Handle<Request<Body>, Response<MockBody>>) {
        while let Some((request, reply)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let body: Option<Value> =
                (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).unwrap());
            let uri = parts.uri.to_string();
            let path = parts.uri.path().to_owned();
            let query = parts.uri.query().unwrap_or("");
            self.seen.lock().unwrap().push(Seen {
                method: parts.method.clone(),
                uri: uri.clone(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned()),
                body: body.clone(),
            });
            let response = match parts.method {
                Method::GET if query.split('&').any(|p| p == "watch=true") => {
                    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                    self.watches.lock().unwrap().insert(path, tx);
                    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                        let line = rx.recv().await?;
                        Some((Ok::<_, Infallible>(Frame::data(line)), rx))
                    });
                    Response::builder()
                        .status(StatusCode::OK)
                        .body(StreamBody::new(frames).boxed())
                        .unwrap()
                }
                Method::GET => {
                    let items = self.lists.lock().unwrap().get(&path).cloned();
                    match items {
                        Some(items) => full(
                            StatusCode::OK,
                            &json!({
                                "apiVersion": "v1",
                                "kind": "List",
                                "metadata": { "resourceVersion": "100" },
                                "items": items,
                            }),
                        ),
                        None => full(
                            StatusCode::NOT_FOUND,
                            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "NotFound", "code": 404, "message": uri}),
                        ),
                    }
                }
                // Writes (Event create and patch) echo what they got.
                Method::POST => full(StatusCode::CREATED, &body.unwrap_or(Value::Null)),
                _ => full(StatusCode::OK, &body.unwrap_or(Value::Null)),
            };
            reply.send_response(response);
        }
    }
}
