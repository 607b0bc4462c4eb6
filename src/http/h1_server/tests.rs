//! The lean loop behind a real listener (`server::serve`), driven by raw
//! client sockets so that every byte on the wire is checked.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::Limits;
use crate::http::Body;

fn limits() -> Limits {
    Limits {
        max_header_bytes: 8192,
        max_headers: 100,
        header_read_timeout: Duration::from_millis(300),
        max_connections: 64,
        max_concurrent_streams: 16,
        idle_connection_timeout: Duration::from_secs(60),
    }
}

/// What the handler answers, chosen by the request's path.
async fn handler(req: Request<Body>, _remote: SocketAddr) -> Response<Body> {
    let (parts, body) = req.into_parts();
    match parts.uri.path() {
        // Echo: method, target and `x-a`, plus the body's length.
        "/echo" | "/" => {
            let n = body
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            let a = parts
                .headers
                .get("x-a")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let text = format!("{} {} a={a} body={n}", parts.method, parts.uri);
            Response::new(Body::full(text))
        }
        // A streaming body without a length: chunked, with trailers.
        "/stream" => {
            let frames: Vec<Result<Frame<Bytes>, crate::http::body::BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"hello "))),
                Ok(Frame::data(Bytes::new())),
                Ok(Frame::data(Bytes::from_static(b"world"))),
                Ok(Frame::trailers({
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    t
                })),
            ];
            let stream = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            Response::new(Body::boxed(stream))
        }
        // A streaming body that fails half way.
        "/broken" => {
            let frames: Vec<Result<Frame<Bytes>, crate::http::body::BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"part"))),
                Err("upstream reset".into()),
            ];
            let stream = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            Response::new(Body::boxed(stream))
        }
        "/head" => Response::builder()
            .header("content-length", "5")
            .body(Body::full("hello"))
            .unwrap(),
        "/close" => Response::builder()
            .header("connection", "close")
            .body(Body::full("bye"))
            .unwrap(),
        _ => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Body::empty())
            .unwrap(),
    }
}

/// A listener serving `handler`; the sender drains it.
async fn listener() -> (SocketAddr, watch::Sender<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(crate::http::server::serve(
        l,
        "test",
        limits(),
        handler,
        rx,
        Duration::from_secs(1),
        None,
    ));
    (addr, tx)
}

/// One response off `s`: head and body, read by its framing. Returns the
/// head as text and the body (chunked bodies decoded; trailers appended
/// after a `|`).
async fn response(s: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, pending).await;
    };
    let head = String::from_utf8(pending.drain(..head_end).collect()).unwrap();
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if head.starts_with("HTTP/1.1 204") || head.starts_with("HTTP/1.1 304") {
        return (head, String::new());
    }
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse::<usize>().unwrap())
    {
        while pending.len() < len {
            fill(s, pending).await;
        }
        body.extend(pending.drain(..len));
    } else {
        assert!(
            lower.contains("transfer-encoding: chunked"),
            "no framing: {head}"
        );
        loop {
            let line_end = loop {
                if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, pending).await;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&pending[..line_end]).unwrap(), 16)
                    .unwrap();
            pending.drain(..line_end + 2);
            if size == 0 {
                // Trailers up to the empty line.
                let end = loop {
                    if pending.starts_with(b"\r\n") {
                        break 0;
                    }
                    if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 2;
                    }
                    fill(s, pending).await;
                };
                if end > 0 {
                    body.push(b'|');
                    body.extend(pending.drain(..end - 2));
                }
                pending.drain(..2);
                break;
            }
            while pending.len() < size + 2 {
                fill(s, pending).await;
            }
            body.extend(pending.drain(..size));
            assert_eq!(pending.drain(..2).collect::<Vec<_>>(), b"\r\n");
        }
    }
    (head, String::from_utf8(body).unwrap())
}

async fn fill(s: &mut TcpStream, pending: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
        .await
        .expect("response within 5 s")
        .unwrap();
    assert!(
        n > 0,
        "connection closed early; have {:?}",
        String::from_utf8_lossy(pending)
    );
    pending.extend_from_slice(&chunk[..n]);
}

/// Reads until the peer closes; panics if it does not within 5 s.
async fn closed(s: &mut TcpStream) {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("connection closed within 5 s")
        .ok();
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /echo?x=1 HTTP/1.1\r\nHost: a\r\nX-A: one\r\n\r\nDELETE /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let (head, body) = response(&mut s, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.to_ascii_lowercase().contains("\r\ndate: "), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(body, "GET /echo?x=1 a=one body=0");
    let (_, body) = response(&mut s, &mut pending).await;
    assert_eq!(body, "DELETE /echo a=- body=0");
    // Still open for a third.
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = response(&mut s, &mut pending).await;
    assert_eq!(body, "GET /echo a=- body=0");
}

#[tokio::test]
async fn a_head_split_across_reads_is_served() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    for part in [&b"GET /ec"[..], b"ho HTTP/1.1\r\nHo", b"st: a\r\n", b"\r\n"] {
        s.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, body) = response(&mut s, &mut Vec::new()).await;
    assert_eq!(body, "GET /echo a=- body=0");
}

#[tokio::test]
async fn a_request_with_a_body_hands_the_connection_to_hyper() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut pending = Vec::new();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /echo HTTP/1.1\r\nHost: a\r\nX-A: after\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = response(&mut s, &mut pending).await;
    assert_eq!(body, "GET /echo a=- body=0");
    let (_, body) = response(&mut s, &mut pending).await;
    assert_eq!(body, "POST /echo a=- body=3");
    let (_, body) = response(&mut s, &mut pending).await;
    assert_eq!(body, "GET /echo a=after body=0");
}

#[tokio::test]
async fn a_streaming_body_is_chunked_with_its_trailers() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut pending = Vec::new();
    s.write_all(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = response(&mut s, &mut pending).await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    // The empty data frame did not end the body early.
    assert_eq!(body, "hello world|grpc-status: 0");
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = response(&mut s, &mut pending).await;
    assert_eq!(body, "GET /echo a=- body=0");
}

#[tokio::test]
async fn a_body_that_fails_closes_the_connection_without_a_last_chunk() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /broken HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("closed within 5 s")
        .unwrap();
    let text = String::from_utf8(all).unwrap();
    assert!(text.contains("4\r\npart\r\n"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a failed body must not look complete: {text}"
    );
}

#[tokio::test]
async fn head_responses_keep_their_length_and_send_no_body() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\nGET /nothing HTTP/1.1\r\nHost: a\r\n\r\nGET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    // Read the HEAD response's head only: it announces 5 bytes it does not send.
    let end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(&mut s, &mut pending).await;
    };
    let head = String::from_utf8(pending.drain(..end).collect()).unwrap();
    assert!(head.contains("content-length: 5\r\n"), "{head}");
    let (head, body) = response(&mut s, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 204 No Content"), "{head}");
    assert!(
        !head.contains("content-length") && !head.contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body, "");
    let (_, body) = response(&mut s, &mut pending).await;
    assert_eq!(body, "GET /echo a=- body=0");
}

#[tokio::test]
async fn connection_close_from_either_side_closes_after_the_response() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = response(&mut s, &mut Vec::new()).await;
    assert!(head.contains("connection: close\r\n"), "{head}");
    closed(&mut s).await;

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = response(&mut s, &mut Vec::new()).await;
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert_eq!(body, "bye");
    closed(&mut s).await;
}

#[tokio::test]
async fn an_incomplete_head_times_out() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A first request, so only the head timeout (300 ms) can close it.
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    response(&mut s, &mut Vec::new()).await;
    let started = std::time::Instant::now();
    s.write_all(b"GET /echo HTTP/1.1\r\nHo").await.unwrap();
    closed(&mut s).await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the timeout"
    );
}

#[tokio::test]
async fn a_repeated_host_is_refused_by_the_smuggling_check() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = response(&mut s, &mut Vec::new()).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    closed(&mut s).await;
}

#[tokio::test]
async fn a_repeated_content_length_is_refused_even_when_both_are_zero() {
    let (addr, _drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = response(&mut s, &mut Vec::new()).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    closed(&mut s).await;
}

#[tokio::test]
async fn the_http2_preface_goes_to_hyper() {
    let (addr, _drain) = listener().await;
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://a/echo").body(Body::empty()).unwrap();
    let res = send.send_request(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"GET http://a/echo a=- body=0");
}

#[tokio::test]
async fn a_drain_closes_an_idle_connection() {
    let (addr, drain) = listener().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    response(&mut s, &mut Vec::new()).await;
    drain.send_replace(true);
    closed(&mut s).await;
}
