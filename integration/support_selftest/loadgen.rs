//! The load generator against a test upstream, and the report arithmetic.

use std::time::{Duration, Instant};

use crate::support::loadgen::Sample;
use crate::support::{LoadGen, LoadMode, LoadReport, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_sends_100_rps_for_1s_without_failures() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    let start = Instant::now();
    let report = LoadGen::new(up.addr())
        .rate(100)
        .duration(Duration::from_secs(1))
        .run()
        .await;
    let elapsed = start.elapsed();
    assert_eq!((report.total(), report.failures()), (100, 0), "{report}");
    assert_eq!(report.per_upstream().get("b1"), Some(&100));
    assert_eq!(up.requests(), 100);
    assert!(
        elapsed >= Duration::from_millis(990) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    // Open loop on a fixed schedule: about half the requests go out in the
    // first half second (allowing for scheduling jitter on a busy machine).
    let first_half = report
        .window(Duration::ZERO, Duration::from_millis(500))
        .total();
    assert!(
        (40..=60).contains(&first_half),
        "{first_half} requests in the first 500 ms"
    );
    assert!(
        report.p50() <= report.p99() && report.p99() < Duration::from_secs(2),
        "{report}"
    );
    assert!(up.recorded().iter().all(|r| r.header("host") == Some("b")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_proxy_and_h2c_modes() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    let load = LoadGen::new(up.addr())
        .rate(100)
        .duration(Duration::from_millis(200))
        .host("svc")
        .path("/p?x=1");
    let report = load.clone().mode(LoadMode::Proxy).run().await;
    assert_eq!((report.total(), report.failures()), (20, 0), "{report}");
    assert!(up.recorded().iter().all(|r| r.uri == "http://svc/p?x=1"));

    up.clear();
    let report = load.mode(LoadMode::H2c).run().await;
    assert_eq!((report.total(), report.failures()), (20, 0), "{report}");
    assert!(up
        .recorded()
        .iter()
        .all(|r| r.version == "HTTP/2.0" && r.uri == "http://svc/p?x=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_records_errors_and_statuses() {
    let _shared = crate::support::shared().await;
    let mut up = Upstream::start("b1").await;
    up.set_status(503);
    let report = LoadGen::new(up.addr())
        .rate(50)
        .duration(Duration::from_millis(200))
        .run()
        .await;
    assert_eq!(
        (report.failures(), report.outcomes().get("503")),
        (10, Some(&10)),
        "{report}"
    );

    up.stop().await;
    let report = LoadGen::new(up.addr())
        .rate(50)
        .duration(Duration::from_millis(200))
        .run()
        .await;
    assert_eq!((report.total(), report.failures()), (10, 10), "{report}");
    assert!(report
        .samples
        .iter()
        .all(|s| s.status.is_none() && s.error.is_some()));
}

#[test]
fn report_percentiles_windows_and_counts() {
    let sample = |ms: u64, latency: u64, status: Option<u16>, upstream: Option<&str>| Sample {
        sent_at: Duration::from_millis(ms),
        latency: Duration::from_millis(latency),
        status,
        error: status.is_none().then(|| "connection refused".to_string()),
        upstream: upstream.map(String::from),
    };
    let mut samples: Vec<Sample> = (0..98)
        .map(|i| sample(i * 10, 10, Some(200), Some("b1")))
        .collect();
    samples.push(sample(3000, 500, Some(503), Some("b2")));
    samples.push(sample(3100, 900, None, None));
    let report = LoadReport { samples };
    assert_eq!(
        (report.total(), report.failures(), report.successes()),
        (100, 2, 98)
    );
    assert_eq!(report.p50(), Duration::from_millis(10));
    assert_eq!(report.p99(), Duration::from_millis(500));
    assert_eq!(report.percentile(1.0), Duration::from_millis(900));
    assert_eq!(
        report.per_upstream().into_iter().collect::<Vec<_>>(),
        [("b1".into(), 98), ("b2".into(), 1)]
    );
    let late = report.window(Duration::from_secs(3), Duration::from_secs(2));
    assert_eq!(
        (late.total(), late.failures(), late.p99()),
        (2, 2, Duration::from_millis(900))
    );
    assert_eq!(late.outcomes().get("connection refused"), Some(&1));
    assert_eq!(LoadReport::default().p99(), Duration::ZERO);
}
