//! The test upstream, exercised with the harness clients over HTTP/1.1,
//! h2c, absolute form, WebSocket and raw TCP.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::client::{
    self, channel_body, collect, get, get_via_proxy, get_with_host, h2c_client, http1_client, json,
    proxy_client, request, request_h2, trailers, ws_connect,
};
use crate::support::{wait_until, RecordedRequest, Upstream};

const FIVE_S: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_route_over_http1_and_h2c() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    let url = format!("http://{}/hello?x=1", up.addr());

    let resp = collect(http1_client().request(get(&url)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = json(&resp);
    assert_eq!(body["name"], "b1");
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/hello");
    assert_eq!(body["version"], "HTTP/1.1");
    assert_eq!(body["headers"]["host"], up.addr().to_string());

    let post = Request::post(&url).body(client::full("12345")).unwrap();
    let resp = collect(h2c_client().request(post).await.unwrap())
        .await
        .unwrap();
    let body = json(&resp);
    assert_eq!(
        (body["version"].as_str(), body["body_len"].as_u64()),
        (Some("HTTP/2.0"), Some(5))
    );

    let recorded: Vec<RecordedRequest> = up.recorded();
    assert_eq!(up.requests(), 2);
    assert_eq!(
        (recorded[0].method.as_str(), recorded[0].uri.as_str()),
        ("GET", "/hello?x=1")
    );
    assert_eq!(
        (recorded[1].version.as_str(), recorded[1].body_len),
        ("HTTP/2.0", 5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_streams_before_the_request_ends() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    for (proto, client) in [("h1", http1_client()), ("h2c", h2c_client())] {
        let (mut tx, body) = channel_body();
        let req = Request::post(format!("http://{}/echo", up.addr()))
            .body(body)
            .unwrap();
        tx.send_data(Bytes::from_static(b"first")).await.unwrap();
        let mut resp = tokio::time::timeout(FIVE_S, client.request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{proto}");
        // The first chunk comes back while the request body is still open.
        let frame = tokio::time::timeout(FIVE_S, resp.body_mut().frame())
            .await
            .expect("first echo chunk");
        let first = frame.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first", "{proto}");
        tx.send_data(Bytes::from_static(b"second")).await.unwrap();
        drop(tx);
        let rest = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(rest, "second", "{proto}");
    }
    wait_until("both echoes recorded", FIVE_S, || async {
        up.requests() == 2
    })
    .await;
    assert!(up.recorded().iter().all(|r| r.body_len == 11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_an_h2c_client() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    let resp = collect(
        h2c_client()
            .request(get(&format!("http://{}/trailers", up.addr())))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(resp.body(), "ok");
    let t = trailers(&resp).expect("trailers");
    assert_eq!(
        (
            t["grpc-status"].to_str().unwrap(),
            t["x-trailer"].to_str().unwrap()
        ),
        ("0", "yes")
    );

    // HTTP/1.1 trailers need a chunked response and `te: trailers`.
    let h1 = Request::get("/trailers")
        .header("te", "trailers")
        .body(client::empty())
        .unwrap();
    let resp = request(up.addr(), h1).await;
    assert_eq!(trailers(&resp).expect("h1 trailers")["x-trailer"], "yes");

    // Request trailers are counted into a response header.
    let (mut tx, body) = channel_body();
    let req = Request::post("/trailers").body(body).unwrap();
    let mut sent = HeaderMap::new();
    sent.insert("a", HeaderValue::from_static("1"));
    sent.insert("b", HeaderValue::from_static("2"));
    tx.send_data(Bytes::from_static(b"x")).await.unwrap();
    tx.send_trailers(sent).await.unwrap();
    drop(tx);
    let resp = request_h2(up.addr(), req).await;
    assert_eq!(resp.headers()["x-request-trailers"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_round_trip() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    let mut ws = ws_connect(up.addr(), "b", "/ws").await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    assert_eq!(
        up.last_request().unwrap().header("upgrade"),
        Some("websocket")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_and_host_header_requests() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    let resp = get_via_proxy(up.addr(), "http://b/path?q=1").await;
    assert_eq!(resp.status(), 200);
    let seen = up.last_request().unwrap();
    assert_eq!(
        (seen.uri.as_str(), seen.header("host")),
        ("http://b/path?q=1", Some("b"))
    );

    let pooled = proxy_client(up.addr());
    for _ in 0..2 {
        let resp = collect(pooled.request(get("http://c:8080/pooled")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(json(&resp)["uri"], "http://c:8080/pooled");
    }

    get_with_host(up.addr(), "b:80", "/by-host").await;
    let seen = up.last_request().unwrap();
    assert_eq!(
        (seen.uri.as_str(), seen.header("host")),
        ("/by-host", Some("b:80"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_delay_and_health_controls() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    up.set_status(503);
    assert_eq!(get_with_host(up.addr(), "b", "/").await.status(), 503);
    assert_eq!(
        get_with_host(up.addr(), "b", "/healthz").await.status(),
        200
    );
    up.set_health(500);
    assert_eq!(
        get_with_host(up.addr(), "b", "/healthz").await.status(),
        500
    );
    assert_eq!((up.requests(), up.health_checks()), (1, 2));

    up.set_status(200);
    up.set_delay(Duration::from_millis(300));
    let start = Instant::now();
    assert_eq!(get_with_host(up.addr(), "b", "/").await.status(), 200);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_routes() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    let resp = get_with_host(up.addr(), "b", "/status/418").await;
    assert_eq!(
        (resp.status().as_u16(), resp.body().as_ref()),
        (418, &b"status 418\n"[..])
    );
    for (path, code) in [("/204", 204), ("/304", 304), ("/status/204", 204)] {
        let resp = get_with_host(up.addr(), "b", path).await;
        assert_eq!(
            (resp.status().as_u16(), resp.body().len()),
            (code, 0),
            "{path}"
        );
    }
    let head = Request::builder()
        .method(Method::HEAD)
        .uri("/head-check")
        .body(client::empty())
        .unwrap();
    let resp = request(up.addr(), head).await;
    assert_eq!(
        (
            resp.headers()["content-length"].to_str().unwrap(),
            resp.body().len()
        ),
        ("11", 0)
    );

    // Chunks 200 ms apart: the first arrives long before the last is sent.
    let url = format!("http://{}/stream?chunks=3&interval_ms=200", up.addr());
    let mut resp = http1_client().request(get(&url)).await.unwrap();
    let (mut body, mut arrivals) = (Vec::new(), Vec::new());
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            body.extend_from_slice(&data);
            arrivals.push(Instant::now());
        }
    }
    assert_eq!(body, b"chunk-0\nchunk-1\nchunk-2\n");
    let spread = arrivals[arrivals.len() - 1] - arrivals[0];
    assert!(
        spread >= Duration::from_millis(150),
        "chunks arrived within {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_honoured() {
    let _shared = crate::support::shared().await;
    let up = Upstream::start("b1").await;
    let mut tcp = TcpStream::connect(up.addr()).await.unwrap();
    let head =
        "POST /upload HTTP/1.1\r\nhost: b\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let interim = read_until(&mut tcp, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    tcp.write_all(b"hello").await.unwrap();
    let response = read_until(&mut tcp, "}").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains(r#""body_len":5"#), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_refuses_connections_and_restart_reuses_the_port() {
    let _shared = crate::support::shared().await;
    let mut up = Upstream::start("b1").await;
    let addr = up.addr();
    let mut ws = ws_connect(addr, "b", "/ws").await;
    get_with_host(addr, "b", "/").await;

    up.stop().await;
    let refused = TcpStream::connect(addr)
        .await
        .expect_err("connect after stop");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let closed = tokio::time::timeout(FIVE_S, ws.next())
        .await
        .expect("WebSocket closed by stop");
    assert!(!matches!(closed, Some(Ok(Message::Text(_)))));

    up.restart().await;
    assert_eq!(up.addr(), addr);
    assert_eq!(json(&get_with_host(addr, "b", "/").await)["name"], "b1");
    assert_eq!(up.requests(), 3, "ws, before stop, after restart");
}

/// Reads from `tcp` until the text read so far contains `end`.
async fn read_until(tcp: &mut TcpStream, end: &str) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&buf).contains(end) {
        let n = tokio::time::timeout(FIVE_S, tcp.read(&mut chunk))
            .await
            .expect("read in time")
            .unwrap();
        assert!(n > 0, "EOF after {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}
