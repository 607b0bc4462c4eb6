//! An upstream that records exactly the bytes that reached it, and moves
//! large bodies with checksums.
//!
//! Smuggling tests must prove that nothing of a refused request reached the
//! service: not just that no request was *parsed*, but that no byte of it
//! arrived. [`RecordingUpstream`] taps every accepted connection below its
//! HTTP server, so [`RecordingUpstream::raw`] is the exact byte stream the
//! sidecar sent, and [`RecordingUpstream::requests`] the requests parsed
//! from it. Its routes:
//!
//! | route | response |
//! |---|---|
//! | `/healthz` | 200; not recorded |
//! | `/sink` | reads the body streaming; JSON `{"bytes": n, "fnv": "<hex>"}` |
//! | `/source?bytes=N` | N bytes of [`pattern_chunk`] data, streamed in 64 KiB chunks |
//! | `/drip?chunks=N&every_ms=M` | N chunks `drip-<i>\n`, one every M ms (the first at once) |
//! | anything else | reads the body; JSON `{name, method, path, body_len}` |
//!
//! Everything but `/healthz` waits [`RecordingUpstream::set_delay`] first.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::client::BoxError;

/// Raw bytes kept per upstream; a 100 MiB body must not be kept in memory.
const RAW_CAP: usize = 4 << 20;
/// Chunk size of `/source` and of [`pattern_chunk`].
pub const CHUNK: usize = 64 * 1024;

/// One request as the recording upstream parsed it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Request target as received.
    pub uri: String,
    /// Header fields (lowercase names), in order.
    pub headers: Vec<(String, String)>,
    /// Body bytes read.
    pub body_len: u64,
}

impl Seen {
    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Debug, Default)]
struct State {
    name: String,
    raw: Mutex<Vec<u8>>,
    seen: Mutex<Vec<Seen>>,
    delay_ms: AtomicU64,
    status: AtomicU64,
}

/// A recording HTTP/1.1 + h2c server on a free loopback port; dropping it
/// stops it.
#[derive(Debug)]
pub struct RecordingUpstream {
    state: Arc<State>,
    addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl RecordingUpstream {
    /// Starts an upstream whose JSON answers say `name`.
    pub async fn start(name: &str) -> RecordingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            name: name.to_string(),
            status: AtomicU64::new(200),
            ..State::default()
        });
        let mut tasks = JoinSet::new();
        let st = state.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                while conns.try_join_next().is_some() {}
                conns.spawn(serve(stream, st));
            }
        });
        RecordingUpstream { state, addr, tasks }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every byte received so far (health checks included), up to 4 MiB.
    pub fn raw(&self) -> Vec<u8> {
        self.state.raw.lock().unwrap().clone()
    }

    /// Whether `needle` occurs anywhere in [`RecordingUpstream::raw`].
    pub fn raw_contains(&self, needle: &[u8]) -> bool {
        let raw = self.state.raw.lock().unwrap();
        raw.windows(needle.len()).any(|w| w == needle)
    }

    /// Requests parsed so far, `/healthz` excluded.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Number of requests parsed so far, `/healthz` excluded.
    pub fn count(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// Delay every non-health response by this much.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Answer every non-health route with this status.
    pub fn set_status(&self, status: u16) {
        self.state
            .status
            .store(u64::from(status), Ordering::Relaxed);
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

type ResBody = UnsyncBoxBody<Bytes, BoxError>;

async fn serve(stream: TcpStream, state: Arc<State>) {
    let io = Tap {
        inner: stream,
        state: state.clone(),
    };
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<ResBody> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok\n".into());
    }
    let delay = Duration::from_millis(state.delay_ms.load(Ordering::Relaxed));
    let status = StatusCode::from_u16(state.status.load(Ordering::Relaxed) as u16)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut seen = Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len: 0,
    };
    let query = req.uri().query().unwrap_or("").to_string();
    let mut body = req.into_body();
    let mut fnv = Fnv::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    seen.body_len += d.len() as u64;
                    if path == "/sink" {
                        fnv.update(d);
                    }
                }
            }
            Err(_) => break,
        }
    }
    let body_len = seen.body_len;
    let method = seen.method.clone();
    state.seen.lock().unwrap().push(seen);
    tokio::time::sleep(delay).await;
    match path.as_str() {
        "/sink" => text(
            status,
            format!(
                r#"{{"name":"{}","bytes":{body_len},"fnv":"{:016x}"}}"#,
                state.name, fnv.0
            ),
        ),
        "/source" => {
            let total: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("bytes="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let chunks = futures_util::stream::iter(pattern_chunks(total))
                .map(|c| Ok::<_, BoxError>(Frame::data(c)));
            let mut res = Response::new(StreamBody::new(chunks).boxed_unsync());
            *res.status_mut() = status;
            res
        }
        "/drip" => {
            let param = |name: &str| -> u64 {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let every = Duration::from_millis(param("every_ms"));
            let chunks = futures_util::stream::iter(0..param("chunks")).then(move |i| async move {
                if i > 0 {
                    tokio::time::sleep(every).await;
                }
                Ok::<_, BoxError>(Frame::data(Bytes::from(drip_chunk(i))))
            });
            let mut res = Response::new(StreamBody::new(chunks).boxed_unsync());
            *res.status_mut() = status;
            res
        }
        _ => text(
            status,
            format!(
                r#"{{"name":"{}","method":"{method}","path":"{path}","body_len":{body_len}}}"#,
                state.name
            ),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<ResBody> {
    let mut res = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *res.status_mut() = status;
    res
}

/// The `index`th chunk of a `/drip` response.
pub fn drip_chunk(index: u64) -> String {
    format!("drip-{index}\n")
}

/// The `index`th 64 KiB chunk of the test data: a fixed pseudo-random
/// block with the chunk index in its first 8 bytes, so a lost, repeated or
/// reordered chunk changes the checksum.
pub fn pattern_chunk(index: u64) -> Bytes {
    static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let block = BLOCK.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    });
    let mut c = block.clone();
    c[..8].copy_from_slice(&index.to_le_bytes());
    Bytes::from(c)
}

/// The chunks of `total` bytes of test data.
pub fn pattern_chunks(total: u64) -> impl Iterator<Item = Bytes> + Send + 'static {
    let n = total.div_ceil(CHUNK as u64);
    (0..n).map(move |i| {
        let c = pattern_chunk(i);
        let left = total - i * CHUNK as u64;
        if left < CHUNK as u64 {
            c.slice(..left as usize)
        } else {
            c
        }
    })
}

/// FNV-1a, 64 bit, streaming: cheap and order-sensitive.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Hash more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The FNV of `total` bytes of test data.
    pub fn of_pattern(total: u64) -> String {
        let mut f = Fnv::default();
        for c in pattern_chunks(total) {
            f.update(&c);
        }
        format!("{:016x}", f.0)
    }
}

/// A TCP stream that appends what it reads to the upstream's raw record.
struct Tap {
    inner: TcpStream,
    state: Arc<State>,
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = &buf.filled()[before..];
            let mut raw = this.state.raw.lock().unwrap();
            let room = RAW_CAP.saturating_sub(raw.len());
            raw.extend_from_slice(&new[..new.len().min(room)]);
        }
        res
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
