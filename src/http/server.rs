//! Accept loop and per-connection HTTP setup shared by all listeners.
//!
//! Every listener gets the same protections: a cap on open connections (a
//! semaphore acquired *before* accepting, so excess clients wait in the
//! kernel backlog instead of costing us memory), a header read timeout
//! against slowloris, header size and count limits (431 beyond), a cap on
//! concurrent HTTP/2 streams, and exponential backoff when `accept` fails
//! (e.g. EMFILE), as mini-redis does. On shutdown the loop stops accepting
//! and in-flight connections get `drain_timeout` to finish.
//!
//! HTTP/1.1 requests without a body are served by our own loop
//! ([`super::h1_server`]); the first request it does not serve hands the
//! connection to hyper (HTTP/1 with bodies and upgrades, HTTP/2) for the rest
//! of its life.
//!
//! Below both, every connection is a [`GuardedIo`]: a client must send a
//! complete first request within the header read timeout (hyper's own
//! timeout starts only after the protocol is known), and an HTTP/1 request
//! whose framing is ambiguous (request smuggling) makes every request on
//! that connection a 400 followed by a close.
//!
//! A connection with no request in flight for `idle_connection_timeout` is
//! shut down gracefully, as on drain: HTTP/1 closes between requests,
//! HTTP/2 gets GOAWAY. A request is in flight from the service call until
//! its response body is fully sent or dropped, so a long stream or upload
//! is never cut; bytes without a request (HTTP/2 PINGs answered to our
//! keepalive) do not keep a connection open, and an upgraded connection
//! (WebSocket, CONNECT) is exempt. See [`ConnGuard::idle`].
//!
//! A listener given a [`Tls`] (the inbound one, when `[tls]` is set)
//! handshakes each connection in its own task before serving HTTP, and hands
//! the caller's verified identity to the handler as a [`PeerIdentity`]
//! request extension.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::conn_guard::{ConnGuard, GuardedIo};
use super::error::respond;
use super::h1_server;
use super::woken::Woken;
use super::{Body, ProxyError};
use crate::config::Limits;
use crate::tls::{PeerIdentity, Tls, HANDSHAKE_TIMEOUT};

/// The first byte of every TLS connection (a handshake record), which no
/// plaintext HTTP/1 or HTTP/2 request starts with.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Smallest read buffer hyper accepts; the header limit cannot go below it.
const HYPER_MIN_BUF: usize = 8192;

/// First backoff after a failed accept; doubles up to [`MAX_ACCEPT_BACKOFF`].
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// Cap on accept backoff, so a transient fd shortage heals within a second.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// HTTP/2 keepalive towards clients: detects dead client connections so
/// their streams (and the upstream work behind them) are released.
const H2_SERVER_KEEPALIVE: Duration = Duration::from_secs(20);

/// Build the connection builder for a listener from the configured limits.
pub fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Off: `conn_guard::GuardedIo` times request heads instead, from
        // their first byte. hyper's timer ran from when it began waiting
        // for the next head, so it also closed idle keep-alive connections
        // (after 10 s, not `idle_connection_timeout`), and it allocated a
        // timer per request.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(H2_SERVER_KEEPALIVE)
        .keep_alive_timeout(Duration::from_secs(10))
        // Rapid-reset (CVE-2023-44487) guard: a client that resets more
        // than this many streams before we accept them gets GOAWAY
        // (ENHANCE_YOUR_CALM). h2's default is 20; keep it explicit.
        .max_pending_accept_reset_streams(20)
        // A client that keeps provoking stream errors (malformed headers,
        // streams beyond `max_concurrent_streams`, which h2 refuses with
        // REFUSED_STREAM) is sent GOAWAY after this many, instead of costing
        // a reset frame forever. hyper's default; explicit for the same reason.
        .max_local_error_reset_streams(1024);
    // Not configurable here because h2 already bounds them: CONTINUATION
    // floods (GOAWAY after the frames a max-size header list needs, plus
    // 25%), empty DATA frames (GOAWAY after 100) and small-DATA-frame
    // overhead (a budget of half the connection window).
    b
}

/// The response that refuses a request before it is relayed. HTTP/1 also
/// gets `Connection: close`: after ambiguous framing the rest of the byte
/// stream cannot be trusted, so hyper must not read another request from it.
fn refuse(err: &ProxyError, version: http::Version, listener: &'static str) -> Response<Body> {
    let mut res = respond(err, &super::headers::new_request_id(), listener);
    if version < http::Version::HTTP_2 && matches!(err, ProxyError::AmbiguousFraming(_)) {
        res.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    res
}

/// Log why a connection ended; clients' faults (garbage, timeouts) at
/// info, so an operator sees an attack without a debug build of the logs.
pub(super) fn log_connection_end(
    listener: &'static str,
    peer: SocketAddr,
    e: &(dyn std::error::Error + 'static),
) {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut client_fault = None;
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_too_large() {
                client_fault = Some("malformed request");
            } else if h.is_timeout() {
                client_fault = Some("request head not received in time");
            }
        } else if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                client_fault = Some("request head not received in time");
            }
        }
        if client_fault.is_some() {
            break;
        }
        cause = c.source();
    }
    match client_fault {
        Some(what) => {
            tracing::info!(listener, peer = %peer, error = %e, "closed client connection: {what}")
        }
        None => tracing::debug!(listener, peer = %peer, error = %e, "connection ended with error"),
    }
}

/// Serve `listener` until `shutdown` flips to true, then drain.
pub async fn serve<H, F>(
    listener: TcpListener,
    name: &'static str,
    limits: Limits,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
    tls: Option<Arc<Tls>>,
) where
    H: Fn(Request<Body>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = Arc::new(builder(&limits));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Each connection's task holds a receiver; the drain waits for all of
    // them to be dropped. (Connections learn of the drain from `shutdown`
    // itself, in the same select as their idle timer, which hyper_util's
    // `GracefulShutdown` cannot join: its watcher only wraps hyper's own
    // connection types.)
    let (open, _) = watch::channel(());
    let mut backoff = MIN_ACCEPT_BACKOFF;
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut shutdown) => break,
        };
        let (stream, remote) = match accepted {
            Ok(conn) => {
                backoff = MIN_ACCEPT_BACKOFF;
                conn
            }
            Err(e) => {
                tracing::warn!(listener = name, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        // Small request/response messages must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            builder: builder.clone(),
            open: open.subscribe(),
            drain: shutdown.clone(),
            name,
            remote,
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_connection_timeout,
        };
        let handler = handler.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => conn.serve(stream, handler, None).await,
                Some(tls) => serve_tls(conn, stream, handler, &tls).await,
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::debug!(
        listener = name,
        open = open.receiver_count(),
        "listener closed; draining"
    );
    if tokio::time::timeout(drain_timeout, open.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain timeout reached; closing remaining connections"
        );
    }
}

/// What one accepted connection needs to be served.
struct Conn {
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Held until the connection ends; the listener's drain waits for it.
    open: watch::Receiver<()>,
    /// Flips to `true` when the listener drains.
    drain: watch::Receiver<bool>,
    name: &'static str,
    remote: SocketAddr,
    max_header_bytes: usize,
    max_headers: usize,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

// === impl Conn ===

impl Conn {
    /// Serve HTTP on `io` until it closes (or the drain ends it). With mTLS,
    /// `identity` is the caller's verified identity, handed to the handler
    /// as a request extension.
    async fn serve<I, H, F>(self, io: I, handler: H, identity: Option<PeerIdentity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<Body>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let Conn {
            builder,
            open,
            mut drain,
            name,
            remote,
            max_header_bytes,
            max_headers,
            header_read_timeout,
            idle_timeout,
        } = self;
        // The guard sits on the plaintext side of TLS: it must see the HTTP
        // bytes hyper parses, and its first-request deadline starts once the
        // handshake (bounded on its own) is done.
        let guard = Arc::new(ConnGuard::default());
        let idle_guard = guard.clone();
        let mut io = GuardedIo::new(
            io,
            guard.clone(),
            header_read_timeout,
            max_header_bytes.max(HYPER_MIN_BUF),
            max_headers,
        );
        // Resolves to `true` when the connection has idled out, `false` when
        // the listener drains. Wrapped in `Woken` so that the task's many
        // wake-ups for the connection do not poll the timer and the watch
        // channel each time (see `woken`).
        let closer = Woken::new(async move {
            tokio::select! {
                biased;
                _ = stopped(&mut drain) => false,
                _ = idle_guard.idle(idle_timeout) => true,
            }
        });
        let mut closer = std::pin::pin!(closer);
        // Set once `closer` has resolved: the connection closes after its
        // current request (HTTP/1) or streams (HTTP/2).
        let mut closing = false;

        // Bodiless HTTP/1.1 requests are served by the lean loop; the first
        // request it does not serve hands the connection to hyper.
        let prefix = {
            let ctx = h1_server::Ctx {
                guard: &guard,
                limits: h1_server::Limits {
                    max_header_bytes,
                    max_headers,
                },
                max_buf: max_header_bytes.max(HYPER_MIN_BUF),
                header_read_timeout,
                identity: identity.as_ref(),
                name,
                remote,
            };
            io.defer();
            let served =
                h1_server::serve(&mut io, &handler, &ctx, closer.as_mut(), &mut closing).await;
            match served {
                h1_server::Outcome::Closed => {
                    drop(open);
                    return;
                }
                h1_server::Outcome::Handoff {
                    prefix,
                    head_deadline,
                } => {
                    io.resume(&prefix, head_deadline);
                    prefix
                }
            }
        };
        let io = h1_server::Prefixed::new(prefix, io);
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            // Dropped with the response body, or with this future if the
            // client goes away (an HTTP/2 reset) before the response.
            let in_flight = guard.request_in_flight();
            let connect = req.method() == http::Method::CONNECT;
            // hyper bounds its read buffer, not the header block exactly;
            // the documented limit is enforced here, before any relaying.
            let size = header_block_size(&req);
            let refused = if let Some(why) = guard.ambiguous_framing() {
                Some(ProxyError::AmbiguousFraming(why))
            } else if size > max_header_bytes {
                Some(ProxyError::HeadersTooLarge {
                    size,
                    limit: max_header_bytes,
                })
            } else {
                None
            };
            if let Some(id) = &identity {
                req.extensions_mut().insert(id.clone());
            }
            let version = req.version();
            // Boxed: the relay future is a few KiB (retry state, parts
            // kept for a second try, timers), and hyper moves the service
            // future into its connection state for every request. A move is a
            // memcpy of the whole future; the box makes it a pointer
            // (callgrind: memcpy was ~23% of the calling sidecar's
            // instructions per request before; bench/README.md).
            let relay = match refused {
                None => Ok(Box::pin(handler(req.map(Body::incoming), remote))),
                Some(err) => Err(err),
            };
            async move {
                let res = match relay {
                    Ok(fut) => fut.await,
                    Err(err) => refuse(&err, version, name),
                };
                // Past a protocol switch the bytes no longer come as
                // requests, so the request count says nothing about them.
                if res.status() == http::StatusCode::SWITCHING_PROTOCOLS
                    || (connect && res.status().is_success())
                {
                    in_flight.upgraded();
                }
                Ok::<_, Infallible>(res.map(|body| body.with_in_flight(in_flight)))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        let mut conn = std::pin::pin!(conn);
        if closing {
            // The drain (or idle timeout) came while the lean loop ran, and
            // hyper has a request to serve first: let it begin that request,
            // then shut down gracefully, which finishes it and closes.
            let first = std::future::poll_fn(|cx| match conn.as_mut().poll(cx) {
                std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
                std::task::Poll::Pending => std::task::Poll::Ready(None),
            })
            .await;
            if let Some(ended) = first {
                if let Err(e) = ended {
                    log_connection_end(name, remote, e.as_ref());
                }
                drop(open);
                return;
            }
            conn.as_mut().graceful_shutdown();
        }
        // Graceful shutdown (HTTP/1: close once the current response is
        // done, or now if between requests; HTTP/2: GOAWAY, then close once
        // the open streams finish), for an idle connection or on drain,
        // whichever comes first; hyper must keep being polled to finish it.
        let ended = loop {
            tokio::select! {
                // The connection first: it is what nearly every wake-up is for.
                biased;
                ended = conn.as_mut() => break ended,
                idle = closer.as_mut(), if !closing => {
                    if idle {
                        tracing::debug!(listener = name, peer = %remote, "closing idle connection");
                    }
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(e) = ended {
            log_connection_end(name, remote, e.as_ref());
        }
        drop(open);
    }
}

/// The TLS side of an inbound connection: handshake (client certificate
/// required), then HTTP with the caller's identity. A failed handshake (no
/// certificate, a foreign CA, a bad identity, plaintext) closes the
/// connection; nothing reaches the local service. In permissive mode a
/// connection whose first byte is not a TLS handshake record is served as
/// plaintext, without an identity.
async fn serve_tls<H, F>(conn: Conn, stream: TcpStream, handler: H, tls: &Tls)
where
    H: Fn(Request<Body>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    if tls.permissive() {
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await;
        match peeked {
            Ok(Ok(1..)) if first[0] != TLS_HANDSHAKE_RECORD => {
                return conn.serve(stream, handler, None).await;
            }
            Ok(Ok(1..)) => {}
            _ => return,
        }
    }
    let remote = conn.remote;
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tls.record_handshake("inbound", false);
            tracing::info!(listener = conn.name, peer = %remote, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tls.record_handshake("inbound", false);
            tracing::info!(listener = conn.name, peer = %remote, "TLS handshake timed out");
            return;
        }
    };
    let identity = crate::tls::peer_identity(stream.get_ref().1, tls.trust_domain());
    let Some(identity) = identity else {
        // The verifier already required one; this is belt and braces.
        tls.record_handshake("inbound", false);
        return;
    };
    tls.record_handshake("inbound", true);
    tracing::debug!(listener = conn.name, peer = %remote, identity = %identity, "mTLS peer");
    conn.serve(stream, handler, Some(PeerIdentity(Arc::new(identity))))
        .await;
}

/// Bytes of a request's header block as sent on the wire (name, `: `,
/// value, CRLF per field; the request line is not counted).
fn header_block_size<B>(req: &Request<B>) -> usize {
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

/// Resolves once `rx` holds `true` (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
