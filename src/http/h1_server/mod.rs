//! A lean HTTP/1.1 server loop for the requests a mesh mostly carries:
//! HTTP/1.1 requests without a body (GET, HEAD, DELETE, ...).
//!
//! Why: hyper's HTTP/1 server was the largest part of the calling sidecar's
//! cost. Under callgrind it took about 10.7k of hop A's 39.4k instructions
//! per request, not counting the handler: its dispatcher's state machine,
//! its buffered I/O layers and a boxed service future per request
//! (bench/README.md). This loop parses the head in place with httparse, as
//! hyper does, calls the handler on the connection's own task, and writes
//! the response head and a small body in one write.
//!
//! Every HTTP connection starts here, beneath the same [`GuardedIo`] that
//! hyper reads through, so the first-request deadline applies unchanged.
//! The guard's smuggling check and head timeout wait while this loop runs
//! ([`GuardedIo::defer`]): the loop parses each head anyway, serves only
//! heads whose framing is unambiguous (no body, one `Host`), and times
//! heads itself. At a handoff the guard resumes with the bytes read so far.
//! The first request this loop
//! does not serve (see [`head::Head::Unfit`]: a body, an upgrade,
//! `Expect`, CONNECT, HTTP/1.0, the HTTP/2 preface, a limit exceeded, bytes
//! that do not parse) hands the connection to hyper for the rest of its
//! life, with the bytes read so far replayed first ([`Prefixed`]). hyper's
//! answers to such requests (400, 431, 100-continue, upgrades, h2c) and its
//! handling of bodies are therefore what they were.
//!
//! [`GuardedIo`]: super::conn_guard::GuardedIo
//! [`GuardedIo::defer`]: super::conn_guard::GuardedIo::defer

mod head;
mod prefixed;
mod response;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::{Method, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::conn_guard::ConnGuard;
use super::Body;
use crate::tls::PeerIdentity;
pub use head::Limits;
use head::{Field, Head};
pub use prefixed::Prefixed;

/// Read buffer per connection; a head larger than this grows it, up to the
/// hyper limit that [`Limits`] implies.
const READ_BUF: usize = 4096;

/// Bytes a read asks for at least.
const READ_CHUNK: usize = 1024;

/// Staging buffer for a response head (and small body), kept per connection.
const OUT_BUF: usize = 1024;

/// How a connection left the loop.
#[derive(Debug)]
pub enum Outcome {
    /// It is finished: the client closed it, a response closed it, it idled
    /// out or drained between requests, or an I/O error ended it.
    Closed,
    /// hyper serves the rest, starting with `prefix` (a whole or partial
    /// request this loop does not serve); a head still incomplete in it
    /// must complete by `head_deadline`.
    Handoff {
        /// Read from the client, not yet served.
        prefix: BytesMut,
        /// When the head begun in `prefix`, if any, times out.
        head_deadline: Option<Instant>,
    },
}

/// What the loop needs from the listener.
pub struct Ctx<'a> {
    /// The connection's guard: in-flight count and the smuggling verdict.
    pub guard: &'a Arc<ConnGuard>,
    /// Heads over these go to hyper.
    pub limits: Limits,
    /// hyper's read buffer limit: a partial head past it goes to hyper,
    /// which answers 431.
    pub max_buf: usize,
    /// A head must complete within this of its first bytes.
    pub header_read_timeout: Duration,
    /// With mTLS, the caller's verified identity, added to each request.
    pub identity: Option<&'a PeerIdentity>,
    /// Listener name, for logs.
    pub name: &'static str,
    /// The client's address, passed to the handler.
    pub remote: SocketAddr,
}

/// Serve requests on `io` until the connection ends or hyper must take it.
///
/// `closer` resolves when the connection should close (idle timeout or
/// drain); `closing` is set once it has, so that the caller neither polls
/// it again nor keeps the connection open longer than its current request.
pub async fn serve<I, H, F, C>(
    io: &mut I,
    handler: &H,
    ctx: &Ctx<'_>,
    mut closer: Pin<&mut C>,
    closing: &mut bool,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<Body>, SocketAddr) -> F,
    F: Future<Output = Response<Body>>,
    C: Future,
{
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut out = Vec::with_capacity(OUT_BUF);
    let mut fields: Vec<Field> = Vec::new();
    let mut cached = None;
    // Armed while a head is incomplete: from its first read, not reset by
    // later reads, so a head dribbled a byte at a time still has to finish.
    let mut head_timer: Option<Pin<Box<Sleep>>> = None;
    let handoff = |prefix, timer: Option<Pin<Box<Sleep>>>| Outcome::Handoff {
        prefix,
        head_deadline: timer.map(|t| t.deadline()),
    };
    loop {
        if !buf.is_empty() {
            match head::parse(&mut buf, &ctx.limits, &mut fields, &mut cached) {
                Head::Request { mut req, close } => {
                    head_timer = None;
                    let head_request = req.method() == Method::HEAD;
                    if let Some(id) = ctx.identity {
                        req.extensions_mut().insert(id.clone());
                    }
                    // Counts against the idle timeout until the response is
                    // written.
                    let in_flight = ctx.guard.request_in_flight();
                    let res = {
                        let relay = std::pin::pin!(handler(req, ctx.remote));
                        respond(relay, closer.as_mut(), closing).await
                    };
                    let keep = !close && !*closing;
                    let written =
                        response::write(io, &mut out, &mut cached, res, head_request, keep).await;
                    drop(in_flight);
                    match written {
                        Ok(true) => continue,
                        Ok(false) => {
                            let _ = io.shutdown().await;
                            return Outcome::Closed;
                        }
                        Err(e) => {
                            tracing::debug!(listener = ctx.name, peer = %ctx.remote, error = %e, "writing a response failed");
                            return Outcome::Closed;
                        }
                    }
                }
                Head::Partial => {
                    if head_timer.is_none() {
                        head_timer = Some(Box::pin(tokio::time::sleep(ctx.header_read_timeout)));
                    }
                }
                Head::Unfit => return handoff(buf, head_timer),
                Head::Invalid => {
                    tracing::info!(listener = ctx.name, peer = %ctx.remote, "closed client connection: malformed request");
                    let _ = io
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    let _ = io.shutdown().await;
                    return Outcome::Closed;
                }
            }
            if buf.len() >= ctx.max_buf {
                return handoff(buf, head_timer);
            }
        } else if *closing {
            return Outcome::Closed;
        }
        buf.reserve(READ_CHUNK);
        let read = tokio::select! {
            biased;
            r = io.read_buf(&mut buf) => r,
            _ = expired(&mut head_timer), if head_timer.is_some() => {
                tracing::info!(listener = ctx.name, peer = %ctx.remote, "closed client connection: request head not received in time");
                return Outcome::Closed;
            }
            _ = closer.as_mut(), if !*closing => {
                // Between requests the connection closes now; a head that
                // has begun is finished first (the head timeout bounds it).
                *closing = true;
                continue;
            }
        };
        match read {
            Ok(0) => return Outcome::Closed,
            Ok(_) => {}
            Err(e) => {
                super::server::log_connection_end(ctx.name, ctx.remote, &e);
                return Outcome::Closed;
            }
        }
    }
}

/// Resolves when the armed head timer fires.
async fn expired(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Wait for the handler's response, noting meanwhile whether the connection
/// is to close after it.
async fn respond<F, C>(
    mut relay: Pin<&mut F>,
    mut closer: Pin<&mut C>,
    closing: &mut bool,
) -> F::Output
where
    F: Future,
    C: Future,
{
    loop {
        tokio::select! {
            biased;
            res = relay.as_mut() => return res,
            _ = closer.as_mut(), if !*closing => *closing = true,
        }
    }
}
