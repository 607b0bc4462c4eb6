//! The routes of the test [`Upstream`](super::Upstream).
//!
//! | route | response |
//! |---|---|
//! | `/healthz` | the [`set_health`](super::Upstream::set_health) status; not recorded |
//! | `/echo` | 200, the request body streamed back frame by frame (trailers too) |
//! | `/stream?chunks=N&interval_ms=M` | 200, N chunks `chunk-i\n` M ms apart (default 5, 100) |
//! | `/trailers` | 200, body `ok`, trailers `grpc-status: 0`, `x-trailer: yes`; header `x-request-trailers` = number of request trailer fields |
//! | `/status/<code>` | that status, body `status <code>\n` when allowed |
//! | `/head-check` | 200, body `head-check\n` (HEAD: content-length 11, no body) |
//! | `/204`, `/304` | 204 / 304, no body |
//! | `/ws` | WebSocket echo (HTTP/1.1 Upgrade) |
//! | anything else | 200, JSON `{name, method, path, uri, version, headers, body_len}` |
//!
//! Over HTTP/1.1, hyper sends the `/trailers` trailers only if the request
//! carries `te: trailers` (as gRPC clients do); the response declares them
//! in a `trailer` header, which hyper's HTTP/1.1 encoder also requires.
//!
//! Routes that would answer 200 answer the [`set_status`](super::Upstream::set_status)
//! status instead, after the [`set_delay`](super::Upstream::set_delay) delay.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, TRAILER, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::{RecordedRequest, State};
use crate::support::client::BoxError;

/// Response body of every route.
pub(super) type ResBody = UnsyncBoxBody<Bytes, BoxError>;

/// Dispatches one request.
pub(super) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<ResBody> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        state
            .health_checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let health = state.health.load(std::sync::atomic::Ordering::Relaxed);
        return text(status(health), "healthz\n");
    }
    if path == "/ws" {
        return websocket(state, req);
    }
    if path == "/echo" {
        let pending = describe(&req, 0);
        tokio::time::sleep(state.delay()).await;
        let (parts, body) = req.into_parts();
        let mut resp = Response::new(
            EchoBody {
                inner: body,
                state: state.clone(),
                pending: Some(pending),
            }
            .boxed_unsync(),
        );
        *resp.status_mut() = ok_status(&state);
        if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
            resp.headers_mut().insert(CONTENT_TYPE, ct.clone());
        }
        return resp;
    }
    let mut recorded = describe(&req, 0);
    let (body_len, request_trailers) = read_body(req.into_body()).await;
    recorded.body_len = body_len;
    let json = default_json(&state, &recorded);
    let query = recorded
        .uri
        .split_once('?')
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    state.record(recorded);
    tokio::time::sleep(state.delay()).await;
    match path.as_str() {
        "/stream" => stream(&state, &query),
        "/trailers" => trailers(&state, request_trailers),
        "/head-check" => text(ok_status(&state), "head-check\n"),
        "/204" => text(StatusCode::NO_CONTENT, ""),
        "/304" => text(StatusCode::NOT_MODIFIED, ""),
        p if p.starts_with("/status/") => match p["/status/".len()..]
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(code)
                if code == StatusCode::NO_CONTENT
                    || code == StatusCode::NOT_MODIFIED
                    || code.is_informational() =>
            {
                text(code, "")
            }
            Some(code) => text(code, &format!("status {}\n", code.as_u16())),
            None => text(StatusCode::BAD_REQUEST, "bad status code\n"),
        },
        _ => {
            let mut resp = text(ok_status(&state), &json.to_string());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
    }
}

/// The status set via `set_status` (200 by default).
fn ok_status(state: &State) -> StatusCode {
    status(state.status.load(std::sync::atomic::Ordering::Relaxed))
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn text(status: StatusCode, body: &str) -> Response<ResBody> {
    let body = Full::new(Bytes::from(body.to_string())).map_err(|never| match never {});
    let mut resp = Response::new(body.boxed_unsync());
    *resp.status_mut() = status;
    resp
}

fn describe(req: &Request<Incoming>, body_len: u64) -> RecordedRequest {
    RecordedRequest {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        version: format!("{:?}", req.version()),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len,
    }
}

fn default_json(state: &State, r: &RecordedRequest) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for (k, v) in &r.headers {
        match headers.get_mut(k) {
            Some(serde_json::Value::String(existing)) => *existing = format!("{existing}, {v}"),
            _ => {
                headers.insert(k.clone(), v.clone().into());
            }
        }
    }
    let path = r
        .uri
        .parse::<http::Uri>()
        .map(|u| u.path().to_string())
        .unwrap_or_default();
    serde_json::json!({
        "name": state.name,
        "method": r.method,
        "path": path,
        "uri": r.uri,
        "version": r.version,
        "headers": headers,
        "body_len": r.body_len,
    })
}

/// Reads a whole request body: (data bytes, trailer fields). Stops quietly
/// at an error (a client that went away).
async fn read_body(mut body: Incoming) -> (u64, usize) {
    let (mut len, mut trailers) = (0, 0);
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            len += data.len() as u64;
        } else if let Some(t) = frame.trailers_ref() {
            trailers += t.len();
        }
    }
    (len, trailers)
}

fn stream(state: &Arc<State>, query: &str) -> Response<ResBody> {
    let param = |name: &str, default: u64| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(default)
    };
    let (chunks, interval) = (
        param("chunks", 5),
        Duration::from_millis(param("interval_ms", 100)),
    );
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
    state.spawn(async move {
        for i in 0..chunks {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            if tx
                .send_data(Bytes::from(format!("chunk-{i}\n")))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut resp = Response::new(body.boxed_unsync());
    *resp.status_mut() = ok_status(state);
    resp
}

fn trailers(state: &State, request_trailers: usize) -> Response<ResBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("x-trailer", HeaderValue::from_static("yes"));
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"ok"))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut resp =
        Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync());
    *resp.status_mut() = ok_status(state);
    let headers = resp.headers_mut();
    headers.insert("x-request-trailers", HeaderValue::from(request_trailers));
    // Declared so that hyper's HTTP/1.1 encoder sends them.
    headers.insert(TRAILER, HeaderValue::from_static("grpc-status, x-trailer"));
    resp
}

/// Answers an HTTP/1.1 WebSocket upgrade with 101 and echoes every text
/// and binary message until the peer closes.
fn websocket(state: Arc<State>, mut req: Request<Incoming>) -> Response<ResBody> {
    let is_upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    state.record(describe(&req, 0));
    let on_upgrade = hyper::upgrade::on(&mut req);
    state.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // Close and ping frames are answered by tungstenite itself; keep
        // reading until the close handshake ends the stream.
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let headers = resp.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    resp
}

/// The `/echo` response body: the request body's frames as they arrive.
/// Records the request (with its length) when the body ends or is dropped.
struct EchoBody {
    inner: Incoming,
    state: Arc<State>,
    pending: Option<RecordedRequest>,
}

impl EchoBody {
    fn finish(&mut self) {
        if let Some(recorded) = self.pending.take() {
            self.state.record(recorded);
        }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(pending)) = (frame.data_ref(), self.pending.as_mut()) {
                    pending.body_len += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for EchoBody {
    fn drop(&mut self) {
        self.finish();
    }
}
