//! Response bodies for the demo server: whole JSON, and a channel body that streams
//! frames as the generator produces them (and can fail on purpose mid-stream).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

/// Either a whole body or a stream of chunks.
pub enum DemoBody {
    Full(Full<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body for DemoBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            DemoBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            DemoBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|chunk| chunk.map(Frame::data))),
        }
    }
}

pub type DemoResponse = Response<DemoBody>;

fn with_type(status: StatusCode, content_type: &'static str, body: DemoBody) -> DemoResponse {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> DemoResponse {
    let bytes = Bytes::from(value.to_string());
    with_type(
        status,
        "application/json; charset=utf-8",
        DemoBody::Full(Full::new(bytes)),
    )
}

pub fn text(status: StatusCode, body: &'static str) -> DemoResponse {
    with_type(
        status,
        "text/plain; charset=utf-8",
        DemoBody::Full(Full::new(Bytes::from_static(body.as_bytes()))),
    )
}

pub fn raw(status: StatusCode, content_type: &'static str, body: Bytes) -> DemoResponse {
    with_type(status, content_type, DemoBody::Full(Full::new(body)))
}

/// A streaming response and the sender its generator writes to.
pub fn stream(
    content_type: &'static str,
) -> (DemoResponse, mpsc::Sender<Result<Bytes, std::io::Error>>) {
    let (tx, rx) = mpsc::channel(16);
    (
        with_type(StatusCode::OK, content_type, DemoBody::Stream(rx)),
        tx,
    )
}
