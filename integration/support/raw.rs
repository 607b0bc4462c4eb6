//! Raw-socket clients for what well-behaved clients cannot send: malformed
//! HTTP/1 requests and hand-written HTTP/2 frames.
//!
//! [`exchange`] writes bytes exactly as given and reports the status line
//! and whether the server closed the connection. [`H2Conn`] speaks HTTP/2
//! frame by frame (h2c, prior knowledge), for floods the `h2` crate refuses
//! to produce (endless CONTINUATION, empty DATA frames, streams beyond the
//! peer's limit).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// What the server did with one raw request.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The status code of the first response line, if one arrived.
    pub status: Option<u16>,
    /// Everything the server sent.
    pub response: Vec<u8>,
    /// The server closed (FIN or reset) within the wait.
    pub closed: bool,
}

/// Sends `request`, then reads until the server closes or `wait` passes.
pub async fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> Exchange {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let _ = s.write_all(request).await;
    let mut response = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
        }
    };
    let status = std::str::from_utf8(&response)
        .ok()
        .or_else(|| {
            let end = response.iter().position(|b| *b == b'\n')?;
            std::str::from_utf8(&response[..end]).ok()
        })
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok());
    Exchange {
        status,
        response,
        closed,
    }
}

/// The HTTP/2 connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types used here.
pub mod kind {
    /// DATA
    pub const DATA: u8 = 0x0;
    /// HEADERS
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS
    pub const SETTINGS: u8 = 0x4;
    /// PING
    pub const PING: u8 = 0x6;
    /// GOAWAY
    pub const GOAWAY: u8 = 0x7;
    /// CONTINUATION
    pub const CONTINUATION: u8 = 0x9;
}
/// END_STREAM flag.
pub const END_STREAM: u8 = 0x1;
/// END_HEADERS flag.
pub const END_HEADERS: u8 = 0x4;
/// ACK flag (SETTINGS, PING).
pub const ACK: u8 = 0x1;
/// REFUSED_STREAM error code.
pub const REFUSED_STREAM: u32 = 0x7;
/// ENHANCE_YOUR_CALM error code.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame as bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// One header field, literal without indexing, new name, no Huffman.
pub fn hpack_field(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    hpack_int(&mut out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(&mut out, 0, 7, value.len());
    out.extend_from_slice(value);
    out
}

/// A request's pseudo-header block (`http`, `authority`, `path`).
pub fn request_block(method: &str, authority: &str, path: &str) -> Vec<u8> {
    let mut b = hpack_field(":method", method.as_bytes());
    b.extend(hpack_field(":scheme", b"http"));
    b.extend(hpack_field(":authority", authority.as_bytes()));
    b.extend(hpack_field(":path", path.as_bytes()));
    b
}

/// A frame received from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Frame type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream id.
    pub stream: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            kind::GOAWAY => 4,
            kind::RST_STREAM => 0,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A hand-driven h2c client connection.
#[derive(Debug)]
pub struct H2Conn {
    /// Read side (frames from the server).
    pub rx: OwnedReadHalf,
    /// Write side.
    pub tx: OwnedWriteHalf,
}

impl H2Conn {
    /// Connects and sends the preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> H2Conn {
        let s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).ok();
        let (rx, mut tx) = s.into_split();
        tx.write_all(PREFACE).await.expect("write preface");
        tx.write_all(&frame(kind::SETTINGS, 0, 0, &[]))
            .await
            .expect("write settings");
        H2Conn { rx, tx }
    }

    /// Writes raw bytes; `false` once the server has closed.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.tx.write_all(bytes).await.is_ok()
    }
}

/// Reads one frame; `None` on EOF, error or after `wait`.
pub async fn read_frame(rx: &mut OwnedReadHalf, wait: Duration) -> Option<Frame> {
    let read = async {
        let mut head = [0u8; 9];
        rx.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        rx.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// Every frame the server sends until it closes or goes quiet for `idle`.
pub async fn read_frames(rx: &mut OwnedReadHalf, idle: Duration) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(f) = read_frame(rx, idle).await {
        frames.push(f);
    }
    frames
}

/// The GOAWAY error code among `frames`, if the server sent one.
pub fn goaway(frames: &[Frame]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.kind == kind::GOAWAY)
        .and_then(Frame::error_code)
}
