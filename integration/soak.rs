//! The soak: minutes of mixed load through a mesh on real etcd, with
//! periodic `kill -9`s of replica sidecars and etcd restarts. Not a CI test
//! (it is `#[ignore]`d and takes 10 minutes by default); run it with
//! `scripts/soak.sh`, which also says how to shorten it.
//!
//! Mesh: caller `a` and two replicas `b-1`, `b-2`, each with its sidecar,
//! all on one etcd. Load from a's outbound listener: HTTP/1.1 GETs, h2c
//! GETs and HTTP/1.1 POSTs. Faults, on a fixed schedule:
//! - every [`KILL_EVERY`]: `kill -9` one b replica's sidecar (alternating),
//!   and start it again [`DOWN_FOR`] later;
//! - every [`ETCD_EVERY`]: kill etcd (SIGKILL, or SIGTERM every other
//!   time) and start it again on the same data [`DOWN_FOR`] later.
//!
//! It asserts zero failed idempotent requests (the GETs) and flat RSS for
//! a's sidecar (which is never killed), and prints totals, POST failures
//! (a POST in flight on a killed connection may legitimately fail), and
//! every sidecar's RSS: first (after warm-up), last and max.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::loadgen::LoadMode;
use crate::support::mesh::{etcd_spec, routed_instances};
use crate::support::watchdog::rss_bytes;
use crate::support::{exclusive, wait_until, Etcd, LoadGen, LoadReport, Upstream};

/// How often one b sidecar is killed.
const KILL_EVERY: Duration = Duration::from_secs(20);
/// How often etcd is restarted.
const ETCD_EVERY: Duration = Duration::from_secs(75);
/// How long a killed process stays down.
const DOWN_FOR: Duration = Duration::from_secs(3);
/// RSS sampling period.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// RSS samples before this are warm-up (pools and buffers filling).
const WARM_UP: Duration = Duration::from_secs(60);

/// RSS samples of one sidecar (across its restarts).
#[derive(Debug, Default)]
struct RssSeries {
    /// (seconds since start, bytes).
    samples: Vec<(u64, u64)>,
}

impl RssSeries {
    fn first_after_warm_up(&self) -> u64 {
        self.samples
            .iter()
            .find(|(t, _)| *t >= WARM_UP.as_secs())
            .or(self.samples.first())
            .map_or(0, |(_, b)| *b)
    }
    fn last(&self) -> u64 {
        self.samples.last().map_or(0, |(_, b)| *b)
    }
    fn max(&self) -> u64 {
        self.samples.iter().map(|(_, b)| *b).max().unwrap_or(0)
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 10-minute soak: run scripts/soak.sh"]
async fn soak_mixed_load_with_sidecar_kills_and_etcd_restarts() {
    let _timing = exclusive().await;
    let secs: u64 = std::env::var("OUTRIGGER_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let run_for = Duration::from_secs(secs);
    let mut etcd = Etcd::start().await;
    let ep = etcd.endpoint();
    let (svc_a, svc_b1, svc_b2) = (
        Upstream::start("a1").await,
        Upstream::start("b1").await,
        Upstream::start("b2").await,
    );
    let mut a = etcd_spec("a", "a-1", &svc_a, &ep, "3s").start();
    let mut bs = [
        etcd_spec("b", "b-1", &svc_b1, &ep, "3s").start(),
        etcd_spec("b", "b-2", &svc_b2, &ep, "3s").start(),
    ];
    a.wait_ready().await;
    for b in bs.iter_mut() {
        b.wait_ready().await;
    }
    wait_until(
        "a routes to b-1 and b-2",
        Duration::from_secs(10),
        || async { routed_instances(&a.routes_json().await, "b") == ["b-1", "b-2"] },
    )
    .await;

    let out = a.outbound.expect("a has an outbound listener");
    let load = |mode: LoadMode, rate: u32| {
        LoadGen::new(out)
            .host("b")
            .mode(mode)
            .rate(rate)
            .duration(run_for)
    };
    let get_h1 = tokio::spawn(load(LoadMode::HostHeader, 100).run());
    let get_h2 = tokio::spawn(load(LoadMode::H2c, 50).run());
    let post = tokio::spawn(
        load(LoadMode::HostHeader, 20)
            .method(http::Method::POST, b"{\"soak\":true}")
            .run(),
    );

    let start = Instant::now();
    let mut rss: BTreeMap<&'static str, RssSeries> = BTreeMap::new();
    let (mut next_kill, mut next_etcd, mut next_sample) = (KILL_EVERY, ETCD_EVERY, Duration::ZERO);
    let mut down: Option<(usize, Instant)> = None;
    let mut etcd_down: Option<Instant> = None;
    let (mut kills, mut etcd_restarts, mut victim) = (0u32, 0u32, 0usize);
    let names = ["b-1", "b-2"];
    while start.elapsed() < run_for {
        let now = start.elapsed();
        if now >= next_sample {
            let t = now.as_secs();
            rss.entry("a-1")
                .or_default()
                .samples
                .push((t, rss_bytes(a.pid()).unwrap_or(0)));
            for (i, b) in bs.iter().enumerate() {
                if let Some(bytes) = rss_bytes(b.pid()) {
                    rss.entry(names[i]).or_default().samples.push((t, bytes));
                }
            }
            if let Some(pid) = etcd.pid() {
                rss.entry("etcd")
                    .or_default()
                    .samples
                    .push((t, rss_bytes(pid).unwrap_or(0)));
            }
            next_sample += SAMPLE_EVERY;
        }
        if down.is_none() && now >= next_kill {
            bs[victim].kill9();
            kills += 1;
            down = Some((victim, Instant::now()));
            victim = 1 - victim;
            next_kill += KILL_EVERY;
        }
        if let Some((i, since)) = down {
            if since.elapsed() >= DOWN_FOR {
                bs[i].restart();
                down = None;
            }
        }
        if etcd_down.is_none() && now >= next_etcd {
            if etcd_restarts % 2 == 0 {
                etcd.kill();
            } else {
                etcd.stop().await;
            }
            etcd_restarts += 1;
            etcd_down = Some(Instant::now());
            next_etcd += ETCD_EVERY;
        }
        if etcd_down.is_some_and(|since| since.elapsed() >= DOWN_FOR) {
            etcd.start_again().await;
            etcd_down = None;
        }
        for (i, b) in bs.iter_mut().enumerate() {
            assert!(
                b.try_status().is_none() || down.is_some_and(|(d, _)| d == i),
                "{} exited on its own:\n{}",
                names[i],
                b.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some((i, _)) = down {
        bs[i].restart();
    }
    if etcd_down.is_some() {
        etcd.start_again().await;
    }

    let (get_h1, get_h2, post): (LoadReport, LoadReport, LoadReport) = (
        get_h1.await.expect("h1 load"),
        get_h2.await.expect("h2 load"),
        post.await.expect("post load"),
    );
    let idempotent = get_h1.total() + get_h2.total();
    let failed_idempotent = get_h1.failures() + get_h2.failures();
    println!(
        "soak: {secs} s, {kills} sidecar kills (kill -9 + restart), {etcd_restarts} etcd restarts"
    );
    println!("soak: GET over HTTP/1.1: {get_h1}");
    println!("soak: GET over h2c:      {get_h2}");
    println!("soak: POST over HTTP/1.1 (not idempotent): {post}");
    println!(
        "soak: {} requests in total; {failed_idempotent} of {idempotent} idempotent requests failed; {} of {} POSTs failed",
        idempotent + post.total(),
        post.failures(),
        post.total()
    );
    for (name, series) in &rss {
        println!(
            "soak: RSS {name}: first after warm-up {:.1} MiB, last {:.1} MiB, max {:.1} MiB ({} samples)",
            mib(series.first_after_warm_up()),
            mib(series.last()),
            mib(series.max()),
            series.samples.len()
        );
    }
    assert_eq!(
        failed_idempotent,
        0,
        "failed idempotent requests: h1 {:?}, h2 {:?}",
        get_h1.outcomes(),
        get_h2.outcomes()
    );
    // Flat: a's sidecar (never restarted) ends where it was after warm-up,
    // within 30% plus a few MiB of allocator noise.
    let a_rss = &rss["a-1"];
    let (warm, last) = (a_rss.first_after_warm_up(), a_rss.last());
    assert!(
        last <= warm + warm * 3 / 10 + (4 << 20),
        "a's RSS grew from {:.1} MiB to {:.1} MiB",
        mib(warm),
        mib(last)
    );
}
