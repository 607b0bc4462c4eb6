//! One body type for every request and response the sidecar relays.
//!
//! Relayed bodies stream frame by frame (never buffered whole), so memory per
//! request stays at the flow-control window whatever the body's size. A body
//! small enough to keep is held as [`Bytes`] so a retry can resend it.
//! A body can carry a [`crate::balance::LoadGuard`]: the endpoint's in-flight
//! count covers the request until its response body ends (P2C load), and the
//! guard reports the outcome when it drops.
//! A response body can also carry its connection's [`InFlight`] token: the
//! request counts against the idle-connection timeout until its response
//! body ends or is dropped, so a long stream is never closed as idle.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use super::conn_guard::InFlight;
use crate::balance::LoadGuard;

/// Errors a relayed body can yield.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// A request or response body.
    pub struct Body {
        #[pin]
        kind: Kind,
        // Held until the body ends or is dropped; see the module docs.
        guard: Option<LoadGuard>,
        // Fails the body when no frame arrives for this long: streaming
        // responses are exempt from the overall timeout, but a stream that
        // went silent must not hold its endpoint's load forever.
        idle: Option<Idle>,
        // Held until the body ends or is dropped; see the module docs.
        in_flight: Option<InFlight>,
    }
}

/// An idle deadline that moves forward with every frame.
///
/// The timer is armed only when the body first has to wait, and moved only
/// when it waits again after a frame: a small response that is complete
/// whenever it is polled (most of them) never allocates a timer or touches
/// the timer wheel (callgrind: the timer's allocation, registration and drop
/// cost the calling sidecar ~0.4k instructions per response; bench/README.md).
struct Idle {
    after: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame arrived since the timer was last set.
    moved: bool,
}

/// The error a body yields when it idles out.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}: stream idle timeout")]
pub struct IdleTimeout(pub std::time::Duration);

pin_project! {
    #[project = KindProj]
    enum Kind {
        Empty,
        Full { data: Option<Bytes> },
        Incoming { #[pin] inner: Incoming },
        // A response from a peer over our own HTTP/2 client
        // (`outbound::h2_client`). `length` is the content-length the head
        // announced; `data_done` is set once the data frames have ended and
        // only the trailers remain.
        H2 { recv: h2::RecvStream, length: Option<u64>, data_done: bool },
        // Any other streaming body (a response read off a connection to
        // the local service by `inbound::local_h1`).
        Boxed { inner: Pin<Box<dyn http_body::Body<Data = Bytes, Error = BoxError> + Send + Sync>> },
    }
}

// === impl Body ===

impl Body {
    /// No body.
    pub fn empty() -> Self {
        Body {
            kind: Kind::Empty,
            guard: None,
            idle: None,
            in_flight: None,
        }
    }

    /// A complete body held in memory (replayable by cloning the bytes).
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        Body {
            kind: if data.is_empty() {
                Kind::Empty
            } else {
                Kind::Full { data: Some(data) }
            },
            guard: None,
            idle: None,
            in_flight: None,
        }
    }

    /// A streaming body received from a peer.
    pub fn incoming(inner: Incoming) -> Self {
        Body {
            kind: Kind::Incoming { inner },
            guard: None,
            idle: None,
            in_flight: None,
        }
    }

    /// A response body received on a stream of our own HTTP/2 client;
    /// `length` is the head's content-length, if any.
    pub fn h2(recv: h2::RecvStream, length: Option<u64>) -> Self {
        Body {
            kind: Kind::H2 {
                recv,
                length,
                data_done: false,
            },
            guard: None,
            idle: None,
            in_flight: None,
        }
    }

    /// Any other streaming body.
    pub fn boxed(
        inner: impl http_body::Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    ) -> Self {
        Body {
            kind: Kind::Boxed {
                inner: Box::pin(inner),
            },
            guard: None,
            idle: None,
            in_flight: None,
        }
    }

    /// The whole body if it is held in memory (`None`: empty), else the
    /// body itself back.
    pub fn into_full(self) -> Result<Option<Bytes>, Body> {
        match self.kind {
            Kind::Empty => Ok(None),
            Kind::Full { data } => Ok(data),
            _ => Err(self),
        }
    }

    /// Fail the body if no frame arrives for `after`.
    pub fn with_idle_timeout(mut self, after: std::time::Duration) -> Self {
        if !self.is_end_stream_hint() {
            self.idle = Some(Idle {
                after,
                timer: None,
                moved: false,
            });
        }
        self
    }

    /// Attach a load guard released when the body ends.
    pub fn with_guard(mut self, guard: LoadGuard) -> Self {
        if matches!(self.kind, Kind::Empty) || self.is_end_stream_hint() {
            // Nothing will be polled; release now so the load isn't held by
            // a body nobody reads.
            drop(guard);
        } else {
            self.guard = Some(guard);
        }
        self
    }

    /// Count the request as in flight on its client connection until this
    /// (response) body ends or is dropped.
    pub fn with_in_flight(mut self, in_flight: InFlight) -> Self {
        if !self.is_end_stream_hint() {
            self.in_flight = Some(in_flight);
        }
        // else: nothing left to send once the head is written; dropping the
        // token now starts the idle clock.
        self
    }

    fn is_end_stream_hint(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full { data } => data.is_none(),
            Kind::Incoming { inner } => http_body::Body::is_end_stream(inner),
            Kind::H2 { recv, .. } => recv.is_end_stream(),
            Kind::Boxed { inner } => inner.is_end_stream(),
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Full { .. } => "full",
            Kind::Incoming { .. } => "incoming",
            Kind::H2 { .. } => "h2",
            Kind::Boxed { .. } => "boxed",
        };
        f.debug_struct("Body")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::empty()
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Body::full(b)
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Body::full(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Body::full(Bytes::from(s))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let res = match this.kind.as_mut().project() {
            KindProj::Empty => Poll::Ready(None),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Incoming { inner } => match inner.poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            KindProj::H2 {
                recv, data_done, ..
            } => poll_h2(recv, data_done, cx),
            KindProj::Boxed { inner } => inner.as_mut().poll_frame(cx),
        };
        let res = match (res, this.idle.as_mut()) {
            (Poll::Pending, Some(idle)) => {
                let next = tokio::time::Instant::now() + idle.after;
                let timer = match &mut idle.timer {
                    Some(t) => {
                        if idle.moved {
                            t.as_mut().reset(next);
                        }
                        t
                    }
                    None => idle.timer.insert(Box::pin(tokio::time::sleep_until(next))),
                };
                idle.moved = false;
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let after = idle.after;
                        *this.idle = None;
                        Poll::Ready(Some(Err(IdleTimeout(after).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            (Poll::Ready(Some(Ok(frame))), Some(idle)) => {
                idle.moved = true;
                Poll::Ready(Some(Ok(frame)))
            }
            (res, _) => res,
        };
        match &res {
            Poll::Ready(None) => {
                this.guard.take();
                this.in_flight.take();
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(g) = this.guard.take() {
                    g.body_failed();
                }
                this.in_flight.take();
            }
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.is_end_stream_hint()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map(|d| d.len() as u64).unwrap_or(0))
            }
            Kind::Incoming { inner } => http_body::Body::size_hint(inner),
            Kind::H2 { length, .. } => match length {
                Some(n) => SizeHint::with_exact(*n),
                None => SizeHint::default(),
            },
            Kind::Boxed { inner } => inner.size_hint(),
        }
    }
}

/// The next frame of an HTTP/2 response: data, then trailers, then the end.
/// Each data frame's window is released as it is handed on, so the peer may
/// send more only as fast as our reader takes it.
fn poll_h2(
    recv: &mut h2::RecvStream,
    data_done: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    if !*data_done {
        match recv.poll_data(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(data))) => {
                // Fails only if more is released than was received.
                let _ = recv.flow_control().release_capacity(data.len());
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => *data_done = true,
        }
    }
    match recv.poll_trailers(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
        Poll::Ready(Ok(None)) => Poll::Ready(None),
        Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fails_a_silent_stream_and_resets_on_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A server whose response body sends one chunk, then goes silent.
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req| async {
                let (mut tx, body) =
                    http_body_util::channel::Channel::<Bytes, hyper::Error>::new(1);
                tokio::spawn(async move {
                    tx.send_data(Bytes::from_static(b"first")).await.ok();
                    std::future::pending::<()>().await;
                });
                Ok::<_, hyper::Error>(http::Response::new(body))
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await
                .ok();
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let res = tx
            .send_request(http::Request::new(Body::empty()))
            .await
            .unwrap();
        let mut body =
            Body::incoming(res.into_body()).with_idle_timeout(std::time::Duration::from_secs(5));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("idle timeout"), "{err}");
    }
}
