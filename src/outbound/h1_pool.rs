//! Pooled HTTP/1.1 connections to one peer sidecar.
//!
//! A request that reached us as HTTP/1.1 goes to the peer over HTTP/1.1,
//! one request per connection at a time, on a connection taken from this
//! pool, while fewer than [`MAX_CONNS`] of them are busy; past that it is
//! multiplexed over the peer's HTTP/2 connection, as requests that arrived
//! as HTTP/2 (gRPC, h2c) always are. HTTP/1.1 saves about a third of both
//! hops' instructions per request (HPACK on both sides, h2's stream state
//! and flow control), which is what counts at low concurrency; at high
//! concurrency HTTP/2's batching counts for more (see [`MAX_CONNS`]).
//!
//! HTTP/1.1 has no liveness signal of its own, so the peer's HTTP/2
//! connection keeps providing it (see [`super::pool`]): HTTP/1.1 is used
//! only while that connection is live, which also means the peer proved it
//! answers (its SETTINGS) before the first HTTP/1.1 request is sent; and
//! when a PING goes unanswered, [`H1Pool::close_all`] closes every HTTP/1.1
//! connection to the peer, so the requests in flight on them fail at once
//! (idempotent ones are retried elsewhere) instead of hanging until their
//! timeout.
//!
//! Bodiless requests with idempotent methods (most of a mesh's calls) take
//! lean connections ([`crate::inbound::local_h1`]) when the peer is dialed
//! in plaintext, whether they arrived as HTTP/1.1 or as HTTP/2 (see
//! `outbound::as_h1`; not those that accept trailers): the request's own
//! task writes the head and reads the response, where hyper's client hands
//! each request to a connection task and back (11k of hop A's 28k
//! instructions per request under callgrind at one connection). Other
//! requests, and every request under mTLS, use hyper's client. The two
//! kinds have caps of their own ([`MAX_CONNS`], [`MAX_LEAN_CONNS`]).
//!
//! Idle connections are taken last-in first-out, so the ones traffic no
//! longer needs sink to the front of the list and age out there. They age
//! out well before the peer's own idle-connection timeout: a connection the
//! peer closes just as a request is written to it fails that request after
//! it may have been sent, and a POST could then not be retried.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http1;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::http::woken::Woken;
use crate::http::Body;
use crate::inbound::idle::IdleList;
use crate::inbound::local_h1;

/// A sender on one pooled HTTP/1.1 connection.
pub type H1Sender = http1::SendRequest<Body>;

/// How long a connection may sit idle in the pool by default: well below
/// the default `idle_connection_timeout` (90 s) after which the peer closes
/// it.
pub const DEFAULT_IDLE_EXPIRY: Duration = Duration::from_secs(20);

/// Idle connections kept per peer. More than any burst of concurrency that
/// a sidecar sends one peer in practice; beyond it a returned connection is
/// closed rather than kept.
const IDLE_CAP: usize = 256;

/// Idle connections looked at per take that are open but not yet ready (a
/// response body just ended and the connection's task has not yet run to
/// accept the next request). Past these the request dials a new connection
/// rather than scan a long list under the lock.
const SCAN: usize = 4;

/// HTTP/1.1 connections open to one peer at most; past them, requests are
/// multiplexed over the HTTP/2 connection.
///
/// HTTP/1.1 saves user time per request (no HPACK, no stream state), and at
/// low concurrency that is all there is to save: it cut the added p50 at the
/// harness's fixed load by about a tenth and CPU per request by about an
/// eighth. At high concurrency HTTP/2 wins instead: one read and one write
/// carry many requests, where HTTP/1.1 needs both per request, and with
/// every request on HTTP/1.1 the saturation throughput fell (README,
/// "HTTP/2 vs HTTP/1.1 between sidecars"). A small cap gives each kind the
/// load it is best at, and bounds each hop's memory: with no cap, 64
/// client connections made 64 peer connections and 10.9 MiB per hop.
pub const MAX_CONNS: usize = 2;

/// Lean connections open to one peer at most; past them, requests are
/// multiplexed over the HTTP/2 connection. A count of its own, so that idle
/// lean connections do not keep requests with bodies off HTTP/1.1.
///
/// Why no more than hyper's: every connection a caller holds takes one of
/// the peer's `limits.max_connections`, and idle pooled ones hold theirs
/// for [`DEFAULT_IDLE_EXPIRY`]. With 16, one caller under load held 17
/// connections to a peer whose cap was 16, and a request then waited on a
/// connection the peer never accepted (integration test
/// `callers_beyond_max_connections_wait_and_fds_stay_bounded`); at 2 each
/// caller holds at most five (one HTTP/2, two of hyper's, two lean). The
/// speed did not argue for more either: in full harness runs on the 2-core
/// VM, 16 against 2 lowered the added p99 at the fixed load in two runs
/// (592 → 468, 598 → 473 µs) but left max throughput and CPU per request
/// within the noise, 4 against 2 changed nothing (p99 495 against 494 µs,
/// max RPS 19.4k against 20.7k), and at 64 max throughput fell by about
/// 15 % and CPU per request rose from 45 to 57 µs, since each request then
/// needs its own read and write on the peer link at both hops.
pub const MAX_LEAN_CONNS: usize = 2;

/// See the module docs.
#[derive(Debug)]
pub struct H1Pool {
    idle: Mutex<VecDeque<Idle>>,
    /// hyper's connections open (idle or busy); counted by their tasks.
    open: Arc<AtomicUsize>,
    /// Lean connections open (idle or busy); counted by the connections.
    lean_open: Arc<AtomicUsize>,
    /// Sent to when the peer stopped answering PINGs; every connection's
    /// task watches it.
    hung: watch::Sender<()>,
    expiry: Duration,
    /// Idle lean connections ([`local_h1`]): for bodiless, idempotent
    /// requests over plaintext, which the request's own task writes and
    /// reads without hyper's connection task. They count against the same
    /// cap as hyper's.
    lean: Arc<IdleList<local_h1::Conn>>,
}

#[derive(Debug)]
struct Idle {
    sender: H1Sender,
    since: Instant,
}

// === impl H1Pool ===

impl H1Pool {
    /// An empty pool whose idle connections expire after `expiry`.
    pub fn new(expiry: Duration) -> Self {
        H1Pool {
            idle: Mutex::new(VecDeque::new()),
            hung: watch::Sender::new(()),
            expiry,
            open: Default::default(),
            lean_open: Default::default(),
            lean: IdleList::with_timeout(expiry),
        }
    }

    /// An idle lean connection, if one is pooled and open.
    pub fn take_lean(&self) -> Option<local_h1::Conn> {
        self.lean.checkout()
    }

    /// Send the bodiless request `parts` (see [`local_h1::fits`]) on the
    /// lean connection `conn` and read the response head. The connection
    /// comes back to this pool by itself once the response has been read.
    ///
    /// No task of the connection's own is there for [`H1Pool::close_all`]
    /// to stop, so the exchange itself gives up when the peer stops
    /// answering PINGs.
    pub async fn exchange_lean(
        &self,
        mut conn: local_h1::Conn,
        parts: &http::request::Parts,
    ) -> Result<http::Response<Body>, LeanError> {
        let head = local_h1::encode_head(parts);
        let is_head = parts.method == http::Method::HEAD;
        let mut hung = self.hung.subscribe();
        let exchanged = tokio::select! {
            biased;
            r = local_h1::exchange(&mut conn, &head, is_head) => r,
            _ = hung.changed() => return Err(LeanError::Failed("peer stopped answering PINGs".into())),
        };
        match exchanged {
            Ok(head) => Ok(local_h1::respond(conn, head, &self.lean)),
            Err(local_h1::Failure::Stale) => Err(LeanError::Stale),
            Err(e) => Err(LeanError::Failed(e.to_string())),
        }
    }

    /// An idle connection ready for a request, if one is pooled.
    pub fn take(&self, now: Instant) -> Option<H1Sender> {
        let mut idle = self.idle.lock().ok()?;
        while idle
            .front()
            .is_some_and(|i| now.saturating_duration_since(i.since) >= self.expiry)
        {
            idle.pop_front();
        }
        let mut i = idle.len();
        let mut not_ready = 0;
        while i > 0 && not_ready < SCAN {
            i -= 1;
            let sender = &idle[i].sender;
            if sender.is_closed() {
                idle.remove(i);
            } else if sender.is_ready() {
                return idle.remove(i).map(|e| e.sender);
            } else {
                not_ready += 1;
            }
        }
        None
    }

    /// A place for one more connection of the kind, if its cap allows:
    /// held by the dial, then by the connection's task (`lean`: by the
    /// connection).
    pub fn reserve(&self, lean: bool) -> Option<OpenConn> {
        let (open, cap) = match lean {
            true => (&self.lean_open, MAX_LEAN_CONNS),
            false => (&self.open, MAX_CONNS),
        };
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < cap).then_some(n + 1)
        })
        .ok()?;
        Some(OpenConn(open.clone()))
    }

    /// Return a connection whose response has ended.
    pub fn put(&self, sender: H1Sender, now: Instant) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < IDLE_CAP {
                idle.push_back(Idle { sender, since: now });
            }
        }
    }

    /// Close every connection, idle or busy: the peer stopped answering.
    pub fn close_all(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        self.lean.clear();
        self.hung.send_replace(());
    }

    /// Drive a new connection until it ends, the peer is declared hung, or
    /// the pool is dropped (its endpoint left the routing table and no
    /// request holds it any more).
    pub fn spawn<C>(&self, conn: C, addr: Arc<str>, open: OpenConn)
    where
        C: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
    {
        let mut hung = self.hung.subscribe();
        tokio::spawn(async move {
            let _open = open;
            // Woken: the connection's task wakes once or twice per request,
            // and the watch channel would take its lock on every poll.
            let hung = Woken::new(async move {
                let _ = hung.changed().await;
            });
            tokio::select! {
                biased;
                ended = conn => {
                    if let Err(e) = ended {
                        tracing::debug!(endpoint = %addr, error = %e, "HTTP/1.1 peer connection ended");
                    }
                }
                () = hung => {
                    tracing::debug!(endpoint = %addr, "closing HTTP/1.1 peer connection: peer stopped answering PINGs");
                }
            }
        });
    }

    /// Idle connections pooled (for tests).
    pub fn idle_len(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

/// Why a lean exchange ([`H1Pool::exchange_lean`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum LeanError {
    /// The connection closed before any byte of a response: if it came
    /// from the idle list, the peer closed it before it read the request.
    #[error("connection closed before the response head")]
    Stale,
    /// Anything else, after the request may have been processed.
    #[error("{0}")]
    Failed(String),
}

/// One connection's place under the cap, from its dial until its task
/// ends.
#[derive(Debug)]
pub struct OpenConn(Arc<AtomicUsize>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
