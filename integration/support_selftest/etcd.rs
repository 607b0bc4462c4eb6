//! The etcd fixture: start, etcdctl helpers, compaction, stop/kill and
//! start again on the same data, and the message when etcd is missing.

use std::ffi::OsStr;
use std::path::Path;

use tokio::net::TcpStream;

use crate::support::etcd::{decode_kvs, locate_etcd};
use crate::support::Etcd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_keys_revisions_compaction_and_restarts() {
    let _shared = crate::support::shared().await;
    let mut etcd = Etcd::start().await;
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));

    let before = etcd.revision().await;
    etcd.put("/t/services/b/b-1", r#"{"address":"127.0.0.1:1"}"#)
        .await;
    etcd.put("/t/services/b/b-2", "two").await;
    etcd.put("/other", "x").await;
    assert_eq!(etcd.revision().await, before + 3);
    assert_eq!(
        etcd.get_prefix("/t/").await,
        [
            (
                "/t/services/b/b-1".to_string(),
                r#"{"address":"127.0.0.1:1"}"#.to_string()
            ),
            ("/t/services/b/b-2".to_string(), "two".to_string())
        ]
    );
    assert_eq!(etcd.get("/t/services/b/b-2").await.as_deref(), Some("two"));
    assert_eq!(etcd.del("/t/services/b/b-2").await, 1);
    assert_eq!(etcd.get("/t/services/b/b-2").await, None);

    let compacted = etcd.compact_to_latest().await;
    assert_eq!(compacted, etcd.revision().await);
    assert_eq!(
        etcd.compact_to_latest().await,
        compacted,
        "compacting again is fine"
    );
    let old = etcd
        .try_etcdctl(&["get", "--rev", &before.to_string(), "/t/"])
        .await;
    assert!(old.unwrap_err().contains("compacted"));

    etcd.stop().await;
    assert!(!etcd.is_running());
    assert!(TcpStream::connect(etcd.client_addr()).await.is_err());
    etcd.start_again().await;
    assert_eq!(
        etcd.get_prefix("/t/").await.len(),
        1,
        "data survives a stop"
    );

    etcd.kill();
    etcd.start_again().await;
    assert_eq!(
        etcd.get("/other").await.as_deref(),
        Some("x"),
        "data survives a SIGKILL"
    );
    assert_eq!(
        etcd.log().matches("became leader").count(),
        3,
        "three runs logged"
    );
}

#[test]
fn missing_etcd_gives_install_instructions() {
    let err = locate_etcd(Some(OsStr::new("")), &[]).unwrap_err();
    assert_eq!(
        err,
        "etcd not found: install it with 'apt-get install etcd-server' (Debian) or run .ci/run"
    );
    let nowhere = Path::new("/nonexistent/etcd");
    assert!(locate_etcd(Some(OsStr::new("/nonexistent:/also-not")), &[nowhere]).is_err());
}

#[test]
fn etcd_is_found_in_path_or_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("etcd");
    std::fs::write(&fake, "").unwrap();
    let path = std::env::join_paths(["/nonexistent", dir.path().to_str().unwrap()]).unwrap();
    assert_eq!(locate_etcd(Some(&path), &[]).unwrap(), fake);
    assert_eq!(
        locate_etcd(None, &[Path::new("/nonexistent/etcd"), &fake]).unwrap(),
        fake
    );
}

#[test]
fn etcdctl_json_is_decoded() {
    let out = r#"{"header":{"revision":7},"kvs":[{"key":"L2EvYg==","create_revision":2,"value":"aGk="}],"count":1}"#;
    assert_eq!(decode_kvs(out), [("/a/b".to_string(), "hi".to_string())]);
    assert!(decode_kvs(r#"{"header":{"revision":7}}"#).is_empty());
}
