//! One body type for every request and response the sidecar relays.
//!
//! Relayed bodies stream frame by frame (never buffered whole), so memory per
//! request stays at the flow-control window whatever the body's size. A body
//! small enough to keep is held as [`Bytes`] so a retry can resend it.
//! A body can carry a [`crate::balance::LoadGuard`]: the endpoint's in-flight
//! count covers the request until its response body ends (P2C load), and the
//! guard reports the outcome when it drops.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

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
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Empty,
        Full { data: Option<Bytes> },
        Incoming { #[pin] inner: Incoming },
    }
}

// === impl Body ===

impl Body {
    /// No body.
    pub fn empty() -> Self {
        Body {
            kind: Kind::Empty,
            guard: None,
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
        }
    }

    /// A streaming body received from a peer.
    pub fn incoming(inner: Incoming) -> Self {
        Body {
            kind: Kind::Incoming { inner },
            guard: None,
        }
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

    fn is_end_stream_hint(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full { data } => data.is_none(),
            Kind::Incoming { inner } => http_body::Body::is_end_stream(inner),
        }
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
        let this = self.project();
        let res = match this.kind.project() {
            KindProj::Empty => Poll::Ready(None),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Incoming { inner } => match inner.poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        };
        match &res {
            Poll::Ready(None) => {
                this.guard.take();
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(g) = this.guard.take() {
                    g.body_failed();
                }
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
        }
    }
}
