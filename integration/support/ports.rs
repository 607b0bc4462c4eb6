//! Free loopback ports.
//!
//! Tests run in parallel inside one binary, and many of them restart a
//! server on the port it had before, so a port handed out here must stay
//! ours for the life of the process.
//!
//! Ports come from *below* the kernel's ephemeral range
//! (`net.ipv4.ip_local_port_range`, 32768–60999 by default). Inside that
//! range the kernel hands ports to every `bind(":0")` and every outgoing
//! `connect()`: a port we probed and released could be given a moment later
//! to a fixture that binds `127.0.0.1:0`, or to a sidecar's client socket,
//! before the sidecar we meant it for binds it. CI hit exactly that (a
//! recording upstream took the port just handed to a sidecar's inbound
//! listener). Below the range only this allocator hands ports out, and the
//! process-wide set keeps two tests from getting the same one.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};

/// Lowest port the allocator uses; below it sit well-known services.
const FLOOR: u16 = 10_000;

/// Ports already handed out by [`free_port`] in this process, and where the
/// next search starts.
struct Allocator {
    handed_out: HashSet<u16>,
    next: u16,
    range: (u16, u16),
}

fn allocator() -> &'static Mutex<Allocator> {
    static ALLOCATOR: OnceLock<Mutex<Allocator>> = OnceLock::new();
    ALLOCATOR.get_or_init(|| {
        let range = (FLOOR, ephemeral_low().saturating_sub(1));
        // Start each test process at a different place so that two test
        // binaries running at once (cargo runs them one after the other, but
        // a developer may not) rarely probe the same ports.
        let span = u32::from(range.1.saturating_sub(range.0)).max(1);
        let start = range.0 + (std::process::id() % span) as u16;
        Mutex::new(Allocator {
            handed_out: HashSet::new(),
            next: start,
            range,
        })
    })
}

/// The first port of the kernel's ephemeral range, or 32768 if it cannot be
/// read (the Linux default).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Returns a loopback TCP port that is free now, lies outside the kernel's
/// ephemeral range, and that no other caller in this test binary has been
/// given before.
///
/// Another process could in theory bind the port between this check and the
/// caller's bind; nothing in the test suite binds fixed ports in this range,
/// and the kernel never picks one for `bind(":0")` or `connect()`.
pub fn free_port() -> u16 {
    let mut alloc = allocator().lock().unwrap();
    let (lo, hi) = alloc.range;
    if hi <= lo {
        drop(alloc);
        return kernel_port();
    }
    for _ in lo..=hi {
        let port = alloc.next;
        alloc.next = if port >= hi { lo } else { port + 1 };
        if alloc.handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            alloc.handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port left between {lo} and {hi}");
}

/// Fallback for a machine whose ephemeral range starts too low to leave room
/// below it: ask the kernel, and still never hand the same port out twice.
fn kernel_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if allocator().lock().unwrap().handed_out.insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:<port>` as a [`SocketAddr`].
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A fresh [`free_port`] as a loopback [`SocketAddr`].
pub fn free_addr() -> SocketAddr {
    loopback(free_port())
}

/// Whether `port` lies in the kernel's ephemeral range, where
/// [`free_port`] must never pick (exposed for the harness self-test).
pub fn in_ephemeral_range(port: u16) -> bool {
    port >= ephemeral_low()
}
