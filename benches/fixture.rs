//! A routing table of a given size, built by the real applier: shared by the
//! criterion benchmarks (`benches/routing.rs`) and the scale test
//! (`integration/scale.rs`), so both measure the same thing.

#![allow(dead_code)] // each includer uses a different part

use std::sync::Arc;

use arc_swap::ArcSwap;
use outrigger::config::Config;
use outrigger::discovery::{Applier, DiscoveryStatus, Table};
use outrigger::metrics::Metrics;
use outrigger::outbound::pool::PoolSettings;
use outrigger::registry::{EndpointRecord, SourcedUpdate, Update};

/// Endpoints per service in the benchmark tables: a typical replica count
/// for a mesh service, so `n` endpoints are `n / 10` services.
pub const PER_SERVICE: usize = 10;

/// A sidecar config with the full feature set at its defaults (P2C-EWMA,
/// retries, outlier detection, metrics) and one static registry.
pub fn config() -> Arc<Config> {
    let text = r#"
        [service]
        name = "bench-caller"
        address = "127.0.0.1:8080"
        zone = "z1"
        [registry]
        kind = "static"
        file = "/nonexistent/endpoints.toml"
    "#;
    match Config::from_str_with_env(text, Vec::new()) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("fixture config must be valid: {e}"),
    }
}

/// Service `i`'s name.
pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

/// One endpoint record, as a registry would deliver it.
pub fn record(service: usize, replica: usize) -> EndpointRecord {
    EndpointRecord {
        service: service_name(service).into(),
        instance: format!("svc-{service}-{replica}").into(),
        address: format!(
            "10.{}.{}.{}:15006",
            service / 250,
            service % 250,
            replica + 1
        )
        .into(),
        zone: Some(if replica % 2 == 0 { "z1" } else { "z2" }.into()),
        weight: 100,
        protocols: vec!["h2".into()],
        tls: false,
        metadata: Default::default(),
        version: "0.1.0".into(),
    }
}

/// Every record of a table of `services` × `per_service`.
pub fn records(services: usize, per_service: usize) -> Vec<EndpointRecord> {
    (0..services)
        .flat_map(|s| (0..per_service).map(move |r| record(s, r)))
        .collect()
}

/// A full read of the registry (what etcd's initial read produces).
pub fn reset(services: usize, per_service: usize, revision: u64) -> SourcedUpdate {
    SourcedUpdate {
        source: 0,
        update: Update::Reset {
            endpoints: records(services, per_service),
            revision,
        },
    }
}

/// A live applier and the table it publishes.
pub struct Mesh {
    /// Owns the sources and the long-lived endpoint state.
    pub applier: Applier,
    /// The published snapshot, as the request path sees it.
    pub table: Arc<ArcSwap<Table>>,
    /// The config the applier resolved policies from.
    pub config: Arc<Config>,
    /// The metrics the applier registers per-service series in.
    pub metrics: Arc<Metrics>,
}

/// An empty applier for one registry.
pub fn empty_mesh() -> Mesh {
    let config = config();
    let metrics = Arc::new(Metrics::new());
    let table = Arc::new(ArcSwap::from_pointee(Table::default()));
    let applier = Applier::new(
        vec!["0-static".into()],
        config.clone(),
        Arc::new(PoolSettings::default()),
        metrics.clone(),
        table.clone(),
        Arc::new(DiscoveryStatus::default()),
    );
    Mesh {
        applier,
        table,
        config,
        metrics,
    }
}

/// An applier that has published a table of `services` × `per_service`.
pub fn mesh(services: usize, per_service: usize) -> Mesh {
    let mut m = empty_mesh();
    m.applier.apply_batch([reset(services, per_service, 1)]);
    m
}
