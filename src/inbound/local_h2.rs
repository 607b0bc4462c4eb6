//! One multiplexed HTTP/2 (h2c) connection to the local service, for callers
//! that spoke HTTP/2 themselves (gRPC, h2c clients).
//!
//! hyper-util's pooled `Client` did this job before, as it did for
//! HTTP/1.1 (see `local_pool`): per request it hashed a pool key, took the
//! pool's lock to find the shared connection, wrapped the sender in a
//! pooled handle and rewrote the URI. There is one local service and one
//! connection here, so a request only needs a clone of the connection's
//! sender.
//!
//! The connection is opened by the first request that needs it, and only
//! once however many requests arrive together: the others wait for that
//! connect instead of racing their own. A connection the service closed is
//! noticed (`is_closed`) by the next request, which opens a new one; a
//! request that a closing connection handed back unsent is tried once more
//! on a fresh connection, whatever its method, since nothing of it reached
//! the service.
//!
//! A service may know only HTTP/1.1 (most web frameworks do), while its
//! callers speak h2c. Such a service answers our preface with an HTTP/1.x
//! error instead of SETTINGS (a status line; Python's `http.server` a bare
//! HTML page), or closes the connection unanswered (hyper's HTTP/1-only
//! server). The first connection's [`FirstRead`] notices before any
//! request is sent, and the request is handed back ([`Failure::NotHttp2`])
//! for the HTTP/1.1 path. An answer other than SETTINGS marks the service
//! as speaking HTTP/1.1 at once; a close does so only once the request has
//! been answered over HTTP/1.1, since an HTTP/2 service that is shutting
//! down closes too. Later requests then go to HTTP/1.1 directly. Envoy and
//! HAProxy speak HTTP/1.1 to a service unless told otherwise; we follow the
//! caller's protocol (gRPC needs HTTP/2) without failing the callers of an
//! HTTP/1.1 service.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use http::{Request, Response};

use super::local_pool::{connect_error, dial, upstream_error, CONNECT_TIMEOUT};
use crate::http::first_read::{FirstRead, Greeting};
use crate::http::{Body, ProxyError};
use crate::outbound::h2_client::{self, H2Sender, SendError};

/// hyper's client defaults, which this connection had before it moved to
/// our own client ([`h2_client`]): a service streaming to a local caller
/// is not held back by the window.
const SETTINGS: h2_client::Settings = h2_client::Settings {
    stream_window: 2 * 1024 * 1024,
    connection_window: 5 * 1024 * 1024,
    keepalive: None,
};

/// The HTTP/2 connection to the local service at one address.
pub struct LocalH2 {
    address: String,
    /// The open connection's sender; `None` before the first request.
    /// Held only to clone or replace the sender.
    sender: Mutex<Option<H2Sender>>,
    /// Held while a connection is being opened, so that a burst of requests
    /// opens one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
    /// The service answered our preface with something other than
    /// SETTINGS. Kept for the life of the process: a service does not stop
    /// speaking HTTP/1.1, and probing again would cost it an error response.
    http1_only: AtomicBool,
}

/// Why [`LocalH2::send`] did not return a response.
#[derive(Debug)]
pub enum Failure {
    /// The service did not greet the preface with SETTINGS. Nothing of the
    /// request was sent; it is handed back for the HTTP/1.1 path.
    NotHttp2 {
        /// The request, untouched.
        request: Box<Request<Body>>,
        /// The service answered with something else, rather than closing:
        /// it is already marked as speaking HTTP/1.1. Otherwise the caller
        /// marks it ([`LocalH2::mark_http1_only`]) once HTTP/1.1 works.
        confirmed: bool,
    },
    /// The exchange failed.
    Error(ProxyError),
}

impl From<ProxyError> for Failure {
    fn from(e: ProxyError) -> Self {
        Failure::Error(e)
    }
}

/// What opening a connection found.
enum Opened {
    Sender(H2Sender),
    /// Answered with something other than SETTINGS (or marked so before).
    Http1,
    /// Closed before it sent anything.
    Unanswered,
}

impl LocalH2 {
    /// A connection slot for the service at `address` (`host:port`).
    pub fn new(address: String) -> Self {
        LocalH2 {
            address,
            sender: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            http1_only: AtomicBool::new(false),
        }
    }

    /// The service does not speak HTTP/2: send it HTTP/1.1.
    pub fn http1_only(&self) -> bool {
        self.http1_only.load(Ordering::Relaxed)
    }

    /// Record that the service speaks only HTTP/1.x.
    pub fn mark_http1_only(&self) {
        if !self.http1_only.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                address = %self.address,
                "the local service does not speak HTTP/2; callers' HTTP/2 requests go to it as HTTP/1.1 from now on"
            );
        }
    }

    /// Send `req` (absolute URI, HTTP/2) and return the response head.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Body>, Failure> {
        let mut fresh = false;
        loop {
            let mut sender = match self.current() {
                Some(sender) => sender,
                None => {
                    fresh = true;
                    match self.connect().await? {
                        Opened::Sender(sender) => sender,
                        other => {
                            return Err(Failure::NotHttp2 {
                                request: Box::new(req),
                                confirmed: matches!(other, Opened::Http1),
                            })
                        }
                    }
                }
            };
            match sender.send(req).await {
                Ok(res) => return Ok(res),
                // Handed back unsent: the connection was closing. One
                // more try, on a connection opened for it.
                Err(SendError::Unsent { request, .. }) if !fresh => {
                    fresh = true;
                    req = *request;
                }
                Err(SendError::Unsent { error, .. }) => {
                    return Err(upstream_error(&self.address, &error).into())
                }
                Err(SendError::Failed { error, .. }) => {
                    return Err(upstream_error(&self.address, &*error).into())
                }
            }
        }
    }

    /// A clone of the open connection's sender, if it is still open. A
    /// closed one stays stored until `connect` replaces it.
    fn current(&self) -> Option<H2Sender> {
        let slot = self.sender.lock().ok()?;
        slot.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Open a connection, unless another request just did, and wait for
    /// the service's greeting.
    async fn connect(&self) -> Result<Opened, ProxyError> {
        let _connecting = self.connecting.lock().await;
        // Whoever held the lock before may have connected already.
        if let Some(sender) = self.current() {
            return Ok(Opened::Sender(sender));
        }
        if self.http1_only() {
            return Ok(Opened::Http1);
        }
        let stream = dial(&self.address).await?;
        let (stream, greeting) = FirstRead::new(stream);
        let (sender, conn) = h2_client::handshake(stream, &SETTINGS)
            .await
            .map_err(|e| connect_error(&self.address, e.to_string()))?;
        let address = self.address.clone();
        let handle = sender.clone();
        tokio::spawn(async move {
            if let h2_client::Ended::Closed(Some(e)) =
                h2_client::drive(conn, &handle, SETTINGS, || {}).await
            {
                tracing::debug!(address = %address, error = %e, "local service HTTP/2 connection ended");
            }
        });
        // The service's first bytes tell an HTTP/2 server (SETTINGS) from
        // one that is not: one round trip, once per connection. Silence is
        // left to the request to find out about, as before.
        match tokio::time::timeout(CONNECT_TIMEOUT, greeting).await {
            Ok(Ok(Greeting::NotHttp2)) => {
                self.mark_http1_only();
                return Ok(Opened::Http1);
            }
            Ok(Err(_)) => return Ok(Opened::Unanswered),
            Ok(Ok(Greeting::Settings)) | Err(_) => {}
        }
        if let Ok(mut slot) = self.sender.lock() {
            *slot = Some(sender.clone());
        }
        Ok(Opened::Sender(sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::net::TcpListener;

    /// An h2c server (hyper's) on a free loopback port that answers "ok",
    /// counts the connections it accepts, and closes each connection
    /// gracefully (GOAWAY) after `per_connection` requests, if given.
    async fn h2_server(per_connection: Option<usize>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let served = Arc::new(AtomicUsize::new(0));
                    let (done_tx, done) = tokio::sync::watch::channel(false);
                    let counter = served.clone();
                    let svc = hyper::service::service_fn(move |_req| {
                        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        if per_connection.is_some_and(|limit| n >= limit) {
                            let _ = done_tx.send(true);
                        }
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    let mut done = done;
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = async { let _ = done.wait_for(|d| *d).await; } => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: &str) -> Request<Body> {
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
        *req.version_mut() = http::Version::HTTP_2;
        req
    }

    async fn body_text(res: Response<Body>) -> Bytes {
        res.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = h2_server(None).await;
        let local = LocalH2::new(addr.clone());
        for _ in 0..20 {
            let res = local.send(get(&addr)).await.unwrap();
            assert_eq!(res.version(), http::Version::HTTP_2);
            assert_eq!(body_text(res).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_burst_before_the_first_connection_opens_only_one() {
        let (addr, accepted) = h2_server(None).await;
        let local = Arc::new(LocalH2::new(addr.clone()));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (local, addr) = (local.clone(), addr.clone());
                tokio::spawn(async move { body_text(local.send(get(&addr)).await.unwrap()).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_service_closes_is_replaced() {
        // Every connection is shut down after one request: each request
        // after the first must notice and open a new one.
        let (addr, accepted) = h2_server(Some(1)).await;
        let local = LocalH2::new(addr.clone());
        for i in 1..=3 {
            let res = local.send(get(&addr)).await.unwrap();
            assert_eq!(body_text(res).await, "ok");
            // Wait for the GOAWAY to close the sender, so the next request
            // finds it closed rather than racing the shutdown.
            let closed = tokio::time::timeout(Duration::from_secs(5), async {
                while local.current().is_some() {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            assert!(closed.is_ok(), "connection {i} never closed");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// A server that answers every connection's first bytes with
    /// `answer` (nothing: it closes at once) and counts the connections.
    async fn raw_server(answer: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        super::super::test_server::server(move |mut stream, _| async move {
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(answer).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_service_that_answers_the_preface_with_http1_is_marked_and_the_request_handed_back() {
        let (addr, accepted) = raw_server(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let local = LocalH2::new(addr.clone());
        for _ in 0..2 {
            match local.send(get(&addr)).await {
                Err(Failure::NotHttp2 { request, confirmed }) => {
                    assert!(confirmed);
                    assert_eq!(request.uri().to_string(), format!("http://{addr}/"));
                }
                other => panic!("expected NotHttp2, got {other:?}"),
            }
            assert!(local.http1_only());
        }
        // The second request did not try HTTP/2 again.
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_service_that_closes_unanswered_is_not_marked_by_that_alone() {
        let (addr, _) = raw_server(b"").await;
        let local = LocalH2::new(addr.clone());
        match local.send(get(&addr)).await {
            Err(Failure::NotHttp2 { confirmed, .. }) => assert!(!confirmed),
            other => panic!("expected NotHttp2, got {other:?}"),
        }
        assert!(!local.http1_only());
    }

    #[tokio::test]
    async fn a_service_that_is_not_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let local = LocalH2::new(addr.clone());
        match local.send(get(&addr)).await {
            Err(Failure::Error(ProxyError::LocalConnect { address, .. })) => {
                assert_eq!(address, addr)
            }
            other => panic!("expected LocalConnect, got {other:?}"),
        }
    }
}
