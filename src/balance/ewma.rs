//! Peak-EWMA latency estimate (linkerd2-proxy and tower's `PeakEwma`).
//!
//! A latency above the estimate replaces it at once (the "peak"), so a slow
//! endpoint is penalised immediately; lower latencies pull it down with an
//! exponentially weighted average. When an endpoint is idle the estimate
//! decays toward zero, so it is eventually probed again rather than starved
//! forever by one bad sample.

use std::time::Duration;

use tokio::time::Instant;

/// How fast old samples are forgotten (tower's default decay).
pub const DECAY: Duration = Duration::from_secs(10);

/// Estimate for an endpoint never measured: optimistic enough that new
/// endpoints get traffic, high enough that one fast sample beats it.
/// (linkerd2-proxy uses 30 ms for the same purpose.)
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A peak-EWMA estimate in nanoseconds.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    rtt_ns: f64,
    updated: Instant,
    /// No sample yet: the first one replaces the default outright, so a
    /// new endpoint's cost reflects reality after one request.
    fresh: bool,
}

// === impl PeakEwma ===

impl PeakEwma {
    /// A fresh estimate at [`DEFAULT_RTT`].
    pub fn new(now: Instant) -> Self {
        PeakEwma {
            rtt_ns: DEFAULT_RTT.as_nanos() as f64,
            updated: now,
            fresh: true,
        }
    }

    /// Whether no latency has been observed yet.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The estimate decayed to `now`, in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        self.rtt_ns * decay_factor(now.saturating_duration_since(self.updated))
    }

    /// Record one observed latency.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = rtt.as_nanos() as f64;
        let current = self.estimate(now);
        self.rtt_ns = if self.fresh || rtt_ns > current {
            rtt_ns
        } else {
            let w = decay_factor(now.saturating_duration_since(self.updated));
            current * w + rtt_ns * (1.0 - w)
        };
        self.updated = now;
        self.fresh = false;
    }
}

fn decay_factor(elapsed: Duration) -> f64 {
    (-(elapsed.as_secs_f64()) / DECAY.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peaks_jump_and_decay() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(1), t0);
        assert_eq!(e.estimate(t0), 1e6, "the first sample replaces the default");
        e.observe(Duration::from_millis(100), t0);
        assert_eq!(
            e.estimate(t0),
            100e6,
            "a peak replaces the estimate at once"
        );
        tokio::time::advance(DECAY).await;
        let later = Instant::now();
        let decayed = e.estimate(later);
        assert!(
            (decayed - 100e6 / std::f64::consts::E).abs() < 1e3,
            "{decayed}"
        );
        // A fast sample pulls a decayed estimate down, not up to its value.
        e.observe(Duration::from_millis(1), later);
        assert!(e.estimate(later) < decayed);
        assert!(e.estimate(later) > 1e6);
    }

    #[tokio::test(start_paused = true)]
    async fn ewma_converges_to_steady_latency() {
        let mut now = Instant::now();
        let mut e = PeakEwma::new(now);
        for _ in 0..200 {
            tokio::time::advance(Duration::from_millis(100)).await;
            now = Instant::now();
            e.observe(Duration::from_millis(5), now);
        }
        let est = e.estimate(now) / 1e6;
        assert!((est - 5.0).abs() < 0.5, "estimate {est} ms");
    }
}
