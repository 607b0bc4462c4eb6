//! The HTTP/2 client side of a sidecar-to-sidecar connection, on the `h2`
//! crate directly rather than through hyper's client.
//!
//! hyper's HTTP/2 client puts a dispatch task between the caller and `h2`:
//! every request goes through an mpsc channel to that task, which opens the
//! stream, spawns a further task to await the response, and hands the
//! response back over a oneshot channel. On the hot path of a proxy that is
//! three task hand-offs per request and per hop, plus a keep-alive recorder
//! that takes a lock on every frame received. Here the request's own task
//! opens the stream and awaits the response; the only other task is the
//! connection's, which reads and writes the socket. The keep-alive PINGs,
//! which hyper ran inside its connection future, run beside the connection
//! in [`drive`].

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::body::BoxError;
use crate::http::woken::Woken;
use crate::http::{headers, Body};

/// hyper's client defaults, kept so the switch changed nothing on the wire
/// but the windows we always set.
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER_SIZE: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Flow-control windows and the keep-alive schedule of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Connection-level receive window.
    pub connection_window: u32,
    /// PINGs to detect a hung peer; `None` for none (the local service,
    /// on loopback, is watched by its health check instead).
    pub keepalive: Option<Keepalive>,
}

/// The keep-alive schedule of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// How often the connection is PINGed, busy or idle.
    pub interval: Duration,
    /// How long a PING may go unanswered before the peer counts as hung.
    pub timeout: Duration,
}

/// A handle that opens streams on one connection. Cheap to clone: each
/// request takes its own.
#[derive(Clone)]
pub struct H2Sender {
    tx: SendRequest<Bytes>,
    /// Set by [`drive`] when the connection ends, so the pool can tell a
    /// dead connection without opening a stream on it.
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for H2Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Sender")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// How a connection's task ended.
#[derive(Debug)]
pub enum Ended {
    /// The connection closed, cleanly or not; `Some` carries the error.
    Closed(Option<h2::Error>),
    /// A PING went unanswered: the peer is hung. The connection was dropped,
    /// which failed the streams still open on it.
    Hung,
}

/// Why a request failed.
pub enum SendError {
    /// The connection was gone before the stream opened: nothing was sent,
    /// and the request comes back whatever its method.
    Unsent {
        /// The request, untouched (boxed: this is the rare path, and the
        /// error stays small on the common one).
        request: Box<Request<Body>>,
        /// Why the connection could not take it.
        error: h2::Error,
    },
    /// The stream opened, so the peer may have seen the request.
    Failed {
        /// What went wrong.
        error: BoxError,
        /// The failure was the connection's, not the stream's: it should not
        /// be handed to further requests.
        connection: bool,
    },
}

/// Start HTTP/2 on `io`: the client preface and our SETTINGS are written,
/// but the peer's answer is not awaited here (the caller watches for its
/// first bytes). Run the returned connection with [`drive`].
pub async fn handshake<T>(
    io: T,
    settings: &Settings,
) -> Result<(H2Sender, Connection<T, Bytes>), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (tx, conn) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .enable_push(false)
        .handshake::<T, Bytes>(io)
        .await?;
    let sender = H2Sender {
        tx,
        closed: Arc::new(AtomicBool::new(false)),
    };
    Ok((sender, conn))
}

/// Run a connection until it closes or its peer stops answering PINGs.
/// `sender` is any handle of the connection; it is marked closed before
/// this returns. `on_hung` runs before the connection is dropped, so that
/// whoever sees the streams fail finds the peer already marked hung.
pub async fn drive<T>(
    mut conn: Connection<T, Bytes>,
    sender: &H2Sender,
    settings: Settings,
    on_hung: impl FnOnce(),
) -> Ended
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    // The keep-alive loop wakes once a second; the connection on every
    // frame. Behind `Woken` the loop is polled only when its own timer or
    // pong wakes it, not on every frame. `None` without keep-alive, and once
    // the loop has ended: a finished future must not be polled again, and a
    // late wake-up could otherwise do so.
    let mut keepalive = match settings.keepalive {
        Some(schedule) => conn
            .ping_pong()
            .map(|pings| Woken::new(keepalive(pings, schedule))),
        None => None,
    };
    let ended = poll_fn(|cx| {
        if let Poll::Ready(r) = Pin::new(&mut conn).poll(cx) {
            return Poll::Ready(Ended::Closed(r.err()));
        }
        let Some(k) = keepalive.as_mut() else {
            return Poll::Pending;
        };
        match Pin::new(k).poll(cx) {
            Poll::Ready(KeepaliveEnd::Hung) => Poll::Ready(Ended::Hung),
            // The PING handle reports the connection gone; the
            // connection's own future says why on its next poll.
            Poll::Ready(KeepaliveEnd::Closed) => {
                keepalive = None;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    sender.closed.store(true, Ordering::Release);
    if matches!(ended, Ended::Hung) {
        on_hung();
    }
    // Dropping the connection fails its open streams, after `on_hung`.
    drop(conn);
    ended
}

enum KeepaliveEnd {
    Hung,
    Closed,
}

async fn keepalive(mut pings: h2::PingPong, schedule: Keepalive) -> KeepaliveEnd {
    loop {
        tokio::time::sleep(schedule.interval).await;
        match tokio::time::timeout(schedule.timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return KeepaliveEnd::Closed,
            Err(_) => return KeepaliveEnd::Hung,
        }
    }
}

impl H2Sender {
    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Send `req` on a new stream and wait for the response head.
    ///
    /// A kept (complete) body is written with the head; a streaming one is
    /// piped by a task of its own, as the response may begin before the
    /// request ends.
    pub async fn send(&mut self, req: Request<Body>) -> Result<Response<Body>, SendError> {
        // Waits only while the peer's stream limit is reached.
        if let Err(error) = poll_fn(|cx| self.tx.poll_ready(cx)).await {
            return Err(SendError::Unsent {
                request: Box::new(req),
                error,
            });
        }
        let (mut head, body) = req.into_parts();
        // The relay strips these already; h2 refuses a request that still
        // has them, so a stray one is dropped here rather than failing it.
        headers::strip_hop_by_hop(&mut head.headers, false);
        let hint = body.size_hint().exact();
        if let Some(len) = hint {
            if (len != 0 || has_payload_semantics(&head.method))
                && !head.headers.contains_key(http::header::CONTENT_LENGTH)
            {
                head.headers
                    .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        let eos = body.is_end_stream();
        let (response, mut stream) = self
            .tx
            .send_request(Request::from_parts(head, ()), eos)
            .map_err(failed)?;
        if !eos {
            match body.into_full() {
                // h2 buffers what the window cannot take yet and sends it
                // as the peer grants capacity; a kept body is small.
                Ok(data) => {
                    let data = data.unwrap_or_default();
                    stream.send_data(data, true).map_err(failed)?;
                }
                Err(body) => {
                    tokio::spawn(pipe(body, stream));
                }
            }
        }
        let res = response.await.map_err(failed)?;
        let (parts, recv) = res.into_parts();
        let length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        Ok(Response::from_parts(parts, Body::h2(recv, length)))
    }
}

impl std::fmt::Debug for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Unsent { error, .. } => {
                f.debug_struct("Unsent").field("error", error).finish()
            }
            SendError::Failed { error, connection } => f
                .debug_struct("Failed")
                .field("error", error)
                .field("connection", connection)
                .finish(),
        }
    }
}

fn failed(error: h2::Error) -> SendError {
    SendError::Failed {
        connection: error.is_io() || error.is_go_away(),
        error: error.into(),
    }
}

/// hyper's rule: an empty body gets `content-length: 0` only where the
/// method gives a body meaning.
fn has_payload_semantics(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::DELETE
            | http::Method::OPTIONS
            | http::Method::CONNECT
            | http::Method::TRACE
    )
}

/// Copy a streaming request body onto its stream, frame by frame, waiting
/// for window before each frame so a fast client cannot fill our memory.
///
/// A reset from the peer stops the copy at once, also while the body has
/// nothing to give: otherwise a client that holds its upload open would
/// keep this task, its connection's in-flight count and the endpoint's
/// load guard alive until the body's idle timeout, for a stream the peer
/// has already given up.
async fn pipe(mut body: Body, mut stream: h2::SendStream<Bytes>) {
    loop {
        // At least one byte of window before the next frame is read.
        stream.reserve_capacity(1);
        while stream.capacity() == 0 {
            match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(0)) => {}
                Some(Ok(_)) => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body: stream closed by the peer");
                    return;
                }
                None => return,
            }
        }
        let frame = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => match stream.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        })
        .await;
        let Some(frame) = frame else {
            tracing::debug!("request body: stream reset by the peer");
            return;
        };
        let res = match frame {
            None => stream.send_data(Bytes::new(), true),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body failed; resetting the stream");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    let res = stream.send_data(data, eos);
                    if res.is_ok() && !eos {
                        continue;
                    }
                    res
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => stream.send_trailers(trailers),
                    Err(_) => continue,
                },
            },
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "request body: could not send");
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::conn_guard::ConnGuard;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::{TcpListener, TcpStream};

    const FAST: Settings = Settings {
        stream_window: 64 * 1024,
        connection_window: 256 * 1024,
        keepalive: Some(Keepalive {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(100),
        }),
    };

    /// An HTTP/2 server (hyper's) that echoes the request body with a
    /// trailer naming how many bytes it read.
    async fn echo_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("x-read", HeaderValue::from(body.len()));
                            let frames = futures_util::stream::iter([
                                Ok::<_, hyper::Error>(http_body::Frame::data(body)),
                                Ok(http_body::Frame::trailers(trailers)),
                            ]);
                            Ok::<_, hyper::Error>(Response::new(http_body_util::StreamBody::new(
                                frames,
                            )))
                        },
                    );
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await
                        .ok();
                });
            }
        });
        addr
    }

    async fn connect(
        addr: std::net::SocketAddr,
        on_hung: impl FnOnce() + Send + 'static,
    ) -> (H2Sender, tokio::task::JoinHandle<Ended>) {
        let io = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = handshake(io, &FAST).await.unwrap();
        let handle = sender.clone();
        let task = tokio::spawn(async move { drive(conn, &handle, FAST, on_hung).await });
        (sender, task)
    }

    fn post(body: Body) -> Request<Body> {
        Request::post("http://b.test/echo").body(body).unwrap()
    }

    #[tokio::test]
    async fn bodies_and_trailers_cross_in_both_directions() {
        let addr = echo_server().await;
        let (mut sender, _task) = connect(addr, || {}).await;

        // A kept body goes out with the head.
        let res = sender.send(post(Body::full("kept"))).await.unwrap();
        let got = res.into_body().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["x-read"], "4");
        assert_eq!(got.to_bytes(), "kept");

        // A streaming body larger than the stream window is piped as the
        // peer grants window, and the response's window is released as it
        // is read (else the 300 KiB echo would stall at 64 KiB).
        let mut client = h1_relay(sender, Arc::default()).await;
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(4);
        tokio::spawn(async move {
            for _ in 0..300 {
                tx.send_data(Bytes::from(vec![7u8; 1024])).await.unwrap();
            }
        });
        let req = Request::post("http://b.test/echo").body(body).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), async {
            let res = client.send_request(req).await.unwrap();
            res.into_body().collect().await.unwrap()
        })
        .await
        .expect("a body past the window was not relayed");
        assert_eq!(got_len(res), 300 * 1024);
    }

    #[tokio::test]
    async fn a_reset_from_the_peer_releases_an_upload_that_has_stalled() {
        // The peer answers at once and never reads the upload, so hyper's
        // server resets the stream when its response ends.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, hyper::Error>(Response::new(http_body_util::Empty::<Bytes>::new()))
            });
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await
                .ok();
        });
        let (sender, _task) = connect(addr, || {}).await;

        // The relayed body carries the relay connection's in-flight token,
        // which is released only when the body is dropped.
        let conn = Arc::new(ConnGuard::default());
        let mut client = h1_relay(sender, conn.clone()).await;
        // One chunk, then the upload stalls: `_tx` stays open to the end.
        let (mut _tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(4);
        _tx.send_data(Bytes::from_static(b"first")).await.unwrap();
        let req = Request::post("http://b.test/upload").body(body).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), client.send_request(req))
            .await
            .expect("no response")
            .unwrap();
        assert_eq!(res.status(), 200);

        // The relayed body, and with it the in-flight token, is dropped
        // once the reset arrives, not when the stalled upload ends.
        tokio::time::timeout(Duration::from_secs(10), conn.idle(Duration::from_millis(1)))
            .await
            .expect("the stalled upload was still held after the peer reset its stream");
    }

    /// An HTTP/1.1 hop in front of `sender`, and a client connected to it.
    /// A streaming body comes from a connection, so the tests relay one as
    /// the sidecar does; each relayed body holds an in-flight token of
    /// `conn` until it is dropped.
    async fn h1_relay(
        sender: H2Sender,
        conn: Arc<ConnGuard>,
    ) -> hyper::client::conn::http1::SendRequest<
        http_body_util::channel::Channel<Bytes, hyper::Error>,
    > {
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = relay.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let mut sender = sender.clone();
                let in_flight = conn.request_in_flight();
                async move {
                    let req = req.map(|b| Body::incoming(b).with_in_flight(in_flight));
                    sender.send(req).await.map_err(|e| format!("{e:?}"))
                }
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await
                .ok();
        });
        let io = TcpStream::connect(relay_addr).await.unwrap();
        let (client, client_conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(client_conn);
        client
    }

    fn got_len(c: http_body_util::Collected<Bytes>) -> usize {
        c.to_bytes().len()
    }

    #[tokio::test]
    async fn an_unanswered_ping_marks_the_peer_hung_before_its_streams_fail() {
        // Accepts the connection and never reads: no SETTINGS, no PONG,
        // no response, as from a SIGSTOPped process.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(s);
        });
        let hung = Arc::new(AtomicUsize::new(0));
        let flag = hung.clone();
        let (mut sender, task) = connect(addr, move || {
            flag.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        let err = tokio::time::timeout(Duration::from_secs(5), sender.send(post(Body::empty())))
            .await
            .expect("the stream did not fail when the PING went unanswered");
        let Err(err) = err else {
            panic!("a hung peer answered");
        };
        assert_eq!(
            hung.load(Ordering::SeqCst),
            1,
            "the stream failed before the peer was marked hung"
        );
        assert!(
            matches!(
                err,
                SendError::Failed {
                    connection: true,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(matches!(task.await.unwrap(), Ended::Hung));
        assert!(sender.is_closed());
        // The next request is refused unsent: it may go anywhere.
        match sender.send(post(Body::full("again"))).await {
            Err(SendError::Unsent { request, .. }) => assert_eq!(request.uri().path(), "/echo"),
            Err(other) => panic!("expected the request back unsent, got {other:?}"),
            Ok(res) => panic!("expected the request back unsent, got {}", res.status()),
        }
    }
}
