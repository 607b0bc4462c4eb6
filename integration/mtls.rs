//! mTLS between sidecars, with real handshakes: authorization by SPIFFE
//! identity (200 / 403), every kind of certificate the inbound side must
//! refuse, plaintext refused, the outbound identity check, certificate
//! rotation without restart, and start-up validation of the files.
//!
//! Certificates are made in the test with rcgen ([`crate::support::pki`]).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::client::{self, try_request};
use crate::support::mesh::{static_registry, SidecarSpec};
use crate::support::pki::{tls_connect, tls_get, CertFiles, Pki};
use crate::support::{wait_until, FileDir, Sidecar, SidecarPorts, Upstream};

const TD: &str = "mesh.local";

/// One `[[endpoints]]` entry with `tls = true`.
fn tls_entry(service: &str, instance: &str, addr: std::net::SocketAddr) -> String {
    format!(
        "[[endpoints]]\nservice = \"{service}\"\ninstance = \"{instance}\"\naddress = \"{addr}\"\ntls = true\n\n"
    )
}

/// Sidecar `b` (mTLS, `allow`), its upstream, and the registry file.
struct TlsB {
    files: FileDir,
    svc: Upstream,
    spec: SidecarSpec,
    sidecar: Sidecar,
}

impl TlsB {
    async fn start(pki: &Pki, certs: &CertFiles, allow: &[&str], tls_extra: &str) -> TlsB {
        Self::start_as("b", pki, certs, allow, tls_extra).await
    }

    /// A sidecar of `service` (its certificate must carry that identity).
    async fn start_as(
        service: &str,
        pki: &Pki,
        certs: &CertFiles,
        allow: &[&str],
        tls_extra: &str,
    ) -> TlsB {
        let files = FileDir::new();
        let svc = Upstream::start(&format!("{service}1")).await;
        let registry = files.file("endpoints.toml");
        let instance = format!("{service}-1");
        let mut spec = SidecarSpec::new(service, &instance, &svc, static_registry(&registry));
        spec.ports = SidecarPorts::new();
        files.write_atomic(
            "endpoints.toml",
            &tls_entry(service, &instance, spec.ports.inbound_addr()),
        );
        spec.extra = pki.tls_toml(certs, allow, tls_extra);
        let mut sidecar = spec.start();
        sidecar.wait_ready().await;
        TlsB {
            files,
            svc,
            spec,
            sidecar,
        }
    }

    fn inbound(&self) -> std::net::SocketAddr {
        self.spec.ports.inbound_addr()
    }

    async fn metric(&self, series: &str) -> f64 {
        self.sidecar.metric_value(series).await.unwrap_or(0.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_caller_gets_200_and_its_verified_identity_disallowed_gets_403() {
    let _shared = crate::support::shared().await;
    let pki = Pki::new(TD);
    let b_certs = pki.service("b", "b");
    let b = TlsB::start(&pki, &b_certs, &["a"], "").await;

    // A real caller: sidecar a (mTLS) → sidecar b.
    let svc_a = Upstream::start("a1").await;
    let mut a_spec = SidecarSpec::new(
        "a",
        "a-1",
        &svc_a,
        static_registry(&b.files.file("endpoints.toml")),
    );
    a_spec.extra = pki.tls_toml(&pki.service("a", "a"), &[], "");
    let mut a = a_spec.start();
    a.wait_ready().await;
    let res = client::get_with_host(a_spec.ports.outbound_addr(), "b", "/hello").await;
    assert_eq!(res.status(), 200, "a → b over mTLS: {:?}", res.body());
    let seen = b.svc.last_request().expect("b's service got the call");
    assert_eq!(seen.header("x-outrigger-caller"), Some("a"));
    assert!(
        a.metric_value("outrigger_tls_handshakes_total{direction=\"outbound\",result=\"ok\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "a counted its outbound handshake"
    );

    // A WebSocket upgrade crosses the mTLS hop on its own HTTP/1.1 connection.
    let mut ws = client::ws_connect(a_spec.ports.outbound_addr(), "b", "/ws").await;
    ws.send(Message::text("over mTLS")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("a frame")
        .expect("not an error");
    assert_eq!(echo.into_text().unwrap().as_str(), "over mTLS");
    let accepted = b
        .metric("outrigger_tls_handshakes_total{direction=\"inbound\",result=\"ok\"}")
        .await;
    assert!(
        accepted >= 2.0,
        "the h2 pool and the upgrade each made an mTLS connection: {accepted}"
    );

    // The identity comes from the certificate, not from what the caller says.
    let res = tls_get(
        b.inbound(),
        &pki.ca(),
        Some(&pki.service("a-direct", "a")),
        TD,
        &[("x-outrigger-caller", "admin")],
    )
    .await
    .expect("a's certificate is accepted");
    assert_eq!(res.status(), 200);
    let seen = b.svc.last_request().unwrap();
    assert_eq!(
        seen.headers
            .iter()
            .filter(|(k, _)| k == "x-outrigger-caller")
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>(),
        ["a"],
        "the spoofed copy is stripped and the verified identity set"
    );

    // c has a valid certificate of the mesh but is not on b's allow list.
    let before = b.svc.requests();
    let res = tls_get(
        b.inbound(),
        &pki.ca(),
        Some(&pki.service("c", "c")),
        TD,
        &[],
    )
    .await
    .expect("c completes the handshake: authorization is per request");
    assert_eq!(res.status(), 403, "{:?}", res.body());
    assert_eq!(res.headers()["x-outrigger-error"], "forbidden");
    let body = String::from_utf8_lossy(res.body());
    assert!(body.contains("spiffe://mesh.local/service/c"), "{body}");
    assert_eq!(
        b.svc.requests(),
        before,
        "a refused call never reaches the service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_and_plaintext_fail_the_handshake() {
    let _shared = crate::support::shared().await;
    let pki = Pki::new(TD);
    let b = TlsB::start(&pki, &pki.service("b", "b"), &[], "").await;

    // Control: a good certificate works, so the failures below are the
    // certificates' fault.
    let good = pki.service("a", "a");
    let res = tls_get(b.inbound(), &pki.ca(), Some(&good), TD, &[]).await;
    assert_eq!(res.expect("good certificate").status(), 200);
    let served = b.svc.requests();

    let foreign = Pki::new(TD); // another CA claiming our trust domain
    let cases: Vec<(&str, Option<CertFiles>)> = vec![
        (
            "a foreign CA claiming our trust domain",
            Some(foreign.service("a", "a")),
        ),
        (
            "two URI SANs",
            Some(pki.issue("two-uris", pki.two_uri_params("a"))),
        ),
        (
            "an expired certificate",
            Some(pki.issue("expired", pki.expired_params("a"))),
        ),
        ("no client certificate", None),
    ];
    for (what, cert) in &cases {
        let res = tls_get(b.inbound(), &pki.ca(), cert.as_ref(), TD, &[]).await;
        assert!(
            res.is_err(),
            "{what}: expected a failed handshake, got {res:?}"
        );
    }

    // Plaintext to a TLS inbound is refused: no HTTP response at all.
    let plain = try_request(b.inbound(), client::get("http://b/plain")).await;
    assert!(plain.is_err(), "plaintext got an answer: {plain:?}");
    let h2c = client::try_request_h2(b.inbound(), client::get("http://b/plain")).await;
    assert!(h2c.is_err(), "h2c got an answer: {h2c:?}");

    assert_eq!(b.svc.requests(), served, "nothing reached the service");
    let refused = b
        .metric("outrigger_tls_handshakes_total{direction=\"inbound\",result=\"error\"}")
        .await;
    assert!(
        refused >= 6.0,
        "inbound handshake errors counted: {refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_refuses_a_peer_whose_identity_is_not_the_target_service() {
    let _shared = crate::support::shared().await;
    let pki = Pki::new(TD);
    // The registry says "b is at X", but X is a sidecar of service c.
    let impostor = TlsB::start_as("c", &pki, &pki.service("c", "c"), &[], "").await;
    let files = FileDir::new();
    files.write_atomic("endpoints.toml", &tls_entry("b", "b-1", impostor.inbound()));
    let svc_a = Upstream::start("a1").await;
    let mut spec = SidecarSpec::new(
        "a",
        "a-1",
        &svc_a,
        static_registry(&files.file("endpoints.toml")),
    );
    spec.extra = pki.tls_toml(&pki.service("a", "a"), &[], "");
    let mut a = spec.start();
    a.wait_ready().await;
    let res = client::get_with_host(spec.ports.outbound_addr(), "b", "/").await;
    assert_eq!(res.status(), 502, "{:?}", res.body());
    assert_eq!(res.headers()["x-outrigger-error"], "connect");
    let body = String::from_utf8_lossy(res.body());
    assert!(body.contains("spiffe://mesh.local/service/c"), "{body}");
    assert_eq!(impostor.svc.requests(), 0);
    let failed = a
        .metric_value("outrigger_tls_handshakes_total{direction=\"outbound\",result=\"error\"}")
        .await
        .unwrap_or(0.0);
    assert!(failed >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_is_served_to_new_handshakes_and_garbage_keeps_the_old_pair() {
    let _shared = crate::support::shared().await;
    let pki = Pki::new(TD);
    let b_certs = pki.service("b", "b");
    let b = TlsB::start(&pki, &b_certs, &[], "reload_interval = \"200ms\"").await;
    let client_cert = pki.service("a", "a");

    let mut old_conn = tls_connect(b.inbound(), &pki.ca(), Some(&client_cert), TD, "b")
        .await
        .expect("connect");
    assert_eq!(
        old_conn.get("/before", &[]).await.expect("GET").status(),
        200
    );
    let first_cert = old_conn.server_cert.clone();

    // Rotate: a new key and certificate for b, swapped in by rename.
    let next = pki.service("b-next", "b");
    std::fs::rename(&next.key, &b_certs.key).unwrap();
    std::fs::rename(&next.cert, &b_certs.cert).unwrap();
    let rotated_at = std::time::Instant::now();
    let second_cert = wait_until(
        "new handshakes to get the rotated certificate",
        Duration::from_secs(5),
        || async {
            let conn = tls_connect(b.inbound(), &pki.ca(), Some(&client_cert), TD, "b").await;
            match conn {
                Ok(c) if c.server_cert != first_cert => Some(c.server_cert),
                _ => None,
            }
        },
    )
    .await;
    println!(
        "rotated certificate served {:?} after the rename",
        rotated_at.elapsed()
    );
    assert!(
        rotated_at.elapsed() < Duration::from_secs(2),
        "within the 200 ms interval (plus slack)"
    );
    assert!(b.metric("outrigger_tls_reloads_total{result=\"ok\"}").await >= 1.0);

    // The connection made before the rotation still works.
    let res = old_conn
        .get("/after", &[])
        .await
        .expect("old connection survives");
    assert_eq!(res.status(), 200);

    // A garbage certificate file is rejected; the rotated pair stays.
    let errors = b
        .metric("outrigger_tls_reloads_total{result=\"error\"}")
        .await;
    let tmp = pki.dir().join("garbage.tmp");
    std::fs::write(&tmp, "this is not a certificate\n").unwrap();
    std::fs::rename(&tmp, &b_certs.cert).unwrap();
    wait_until(
        "the garbage file to be rejected",
        Duration::from_secs(5),
        || async {
            b.metric("outrigger_tls_reloads_total{result=\"error\"}")
                .await
                > errors
        },
    )
    .await;
    let mut conn = tls_connect(b.inbound(), &pki.ca(), Some(&client_cert), TD, "b")
        .await
        .expect("handshakes continue with the last good pair");
    assert_eq!(conn.server_cert, second_cert);
    assert_eq!(conn.get("/still", &[]).await.expect("GET").status(), 200);
    assert!(b.sidecar.log().contains("TLS reload rejected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_inbound_also_takes_plaintext_but_without_an_identity() {
    let _shared = crate::support::shared().await;
    let pki = Pki::new(TD);
    let b = TlsB::start(
        &pki,
        &pki.service("b", "b"),
        &["a"],
        "mode = \"permissive\"",
    )
    .await;

    // Plaintext is served, and a claimed identity is not believed.
    let req = http::Request::get("http://b/plain")
        .header("x-outrigger-caller", "a")
        .body(client::empty())
        .unwrap();
    let res = client::request(b.inbound(), req).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        b.svc.last_request().unwrap().header("x-outrigger-caller"),
        None
    );

    // TLS callers are still authorized by their certificates.
    let res = tls_get(
        b.inbound(),
        &pki.ca(),
        Some(&pki.service("c", "c")),
        TD,
        &[],
    )
    .await;
    assert_eq!(res.expect("c's handshake").status(), 403);
    let res = tls_get(
        b.inbound(),
        &pki.ca(),
        Some(&pki.service("a", "a")),
        TD,
        &[],
    )
    .await;
    assert_eq!(res.expect("a's handshake").status(), 200);
    assert_eq!(
        b.svc.last_request().unwrap().header("x-outrigger-caller"),
        Some("a")
    );

    // A sidecar without [tls] calls it in plaintext, because its record says
    // it takes plaintext; against a strict record it refuses to dial.
    let files = FileDir::new();
    let entry = |service: &str, protocols: &str| {
        format!(
            "{}protocols = [{protocols}]\n\n",
            tls_entry(service, &format!("{service}-1"), b.inbound())
                .trim_end()
                .to_owned()
                + "\n"
        )
    };
    files.write_atomic(
        "endpoints.toml",
        &(entry("b", "\"http1\", \"h2\", \"plaintext\"") + &entry("strict", "\"http1\", \"h2\"")),
    );
    let svc_x = Upstream::start("x1").await;
    let x_spec = SidecarSpec::new(
        "x",
        "x-1",
        &svc_x,
        static_registry(&files.file("endpoints.toml")),
    );
    let mut x = x_spec.start();
    x.wait_ready().await;
    let res = client::get_with_host(x_spec.ports.outbound_addr(), "b", "/from-x").await;
    assert_eq!(res.status(), 200, "{:?}", res.body());
    let res = client::get_with_host(x_spec.ports.outbound_addr(), "strict", "/").await;
    assert_eq!(res.status(), 502, "{:?}", res.body());
    let body = String::from_utf8_lossy(res.body());
    assert!(body.contains("configure [tls]"), "{body}");
}

#[test]
fn startup_rejects_tls_files_that_do_not_fit_and_names_the_field() {
    let pki = Pki::new(TD);
    let b = pki.service("b", "b");
    let other = pki.service("other", "b");
    let c = pki.service("c", "c");
    let base = |tls: &str| {
        format!(
            "[service]\nname = \"b\"\naddress = \"127.0.0.1:9\"\n[registry]\nkind = \"static\"\nfile = \"x.toml\"\n{tls}"
        )
    };
    let mismatched = CertFiles {
        cert: b.cert.clone(),
        key: other.key.clone(),
    };
    let cases = [
        (pki.tls_toml(&mismatched, &[], ""), "tls.key"),
        (pki.tls_toml(&c, &[], ""), "tls.cert"),
        (
            pki.tls_toml(
                &CertFiles {
                    cert: pki.dir().join("missing.pem"),
                    key: b.key.clone(),
                },
                &[],
                "",
            ),
            "tls.cert",
        ),
    ];
    for (i, (tls, field)) in cases.iter().enumerate() {
        let file = pki.dir().join(format!("case{i}.toml"));
        std::fs::write(&file, base(tls)).unwrap();
        let out = Sidecar::run_cli(&["check-config", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "case {i}: {stderr}");
        assert!(
            stderr.contains(&format!("{field}: ")),
            "case {i} names {field}: {stderr}"
        );
    }
    let good = pki.dir().join("good.toml");
    std::fs::write(&good, base(&pki.tls_toml(&b, &["a"], ""))).unwrap();
    let out = Sidecar::run_cli(&["check-config", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn certs_command_writes_a_ca_and_private_keys_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    let args = [
        "certs",
        "--out",
        out_dir.to_str().unwrap(),
        "--trust-domain",
        TD,
        "a",
        "b",
    ];
    let out = Sidecar::run_cli(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = std::fs::read(out_dir.join("ca.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca-key.pem", "a-key.pem", "b-key.pem"] {
        let mode = std::fs::metadata(out_dir.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // Again: nothing changes.
    let out = Sidecar::run_cli(&args);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));
    assert_eq!(std::fs::read(out_dir.join("ca.pem")).unwrap(), ca);
}
