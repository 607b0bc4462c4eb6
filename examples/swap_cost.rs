//! Wall time of full 10k-endpoint table swaps, each measured alone (the
//! update is built before the clock starts). Run under callgrind with
//! `--toggle-collect='outrigger::discovery::Applier::*'` for instruction
//! counts that a noisy machine cannot move.
//!
//! Two times per swap:
//!
//! * **visible**: from handing the update to the applier until a reader
//!   thread, loading the table the way a request does, sees the new
//!   generation. This is how stale the routes a request gets can be.
//! * **busy**: until the applier returns, ready for the next batch. This
//!   also counts freeing the previous table, which happens after the new
//!   one is published.
//!
//! usage: cargo run --release --example swap_cost [SWAPS]

#[path = "../benches/fixture.rs"]
mod fixture;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outrigger::registry::{SourcedUpdate, Update};

fn main() {
    let swaps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let services = 1_000;
    let mut m = fixture::mesh(services, fixture::PER_SERVICE);
    let a = fixture::records(services, fixture::PER_SERVICE);

    // The reader: spins on the snapshot like a stream of requests, and
    // notes when each generation first shows up.
    let stop = Arc::new(AtomicBool::new(false));
    let waiting_for = Arc::new(AtomicU64::new(u64::MAX));
    let seen: Arc<Mutex<Option<Instant>>> = Arc::default();
    let reader = {
        let (table, stop, waiting_for, seen) = (
            m.table.clone(),
            stop.clone(),
            waiting_for.clone(),
            seen.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let generation = table.load().generation;
                if generation >= waiting_for.load(Ordering::Acquire) {
                    let now = Instant::now();
                    *seen.lock().unwrap() = Some(now);
                    waiting_for.store(u64::MAX, Ordering::Release);
                }
                std::hint::spin_loop();
            }
        })
    };

    let mut visible = Vec::with_capacity(swaps);
    let mut busy = Vec::with_capacity(swaps);
    for i in 0..swaps {
        // Every record changes (its weight flips), so every service is
        // rebuilt and every old record is freed: the worst full swap.
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
        let next = m.table.load().generation + 1;
        *seen.lock().unwrap() = None;
        waiting_for.store(next, Ordering::Release);
        let start = Instant::now();
        m.applier.apply_batch([update]);
        busy.push(start.elapsed());
        // The reader sees the table at most a spin after it was stored.
        let seen_at = loop {
            if let Some(t) = *seen.lock().unwrap() {
                break t;
            }
            std::thread::yield_now();
        };
        visible.push(seen_at.saturating_duration_since(start));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();

    let endpoints = services * fixture::PER_SERVICE;
    println!("{swaps} full swaps of {endpoints} endpoints (min / median / max):");
    println!("  visible to requests: {}", summary(&mut visible));
    println!("  applier busy:        {}", summary(&mut busy));
}

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    format!(
        "{:?} / {:?} / {:?}",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    )
}
