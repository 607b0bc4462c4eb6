//! Choosing an endpoint for one try.
//!
//! Candidates are the endpoints of the service that this request has not
//! tried yet, that are under their concurrency limit, and that are not
//! ejected. Two safety valves follow Envoy: when fewer than
//! `panic_threshold_percent` of endpoints are healthy, ejection is ignored
//! (routing to all beats overloading the few survivors), and same-zone
//! endpoints are preferred while any is a candidate.
//!
//! Selection makes two passes over the endpoints and allocates nothing, so a
//! pick costs a few nanoseconds per endpoint; there is a fast path for a
//! single endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::time::Instant;

use crate::config::{LbKind, UpstreamPolicy};
use crate::discovery::Endpoint;

/// The chosen endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Index into the service's endpoint list.
    pub index: usize,
    /// Whether the panic threshold was in force (ejections ignored).
    pub panic: bool,
}

/// Why nothing could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// The service has no endpoints at all.
    NoEndpoints,
    /// Every endpoint was already tried by this request.
    Exhausted,
    /// Every untried endpoint is at its concurrency limit.
    Overloaded,
}

/// Pick an endpoint for a try. `tried` lists indices already used by this
/// request; `rr` is the service's round-robin cursor.
pub fn pick(
    eps: &[Endpoint],
    policy: &UpstreamPolicy,
    rr: &AtomicUsize,
    tried: &[usize],
    now: Instant,
) -> Result<Pick, PickError> {
    let n = eps.len();
    if n == 0 {
        return Err(PickError::NoEndpoints);
    }
    let max_per_ep = policy.max_requests_per_endpoint;
    let untried = |i: usize| !tried.contains(&i);
    let under_limit = |i: usize| eps[i].state.in_flight() < max_per_ep;

    if n == 1 {
        if !untried(0) {
            return Err(PickError::Exhausted);
        }
        if !under_limit(0) {
            return Err(PickError::Overloaded);
        }
        // One endpoint: ejecting it could only turn slow answers into
        // certain failures, so it is always used (panic mode by definition).
        let panic = eps[0].state.is_ejected(now);
        return Ok(Pick { index: 0, panic });
    }

    let healthy = (0..n).filter(|&i| !eps[i].state.is_ejected(now)).count();
    let panic = healthy < n && healthy * 100 < policy.panic_threshold_percent as usize * n;
    let base = |i: usize| untried(i) && under_limit(i) && (panic || !eps[i].state.is_ejected(now));
    let local_only = (0..n).any(|i| eps[i].local && base(i));
    let filter = |i: usize| base(i) && (!local_only || eps[i].local);

    let chosen = choose(eps, policy.lb, rr, now, &filter).or_else(|| {
        // Every healthy candidate is used up: an ejected endpoint that this
        // request has not tried beats failing the request outright.
        let relaxed = |i: usize| untried(i) && under_limit(i);
        choose(eps, policy.lb, rr, now, &relaxed)
    });
    match chosen {
        Some(index) => Ok(Pick { index, panic }),
        None if (0..n).any(untried) => Err(PickError::Overloaded),
        None => Err(PickError::Exhausted),
    }
}

/// Apply the balancing algorithm among the endpoints `filter` admits.
fn choose(
    eps: &[Endpoint],
    lb: LbKind,
    rr: &AtomicUsize,
    now: Instant,
    filter: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    // One pass: count, total weight, and the weights' GCD (so equal weights
    // round-robin one by one instead of in blocks of `weight`).
    let (count, total, gcd) =
        (0..eps.len())
            .filter(|&i| filter(i))
            .fold((0usize, 0u64, 0u64), |(c, w, g), i| {
                let wi = eps[i].weight.max(1) as u64;
                (c + 1, w + wi, gcd(g, wi))
            });
    if count == 0 {
        return None;
    }
    if count == 1 {
        return (0..eps.len()).find(|&i| filter(i));
    }
    match lb {
        LbKind::Random => nth_by_weight(eps, filter, fastrand::u64(..total), 1),
        LbKind::RoundRobin => {
            let k = rr.fetch_add(1, Ordering::Relaxed) as u64 % (total / gcd);
            nth_by_weight(eps, filter, k, gcd)
        }
        LbKind::P2cEwma | LbKind::LeastRequest => {
            let a = nth_by_weight(eps, filter, fastrand::u64(..total), 1)?;
            // Draw the second among the others so the two choices differ.
            let other = |i: usize| i != a && filter(i);
            let rest = total - eps[a].weight.max(1) as u64;
            if rest == 0 {
                return Some(a);
            }
            let b = nth_by_weight(eps, &other, fastrand::u64(..rest), 1)?;
            let cost = |i: usize| match lb {
                LbKind::LeastRequest => eps[i].state.load_cost(eps[i].weight),
                _ => eps[i].state.p2c_cost(now, eps[i].weight),
            };
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

/// The endpoint in whose weight range `k` falls (weights divided by
/// `unit`), among those `filter` admits.
fn nth_by_weight(
    eps: &[Endpoint],
    filter: &dyn Fn(usize) -> bool,
    mut k: u64,
    unit: u64,
) -> Option<usize> {
    for (i, ep) in eps.iter().enumerate() {
        if !filter(i) {
            continue;
        }
        let w = ep.weight.max(1) as u64 / unit.max(1);
        if k < w {
            return Some(i);
        }
        k -= w;
    }
    None
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Whether the pool's max-ejection share leaves room to eject one more.
/// At least one endpoint may always be ejected, even in a pool of two.
pub fn may_eject(eps: &[Endpoint], max_percent: u32, now: Instant) -> bool {
    let ejected = eps.iter().filter(|e| e.state.is_ejected(now)).count();
    let allowed = (eps.len() * max_percent as usize / 100).max(1);
    ejected < allowed
}
