//! Overload: twice the concurrency and connection limits, a retry storm,
//! one slow upstream, and 128 MiB bodies streamed through two hops. The
//! callers that are not the cause must keep their latency, and every
//! sidecar its memory.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;

use crate::support::client::{self, BoxError};
use crate::support::guarded_mesh::{GuardedMesh, MeshOptions};
use crate::support::loadgen::LoadReport;
use crate::support::procfs::{self, PeakSampler};
use crate::support::recording::{pattern_chunks, Fnv};
use crate::support::{exclusive, LoadGen};

/// RSS no sidecar may exceed under any overload here (it idles at ~6 MiB).
/// A sidecar that buffered a 128 MiB body, or queued unbounded work, would
/// blow far past it.
const RSS_BOUND: u64 = 40 << 20;

fn two_services(a_extra: &str, replicas: usize) -> MeshOptions {
    MeshOptions {
        services: vec!["b".into(), "c".into()],
        replicas,
        a_extra: a_extra.into(),
        ..MeshOptions::default()
    }
}

/// c's latency under `during` stays within a bound of its `baseline`.
fn assert_unaffected(what: &str, baseline: &LoadReport, during: &LoadReport) {
    assert_eq!(during.failures(), 0, "{what}: c failed: {during}");
    let bound = baseline.p99() * 4 + Duration::from_millis(150);
    assert!(
        during.p99() <= bound,
        "{what}: c's p99 {:?} vs {:?} before (bound {bound:?})",
        during.p99(),
        baseline.p99()
    );
}

fn c_load(mesh: &GuardedMesh, secs: u64) -> LoadGen {
    LoadGen::new(mesh.outbound())
        .host("c")
        .rate(50)
        .duration(Duration::from_secs(secs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_concurrency_limit_sheds_fast_and_others_are_unaffected() {
    let _timing = exclusive().await;
    let mesh = GuardedMesh::start(two_services(
        "[[upstreams]]\nname = \"b\"\nmax_requests = 20\n",
        1,
    ))
    .await;
    mesh.peer("b").svc.set_delay(Duration::from_millis(300));
    let baseline = c_load(&mesh, 2).run().await;
    let sampler = PeakSampler::start(vec![mesh.a.pid()], Duration::from_millis(50));
    // ~130 req/s × 0.3 s ≈ 40 in flight against a limit of 20.
    let b_load = tokio::spawn(
        LoadGen::new(mesh.outbound())
            .host("b")
            .rate(130)
            .duration(Duration::from_secs(4))
            .run(),
    );
    let c_during = c_load(&mesh, 4).run().await;
    let b = b_load.await.unwrap();
    let peak = sampler.stop().await[0];
    let ok: Vec<_> = b.samples.iter().filter(|s| s.status == Some(200)).collect();
    let shed: Vec<_> = b.samples.iter().filter(|s| s.status == Some(503)).collect();
    let worst = |v: &[&crate::support::loadgen::Sample]| {
        v.iter().map(|s| s.latency).max().unwrap_or_default()
    };
    println!(
        "2x concurrency on b: {} ok (max {:?}), {} shed (max {:?}), other {}; c {c_during}; A peak RSS {:.1} MiB",
        ok.len(),
        worst(&ok),
        shed.len(),
        worst(&shed),
        b.total() - ok.len() - shed.len(),
        peak.rss_mib()
    );
    assert_eq!(ok.len() + shed.len(), b.total(), "only 200 or 503: {b}");
    assert!(shed.len() >= b.total() / 5, "the limit shed load: {b}");
    assert!(
        ok.len() >= b.total() / 5,
        "admitted callers are served: {b}"
    );
    assert!(
        worst(&ok) <= Duration::from_millis(300 + 1200),
        "admitted latency bounded"
    );
    assert!(
        worst(&shed) <= Duration::from_millis(500),
        "shedding is fast"
    );
    assert!(
        mesh.a
            .metric_value("outrigger_overloaded_total{service=\"b\"}")
            .await
            > Some(0.0)
    );
    assert!(
        peak.rss_bytes < RSS_BOUND,
        "A's RSS {:.1} MiB",
        peak.rss_mib()
    );
    assert_unaffected("2x concurrency on b", &baseline, &c_during);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_beyond_max_connections_wait_and_fds_stay_bounded() {
    let _timing = exclusive().await;
    let mut options = two_services("", 1);
    options.services = vec!["b".into()];
    options.common = "[limits]\nmax_connections = 16\n".into();
    let mesh = GuardedMesh::start(options).await;
    mesh.peer("b").svc.set_delay(Duration::from_millis(500));
    let pid = mesh.a.pid();
    let fds_before = procfs::stats(pid).open_fds;
    let sampler = PeakSampler::start(vec![pid], Duration::from_millis(20));
    let out = mesh.outbound();
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..32 {
        calls.spawn(async move {
            let req = client::get(&format!("http://b/conn-{i}"));
            let res = client::request(out, req).await;
            (res.status().as_u16(), started.elapsed())
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = calls.join_next().await {
        let (status, at) = r.unwrap();
        assert_eq!(status, 200);
        latencies.push(at);
    }
    let peak = sampler.stop().await[0];
    latencies.sort();
    println!(
        "32 callers, max_connections 16: done at {:?}..{:?}; A's fds {fds_before} -> peak {}",
        latencies[0], latencies[31], peak.open_fds
    );
    // 16 at a time: the second half waits for the first (≥ 2 × 500 ms).
    assert!(latencies[31] >= Duration::from_millis(950), "{latencies:?}");
    assert!(latencies[31] <= Duration::from_secs(5), "{latencies:?}");
    assert!(
        peak.open_fds <= fds_before + 16 + 8,
        "open fds peaked at {} (from {fds_before})",
        peak.open_fds
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_storm_on_one_service_leaves_the_others_unaffected() {
    let _timing = exclusive().await;
    let mesh = GuardedMesh::start(two_services("", 2)).await;
    let baseline = c_load(&mesh, 2).run().await;
    for p in mesh.replicas("b") {
        p.svc.set_status(503);
    }
    let seen_before: usize = mesh.replicas("b").iter().map(|p| p.svc.count()).sum();
    let sampler = PeakSampler::start(vec![mesh.a.pid()], Duration::from_millis(50));
    let cpu_before = procfs::stats(mesh.a.pid()).cpu;
    let storm = tokio::spawn(
        LoadGen::new(mesh.outbound())
            .host("b")
            .rate(200)
            .duration(Duration::from_secs(5))
            .run(),
    );
    let c_during = c_load(&mesh, 5).run().await;
    let storm = storm.await.unwrap();
    let peak = sampler.stop().await[0];
    let cpu = procfs::stats(mesh.a.pid()).cpu - cpu_before;
    let seen: usize = mesh
        .replicas("b")
        .iter()
        .map(|p| p.svc.count())
        .sum::<usize>()
        - seen_before;
    let offered = storm.total() as f64;
    println!(
        "retry storm: offered {offered}, b saw {seen} ({:.2}x); A CPU {cpu:?}, peak RSS {:.1} MiB; c {c_during}",
        seen as f64 / offered,
        peak.rss_mib()
    );
    // The budget: 20% of the requests in its 10 s window, plus a floor of
    // 10/s × 10 s. Without it, `retries = 2` would triple the load.
    assert!(
        seen as f64 <= 1.2 * offered + 100.0,
        "retries amplified the storm"
    );
    assert!(seen as f64 > offered, "some retries were made");
    assert!(
        peak.rss_bytes < RSS_BOUND,
        "A's RSS {:.1} MiB",
        peak.rss_mib()
    );
    assert_unaffected("retry storm on b", &baseline, &c_during);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_upstream_does_not_slow_the_others() {
    let _timing = exclusive().await;
    let mesh = GuardedMesh::start(two_services("", 1)).await;
    let baseline = c_load(&mesh, 2).run().await;
    mesh.peer("b").svc.set_delay(Duration::from_secs(2));
    let sampler = PeakSampler::start(
        vec![mesh.a.pid(), mesh.peer("b").sidecar.pid()],
        Duration::from_millis(50),
    );
    // 100 req/s × 2 s: ~200 requests parked on the slow service.
    let slow = tokio::spawn(
        LoadGen::new(mesh.outbound())
            .host("b")
            .rate(100)
            .duration(Duration::from_secs(4))
            .request_timeout(Duration::from_secs(10))
            .run(),
    );
    let c_during = c_load(&mesh, 5).run().await;
    let slow = slow.await.unwrap();
    let peaks = sampler.stop().await;
    println!(
        "slow b: {slow}; c {c_during}; peak RSS A {:.1} MiB, B {:.1} MiB",
        peaks[0].rss_mib(),
        peaks[1].rss_mib()
    );
    assert_eq!(slow.failures(), 0, "the slow service still answers: {slow}");
    assert!(
        slow.p99() <= Duration::from_secs(4),
        "slow calls are bounded by b itself"
    );
    for p in &peaks {
        assert!(p.rss_bytes < RSS_BOUND, "RSS {:.1} MiB", p.rss_mib());
    }
    assert_unaffected("slow b", &baseline, &c_during);
}

/// 128 MiB: comfortably past the 100 MiB.
const BIG: u64 = 128 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_128_mib_stream_through_two_hops_at_constant_memory() {
    let _timing = exclusive().await;
    let mut options = two_services("", 1);
    options.services = vec!["b".into()];
    let mesh = GuardedMesh::start(options).await;
    let out = mesh.outbound();
    let pids = vec![mesh.a.pid(), mesh.peer("b").sidecar.pid()];
    let expected = Fnv::of_pattern(BIG);

    // Upload: the far end (b's service) checksums what arrived.
    let sampler = PeakSampler::start(pids.clone(), Duration::from_millis(20));
    let started = Instant::now();
    let body = StreamBody::new(
        futures_util::stream::iter(pattern_chunks(BIG))
            .map(|c| Ok::<_, BoxError>(hyper::body::Frame::data(c))),
    )
    .boxed_unsync();
    let req = Request::post("http://b/sink").body(body).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(120), client::try_request(out, req))
        .await
        .expect("upload finishes")
        .expect("upload succeeds");
    let up = started.elapsed();
    let peaks = sampler.stop().await;
    assert_eq!(res.status(), 200);
    let json = client::json(&res);
    assert_eq!(json["bytes"], BIG, "bytes that reached b's service");
    assert_eq!(json["fnv"], expected.as_str(), "checksum at b's service");
    println!(
        "upload {} MiB in {up:?}: peak RSS A {:.1} MiB, B {:.1} MiB ({} samples)",
        BIG >> 20,
        peaks[0].rss_mib(),
        peaks[1].rss_mib(),
        peaks[0].samples
    );
    for p in &peaks {
        assert!(p.samples >= 5, "RSS was sampled during the transfer");
        assert!(
            p.rss_bytes < RSS_BOUND,
            "upload: RSS {:.1} MiB",
            p.rss_mib()
        );
    }

    // Download: b's service streams; the caller checksums frame by frame.
    let sampler = PeakSampler::start(pids, Duration::from_millis(20));
    let started = Instant::now();
    let (got, fnv) = tokio::time::timeout(Duration::from_secs(120), async {
        let stream = tokio::net::TcpStream::connect(out).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get(format!("http://b/source?bytes={BIG}"))
            .header("host", "b")
            .body(client::empty())?;
        let res = sender.send_request(req).await?;
        assert_eq!(res.status(), 200);
        let mut body = res.into_body();
        let (mut got, mut fnv) = (0u64, Fnv::default());
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                got += data.len() as u64;
                fnv.update(&data);
            }
        }
        Ok::<_, BoxError>((got, format!("{:016x}", fnv.0)))
    })
    .await
    .expect("download finishes")
    .expect("download succeeds");
    let down = started.elapsed();
    let peaks = sampler.stop().await;
    println!(
        "download {} MiB in {down:?}: peak RSS A {:.1} MiB, B {:.1} MiB",
        BIG >> 20,
        peaks[0].rss_mib(),
        peaks[1].rss_mib()
    );
    assert_eq!(got, BIG);
    assert_eq!(fnv, expected, "checksum at the caller");
    for p in &peaks {
        assert!(
            p.rss_bytes < RSS_BOUND,
            "download: RSS {:.1} MiB",
            p.rss_mib()
        );
    }
}
