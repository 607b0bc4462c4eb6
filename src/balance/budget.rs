//! Retry budget: retries may add at most a percentage of recent requests,
//! plus a small floor per second (Finagle's and linkerd's design).
//!
//! A fixed retry count multiplies load by (retries + 1) exactly when an
//! upstream is already failing; a budget caps the extra load at e.g. 20%
//! whatever happens, which is what stops retry storms.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Window over which requests and retries are counted.
pub const WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;
const BUCKET: Duration = Duration::from_secs(1);

/// Per-upstream retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u32,
    min_per_sec: u32,
    inner: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    epoch: Instant,
    /// Index (seconds since epoch) of the newest bucket.
    head: u64,
    requests: [u32; BUCKETS],
    retries: [u32; BUCKETS],
}

// === impl RetryBudget ===

impl RetryBudget {
    /// `percent` of requests, plus `min_per_sec` retries per second.
    pub fn new(percent: u32, min_per_sec: u32, now: Instant) -> Self {
        RetryBudget {
            percent,
            min_per_sec,
            inner: Mutex::new(Buckets {
                epoch: now,
                head: 0,
                requests: [0; BUCKETS],
                retries: [0; BUCKETS],
            }),
        }
    }

    /// Count one original request.
    pub fn deposit(&self, now: Instant) {
        if let Ok(mut b) = self.inner.lock() {
            let i = b.advance(now);
            b.requests[i] = b.requests[i].saturating_add(1);
        }
    }

    /// Take one retry if the budget allows it.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let Ok(mut b) = self.inner.lock() else {
            return false;
        };
        let i = b.advance(now);
        let requests: u64 = b.requests.iter().map(|&n| n as u64).sum();
        let retries: u64 = b.retries.iter().map(|&n| n as u64).sum();
        let allowed =
            requests * self.percent as u64 / 100 + self.min_per_sec as u64 * WINDOW.as_secs();
        if retries < allowed {
            b.retries[i] = b.retries[i].saturating_add(1);
            true
        } else {
            false
        }
    }
}

impl Buckets {
    /// Rotate buckets up to `now`, returning the current bucket's index.
    fn advance(&mut self, now: Instant) -> usize {
        let sec = now.saturating_duration_since(self.epoch).as_secs() / BUCKET.as_secs();
        if sec > self.head {
            let stale = (sec - self.head).min(BUCKETS as u64);
            for k in 1..=stale {
                let idx = ((self.head + k) % BUCKETS as u64) as usize;
                self.requests[idx] = 0;
                self.retries[idx] = 0;
            }
            self.head = sec;
        }
        (self.head % BUCKETS as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn floor_then_percentage() {
        let b = RetryBudget::new(20, 1, Instant::now());
        // Floor: 1/s over a 10 s window = 10 retries with no traffic.
        let granted = (0..50).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(granted, 10);
        // 100 requests allow 20 more.
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        let granted = (0..50).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides() {
        let b = RetryBudget::new(20, 0, Instant::now());
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        assert_eq!(
            (0..50).filter(|_| b.try_withdraw(Instant::now())).count(),
            20
        );
        tokio::time::advance(WINDOW + BUCKET).await;
        assert!(
            !b.try_withdraw(Instant::now()),
            "old requests no longer fund retries"
        );
        for _ in 0..10 {
            b.deposit(Instant::now());
        }
        assert_eq!(
            (0..50).filter(|_| b.try_withdraw(Instant::now())).count(),
            2
        );
    }
}
