//! Consul: registration with a TTL check, blocking-query discovery, agent
//! faults, and the etcd → Consul migration, driven through real sidecar
//! processes.
//!
//! No Consul can be had on the development machine, so the agent is the
//! **Consul HTTP API fixture** in `support/consul_fixture.rs`, which
//! implements the endpoints outrigger uses with Consul's documented
//! semantics. etcd, where it appears, is the real etcd.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::mesh::{
    consul_registry, etcd_key, etcd_registry, registry_list, routed_instances, SidecarSpec,
};
use crate::support::metrics::parse_metric;
use crate::support::sidecar::SidecarOptions;
use crate::support::{
    exclusive, shared, wait_until, ConsulFixture, Etcd, LoadGen, Sidecar, Upstream,
};

/// A Consul-registered sidecar spec (check TTL 2 s).
fn consul_spec(
    service: &str,
    instance: &str,
    svc: &Upstream,
    consul: &ConsulFixture,
) -> SidecarSpec {
    SidecarSpec::new(service, instance, svc, consul_registry(&consul.url(), "2s"))
}

/// Instances of `service` in `sidecar`'s table.
async fn instances(sidecar: &Sidecar, service: &str) -> Vec<String> {
    routed_instances(&sidecar.routes_json().await, service)
}

/// The sources (`0-etcd`, `1-consul`) of `service`'s endpoints in
/// `sidecar`'s table, one per endpoint, sorted.
async fn sources(sidecar: &Sidecar, service: &str) -> Vec<String> {
    let routes = sidecar.routes_json().await;
    let mut v: Vec<String> = routes["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["source"].as_str().map(String::from))
        .collect();
    v.sort();
    v
}

/// A fake passing instance of `service` at `addr` (a peer the test plays).
fn fake_instance(service: &str, id: &str, addr: std::net::SocketAddr) -> serde_json::Value {
    json!({
        "ID": id, "Name": service, "Address": addr.ip().to_string(), "Port": addr.port(),
        "Tags": ["outrigger"], "Meta": { "zone": "z1", "protocols": "http1,h2", "version": "test" },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_the_documented_body_token_and_deregisters_on_sigterm() {
    let _shared = shared().await;
    let consul = ConsulFixture::start().await;
    consul.require_token(Some("s3cr3t"));
    let svc = Upstream::start("b1").await;
    let mut spec = consul_spec("b", "b-1", &svc, &consul);
    spec.service_extra =
        "zone = \"z1\"\nweight = 70\ntags = [\"blue\"]\nmetadata = { team = \"core\" }".into();
    spec.registry
        .push_str("\ntags = [\"canary\"]\nderegister_critical_after = \"2m\"");
    // The token comes from the environment, as Consul's own CLI takes it.
    let options = SidecarOptions {
        env: vec![("CONSUL_HTTP_TOKEN".into(), "s3cr3t".into())],
        ..SidecarOptions::default()
    };
    let mut b = Sidecar::start_with("b-1", &spec.toml(), options);
    b.wait_ready().await;

    let regs = consul.registrations();
    let body = regs.first().expect("one registration");
    assert_eq!(body["ID"], "b-1");
    assert_eq!(body["Name"], "b");
    assert_eq!(body["Address"], "127.0.0.1");
    assert_eq!(body["Port"], spec.ports.inbound);
    assert_eq!(body["Tags"], json!(["blue", "canary", "outrigger"]));
    assert_eq!(body["Meta"]["zone"], "z1");
    assert_eq!(body["Meta"]["protocols"], "http1,h2");
    assert!(body["Meta"]["version"]
        .as_str()
        .is_some_and(|v| !v.is_empty()));
    assert_eq!(body["Meta"]["team"], "core");
    assert_eq!(body["Weights"]["Passing"], 70);
    assert_eq!(body["Check"]["CheckID"], "outrigger:b-1");
    assert_eq!(body["Check"]["TTL"], "2000ms");
    assert_eq!(body["Check"]["DeregisterCriticalServiceAfter"], "120000ms");
    // Started critical, passed by the sidecar with an output.
    let check = consul
        .service("b-1")
        .and_then(|s| s.check)
        .expect("check registered");
    assert_eq!(check.status, "passing");
    assert!(check.output.contains("passes"), "{}", check.output);
    // Every request carried the token; none was refused.
    let tokens = consul.tokens();
    assert!(!tokens.is_empty());
    assert!(
        tokens.iter().all(|t| t.as_deref() == Some("s3cr3t")),
        "{tokens:?}"
    );
    let m = b.metrics().await;
    assert_eq!(
        parse_metric(&m, "outrigger_consul_requests_total{registry=\"0-consul\",op=\"register\",outcome=\"status\"}"),
        None,
        "no register call refused: {m}"
    );
    assert!(consul.stale_reads() > 0, "discovery reads allow stale");
    // The check is kept passing across several TTLs.
    let passes = consul.requests("check_update");
    wait_until(
        "the TTL check refreshed",
        Duration::from_secs(5),
        || async { consul.requests("check_update") >= passes + 3 },
    )
    .await;
    assert_eq!(consul.check_status("b-1").as_deref(), Some("passing"));
    // /config never shows the token; /routes shows the registry's state.
    let (_, config) = b.admin_get("/config").await;
    assert!(!config.contains("s3cr3t"));
    let routes = b.routes_json().await;
    assert_eq!(routes["registries"][0]["name"], "0-consul");
    assert_eq!(routes["registries"][0]["registered"], true);
    assert_eq!(routes["registries"][0]["connected"], true);

    b.sigterm();
    wait_until(
        "deregistered on SIGTERM",
        Duration::from_secs(3),
        || async { consul.service("b-1").is_none() },
    )
    .await;
    assert!(b.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_visible_and_never_registers() {
    let _shared = shared().await;
    let consul = ConsulFixture::start().await;
    consul.require_token(Some("right"));
    let svc = Upstream::start("b1").await;
    let mut spec = consul_spec("b", "b-1", &svc, &consul);
    spec.registry.push_str("\ntoken = \"wrong\"");
    let mut b = spec.start();
    b.wait_live().await;
    let sidecar = &b;
    wait_until("refused registrations counted", Duration::from_secs(5), || async move {
        parse_metric(
            &sidecar.metrics().await,
            "outrigger_consul_requests_total{registry=\"0-consul\",op=\"register\",outcome=\"status\"}",
        )
        .is_some_and(|n| n >= 2.0)
    })
    .await;
    assert!(consul.service("b-1").is_none());
    let (status, body) = b.admin_get("/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("not registered in 0-consul"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flips_the_check_and_peers_follow_then_kill9_expires_and_reaps() {
    let _shared = shared().await;
    let consul = ConsulFixture::start().await;
    let (svc_a, svc_b) = (Upstream::start("a1").await, Upstream::start("b1").await);
    let mut a = consul_spec("a", "a-1", &svc_a, &consul).start();
    let mut b = consul_spec("b", "b-1", &svc_b, &consul).start();
    a.wait_ready().await;
    b.wait_ready().await;
    let a_ref = &a;
    wait_until("a routes to b-1", Duration::from_secs(5), || async move {
        instances(a_ref, "b").await == ["b-1"]
    })
    .await;
    let outbound = a.outbound.expect("outbound");
    let resp = crate::support::client::get_with_host(outbound, "b", "/").await;
    assert_eq!(resp.status(), 200);

    // The probe fails: the check turns critical with our output, and b
    // leaves a's table (health ?passing).
    svc_b.set_health(500);
    wait_until("check critical", Duration::from_secs(3), || async {
        consul.check_status("b-1").as_deref() == Some("critical")
    })
    .await;
    let check = consul.service("b-1").and_then(|s| s.check).unwrap();
    assert!(check.output.contains("fails"), "{}", check.output);
    wait_until("a drops b-1", Duration::from_secs(3), || async move {
        instances(a_ref, "b").await.is_empty()
    })
    .await;
    // It recovers: passing again, routed again.
    svc_b.set_health(200);
    wait_until("check passing", Duration::from_secs(3), || async {
        consul.check_status("b-1").as_deref() == Some("passing")
    })
    .await;
    wait_until(
        "a routes to b-1 again",
        Duration::from_secs(3),
        || async move { instances(a_ref, "b").await == ["b-1"] },
    )
    .await;

    // A crash: nobody passes the check, the TTL (2 s) expires, b leaves
    // a's table; after DeregisterCriticalServiceAfter (1 m, on the
    // fixture's virtual clock) the registration is reaped.
    b.kill9();
    let killed = Instant::now();
    wait_until(
        "TTL expiry turns the check critical",
        Duration::from_secs(4),
        || async { consul.check_status("b-1").as_deref() == Some("critical") },
    )
    .await;
    assert!(
        killed.elapsed() >= Duration::from_millis(1000),
        "not before the TTL"
    );
    wait_until(
        "a drops the crashed b-1",
        Duration::from_secs(3),
        || async move { instances(a_ref, "b").await.is_empty() },
    )
    .await;
    assert!(
        consul.service("b-1").is_some(),
        "still registered (critical) before the reap"
    );
    consul.advance(Duration::from_secs(61));
    wait_until("reaped", Duration::from_secs(2), || async {
        consul.service("b-1").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_propagation_delay() {
    let _exclusive = exclusive().await;
    let consul = ConsulFixture::start().await;
    let svc_a = Upstream::start("a1").await;
    let mut a = consul_spec("a", "a-1", &svc_a, &consul).start();
    a.wait_ready().await;
    let a_ref = &a;
    let mut delays = Vec::new();
    for i in 0..10 {
        let id = format!("p-{i}");
        let addr = crate::support::ports::free_addr();
        let t = Instant::now();
        consul.put_passing(fake_instance("p", &id, addr));
        let id2 = id.clone();
        wait_until("new instance routable", Duration::from_secs(3), || {
            let id = id2.clone();
            async move { instances(a_ref, "p").await.contains(&id) }
        })
        .await;
        delays.push(t.elapsed());
        let t = Instant::now();
        consul.remove(&id);
        wait_until("removed instance gone", Duration::from_secs(3), || {
            let id = id.clone();
            async move { !instances(a_ref, "p").await.contains(&id) }
        })
        .await;
        delays.push(t.elapsed());
    }
    delays.sort();
    let p50 = delays[delays.len() / 2];
    let max = delays[delays.len() - 1];
    println!(
        "consul discovery propagation (incl. /routes polling at 20 ms): p50 {p50:?}, max {max:?}"
    );
    // A blocking query returns on the change; the pacing adds at most 100 ms.
    assert!(p50 < Duration::from_millis(400), "p50 {p50:?}");
    assert!(max < Duration::from_secs(1), "max {max:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_down_keeps_the_table_and_a_restart_that_loses_registrations_is_repaired() {
    let _shared = shared().await;
    let mut consul = ConsulFixture::start().await;
    let (svc_a, svc_b) = (Upstream::start("a1").await, Upstream::start("b1").await);
    let mut a = consul_spec("a", "a-1", &svc_a, &consul).start();
    let mut b = consul_spec("b", "b-1", &svc_b, &consul).start();
    a.wait_ready().await;
    b.wait_ready().await;
    let a_ref = &a;
    wait_until("a routes to b-1", Duration::from_secs(5), || async move {
        instances(a_ref, "b").await == ["b-1"]
    })
    .await;
    let outbound = a.outbound.expect("outbound");

    // Agent down: the last table keeps serving, and the fault is visible.
    consul.stop();
    wait_until(
        "registry_connected 0",
        Duration::from_secs(5),
        || async move {
            parse_metric(
                &a_ref.metrics().await,
                "outrigger_registry_connected{registry=\"0-consul\"}",
            ) == Some(0.0)
        },
    )
    .await;
    for _ in 0..5 {
        let resp = crate::support::client::get_with_host(outbound, "b", "/").await;
        assert_eq!(resp.status(), 200, "routing on the last table");
    }
    let routes = a.routes_json().await;
    assert_eq!(routes["stale"], true);
    assert_eq!(routes["registries"][0]["connected"], false);
    assert!(parse_metric(
        &a.metrics().await,
        "outrigger_consul_requests_total{registry=\"0-consul\",op=\"catalog\",outcome=\"error\"}"
    )
    .is_some_and(|n| n >= 1.0));

    // It comes back having lost every registration and its index: both
    // sidecars register again, and a routes to b again from fresh reads.
    let registrations = consul.registrations().len();
    consul.restart_losing_registrations(2).await;
    wait_until("both re-registered", Duration::from_secs(8), || async {
        consul.check_status("a-1").as_deref() == Some("passing")
            && consul.check_status("b-1").as_deref() == Some("passing")
    })
    .await;
    assert!(consul.registrations().len() >= registrations + 2);
    wait_until(
        "a routes to b-1 from consul again",
        Duration::from_secs(8),
        || async move {
            instances(a_ref, "b").await == ["b-1"] && a_ref.routes_json().await["stale"] == false
        },
    )
    .await;
    let resp = crate::support::client::get_with_host(outbound, "b", "/").await;
    assert_eq!(resp.status(), 200);
    b.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_anomalies_backwards_zero_and_churn_stay_bounded() {
    let _exclusive = exclusive().await;
    let mut consul = ConsulFixture::start().await;
    let svc_a = Upstream::start("a1").await;
    let mut a = consul_spec("a", "a-1", &svc_a, &consul).start();
    a.wait_ready().await;
    consul.put_passing(fake_instance(
        "p",
        "p-1",
        crate::support::ports::free_addr(),
    ));
    let a_ref = &a;
    wait_until("a routes to p-1", Duration::from_secs(3), || async move {
        instances(a_ref, "p").await == ["p-1"]
    })
    .await;
    let resets = |reason: &'static str| async move {
        parse_metric(
            &a_ref.metrics().await,
            &format!("outrigger_consul_index_resets_total{{registry=\"0-consul\",query=\"health\",reason=\"{reason}\""),
        )
        .unwrap_or(0.0)
    };

    // Backwards: the blocked query times out (wait 2 s) with a lower index;
    // the watcher resets to 0, re-reads, and later changes still arrive.
    consul.set_index(3);
    wait_until(
        "backwards index reset counted",
        Duration::from_secs(6),
        || async { resets("backwards").await >= 1.0 },
    )
    .await;
    consul.put_passing(fake_instance(
        "p",
        "p-2",
        crate::support::ports::free_addr(),
    ));
    wait_until(
        "a sees p-2 after the reset",
        Duration::from_secs(3),
        || async move { instances(a_ref, "p").await == ["p-1", "p-2"] },
    )
    .await;

    let table_updates =
        |m: &str| parse_metric(m, "outrigger_routing_table_updates_total").unwrap_or(0.0);
    let reads = |c: &ConsulFixture| c.requests("health") + c.requests("catalog");

    // Index 0 (the Consul bug): the answer never blocks; the watcher raises
    // its index to 1 and the pacing bounds the request rate.
    let before_updates = table_updates(&a.metrics().await);
    consul.set_zero_index(true);
    wait_until(
        "below-one reset counted",
        Duration::from_secs(3),
        || async { resets("below_one").await >= 1.0 },
    )
    .await;
    let (r0, t0) = (reads(&consul), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await; // measuring a rate over a window
    let zero_rate = (reads(&consul) - r0) as f64 / t0.elapsed().as_secs_f64();
    consul.set_zero_index(false);
    // Three watchers (the catalog, and services a and p) at ≤ 10 requests/s
    // each, where an unpaced client would spin.
    assert!(zero_rate <= 33.0, "index-0 request rate {zero_rate:.1}/s");

    // Churn: the index moves every 2 ms with no data change.
    consul.churn(Duration::from_millis(2));
    let (r0, t0) = (reads(&consul), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await; // measuring a rate over a window
    let churn_rate = (reads(&consul) - r0) as f64 / t0.elapsed().as_secs_f64();
    consul.stop_churn();
    println!("consul request rate: index stuck at 0 {zero_rate:.1}/s, churn every 2 ms {churn_rate:.1}/s");
    assert!(churn_rate <= 33.0, "churn request rate {churn_rate:.1}/s");
    assert!(
        churn_rate >= 5.0,
        "the watchers kept querying during churn ({churn_rate:.1}/s)"
    );
    // Unchanged answers never swapped the table.
    assert_eq!(table_updates(&a.metrics().await), before_updates);
    assert_eq!(instances(&a, "p").await, ["p-1", "p-2"]);
    // And a real change still gets through after all that.
    consul.remove("p-1");
    wait_until("a drops p-1", Duration::from_secs(3), || async move {
        instances(a_ref, "p").await == ["p-2"]
    })
    .await;
}

/// One step of the migration: under load through `via`, replace the
/// sidecar `old` (SIGTERM: deregister, drain) by one on the same ports
/// with `registry`, and wait until `check` holds.
async fn replace_under_load<F, Fut>(
    via: std::net::SocketAddr,
    old: &mut Sidecar,
    spec: &mut SidecarSpec,
    registry: String,
    check: F,
) -> crate::support::LoadReport
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let load = tokio::spawn(
        LoadGen::new(via)
            .rate(100)
            .duration(Duration::from_secs(4))
            .request_timeout(Duration::from_secs(5))
            .run(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // load is flowing before the change
    old.sigterm();
    assert!(old.wait_exit(Duration::from_secs(10)).await.success());
    spec.registry = registry;
    *old = spec.start();
    old.wait_ready().await;
    wait_until(
        "the migration step took effect",
        Duration::from_secs(5),
        check,
    )
    .await;
    load.await.expect("load task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_to_consul_migration_one_service_at_a_time_with_zero_failed_requests() {
    let _exclusive = exclusive().await;
    let etcd = Etcd::start().await;
    let consul = ConsulFixture::start().await;
    let only_etcd = || etcd_registry(&etcd.endpoint(), "2s");
    let only_consul = || consul_registry(&consul.url(), "2s");
    let both = || registry_list(&[only_etcd(), only_consul()]);

    // The running mesh: two callers a-1, a-2 (A's clients reach either)
    // and b-1, b-2, all on etcd only.
    let svc_a = Upstream::start("a").await;
    let (svc_b1, svc_b2) = (Upstream::start("b1").await, Upstream::start("b2").await);
    let mut specs = [
        SidecarSpec::new("a", "a-1", &svc_a, only_etcd()),
        SidecarSpec::new("a", "a-2", &svc_a, only_etcd()),
        SidecarSpec::new("b", "b-1", &svc_b1, only_etcd()),
        SidecarSpec::new("b", "b-2", &svc_b2, only_etcd()),
    ];
    let mut sc: Vec<Sidecar> = specs.iter().map(SidecarSpec::start).collect();
    for s in sc.iter_mut() {
        s.wait_ready().await;
    }
    let out1 = sc[0].outbound.expect("a-1 outbound");
    let out2 = sc[1].outbound.expect("a-2 outbound");
    for out in [out1, out2] {
        wait_until(
            "a routes to b-1, b-2 from etcd",
            Duration::from_secs(5),
            || async move {
                let r = crate::support::client::get_with_host(out, "b", "/").await;
                r.status() == 200
            },
        )
        .await;
    }

    let mut reports = Vec::new();
    let mut step = |name: &str, r: crate::support::LoadReport| {
        println!(
            "{name}: {} requests, {} failed, p99 {:?}",
            r.total(),
            r.failures(),
            r.p99()
        );
        reports.push((name.to_string(), r));
    };
    let (a1, rest) = sc.split_at_mut(1);
    let (a2, bs) = rest.split_at_mut(1);
    let (b1, b2) = bs.split_at_mut(1);
    let (a1, a2, b1, b2) = (&mut a1[0], &mut a2[0], &mut b1[0], &mut b2[0]);
    let [sa1, sa2, sb1, sb2] = &mut specs;

    // 1. Callers learn Consul too (discover from both, etcd first).
    let r = replace_under_load(out1, a2, sa2, both(), || async { true }).await;
    step("a-2 → etcd+consul", r);
    let r = replace_under_load(out2, a1, sa1, both(), || async { true }).await;
    step("a-1 → etcd+consul", r);
    // 2. b registers in both, one replica at a time.
    let r = replace_under_load(out1, b1, sb1, both(), || async {
        consul.check_status("b-1").as_deref() == Some("passing")
    })
    .await;
    step("b-1 → etcd+consul", r);
    let r = replace_under_load(out1, b2, sb2, both(), || async {
        consul.check_status("b-2").as_deref() == Some("passing")
    })
    .await;
    step("b-2 → etcd+consul", r);
    // 3. b leaves etcd, one replica at a time; callers still see it in Consul.
    let a1_ref = &*a1;
    let etcd_ref = &etcd;
    let r = replace_under_load(out1, b1, sb1, only_consul(), || async move {
        etcd_ref.get(&etcd_key("b", "b-1")).await.is_none()
            && instances(a1_ref, "b").await == ["b-1", "b-2"]
    })
    .await;
    step("b-1 → consul", r);
    let r = replace_under_load(out1, b2, sb2, only_consul(), || async move {
        etcd_ref.get(&etcd_key("b", "b-2")).await.is_none()
            && instances(a1_ref, "b").await == ["b-1", "b-2"]
    })
    .await;
    step("b-2 → consul", r);
    // 4. Callers drop etcd (Consul first, then nothing else).
    let r = replace_under_load(out1, a2, sa2, only_consul(), || async { true }).await;
    step("a-2 → consul", r);
    let r = replace_under_load(out2, a1, sa1, only_consul(), || async { true }).await;
    step("a-1 → consul", r);

    // Zero failed requests through the whole migration.
    let total: usize = reports.iter().map(|(_, r)| r.total()).sum();
    let failed: Vec<_> = reports
        .iter()
        .filter(|(_, r)| r.failures() > 0)
        .map(|(n, r)| (n.clone(), r.failures(), r.outcomes()))
        .collect();
    println!("migration: {total} requests in {} steps", reports.len());
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(total >= 8 * 350, "load ran throughout ({total})");
    // Final routing comes from Consul, and etcd holds nothing of the mesh.
    for a in [&*a1, &*a2] {
        let a_ref = a;
        wait_until(
            "b routed from consul only",
            Duration::from_secs(5),
            || async move {
                sources(a_ref, "b").await == ["0-consul", "0-consul"]
                    && instances(a_ref, "b").await == ["b-1", "b-2"]
            },
        )
        .await;
    }
    let left = etcd.get_prefix("/outrigger/services/").await;
    assert!(left.is_empty(), "etcd still holds {left:?}");
    let resp = crate::support::client::get_with_host(out1, "b", "/").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_registry_down_does_not_stop_the_other() {
    let _shared = shared().await;
    let etcd = Etcd::start().await;
    let mut consul = ConsulFixture::start().await;
    let both = registry_list(&[
        consul_registry(&consul.url(), "2s"),
        etcd_registry(&etcd.endpoint(), "2s"),
    ]);
    let (svc_a, svc_b1, svc_b2) = (
        Upstream::start("a1").await,
        Upstream::start("b1").await,
        Upstream::start("b2").await,
    );
    let mut a = SidecarSpec::new("a", "a-1", &svc_a, both.clone()).start();
    let mut b1 = SidecarSpec::new("b", "b-1", &svc_b1, both).start();
    a.wait_ready().await;
    b1.wait_ready().await;
    let a_ref = &a;
    wait_until(
        "a routes to b-1 (consul listed first)",
        Duration::from_secs(5),
        || async move { sources(a_ref, "b").await == ["0-consul"] },
    )
    .await;

    // Consul goes away: its registry reports down, etcd keeps serving
    // updates (b-2 registers in etcd only), and b-1 stays routable.
    consul.stop();
    let mut b2 =
        SidecarSpec::new("b", "b-2", &svc_b2, etcd_registry(&etcd.endpoint(), "2s")).start();
    b2.wait_ready().await;
    wait_until(
        "etcd's b-2 arrives while consul is down",
        Duration::from_secs(5),
        || async move { instances(a_ref, "b").await == ["b-1", "b-2"] },
    )
    .await;
    wait_until(
        "a reports consul down",
        Duration::from_secs(5),
        || async move { a_ref.routes_json().await["registries"][0]["connected"] == false },
    )
    .await;
    let routes = a.routes_json().await;
    assert_eq!(routes["registries"][0]["name"], "0-consul");
    assert_eq!(routes["registries"][1]["name"], "1-etcd");
    assert_eq!(routes["registries"][1]["connected"], true);
    assert_eq!(
        routes["stale"], true,
        "a registry is down: the table says so"
    );
    let m = a.metrics().await;
    assert_eq!(
        parse_metric(&m, "outrigger_registry_connected{registry=\"0-consul\"}"),
        Some(0.0)
    );
    assert_eq!(
        parse_metric(&m, "outrigger_registry_connected{registry=\"1-etcd\"}"),
        Some(1.0)
    );
    let outbound = a.outbound.expect("outbound");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = crate::support::client::get_with_host(outbound, "b", "/").await;
        assert_eq!(r.status(), 200);
        seen.insert(
            crate::support::client::json(&r)["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    assert_eq!(
        seen,
        ["b1".to_string(), "b2".to_string()].into(),
        "both replicas serve"
    );
    // a turns unready once its next check update (every TTL/3) fails.
    let body = wait_until("a not ready", Duration::from_secs(3), || async move {
        let (status, body) = a_ref.admin_get("/ready").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("not registered in 0-consul"), "{body}");
    // Consul returns: a registers again, and the table is fresh again.
    consul.listen().await;
    a.wait_ready().await;
    let a_ref = &a;
    wait_until("table fresh again", Duration::from_secs(5), || async move {
        a_ref.routes_json().await["stale"] == false
    })
    .await;
    b1.wait_ready().await;
}
