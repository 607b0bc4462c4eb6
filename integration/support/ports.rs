//! Free loopback ports.
//!
//! Tests run in parallel inside one binary, and many of them restart a
//! server on the port it had before. Asking the kernel for `127.0.0.1:0`
//! gives a port that is free right now; remembering every port handed out
//! guarantees two tests never get the same one, even after the first test
//! closed its listener.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};

/// Ports already handed out by [`free_port`] in this process.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Returns a loopback TCP port that is free now and that no other caller in
/// this test binary has been given before.
///
/// The port is found by binding `127.0.0.1:0` and closing the listener, so
/// another process could in theory grab it before the caller binds it; the
/// process-wide set rules out collisions between tests of the same binary.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out().lock().unwrap().insert(port) {
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
