//! Test helpers: raw TCP servers on free loopback ports that play a local
//! service byte for byte.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// Accepts connections on a free loopback port, counts them, and runs
/// `serve` on each with its 0-based index.
pub async fn server<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, n));
        }
    });
    (addr, accepted)
}

/// Read one request head from a raw connection; false at EOF.
pub async fn read_head(stream: &mut TcpStream) -> bool {
    read_request_head(stream).await.is_some()
}

/// Read one request head (up to and including its blank line) from a raw
/// connection, byte by byte so nothing after it is taken; `None` at EOF.
pub async fn read_request_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    while !seen.ends_with(b"\r\n\r\n") {
        match stream.read_u8().await {
            Ok(b) => seen.push(b),
            Err(_) => return None,
        }
    }
    Some(seen)
}

/// A loopback address nothing listens on (bound, then released).
pub fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}
