//! HTTP clients as a service behind the sidecar would use them.
//!
//! A local service reaches its sidecar in three ways (see DESIGN.md): as an
//! HTTP proxy (`HTTP_PROXY`, absolute-form request line), by `Host` header,
//! or over h2c. These helpers speak each of those with real hyper clients:
//!
//! - one-shot requests over a fresh connection ([`request`], [`request_h2`],
//!   [`get_via_proxy`], [`get_with_host`]) that send the request exactly as
//!   built, absolute-form URI included, and collect the whole body;
//! - pooled keep-alive clients ([`http1_client`], [`h2c_client`]) and clients
//!   that dial one fixed address whatever the URL's host says
//!   ([`proxy_client`], [`dial_client`], [`dial_h2c_client`]);
//! - a WebSocket client ([`ws_connect`]).
//!
//! The load generator lives in [`super::loadgen`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;

/// The error type of every fallible helper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type all helpers accept (see [`full`], [`empty`],
/// [`channel_body`]).
pub type ReqBody = UnsyncBoxBody<Bytes, BoxError>;
/// A pooled keep-alive client.
pub type HttpClient<C = HttpConnector> = Client<C, ReqBody>;

/// How long the panicking one-shot helpers wait for a complete response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Trailers of a collected response, stored in its extensions.
#[derive(Debug, Clone)]
pub struct Trailers(pub HeaderMap);

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A streaming body fed through the returned sender, frame by frame.
pub fn channel_body() -> (http_body_util::channel::Sender<Bytes, BoxError>, ReqBody) {
    let (tx, body) = http_body_util::channel::Channel::new(16);
    (tx, body.boxed_unsync())
}

/// A GET request for `uri` with an empty body.
pub fn get(uri: &str) -> Request<ReqBody> {
    Request::get(uri).body(empty()).expect("valid request")
}

/// A pooled HTTP/1.1 keep-alive client (origin-form, `Host` from the URL).
pub fn http1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A pooled h2c client (HTTP/2 with prior knowledge, no TLS).
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// An HTTP/1.1 client configured like `HTTP_PROXY=http://<proxy>`: every
/// request goes to `proxy` in absolute form (`GET http://b/path`), over
/// pooled keep-alive connections.
pub fn proxy_client(proxy: SocketAddr) -> HttpClient<DialConnector> {
    Client::builder(TokioExecutor::new()).build(DialConnector {
        addr: proxy,
        proxied: true,
    })
}

/// An HTTP/1.1 client that connects to `addr` whatever host the URL names,
/// sending origin-form with `Host` from the URL: `get("http://b/x")` reaches
/// `addr` with `Host: b`.
pub fn dial_client(addr: SocketAddr) -> HttpClient<DialConnector> {
    Client::builder(TokioExecutor::new()).build(DialConnector {
        addr,
        proxied: false,
    })
}

/// Like [`dial_client`] but h2c; the URL's host becomes `:authority`.
pub fn dial_h2c_client(addr: SocketAddr) -> HttpClient<DialConnector> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(DialConnector {
            addr,
            proxied: false,
        })
}

/// Sends `req` over a fresh HTTP/1.1 connection to `addr` exactly as built
/// (absolute-form URIs stay absolute) and collects the response. A missing
/// `Host` is filled from the URI's authority, else from `addr`.
pub async fn try_request(
    addr: SocketAddr,
    mut req: Request<ReqBody>,
) -> Result<Response<Bytes>, BoxError> {
    if !req.headers().contains_key(HOST) {
        let host = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| addr.to_string());
        req.headers_mut()
            .insert(HOST, HeaderValue::from_str(&host)?);
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    collect(sender.send_request(req).await?).await
}

/// Sends `req` over a fresh h2c connection to `addr` and collects the
/// response. An origin-form URI gets `http://<Host header or addr>` as
/// scheme and authority (the `Host` header is then removed).
pub async fn try_request_h2(
    addr: SocketAddr,
    mut req: Request<ReqBody>,
) -> Result<Response<Bytes>, BoxError> {
    if req.uri().authority().is_none() {
        let host = match req.headers_mut().remove(HOST) {
            Some(h) => h.to_str()?.to_string(),
            None => addr.to_string(),
        };
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        *req.uri_mut() = format!("http://{host}{path}").parse()?;
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    collect(sender.send_request(req).await?).await
}

/// [`try_request`] with a [`REQUEST_TIMEOUT`].
///
/// # Panics
/// On any error or timeout, naming the address and URI.
pub async fn request(addr: SocketAddr, req: Request<ReqBody>) -> Response<Bytes> {
    let what = format!("{} {} via {addr} (HTTP/1.1)", req.method(), req.uri());
    expect_in_time(&what, try_request(addr, req)).await
}

/// [`try_request_h2`] with a [`REQUEST_TIMEOUT`].
///
/// # Panics
/// On any error or timeout, naming the address and URI.
pub async fn request_h2(addr: SocketAddr, req: Request<ReqBody>) -> Response<Bytes> {
    let what = format!("{} {} via {addr} (h2c)", req.method(), req.uri());
    expect_in_time(&what, try_request_h2(addr, req)).await
}

/// `GET <url>` in absolute form to `proxy` (what an `HTTP_PROXY` client
/// sends), with `Host` from the URL.
///
/// # Panics
/// On any error or timeout.
pub async fn get_via_proxy(proxy: SocketAddr, url: &str) -> Response<Bytes> {
    request(proxy, get(url)).await
}

/// `GET <path>` (origin form) to `addr` with `Host: <host>`.
///
/// # Panics
/// On any error or timeout.
pub async fn get_with_host(addr: SocketAddr, host: &str, path: &str) -> Response<Bytes> {
    let req = Request::get(path)
        .header(HOST, host)
        .body(empty())
        .expect("valid request");
    request(addr, req).await
}

/// `GET <path>` to `addr` on a fresh connection; returns status and body
/// text. Used to poll admin and health endpoints.
pub async fn try_get(addr: SocketAddr, path: &str) -> Result<(u16, String), BoxError> {
    let resp = try_request(addr, get(path)).await?;
    Ok((
        resp.status().as_u16(),
        String::from_utf8_lossy(resp.body()).into_owned(),
    ))
}

/// Reads the whole body of `resp`; trailers, if any, go into the
/// extensions as [`Trailers`].
pub async fn collect(resp: Response<Incoming>) -> Result<Response<Bytes>, BoxError> {
    let (mut parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    if let Some(trailers) = collected.trailers() {
        parts.extensions.insert(Trailers(trailers.clone()));
    }
    Ok(Response::from_parts(parts, collected.to_bytes()))
}

/// The trailers of a collected response, if it had any.
pub fn trailers(resp: &Response<Bytes>) -> Option<&HeaderMap> {
    resp.extensions().get::<Trailers>().map(|t| &t.0)
}

/// The body of `resp` parsed as JSON.
///
/// # Panics
/// If the body is not JSON, showing it.
pub fn json(resp: &Response<Bytes>) -> serde_json::Value {
    serde_json::from_slice(resp.body()).unwrap_or_else(|e| {
        panic!(
            "response body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(resp.body())
        )
    })
}

/// Opens a WebSocket to `ws://<host><path>` over a TCP connection to
/// `addr` (a sidecar listener or an upstream).
///
/// # Panics
/// If the connection or the upgrade fails.
pub async fn ws_connect(addr: SocketAddr, host: &str, path: &str) -> WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let url = format!("ws://{host}{path}");
    let (ws, _resp) = tokio_tungstenite::client_async(url.as_str(), stream)
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake for {url} via {addr}: {e}"));
    ws
}

async fn expect_in_time<T>(what: &str, fut: impl Future<Output = Result<T, BoxError>>) -> T {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{what} failed: {e:?}"),
        Err(_) => panic!("{what}: no complete response within {REQUEST_TIMEOUT:?}"),
    }
}

/// A connector that always dials one address; with `proxied` the legacy
/// client sends absolute-form request lines, as to an HTTP proxy.
#[derive(Debug, Clone, Copy)]
pub struct DialConnector {
    /// Where every connection goes.
    pub addr: SocketAddr,
    /// Mark connections as proxied (absolute-form requests).
    pub proxied: bool,
}

impl tower::Service<Uri> for DialConnector {
    type Response = DialedStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<DialedStream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let DialConnector { addr, proxied } = *self;
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(DialedStream {
                io: TokioIo::new(stream),
                proxied,
            })
        })
    }
}

/// A connection made by [`DialConnector`].
#[derive(Debug)]
pub struct DialedStream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for DialedStream {
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.proxied)
    }
}

impl hyper::rt::Read for DialedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for DialedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
