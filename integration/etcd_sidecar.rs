//! etcd: health-gated registration on a lease and revision-exact discovery,
//! driven through real sidecar processes against a real etcd.

use std::time::{Duration, Instant};

use crate::support::client;
use crate::support::mesh::{etcd_key, etcd_spec, routed_instances};
use crate::support::relay::Relay;
use crate::support::{exclusive, wait_until, Etcd, LoadGen, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_within_a_second_with_the_documented_json() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let svc = Upstream::start("b1").await;
    let mut spec = etcd_spec("b", "b-1", &svc, &etcd.endpoint(), "5s");
    spec.service_extra = "zone = \"z1\"\nweight = 70\nmetadata = { team = \"core\" }".into();
    let started = Instant::now();
    let mut b = spec.start();
    let key = etcd_key("b", "b-1");
    let value = wait_until("key registered", Duration::from_secs(1), || async {
        etcd.get(&key).await
    })
    .await;
    let took = started.elapsed();
    let v: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert_eq!(v["service"], "b");
    assert_eq!(v["instance"], "b-1");
    assert_eq!(v["address"], spec.ports.inbound_addr().to_string());
    assert_eq!(v["zone"], "z1");
    assert_eq!(v["weight"], 70);
    assert_eq!(v["protocols"], serde_json::json!(["http1", "h2"]));
    assert_eq!(v["tls"], false);
    assert_eq!(v["metadata"]["team"], "core");
    assert!(v["version"].as_str().is_some_and(|s| !s.is_empty()));
    // etcdctl sees it under the prefix, bound to a lease.
    let listed = etcd.get_prefix("/outrigger/services/").await;
    assert!(listed.iter().any(|(k, _)| k == &key), "{listed:?}");
    let raw = etcd.etcdctl(&["get", &key, "-w", "json"]).await;
    assert!(raw.contains("\"lease\""), "key is bound to a lease: {raw}");
    b.wait_ready().await;
    println!("registration visible {took:?} after start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_failure_withdraws_and_recovery_restores() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let svc = Upstream::start("b1").await;
    let mut b = etcd_spec("b", "b-1", &svc, &etcd.endpoint(), "5s").start();
    b.wait_ready().await;
    let key = etcd_key("b", "b-1");
    svc.set_health(500);
    // interval 200 ms × unhealthy threshold 2 + 1 s.
    wait_until("key withdrawn", Duration::from_millis(1400), || async {
        etcd.get(&key).await.is_none()
    })
    .await;
    assert_eq!(
        b.admin_get("/ready").await.0,
        503,
        "not ready while unhealthy"
    );
    svc.set_health(200);
    wait_until("key restored", Duration::from_millis(1400), || async {
        etcd.get(&key).await.is_some()
    })
    .await;
    b.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_expires_with_the_lease_and_sigterm_deregisters_first() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let svc = Upstream::start("b1").await;
    let mut b1 = etcd_spec("b", "b-1", &svc, &etcd.endpoint(), "2s").start();
    let mut b2 = etcd_spec("b", "b-2", &svc, &etcd.endpoint(), "2s").start();
    b1.wait_ready().await;
    b2.wait_ready().await;

    let killed = Instant::now();
    b1.kill9();
    assert!(
        etcd.get(&etcd_key("b", "b-1")).await.is_some(),
        "kill -9 cannot revoke"
    );
    // TTL + 2 s: after the last keep-alive the lease may still hold a full
    // TTL, etcd's lessor looks for expired leases every 500 ms, and each revoke
    // needs a raft commit, which under the whole suite's load can lag by a
    // second (a fresh-clone CI once saw more than 3 s here).
    wait_until(
        "lease expiry removes b-1",
        Duration::from_secs(4),
        || async { etcd.get(&etcd_key("b", "b-1")).await.is_none() },
    )
    .await;
    println!("b-1 gone {:?} after kill -9 (ttl 2s)", killed.elapsed());

    b2.sigterm();
    wait_until("SIGTERM removes b-2", Duration::from_secs(3), || async {
        etcd.get(&etcd_key("b", "b-2")).await.is_none()
    })
    .await;
    assert!(
        b2.try_status().is_none(),
        "the key is gone while the sidecar is still draining"
    );
    assert!(b2.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_instance_is_refused() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let svc = Upstream::start("b1").await;
    let mut first = etcd_spec("b", "b-1", &svc, &etcd.endpoint(), "1s").start();
    first.wait_ready().await;
    let mut second = etcd_spec("b", "b-1", &svc, &etcd.endpoint(), "1s").start();
    let status = second.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    assert!(
        second.log().contains("already registered"),
        "{}",
        second.log_tail(20)
    );
    // The first one is untouched.
    assert_eq!(first.admin_get("/ready").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_is_replaced_within_two_seconds() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let svc = Upstream::start("b1").await;
    let mut b = etcd_spec("b", "b-1", &svc, &etcd.endpoint(), "5s").start();
    b.wait_ready().await;
    let key = etcd_key("b", "b-1");
    let raw = etcd.etcdctl(&["get", &key, "-w", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let lease = v["kvs"][0]["lease"].as_i64().expect("lease id");
    etcd.etcdctl(&["lease", "revoke", &format!("{lease:x}")])
        .await;
    assert!(etcd.get(&key).await.is_none());
    wait_until(
        "re-registered on a new lease",
        Duration::from_secs(2),
        || async { etcd.get(&key).await.is_some() },
    )
    .await;
    let raw = etcd.etcdctl(&["get", &key, "-w", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_ne!(
        v["kvs"][0]["lease"].as_i64(),
        Some(lease),
        "never reuses a dead lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_longer_than_ttl_recovers_registration() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client_addr()).await;
    let svc = Upstream::start("b1").await;
    let mut b = etcd_spec("b", "b-1", &svc, &relay.endpoint(), "2s").start();
    b.wait_ready().await;
    let key = etcd_key("b", "b-1");
    relay.cut();
    wait_until(
        "lease expires during the partition",
        Duration::from_secs(5),
        || async { etcd.get(&key).await.is_none() },
    )
    .await;
    // Keep the partition until a registration attempt has failed: one that
    // is still waiting when the partition heals may then simply succeed,
    // and on a slow machine the lease can expire before any attempt has
    // timed out.
    wait_until(
        "a registration attempt fails during the partition",
        Duration::from_secs(10),
        || async {
            b.metric_value("outrigger_registry_errors_total")
                .await
                .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await;
    relay.restore();
    let healed = Instant::now();
    wait_until(
        "registration back after the heal",
        Duration::from_secs(4),
        || async { etcd.get(&key).await.is_some() },
    )
    .await;
    println!(
        "re-registered {:?} after the partition healed",
        healed.elapsed()
    );
    // The partition is visible in b's metrics: registrations failed while
    // the lease was lost (waited for above), and the watch was lost at
    // least once.
    assert!(
        b.metric_value("outrigger_registry_disconnects_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_propagate_quickly() {
    let _timing = exclusive().await;
    let etcd = Etcd::start().await;
    let svc_a = Upstream::start("a1").await;
    let mut a = etcd_spec("a", "a-1", &svc_a, &etcd.endpoint(), "5s").start();
    a.wait_ready().await;
    let mut delays = Vec::new();
    for i in 0..100 {
        let value = format!(
            r#"{{"service":"p","instance":"p-{i}","address":"127.0.0.1:{}","weight":100}}"#,
            20000 + i
        );
        etcd.put(&etcd_key("p", &format!("p-{i}")), &value).await;
        let t = Instant::now();
        let want = format!("p-{i}");
        loop {
            let routes = a.routes_json().await;
            if routed_instances(&routes, "p").contains(&want) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "p-{i} never became routable"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(t.elapsed());
    }
    delays.sort();
    println!(
        "propagation over 100 registrations: p50 {:?}, p99 {:?}, max {:?}",
        delays[49], delays[98], delays[99]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_under_load_loses_nothing_and_resumes() {
    let _timing = exclusive().await;
    let mut etcd = Etcd::start().await;
    let (svc_a, svc_b1, svc_b2) = (
        Upstream::start("a1").await,
        Upstream::start("b1").await,
        Upstream::start("b2").await,
    );
    let mut a = etcd_spec("a", "a-1", &svc_a, &etcd.endpoint(), "5s").start();
    let mut b1 = etcd_spec("b", "b-1", &svc_b1, &etcd.endpoint(), "5s").start();
    a.wait_ready().await;
    b1.wait_ready().await;
    wait_until("a routes to b-1", Duration::from_secs(5), || async {
        routed_instances(&a.routes_json().await, "b") == ["b-1"]
    })
    .await;

    let load = tokio::spawn(
        LoadGen::new(a.outbound.unwrap())
            .host("b")
            .rate(100)
            .duration(Duration::from_secs(13))
            .run(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.stop().await;
    wait_until("a notices the outage", Duration::from_secs(10), || async {
        a.routes_json().await["stale"] == true
    })
    .await;
    // A change made during the outage: a new replica starts (and can only
    // register once etcd is back).
    let mut b2 = etcd_spec("b", "b-2", &svc_b2, &etcd.endpoint(), "5s").start();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        routed_instances(&a.routes_json().await, "b"),
        ["b-1"],
        "table unchanged during the outage"
    );
    etcd.start_again().await;
    let back = Instant::now();
    wait_until(
        "b-2 registered and routable after the outage",
        Duration::from_secs(10),
        || async { routed_instances(&a.routes_json().await, "b") == ["b-1", "b-2"] },
    )
    .await;
    println!("b-2 routable {:?} after etcd returned", back.elapsed());
    b2.wait_ready().await;
    assert!(
        etcd.get(&etcd_key("a", "a-1")).await.is_some(),
        "a's registration survived"
    );
    let report = load.await.unwrap();
    println!("{report}");
    assert_eq!(
        report.failures(),
        0,
        "requests failed during the etcd outage: {:?}",
        report.outcomes()
    );
    assert!(report.total() > 1000);
    assert_eq!(a.routes_json().await["stale"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_the_watch_is_down_resyncs_to_a_fresh_read() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client_addr()).await;
    let svc_a = Upstream::start("a1").await;
    let mut a = etcd_spec("a", "a-1", &svc_a, &relay.endpoint(), "30s").start();
    a.wait_ready().await;
    let rec = |i: u32| {
        format!(
            r#"{{"service":"p","instance":"p-{i}","address":"127.0.0.1:{}"}}"#,
            21000 + i
        )
    };
    for i in 0..5 {
        etcd.put(&etcd_key("p", &format!("p-{i}")), &rec(i)).await;
    }
    wait_until("five peers", Duration::from_secs(5), || async {
        routed_instances(&a.routes_json().await, "p").len() == 5
    })
    .await;
    relay.cut();
    // While a's watch is down: remove two, add two, and compact the history
    // the watch would need.
    etcd.del(&etcd_key("p", "p-0")).await;
    etcd.del(&etcd_key("p", "p-1")).await;
    etcd.put(&etcd_key("p", "p-7"), &rec(7)).await;
    etcd.put(&etcd_key("p", "p-8"), &rec(8)).await;
    etcd.compact_to_latest().await;
    relay.restore();
    let fresh: Vec<String> = {
        let mut v: Vec<String> = etcd
            .get_prefix("/outrigger/services/p/")
            .await
            .into_iter()
            .map(|(k, _)| k.rsplit('/').next().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(fresh, ["p-2", "p-3", "p-4", "p-7", "p-8"]);
    wait_until(
        "a resynced to the fresh read",
        Duration::from_secs(10),
        || async { routed_instances(&a.routes_json().await, "p") == fresh },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_an_outage_routes_from_the_state_file() {
    let _shared = crate::support::shared().await;
    let mut etcd = Etcd::start().await;
    let (svc_a, svc_b) = (Upstream::start("a1").await, Upstream::start("b1").await);
    let state = tempfile::tempdir().unwrap();
    let a_spec = etcd_spec("a", "a-1", &svc_a, &etcd.endpoint(), "5s");
    let toml = a_spec.toml().replace(
        "[runtime]\n",
        &format!("[runtime]\nstate_dir = \"{}\"\n", state.path().display()),
    );
    let mut a = crate::support::Sidecar::start("a-1", &toml);
    let mut b = etcd_spec("b", "b-1", &svc_b, &etcd.endpoint(), "5s").start();
    a.wait_ready().await;
    b.wait_ready().await;
    wait_until(
        "state file written with b-1",
        Duration::from_secs(5),
        || async {
            std::fs::read_to_string(state.path().join("routes.toml"))
                .is_ok_and(|s| s.contains("b-1"))
        },
    )
    .await;
    etcd.stop().await;
    a.restart();
    a.wait_live().await;
    let res = client::get_with_host(a.outbound.unwrap(), "b", "/").await;
    assert_eq!(
        res.status(),
        200,
        "routes from the state file while etcd is down"
    );
    assert_eq!(client::json(&res)["name"], "b1");
    assert_eq!(a.routes_json().await["stale"], true);
    assert_eq!(
        a.metric_value("outrigger_routing_table_stale").await,
        Some(1.0)
    );
    etcd.start_again().await;
    wait_until(
        "fresh once etcd is back",
        Duration::from_secs(10),
        || async { a.routes_json().await["stale"] == false },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_skipped_logged_and_counted() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let (svc_a, svc_b) = (Upstream::start("a1").await, Upstream::start("b1").await);
    let mut a = etcd_spec("a", "a-1", &svc_a, &etcd.endpoint(), "5s").start();
    let mut b = etcd_spec("b", "b-1", &svc_b, &etcd.endpoint(), "5s").start();
    a.wait_ready().await;
    b.wait_ready().await;
    etcd.put(&etcd_key("b", "junk"), "{not json").await;
    etcd.put(
        &etcd_key("b", "bad-addr"),
        r#"{"service":"b","instance":"bad-addr","address":"nowhere"}"#,
    )
    .await;
    let big = format!(
        r#"{{"service":"b","instance":"big","address":"h:1","metadata":{{"x":"{}"}}}}"#,
        "y".repeat(70_000)
    );
    etcd.put(&etcd_key("b", "big"), &big).await;
    wait_until(
        "three malformed values counted",
        Duration::from_secs(5),
        || async {
            a.metric_value("outrigger_registry_malformed_values_total")
                .await
                == Some(3.0)
        },
    )
    .await;
    assert_eq!(routed_instances(&a.routes_json().await, "b"), ["b-1"]);
    let res = client::get_with_host(a.outbound.unwrap(), "b", "/").await;
    assert_eq!(res.status(), 200);
    assert!(a.try_status().is_none(), "still running");
}
