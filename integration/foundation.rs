//! Foundation: the data path through two real sidecars on the static
//! registry (A-outbound → B-inbound → B), the admin API, config errors and
//! graceful shutdown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;

use crate::support::client::{self, full, get};
use crate::support::mesh::{static_entry, StaticPair};
use crate::support::{wait_until, Sidecar, Upstream};

fn header<'a>(res: &'a http::Response<Bytes>, name: &str) -> Option<&'a str> {
    res.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_bodies_cross_two_hops() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let out = mesh.outbound();
    let res = client::get_with_host(out, "b", "/hello?x=1").await;
    assert_eq!(res.status(), 200);
    let body = client::json(&res);
    assert_eq!(body["name"], "b1");
    assert_eq!(body["path"], "/hello");

    for size in [0usize, 1024 * 1024] {
        let req = Request::post("http://b/upload")
            .body(full(vec![b'x'; size]))
            .unwrap();
        let res = client::request(out, req).await;
        assert_eq!(res.status(), 200, "POST {size} bytes");
        assert_eq!(client::json(&res)["body_len"], size as u64);
        assert_eq!(mesh.svc_b.last_request().unwrap().body_len, size as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_stream_is_relayed_without_buffering() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let (mut tx, body) = client::channel_body();
    let req = Request::post("http://b/echo").body(body).unwrap();
    let c = client::dial_client(mesh.outbound());
    tx.send_data(Bytes::from_static(b"first-chunk\n"))
        .await
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .expect("response headers before the body ends")
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk echoed while the request is still open")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first-chunk\n");
    // Keep streaming for a few seconds, then finish; every chunk comes back.
    let mut expected = Vec::new();
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let chunk = format!("chunk-{i}\n");
        expected.extend_from_slice(chunk.as_bytes());
        tx.send_data(Bytes::from(chunk)).await.unwrap();
    }
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from(expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_response_arrives_chunk_by_chunk() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let c = client::dial_client(mesh.outbound());
    let res = c
        .request(get("http://b/stream?chunks=5&interval_ms=300"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(first.into_data().unwrap(), "chunk-0\n");
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(rest.ends_with(b"chunk-4\n"));
    assert!(
        first_at < Duration::from_millis(900),
        "first chunk took {first_at:?}: the response was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_absolute_form_and_host_forms_route() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let out = mesh.outbound();
    let res = client::get_via_proxy(out, "http://b/via-proxy").await;
    assert_eq!(res.status(), 200);
    assert_eq!(client::json(&res)["name"], "b1");
    // The upstream sees origin-form and the caller's Host.
    let seen = mesh.svc_b.last_request().unwrap();
    assert_eq!(seen.uri, "/via-proxy");
    assert_eq!(seen.header("host"), Some("b"));
    for host in ["b:80", "b.mesh", "B.mesh:8080"] {
        let res = client::get_with_host(out, host, "/").await;
        assert_eq!(res.status(), 200, "Host: {host}");
    }
    // A pooled HTTP_PROXY-style client, as curl/requests use it.
    let proxy = client::proxy_client(out);
    for _ in 0..3 {
        let res = proxy.request(get("http://b/pooled")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_and_grpc_style_trailers() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let out = mesh.outbound();
    let res = client::request_h2(out, get("http://b/h2")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        client::json(&res)["version"],
        "HTTP/2.0",
        "h2 caller reaches the service as h2"
    );
    let res = client::request_h2(
        out,
        Request::get("http://b/trailers")
            .header("te", "trailers")
            .body(client::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), 200);
    let trailers = client::trailers(&res).expect("trailers relayed end to end");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-trailer"], "yes");
}

/// A bodiless h2c GET crosses the sidecar link on a lean HTTP/1.1
/// connection, named as HTTP/2, and reaches the service as HTTP/2 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_gets_cross_the_sidecar_link_as_http1_and_reach_the_service_as_h2() {
    let _shared = crate::support::shared().await;
    let (mesh, relay) = StaticPair::start_relayed().await;
    let out = mesh.outbound();
    // HTTP/1.1 to a peer waits until its HTTP/2 connection is live (the
    // link's liveness signal), which the first request opens.
    for path in ["/first", "/lean-1", "/lean-2"] {
        let res = client::request_h2(out, get(&format!("http://b{path}"))).await;
        assert_eq!(res.status(), 200);
        let json = client::json(&res);
        assert_eq!(
            json["version"], "HTTP/2.0",
            "{path} reached the service as h2"
        );
        assert_eq!(json["path"], path);
        // RFC 9113 §8.3.1: the caller's authority as `:authority`, and no
        // Host beside it that names something else (the service's address).
        let seen = mesh.svc_b.last_request().unwrap();
        assert_eq!(seen.uri, format!("http://b{path}"));
        assert_eq!(seen.header("host"), None, "{path}: Host beside :authority");
    }
    assert!(
        relay.sent_contains(b"GET /lean-2 HTTP/1.1\r\n"),
        "the h2c GET went over HTTP/2 between the sidecars"
    );
    assert!(relay.sent_contains(b"x-outrigger-orig-proto: HTTP/2\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_callers_reach_a_service_that_speaks_only_http1() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start_http1_only_b().await;
    let out = mesh.outbound();
    // The first request finds out, on B's first connection to the service,
    // that it does not speak HTTP/2; it carries a body, which must arrive
    // whole over HTTP/1.1 all the same.
    let post = Request::post("http://b/upload")
        .body(full(vec![b'x'; 70_000]))
        .unwrap();
    let res = client::request_h2(out, post).await;
    assert_eq!(res.status(), 200, "{:?}", res.body());
    let json = client::json(&res);
    assert_eq!(json["version"], "HTTP/1.1");
    assert_eq!(json["body_len"], 70_000);
    for path in ["/one", "/two"] {
        let res = client::request_h2(out, get(&format!("http://b{path}"))).await;
        assert_eq!(res.status(), 200);
        assert_eq!(client::json(&res)["version"], "HTTP/1.1");
        let seen = mesh.svc_b.last_request().unwrap();
        assert_eq!((seen.uri.as_str(), seen.header("host")), (path, Some("b")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_trailers_survive_when_asked_for() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let res = client::request(
        mesh.outbound(),
        Request::get("http://b/trailers")
            .header("te", "trailers")
            .body(client::empty())
            .unwrap(),
    )
    .await;
    let trailers = client::trailers(&res).expect("HTTP/1.1 trailers relayed");
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_mesh() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let mut ws = client::ws_connect(mesh.outbound(), "b", "/ws").await;
    for msg in ["hello", "through", "two sidecars"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg))
            .await
            .unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .unwrap()
            .unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_304_and_expect_continue() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let out = mesh.outbound();
    let res = client::request(
        out,
        Request::head("http://b/head-check")
            .body(client::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert!(res.body().is_empty());
    assert!(
        header(&res, "content-length").is_some(),
        "HEAD keeps content-length"
    );
    assert_eq!(client::get_with_host(out, "b", "/204").await.status(), 204);
    assert_eq!(client::get_with_host(out, "b", "/304").await.status(), 304);
    let req = Request::post("http://b/upload")
        .header("expect", "100-continue")
        .body(full(vec![b'y'; 4096]))
        .unwrap();
    let res = client::request(out, req).await;
    assert_eq!(res.status(), 200);
    assert_eq!(client::json(&res)["body_len"], 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_a_fast_503_naming_it() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let started = Instant::now();
    let res = client::get_with_host(mesh.outbound(), "nosuch", "/").await;
    assert!(started.elapsed() < Duration::from_secs(1), "did not hang");
    assert_eq!(res.status(), 503);
    assert!(String::from_utf8_lossy(res.body()).contains("\"nosuch\""));
    assert_eq!(header(&res, "x-outrigger-error"), Some("no-route"));
    let n = mesh.a.metric_value("outrigger_unknown_service_total").await;
    assert_eq!(n, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_502_with_the_failed_stage() {
    let _shared = crate::support::shared().await;
    let mut mesh = StaticPair::start().await;
    // B's local service is down: B answers 502 connect.
    mesh.svc_b.stop().await;
    let res = client::get_with_host(mesh.outbound(), "b", "/").await;
    assert_eq!(res.status(), 502);
    assert_eq!(header(&res, "x-outrigger-error"), Some("connect"));
    // The peer sidecar itself is down: A answers 502 connect.
    let closed = crate::support::free_port();
    mesh.files.write_atomic(
        "endpoints.toml",
        &static_entry(
            "b",
            "b-dead",
            format!("127.0.0.1:{closed}").parse().unwrap(),
        ),
    );
    wait_until(
        "A routes to the dead endpoint",
        Duration::from_secs(5),
        || async {
            let r = mesh.a.routes_json().await;
            r.to_string().contains("b-dead")
        },
    )
    .await;
    let res = client::get_with_host(mesh.outbound(), "b", "/").await;
    assert_eq!(res.status(), 502);
    assert_eq!(header(&res, "x-outrigger-error"), Some("connect"));
    assert!(header(&res, "x-request-id").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_cleaned_and_annotated() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let req = Request::get("http://b/headers")
        .header("connection", "x-private, keep-alive")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-outrigger-caller", "spoofed")
        .body(client::empty())
        .unwrap();
    let res = client::request(mesh.outbound(), req).await;
    assert_eq!(res.status(), 200);
    let seen = mesh.svc_b.last_request().unwrap();
    for gone in ["x-private", "keep-alive", "proxy-connection"] {
        assert_eq!(seen.header(gone), None, "{gone} reached the service");
    }
    assert_eq!(seen.header("te"), Some("trailers"));
    assert_eq!(
        seen.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(seen.header("x-request-id").map(str::len), Some(32));
    assert_eq!(
        seen.header("x-outrigger-caller"),
        Some("a"),
        "set by the caller's sidecar"
    );
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    // An existing request id is kept.
    let req = Request::get("http://b/")
        .header("x-request-id", "abc-123")
        .body(client::empty())
        .unwrap();
    client::request(mesh.outbound(), req).await;
    assert_eq!(
        mesh.svc_b.last_request().unwrap().header("x-request-id"),
        Some("abc-123")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_static_file_reroutes_without_restart() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    let svc_b2 = Upstream::start("b2").await;
    let mut b2_spec = mesh.b_spec.clone();
    b2_spec.instance = "b-2".into();
    b2_spec.service_addr = svc_b2.addr().to_string();
    b2_spec.ports = crate::support::SidecarPorts::new();
    let mut b2 = b2_spec.start();
    b2.wait_ready().await;
    mesh.files.write_in_place(
        "endpoints.toml",
        &static_entry("b", "b-2", b2_spec.ports.inbound_addr()),
    );
    wait_until("requests move to b2", Duration::from_secs(5), || async {
        let res = client::get_with_host(mesh.outbound(), "b", "/").await;
        client::json(&res)["name"] == "b2"
    })
    .await;
    // An invalid edit keeps the last good table.
    mesh.files.write_in_place(
        "endpoints.toml",
        "[[endpoints]]\nservice = \"b\"\naddress = \"nope\"\n",
    );
    wait_until(
        "the bad file is counted",
        Duration::from_secs(5),
        || async {
            mesh.a
                .metric_value("outrigger_registry_malformed_values_total")
                .await
                .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await;
    let res = client::get_with_host(mesh.outbound(), "b", "/").await;
    assert_eq!(client::json(&res)["name"], "b2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_port_listener_forwards_whatever_the_host() {
    let _shared = crate::support::shared().await;
    let port = crate::support::free_port();
    let mesh = StaticPair::start_with(&format!(
        "[[upstreams]]\nname = \"b\"\nlocal_port = {port}\n"
    ))
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let res = client::get_with_host(addr, "anything.example", "/fixed").await;
    assert_eq!(res.status(), 200);
    assert_eq!(client::json(&res)["name"], "b1");
    drop(mesh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_and_routes_cli() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    client::get_with_host(mesh.outbound(), "b", "/").await;
    assert_eq!(mesh.a.admin_get("/live").await.0, 200);
    assert_eq!(mesh.a.admin_get("/ready").await.0, 200);
    let routes = mesh.a.routes_json().await;
    let b = &routes["services"][0];
    assert_eq!(b["name"], "b");
    assert_eq!(b["endpoints"][0]["instance"], "b-1");
    assert_eq!(b["endpoints"][0]["state"], "healthy");
    let metrics = mesh.a.metrics().await;
    for m in [
        "outrigger_requests_total{",
        "outrigger_request_duration_seconds_bucket{",
        "outrigger_endpoints{",
        "outrigger_routing_table_updates_total",
        "outrigger_registry_connected{",
        "outrigger_retries_total",
        "outrigger_ejections_total",
    ] {
        assert!(metrics.contains(m), "metric {m} missing:\n{metrics}");
    }
    assert!(
        metrics
            .contains(r#"outrigger_requests_total{direction="outbound",service="b",code="200"} 1"#),
        "{metrics}"
    );
    let (code, config) = mesh.a.admin_get("/config").await;
    assert_eq!(code, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["service"]["name"], "a");

    let admin = mesh.a_spec.ports.admin_addr().to_string();
    let out = Sidecar::run_cli(&["routes", "--admin", &admin]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SERVICE") && text.contains("b-1") && text.contains("healthy"),
        "{text}"
    );
    let out = Sidecar::run_cli(&["routes", "--admin", &admin, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"][0]["name"], "b");
}

#[test]
fn invalid_config_lists_every_bad_field_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[service]
name = "Not A Name"
address = "nowhere"
weight = 0
[listeners]
outbund = "127.0.0.1:1"
[registry]
kind = "etcd"
ttl = "5x"
[[upstreams]]
name = "c"
timeout = "2x"
"#,
    )
    .unwrap();
    let out = Sidecar::run_cli(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "service.name",
        "service.address",
        "service.weight",
        "listeners.outbund",
        "registry.ttl",
        "upstreams[0].timeout",
    ] {
        assert!(err.contains(field), "{field} not reported:\n{err}");
    }
    // `run` refuses the same file before binding anything.
    let out = Sidecar::run_cli(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_during_sigterm_completes() {
    let _shared = crate::support::shared().await;
    let mut mesh = StaticPair::start().await;
    mesh.svc_b.set_delay(Duration::from_millis(1500));
    let out = mesh.outbound();
    let call = tokio::spawn(async move { client::try_request(out, get("http://b/slow")).await });
    wait_until("the request reaches B", Duration::from_secs(5), || async {
        mesh.svc_b.requests() >= 1
    })
    .await;
    mesh.a.sigterm();
    mesh.b.sigterm();
    let res = call
        .await
        .unwrap()
        .expect("in-flight request completes during the drain");
    assert_eq!(res.status(), StatusCode::OK);
    let status = mesh.a.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status:?}");
    assert!(mesh.b.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_endpoint_turns_ready_off() {
    let _shared = crate::support::shared().await;
    let mut mesh = StaticPair::start().await;
    let (code, _) = mesh.a.admin_post("/drain").await;
    assert_eq!(code, 202);
    let status = mesh.a.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success());
    let _ = Method::GET;
}

/// Send raw bytes, return the status line's code (0 if the connection closed first).
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_blocks_get_431() {
    let _shared = crate::support::shared().await;
    let mesh = StaticPair::start().await;
    for addr in [mesh.outbound(), mesh.b_spec.ports.inbound_addr()] {
        let mut many = String::from("GET / HTTP/1.1\r\nHost: b\r\n");
        for i in 0..101 {
            many.push_str(&format!("x-h{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            raw_status(addr, many.as_bytes()).await,
            431,
            "101 headers on {addr}"
        );
        let big = format!(
            "GET / HTTP/1.1\r\nHost: b\r\nx-big: {}\r\n\r\n",
            "a".repeat(61 * 1024)
        );
        assert_eq!(
            raw_status(addr, big.as_bytes()).await,
            431,
            "61 KiB header block on {addr}"
        );
        let ok = "GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n";
        assert_eq!(
            raw_status(addr, ok.as_bytes()).await,
            200,
            "a normal request on {addr}"
        );
    }
    assert_eq!(
        mesh.svc_b.requests(),
        2,
        "only the normal requests reached the service"
    );
}
