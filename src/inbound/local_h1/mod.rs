//! A lean HTTP/1.1 client for bodiless, idempotent requests to the local
//! service: most of a mesh's traffic (GET, HEAD, DELETE, ...).
//!
//! Why not hyper's client, which [`super::local_pool`] keeps for requests
//! with a body: hyper runs each connection as its own task and hands every
//! request to it over a channel, with the response coming back over a
//! oneshot. With nothing to stream upward, all of that is overhead. Here the
//! request's own task writes the head and reads the response, and a
//! response whose body is already in the read buffer (a small
//! `Content-Length` body, the common case) is handed on as a whole, with the
//! connection back in the pool before the response leaves. callgrind put
//! hyper's client at about 13k instructions per request on hop B of the
//! bench chain (bench/README.md).
//!
//! The outbound side uses the same connections for such requests to a peer
//! sidecar over plaintext ([`crate::outbound::h1_pool`]), where hyper's
//! client task was 11k of hop A's 28k instructions per request at low
//! concurrency.
//!
//! Only bodiless requests with idempotent methods come here, so a request
//! that meets a connection the service has just closed can be sent again on
//! a new one (RFC 9110 §9.2.2): no body has been consumed and repeating it
//! is safe.

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::idle::{IdleList, Pooled, State};
use super::local_pool::dial;
use crate::http::{Body, ProxyError};
use crate::outbound::h1_pool::OpenConn;

mod body;
mod chunked;

use body::{Framing, ResponseBody};

/// Bytes reserved in a connection's buffer before each read.
const READ_CHUNK: usize = 8 * 1024;
/// Largest response head accepted (hyper's client reads up to ~400 KiB;
/// a service sending more than this is broken, not big).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response header fields accepted (hyper's default).
const MAX_HEADERS: usize = 100;
/// Header positions kept on the stack while a head is parsed.
const INLINE_SPANS: usize = 16;

/// One keep-alive connection and what has been read from it.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// The connection's place under a cap on open connections (the peer
    /// pool's, [`crate::outbound::h1_pool`]), released when it closes.
    _slot: Option<OpenConn>,
}

impl Conn {
    /// A fresh connection on `io`, holding `slot` for as long as it lives.
    pub fn new(io: TcpStream, slot: Option<OpenConn>) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
            _slot: slot,
        }
    }
}

impl Pooled for Conn {
    fn state(&mut self) -> State {
        // A service that closes an idle connection (or, misbehaving, writes
        // to it) makes it readable. A healthy idle connection is not, and
        // that case costs no system call: the readiness comes from the
        // reactor.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => State::Ready,
            Poll::Ready(Err(_)) => State::Closed,
            Poll::Ready(Ok(())) => match self.io.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => State::Ready,
                // End of stream, stray bytes or an error.
                _ => State::Closed,
            },
        }
    }
}

/// Whether a request may take the lean path: no body (nothing to stream,
/// nothing to lose on a resend) and a method that is safe to resend.
pub fn fits(parts: &Parts, body_is_empty: bool) -> bool {
    body_is_empty
        && matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::DELETE
                | Method::PUT
                | Method::TRACE
        )
}

/// The lean pool for the local service at one address.
pub struct LocalH1 {
    address: String,
    idle: Arc<IdleList<Conn>>,
}

impl LocalH1 {
    /// A pool for the service at `address` (`host:port`).
    pub fn new(address: String) -> Self {
        LocalH1 {
            address,
            idle: IdleList::new(),
        }
    }

    /// Send the bodiless request `parts` (origin-form URI; see [`fits`])
    /// and return the response.
    pub async fn send(&self, parts: &Parts) -> Result<Response<Body>, ProxyError> {
        let head = encode_head(parts);
        let is_head = parts.method == Method::HEAD;
        loop {
            let (mut conn, reused) = match self.idle.checkout() {
                Some(conn) => (conn, true),
                None => (Conn::new(dial(&self.address).await?, None), false),
            };
            match exchange(&mut conn, &head, is_head).await {
                Ok(res) => return Ok(respond(conn, res, &self.idle)),
                // The service closed a pooled connection before it read
                // the request: send it again on a fresh one.
                Err(Failure::Stale) if reused => continue,
                Err(e) => return Err(self.error(e.to_string())),
            }
        }
    }

    fn error(&self, message: String) -> ProxyError {
        ProxyError::LocalUpstream {
            address: self.address.clone(),
            message,
        }
    }
}

/// Write the head, then read until a final response head is parsed.
pub async fn exchange(conn: &mut Conn, head: &[u8], is_head: bool) -> Result<Head, Failure> {
    if let Err(e) = conn.io.write_all(head).await {
        return Err(match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Failure::Stale,
            _ => Failure::Io(e),
        });
    }
    let mut received = false;
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, is_head).map_err(Failure::Bad)? {
                // Interim responses (100 Continue, 103 Early Hints) are
                // not relayed; the final one follows.
                Some(head) if head.status.is_informational() => continue,
                Some(head) => return Ok(head),
                None if conn.buf.len() >= MAX_HEAD_BYTES => {
                    return Err(Failure::Bad(format!(
                        "response head larger than {MAX_HEAD_BYTES} bytes"
                    )))
                }
                None => {}
            }
        }
        conn.buf.reserve(READ_CHUNK);
        match conn.io.read_buf(&mut conn.buf).await {
            Ok(0) if !received => return Err(Failure::Stale),
            Ok(0) => {
                return Err(Failure::Bad(
                    "connection closed in the middle of the response head".into(),
                ))
            }
            Ok(_) => received = true,
            Err(e) if !received && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(Failure::Stale)
            }
            Err(e) => return Err(Failure::Io(e)),
        }
    }
}

/// The response, its body taken whole from the buffer when it is all
/// there, else streamed off the connection.
pub fn respond(mut conn: Conn, head: Head, idle: &Arc<IdleList<Conn>>) -> Response<Body> {
    let body = match head.framing {
        Framing::Length(n) if n <= conn.buf.len() as u64 => {
            // `n` fits in the buffer, so it fits in usize.
            let data = conn.buf.split_to(n as usize).freeze();
            reuse(conn, head.keep_alive, idle);
            Body::full(data)
        }
        framing => Body::boxed(ResponseBody::new(
            conn,
            framing,
            head.keep_alive,
            idle.clone(),
        )),
    };
    let mut res = Response::new(body);
    *res.status_mut() = head.status;
    *res.headers_mut() = head.headers;
    res
}

/// Pool a connection whose exchange is complete, unless the service
/// asked to close it or sent bytes past the response.
fn reuse(conn: Conn, keep_alive: bool, idle: &Arc<IdleList<Conn>>) {
    if keep_alive && conn.buf.is_empty() {
        idle.checkin(conn);
    }
}

/// Why an exchange failed.
pub enum Failure {
    /// Nothing came back on a connection that may have been closed while
    /// idle: the request can be sent again.
    Stale,
    /// Reading or writing failed.
    Io(io::Error),
    /// The other side broke the protocol.
    Bad(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Stale => f.write_str("connection closed before the response head"),
            Failure::Io(e) => e.fmt(f),
            Failure::Bad(why) => f.write_str(why),
        }
    }
}

/// A parsed response head.
pub struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// The request head as HTTP/1.1 text. The parts are already valid: method,
/// path and header values can hold no CR, LF or space where they would
/// break the framing (the `http` crate checks them on construction).
pub fn encode_head(parts: &Parts) -> Vec<u8> {
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Parse a response head from the front of `buf`, consuming it. `None`:
/// incomplete, nothing consumed.
fn parse_head(buf: &mut BytesMut, request_was_head: bool) -> Result<Option<Head>, String> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| format!("invalid status code {code}"))?;
    let http11 = res.version == Some(1);
    // Where each name and value sits in the head: the head is then split
    // off the buffer, and values become shared slices of it, not copies.
    // A few spans live on the stack; a long head spills to the heap. (One
    // array for MAX_HEADERS spans would be zeroed for every response: 3.2k
    // instructions of memset under callgrind.)
    let base = buf.as_ptr() as usize;
    let count = res.headers.len();
    let mut inline = [(0usize, 0usize, 0usize, 0usize); INLINE_SPANS];
    let mut spilled = Vec::new();
    let spans = if count <= INLINE_SPANS {
        &mut inline[..count]
    } else {
        spilled.resize(count, (0, 0, 0, 0));
        &mut spilled[..]
    };
    for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
        let name = h.name.as_bytes();
        *span = (
            name.as_ptr() as usize - base,
            name.len(),
            h.value.as_ptr() as usize - base,
            h.value.len(),
        );
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &mut (at, n, value_at, value_n) in spans {
        let name = HeaderName::from_bytes(&head[at..at + n])
            .map_err(|_| "invalid header name".to_string())?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_n))
            .map_err(|_| format!("invalid value in header {name}"))?;
        headers.append(name, value);
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("101 Switching Protocols to a request that asked for no upgrade".into());
    }
    let mut keep_alive = http11 && !has_token(&headers, CONNECTION, "close");
    // Interim responses, answers to HEAD, 204 and 304 end with their head
    // whatever their fields say (RFC 9112 §6.3, items 1 and 2).
    let framing = if status.is_informational()
        || request_was_head
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if headers.contains_key(TRANSFER_ENCODING) {
        if !http11 {
            return Err("transfer-encoding in an HTTP/1.0 response".into());
        }
        // Both framings at once is how responses get smuggled: follow
        // Transfer-Encoding (RFC 9112 §6.3), drop the length, and do not
        // reuse the connection.
        if headers.remove(CONTENT_LENGTH).is_some() {
            keep_alive = false;
        }
        if last_coding_is_chunked(&headers) {
            Framing::Chunked(chunked::Decoder::default())
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if headers.contains_key(CONTENT_LENGTH) {
        Framing::Length(content_length(&headers)?)
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// One length, however many times it is repeated; anything else is an
/// error (RFC 9112 §6.3, item 5).
fn content_length(headers: &HeaderMap) -> Result<u64, String> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for item in value.as_bytes().split(|b| *b == b',') {
            let item = item.trim_ascii();
            let n = std::str::from_utf8(item)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| "invalid content-length".to_string())?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values".into());
            }
            length = Some(n);
        }
    }
    length.ok_or_else(|| "invalid content-length".into())
}

fn last_coding_is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests;
