//! The peer pool against a real loopback server that speaks HTTP/1.1 and
//! HTTP/2 (as a peer sidecar's inbound listener does).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::*;
use crate::outbound::h1_pool::{self, MAX_CONNS, MAX_LEAN_CONNS};

const CONNECT: Duration = Duration::from_secs(2);

/// A server that counts the connections it accepts (the second value) and
/// the `/hang` requests it received and will never answer (the third).
async fn server_counting_hangs() -> (Arc<str>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: Arc<str> = listener.local_addr().unwrap().to_string().into();
    let accepted = Arc::new(AtomicUsize::new(0));
    let hanging = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let hangs = hanging.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let hangs = hangs.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let hangs = hangs.clone();
                    async move {
                        if req.uri().path() == "/hang" {
                            hangs.fetch_add(1, Ordering::SeqCst);
                            std::future::pending::<()>().await;
                        }
                        let version = format!("{:?}", req.version());
                        Ok::<_, Infallible>(Response::new(Body::from(version)))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepted, hanging)
}

async fn server() -> (Arc<str>, Arc<AtomicUsize>) {
    let (addr, accepted, _) = server_counting_hangs().await;
    (addr, accepted)
}

/// Poll `cond` until it holds, for at most 2 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 2 s: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn pool(addr: Arc<str>, expiry: Duration) -> PeerPool {
    let settings = PoolSettings {
        h1_idle_expiry: expiry,
        ..PoolSettings::default()
    };
    PeerPool::new(addr, Arc::new(settings))
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header(http::header::HOST, "b")
        .body(Body::empty())
        .unwrap()
}

/// Send one request on `sender` and read the response body whole.
async fn send(sender: &mut H1Sender, path: &str) -> String {
    let res = sender.send_request(get(path)).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The sender of a route that must use HTTP/1.1.
async fn h1_sender(pool: &PeerPool) -> (H1Sender, &'static str) {
    match pool.h1_route(false) {
        H1Route::Idle(s) => (s, "idle"),
        H1Route::Dial(slot) => (pool.dial_h1(slot, CONNECT).await.unwrap(), "dial"),
        H1Route::NeedH2 => panic!("HTTP/1.1 refused with a live HTTP/2 connection"),
        H1Route::Lean(_) => panic!("a lean connection for a request that asked for none"),
    }
}

/// A lean connection for a bodiless GET, and how it was had.
async fn lean_conn(pool: &PeerPool) -> (local_h1::Conn, &'static str) {
    match pool.h1_route(true) {
        H1Route::Lean(c) => (c, "idle"),
        H1Route::Dial(slot) => (pool.dial_lean(slot, CONNECT).await.unwrap(), "dial"),
        H1Route::NeedH2 => panic!("HTTP/1.1 refused with a live HTTP/2 connection"),
        H1Route::Idle(_) => panic!("a hyper connection for a lean request"),
    }
}

/// One bodiless GET over a lean connection, the body read whole.
async fn send_lean(pool: &PeerPool, conn: local_h1::Conn, path: &str) -> String {
    let parts = get(path).into_parts().0;
    let res = pool.h1_pool().exchange_lean(conn, &parts).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn http1_needs_a_live_http2_connection_first() {
    let (addr, accepted) = server().await;
    let pool = pool(addr, DEFAULT_IDLE_EXPIRY);
    assert!(matches!(pool.h1_route(false), H1Route::NeedH2));
    pool.get(CONNECT).await.unwrap();
    let (mut s, how) = h1_sender(&pool).await;
    assert_eq!(how, "dial");
    assert_eq!(send(&mut s, "/").await, "HTTP/1.1");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one HTTP/2, one HTTP/1.1"
    );
}

#[tokio::test]
async fn sequential_requests_reuse_one_http1_connection() {
    let (addr, accepted) = server().await;
    let pool = pool(addr, DEFAULT_IDLE_EXPIRY);
    pool.get(CONNECT).await.unwrap();
    let mut hows = Vec::new();
    for _ in 0..5 {
        let (mut s, how) = h1_sender(&pool).await;
        assert_eq!(send(&mut s, "/").await, "HTTP/1.1");
        // What the load guard does when the response body ends; the
        // connection's task may need a turn before it takes another request.
        pool.put_h1(s);
        tokio::task::yield_now().await;
        hows.push(how);
    }
    assert_eq!(hows, ["dial", "idle", "idle", "idle", "idle"]);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn past_the_cap_requests_go_over_http2() {
    let (addr, _) = server().await;
    let pool = pool(addr, DEFAULT_IDLE_EXPIRY);
    pool.get(CONNECT).await.unwrap();
    let mut busy = Vec::new();
    for _ in 0..MAX_CONNS {
        busy.push(h1_sender(&pool).await.0);
    }
    assert!(matches!(pool.h1_route(false), H1Route::NeedH2));
    // A connection that closes gives its place back.
    drop(busy.pop());
    eventually("a place under the cap is free again", || {
        matches!(pool.h1_route(false), H1Route::Dial(_))
    })
    .await;
}

#[tokio::test]
async fn idle_connections_expire_instead_of_being_reused() {
    let (addr, accepted) = server().await;
    let pool = pool(addr, Duration::ZERO);
    pool.get(CONNECT).await.unwrap();
    let (mut s, _) = h1_sender(&pool).await;
    send(&mut s, "/").await;
    pool.put_h1(s);
    tokio::task::yield_now().await;
    let (mut s, how) = h1_sender(&pool).await;
    assert_eq!(how, "dial", "an expired connection was reused");
    send(&mut s, "/").await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert_eq!(pool.idle_h1(), 0);
}

/// Once the request `in_flight` has reached the server (and hangs there), do
/// what the HTTP/2 connection's task does when a PING goes unanswered, and
/// return what the request ended with.
async fn close_all_once_it_hangs<T>(
    pool: &PeerPool,
    hanging: &AtomicUsize,
    in_flight: tokio::task::JoinHandle<T>,
) -> T {
    eventually("the request reached the server", || {
        hanging.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(!in_flight.is_finished());
    pool.h1.close_all();
    tokio::time::timeout(Duration::from_secs(2), in_flight)
        .await
        .expect("the request still hangs after close_all")
        .unwrap()
}

#[tokio::test]
async fn a_hung_peer_fails_the_requests_in_flight_on_http1() {
    let (addr, _, hanging) = server_counting_hangs().await;
    let pool = pool(addr, DEFAULT_IDLE_EXPIRY);
    pool.get(CONNECT).await.unwrap();
    let (mut s, _) = h1_sender(&pool).await;
    let in_flight = tokio::spawn(async move { s.send_request(get("/hang")).await });
    let res = close_all_once_it_hangs(&pool, &hanging, in_flight).await;
    assert!(res.is_err(), "a request on a closed connection answered");
    assert!(
        matches!(pool.h1_route(false), H1Route::Dial(_)),
        "nothing idle is kept"
    );
}

#[tokio::test]
async fn lean_connections_are_reused_and_have_a_cap_of_their_own() {
    let (addr, accepted) = server().await;
    let pool = pool(addr, DEFAULT_IDLE_EXPIRY);
    pool.get(CONNECT).await.unwrap();
    let mut hows = Vec::new();
    for _ in 0..4 {
        let (conn, how) = lean_conn(&pool).await;
        assert_eq!(send_lean(&pool, conn, "/").await, "HTTP/1.1");
        hows.push(how);
    }
    assert_eq!(hows, ["dial", "idle", "idle", "idle"]);
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one HTTP/2, one lean");
    // Busy lean connections fill their own cap, and leave hyper's free:
    // requests with bodies still get HTTP/1.1.
    let mut busy = Vec::new();
    for _ in 0..MAX_LEAN_CONNS {
        busy.push(lean_conn(&pool).await.0);
    }
    eventually("every lean connection was accepted", || {
        accepted.load(Ordering::SeqCst) == 1 + MAX_LEAN_CONNS
    })
    .await;
    assert!(matches!(pool.h1_route(true), H1Route::NeedH2));
    assert!(matches!(pool.h1_route(false), H1Route::Dial(_)));
    drop(busy.pop());
    assert!(matches!(pool.h1_route(true), H1Route::Dial(_)));
}

#[tokio::test]
async fn idle_lean_connections_expire() {
    let (addr, accepted) = server().await;
    let pool = pool(addr, Duration::ZERO);
    pool.get(CONNECT).await.unwrap();
    let (conn, _) = lean_conn(&pool).await;
    send_lean(&pool, conn, "/").await;
    let (conn, how) = lean_conn(&pool).await;
    assert_eq!(how, "dial", "an expired lean connection was reused");
    send_lean(&pool, conn, "/").await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_hung_peer_fails_lean_requests_in_flight() {
    let (addr, _, hanging) = server_counting_hangs().await;
    let pool = Arc::new(pool(addr, DEFAULT_IDLE_EXPIRY));
    pool.get(CONNECT).await.unwrap();
    // One lean connection left idle, one carrying a request that hangs.
    let (idle, _) = lean_conn(&pool).await;
    let (busy, _) = lean_conn(&pool).await;
    send_lean(&pool, idle, "/").await;
    let p = pool.clone();
    let in_flight = tokio::spawn(async move {
        let parts = get("/hang").into_parts().0;
        p.h1_pool().exchange_lean(busy, &parts).await.map(|_| ())
    });
    let res = close_all_once_it_hangs(&pool, &hanging, in_flight).await;
    assert!(
        matches!(res, Err(h1_pool::LeanError::Failed(_))),
        "a request to a hung peer answered: {res:?}"
    );
    assert!(
        matches!(pool.h1_route(true), H1Route::Dial(_)),
        "an idle lean connection survived close_all"
    );
}
