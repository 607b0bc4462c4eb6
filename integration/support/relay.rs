//! A TCP relay between a client (a sidecar) and a server (etcd) that a test
//! can cut, blackhole and restore, to partition one sidecar from the
//! registry without stopping the registry for everyone else.
//!
//! The two faults differ the way real networks do: [`Relay::cut`] closes
//! every connection (a peer reset, a crashed middlebox), while
//! [`Relay::pause`] keeps every socket open and simply stops forwarding
//! (a blackhole: packets vanish, nobody says so), which only timeouts and
//! keep-alives can detect. [`Relay::restore`] heals both; data held during
//! a pause is delivered then, like TCP retransmissions after a heal.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A cuttable, pausable TCP relay on a free loopback port.
pub struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut_tx: watch::Sender<u64>,
    paused_tx: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    sent: Sent,
}

/// The first [`SENT_CAP`] bytes that clients sent through the relay, all
/// connections' bytes in arrival order (chunks of different connections
/// interleave, but a chunk is never split).
type Sent = Arc<Mutex<Vec<u8>>>;

/// Bytes [`Relay::sent_contains`] can look at; the rest is not kept, so a
/// long test behind a relay does not grow without bound.
const SENT_CAP: usize = 1 << 20;

impl Relay {
    /// Relay connections on a new loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let up = Arc::new(AtomicBool::new(true));
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let (paused_tx, paused_rx) = watch::channel(false);
        let flag = up.clone();
        let sent = Sent::default();
        let record = sent.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(Ordering::SeqCst) {
                    // Partitioned: accept-and-drop looks like a dead network
                    // to the client (as a refused connect would not).
                    drop(client);
                    continue;
                }
                let mut cut = cut_rx.clone();
                // Only cuts after this connection was accepted count.
                cut.borrow_and_update();
                let paused = paused_rx.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    // A connection opened during a blackhole hangs until
                    // the heal, as a SYN into a blackhole would.
                    let mut waiting = paused.clone();
                    tokio::select! {
                        r = waiting.wait_for(|p| !*p) => if r.is_err() { return },
                        _ = cut.changed() => return,
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = async {
                            tokio::join!(
                                pump(cr, sw, paused.clone(), Some(record)),
                                pump(sr, cw, paused, None),
                            )
                        } => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay {
            addr,
            up,
            cut_tx,
            paused_tx,
            task,
            sent,
        }
    }

    /// Whether the bytes clients sent through the relay so far (see
    /// [`Sent`]) contain `needle`.
    pub fn sent_contains(&self, needle: &[u8]) -> bool {
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.windows(needle.len()).any(|w| w == needle)
    }

    /// The address clients should use.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` for an etcd endpoint list.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Close every relayed connection and refuse to relay new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut_tx.send_modify(|n| *n += 1);
    }

    /// Blackhole: keep every connection open (and accept new ones) but
    /// forward nothing in either direction until [`Relay::restore`].
    pub fn pause(&self) {
        self.paused_tx.send_replace(true);
    }

    /// Relay again (after [`Relay::cut`] or [`Relay::pause`]).
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.paused_tx.send_replace(false);
    }
}

/// Copies `from` to `to`, holding each chunk (and the final FIN) while the
/// relay is paused, and appending it to `record` if given.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
    record: Option<Sent>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if let Some(record) = &record {
            let mut sent = record.lock().unwrap_or_else(|e| e.into_inner());
            let room = SENT_CAP.saturating_sub(sent.len()).min(n);
            sent.extend_from_slice(&buf[..room]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_tx.send_modify(|n| *n += 1);
    }
}
