//! Ports, waiting, files and the one-shot client helpers' error paths.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::client::try_get;
use crate::support::files::{static_endpoints_toml, StaticEndpoint};
use crate::support::ports::{in_ephemeral_range, loopback};
use crate::support::wait::wait_for;
use crate::support::{free_port, wait_until, FileDir};

#[test]
fn free_ports_are_unique_and_bindable() {
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    assert_eq!(ports.iter().collect::<HashSet<_>>().len(), ports.len());
    std::net::TcpListener::bind(loopback(ports[0])).expect("a free port can be bound");
    // The kernel picks ports for `bind(":0")` and `connect()` from its
    // ephemeral range; a handed-out port there could be taken by a fixture
    // or a client socket before the sidecar binds it.
    let kernel_picked: Vec<u16> = (0..50)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        })
        .collect();
    assert!(
        kernel_picked.iter().all(|p| in_ephemeral_range(*p)),
        "the ephemeral range as read must cover the kernel's own picks: {kernel_picked:?}"
    );
    let inside: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| in_ephemeral_range(*p))
        .collect();
    assert!(
        inside.is_empty(),
        "free_port handed out ephemeral ports {inside:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_until_returns_values_of_bool_option_and_result() {
    let _shared = crate::support::shared().await;
    let mut polls = 0;
    let value = wait_until("the third poll", Duration::from_secs(5), || {
        polls += 1;
        let n = polls;
        async move { (n >= 3).then_some(n) }
    })
    .await;
    assert_eq!(value, 3);
    wait_until("true", Duration::from_secs(1), || async { true }).await;
    let ok: u8 = wait_until("ok", Duration::from_secs(1), || async {
        Ok::<u8, String>(7)
    })
    .await;
    assert_eq!(ok, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_times_out_with_the_last_error() {
    let _shared = crate::support::shared().await;
    let start = Instant::now();
    let timeout = wait_for("a closed port", Duration::from_millis(200), || {
        try_get(loopback(free_port()), "/")
    })
    .await
    .unwrap_err();
    assert!(
        start.elapsed() >= Duration::from_millis(200) && start.elapsed() < Duration::from_secs(3)
    );
    let message = timeout.to_string();
    assert!(
        message.starts_with("timed out after ") && message.contains("waiting for a closed port"),
        "{message}"
    );
    assert!(
        message.contains("(last: ") && message.contains("onnection refused"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "waiting for the impossible")]
async fn wait_until_panics_on_timeout() {
    let _shared = crate::support::shared().await;
    wait_until("the impossible", Duration::from_millis(50), || async {
        false
    })
    .await;
}

#[test]
fn files_are_written_atomically_or_in_place() {
    let dir = FileDir::new();
    let endpoints = [
        StaticEndpoint::new("b", loopback(15106))
            .instance("b-1")
            .zone("z1")
            .weight(100),
        StaticEndpoint::new("c", loopback(15107)),
    ];
    let text = static_endpoints_toml(&endpoints);
    let path = dir.write_atomic("endpoints.toml", &text);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let parsed: toml::Value = toml::from_str(&text).unwrap();
    let list = parsed["endpoints"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["address"].as_str(), Some("127.0.0.1:15106"));
    assert_eq!(
        (list[0]["zone"].as_str(), list[0]["weight"].as_integer()),
        (Some("z1"), Some(100))
    );
    assert!(list[1].get("instance").is_none());

    assert_eq!(dir.write_in_place("endpoints.toml", "x = 1\n"), path);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "x = 1\n");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["endpoints.toml"], "no temp files left behind");
    dir.remove("endpoints.toml");
    assert!(!path.exists());
}
