//! Wall time of full 10k-endpoint table swaps, each measured alone (the
//! update is built before the clock starts). Run under callgrind with
//! `--toggle-collect='outrigger::discovery::Applier::*'` for instruction
//! counts that a noisy machine cannot move.
//!
//! usage: cargo run --release --example swap_cost [SWAPS]

#[path = "../benches/fixture.rs"]
mod fixture;

use std::time::Instant;

use outrigger::registry::{SourcedUpdate, Update};

fn main() {
    let swaps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let services = 1_000;
    let mut m = fixture::mesh(services, fixture::PER_SERVICE);
    let a = fixture::records(services, fixture::PER_SERVICE);
    let mut times = Vec::with_capacity(swaps);
    for i in 0..swaps {
        let endpoints: Vec<_> = a
            .iter()
            .cloned()
            .map(|mut r| {
                r.weight = 1 + (i % 2) as u32;
                r
            })
            .collect();
        let update = SourcedUpdate {
            source: 0,
            update: Update::Reset {
                endpoints,
                revision: 2 + i as u64,
            },
        };
        let start = Instant::now();
        m.applier.apply_batch([update]);
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "{swaps} full swaps of {} endpoints: min {:?}, median {:?}, max {:?}",
        services * fixture::PER_SERVICE,
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
