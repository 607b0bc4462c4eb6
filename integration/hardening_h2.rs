//! HTTP/2 floods against the sidecar's listeners (h2c, prior knowledge):
//! rapid reset, CONTINUATION flood, empty DATA frames, and more concurrent
//! streams than allowed. Each must end in GOAWAY or refused streams, cost
//! the sidecar bounded CPU time and memory, and leave it serving others.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;

use crate::support::client;
use crate::support::guarded_mesh::{GuardedMesh, MeshOptions};
use crate::support::procfs::{self, ProcStats};
use crate::support::raw::{self, frame, kind, H2Conn, END_HEADERS, END_STREAM};
use crate::support::{exclusive, Sidecar};

/// CPU time a sidecar may burn on one flood. Generous for a loaded 2-core
/// machine; an unbounded flood (the attacker keeps the connection) costs
/// far more, because each loop below runs tens of thousands of iterations.
const FLOOD_CPU: Duration = Duration::from_millis(1500);
/// RSS growth a flood may cause.
const FLOOD_RSS: u64 = 24 << 20;

fn mesh() -> MeshOptions {
    MeshOptions {
        services: vec!["b".into()],
        common: "[limits]\nmax_concurrent_streams = 16\n".into(),
        ..MeshOptions::default()
    }
}

/// Asserts `sidecar` used bounded CPU and memory since `before`, and still
/// serves a clean h2c request on `addr`.
async fn assert_bounded_and_serving(
    what: &str,
    sidecar: &Sidecar,
    before: ProcStats,
    addr: SocketAddr,
) {
    let after = procfs::stats(sidecar.pid());
    let cpu = after.cpu.saturating_sub(before.cpu);
    let rss = after.rss_bytes.saturating_sub(before.rss_bytes);
    println!(
        "{what}: sidecar CPU {cpu:?}, RSS {:.1} -> {:.1} MiB, fds {} -> {}",
        before.rss_mib(),
        after.rss_mib(),
        before.open_fds,
        after.open_fds
    );
    assert!(
        cpu <= FLOOD_CPU,
        "{what}: the sidecar burned {cpu:?} of CPU"
    );
    assert!(rss <= FLOOD_RSS, "{what}: RSS grew by {} KiB", rss >> 10);
    let res = client::request_h2(addr, client::get("http://b/after-flood")).await;
    assert_eq!(res.status(), 200, "{what}: a clean client after the flood");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_in_goaway() {
    let _timing = exclusive().await;
    let mesh = GuardedMesh::start(mesh()).await;
    for (name, addr, sidecar) in [
        ("outbound", mesh.outbound(), &mesh.a),
        ("inbound", mesh.peer("b").inbound(), &mesh.peer("b").sidecar),
    ] {
        let before = procfs::stats(sidecar.pid());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = h2::client::handshake(KeepReading(tcp)).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut opened = 0u32;
        for _ in 0..50_000 {
            send = match send.ready().await {
                Ok(s) => s,
                Err(_) => break,
            };
            let req = Request::post("http://b/rapid-reset").body(()).unwrap();
            match send.send_request(req, false) {
                Ok((_res, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    opened += 1;
                }
                Err(_) => break,
            }
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection ends")
            .expect("connection task");
        let err = ended.expect_err("the server ends the connection with an error");
        println!("rapid reset on {name}: {opened} streams opened and reset, then {err}");
        assert!(err.is_go_away(), "{name}: expected GOAWAY, got {err}");
        assert_eq!(
            err.reason(),
            Some(h2::Reason::ENHANCE_YOUR_CALM),
            "{name}: {err}"
        );
        assert!(opened < 50_000, "{name}: the flood ran to completion");
        assert_bounded_and_serving(&format!("rapid reset on {name}"), sidecar, before, addr).await;
    }
    assert!(
        mesh.peer("b").svc.count() < 1000,
        "most reset streams must never reach the service ({})",
        mesh.peer("b").svc.count()
    );
}

/// The attacker's TCP stream: once the server has closed, writes are
/// dropped instead of failing, so the h2 client goes on to read the GOAWAY
/// the server sent before closing (otherwise a write error can win the race
/// and hide it).
struct KeepReading(tokio::net::TcpStream);

impl tokio::io::AsyncRead for KeepReading {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

fn peer_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

impl tokio::io::AsyncWrite for KeepReading {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.get_mut().0).poll_write(cx, buf) {
            Poll::Ready(Err(e)) if peer_gone(&e) => Poll::Ready(Ok(buf.len())),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.get_mut().0).poll_flush(cx) {
            Poll::Ready(Err(e)) if peer_gone(&e) => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.get_mut().0).poll_shutdown(cx) {
            Poll::Ready(Err(e)) if peer_gone(&e) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

/// Sends `frames` while reading what the server sends back, until it
/// closes; returns the frames received.
async fn flood(
    addr: SocketAddr,
    first: Vec<u8>,
    each: Vec<u8>,
    count: usize,
) -> (Vec<raw::Frame>, usize) {
    let mut conn = H2Conn::connect(addr).await;
    let reader = tokio::spawn(async move {
        let frames = raw::read_frames(&mut conn.rx, Duration::from_secs(5)).await;
        frames
    });
    let mut tx = conn.tx;
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if tx
            .write_all(&frame(kind::SETTINGS, raw::ACK, 0, &[]))
            .await
            .is_err()
            || tx.write_all(&first).await.is_err()
        {
            return 0;
        }
        // Batch frames per write, as a real attacker does.
        let batch: Vec<u8> = each.iter().copied().cycle().take(each.len() * 64).collect();
        let mut sent = 0;
        while sent < count {
            if tx.write_all(&batch).await.is_err() {
                break;
            }
            sent += 64;
        }
        sent
    });
    let frames = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the server closes the flooding connection")
        .expect("reader task");
    let sent = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(count);
    (frames, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_ends_in_goaway() {
    let _timing = exclusive().await;
    let mesh = GuardedMesh::start(mesh()).await;
    for (name, addr, sidecar) in [
        ("outbound", mesh.outbound(), &mesh.a),
        ("inbound", mesh.peer("b").inbound(), &mesh.peer("b").sidecar),
    ] {
        for (variant, payload) in [
            ("empty", Vec::new()),
            (
                "8 KiB of fields",
                raw::hpack_field("x-flood", &[b'a'; 8 * 1024]),
            ),
        ] {
            let before = procfs::stats(sidecar.pid());
            let block = raw::request_block("GET", "b", "/continuation-flood");
            // HEADERS without END_HEADERS, then CONTINUATION frames that never end it.
            let first = frame(kind::HEADERS, END_STREAM, 1, &block);
            let each = frame(kind::CONTINUATION, 0, 1, &payload);
            let (frames, sent) = flood(addr, first, each, 100_000).await;
            let code = raw::goaway(&frames);
            println!(
                "CONTINUATION flood ({variant}) on {name}: {sent} frames sent, GOAWAY {code:?}"
            );
            assert!(
                code.is_some(),
                "{name} ({variant}): no GOAWAY, frames {frames:?}"
            );
            assert!(
                !frames.iter().any(|f| f.kind == kind::HEADERS),
                "{name} ({variant}): the endless header block was answered"
            );
            assert_bounded_and_serving(
                &format!("CONTINUATION flood ({variant}) on {name}"),
                sidecar,
                before,
                addr,
            )
            .await;
        }
    }
    assert!(!mesh.peer("b").svc.raw_contains(b"continuation-flood"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_frame_flood_ends_in_goaway() {
    let _timing = exclusive().await;
    let mesh = GuardedMesh::start(mesh()).await;
    for (name, addr, sidecar) in [
        ("outbound", mesh.outbound(), &mesh.a),
        ("inbound", mesh.peer("b").inbound(), &mesh.peer("b").sidecar),
    ] {
        let before = procfs::stats(sidecar.pid());
        let block = raw::request_block("POST", "b", "/empty-data");
        let first = frame(kind::HEADERS, END_HEADERS, 1, &block);
        let each = frame(kind::DATA, 0, 1, &[]);
        let (frames, sent) = flood(addr, first, each, 200_000).await;
        let code = raw::goaway(&frames);
        println!("empty DATA flood on {name}: {sent} frames sent, GOAWAY {code:?}");
        assert_eq!(
            code,
            Some(raw::ENHANCE_YOUR_CALM),
            "{name}: frames {frames:?}"
        );
        assert_bounded_and_serving(
            &format!("empty DATA flood on {name}"),
            sidecar,
            before,
            addr,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused_then_the_connection_goes_away() {
    let _timing = exclusive().await;
    let mesh = GuardedMesh::start(mesh()).await;
    // Slow answers keep the first streams open while the rest arrive.
    mesh.peer("b").svc.set_delay(Duration::from_millis(1500));
    for (name, addr, sidecar) in [
        ("outbound", mesh.outbound(), &mesh.a),
        ("inbound", mesh.peer("b").inbound(), &mesh.peer("b").sidecar),
    ] {
        let before = procfs::stats(sidecar.pid());
        let mut conn = H2Conn::connect(addr).await;
        let block = raw::request_block("GET", "b", "/many-streams");
        let mut burst = Vec::new();
        for i in 0..64u32 {
            burst.extend(frame(
                kind::HEADERS,
                END_HEADERS | END_STREAM,
                2 * i + 1,
                &block,
            ));
        }
        assert!(conn.send(&frame(kind::SETTINGS, raw::ACK, 0, &[])).await);
        assert!(conn.send(&burst).await);
        let frames = raw::read_frames(&mut conn.rx, Duration::from_secs(4)).await;
        let refused = frames
            .iter()
            .filter(|f| f.kind == kind::RST_STREAM && f.error_code() == Some(raw::REFUSED_STREAM))
            .count();
        let answered = frames.iter().filter(|f| f.kind == kind::HEADERS).count();
        println!("64 streams on {name} (limit 16): {refused} refused, {answered} answered");
        assert!(
            refused >= 64 - 16,
            "{name}: only {refused} refused; frames {frames:?}"
        );
        assert!((1..=16).contains(&answered), "{name}: {answered} answered");

        // A client that keeps opening streams past the limit is told to go away.
        let mut conn = H2Conn::connect(addr).await;
        assert!(conn.send(&frame(kind::SETTINGS, raw::ACK, 0, &[])).await);
        let mut all = Vec::new();
        for i in 0..5_000u32 {
            all.extend(frame(kind::HEADERS, END_HEADERS, 2 * i + 1, &block));
        }
        let mut rx = conn.rx;
        let reader =
            tokio::spawn(async move { raw::read_frames(&mut rx, Duration::from_secs(5)).await });
        let _ = tokio::io::AsyncWriteExt::write_all(&mut conn.tx, &all).await;
        let frames = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the server closes the connection")
            .expect("reader task");
        let code = raw::goaway(&frames);
        println!("5000 streams on {name}: GOAWAY {code:?}");
        assert_eq!(code, Some(raw::ENHANCE_YOUR_CALM), "{name}");
        assert_bounded_and_serving(&format!("stream flood on {name}"), sidecar, before, addr).await;
    }
    // The h2 header list is capped at the configured 60 KiB (≤ 64 KiB): a
    // bigger one is answered 431 without reaching the service.
    let big = "v".repeat(61 * 1024);
    let res = client::try_request_h2(
        mesh.outbound(),
        Request::get("http://b/h2-big-header")
            .header("x-big", big)
            .body(client::empty())
            .unwrap(),
    )
    .await;
    let res = res.expect("a 61 KiB h2 header list is answered, not dropped");
    assert_eq!(res.status(), 431);
    assert!(!mesh.peer("b").svc.raw_contains(b"h2-big-header"));
}
