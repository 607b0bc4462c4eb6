//! Writing a response as HTTP/1.1.
//!
//! Framing is ours to choose, as it is any HTTP/1.1 server's: a body of
//! known size gets `Content-Length`, any other body is chunked (its trailers
//! relayed), and a response that has no body by definition (to HEAD, 1xx,
//! 204, 304) keeps the header fields it came with and sends no body.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Response, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::http::body::BoxError;
use crate::http::Body;

/// A body up to this size is copied behind the head so that both go out in
/// one write; a larger one is written from its own buffer.
const COALESCE: usize = 16 * 1024;

/// How the body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Write `res` to `io`; `out` is the connection's staging buffer, and the
/// response's header map is left in `cache`, emptied, for the next request
/// (see [`super::head::parse`]). Returns
/// whether the connection may carry another request: not if `keep_alive`
/// was false (the client asked to close, or the listener drains), the
/// response asked to close, or its body failed or came short (the client
/// could not tell where this response ends).
pub async fn write<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut Vec<u8>,
    cache: &mut Option<HeaderMap>,
    res: Response<Body>,
    head_request: bool,
    keep_alive: bool,
) -> io::Result<bool> {
    let (parts, body) = res.into_parts();
    let status = parts.status;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let keep = keep_alive && !asks_to_close(&parts.headers);
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if let Some(n) = declared_length(&parts.headers) {
        Framing::Length(n)
    } else {
        Framing::Chunked
    };

    out.clear();
    head(out, status, &parts.headers, framing, bodiless, keep);
    let mut headers = parts.headers;
    headers.clear();
    *cache = Some(headers);
    if bodiless {
        drop(body);
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(keep);
    }
    let body = match body.into_full() {
        Ok(data) => {
            let data = data.unwrap_or_default();
            if data.len() <= COALESCE {
                out.extend_from_slice(&data);
                io.write_all(out).await?;
            } else {
                io.write_all(out).await?;
                io.write_all(&data).await?;
            }
            io.flush().await?;
            return Ok(keep);
        }
        Err(body) => body,
    };
    let ended = stream(io, out, body, framing).await?;
    io.flush().await?;
    Ok(keep && ended)
}

/// Relay a streaming body after the head, which waits in `out`; `Ok(false)`
/// if the body failed or ended short of its length, after which the
/// connection must close.
///
/// Whatever is at hand goes out in one write: `out` is written only when
/// the next frame is not ready yet (so a slow stream's head and frames are
/// not held back) or when it has grown past [`COALESCE`]. A relayed
/// response usually arrives whole (an HTTP/2 HEADERS and DATA frame in one
/// read), and is then written with its head at once, as hyper did: writing
/// the head on its own cost a second `write` per response.
async fn stream<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut Vec<u8>,
    mut body: Body,
    framing: Framing,
) -> io::Result<bool> {
    let mut sent = 0u64;
    let mut trailers_sent = false;
    loop {
        let frame = match ready_frame(&mut body) {
            Some(f) => f,
            None => {
                io.write_all(out).await?;
                io.flush().await?;
                out.clear();
                body.frame().await
            }
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // What was relayed so far still goes out; the close tells
                // the client the body is incomplete.
                io.write_all(out).await?;
                tracing::debug!(error = %e, "response body failed; closing the client connection");
                return Ok(false);
            }
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let n = data.len();
                if n == 0 {
                    // An empty chunk would end a chunked body.
                    continue;
                }
                sent += n as u64;
                if matches!(framing, Framing::Length(len) if sent > len) {
                    io.write_all(out).await?;
                    tracing::debug!("response body longer than its content-length; closing");
                    return Ok(false);
                }
                if framing == Framing::Chunked {
                    push_hex(out, n);
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() + n <= COALESCE {
                    out.extend_from_slice(&data);
                } else {
                    io.write_all(out).await?;
                    out.clear();
                    io.write_all(&data).await?;
                }
                if framing == Framing::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let (Ok(trailers), Framing::Chunked) = (frame.into_trailers(), framing) {
            out.extend_from_slice(b"0\r\n");
            fields(out, &trailers);
            out.extend_from_slice(b"\r\n");
            trailers_sent = true;
        }
    }
    match framing {
        Framing::Chunked if !trailers_sent => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(len) if sent < len => {
            io.write_all(out).await?;
            tracing::debug!(
                len,
                sent,
                "response body shorter than its content-length; closing"
            );
            return Ok(false);
        }
        _ => {}
    }
    io.write_all(out).await?;
    Ok(true)
}

/// The body's next frame if it is ready now; `None` if it would wait.
fn ready_frame(body: &mut Body) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(f) => Some(f),
        Poll::Pending => None,
    }
}

/// The status line and header block.
fn head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    bodiless: bool,
    keep: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in headers {
        // Framing and the connection's fate are this hop's to state. A
        // bodiless response keeps the length it announces (HEAD, 304).
        if *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION
            || (*name == header::CONTENT_LENGTH && !bodiless)
        {
            continue;
        }
        dated |= *name == header::DATE;
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None => {}
    }
    if !dated {
        // As hyper does: a response the service sent without a Date, or
        // one the sidecar made, is dated here (RFC 9110 §6.6.1).
        out.extend_from_slice(b"date: ");
        now(out);
        out.extend_from_slice(b"\r\n");
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Whether the response's `Connection` field names `close`.
fn asks_to_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// The one valid `Content-Length` a streaming response announced.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    std::str::from_utf8(first.as_bytes()).ok()?.parse().ok()
}

/// Append the current time as an HTTP date, formatted once a second.
fn now(out: &mut Vec<u8>) {
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let t = SystemTime::now();
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(t);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_sizes() {
        for (n, s) in [
            (0usize, "0"),
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (0x1234abc, "1234abc"),
        ] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, s.as_bytes());
        }
    }

    #[test]
    fn connection_close_is_found_among_tokens() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "keep-alive".parse().unwrap());
        assert!(!asks_to_close(&h));
        h.append(header::CONNECTION, "foo, Close ".parse().unwrap());
        assert!(asks_to_close(&h));
    }

    #[test]
    fn only_one_valid_length_is_declared() {
        let mut h = HeaderMap::new();
        assert_eq!(declared_length(&h), None);
        h.insert(header::CONTENT_LENGTH, "12".parse().unwrap());
        assert_eq!(declared_length(&h), Some(12));
        h.append(header::CONTENT_LENGTH, "12".parse().unwrap());
        assert_eq!(declared_length(&h), None);
        h.insert(header::CONTENT_LENGTH, "x".parse().unwrap());
        assert_eq!(declared_length(&h), None);
    }
}
