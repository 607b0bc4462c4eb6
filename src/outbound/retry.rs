//! Which failures may be retried, and how a request body is kept for it.
//!
//! A request is only ever sent twice when doing so cannot execute it twice
//! in a way the caller did not allow: a connect failure (never sent) is
//! retried whatever the method; a reset or 502/503/504 only for idempotent
//! methods (RFC 9110 §9.2.2) or requests carrying `idempotency-key`, and
//! only if the body was small enough to keep a copy.

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;

use crate::http::headers::IDEMPOTENCY_KEY;
use crate::http::{body::BoxError, Body};

/// Largest request body kept in memory so the request can be retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// A request body, kept (replayable) or streaming (one shot).
#[derive(Debug)]
pub enum ReqBody {
    /// Complete and small: can be sent again.
    Kept(Bytes),
    /// Streaming: can be sent once; `None` after it was.
    Stream(Option<Body>),
}

/// Endpoints a request has tried, by index. Nearly every request tries one
/// or two, so they live inline; a heap list only exists for a request that
/// tries more than [`Tried::INLINE`] (a long run of connect failures).
#[derive(Debug, Default)]
pub struct Tried {
    inline: [usize; Tried::INLINE],
    len: usize,
    spill: Vec<usize>,
}

// === impl Tried ===

impl Tried {
    /// Tries kept without allocating: the first try and the default two
    /// retries, plus one connect failure.
    const INLINE: usize = 4;

    /// Record a try of endpoint `index`.
    pub fn push(&mut self, index: usize) {
        if self.len < Self::INLINE {
            self.inline[self.len] = index;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push(index);
        }
        self.len += 1;
    }

    /// Forget the last try (it never reached the endpoint, through no
    /// fault of the endpoint's).
    pub fn pop(&mut self) {
        if self.len == 0 {
            return;
        }
        if self.len > Self::INLINE {
            self.spill.pop();
            if self.len - 1 == Self::INLINE {
                self.spill.clear();
            }
        }
        self.len -= 1;
    }

    /// The endpoints tried so far, in order.
    pub fn as_slice(&self) -> &[usize] {
        if self.len <= Self::INLINE {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    /// How many tries so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was tried yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Whether the method (or an idempotency key) makes a resend safe.
pub fn is_idempotent(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || headers.contains_key(IDEMPOTENCY_KEY)
}

/// Statuses that mean "this endpoint could not serve it" rather than an
/// application answer.
pub fn is_retryable_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Keep the body when it is known to be small; otherwise stream it.
pub async fn prepare(body: Body) -> Result<ReqBody, BoxError> {
    use http_body::Body as _;
    if body.is_end_stream() {
        return Ok(ReqBody::Kept(Bytes::new()));
    }
    match body.size_hint().upper() {
        Some(n) if n <= MAX_REPLAY_BODY => {
            let collected = body.collect().await?;
            // Trailers on a small body are rare (gRPC unary requests carry
            // none); dropping a copy of them is not worth a retry path.
            Ok(ReqBody::Kept(collected.to_bytes()))
        }
        _ => Ok(ReqBody::Stream(Some(body))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency() {
        let h = HeaderMap::new();
        assert!(is_idempotent(&Method::GET, &h));
        assert!(is_idempotent(&Method::PUT, &h));
        assert!(!is_idempotent(&Method::POST, &h));
        let mut k = HeaderMap::new();
        k.insert(IDEMPOTENCY_KEY, "abc".parse().unwrap());
        assert!(is_idempotent(&Method::POST, &k));
    }

    #[test]
    fn tried_keeps_every_index_past_the_inline_ones() {
        let mut t = Tried::default();
        assert!(t.is_empty());
        for i in 0..7 {
            t.push(i * 10);
            assert_eq!(t.len(), i + 1);
        }
        assert_eq!(t.as_slice(), &[0, 10, 20, 30, 40, 50, 60]);
    }

    #[test]
    fn pop_forgets_the_last_try_inline_and_spilled() {
        let mut t = Tried::default();
        for i in 0..6 {
            t.push(i);
        }
        t.pop();
        assert_eq!(t.as_slice(), &[0, 1, 2, 3, 4]);
        t.pop();
        assert_eq!(t.as_slice(), &[0, 1, 2, 3]);
        t.pop();
        assert_eq!(t.as_slice(), &[0, 1, 2]);
        t.push(9);
        t.push(10);
        assert_eq!(t.as_slice(), &[0, 1, 2, 9, 10]);
        let mut empty = Tried::default();
        empty.pop();
        assert!(empty.is_empty());
    }

    #[test]
    fn retryable_statuses() {
        assert!(is_retryable_status(StatusCode::BAD_GATEWAY));
        assert!(is_retryable_status(StatusCode::GATEWAY_TIMEOUT));
        assert!(!is_retryable_status(StatusCode::INTERNAL_SERVER_ERROR));
    }
}
