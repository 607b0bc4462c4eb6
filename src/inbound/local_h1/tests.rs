use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::*;
use crate::inbound::test_server::{closed_port, read_request_head, server};

fn parts(method: Method, target: &str) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = target.parse().unwrap();
    req.headers_mut()
        .insert(http::header::HOST, HeaderValue::from_static("svc"));
    req.into_parts().0
}

fn get() -> Parts {
    parts(Method::GET, "/")
}

/// A service that answers every request on every connection with `reply`.
async fn replying(reply: &'static [u8]) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    server(move |mut stream, _| async move {
        while read_request_head(&mut stream).await.is_some() {
            if stream.write_all(reply).await.is_err() {
                return;
            }
        }
    })
    .await
}

async fn collect(res: Response<Body>) -> Result<(Bytes, Option<HeaderMap>), String> {
    let collected = res.into_body().collect().await.map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned();
    Ok((collected.to_bytes(), trailers))
}

fn local_upstream_message(result: Result<Response<Body>, ProxyError>) -> String {
    match result {
        Err(ProxyError::LocalUpstream { message, .. }) => message,
        other => panic!("expected a LocalUpstream error, got {other:?}"),
    }
}

#[test]
fn only_bodiless_idempotent_requests_fit() {
    assert!(fits(&get(), true));
    assert!(fits(&parts(Method::DELETE, "/x"), true));
    assert!(
        !fits(&get(), false),
        "a request body must stream through hyper's client"
    );
    assert!(
        !fits(&parts(Method::POST, "/"), true),
        "a POST cannot be resent"
    );
    assert!(!fits(&parts(Method::PATCH, "/"), true));
}

#[tokio::test]
async fn the_request_head_is_written_as_given() {
    let (seen_tx, seen_rx) = oneshot::channel();
    let seen_tx = Arc::new(Mutex::new(Some(seen_tx)));
    let (addr, _) = server(move |mut stream, _| {
        let seen_tx = seen_tx.clone();
        async move {
            let head = read_request_head(&mut stream).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            if let Some(tx) = seen_tx.lock().unwrap().take() {
                let _ = tx.send(head);
            }
        }
    })
    .await;
    let mut p = parts(Method::GET, "/path?q=1&r=%20");
    p.headers.append("x-list", HeaderValue::from_static("a"));
    p.headers.append("x-list", HeaderValue::from_static("b"));
    let res = LocalH1::new(addr).send(&p).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        String::from_utf8(seen_rx.await.unwrap()).unwrap(),
        "GET /path?q=1&r=%20 HTTP/1.1\r\nhost: svc\r\nx-list: a\r\nx-list: b\r\n\r\n"
    );
}

#[tokio::test]
async fn small_responses_come_whole_and_one_connection_serves_them_all() {
    let (addr, accepted) =
        replying(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-served: yes\r\n\r\nok").await;
    let client = LocalH1::new(addr);
    for _ in 0..20 {
        let res = client.send(&get()).await.unwrap();
        assert_eq!(res.headers()["x-served"], "yes");
        assert_eq!(res.headers()[CONTENT_LENGTH], "2");
        assert_eq!(collect(res).await.unwrap().0, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(client.idle.len(), 1);
}

#[tokio::test]
async fn a_chunked_body_streams_with_its_trailers_and_the_connection_is_reused() {
    let (release, gate) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some(gate)));
    let (addr, accepted) = server(move |mut stream, _| {
        let gate = gate.lock().unwrap().take();
        async move {
            read_request_head(&mut stream).await.unwrap();
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n",
                )
                .await
                .unwrap();
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            stream
                .write_all(b"2\r\nde\r\n0\r\nx-checksum: 7\r\n\r\n")
                .await
                .unwrap();
            // A second exchange on the same connection.
            read_request_head(&mut stream).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            let _ = read_request_head(&mut stream).await;
        }
    })
    .await;
    let client = LocalH1::new(addr);
    let res = client.send(&get()).await.unwrap();
    let mut body = res.into_body();
    // The first chunk arrives while the service still holds the rest.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "abc");
    assert_eq!(
        client.idle.len(),
        0,
        "pooled while its body was still streaming"
    );
    release.send(()).unwrap();
    let rest = body.collect().await.unwrap();
    assert_eq!(rest.trailers().unwrap()["x-checksum"], "7");
    assert_eq!(rest.to_bytes(), "de");
    assert_eq!(client.idle.len(), 1);
    let (data, _) = collect(client.send(&get()).await.unwrap()).await.unwrap();
    assert_eq!(data, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_without_length_runs_until_close_and_the_connection_is_not_reused() {
    let (addr, accepted) = server(|mut stream, _| async move {
        read_request_head(&mut stream).await.unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\n\r\nhello, ")
            .await
            .unwrap();
        stream.write_all(b"world").await.unwrap();
    })
    .await;
    let client = LocalH1::new(addr);
    for _ in 0..2 {
        let (data, _) = collect(client.send(&get()).await.unwrap()).await.unwrap();
        assert_eq!(data, "hello, world");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(client.idle.len(), 0);
}

#[tokio::test]
async fn head_204_and_304_responses_have_no_body_whatever_their_length_says() {
    let (addr, accepted) = server(|mut stream, _| async move {
        while let Some(head) = read_request_head(&mut stream).await {
            let reply: &[u8] = if head.starts_with(b"HEAD") {
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
            } else if head.starts_with(b"GET /204") {
                b"HTTP/1.1 204 No Content\r\n\r\n"
            } else if head.starts_with(b"GET /304") {
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            };
            stream.write_all(reply).await.unwrap();
        }
    })
    .await;
    let client = LocalH1::new(addr);
    // A client that waited for these bodies would wait forever.
    let bodiless = |res: Response<Body>| async move {
        tokio::time::timeout(std::time::Duration::from_secs(10), collect(res))
            .await
            .expect("waited for a body that a bodiless response does not have")
            .unwrap()
            .0
    };
    let res = client.send(&parts(Method::HEAD, "/")).await.unwrap();
    assert_eq!(res.headers()[CONTENT_LENGTH], "5", "HEAD keeps its length");
    assert_eq!(bodiless(res).await, "");
    for (target, status) in [("/204", 204), ("/304", 304)] {
        let res = client.send(&parts(Method::GET, target)).await.unwrap();
        assert_eq!(res.status(), status);
        assert_eq!(bodiless(res).await, "");
    }
    // Had any of them waited for a body, this would read its bytes.
    let (data, _) = collect(client.send(&get()).await.unwrap()).await.unwrap();
    assert_eq!(data, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let (addr, _) = replying(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let res = LocalH1::new(addr).send(&get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(!res.headers().contains_key("link"));
    assert_eq!(collect(res).await.unwrap().0, "ok");
}

#[tokio::test]
async fn connections_the_service_closes_after_each_response_never_fail_a_request() {
    // One exchange per connection, then close, without saying so: the
    // pooled connection is found closed, or the request is sent again.
    let (addr, accepted) = server(|mut stream, _| async move {
        if read_request_head(&mut stream).await.is_some() {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
        }
    })
    .await;
    let client = LocalH1::new(addr);
    for _ in 0..5 {
        let (data, _) = collect(client.send(&get()).await.unwrap()).await.unwrap();
        assert_eq!(data, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_connection_that_closes_before_answering_a_fresh_request_is_an_error() {
    let (addr, accepted) = server(|mut stream, _| async move {
        let _ = read_request_head(&mut stream).await;
    })
    .await;
    let message = local_upstream_message(LocalH1::new(addr).send(&get()).await);
    assert!(
        message.contains("closed before the response head"),
        "{message}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a fresh connection is not retried"
    );
}

#[tokio::test]
async fn protocol_errors_name_their_cause() {
    let long_head: &'static [u8] = Box::leak(
        [
            b"HTTP/1.1 200 OK\r\nx-big: ".as_slice(),
            &[b'a'; MAX_HEAD_BYTES],
            b"\r\n\r\n",
        ]
        .concat()
        .into_boxed_slice(),
    );
    let cases: [(&'static [u8], &str); 6] = [
        (b"garbage\r\n\r\n", "invalid response head"),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            "conflicting content-length",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "invalid content-length",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            "101 Switching Protocols",
        ),
        (
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "transfer-encoding in an HTTP/1.0 response",
        ),
        (long_head, "larger than"),
    ];
    for (reply, why) in cases {
        let (addr, _) = replying(reply).await;
        let message = local_upstream_message(LocalH1::new(addr).send(&get()).await);
        assert!(message.contains(why), "{message:?} should say {why:?}");
    }
}

#[tokio::test]
async fn a_body_cut_short_fails_and_a_bad_chunk_fails() {
    for (reply, why) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"[..],
            "before the body ended",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "invalid chunk size",
        ),
    ] {
        let (addr, _) = server(move |mut stream, _| async move {
            read_request_head(&mut stream).await.unwrap();
            stream.write_all(reply).await.unwrap();
        })
        .await;
        let res = LocalH1::new(addr).send(&get()).await.unwrap();
        let err = collect(res).await.unwrap_err();
        assert!(err.contains(why), "{err:?} should say {why:?}");
    }
}

#[tokio::test]
async fn a_response_with_both_framings_follows_chunked_and_is_not_reused() {
    let (addr, accepted) = replying(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    )
    .await;
    let client = LocalH1::new(addr);
    for _ in 0..2 {
        let res = client.send(&get()).await.unwrap();
        assert!(!res.headers().contains_key(CONTENT_LENGTH));
        assert_eq!(collect(res).await.unwrap().0, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_service_that_is_not_listening_is_a_connect_error() {
    let addr = closed_port();
    match LocalH1::new(addr.clone()).send(&get()).await {
        Err(ProxyError::LocalConnect { address, .. }) => assert_eq!(address, addr),
        other => panic!("expected LocalConnect, got {other:?}"),
    }
}

#[tokio::test]
async fn a_head_with_more_fields_than_the_stack_holds_keeps_them_all() {
    let mut reply = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
    for i in 0..3 * INLINE_SPANS {
        reply.push_str(&format!("x-field-{i}: value-{i}\r\n"));
    }
    reply.push_str("\r\nok");
    let (addr, _) = replying(Box::leak(reply.into_bytes().into_boxed_slice())).await;
    let res = LocalH1::new(addr).send(&get()).await.unwrap();
    assert_eq!(res.headers().len(), 1 + 3 * INLINE_SPANS);
    for i in 0..3 * INLINE_SPANS {
        assert_eq!(
            res.headers()[format!("x-field-{i}").as_str()],
            format!("value-{i}").as_str()
        );
    }
    assert_eq!(collect(res).await.unwrap().0, "ok");
}

#[tokio::test]
async fn a_pooled_connection_that_closes_instead_of_answering_is_retried_on_a_new_one() {
    // The first connection answers once, then closes on the next request
    // unanswered: what a keep-alive timeout racing a request looks like.
    let (addr, accepted) = server(|mut stream, n| async move {
        let mut answered = 0;
        while read_request_head(&mut stream).await.is_some() {
            if n == 0 && answered == 1 {
                return;
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            answered += 1;
        }
    })
    .await;
    let client = LocalH1::new(addr);
    for _ in 0..2 {
        let (data, _) = collect(client.send(&get()).await.unwrap()).await.unwrap();
        assert_eq!(data, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
