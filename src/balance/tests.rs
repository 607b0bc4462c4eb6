//! Balancer behaviour with deterministic (paused) time.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::*;
use crate::config::{LbKind, UpstreamPolicy};
use crate::discovery::Endpoint;
use crate::outbound::pool::PeerPool;
use crate::registry::EndpointRecord;

/// The built-in policy (5 failures eject for 30 s, at most 50% ejected,
/// panic below 50%) with the balancer under test.
fn policy(lb: LbKind) -> UpstreamPolicy {
    UpstreamPolicy {
        lb,
        ..UpstreamPolicy::default()
    }
}

fn endpoint(i: usize, zone: Option<&str>, my_zone: Option<&str>, weight: u32) -> Endpoint {
    let addr: Arc<str> = format!("10.0.0.{i}:15006").into();
    Endpoint {
        record: Arc::new(EndpointRecord {
            service: "b".into(),
            instance: format!("b-{i}").into(),
            address: (*addr).into(),
            zone: zone.map(Into::into),
            weight,
            protocols: vec![],
            tls: false,
            metadata: Default::default(),
            version: Default::default(),
        }),
        weight,
        local: zone.is_some() && zone == my_zone,
        source: 0,
        revision: 1,
        seen_at: SystemTime::now(),
        state: Arc::new(EndpointState::new(
            addr,
            PeerPool::detached(),
            Instant::now(),
        )),
    }
}

fn pool(n: usize) -> Vec<Endpoint> {
    (0..n).map(|i| endpoint(i, None, None, 100)).collect()
}

fn eject(ep: &Endpoint, p: &UpstreamPolicy) {
    for _ in 0..p.outlier.consecutive_failures {
        ep.state
            .record_failure(Failure::Gateway, Instant::now(), &p.outlier, true);
    }
    assert!(ep.state.is_ejected(Instant::now()));
}

/// Simulate `n` sequential requests where endpoint latencies are given, and
/// count picks per endpoint.
async fn simulate(
    eps: &[Endpoint],
    p: &UpstreamPolicy,
    latency: &[Duration],
    n: usize,
) -> Vec<usize> {
    let rr = AtomicUsize::new(0);
    let mut counts = vec![0; eps.len()];
    for _ in 0..n {
        let pick = pick(eps, p, &rr, &[], Instant::now()).unwrap();
        counts[pick.index] += 1;
        let guard = eps[pick.index].state.start();
        tokio::time::advance(latency[pick.index] / 10).await;
        eps[pick.index]
            .state
            .record_success(latency[pick.index], Instant::now());
        drop(guard);
    }
    counts
}

/// Closed-loop load from `workers` concurrent callers for `duration` of
/// (paused) time; each request holds its endpoint for its latency.
async fn concurrent(
    eps: Vec<Endpoint>,
    lb: LbKind,
    latency: Vec<Duration>,
    workers: usize,
    duration: Duration,
) -> Vec<usize> {
    let p = Arc::new(policy(lb));
    let eps = Arc::new(eps);
    let rr = Arc::new(AtomicUsize::new(0));
    let counts = Arc::new(std::sync::Mutex::new(vec![0usize; eps.len()]));
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (eps, p, rr, counts, latency) = (
            eps.clone(),
            p.clone(),
            rr.clone(),
            counts.clone(),
            latency.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let i = pick(&eps, &p, &rr, &[], Instant::now()).unwrap().index;
                counts.lock().unwrap()[i] += 1;
                let guard = eps[i].state.start();
                tokio::time::sleep(latency[i]).await;
                eps[i].state.record_success(latency[i], Instant::now());
                drop(guard);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = counts.lock().unwrap().clone();
    c
}

#[tokio::test(start_paused = true)]
async fn p2c_ewma_starves_a_ten_times_slower_replica() {
    fastrand::seed(7);
    let lat = vec![Duration::from_millis(2), Duration::from_millis(20)];
    let counts = concurrent(pool(2), LbKind::P2cEwma, lat, 8, Duration::from_secs(10)).await;
    let total: usize = counts.iter().sum();
    let slow_share = counts[1] as f64 / total as f64;
    assert!(
        slow_share < 0.10,
        "slow replica got {:.1}% ({counts:?})",
        slow_share * 100.0
    );
}

#[tokio::test(start_paused = true)]
async fn round_robin_splits_evenly() {
    let eps = pool(3);
    let lat = [Duration::from_millis(1); 3];
    let counts = simulate(&eps, &policy(LbKind::RoundRobin), &lat, 300).await;
    assert_eq!(counts, vec![100, 100, 100]);
}

#[tokio::test(start_paused = true)]
async fn weights_are_honoured() {
    fastrand::seed(11);
    let eps = vec![endpoint(0, None, None, 300), endpoint(1, None, None, 100)];
    let lat = [Duration::from_millis(1); 2];
    for lb in [LbKind::RoundRobin, LbKind::Random] {
        let counts = simulate(&eps, &policy(lb), &lat, 4000).await;
        let share = counts[0] as f64 / 4000.0;
        assert!(
            (share - 0.75).abs() < 0.03,
            "{lb:?}: heavy share {share} ({counts:?})"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn least_request_prefers_idle_endpoint() {
    let eps = pool(2);
    let _busy: Vec<_> = (0..10).map(|_| eps[0].state.start()).collect();
    let rr = AtomicUsize::new(0);
    for _ in 0..50 {
        assert_eq!(
            pick(
                &eps,
                &policy(LbKind::LeastRequest),
                &rr,
                &[],
                Instant::now()
            )
            .unwrap()
            .index,
            1
        );
    }
}

#[tokio::test(start_paused = true)]
async fn ejected_endpoints_are_skipped_and_come_back() {
    let eps = pool(4);
    let p = policy(LbKind::RoundRobin);
    eject(&eps[2], &p);
    let rr = AtomicUsize::new(0);
    for _ in 0..40 {
        let pick = pick(&eps, &p, &rr, &[], Instant::now()).unwrap();
        assert_ne!(pick.index, 2);
        assert!(!pick.panic);
    }
    tokio::time::advance(p.outlier.base_ejection + Duration::from_millis(1)).await;
    let picked: Vec<_> = (0..8)
        .map(|_| pick(&eps, &p, &rr, &[], Instant::now()).unwrap().index)
        .collect();
    assert!(
        picked.contains(&2),
        "endpoint back after its ejection: {picked:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn panic_threshold_routes_to_all() {
    let eps = pool(4);
    let p = policy(LbKind::RoundRobin);
    for ep in &eps[..3] {
        eject(ep, &p);
    }
    // 1 of 4 healthy (25% < 50%): ejections are ignored.
    let rr = AtomicUsize::new(0);
    let picks: Vec<_> = (0..8)
        .map(|_| pick(&eps, &p, &rr, &[], Instant::now()).unwrap())
        .collect();
    assert!(picks.iter().all(|p| p.panic));
    let distinct: std::collections::HashSet<_> = picks.iter().map(|p| p.index).collect();
    assert_eq!(distinct.len(), 4, "all endpoints used in panic mode");
}

#[tokio::test(start_paused = true)]
async fn same_zone_preferred_then_others() {
    let my = Some("z1");
    let eps = vec![
        endpoint(0, Some("z2"), my, 100),
        endpoint(1, Some("z1"), my, 100),
        endpoint(2, Some("z2"), my, 100),
    ];
    let p = policy(LbKind::RoundRobin);
    let rr = AtomicUsize::new(0);
    for _ in 0..20 {
        assert_eq!(pick(&eps, &p, &rr, &[], Instant::now()).unwrap().index, 1);
    }
    // A retry (the local one tried) or an ejection moves to other zones.
    assert_ne!(pick(&eps, &p, &rr, &[1], Instant::now()).unwrap().index, 1);
    eject(&eps[1], &p);
    assert_ne!(pick(&eps, &p, &rr, &[], Instant::now()).unwrap().index, 1);
}

#[tokio::test(start_paused = true)]
async fn retries_exhaust_and_limits_overload() {
    let eps = pool(2);
    let mut p = policy(LbKind::P2cEwma);
    let rr = AtomicUsize::new(0);
    assert_eq!(
        pick(&eps, &p, &rr, &[0, 1], Instant::now()),
        Err(PickError::Exhausted)
    );
    p.max_requests_per_endpoint = 1;
    let _g0 = eps[0].state.start();
    let _g1 = eps[1].state.start();
    assert_eq!(
        pick(&eps, &p, &rr, &[], Instant::now()),
        Err(PickError::Overloaded)
    );
    assert_eq!(
        pick(&[], &p, &rr, &[], Instant::now()),
        Err(PickError::NoEndpoints)
    );
}

#[tokio::test(start_paused = true)]
async fn at_least_one_endpoint_may_be_ejected_in_a_pool_of_two() {
    let eps = pool(2);
    let now = Instant::now();
    assert!(may_eject(&eps, 50, now));
    assert!(
        may_eject(&eps, 10, now),
        "10% of 2 rounds down to 0 but one is always allowed"
    );
    let p = policy(LbKind::P2cEwma);
    eject(&eps[0], &p);
    assert!(!may_eject(&eps, 50, Instant::now()));
}
