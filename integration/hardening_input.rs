//! Hardening against bad input: request smuggling, malformed requests,
//! slowloris and spoofed mesh headers, over raw sockets against the real
//! sidecar, with an upstream that records every byte that reached it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::client::{self, empty};
use crate::support::guarded_mesh::{GuardedMesh, MeshOptions};
use crate::support::procfs::{self, PeakSampler};
use crate::support::raw::{self, exchange};
use crate::support::recording;
use crate::support::{exclusive, shared, wait_until, LoadGen};

/// How long a raw exchange waits for the sidecar to answer and close.
const EXCHANGE_WAIT: Duration = Duration::from_secs(5);

fn mesh_b(common: &str) -> MeshOptions {
    MeshOptions {
        services: vec!["b".into()],
        common: common.into(),
        ..MeshOptions::default()
    }
}

/// Smuggling vectors: each is refused with 400 and a close, and no byte of
/// it reaches the service. `{P}` is the request's unique path and `{M}` a
/// marker inside the body (or smuggled request). Obfuscated
/// `Transfer-Encoding` spellings are paired with a `Content-Length`, which
/// is how they are used: to hide the chunked framing from one parser.
const SMUGGLING: &[(&str, &str)] = &[
    (
        "CL.TE",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{M}",
    ),
    (
        "TE.CL",
        "POST {P} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n8\r\n{M}\r\n0\r\n\r\n",
    ),
    (
        "duplicate Content-Length",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 8\r\nContent-Length: 8\r\n\r\n{M}",
    ),
    (
        "conflicting Content-Length",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 8\r\nContent-Length: 3\r\n\r\n{M}",
    ),
    (
        "Content-Length list",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 8, 8\r\n\r\n{M}",
    ),
    (
        "Content-Length with sign",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: +8\r\n\r\n{M}",
    ),
    (
        "TE chunked, identity",
        "POST {P} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked, identity\r\n\r\n8\r\n{M}\r\n0\r\n\r\n",
    ),
    (
        "TE gzip, chunked",
        "POST {P} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: gzip, chunked\r\n\r\n8\r\n{M}\r\n0\r\n\r\n",
    ),
    (
        "TE xchunked",
        "POST {P} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: xchunked\r\n\r\n8\r\n{M}\r\n0\r\n\r\n",
    ),
    (
        "TE twice",
        "POST {P} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n8\r\n{M}\r\n0\r\n\r\n",
    ),
    (
        "TE twice, chunked last",
        "POST {P} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{M}\r\n0\r\n\r\n",
    ),
    (
        "TE ' chunked' with CL",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 13\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\n{M}",
    ),
    (
        "TE tab-separated with CL",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 13\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n{M}",
    ),
    (
        "TE tab before colon",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 13\r\nTransfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n{M}",
    ),
    (
        "TE space before colon",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 13\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{M}",
    ),
    (
        "TE line starting with a space",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 13\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{M}",
    ),
    (
        "obs-fold",
        "POST {P} HTTP/1.1\r\nHost: b\r\nContent-Length: 13\r\nX-Folded: a\r\n\tTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{M}",
    ),
    (
        "obs-fold of TE value",
        "POST {P} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: identity\r\n chunked\r\n\r\n8\r\n{M}\r\n0\r\n\r\n",
    ),
    (
        "TE in HTTP/1.0",
        "POST {P} HTTP/1.0\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{M}\r\n0\r\n\r\n",
    ),
    (
        "CL.TE in another case",
        "POST {P} HTTP/1.1\r\nhost: b\r\ncontent-length: 13\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n0\r\n\r\n{M}",
    ),
    (
        "two Host fields",
        "GET {P} HTTP/1.1\r\nHost: b\r\nHost: evil\r\n\r\n",
    ),
];

async fn assert_smuggling_refused(
    mesh: &GuardedMesh,
    listener: &str,
    addr: SocketAddr,
    round: usize,
) {
    let svc = &mesh.peer("b").svc;
    for (i, (name, template)) in SMUGGLING.iter().enumerate() {
        let path = format!("/smuggle-{round}-{i}");
        let marker = format!("SMUG{round:02}{i:02}");
        let request = template.replace("{P}", &path).replace("{M}", &marker);
        let ex = exchange(addr, request.as_bytes(), EXCHANGE_WAIT).await;
        let head = String::from_utf8_lossy(&ex.response);
        assert_eq!(
            ex.status,
            Some(400),
            "{listener}: {name}: expected 400, got {head:?}"
        );
        assert!(ex.closed, "{listener}: {name}: connection left open");
        // Also a well-framed request pipelined behind it must not pass.
        let pipelined = format!("{request}GET {path}-next HTTP/1.1\r\nHost: b\r\n\r\n");
        let ex = exchange(addr, pipelined.as_bytes(), EXCHANGE_WAIT).await;
        assert_eq!(ex.status, Some(400), "{listener}: {name} (pipelined)");
        assert!(ex.closed, "{listener}: {name} (pipelined): left open");
        assert!(
            !svc.raw_contains(path.as_bytes()) && !svc.raw_contains(marker.as_bytes()),
            "{listener}: {name}: bytes of the refused request reached the service"
        );
        assert!(
            svc.requests().iter().all(|r| !r.uri.contains(&path)),
            "{listener}: {name}: the service parsed the refused request"
        );
    }
    // The same listener still relays a clean request.
    let ok =
        "POST /clean HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let ex = exchange(addr, ok.as_bytes(), EXCHANGE_WAIT).await;
    assert_eq!(
        ex.status,
        Some(200),
        "{listener}: a clean request after the vectors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_vectors_get_400_a_close_and_never_reach_the_service() {
    let _shared = shared().await;
    let mesh = GuardedMesh::start(MeshOptions {
        ingress: true,
        ..mesh_b("")
    })
    .await;
    let b = mesh.peer("b");
    assert_smuggling_refused(&mesh, "outbound", mesh.outbound(), 0).await;
    assert_smuggling_refused(&mesh, "inbound", b.inbound(), 1).await;
    let ingress = b.ingress.expect("b has an ingress listener");
    assert_smuggling_refused(&mesh, "ingress", ingress, 2).await;
    // Clean chunked and fixed-length requests on one keep-alive connection
    // still pass, and a smuggling attempt behind them is caught.
    let keepalive = "POST /k1 HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
POST /k2 HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\n\r\nhello\
POST /k3 HTTP/1.1\r\nHost: b\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGKEEP";
    let ex = exchange(mesh.outbound(), keepalive.as_bytes(), EXCHANGE_WAIT).await;
    let text = String::from_utf8_lossy(&ex.response);
    assert!(ex.closed);
    assert_eq!(text.matches("HTTP/1.1 400").count(), 1, "{text}");
    assert!(!mesh.peer("b").svc.raw_contains(b"SMUGKEEP"));
    assert!(!mesh.peer("b").svc.raw_contains(b"/k3"));
    // A refusal is logged with its reason.
    wait_until("the refusal is logged", Duration::from_secs(5), || async {
        mesh.a.log().contains("ambiguous request framing")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_methods_names_and_uris_get_4xx_and_the_sidecar_keeps_serving() {
    let _shared = shared().await;
    let mesh = GuardedMesh::start(mesh_b("")).await;
    let long_path = format!("/m-long-{}", "a".repeat(100 * 1024));
    // (name, request, only on the outbound listener). Authority checks are
    // the outbound listener's routing: the inbound one relays to its local
    // service whatever the authority, like a web server ignoring `Host`.
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "method with @",
            b"G@T /m1-x HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            false,
        ),
        (
            "method with NUL",
            b"GE\0T /m2-x HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            false,
        ),
        (
            "empty method",
            b" /m3-x HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            false,
        ),
        (
            "method with a slash",
            b"GET/ /m4-x HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            false,
        ),
        (
            "space in a field name",
            b"GET /m5-x HTTP/1.1\r\nHost: b\r\nX Bad: v\r\n\r\n".to_vec(),
            false,
        ),
        (
            "control byte in a field name",
            b"GET /m6-x HTTP/1.1\r\nHost: b\r\nX-B\x01d: v\r\n\r\n".to_vec(),
            false,
        ),
        (
            "empty field name",
            b"GET /m7-x HTTP/1.1\r\nHost: b\r\n: v\r\n\r\n".to_vec(),
            false,
        ),
        (
            "NUL in a field value",
            b"GET /m8-x HTTP/1.1\r\nHost: b\r\nX-V: a\0b\r\n\r\n".to_vec(),
            false,
        ),
        (
            "100 KiB path",
            format!("GET {long_path} HTTP/1.1\r\nHost: b\r\n\r\n").into_bytes(),
            false,
        ),
        (
            "non-UTF-8 path",
            b"GET /m9-x\xff\xfe HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            false,
        ),
        (
            "unknown version",
            b"GET /m10-x HTTP/9.9\r\nHost: b\r\n\r\n".to_vec(),
            false,
        ),
        (
            "binary garbage",
            vec![
                0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, b'\r', b'\n', b'\r', b'\n',
            ],
            false,
        ),
        (
            "empty authority",
            b"GET http:///m11-x HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            true,
        ),
        (
            "garbage authority",
            b"GET http://%zz%/m12-x HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            true,
        ),
        (
            "two ports",
            b"GET http://b:80:80/m13-x HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            true,
        ),
        (
            "unclosed IPv6 authority",
            b"GET http://[::1/m14-x HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
            true,
        ),
        (
            "garbage Host",
            b"GET /m15-x HTTP/1.1\r\nHost: ../../etc\r\n\r\n".to_vec(),
            true,
        ),
        ("no Host", b"GET /m16-x HTTP/1.1\r\n\r\n".to_vec(), true),
    ];
    for addr in [mesh.outbound(), mesh.peer("b").inbound()] {
        for (name, bytes, outbound_only) in &cases {
            if *outbound_only && addr != mesh.outbound() {
                continue;
            }
            let ex = exchange(addr, bytes, EXCHANGE_WAIT).await;
            let status = ex.status.unwrap_or(0);
            assert!(
                (400..500).contains(&status),
                "{name} on {addr}: expected 4xx, got {:?}",
                String::from_utf8_lossy(&ex.response[..ex.response.len().min(200)])
            );
        }
        // The listener still serves the next client.
        let res = client::get_with_host(addr, "b", "/after-garbage").await;
        assert_eq!(res.status(), 200, "a clean request on {addr}");
    }
    let svc = &mesh.peer("b").svc;
    let reached: Vec<String> = svc
        .requests()
        .into_iter()
        .map(|r| r.uri)
        .filter(|u| u.contains("/m"))
        .collect();
    assert!(
        reached.is_empty(),
        "malformed requests reached the service: {reached:?}"
    );
    assert!(
        !svc.raw_contains(b"/m-long-"),
        "the 100 KiB path reached the service"
    );
    wait_until(
        "malformed requests are logged",
        Duration::from_secs(5),
        || async {
            mesh.a
                .log()
                .contains("closed client connection: malformed request")
        },
    )
    .await;
}

/// How a slowloris client misbehaves.
#[derive(Debug, Clone, Copy)]
enum Slow {
    /// An HTTP/1 head, one byte at a time, never finished.
    Head,
    /// The HTTP/2 preface, one byte at a time.
    Preface,
    /// Connects and sends nothing.
    Silent,
}

/// Dribbles one byte every `every` until the server closes; returns how
/// long the connection lived, or `None` if it was still open after `give_up`.
async fn slow_client(
    addr: SocketAddr,
    how: Slow,
    every: Duration,
    give_up: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.ok()?;
    let payload: &[u8] = match how {
        Slow::Head => {
            b"GET / HTTP/1.1\r\nHost: b\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        }
        Slow::Preface => raw::PREFACE,
        Slow::Silent => b"",
    };
    let mut sent = 0;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(every, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => {}
        }
        if start.elapsed() > give_up {
            return None;
        }
        if sent < payload.len() {
            if s.write_all(&payload[sent..sent + 1]).await.is_err() {
                return Some(start.elapsed());
            }
            sent += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_close_at_the_header_timeout_without_hurting_others() {
    let _timing = exclusive().await;
    const TIMEOUT: Duration = Duration::from_secs(3);
    let mesh = GuardedMesh::start(mesh_b("[limits]\nheader_read_timeout = \"3s\"\n")).await;
    let out = mesh.outbound();
    let pid = mesh.a.pid();
    let baseline = LoadGen::new(out)
        .rate(50)
        .duration(Duration::from_secs(3))
        .run()
        .await;
    assert_eq!(baseline.failures(), 0, "baseline: {baseline}");
    let fds_before = procfs::stats(pid).open_fds;

    let sampler = PeakSampler::start(vec![pid], Duration::from_millis(50));
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..200 {
        let how = match i % 8 {
            0 => Slow::Silent,
            1 => Slow::Preface,
            _ => Slow::Head,
        };
        attackers.spawn(async move {
            (
                how,
                slow_client(out, how, Duration::from_secs(1), Duration::from_secs(20)).await,
            )
        });
    }
    let during = LoadGen::new(out)
        .rate(50)
        .duration(Duration::from_secs(6))
        .run()
        .await;
    let mut lived = Vec::new();
    while let Some(r) = attackers.join_next().await {
        let (how, life) = r.expect("attacker task");
        let life =
            life.unwrap_or_else(|| panic!("a {how:?} slowloris connection was never closed"));
        lived.push((how, life));
    }
    let peak = sampler.stop().await[0];
    let longest = lived.iter().map(|(_, l)| *l).max().unwrap_or_default();
    let shortest = lived.iter().map(|(_, l)| *l).min().unwrap_or_default();
    println!(
        "slowloris: 200 connections lived {shortest:?}..{longest:?} (timeout {TIMEOUT:?}); \
         A's fds {fds_before} before, peak {}; baseline {baseline}; during {during}",
        peak.open_fds
    );
    assert!(
        shortest >= TIMEOUT - Duration::from_millis(500),
        "a slow connection was closed before the timeout: {lived:?}"
    );
    assert!(
        longest <= TIMEOUT + Duration::from_secs(3),
        "slow connections outlived the header timeout: {lived:?}"
    );
    assert!(
        peak.open_fds <= fds_before + 200 + 30,
        "open fds peaked at {} (from {fds_before})",
        peak.open_fds
    );
    wait_until(
        "A's fds return to the baseline",
        Duration::from_secs(5),
        || async { procfs::stats(pid).open_fds <= fds_before + 10 },
    )
    .await;
    assert_eq!(during.failures(), 0, "well-behaved client failed: {during}");
    let bound = baseline.p99() * 4 + Duration::from_millis(150);
    assert!(
        during.p99() <= bound,
        "well-behaved p99 {:?} during the attack vs {:?} before (bound {bound:?})",
        during.p99(),
        baseline.p99()
    );
    let log = mesh.a.log();
    assert!(
        log.contains("request head not received in time"),
        "timeouts are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_forwarding_and_mesh_headers_from_outside_are_dropped_at_ingress() {
    let _shared = shared().await;
    let mesh = GuardedMesh::start(MeshOptions {
        services: vec!["b".into()],
        ingress: true,
        ..MeshOptions::default()
    })
    .await;
    let b = mesh.peer("b");
    let ingress = b.ingress.expect("b has an ingress listener");
    let spoof = |req: http::request::Builder| {
        req.header("x-forwarded-for", "203.0.113.66")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-outrigger-caller", "admin")
            .header("X-Outrigger-Error", "none")
            .header("x-outrigger-orig-proto", "HTTP/1.1")
            .header("x-outrigger-anything", "1")
            .body(empty())
            .expect("valid request")
    };
    let res = client::request(ingress, spoof(Request::get("http://b/ingress-h1"))).await;
    assert_eq!(res.status(), 200);
    let res = client::request_h2(ingress, spoof(Request::get("http://b/ingress-h2"))).await;
    assert_eq!(res.status(), 200);
    for path in ["/ingress-h1", "/ingress-h2"] {
        let seen = b
            .svc
            .requests()
            .into_iter()
            .find(|r| r.uri.ends_with(path))
            .unwrap_or_else(|| panic!("{path} did not reach the service"));
        let mesh_headers: Vec<_> = seen
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-outrigger-"))
            .collect();
        assert!(
            mesh_headers.is_empty(),
            "{path}: spoofed mesh headers passed: {mesh_headers:?}"
        );
        assert_eq!(
            seen.all("x-forwarded-for"),
            ["127.0.0.1"],
            "{path}: x-forwarded-for is the client's address only"
        );
    }
    // From the local service, the chain is trusted and appended to, and the
    // caller identity is the sidecar's own, whatever the service claimed.
    let res = client::request(
        mesh.outbound(),
        spoof(Request::get("http://b/outbound-spoof")),
    )
    .await;
    assert_eq!(res.status(), 200);
    let seen = b
        .svc
        .requests()
        .into_iter()
        .find(|r| r.uri.ends_with("/outbound-spoof"))
        .expect("outbound request reached b");
    assert_eq!(seen.all("x-outrigger-caller"), ["a"]);
    assert_eq!(
        seen.all("x-forwarded-for").join(", "),
        "203.0.113.66, 10.0.0.1, 127.0.0.1"
    );
}

/// The idle-connection timeout the idle tests configure.
const IDLE: Duration = Duration::from_secs(1);

fn mesh_idle() -> MeshOptions {
    MeshOptions {
        ingress: true,
        ..mesh_b("[limits]\nidle_connection_timeout = \"1s\"\n")
    }
}

/// Reads one HTTP/1 response to a recording upstream's JSON route (head,
/// then a body ending in `}`); panics on EOF or after [`EXCHANGE_WAIT`].
async fn read_json_response(s: &mut TcpStream, what: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + EXCHANGE_WAIT;
    loop {
        let text = String::from_utf8_lossy(&got);
        if text.contains("\r\n\r\n") && text.ends_with('}') {
            return text.into_owned();
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("{what}: no complete response ({other:?}): {text:?}"),
        }
    }
}

/// How long after now `s` is closed by the server (EOF or reset); panics if
/// it sends anything or is still open after `give_up`.
async fn closed_after(s: &mut TcpStream, give_up: Duration, what: &str) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    match tokio::time::timeout(give_up, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => start.elapsed(),
        Ok(Ok(n)) => panic!(
            "{what}: unexpected bytes on an idle connection: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("{what}: idle connection still open after {give_up:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_keepalive_connections_close_after_the_idle_timeout() {
    let _shared = shared().await;
    let mesh = GuardedMesh::start(mesh_idle()).await;
    let b = mesh.peer("b");
    let ingress = b.ingress.expect("b has an ingress listener");
    for (listener, addr) in [
        ("outbound", mesh.outbound()),
        ("inbound", b.inbound()),
        ("ingress", ingress),
    ] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /idle-h1-1 HTTP/1.1\r\nHost: b\r\n\r\n")
            .await
            .expect("write");
        let res = read_json_response(&mut s, listener).await;
        assert!(res.starts_with("HTTP/1.1 200"), "{listener}: {res}");
        // A request within the timeout is served on the same connection,
        // and restarts the clock.
        tokio::time::sleep(IDLE * 7 / 10).await;
        s.write_all(b"GET /idle-h1-2 HTTP/1.1\r\nHost: b\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{listener}: closed before the timeout: {e}"));
        let res = read_json_response(&mut s, listener).await;
        assert!(res.starts_with("HTTP/1.1 200"), "{listener}: {res}");
        let lived = closed_after(&mut s, IDLE + Duration::from_secs(4), listener).await;
        println!("{listener}: idle HTTP/1.1 connection closed after {lived:?}");
        assert!(
            lived >= IDLE - Duration::from_millis(200),
            "{listener}: closed {lived:?} after the last response, before the idle timeout"
        );
    }
}

/// Answers `frame` as a client must (SETTINGS and PING acks); `true` once
/// the server has closed.
async fn h2_client_reply(conn: &mut raw::H2Conn, f: &raw::Frame) -> bool {
    if f.kind == raw::kind::SETTINGS && f.flags & raw::ACK == 0 {
        return !conn
            .send(&raw::frame(raw::kind::SETTINGS, raw::ACK, 0, &[]))
            .await;
    }
    if f.kind == raw::kind::PING && f.flags & raw::ACK == 0 {
        return !conn
            .send(&raw::frame(raw::kind::PING, raw::ACK, 0, &f.payload))
            .await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2c_connections_get_goaway_even_while_pings_flow() {
    let _shared = shared().await;
    let mesh = GuardedMesh::start(mesh_idle()).await;
    let b = mesh.peer("b");
    let ingress = b.ingress.expect("b has an ingress listener");
    for (listener, addr) in [
        ("outbound", mesh.outbound()),
        ("inbound", b.inbound()),
        ("ingress", ingress),
    ] {
        let mut conn = raw::H2Conn::connect(addr).await;
        let block = raw::request_block("GET", "b", "/idle-h2");
        assert!(
            conn.send(&raw::frame(
                raw::kind::HEADERS,
                raw::END_HEADERS | raw::END_STREAM,
                1,
                &block
            ))
            .await
        );
        // The response, to its END_STREAM.
        loop {
            let f = raw::read_frame(&mut conn.rx, EXCHANGE_WAIT)
                .await
                .unwrap_or_else(|| panic!("{listener}: no complete h2 response"));
            assert!(!h2_client_reply(&mut conn, &f).await, "{listener}: closed");
            assert_ne!(f.kind, raw::kind::GOAWAY, "{listener}: early GOAWAY");
            if f.stream == 1 && f.flags & raw::END_STREAM != 0 {
                break;
            }
        }
        // Idle, but never silent: a PING every 200 ms, each answered.
        let start = Instant::now();
        let mut pongs = 0;
        let mut goaway = None;
        let mut next_ping = start;
        let lived = loop {
            if start.elapsed() > IDLE + Duration::from_secs(4) {
                panic!(
                    "{listener}: idle h2c connection open after {:?}",
                    start.elapsed()
                );
            }
            if goaway.is_none() && Instant::now() >= next_ping {
                next_ping += Duration::from_millis(200);
                let ping = raw::frame(raw::kind::PING, 0, 0, b"idletest");
                if !conn.send(&ping).await {
                    break start.elapsed();
                }
            }
            match raw::read_frame(&mut conn.rx, Duration::from_millis(50)).await {
                Some(f) => {
                    if f.kind == raw::kind::PING && f.flags & raw::ACK != 0 {
                        pongs += 1;
                    }
                    if f.kind == raw::kind::GOAWAY && goaway.is_none() {
                        goaway = Some((start.elapsed(), f.error_code()));
                    }
                    if h2_client_reply(&mut conn, &f).await {
                        break start.elapsed();
                    }
                }
                // EOF, or just a quiet 50 ms: tell them apart by peeking.
                None => {
                    let mut probe = [0u8; 1];
                    match tokio::time::timeout(Duration::from_millis(1), conn.rx.peek(&mut probe))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break start.elapsed(),
                        _ => {}
                    }
                }
            }
        };
        let (goaway_at, code) =
            goaway.unwrap_or_else(|| panic!("{listener}: closed without GOAWAY"));
        println!(
            "{listener}: idle h2c connection got GOAWAY after {goaway_at:?}, \
             closed after {lived:?}, {pongs} PINGs answered"
        );
        assert_eq!(code, Some(0), "{listener}: GOAWAY is NO_ERROR");
        assert!(pongs >= 3, "{listener}: only {pongs} PINGs answered");
        assert!(
            goaway_at >= IDLE - Duration::from_millis(200),
            "{listener}: GOAWAY {goaway_at:?} after the response, before the idle timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_streaming_longer_than_the_idle_timeout_is_delivered_whole() {
    let _shared = shared().await;
    let mesh = GuardedMesh::start(mesh_idle()).await;
    let ingress = mesh.peer("b").ingress.expect("b has an ingress listener");
    // 11 chunks 300 ms apart: 3 s of streaming, the client's and the
    // sidecar-to-sidecar connection idle in between every chunk.
    const CHUNKS: u64 = 11;
    let expected: String = (0..CHUNKS).map(recording::drip_chunk).collect();
    let uri = format!("http://b/drip?chunks={CHUNKS}&every_ms=300");
    for (listener, addr) in [("outbound", mesh.outbound()), ("ingress", ingress)] {
        let start = Instant::now();
        let res = client::request(addr, client::get(&uri)).await;
        assert_eq!(res.status(), 200, "{listener} HTTP/1.1");
        assert_eq!(
            String::from_utf8_lossy(res.body()),
            expected,
            "{listener} HTTP/1.1"
        );
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "not streamed slowly"
        );
        let res = client::request_h2(addr, client::get(&uri)).await;
        assert_eq!(res.status(), 200, "{listener} h2c");
        assert_eq!(
            String::from_utf8_lossy(res.body()),
            expected,
            "{listener} h2c"
        );
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; `None` if the
/// connection closed (or nothing came within `wait`) before it was complete.
async fn read_response(s: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&got).into_owned());
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// The header read timeout runs from a head's first byte, not from the
/// previous response: a keep-alive connection may stay quiet between
/// requests for longer than the timeout (only `idle_connection_timeout`
/// closes it, so a caller's pooled connection is not closed under a request
/// it is sending), while a head that has started must still finish in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_outlive_the_header_timeout_but_slow_heads_do_not() {
    let _timing = exclusive().await;
    const TIMEOUT: Duration = Duration::from_secs(2);
    let mesh = GuardedMesh::start(mesh_b(
        "[limits]\nheader_read_timeout = \"2s\"\nidle_connection_timeout = \"60s\"\n",
    ))
    .await;
    let out = mesh.outbound();
    let mut s = TcpStream::connect(out).await.expect("connect to A");
    async fn get_ok(s: &mut TcpStream, which: &str) {
        s.write_all(b"GET /keepalive HTTP/1.1\r\nHost: b\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{which} request: {e}"));
        let res = read_response(s, Duration::from_secs(5)).await;
        assert!(
            res.as_deref()
                .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
            "{which} response: {res:?}"
        );
    }
    get_ok(&mut s, "first").await;

    // Quiet for 1.5 × the timeout: the connection must stay open.
    let mut buf = [0u8; 64];
    let quiet = tokio::time::timeout(TIMEOUT * 3 / 2, s.read(&mut buf)).await;
    assert!(
        quiet.is_err(),
        "the keep-alive connection was closed (or sent bytes) while quiet: {quiet:?}"
    );
    get_ok(&mut s, "second (same connection, after a quiet spell)").await;

    // A third head, started and never finished: closed at the timeout.
    let started = Instant::now();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: b\r\nX-Slow: a")
        .await
        .expect("partial head");
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => break None,
        }
    };
    let lived = closed.expect("a connection with an unfinished head was never closed");
    assert!(
        lived >= TIMEOUT - Duration::from_millis(200) && lived <= TIMEOUT + Duration::from_secs(2),
        "the unfinished head's connection lived {lived:?} (timeout {TIMEOUT:?})"
    );
    assert!(
        mesh.a.log().contains("request head not received in time"),
        "the timeout is logged"
    );
}
