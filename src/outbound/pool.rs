//! Connections to one peer sidecar.
//!
//! Between sidecars we multiplex requests over one HTTP/2 connection per
//! endpoint (linkerd2-proxy's choice). HTTP/2 gives us two failure detectors
//! that HTTP/1.1 cannot:
//!
//! * **Handshake-confirmed connects.** A stopped (SIGSTOPped, hung) process
//!   still has its TCP connections accepted by the kernel, so "connected"
//!   means nothing. A connection counts as established only when the peer's
//!   first bytes (its SETTINGS frame) arrive; until then the request has not
//!   been sent and can go to another endpoint, whatever its method.
//! * **PING keepalive.** Every [`KEEPALIVE_INTERVAL`] the connection is
//!   pinged; no answer within [`KEEPALIVE_TIMEOUT`] kills it, which fails the
//!   requests in flight on it (so idempotent ones are retried elsewhere)
//!   instead of letting them hang until the overall timeout.
//!
//! Requests that arrived as HTTP/1.1 travel over pooled HTTP/1.1
//! connections instead ([`super::h1_pool`]), which are used only while the
//! HTTP/2 connection is live and are closed when its PINGs go unanswered:
//! the HTTP/2 connection stays the peer's failure detector.
//!
//! Upgrades (WebSocket) need an HTTP/1.1 connection of their own, which is
//! made per request and never pooled (an upgraded connection is consumed).
//!
//! With mTLS both kinds are dialed through [`super::dial`], which decides
//! TLS or plaintext from the endpoint's record and verifies the peer's
//! SPIFFE identity.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::dial::{self, PeerStream, PeerTls};
use super::h1_pool::{H1Pool, H1Sender, OpenConn, DEFAULT_IDLE_EXPIRY};
use super::h2_client::{self, Ended, H2Sender};
use crate::http::first_read::FirstRead;
use crate::http::Body;
use crate::inbound::local_h1;
use crate::tls::Tls;

/// PING interval on sidecar-to-sidecar connections.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// A PING unanswered this long declares the peer dead: with the interval,
/// a blackholed peer is detected within about 2 s.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Per-stream flow-control window. Bounds memory per streaming request
/// while leaving room for a full bandwidth-delay product on a LAN.
const STREAM_WINDOW: u32 = 256 * 1024;
/// Connection-level window: several streams at full speed at once.
const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;

/// After a failed connect, callers queued behind it fail at once for this
/// long instead of each waiting out its own connect timeout.
const FAILED_CONNECT_MEMORY: Duration = Duration::from_millis(250);

/// How a request that arrived as HTTP/1.1 goes to a peer.
#[derive(Debug)]
pub enum H1Route {
    /// On this idle pooled HTTP/1.1 connection.
    Idle(H1Sender),
    /// On this idle lean connection ([`PeerPool::h1_route`] with `lean`).
    Lean(local_h1::Conn),
    /// On a new HTTP/1.1 connection ([`PeerPool::dial_h1`]), which has its
    /// place under the cap: the HTTP/2 connection is live, no HTTP/1.1 one
    /// is idle.
    Dial(OpenConn),
    /// Over HTTP/2 ([`PeerPool::get`] connects it if needed): all
    /// HTTP/1.1 connections the cap allows are busy, or the HTTP/2
    /// connection is not live. HTTP/1.1 is used only while it is, and a new
    /// HTTP/2 connection must carry a request: the peer closes one that
    /// brings no first request within its header read timeout.
    NeedH2,
}

/// Settings shared by all peer pools.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Our mTLS state; `None` when `[tls]` is not configured.
    pub tls: Option<Arc<Tls>>,
    /// Where a connection that died of an unanswered PING reports its
    /// endpoint's address, so the outbound side ejects the endpoint at once
    /// ([`crate::outbound::Outbound::eject_hung`]). Without it the ejection
    /// would wait for the next request that fails on the endpoint, and the
    /// balancer may send none there for seconds: P2C-EWMA avoids an endpoint
    /// whose latency estimate is above its peers'. `None` in detached pools
    /// and unit tests; the request path still ejects on its next failure.
    pub hung: Option<mpsc::Sender<Arc<str>>>,
    /// How long a pooled HTTP/1.1 connection may sit idle: shorter than the
    /// peers' `idle_connection_timeout`, so that we, not the peer, close it
    /// ([`super::h1_pool`]).
    pub h1_idle_expiry: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            tls: None,
            hung: None,
            h1_idle_expiry: DEFAULT_IDLE_EXPIRY,
        }
    }
}

/// Room for PING-timeout reports in flight to the ejector. A full channel
/// loses nothing: the endpoint's `unresponsive` flag stays set, and the
/// request path ejects on the next failure.
pub const HUNG_REPORTS: usize = 64;

/// Why a connection to a peer could not be established.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{addr}: {message}")]
pub struct ConnectError {
    /// The endpoint.
    pub addr: Arc<str>,
    /// What failed.
    pub message: String,
}

/// The pool of one endpoint: one multiplexed HTTP/2 connection, and the
/// HTTP/1.1 connections that carry requests which arrived as HTTP/1.1.
#[derive(Debug)]
pub struct PeerPool {
    addr: Arc<str>,
    settings: Arc<PoolSettings>,
    /// How the endpoint's record says it may be dialed (`None`: plaintext,
    /// for detached test pools).
    peer: Option<PeerTls>,
    /// The live connection, if any. A std mutex: held only to clone or
    /// replace the sender, never across an await.
    ready: Mutex<Option<H2Sender>>,
    /// Serializes connects so a burst of requests makes one connection.
    connecting: tokio::sync::Mutex<()>,
    last_failure: Mutex<Option<(Instant, ConnectError)>>,
    /// Set when a connection died of an unanswered PING: the peer is hung,
    /// not merely slow. Taken by the request path, which ejects at once.
    unresponsive: Arc<std::sync::atomic::AtomicBool>,
    /// Shared with the HTTP/2 connection's task, which closes these
    /// connections when the peer stops answering PINGs.
    h1: Arc<H1Pool>,
}

// === impl PeerPool ===

impl PeerPool {
    /// A pool for the endpoint at `addr` (`host:port`).
    pub fn new(addr: Arc<str>, settings: Arc<PoolSettings>) -> Self {
        Self::for_peer(addr, settings, None)
    }

    /// A pool for an endpoint whose record says how to dial it (TLS or
    /// not, and which service's identity it must prove).
    pub fn for_peer(addr: Arc<str>, settings: Arc<PoolSettings>, peer: Option<PeerTls>) -> Self {
        PeerPool {
            addr,
            peer,
            ready: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_failure: Mutex::new(None),
            unresponsive: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            h1: Arc::new(H1Pool::new(settings.h1_idle_expiry)),
            settings,
        }
    }

    /// A pool that is never connected (unit tests of balancing state).
    pub fn detached() -> Self {
        PeerPool::new("0.0.0.0:0".into(), Arc::new(PoolSettings::default()))
    }

    /// A ready HTTP/2 sender, connecting if needed.
    pub async fn get(&self, connect_timeout: Duration) -> Result<H2Sender, ConnectError> {
        if let Some(s) = self.ready_sender() {
            return Ok(s);
        }
        let asked = Instant::now();
        let _turn = self.connecting.lock().await;
        if let Some(s) = self.ready_sender() {
            return Ok(s);
        }
        if let Some(err) = self.recent_failure(asked) {
            return Err(err);
        }
        match self.connect_h2(connect_timeout).await {
            Ok(sender) => {
                if let Ok(mut r) = self.ready.lock() {
                    *r = Some(sender.clone());
                }
                Ok(sender)
            }
            Err(e) => {
                if let Ok(mut f) = self.last_failure.lock() {
                    *f = Some((Instant::now(), e.clone()));
                }
                Err(e)
            }
        }
    }

    /// The pooled connection if it is live, without waiting (the request
    /// path's fast path; [`PeerPool::get`] connects when this is `None`).
    pub fn ready(&self) -> Option<H2Sender> {
        self.ready_sender()
    }

    /// Whether a connection died of a PING timeout since the last call.
    pub fn take_unresponsive(&self) -> bool {
        self.unresponsive
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Forget the current connection (after a connection-level error).
    pub fn invalidate(&self) {
        if let Ok(mut r) = self.ready.lock() {
            *r = None;
        }
    }

    /// Whether a live connection is pooled (for `/routes`).
    pub fn is_connected(&self) -> bool {
        self.ready_sender().is_some()
    }

    /// How a request that arrived as HTTP/1.1 should go to this peer,
    /// decided without waiting. `lean`: the request may take a lean
    /// connection ([`PeerPool::lean_ok`]); a `Dial` is then answered with
    /// [`PeerPool::dial_lean`].
    pub fn h1_route(&self, lean: bool) -> H1Route {
        if !self.h2_live() {
            return H1Route::NeedH2;
        }
        let idle = match lean {
            true => self.h1.take_lean().map(H1Route::Lean),
            false => self.h1.take(Instant::now()).map(H1Route::Idle),
        };
        match idle {
            Some(route) => route,
            None => match self.h1.reserve(lean) {
                Some(slot) => H1Route::Dial(slot),
                None => H1Route::NeedH2,
            },
        }
    }

    /// A new HTTP/1.1 connection to the peer. Give it
    /// back with [`PeerPool::put_h1`] once the response has ended.
    pub async fn dial_h1(
        &self,
        slot: OpenConn,
        connect_timeout: Duration,
    ) -> Result<H1Sender, ConnectError> {
        let (sender, conn) = self.handshake_h1(connect_timeout).await?;
        self.h1.spawn(conn, self.addr.clone(), slot);
        Ok(sender)
    }

    /// Whether lean connections may be used: plaintext only, since they
    /// are plain TCP streams. With `[tls]` configured every peer
    /// connection goes through hyper's client.
    pub fn lean_ok(&self) -> bool {
        self.settings.tls.is_none()
    }

    /// A new lean HTTP/1.1 connection to the peer ([`local_h1`]). It goes
    /// back to the pool by itself when its response has been read.
    pub async fn dial_lean(
        &self,
        slot: OpenConn,
        connect_timeout: Duration,
    ) -> Result<local_h1::Conn, ConnectError> {
        match self.dial(connect_timeout, false, Instant::now()).await? {
            PeerStream::Plain(tcp) => Ok(local_h1::Conn::new(tcp, Some(slot))),
            PeerStream::Tls(_) => Err(self.err("a lean connection cannot carry TLS".into())),
        }
    }

    /// The pool of HTTP/1.1 connections, for lean exchanges.
    pub fn h1_pool(&self) -> &Arc<H1Pool> {
        &self.h1
    }

    /// Return an HTTP/1.1 connection whose response has ended.
    pub fn put_h1(&self, sender: H1Sender) {
        self.h1.put(sender, Instant::now());
    }

    /// Idle pooled HTTP/1.1 connections (for tests).
    pub fn idle_h1(&self) -> usize {
        self.h1.idle_len()
    }

    /// A fresh HTTP/1.1 connection for an upgrade request.
    pub async fn connect_http1(
        &self,
        connect_timeout: Duration,
    ) -> Result<http1::SendRequest<Body>, ConnectError> {
        let (sender, conn) = self.handshake_h1(connect_timeout).await?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(endpoint = %addr, error = %e, "upgrade connection ended");
            }
        });
        Ok(sender)
    }

    /// Dial (with mTLS when the endpoint's record says so, ALPN
    /// `http/1.1`) and set up HTTP/1.1 on the stream; the caller drives the
    /// connection.
    async fn handshake_h1(
        &self,
        connect_timeout: Duration,
    ) -> Result<
        (
            http1::SendRequest<Body>,
            http1::Connection<TokioIo<PeerStream>, Body>,
        ),
        ConnectError,
    > {
        let stream = self.dial(connect_timeout, false, Instant::now()).await?;
        http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.err(format!("HTTP/1.1 handshake: {e}")))
    }

    /// Whether the HTTP/2 connection is live; unlike
    /// [`PeerPool::ready_sender`], without cloning its sender.
    fn h2_live(&self) -> bool {
        match self.ready.lock() {
            Ok(r) => r.as_ref().is_some_and(|s| !s.is_closed()),
            Err(_) => false,
        }
    }

    fn ready_sender(&self) -> Option<H2Sender> {
        let mut r = self.ready.lock().ok()?;
        match r.as_ref() {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                *r = None;
                None
            }
            None => None,
        }
    }

    fn recent_failure(&self, asked: Instant) -> Option<ConnectError> {
        let f = self.last_failure.lock().ok()?;
        match f.as_ref() {
            // Only a failure that happened while we waited counts: it is
            // news about the peer, not a stale verdict.
            Some((at, e)) if *at >= asked && at.elapsed() < FAILED_CONNECT_MEMORY => {
                Some(e.clone())
            }
            _ => None,
        }
    }

    async fn tcp(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let addr = self.addr.clone();
        let connect = async {
            let mut last = None;
            let addrs = tokio::net::lookup_host(&*addr)
                .await
                .map_err(|e| self.err(format!("resolve: {e}")))?;
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(s);
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(self.err(match last {
                Some(e) => e.to_string(),
                None => "no addresses".into(),
            }))
        };
        tokio::time::timeout(timeout, connect).await.map_err(|_| {
            self.err(format!(
                "connect timed out after {} ms",
                timeout.as_millis()
            ))
        })?
    }

    /// TCP, then mTLS if this endpoint is dialed with TLS (ALPN `h2` for
    /// the pool, `http/1.1` for an upgrade). The handshake shares the
    /// connect deadline.
    async fn dial(
        &self,
        timeout: Duration,
        h2: bool,
        started: Instant,
    ) -> Result<PeerStream, ConnectError> {
        let tls = self.settings.tls.as_deref();
        let use_tls = match &self.peer {
            Some(peer) => dial::plan(tls.map(Tls::mode), peer).map_err(|m| self.err(m))?,
            None => false,
        };
        let tcp = self.tcp(timeout).await?;
        let (Some(tls), Some(peer), true) = (tls, &self.peer, use_tls) else {
            return Ok(PeerStream::Plain(tcp));
        };
        let left = timeout.saturating_sub(started.elapsed());
        tokio::time::timeout(left, dial::handshake(tls, tcp, &peer.service, h2))
            .await
            .map_err(|_| {
                tls.record_handshake("outbound", false);
                self.err(format!(
                    "mTLS handshake not done within {} ms",
                    timeout.as_millis()
                ))
            })?
            .map_err(|m| self.err(m))
    }

    async fn connect_h2(&self, timeout: Duration) -> Result<H2Sender, ConnectError> {
        let started = Instant::now();
        let stream = self.dial(timeout, true, started).await?;
        let (io, first_bytes) = FirstRead::new(stream);
        let settings = h2_client::Settings {
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            keepalive: Some(h2_client::Keepalive {
                interval: KEEPALIVE_INTERVAL,
                timeout: KEEPALIVE_TIMEOUT,
            }),
        };
        let (sender, conn) = h2_client::handshake(io, &settings)
            .await
            .map_err(|e| self.err(format!("HTTP/2 handshake: {e}")))?;
        let addr = self.addr.clone();
        let unresponsive = self.unresponsive.clone();
        let hung = self.settings.hung.clone();
        let h1 = self.h1.clone();
        let handle = sender.clone();
        tokio::spawn(async move {
            let on_hung = || {
                tracing::warn!(endpoint = %addr, "peer stopped answering HTTP/2 PINGs; connection dropped");
                // Before the requests on them fail: they must find the
                // endpoint marked hung.
                unresponsive.store(true, std::sync::atomic::Ordering::Relaxed);
                h1.close_all();
                if let Some(tx) = hung {
                    let _ = tx.try_send(addr.clone());
                }
            };
            match h2_client::drive(conn, &handle, settings, on_hung).await {
                Ended::Closed(Some(e)) => {
                    tracing::debug!(endpoint = %addr, error = %e, "peer connection closed")
                }
                Ended::Closed(None) | Ended::Hung => {}
            }
        });
        // The peer proves it is alive by answering our preface with its
        // SETTINGS; a hung process never does.
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, first_bytes).await {
            Ok(Ok(_)) => {
                // A peer that answers again is no longer "hung".
                self.unresponsive
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                Ok(sender)
            }
            Ok(Err(_)) => Err(self.err("connection closed during the HTTP/2 handshake".into())),
            Err(_) => Err(self.err(format!(
                "no HTTP/2 SETTINGS from the peer within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    fn err(&self, message: String) -> ConnectError {
        ConnectError {
            addr: self.addr.clone(),
            message,
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
