//! Routing costs at 10, 1k and 10k endpoints (`cargo bench --bench routing`).
//!
//! * `route_lookup`: what every request pays to find its routes: the service
//!   name from the `Host` header, one `ArcSwap` load, one hash lookup.
//! * `balancer_pick`: a P2C-EWMA pick among one service's 10 endpoints, with
//!   the rest of the table around it.
//! * `pick_one_large_service`: a pick in a *single* service of n endpoints;
//!   the pick scans its service's endpoints, so this one grows with n.
//! * `table_swap`: the applier's work per registry change plus the
//!   `ArcSwap::store`: a full rebuild (a registry's initial read or a
//!   resync) and the usual cases: one changed endpoint, and one replica
//!   leaving or returning.
//!
//! The first two stay flat from 10 to 10k endpoints: per-request routing
//! does not grow with the table.

use std::hint::black_box;
use std::sync::atomic::AtomicUsize;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use http::Request;
use outrigger::balance;
use outrigger::outbound::route;
use outrigger::registry::{SourcedUpdate, Update};
use tokio::time::Instant;

#[path = "fixture.rs"]
mod fixture;

use fixture::PER_SERVICE;

/// Table sizes in endpoints.
const SIZES: [usize; 3] = [10, 1_000, 10_000];

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in SIZES {
        let services = n / PER_SERVICE;
        let m = fixture::mesh(services, PER_SERVICE);
        // A request for the last service, by Host header with port and mesh
        // domain: the longest normalisation path.
        let host = format!("{}.mesh:80", fixture::service_name(services - 1));
        let req = Request::get("/x")
            .header("host", host)
            .body(())
            .unwrap_or_default();
        let mesh_domain = m.config.outbound.mesh_domain.clone();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let table = m.table.load();
                let found = route::lookup(&table, black_box(&req), &mesh_domain);
                black_box(found.map(|r| r.endpoints.len()).ok())
            })
        });
    }
    g.finish();
}

fn balancer_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer_pick");
    for n in SIZES {
        let services = n / PER_SERVICE;
        let m = fixture::mesh(services, PER_SERVICE);
        let table = m.table.load_full();
        let Some(routes) = table.get(&fixture::service_name(services / 2)).cloned() else {
            panic!("fixture table lacks its own service");
        };
        let rr = AtomicUsize::new(0);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                balance::pick(
                    black_box(&routes.endpoints),
                    &routes.policy,
                    &rr,
                    &[],
                    Instant::now(),
                )
                .map(|p| p.index)
                .ok()
            })
        });
    }
    g.finish();
}

fn pick_one_large_service(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick_one_large_service");
    for n in SIZES {
        let m = fixture::mesh(1, n);
        let table = m.table.load_full();
        let Some(routes) = table.get(&fixture::service_name(0)).cloned() else {
            panic!("fixture table lacks its own service");
        };
        let rr = AtomicUsize::new(0);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                balance::pick(
                    black_box(&routes.endpoints),
                    &routes.policy,
                    &rr,
                    &[],
                    Instant::now(),
                )
                .map(|p| p.index)
                .ok()
            })
        });
    }
    g.finish();
}

fn table_swap(c: &mut Criterion) {
    let mut g = c.benchmark_group("table_swap");
    g.sample_size(20);
    for n in SIZES {
        let services = n / PER_SERVICE;
        // Full rebuild: alternate between two complete views that differ in
        // every record's revision-independent content (the weight), so each
        // Reset really rebuilds every service.
        let mut m = fixture::mesh(services, PER_SERVICE);
        let a = fixture::records(services, PER_SERVICE);
        let b_view: Vec<_> = a
            .iter()
            .cloned()
            .map(|mut r| {
                r.weight = 50;
                r
            })
            .collect();
        let mut rev = 1u64;
        let mut flip = false;
        g.bench_with_input(BenchmarkId::new("full", n), &n, |b, _| {
            // The update is built outside the timing: it is the registry
            // client's work, not the applier's.
            b.iter_batched(
                || {
                    rev += 1;
                    flip = !flip;
                    let endpoints = if flip { b_view.clone() } else { a.clone() };
                    SourcedUpdate {
                        source: 0,
                        update: Update::Reset {
                            endpoints,
                            revision: rev,
                        },
                    }
                },
                |update| m.applier.apply_batch([update]),
                BatchSize::PerIteration,
            )
        });

        // One endpoint changes (the common case: a replica comes or goes).
        let mut m = fixture::mesh(services, PER_SERVICE);
        let mut rev = 1u64;
        g.bench_with_input(BenchmarkId::new("one_change", n), &n, |b, _| {
            b.iter(|| {
                rev += 1;
                let mut endpoint = fixture::record(services / 2, 0);
                endpoint.weight = 1 + (rev % 100) as u32;
                m.applier.apply_batch([SourcedUpdate {
                    source: 0,
                    update: Update::Upsert {
                        endpoint,
                        revision: rev,
                    },
                }]);
            })
        });

        // One replica leaves and comes back, alternately: a departure also
        // decides whether the endpoint's learned state is still used by any
        // other service, which must not cost a pass that allocates per
        // endpoint of the table.
        let mut m = fixture::mesh(services, PER_SERVICE);
        let mut rev = 1u64;
        g.bench_with_input(BenchmarkId::new("one_leaves_or_returns", n), &n, |b, _| {
            b.iter(|| {
                rev += 1;
                let update = if rev % 2 == 0 {
                    Update::Remove {
                        service: fixture::service_name(services / 2),
                        instance: fixture::record(services / 2, 0).instance.to_string(),
                        revision: rev,
                    }
                } else {
                    Update::Upsert {
                        endpoint: fixture::record(services / 2, 0),
                        revision: rev,
                    }
                };
                m.applier.apply_batch([SourcedUpdate { source: 0, update }]);
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    route_lookup,
    balancer_pick,
    pick_one_large_service,
    table_swap
);
criterion_main!(benches);
