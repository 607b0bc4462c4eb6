//! Sidecar process control, tested with a stand-in program (`/bin/sh`) and
//! a fake in-process admin API, plus the TOML and Prometheus parsers. One
//! test runs the real binary with a broken config to check that an early
//! exit is reported at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::support::metrics::parse_metric;
use crate::support::sidecar::{listener_addr, SidecarOptions};
use crate::support::{wait_until, Sidecar, SidecarPorts};

const METRICS: &str = r#"# HELP outrigger_requests_total Requests.
# TYPE outrigger_requests_total counter
outrigger_requests_total{direction="outbound",service="b",code="200"} 5
outrigger_requests_total{direction="outbound",service="b",code="503"} 2
outrigger_requests_total{direction="inbound",service="a",code="200"} 1 1700000000000
outrigger_requests_total_extra 100
outrigger_odd{path="/a}b c"} 4.5
outrigger_bucket{le="+Inf"} 3
"#;

/// A fake admin API: `/live` 200, `/ready` 503 for the first three polls
/// then 200, `/metrics`, `/routes`, `POST /drain`.
async fn fake_admin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ready_polls = Arc::new(AtomicU32::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let ready_polls = ready_polls.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/ready" if ready_polls.fetch_add(1, Ordering::SeqCst) < 3 => (503, "not yet"),
                    "/live" | "/ready" | "/drain" => (200, "ok"),
                    "/metrics" => (200, METRICS),
                    "/routes" => (200, r#"{"services":{"b":{"endpoints":[]}}}"#),
                    _ => (404, "no"),
                };
                let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                std::future::ready(Ok::<_, Infallible>(resp))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// `/proc/<pid>/stat` state letter (`S`, `R`, `T`, `Z`, ...).
fn proc_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')')
        .next()
        .unwrap()
        .trim()
        .chars()
        .next()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_control_with_a_stand_in_program() {
    let _shared = crate::support::shared().await;
    let admin = fake_admin().await;
    let toml = format!("[service]\nname = \"fake\"\n\n[listeners]\nadmin = \"{admin}\"\n");
    let options = SidecarOptions {
        env: vec![("RUST_LOG".into(), "trace".into())],
        program: Some("/bin/sh".into()),
        args: Some(vec![
            "-c".into(),
            "echo \"log=$RUST_LOG config={config}\"; exec sleep 60".into(),
        ]),
    };
    let mut sidecar = Sidecar::start_with("fake", &toml, options);
    assert_eq!(sidecar.admin, admin);
    let expected = format!("log=trace config={}", sidecar.config_path().display());
    wait_until("the stand-in to log", Duration::from_secs(5), || async {
        sidecar.log().contains(&expected)
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(sidecar.config_path()).unwrap(),
        toml
    );

    sidecar.wait_live().await;
    sidecar.wait_ready().await;
    assert_eq!(sidecar.admin_get("/ready").await, (200, "ok".to_string()));
    assert_eq!(sidecar.admin_post("/drain").await.0, 200);
    assert_eq!(
        sidecar.routes_json().await["services"]["b"]["endpoints"],
        serde_json::json!([])
    );
    let outbound = r#"outrigger_requests_total{direction="outbound""#;
    assert_eq!(sidecar.metric_value(outbound).await, Some(7.0));

    let pid = sidecar.pid();
    sidecar.sigstop();
    wait_until("SIGSTOP to take effect", Duration::from_secs(5), || async {
        proc_state(pid) == 'T'
    })
    .await;
    sidecar.sigcont();
    wait_until("SIGCONT to take effect", Duration::from_secs(5), || async {
        proc_state(pid) != 'T'
    })
    .await;
    sidecar.sigterm();
    let status = sidecar.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.signal(), Some(libc::SIGTERM));

    sidecar.restart();
    assert_ne!(sidecar.pid(), pid);
    let expected_twice = |log: String| log.matches("log=trace").count() == 2;
    wait_until("the restart to log", Duration::from_secs(5), || async {
        expected_twice(sidecar.log())
    })
    .await;
    sidecar.kill9();
    assert_eq!(
        sidecar.try_status().and_then(|s| s.signal()),
        Some(libc::SIGKILL)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "before GET /ready returned 200")]
async fn wait_ready_reports_an_early_exit() {
    let _shared = crate::support::shared().await;
    // An invalid config (and, until the sidecar exists, the stub binary)
    // makes the process exit; wait_ready must say so without waiting 10 s.
    let ports = SidecarPorts::new();
    let toml = format!("[service]\nname = 42\n\n{}", ports.listeners_toml());
    Sidecar::start("broken", &toml).wait_ready().await;
}

#[test]
fn run_cli_runs_the_binary() {
    let out = Sidecar::run_cli(&["--help"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn sidecar_ports_render_the_listeners_section() {
    let ports = SidecarPorts::new();
    assert!(
        ports.outbound != ports.inbound
            && ports.inbound != ports.admin
            && ports.admin != ports.outbound
    );
    let toml = format!(
        "[service]\nname = \"b\"\n\n{}\n[registry]\nkind = \"static\"\n",
        ports.listeners_toml()
    );
    assert_eq!(listener_addr(&toml, "admin"), Some(ports.admin_addr()));
    assert_eq!(
        listener_addr(&toml, "outbound"),
        Some(ports.outbound_addr())
    );
    assert_eq!(listener_addr(&toml, "inbound"), Some(ports.inbound_addr()));
    let parsed: toml::Value = toml::from_str(&toml).expect("valid TOML");
    assert_eq!(
        parsed["listeners"]["admin"].as_str(),
        Some(ports.admin_addr().to_string().as_str())
    );
}

#[test]
fn listener_addr_reads_only_the_listeners_section() {
    let toml = "[admin]\nadmin = \"127.0.0.1:1\"\n[listeners] # comment\n  inbound = \"0.0.0.0:15006\" # any\nadmin=\"127.0.0.1:15000\"\n[tls]\noutbound = \"127.0.0.1:2\"\n";
    assert_eq!(
        listener_addr(toml, "admin"),
        Some("127.0.0.1:15000".parse().unwrap())
    );
    assert_eq!(
        listener_addr(toml, "inbound"),
        Some("127.0.0.1:15006".parse().unwrap())
    );
    assert_eq!(listener_addr(toml, "outbound"), None);
}

#[test]
fn parse_metric_sums_matching_series() {
    let all = "outrigger_requests_total";
    assert_eq!(
        parse_metric(METRICS, all),
        Some(8.0),
        "whole name: not _extra"
    );
    assert_eq!(
        parse_metric(METRICS, r#"outrigger_requests_total{direction="outbound""#),
        Some(7.0)
    );
    assert_eq!(
        parse_metric(METRICS, r#"outrigger_requests_total{direction="inbound""#),
        Some(1.0)
    );
    assert_eq!(
        parse_metric(METRICS, "outrigger_odd"),
        Some(4.5),
        "quoted braces and spaces"
    );
    assert_eq!(parse_metric(METRICS, "outrigger_bucket"), Some(3.0));
    assert_eq!(parse_metric(METRICS, "outrigger_missing"), None);
    assert_eq!(parse_metric("m +Inf\n", "m"), Some(f64::INFINITY));
}
