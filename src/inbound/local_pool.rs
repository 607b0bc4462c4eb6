//! Keep-alive HTTP/1.1 connections to the local service, on hyper's client,
//! for requests that carry a body (bodiless ones go through the leaner
//! [`super::local_h1`]).
//!
//! hyper-util's pooled `Client` did this job before. Per request, it hashes
//! a pool key, races a checkout against a fresh connect, rewrites the URI,
//! and spawns a task that puts the connection back once it is ready again.
//! callgrind priced its `send_request` at about 7.5k instructions per
//! request on hop B of the bench chain. There is one local service and one
//! address here, so none of that is needed: the pool is an [`IdleList`] of
//! hyper senders.
//!
//! A connection goes back on the list as soon as its response head arrives.
//! While its body still streams, the sender is not ready, so checkouts pass
//! it over. It becomes ready when hyper has read the whole message. The
//! list therefore never needs more connections than there are exchanges in
//! flight.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::idle::{IdleList, Pooled, State};
use crate::http::{Body, ProxyError};
use crate::outbound::error_chain;

/// Connect deadline to the local service: it is on loopback, so anything
/// slower than this means it is not listening.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Pooled for http1::SendRequest<Body> {
    fn state(&mut self) -> State {
        if self.is_closed() {
            State::Closed
        } else if self.is_ready() {
            State::Ready
        } else {
            // Its response body is still streaming.
            State::Busy
        }
    }
}

/// The HTTP/1.1 pool for the local service at one address.
pub struct LocalPool {
    address: String,
    idle: Arc<IdleList<http1::SendRequest<Body>>>,
}

impl LocalPool {
    /// A pool for the service at `address` (`host:port`).
    pub fn new(address: String) -> Arc<Self> {
        Arc::new(LocalPool {
            address,
            idle: IdleList::new(),
        })
    }

    /// Send `req` (origin-form URI, HTTP/1.1) and return the response head.
    ///
    /// A pooled connection that hands the request back unsent (the service
    /// closed it while it sat idle) is dropped and the next one is tried,
    /// whatever the method: nothing reached the service. A request that was
    /// written and then lost is not retried here.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
        loop {
            let (mut sender, reused) = match self.idle.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(res) => {
                    self.idle.checkin(sender);
                    return Ok(res);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(upstream_error(&self.address, e.error())),
                },
            }
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

#[cfg(test)]
mod tests {
    use super::super::idle::IDLE_TIMEOUT;
    use super::super::test_server::{closed_port, read_head, server};
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;
    use tokio::time::Instant;

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
        assert_eq!(pool.idle.len(), 1);
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
        assert_eq!(pool.idle.len(), made);
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
        let addr = closed_port();
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
        assert_eq!(pool.idle.len(), 1);
        pool.idle
            .expire(Instant::now() + IDLE_TIMEOUT - Duration::from_secs(1));
        assert_eq!(pool.idle.len(), 1, "not yet");
        pool.idle.expire(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(pool.idle.len(), 0);
    }
}
