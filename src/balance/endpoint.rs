//! Long-lived per-endpoint state: load, latency, failures, ejection, and the
//! connection pool.
//!
//! It lives outside the routing snapshot, keyed by address, so a table swap
//! (which happens on every registry change) keeps what we have learned about
//! an endpoint and its warm connections. Everything is atomics or a short
//! uncontended std mutex: the request path never awaits on this state.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::ewma::PeakEwma;
use crate::config::OutlierConfig;
use crate::outbound::h1_pool::H1Sender;
use crate::outbound::pool::PeerPool;

/// What went wrong with one try, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// TCP connect or HTTP/2 handshake failed: the request was never sent.
    Connect,
    /// Reset, protocol error, or a 5xx from the endpoint.
    Gateway,
}

/// State of one endpoint (a peer sidecar's inbound listener).
#[derive(Debug)]
pub struct EndpointState {
    /// `host:port` dialled for this endpoint.
    pub addr: Arc<str>,
    /// Requests sent and whose response body has not ended yet.
    in_flight: AtomicU32,
    /// Latency estimate; a std mutex held only for a few float operations.
    ewma: Mutex<PeakEwma>,
    /// Consecutive gateway failures (reset to 0 by any success).
    consecutive_failures: AtomicU32,
    /// Consecutive connect failures (reset to 0 by a connect success).
    consecutive_connect_failures: AtomicU32,
    /// Ejected until this many ms after `created`; 0 = not ejected.
    ejected_until_ms: AtomicU64,
    /// How often this endpoint was ejected; ejections grow with it.
    ejections: AtomicU32,
    /// Lifetime counters for `/routes`.
    requests: AtomicU64,
    failures: AtomicU64,
    /// Time base for `ejected_until_ms` (tokio time, so tests can pause it).
    created: Instant,
    /// Pooled connections to this endpoint.
    pub pool: PeerPool,
}

/// Snapshot of an endpoint's state for `/routes` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStats {
    /// Requests in flight.
    pub in_flight: u32,
    /// Decayed latency estimate in milliseconds.
    pub ewma_ms: f64,
    /// Consecutive gateway failures.
    pub consecutive_failures: u32,
    /// Whether currently ejected.
    pub ejected: bool,
    /// Milliseconds of ejection left.
    pub ejected_for_ms: u64,
    /// Lifetime ejection count.
    pub ejections: u32,
    /// Lifetime requests.
    pub requests: u64,
    /// Lifetime failed tries.
    pub failures: u64,
}

/// Holds one unit of in-flight load on an endpoint until dropped (when the
/// response body ends or is abandoned).
#[derive(Debug)]
pub struct LoadGuard {
    state: Arc<EndpointState>,
    /// The HTTP/1.1 connection the request went over, given back to the
    /// endpoint's pool when the response ends: only then can it carry the
    /// next request.
    h1: Option<H1Sender>,
}

// === impl EndpointState ===

impl EndpointState {
    /// New state for `addr`.
    pub fn new(addr: Arc<str>, pool: PeerPool, now: Instant) -> Self {
        EndpointState {
            addr,
            in_flight: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma::new(now)),
            consecutive_failures: AtomicU32::new(0),
            consecutive_connect_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            created: now,
            pool,
        }
    }

    /// Start a request: counts it in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> LoadGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        LoadGuard {
            state: self.clone(),
            h1: None,
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether passive outlier detection has this endpoint ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && self.ms(now) < until
    }

    /// Peak-EWMA cost: latency × (in-flight + 1), divided by weight.
    ///
    /// An endpoint never measured is probed one request at a time: free
    /// while idle (so a new or returning replica gets traffic at once,
    /// rather than waiting for a pessimistic default to decay), and
    /// prohibitive while its first request is outstanding (so a slow newcomer
    /// cannot soak up a burst before its latency is known).
    pub fn p2c_cost(&self, now: Instant, weight: u32) -> f64 {
        let in_flight = self.in_flight();
        let rtt = match self.ewma.lock() {
            Ok(e) if e.is_fresh() => {
                return if in_flight == 0 { 0.0 } else { f64::MAX / 4.0 };
            }
            Ok(e) => e.estimate(now),
            Err(_) => 0.0,
        };
        rtt * (in_flight as f64 + 1.0) / weight.max(1) as f64
    }

    /// Least-request cost: in-flight per unit of weight.
    pub fn load_cost(&self, weight: u32) -> f64 {
        (self.in_flight() as f64 + 1.0) / weight.max(1) as f64
    }

    /// A try got a usable response (any status but 5xx) after `rtt`.
    pub fn record_success(&self, rtt: Duration, now: Instant) {
        if let Ok(mut e) = self.ewma.lock() {
            e.observe(rtt, now);
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.consecutive_connect_failures
            .store(0, Ordering::Relaxed);
    }

    /// A connection was established: connect failures are forgiven (the
    /// peer is alive even if its responses are bad).
    pub fn record_connected(&self) {
        self.consecutive_connect_failures
            .store(0, Ordering::Relaxed);
    }

    /// A try failed. Returns the ejection time when this failure ejects
    /// the endpoint. `may_eject` says whether the pool's max-ejection share
    /// leaves room for one more.
    pub fn record_failure(
        &self,
        kind: Failure,
        now: Instant,
        cfg: &OutlierConfig,
        may_eject: bool,
    ) -> Option<Duration> {
        // Failures do not touch the latency estimate (as in tower and
        // linkerd): they are outlier detection's business, and a penalty
        // here would hide a failing endpoint from the detector.
        self.failures.fetch_add(1, Ordering::Relaxed);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let trip = match kind {
            Failure::Connect => {
                let c = self
                    .consecutive_connect_failures
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                c >= cfg.consecutive_connect_failures || failures >= cfg.consecutive_failures
            }
            Failure::Gateway => failures >= cfg.consecutive_failures,
        };
        if !trip || !may_eject || self.is_ejected(now) {
            return None;
        }
        Some(self.eject(now, cfg))
    }

    /// Eject now, whatever the failure counts (the connection-level
    /// detector declared the peer dead). Returns the ejection time, or
    /// `None` if already ejected or the pool's share is used up.
    pub fn eject_now(
        &self,
        now: Instant,
        cfg: &OutlierConfig,
        may_eject: bool,
    ) -> Option<Duration> {
        if !may_eject || self.is_ejected(now) {
            return None;
        }
        Some(self.eject(now, cfg))
    }

    /// Eject for base × (ejection count), capped at max.
    fn eject(&self, now: Instant, cfg: &OutlierConfig) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = cfg.base_ejection.saturating_mul(n).min(cfg.max_ejection);
        let until = self.ms(now) + time.as_millis() as u64;
        self.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.consecutive_connect_failures
            .store(0, Ordering::Relaxed);
        time
    }

    /// State for `/routes`.
    pub fn stats(&self, now: Instant) -> EndpointStats {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now_ms = self.ms(now);
        EndpointStats {
            in_flight: self.in_flight(),
            ewma_ms: self
                .ewma
                .lock()
                .map(|e| e.estimate(now) / 1e6)
                .unwrap_or(0.0),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            ejected: until != 0 && now_ms < until,
            ejected_for_ms: until.saturating_sub(now_ms),
            ejections: self.ejections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.created).as_millis() as u64
    }
}

// === impl LoadGuard ===

impl LoadGuard {
    /// Give `sender` back to the endpoint's pool when the guard drops.
    pub fn with_h1(mut self, sender: H1Sender) -> Self {
        self.h1 = Some(sender);
        self
    }

    /// The response body failed mid-stream (reset after headers).
    pub fn body_failed(self) {
        self.state.failures.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(sender) = self.h1.take() {
            self.state.pool.put_h1(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 5,
            consecutive_connect_failures: 2,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }

    fn state() -> Arc<EndpointState> {
        Arc::new(EndpointState::new(
            "e:1".into(),
            PeerPool::detached(),
            Instant::now(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn five_gateway_failures_eject_and_ejection_grows() {
        let s = state();
        let c = cfg();
        for _ in 0..4 {
            assert_eq!(
                s.record_failure(Failure::Gateway, Instant::now(), &c, true),
                None
            );
        }
        let t = s.record_failure(Failure::Gateway, Instant::now(), &c, true);
        assert_eq!(t, Some(Duration::from_secs(30)));
        assert!(s.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(s.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!s.is_ejected(Instant::now()), "ejection ends after 30 s");
        // A repeat offence doubles the time.
        let mut second = None;
        for _ in 0..5 {
            second = s
                .record_failure(Failure::Gateway, Instant::now(), &c, true)
                .or(second);
        }
        assert_eq!(second, Some(Duration::from_secs(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_is_capped() {
        let s = state();
        let c = cfg();
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(301)).await;
            for _ in 0..5 {
                if let Some(t) = s.record_failure(Failure::Gateway, Instant::now(), &c, true) {
                    last = t;
                }
            }
        }
        assert_eq!(last, Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_eject_quickly_and_success_resets() {
        let s = state();
        let c = cfg();
        assert_eq!(
            s.record_failure(Failure::Connect, Instant::now(), &c, true),
            None
        );
        s.record_success(Duration::from_millis(1), Instant::now());
        assert_eq!(
            s.record_failure(Failure::Connect, Instant::now(), &c, true),
            None
        );
        assert!(s
            .record_failure(Failure::Connect, Instant::now(), &c, true)
            .is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_share_blocks_ejection() {
        let s = state();
        let c = cfg();
        for _ in 0..10 {
            assert_eq!(
                s.record_failure(Failure::Gateway, Instant::now(), &c, false),
                None
            );
        }
        assert!(!s.is_ejected(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn load_guard_counts_in_flight() {
        let s = state();
        let g1 = s.start();
        let g2 = s.start();
        assert_eq!(s.in_flight(), 2);
        drop(g1);
        g2.body_failed();
        assert_eq!(s.in_flight(), 0);
    }
}
