//! Keep-alive HTTP/1.1 connections to the local service.
//!
//! hyper-util's pooled `Client` did this job before. Per request, it hashes
//! a pool key, races a checkout against a fresh connect, rewrites the URI,
//! and spawns a task that puts the connection back once it is ready again.
//! callgrind priced its `send_request` at about 7.5k instructions per
//! request on hop B of the bench chain. There is one local service and one
//! address here, so none of that is needed. The pool is a list of idle
//! hyper senders behind a mutex, held only to push or pop.
//!
//! A connection goes back on the list as soon as its response head arrives.
//! While its body still streams, the sender is not ready, so checkouts pass
//! it over. It becomes ready when hyper has read the whole message. The
//! list therefore never needs more connections than there are exchanges in
//! flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::http::{Body, ProxyError};
use crate::outbound::error_chain;

/// Connect deadline to the local service: it is on loopback, so anything
/// slower than this means it is not listening.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Idle connections are closed after this (the old client's setting).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// At most this many idle connections are kept; a burst's extra ones close
/// when they come back.
const MAX_IDLE: usize = 256;

/// How often idle connections are checked for expiry while no request
/// comes to do it.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// The HTTP/1.1 pool for the local service at one address.
pub struct LocalPool {
    address: String,
    /// Oldest first, so expiry trims the front and checkouts pop the back
    /// (the most recently used connection, whose buffers are warm).
    idle: Mutex<Vec<Idle>>,
    sweeper: AtomicBool,
}

impl LocalPool {
    /// A pool for the service at `address` (`host:port`).
    pub fn new(address: String) -> Arc<Self> {
        Arc::new(LocalPool {
            address,
            idle: Mutex::new(Vec::new()),
            sweeper: AtomicBool::new(false),
        })
    }

    /// Send `req` (origin-form URI, HTTP/1.1) and return the response head.
    ///
    /// A pooled connection that hands the request back unsent (the service
    /// closed it while it sat idle) is dropped and the next one is tried,
    /// whatever the method: nothing reached the service. A request that was
    /// written and then lost is not retried here.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(res) => {
                    self.checkin(sender);
                    return Ok(res);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(upstream_error(&self.address, e.error())),
                },
            }
        }
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    fn checkout(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().ok()?;
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].sender.is_closed() {
                idle.remove(i);
            } else if idle[i].sender.is_ready() {
                return Some(idle.remove(i).sender);
            }
            // Otherwise its response body is still streaming: leave it.
        }
        None
    }

    fn checkin(self: &Arc<Self>, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        if !self.sweeper.swap(true, Ordering::Relaxed) {
            // Started here, not in `new`, because this always runs inside
            // the runtime.
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    /// Drop connections idle longer than [`IDLE_TIMEOUT`] or already closed.
    fn expire(&self, now: Instant) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|i| {
                !i.sender.is_closed() && now.saturating_duration_since(i.since) < IDLE_TIMEOUT
            });
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<Body>, ProxyError> {
        let stream = dial(&self.address).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_error(&self.address, error_chain(&e)))?;
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(address = %address, error = %e, "local service connection ended");
            }
        });
        Ok(sender)
    }
}

/// A TCP connection to the local service (`TCP_NODELAY`: requests and
/// responses are single small writes that must not wait for an ACK).
pub async fn dial(address: &str) -> Result<tokio::net::TcpStream, ProxyError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| {
            connect_error(
                address,
                format!("connect timed out after {} ms", CONNECT_TIMEOUT.as_millis()),
            )
        })?
        .map_err(|e| connect_error(address, e.to_string()))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The local service could not be reached.
pub fn connect_error(address: &str, message: String) -> ProxyError {
    ProxyError::LocalConnect {
        address: address.to_owned(),
        message,
    }
}

/// The local service failed mid-exchange.
pub fn upstream_error(address: &str, e: &dyn std::error::Error) -> ProxyError {
    ProxyError::LocalUpstream {
        address: address.to_owned(),
        message: error_chain(e),
    }
}

/// Expire idle connections periodically, for as long as the pool lives.
async fn sweep(pool: Weak<LocalPool>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.expire(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Accepts connections on a free loopback port, counts them, and runs
    /// `serve` on each with its 0-based index.
    async fn server<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, n));
            }
        });
        (addr, accepted)
    }

    /// A keep-alive HTTP/1.1 server (hyper's) that answers "ok".
    async fn counting_server() -> (String, Arc<AtomicUsize>) {
        server(|stream, _| async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        })
        .await
    }

    fn get() -> Request<Body> {
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = http::Uri::from_static("/");
        req
    }

    async fn body_text(res: Response<Incoming>) -> Bytes {
        res.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = counting_server().await;
        let pool = LocalPool::new(addr);
        for _ in 0..20 {
            let res = pool.send(get()).await.unwrap();
            assert_eq!(body_text(res).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    /// Read one request head from a raw connection; false at EOF.
    async fn read_head(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    #[tokio::test]
    async fn a_connection_still_streaming_its_body_is_not_reused() {
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let gate = Arc::new(Mutex::new(Some(gate)));
        // The first connection's first response holds its body open until
        // released; every other response is complete at once.
        let (addr, accepted) = server(move |mut stream, n| {
            let mut gate = if n == 0 {
                gate.lock().unwrap().take()
            } else {
                None
            };
            async move {
                while read_head(&mut stream).await {
                    let reply: &[u8] = if gate.is_some() {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    stream.write_all(reply).await.unwrap();
                    if let Some(gate) = gate.take() {
                        let _ = gate.await;
                        stream.write_all(b"0\r\n\r\n").await.unwrap();
                    }
                }
            }
        })
        .await;
        let pool = LocalPool::new(addr);
        let streaming = pool.send(get()).await.unwrap();
        let second = pool.send(get()).await.unwrap();
        assert_eq!(body_text(second).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the second request waited for, or was sent on, the busy connection"
        );
        release.send(()).unwrap();
        assert_eq!(body_text(streaming).await, "ok");
        // Both connections are idle and ready again: the next two requests
        // need no new one.
        body_text(pool.send(get()).await.unwrap()).await;
        body_text(pool.send(get()).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_all_return() {
        let (addr, accepted) = counting_server().await;
        let pool = LocalPool::new(addr);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { body_text(pool.send(get()).await.unwrap()).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), "ok");
        }
        let made = accepted.load(Ordering::SeqCst);
        assert!((1..=8).contains(&made), "{made} connections");
        assert_eq!(pool.idle_count(), made);
    }

    #[tokio::test]
    async fn connections_the_service_closes_after_each_response_never_fail_a_post() {
        // Answers one request per connection, then closes it (no keep-alive
        // header, so the client believes the connection can be reused).
        let (addr, accepted) = server(|mut stream, _| async move {
            if read_head(&mut stream).await {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            // then close: the pooled sender learns of it only later
        })
        .await;
        let pool = LocalPool::new(addr);
        for _ in 0..3 {
            let mut req = get();
            *req.method_mut() = http::Method::POST;
            let res = pool.send(req).await.unwrap();
            assert_eq!(body_text(res).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_service_that_is_not_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let pool = LocalPool::new(addr.clone());
        match pool.send(get()).await {
            Err(ProxyError::LocalConnect { address, .. }) => assert_eq!(address, addr),
            other => panic!("expected LocalConnect, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (addr, _) = counting_server().await;
        let pool = LocalPool::new(addr);
        body_text(pool.send(get()).await.unwrap()).await;
        assert_eq!(pool.idle_count(), 1);
        pool.expire(Instant::now() + IDLE_TIMEOUT - Duration::from_secs(1));
        assert_eq!(pool.idle_count(), 1, "not yet");
        pool.expire(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(pool.idle_count(), 0);
    }
}
