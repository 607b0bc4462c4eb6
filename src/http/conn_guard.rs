//! Guards that sit below hyper, on a connection's raw bytes.
//!
//! - **First-request deadline.** hyper's `header_read_timeout` only starts
//!   once hyper_util has told HTTP/1 from HTTP/2, which takes the first
//!   bytes: a client that connects and sends nothing, or dribbles the
//!   HTTP/2 preface a byte at a time, would hold a connection slot (and a
//!   file descriptor) forever. [`GuardedIo`] fails reads with `TimedOut`
//!   unless a complete first request (an HTTP/1 head or the first HTTP/2
//!   stream) arrives within the header read timeout.
//! - **Header read timeout.** A request head that has started to arrive
//!   must be complete within the header read timeout, or reads fail with
//!   `TimedOut`. The clock starts at the head's first bytes, not when the
//!   connection turned idle: hyper's own `header_read_timeout` (turned off,
//!   see `http::server::builder`) started when hyper began waiting for the
//!   next head, and so closed every keep-alive connection after 10 s of
//!   quiet, long before `idle_connection_timeout`, racing the requests that
//!   a caller's pool sent on them. It also allocated and registered a timer
//!   for every request; here a timer exists only while a read has ended in
//!   the middle of a head, which a head that arrives in one read never does.
//! - **Ambiguous HTTP/1 framing.** [`super::framing`] follows the byte
//!   stream and marks the connection when a request head could be framed
//!   two ways (request smuggling); the server refuses every request on a
//!   marked connection.
//! - **Idle connections.** The service counts the requests in flight with
//!   [`ConnGuard::request_in_flight`]; a request stays in flight until its
//!   response body has been sent completely or dropped (the [`InFlight`]
//!   token rides in the response [`super::Body`]). [`ConnGuard::idle`]
//!   resolves once nothing has been in flight for the idle timeout, and the
//!   server then shuts the connection down gracefully. Bytes alone (HTTP/2
//!   PING/PONG, WINDOW_UPDATE) are not activity: a client that only answers
//!   our keepalive pings is idle.
//!
//! All report through a [`ConnGuard`] shared with the connection's service.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::framing::{Ambiguity, Framing};

/// What the byte-level guards tell the connection's service, and what the
/// service tells the server about the connection's activity.
#[derive(Debug)]
pub struct ConnGuard {
    /// Set by the service on its first request: the deadline is met.
    first_request: AtomicBool,
    /// Set once by the framing tracker; never cleared, because the
    /// connection's framing can no longer be trusted.
    ambiguous: OnceLock<Ambiguity>,
    /// Requests whose response has not been fully sent or dropped.
    in_flight: AtomicUsize,
    /// A request switched protocols (101, or a successful CONNECT): the
    /// connection carries opaque bytes now and is never closed as idle.
    upgraded: AtomicBool,
    /// When a request last ended, in nanoseconds since `epoch`.
    ///
    /// Plain atomics rather than a channel that wakes [`ConnGuard::idle`]:
    /// that cost a notification and a fresh idle timer per request (2-3 %
    /// of a hop's instructions), while the idle check only needs to look
    /// at the count and this stamp when its own timer fires.
    last_end: AtomicU64,
    epoch: Instant,
}

impl Default for ConnGuard {
    fn default() -> Self {
        ConnGuard {
            first_request: AtomicBool::new(false),
            ambiguous: OnceLock::new(),
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            last_end: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// One request in flight on a connection, from the service call until its
/// response body is sent completely or dropped; see [`ConnGuard::idle`].
#[derive(Debug)]
pub struct InFlight {
    guard: Arc<ConnGuard>,
}

/// A client connection with the guards applied to what it reads.
#[derive(Debug)]
pub struct GuardedIo<T> {
    inner: T,
    guard: Arc<ConnGuard>,
    /// Until the first request: when the connection is given up.
    deadline: Option<Pin<Box<Sleep>>>,
    /// How long a started HTTP/1 head may take to complete.
    head_timeout: Duration,
    /// While a head is partly read: when the connection is given up.
    head_deadline: Option<Pin<Box<Sleep>>>,
    framing: Framing,
    /// While the lean HTTP/1.1 loop reads (`http::h1_server`), it parses
    /// and times every head itself, so the tracker waits: parsing each head
    /// twice cost ~1.3k instructions per request. See [`GuardedIo::resume`].
    deferred: bool,
}

// === impl ConnGuard ===

impl ConnGuard {
    /// A request arrived: the first-request deadline no longer applies.
    pub fn request_started(&self) {
        if !self.first_request.load(Ordering::Relaxed) {
            self.first_request.store(true, Ordering::Relaxed);
        }
    }

    /// Why this connection's HTTP/1 framing is ambiguous, if it is.
    pub fn ambiguous_framing(&self) -> Option<Ambiguity> {
        self.ambiguous.get().copied()
    }

    /// A request arrived (see [`ConnGuard::request_started`]); it counts
    /// as in flight until the returned token is dropped.
    pub fn request_in_flight(self: &Arc<Self>) -> InFlight {
        self.request_started();
        crate::memory::note_request();
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            guard: self.clone(),
        }
    }

    /// Resolves once no request has been in flight for `timeout` (counted
    /// from the latest moment a request ended, or from now if none is in
    /// flight already); never, once the connection was upgraded.
    ///
    /// Checks only when its timer fires: with requests in flight, every
    /// `timeout`; otherwise at the moment the connection would turn idle.
    pub async fn idle(&self, timeout: Duration) {
        let called = Instant::now();
        loop {
            if self.upgraded.load(Ordering::Acquire) {
                return std::future::pending().await;
            }
            if self.in_flight.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(timeout).await;
                continue;
            }
            let due = self.last_end().max(called) + timeout;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }

    /// When a request last ended (the guard's creation if none has).
    fn last_end(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_end.load(Ordering::Acquire))
    }
}

// === impl InFlight ===

impl InFlight {
    /// The request switched protocols: exempt the connection from the idle
    /// timeout for good (the upgraded bytes bypass the request count).
    pub fn upgraded(&self) {
        self.guard.upgraded.store(true, Ordering::Release);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stamp first, then count down: an idle check that sees the count
        // at zero then also sees this request's end, never an older one.
        let since = Instant::now().saturating_duration_since(self.guard.epoch);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.guard.last_end.fetch_max(nanos, Ordering::AcqRel);
        self.guard.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl GuardedIo ===

impl<T> GuardedIo<T> {
    /// Guard `inner`: a first request, and every HTTP/1 head once it has
    /// started, within `header_read_timeout`; HTTP/1 heads checked against
    /// hyper's limits (`max_head_bytes`, `max_headers`).
    pub fn new(
        inner: T,
        guard: Arc<ConnGuard>,
        header_read_timeout: Duration,
        max_head_bytes: usize,
        max_headers: usize,
    ) -> Self {
        GuardedIo {
            inner,
            guard,
            deadline: Some(Box::pin(tokio::time::sleep(header_read_timeout))),
            head_timeout: header_read_timeout,
            head_deadline: None,
            framing: Framing::new(max_head_bytes, max_headers),
            deferred: false,
        }
    }

    /// Stop following heads until [`GuardedIo::resume`]: the reader parses,
    /// checks and times them itself. The first-request deadline still runs.
    pub fn defer(&mut self) {
        self.deferred = true;
    }

    /// Follow heads again, starting at a head boundary with `replay`, the
    /// bytes the reader has read but not consumed. A head left incomplete
    /// in them must complete by `head_deadline` (when it began, plus the
    /// header read timeout), or by a full timeout from now if not given.
    pub fn resume(&mut self, replay: &[u8], head_deadline: Option<tokio::time::Instant>) {
        self.deferred = false;
        if let Some(why) = self.framing.feed(replay) {
            let _ = self.guard.ambiguous.set(why);
        }
        if self.framing.mid_head() {
            let at =
                head_deadline.unwrap_or_else(|| tokio::time::Instant::now() + self.head_timeout);
            self.head_deadline = Some(Box::pin(tokio::time::sleep_until(at)));
        }
    }
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut() {
            if this.guard.first_request.load(Ordering::Relaxed) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(timed_out(
                    "no complete request within the header read timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if read.is_pending() {
            // Waiting for the rest of a head: the timer is polled here, so
            // its waker is the connection's, and it fires into this read.
            if let Some(head) = this.head_deadline.as_mut() {
                if head.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(timed_out(
                        "request head not complete within the header read timeout",
                    )));
                }
            }
            return Poll::Pending;
        }
        ready!(read)?;
        if this.deferred {
            return Poll::Ready(Ok(()));
        }
        if this.framing.is_active() {
            if let Some(why) = this.framing.feed(&buf.filled()[before..]) {
                let _ = this.guard.ambiguous.set(why);
            }
        }
        // A tracker that stopped following HTTP/1 (HTTP/2, an upgrade, a
        // head hyper rejects on its own) is never mid-head: nothing to time.
        if !this.framing.mid_head() {
            this.head_deadline = None;
        } else if this.head_deadline.is_none() {
            // From the head's first read, not reset by later reads: a head
            // dribbled a byte at a time still has to finish in time.
            this.head_deadline = Some(Box::pin(tokio::time::sleep(this.head_timeout)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_and_a_request_disarms_the_deadline() {
        let (client, server) = tokio::io::duplex(1024);
        let guard = Arc::new(ConnGuard::default());
        let mut io = GuardedIo::new(server, guard.clone(), Duration::from_secs(2), 8192, 100);
        let mut buf = [0u8; 16];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        let (mut client2, server2) = tokio::io::duplex(1024);
        let guard2 = Arc::new(ConnGuard::default());
        let mut io2 = GuardedIo::new(server2, guard2.clone(), Duration::from_secs(2), 8192, 100);
        client2.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(io2.read(&mut buf).await.unwrap() > 0);
        guard2.request_started();
        tokio::time::sleep(Duration::from_secs(5)).await;
        client2.write_all(b"x").await.unwrap();
        let mut big = [0u8; 64];
        let n = io2
            .read(&mut big)
            .await
            .expect("no deadline after a request");
        assert_eq!(
            &big[..n],
            b"\r\nx",
            "the rest of the head, then the new byte"
        );
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_must_finish_in_time_but_a_quiet_connection_may_wait() {
        let timeout = Duration::from_secs(2);
        let (mut client, server) = tokio::io::duplex(1024);
        let guard = Arc::new(ConnGuard::default());
        let mut io = GuardedIo::new(server, guard.clone(), timeout, 8192, 100);
        let mut buf = [0u8; 256];
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        guard.request_started();

        // Quiet for longer than the timeout between requests: no error.
        let quiet = tokio::time::timeout(Duration::from_secs(60), io.read(&mut buf)).await;
        assert!(
            quiet.is_err(),
            "a keep-alive connection waiting for its next head timed out"
        );

        // A head dribbled in: the clock runs from its first bytes, and
        // later bytes do not restart it.
        let started = Instant::now();
        client.write_all(b"GET /2 HT").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 9);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 8);
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            started.elapsed(),
            timeout,
            "timed from the head's first bytes"
        );

        // A head completed across reads disarms the timer.
        let (mut client, server) = tokio::io::duplex(1024);
        let guard = Arc::new(ConnGuard::default());
        let mut io = GuardedIo::new(server, guard.clone(), timeout, 8192, 100);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        guard.request_started();
        client.write_all(b"Host: a\r\n\r\n").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        let quiet = tokio::time::timeout(Duration::from_secs(60), io.read(&mut buf)).await;
        assert!(quiet.is_err(), "a completed head left its timer armed");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_runs_from_the_last_response_and_never_after_an_upgrade() {
        let guard = Arc::new(ConnGuard::default());
        let timeout = Duration::from_secs(10);
        let start = tokio::time::Instant::now();
        let first = guard.request_in_flight();
        let second = guard.request_in_flight();
        let g = guard.clone();
        let idle = tokio::spawn(async move {
            g.idle(timeout).await;
            tokio::time::Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(first);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!idle.is_finished(), "idle with a request in flight");
        // The count drops to zero from this task, not the idle one's.
        drop(second);
        let at = idle.await.unwrap();
        assert_eq!(at - start, Duration::from_secs(70));

        let upgrade = guard.request_in_flight();
        upgrade.upgraded();
        drop(upgrade);
        let never = tokio::time::timeout(Duration::from_secs(3600), guard.idle(timeout)).await;
        assert!(never.is_err(), "an upgraded connection is never idle");
    }

    #[tokio::test]
    async fn smuggling_marks_the_connection() {
        let (mut client, server) = tokio::io::duplex(4096);
        let guard = Arc::new(ConnGuard::default());
        let mut io = GuardedIo::new(server, guard.clone(), Duration::from_secs(2), 8192, 100);
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0);
        assert!(guard.ambiguous_framing().is_some());
    }
}
