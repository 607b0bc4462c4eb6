//! The etcd registry backend against a real etcd, through the library API.
//!
//! Registration: the key and its JSON, withdraw / deregister, duplicate
//! instance ids, a crashed sidecar's key expiring, a lost lease and an etcd
//! outage being repaired by the next `register`. Discovery: the ordered
//! `Reset` / `Upsert` / `Remove` stream with etcd's revisions, malformed
//! values, compaction, a large paginated read, and outages (stop/restart
//! and a frozen etcd) reported as `Connected(false)` then `Connected(true)`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Txn, TxnOp};
use outrigger::registry::etcd::{EtcdRegistry, EtcdSettings};
use outrigger::registry::{
    EndpointRecord, Registry, RegistryError, SourcedUpdate, Update, UpdateTx,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{wait_until, Etcd};

/// The mesh prefix used by every test (each test has its own etcd).
const PREFIX: &str = "/outrigger-test";

/// Lease TTL for most tests: short enough to wait out, long enough that a
/// loaded CI machine does not lose leases by accident.
const TTL: Duration = Duration::from_secs(3);

/// Longest wait for one discovery update.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "outrigger=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

fn registry(etcd: &Etcd, ttl: Duration) -> Arc<EtcdRegistry> {
    init_tracing();
    Arc::new(EtcdRegistry::new(EtcdSettings {
        endpoints: vec![etcd.endpoint()],
        prefix: PREFIX.into(),
        ttl,
        username: None,
        password: None,
    }))
}

fn record(service: &str, instance: &str, port: u16) -> EndpointRecord {
    EndpointRecord {
        service: service.into(),
        instance: instance.into(),
        address: format!("127.0.0.1:{port}").into(),
        zone: Some("z1".into()),
        weight: 100,
        protocols: vec!["http1".into(), "h2".into()],
        tls: false,
        metadata: BTreeMap::from([("team".to_string(), "core".to_string())]),
        version: "test".into(),
    }
}

fn key(service: &str, instance: &str) -> String {
    format!("{PREFIX}/services/{service}/{instance}")
}

/// The lease a key is bound to (0: none), or `None` if the key is absent.
async fn key_lease(etcd: &Etcd, key: &str) -> Option<i64> {
    let out = etcd.etcdctl(&["get", "-w", "json", "--", key]).await;
    let json: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    let kv = json["kvs"].as_array()?.first()?.clone();
    Some(kv["lease"].as_i64().unwrap_or(0))
}

/// The decoded record at `key`, if any.
async fn stored(etcd: &Etcd, key: &str) -> Option<EndpointRecord> {
    let value = etcd.get(key).await?;
    Some(EndpointRecord::decode(value.as_bytes()).expect("stored value decodes"))
}

/// A running `discover` with its receiving end.
struct Watcher {
    rx: mpsc::Receiver<SourcedUpdate>,
    task: JoinHandle<()>,
}

impl Watcher {
    fn start(registry: Arc<EtcdRegistry>, capacity: usize) -> Watcher {
        let (tx, rx) = mpsc::channel(capacity);
        let task = tokio::spawn(registry.discover(UpdateTx::new(7, tx)));
        Watcher { rx, task }
    }

    /// The next update.
    ///
    /// # Panics
    /// If none comes within [`UPDATE_TIMEOUT`] or discovery stopped.
    async fn next(&mut self) -> Update {
        match tokio::time::timeout(UPDATE_TIMEOUT, self.rx.recv()).await {
            Ok(Some(sourced)) => {
                assert_eq!(sourced.source, 7, "updates carry their source index");
                sourced.update
            }
            Ok(None) => panic!("discovery stopped sending"),
            Err(_) => panic!("no discovery update within {UPDATE_TIMEOUT:?}"),
        }
    }

    /// Asserts that no update arrives within `quiet`.
    async fn assert_quiet(&mut self, quiet: Duration) {
        if let Ok(Some(sourced)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            panic!("unexpected update: {:?}", sourced.update);
        }
    }

    /// Drops the receiver and checks that discovery returns.
    async fn shut_down(self) {
        let Watcher { rx, task } = self;
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("discover returns once the receiver is gone")
            .expect("discover does not panic");
    }
}

/// The routing state an applier would build from the updates.
#[derive(Debug, Default)]
struct Table {
    endpoints: BTreeMap<(String, String), EndpointRecord>,
    connected: Option<bool>,
    resets: usize,
}

impl Table {
    fn apply(&mut self, update: &Update) {
        match update {
            Update::Reset { endpoints, .. } => {
                self.resets += 1;
                self.endpoints = endpoints
                    .iter()
                    .map(|e| ((e.service.to_string(), e.instance.to_string()), e.clone()))
                    .collect();
            }
            Update::Upsert { endpoint, .. } => {
                self.endpoints.insert(
                    (endpoint.service.to_string(), endpoint.instance.to_string()),
                    endpoint.clone(),
                );
            }
            Update::Remove {
                service, instance, ..
            } => {
                self.endpoints.remove(&(service.clone(), instance.clone()));
            }
            Update::Connected(c) => self.connected = Some(*c),
            Update::Malformed { .. } => {}
        }
    }

    fn instances(&self) -> Vec<String> {
        self.endpoints
            .values()
            .map(|e| e.instance.to_string())
            .collect()
    }
}

async fn put_record(etcd: &Etcd, r: &EndpointRecord) {
    etcd.put(&key(&r.service, &r.instance), &r.encode()).await;
}

fn expect_reset(update: Update) -> (Vec<EndpointRecord>, u64) {
    match update {
        Update::Reset {
            endpoints,
            revision,
        } => (endpoints, revision),
        other => panic!("expected Reset, got {other:?}"),
    }
}

/// Reads the first `Reset` and the `Connected(true)` that follows it.
async fn initial_reset(watcher: &mut Watcher) -> (Vec<EndpointRecord>, u64) {
    let reset = expect_reset(watcher.next().await);
    assert_eq!(watcher.next().await, Update::Connected(true));
    reset
}

async fn raw_client(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("test client connects")
}

fn etcd_revision_u64(r: i64) -> u64 {
    u64::try_from(r).expect("positive revision")
}

// === registration ===

#[tokio::test]
async fn register_withdraw_and_deregister_manage_the_key() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let reg = registry(&etcd, TTL);
    let me = record("b", "b-1", 15006);
    let k = key("b", "b-1");
    assert_eq!(reg.key_for(&me), k);
    assert!(!reg.is_registered());
    assert_eq!(reg.lease_id(), None);

    reg.register(&me).await.expect("register");
    let json: serde_json::Value =
        serde_json::from_str(&etcd.get(&k).await.expect("key present")).expect("JSON value");
    assert_eq!(json["service"], "b");
    assert_eq!(json["instance"], "b-1");
    assert_eq!(json["address"], "127.0.0.1:15006");
    assert_eq!(json["zone"], "z1");
    assert_eq!(json["weight"], 100);
    assert_eq!(json["metadata"]["team"], "core");
    assert_eq!(stored(&etcd, &k).await, Some(me.clone()));
    assert!(reg.is_registered());
    let lease = reg.lease_id().expect("a live lease");
    assert_eq!(
        key_lease(&etcd, &k).await,
        Some(lease),
        "the key is bound to our lease"
    );

    // Unchanged: no write at all (the store revision does not move).
    let before = etcd.revision().await;
    for _ in 0..5 {
        reg.register(&me).await.expect("register again");
    }
    assert_eq!(
        etcd.revision().await,
        before,
        "an unchanged register writes nothing"
    );

    // The lease is kept alive well past its TTL. (A sleep on purpose: this
    // asserts that nothing happens for a while.)
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(
        key_lease(&etcd, &k).await,
        Some(lease),
        "still there after 2 TTLs"
    );

    // A changed value is re-put on the same lease.
    let mut heavier = me.clone();
    heavier.weight = 250;
    reg.register(&heavier).await.expect("register heavier");
    assert_eq!(stored(&etcd, &k).await.map(|r| r.weight), Some(250));
    assert_eq!(key_lease(&etcd, &k).await, Some(lease));

    reg.withdraw().await.expect("withdraw");
    assert_eq!(etcd.get(&k).await, None, "withdraw deletes the key");
    assert!(!reg.is_registered());
    assert_eq!(reg.lease_id(), Some(lease), "withdraw keeps the lease");
    reg.withdraw().await.expect("withdraw twice is fine");

    reg.register(&me).await.expect("register after withdraw");
    assert_eq!(stored(&etcd, &k).await, Some(me.clone()));
    assert_eq!(key_lease(&etcd, &k).await, Some(lease), "same lease reused");
    assert!(reg.is_registered());

    reg.deregister().await.expect("deregister");
    assert_eq!(
        etcd.get(&k).await,
        None,
        "deregister deletes the key at once"
    );
    let leases = etcd.etcdctl(&["lease", "list"]).await;
    assert!(
        !leases.contains(&format!("{lease:x}")),
        "the lease is revoked: {leases}"
    );
    assert!(!reg.is_registered());
    assert!(
        reg.register(&me).await.is_err(),
        "no registration after deregister"
    );
    assert_eq!(etcd.get(&k).await, None);
}

#[tokio::test]
async fn a_duplicate_instance_is_refused_after_the_ttl() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let first = registry(&etcd, TTL);
    let second = registry(&etcd, TTL);
    let me = record("b", "b-1", 15006);
    first.register(&me).await.expect("first registers");
    let lease = first.lease_id().expect("lease");

    let started = Instant::now();
    let err = second
        .register(&me)
        .await
        .expect_err("the second one must not hijack the key");
    let waited = started.elapsed();
    match &err {
        RegistryError::Duplicate {
            service,
            instance,
            key: k,
        } => {
            assert_eq!((service.as_str(), instance.as_str()), ("b", "b-1"));
            assert_eq!(k, &key("b", "b-1"));
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert!(err.to_string().contains("already registered"), "{err}");
    assert!(
        waited >= TTL,
        "waited only {waited:?}: the holder may have been our own dead incarnation"
    );
    assert!(waited < TTL + Duration::from_secs(4), "waited {waited:?}");
    assert_eq!(
        key_lease(&etcd, &key("b", "b-1")).await,
        Some(lease),
        "the first keeps its key"
    );
    assert!(!second.is_registered());
}

#[tokio::test]
async fn deregister_interrupts_a_register_in_progress() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let first = registry(&etcd, TTL);
    let second = registry(&etcd, TTL);
    let me = record("b", "b-1", 15006);
    first.register(&me).await.expect("first registers");
    let holder = first.lease_id();

    // The second one waits for the key (up to TTL + 1 s)...
    let waiting = tokio::spawn({
        let second = second.clone();
        let me = me.clone();
        async move { second.register(&me).await }
    });
    wait_until(
        "the second one to hold a lease",
        Duration::from_secs(5),
        || async { second.lease_id().is_some() },
    )
    .await;
    // ...until SIGTERM: deregister returns at once and so does register.
    let started = Instant::now();
    second.deregister().await.expect("deregister");
    let result = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("register returns at once")
        .expect("no panic");
    assert!(
        matches!(result, Err(RegistryError::Unavailable { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        key_lease(&etcd, &key("b", "b-1")).await,
        holder,
        "the first keeps its key"
    );
}

#[tokio::test]
async fn a_crashed_sidecars_key_expires_with_its_lease() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let reg = registry(&etcd, TTL);
    let me = record("b", "b-1", 15006);
    let k = key("b", "b-1");
    reg.register(&me).await.expect("register");
    // Like kill -9: the keep-alive stops and nothing is revoked.
    drop(reg);
    let dropped = Instant::now();
    assert!(etcd.get(&k).await.is_some(), "not deleted on drop");
    wait_until(
        "the key to expire",
        TTL + Duration::from_secs(4),
        || async { etcd.get(&k).await.is_none() },
    )
    .await;
    assert!(
        dropped.elapsed() >= TTL - Duration::from_secs(1),
        "gone after {:?}: expiry, not deletion",
        dropped.elapsed()
    );
}

#[tokio::test]
async fn a_restarted_sidecar_reclaims_its_key_from_its_dead_incarnation() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let me = record("b", "b-1", 15006);
    let k = key("b", "b-1");
    let old = registry(&etcd, TTL);
    old.register(&me).await.expect("register");
    let old_lease = old.lease_id().expect("lease");
    drop(old); // kill -9

    let new = registry(&etcd, TTL);
    let started = Instant::now();
    new.register(&me)
        .await
        .expect("the restarted sidecar waits for its old lease to expire");
    assert!(started.elapsed() < TTL + Duration::from_secs(2));
    let lease = new.lease_id().expect("lease");
    assert_ne!(lease, old_lease);
    assert_eq!(key_lease(&etcd, &k).await, Some(lease));
    assert!(new.is_registered());
}

#[tokio::test]
async fn a_lost_lease_is_replaced_by_the_next_register() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let reg = registry(&etcd, TTL);
    let me = record("b", "b-1", 15006);
    let k = key("b", "b-1");
    reg.register(&me).await.expect("register");
    let lost = reg.lease_id().expect("lease");

    etcd.etcdctl(&["lease", "revoke", &format!("{lost:x}")])
        .await;
    assert_eq!(etcd.get(&k).await, None, "revoking deletes the key");
    let revoked = Instant::now();

    // The driver calls register() every probe tick; do it faster here.
    let lease = wait_until(
        "registration to recover",
        TTL / 3 + Duration::from_secs(3),
        || async {
            reg.register(&me).await.ok()?;
            let lease = key_lease(&etcd, &k).await?;
            (lease != lost).then_some(lease)
        },
    )
    .await;
    assert!(
        revoked.elapsed() < TTL / 3 + Duration::from_secs(2),
        "recovered after {:?}",
        revoked.elapsed()
    );
    assert_eq!(
        reg.lease_id(),
        Some(lease),
        "a new lease, never the dead one"
    );
    assert!(reg.is_registered());
    assert_eq!(stored(&etcd, &k).await, Some(me));
}

#[tokio::test]
async fn a_key_deleted_by_hand_is_put_back() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let reg = registry(&etcd, TTL);
    let me = record("b", "b-1", 15006);
    let k = key("b", "b-1");
    reg.register(&me).await.expect("register");
    let lease = reg.lease_id().expect("lease");
    assert_eq!(etcd.del(&k).await, 1);

    // Verified at least every 10 s; ticks in between cost nothing.
    wait_until(
        "the key to be put back",
        Duration::from_secs(14),
        || async { reg.register(&me).await.is_ok() && key_lease(&etcd, &k).await == Some(lease) },
    )
    .await;
    assert_eq!(stored(&etcd, &k).await, Some(me));
}

#[tokio::test]
async fn withdraw_and_deregister_are_bounded_while_etcd_is_down() {
    let _shared = crate::support::shared().await;
    let mut etcd = Etcd::start().await;
    let reg = registry(&etcd, TTL);
    let me = record("b", "b-1", 15006);
    reg.register(&me).await.expect("register");
    etcd.kill();

    let started = Instant::now();
    let withdrawn = reg.withdraw().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "withdraw took {:?}",
        started.elapsed()
    );
    assert!(withdrawn.is_err(), "etcd is down: {withdrawn:?}");

    reg.register(&me)
        .await
        .expect_err("cannot register while etcd is down");
    let started = Instant::now();
    let _ = reg.deregister().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "deregister took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_registry_is_built_without_etcd_and_fails_fast() {
    let _shared = crate::support::shared().await;
    init_tracing();
    let port = crate::support::free_port();
    let reg = EtcdRegistry::new(EtcdSettings {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        prefix: PREFIX.into(),
        ttl: TTL,
        username: None,
        password: None,
    });
    let started = Instant::now();
    let err = reg
        .register(&record("b", "b-1", 1))
        .await
        .expect_err("nothing listens there");
    assert!(
        matches!(
            err,
            RegistryError::Unavailable {
                backend: "etcd",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn registration_and_discovery_authenticate() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    etcd.etcdctl(&["user", "add", "root", "--new-user-password=s3cret"])
        .await;
    etcd.etcdctl(&["auth", "enable"]).await;
    let with = |password: &str| {
        init_tracing();
        Arc::new(EtcdRegistry::new(EtcdSettings {
            endpoints: vec![etcd.endpoint()],
            prefix: PREFIX.into(),
            ttl: TTL,
            username: Some("root".into()),
            password: Some(password.into()),
        }))
    };

    let wrong = with("nope");
    let err = wrong
        .register(&record("b", "b-1", 1))
        .await
        .expect_err("bad password");
    assert!(err.to_string().contains("authentication failed"), "{err}");

    let reg = with("s3cret");
    let me = record("b", "b-1", 15006);
    reg.register(&me).await.expect("register with credentials");
    let out = etcd
        .etcdctl(&[
            "--user",
            "root:s3cret",
            "get",
            "--print-value-only",
            "--",
            &key("b", "b-1"),
        ])
        .await;
    assert_eq!(out.trim(), me.encode());
    let mut watcher = Watcher::start(reg.clone(), 16);
    let (endpoints, _) = initial_reset(&mut watcher).await;
    assert_eq!(endpoints, vec![me]);
    reg.deregister().await.expect("deregister");
    assert!(matches!(watcher.next().await, Update::Remove { .. }));
    watcher.shut_down().await;
}

#[tokio::test]
async fn registration_recovers_after_an_outage_longer_than_the_ttl() {
    let _shared = crate::support::shared().await;
    let mut etcd = Etcd::start().await;
    let reg = registry(&etcd, TTL);
    let me = record("b", "b-1", 15006);
    let k = key("b", "b-1");
    reg.register(&me).await.expect("register");
    let before = reg.lease_id().expect("lease");

    etcd.stop().await;
    // The driver keeps calling register() on every probe tick; it fails
    // while etcd is down, and gives up the lease once it could not renew it
    // for a whole TTL.
    wait_until("the lease to count as lost", TTL * 3, || async {
        let _ = reg.register(&me).await;
        !reg.is_registered() && reg.lease_id().is_none()
    })
    .await;
    etcd.start_again().await;
    let back = Instant::now();
    wait_until(
        "registration to recover",
        Duration::from_secs(5),
        || async { reg.register(&me).await.is_ok() && reg.is_registered() },
    )
    .await;
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "recovered after {:?}",
        back.elapsed()
    );
    let lease = reg.lease_id().expect("lease");
    assert_ne!(lease, before, "a lease we gave up on is never reused");
    assert_eq!(
        key_lease(&etcd, &k).await,
        Some(lease),
        "the key moved to the new lease"
    );
    assert_eq!(stored(&etcd, &k).await, Some(me));
    // etcd kept the old lease alive across its restart; we revoke it.
    wait_until(
        "the old lease to be revoked",
        Duration::from_secs(5),
        || async {
            !etcd
                .etcdctl(&["lease", "list"])
                .await
                .contains(&format!("{before:x}"))
        },
    )
    .await;
}

// === discovery ===

#[tokio::test]
async fn discovery_reads_then_streams_changes_in_order() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let a1 = record("a", "a-1", 1001);
    let b1 = record("b", "b-1", 2001);
    put_record(&etcd, &b1).await;
    put_record(&etcd, &a1).await;
    etcd.put("/elsewhere/services/x/x-1", "not ours").await;
    let mut watcher = Watcher::start(registry(&etcd, TTL), 64);

    let (endpoints, revision) = initial_reset(&mut watcher).await;
    assert_eq!(
        endpoints,
        vec![a1.clone(), b1.clone()],
        "key order, all records"
    );
    assert_eq!(revision, etcd_revision_u64(etcd.revision().await));

    let c1 = record("c", "c-1", 3001);
    put_record(&etcd, &c1).await;
    let rev = etcd_revision_u64(etcd.revision().await);
    assert_eq!(
        watcher.next().await,
        Update::Upsert {
            endpoint: c1.clone(),
            revision: rev
        }
    );

    let mut b1_heavy = b1.clone();
    b1_heavy.weight = 300;
    put_record(&etcd, &b1_heavy).await;
    let rev = etcd_revision_u64(etcd.revision().await);
    assert_eq!(
        watcher.next().await,
        Update::Upsert {
            endpoint: b1_heavy,
            revision: rev
        }
    );

    etcd.del(&key("a", "a-1")).await;
    let rev = etcd_revision_u64(etcd.revision().await);
    assert_eq!(
        watcher.next().await,
        Update::Remove {
            service: "a".into(),
            instance: "a-1".into(),
            revision: rev
        }
    );

    // Several keys removed in one revision: every one is reported.
    put_record(&etcd, &record("b", "b-2", 2002)).await;
    put_record(&etcd, &record("b", "b-3", 2003)).await;
    assert!(matches!(watcher.next().await, Update::Upsert { .. }));
    assert!(matches!(watcher.next().await, Update::Upsert { .. }));
    etcd.etcdctl(&["del", "--prefix", "--", &format!("{PREFIX}/services/b/")])
        .await;
    let rev = etcd_revision_u64(etcd.revision().await);
    let mut removed = Vec::new();
    for _ in 0..3 {
        match watcher.next().await {
            Update::Remove {
                instance, revision, ..
            } => {
                assert_eq!(revision, rev);
                removed.push(instance);
            }
            other => panic!("expected Remove, got {other:?}"),
        }
    }
    assert_eq!(removed, vec!["b-1", "b-2", "b-3"]);

    etcd.put("/elsewhere/services/x/x-2", "still not ours")
        .await;
    watcher.assert_quiet(Duration::from_millis(500)).await;
    watcher.shut_down().await;
}

#[tokio::test]
async fn discovery_reports_malformed_values_and_keeps_going() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    // Malformed before discovery starts: left out of the Reset, reported.
    etcd.put(&key("z", "z-1"), "{not json").await;
    let good = record("a", "a-1", 1001);
    put_record(&etcd, &good).await;
    let mut watcher = Watcher::start(registry(&etcd, TTL), 64);
    let (endpoints, _) = expect_reset(watcher.next().await);
    assert_eq!(endpoints, vec![good.clone()]);
    match watcher.next().await {
        Update::Malformed { key: k, reason } => {
            assert_eq!(k, key("z", "z-1"));
            assert!(reason.contains("JSON"), "{reason}");
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert_eq!(watcher.next().await, Update::Connected(true));

    let cases: Vec<(String, String, &str)> = vec![
        (key("c", "c-1"), "garbage".into(), "JSON"),
        (
            key("c", "c-2"),
            r#"{"service":"c","instance":"c-2","address":"nowhere"}"#.into(),
            "address",
        ),
        // The key names c-3 but the record claims c-4.
        (key("c", "c-3"), record("c", "c-4", 1).encode(), "key names"),
        (
            key("c", "c-5"),
            format!(
                r#"{{"service":"c","instance":"c-5","address":"h:1","version":"{}"}}"#,
                "x".repeat(70 * 1024)
            ),
            "limit",
        ),
        (format!("{PREFIX}/services/c"), good.encode(), "form"),
    ];
    for (k, value, why) in &cases {
        etcd.put(k, value).await;
        match watcher.next().await {
            Update::Malformed { key: got, reason } => {
                assert_eq!(&got, k);
                assert!(
                    reason.contains(why),
                    "{k}: {reason:?} should mention {why:?}"
                );
            }
            other => panic!("{k}: expected Malformed, got {other:?}"),
        }
    }

    // A malformed value over a good record removes that endpoint.
    etcd.put(&key("a", "a-1"), "{oops").await;
    let rev = etcd_revision_u64(etcd.revision().await);
    assert!(matches!(watcher.next().await, Update::Malformed { .. }));
    assert_eq!(
        watcher.next().await,
        Update::Remove {
            service: "a".into(),
            instance: "a-1".into(),
            revision: rev
        }
    );

    // Still running: a good value comes through.
    put_record(&etcd, &good).await;
    assert!(matches!(watcher.next().await, Update::Upsert { endpoint, .. } if endpoint == good));
    watcher.shut_down().await;
}

#[tokio::test]
async fn discovery_pages_a_large_table_at_one_revision() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let mut client = raw_client(&etcd).await;
    const KEYS: usize = 25_000;
    for chunk in 0..KEYS / 100 {
        let ops: Vec<TxnOp> = (0..100)
            .map(|i| {
                let n = chunk * 100 + i;
                let r = record("big", &format!("big-{n:05}"), 10_000 + (n % 50_000) as u16);
                TxnOp::put(key(&r.service, &r.instance), r.encode(), None)
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await.expect("txn");
    }
    let revision = etcd.revision().await;
    let mut watcher = Watcher::start(registry(&etcd, TTL), 16);
    let (endpoints, rev) = initial_reset(&mut watcher).await;
    assert_eq!(rev, etcd_revision_u64(revision));
    assert_eq!(endpoints.len(), KEYS);
    assert_eq!(endpoints[0].instance, "big-00000");
    assert_eq!(endpoints[KEYS - 1].instance, format!("big-{:05}", KEYS - 1));
    assert!(
        endpoints.windows(2).all(|w| w[0].instance < w[1].instance),
        "no duplicates, in order"
    );

    let late = record("big", "late", 9);
    put_record(&etcd, &late).await;
    assert_eq!(
        watcher.next().await,
        Update::Upsert {
            endpoint: late,
            revision: etcd_revision_u64(revision) + 1
        }
    );
    watcher.shut_down().await;
}

#[tokio::test]
async fn discovery_rereads_after_its_watch_is_compacted() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let mut client = raw_client(&etcd).await;
    put_record(&etcd, &record("a", "a-1", 1001)).await;
    // A tiny channel we stop reading: the watch falls behind etcd, as a
    // slow or stuck consumer would.
    let mut watcher = Watcher::start(registry(&etcd, TTL), 1);
    let (endpoints, _) = initial_reset(&mut watcher).await;
    assert_eq!(endpoints.len(), 1);

    // Far more changes than the watch pipeline buffers (etcd's 128-response
    // channel plus the HTTP/2 windows), then a compaction past all of them.
    let mut big = record("hot", "hot-0", 1);
    big.metadata.insert("pad".into(), "p".repeat(1024));
    for round in 0..400 {
        let ops: Vec<TxnOp> = (0..32)
            .map(|i| {
                let mut r = big.clone();
                r.instance = format!("hot-{i}").into();
                r.weight = 1 + (round % 100);
                TxnOp::put(key(&r.service, &r.instance), r.encode(), None)
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await.expect("txn");
    }
    etcd.del(&key("hot", "hot-31")).await;
    let compacted = etcd.compact_to_latest().await;

    // Now consume: the backlog, then a fresh Reset at or after the
    // compaction revision, without any disconnect.
    let mut table = Table::default();
    let reset = loop {
        let update = watcher.next().await;
        assert_ne!(
            update,
            Update::Connected(false),
            "compaction is not a disconnect"
        );
        table.apply(&update);
        if let Update::Reset {
            endpoints,
            revision,
        } = update
        {
            break (endpoints, revision);
        }
    };
    assert!(
        reset.1 >= etcd_revision_u64(compacted),
        "Reset at {} < compaction {compacted}",
        reset.1
    );
    let fresh: Vec<EndpointRecord> = etcd
        .get_prefix(&format!("{PREFIX}/services/"))
        .await
        .iter()
        .map(|(_, v)| EndpointRecord::decode(v.as_bytes()).expect("decodes"))
        .collect();
    assert_eq!(reset.0, fresh, "the Reset equals a fresh read");
    assert_eq!(fresh.len(), 32, "a-1 and hot-0..=30");

    // And the watch resumed after it.
    let c1 = record("c", "c-1", 3001);
    put_record(&etcd, &c1).await;
    assert!(matches!(watcher.next().await, Update::Upsert { endpoint, .. } if endpoint == c1));
    watcher.shut_down().await;
}

#[tokio::test]
async fn discovery_survives_an_etcd_restart_and_catches_up() {
    let _shared = crate::support::shared().await;
    let mut etcd = Etcd::start().await;
    let a1 = record("a", "a-1", 1001);
    let b1 = record("b", "b-1", 2001);
    put_record(&etcd, &a1).await;
    put_record(&etcd, &b1).await;
    let mut watcher = Watcher::start(registry(&etcd, TTL), 64);
    let mut table = Table::default();
    let (endpoints, _) = initial_reset(&mut watcher).await;
    assert_eq!(endpoints.len(), 2);
    table.apply(&Update::Reset {
        endpoints,
        revision: 0,
    });

    etcd.stop().await;
    assert_eq!(watcher.next().await, Update::Connected(false));
    // Exactly once, however long the outage lasts.
    watcher.assert_quiet(Duration::from_secs(2)).await;

    etcd.start_again().await;
    let c1 = record("c", "c-1", 3001);
    put_record(&etcd, &c1).await;
    etcd.del(&key("a", "a-1")).await;

    // Whether these came before or after the reconnect, the table ends up
    // right, and only after a fresh read was the source reported back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(table.connected == Some(true) && table.instances() == ["b-1", "c-1"]) {
        assert!(Instant::now() < deadline, "table {table:?}");
        let update = watcher.next().await;
        if update == Update::Connected(true) {
            assert!(table.resets >= 2, "Connected(true) comes after the re-read");
        }
        table.apply(&update);
    }
    watcher.shut_down().await;
}

#[tokio::test]
async fn discovery_starts_while_etcd_is_down() {
    let _shared = crate::support::shared().await;
    let mut etcd = Etcd::start().await;
    put_record(&etcd, &record("a", "a-1", 1001)).await;
    etcd.stop().await;
    let mut watcher = Watcher::start(registry(&etcd, TTL), 64);
    assert_eq!(watcher.next().await, Update::Connected(false));
    etcd.start_again().await;
    let (endpoints, _) = initial_reset(&mut watcher).await;
    assert_eq!(endpoints, vec![record("a", "a-1", 1001)]);
    watcher.shut_down().await;
}

#[tokio::test]
async fn discovery_detects_a_frozen_etcd() {
    let _shared = crate::support::shared().await;
    let mut etcd = Etcd::start().await;
    put_record(&etcd, &record("a", "a-1", 1001)).await;
    let mut watcher = Watcher::start(registry(&etcd, TTL), 64);
    initial_reset(&mut watcher).await;
    // A quiet watch stays up: no spurious reconnects (the watch outlives
    // the request timeout, progress requests are answered).
    watcher.assert_quiet(Duration::from_secs(12)).await;

    // SIGSTOP: the TCP connection stays open but nothing answers.
    let pid = etcd.pid().expect("running").to_string();
    signal(&pid, "-STOP");
    let frozen = Instant::now();
    assert_eq!(watcher.next().await, Update::Connected(false));
    assert!(
        frozen.elapsed() < Duration::from_secs(12),
        "noticed after {:?}",
        frozen.elapsed()
    );
    signal(&pid, "-CONT");
    let (endpoints, _) = initial_reset(&mut watcher).await;
    assert_eq!(endpoints.len(), 1);
    watcher.shut_down().await;
}

fn signal(pid: &str, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test]
async fn registration_and_discovery_see_each_other() {
    let _shared = crate::support::shared().await;
    let etcd = Etcd::start().await;
    let reg = registry(&etcd, TTL);
    let mut watcher = Watcher::start(reg.clone(), 64);
    let (endpoints, _) = initial_reset(&mut watcher).await;
    assert!(endpoints.is_empty());
    let me = record("b", "b-1", 15006);
    reg.register(&me).await.expect("register");
    assert!(matches!(watcher.next().await, Update::Upsert { endpoint, .. } if endpoint == me));
    reg.withdraw().await.expect("withdraw");
    assert!(matches!(watcher.next().await, Update::Remove { instance, .. } if instance == "b-1"));
    reg.register(&me).await.expect("register");
    assert!(matches!(watcher.next().await, Update::Upsert { .. }));
    reg.deregister().await.expect("deregister");
    assert!(matches!(watcher.next().await, Update::Remove { instance, .. } if instance == "b-1"));
    watcher.shut_down().await;
}
