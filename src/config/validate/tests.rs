use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::config::{HealthCheck, LbKind, RegistryKind, Scheduling};

/// The documented example (with `tcp` dropped: it conflicts with `http`).
const EXAMPLE: &str = r#"
[service]
name = "b"
instance_id = "b-1"
address = "127.0.0.1:8080"
advertise = "b-1:15006"
zone = "z1"
weight = 100
tags = ["x"]
metadata = { k = "v" }
[service.health]
http = "/healthz"
interval = "1s"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 2
[listeners]
outbound = "127.0.0.1:15001"
inbound = "0.0.0.0:15006"
admin = "127.0.0.1:15000"
ingress = "0.0.0.0:8080"
[runtime]
worker_threads = 1
drain_timeout = "10s"
state_dir = "/var/lib/outrigger"
scheduling = "normal"
[registry]
kind = "etcd"
prefix = "/outrigger"
ttl = "5s"
endpoints = ["http://etcd:2379"]
username = "u"
password = "p"
[outbound]
mesh_domain = "mesh"
[[upstreams]]
name = "c"
local_port = 9191
lb = "p2c-ewma"
connect_timeout = "1s"
timeout = "15s"
per_try_timeout = "2s"
idle_timeout = "60s"
retries = 2
retry_budget_percent = 20
retry_budget_min_per_sec = 10
max_requests = 10000
max_requests_per_endpoint = 1000
panic_threshold_percent = 50
[upstreams.outlier]
consecutive_failures = 5
consecutive_connect_failures = 2
base_ejection = "30s"
max_ejection = "300s"
max_ejection_percent = 50
[limits]
max_header_bytes = "60KiB"
max_headers = 100
header_read_timeout = "10s"
max_connections = 4096
max_concurrent_streams = 256
idle_connection_timeout = "90s"
[tls]
ca = "/certs/ca.pem"
cert = "/certs/b.pem"
key = "/certs/b-key.pem"
trust_domain = "mesh.local"
allow = ["a"]
reload_interval = "5s"
"#;

/// The smallest valid config.
const MINIMAL: &str = r#"
[service]
name = "b"
address = "127.0.0.1:8080"
[registry]
kind = "etcd"
"#;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn check(text: &str) -> Result<Config, ConfigError> {
    let table: toml::Table = text.parse().unwrap();
    validate_with(&table, &|| "node-7".to_owned())
}

fn load(text: &str) -> Config {
    match check(text) {
        Ok(config) => config,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

/// The problems, as `path: message` lines.
fn problems(text: &str) -> Vec<String> {
    match check(text) {
        Err(ConfigError::Invalid(problems)) => problems.iter().map(|p| p.to_string()).collect(),
        Err(other) => panic!("expected field problems, got {other}"),
        Ok(_) => panic!("expected field problems, config was accepted"),
    }
}

/// The paths of the problems only.
fn problem_paths(text: &str) -> Vec<String> {
    match check(text) {
        Err(ConfigError::Invalid(problems)) => problems.into_iter().map(|p| p.path).collect(),
        other => panic!("expected field problems, got {other:?}"),
    }
}

/// `MINIMAL` plus `extra` (sections other than `[service]`/`[registry]`).
fn minimal_with(extra: &str) -> String {
    format!("{MINIMAL}\n{extra}")
}

#[test]
fn full_example_parses_to_expected_values() {
    let c = load(EXAMPLE);

    let s = &c.service;
    assert_eq!(s.name, "b");
    assert_eq!(s.instance_id, "b-1");
    assert_eq!(s.address, "127.0.0.1:8080");
    assert_eq!(s.advertise, "b-1:15006");
    assert_eq!(s.zone.as_deref(), Some("z1"));
    assert_eq!(s.weight, 100);
    assert_eq!(s.tags, vec!["x".to_owned()]);
    assert_eq!(s.metadata.get("k").map(String::as_str), Some("v"));
    assert_eq!(s.metadata.len(), 1);
    assert_eq!(
        s.health.check,
        HealthCheck::Http {
            path: "/healthz".into()
        }
    );
    assert_eq!(s.health.interval, secs(1));
    assert_eq!(s.health.timeout, Duration::from_millis(500));
    assert_eq!(s.health.healthy_threshold, 1);
    assert_eq!(s.health.unhealthy_threshold, 2);

    assert_eq!(c.listeners.outbound, addr("127.0.0.1:15001"));
    assert_eq!(c.listeners.inbound, addr("0.0.0.0:15006"));
    assert_eq!(c.listeners.admin, addr("127.0.0.1:15000"));
    assert_eq!(c.listeners.ingress, Some(addr("0.0.0.0:8080")));

    assert_eq!(c.runtime.worker_threads, 1);
    assert_eq!(c.runtime.drain_timeout, secs(10));
    assert_eq!(c.runtime.scheduling, Scheduling::Normal);
    assert_eq!(
        c.runtime.state_dir,
        Some(PathBuf::from("/var/lib/outrigger"))
    );

    assert_eq!(c.registries.len(), 1);
    let r = &c.registries[0];
    assert_eq!(r.prefix, "/outrigger");
    assert_eq!(r.ttl, secs(5));
    match &r.kind {
        RegistryKind::Etcd {
            endpoints,
            username,
            password,
        } => {
            assert_eq!(endpoints, &vec!["http://etcd:2379".to_owned()]);
            assert_eq!(username.as_deref(), Some("u"));
            assert_eq!(password.as_deref(), Some("p"));
        }
        other => panic!("expected etcd, got {other:?}"),
    }

    assert_eq!(c.outbound.mesh_domain, "mesh");
    assert_eq!(c.upstreams.len(), 1);
    let u = &c.upstreams[0];
    assert_eq!(u.name, "c");
    assert_eq!(u.local_port, Some(9191));
    let p = &u.policy;
    assert_eq!(p.lb, LbKind::P2cEwma);
    assert_eq!(p.connect_timeout, secs(1));
    assert_eq!(p.timeout, secs(15));
    assert_eq!(p.per_try_timeout, Some(secs(2)));
    assert_eq!(p.idle_timeout, secs(60));
    assert_eq!(p.retries, 2);
    assert_eq!(p.retry_budget_percent, 20);
    assert_eq!(p.retry_budget_min_per_sec, 10);
    assert_eq!(p.max_requests, 10_000);
    assert_eq!(p.max_requests_per_endpoint, 1_000);
    assert_eq!(p.panic_threshold_percent, 50);
    assert_eq!(p.outlier.consecutive_failures, 5);
    assert_eq!(p.outlier.consecutive_connect_failures, 2);
    assert_eq!(p.outlier.base_ejection, secs(30));
    assert_eq!(p.outlier.max_ejection, secs(300));
    assert_eq!(p.outlier.max_ejection_percent, 50);

    assert_eq!(c.limits.max_header_bytes, 61_440);
    assert_eq!(c.limits.max_headers, 100);
    assert_eq!(c.limits.header_read_timeout, secs(10));
    assert_eq!(c.limits.max_connections, 4096);
    assert_eq!(c.limits.max_concurrent_streams, 256);
    assert_eq!(c.limits.idle_connection_timeout, secs(90));

    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.ca, PathBuf::from("/certs/ca.pem"));
    assert_eq!(tls.cert, PathBuf::from("/certs/b.pem"));
    assert_eq!(tls.key, PathBuf::from("/certs/b-key.pem"));
    assert_eq!(tls.trust_domain, "mesh.local");
    assert_eq!(tls.allow, vec!["a".to_owned()]);
    assert_eq!(tls.reload_interval, secs(5));

    // Unlisted services get the defaults; "c" gets its own entry.
    assert_eq!(c.policy_for("zzz").per_try_timeout, None);
    assert_eq!(c.policy_for("c").per_try_timeout, Some(secs(2)));
}

#[test]
fn minimal_config_gets_every_default() {
    let c = load(MINIMAL);

    let s = &c.service;
    assert_eq!(
        s.instance_id, "node-7",
        "instance_id defaults to the hostname"
    );
    // Inbound is 0.0.0.0:15006 by default: not dialable, so hostname:port.
    assert_eq!(s.advertise, "node-7:15006");
    assert_eq!(s.zone, None);
    assert_eq!(s.weight, 100);
    assert!(s.tags.is_empty());
    assert!(s.metadata.is_empty());
    assert_eq!(s.health.check, HealthCheck::Tcp);
    assert_eq!(s.health.interval, secs(1));
    assert_eq!(s.health.timeout, Duration::from_millis(500));
    assert_eq!(s.health.healthy_threshold, 1);
    assert_eq!(s.health.unhealthy_threshold, 2);

    assert_eq!(c.listeners.outbound, addr("127.0.0.1:15001"));
    assert_eq!(c.listeners.inbound, addr("0.0.0.0:15006"));
    assert_eq!(c.listeners.admin, addr("127.0.0.1:15000"));
    assert_eq!(c.listeners.ingress, None);

    assert_eq!(c.runtime.worker_threads, 1);
    assert_eq!(c.runtime.drain_timeout, secs(10));
    assert_eq!(c.runtime.state_dir, None);
    assert_eq!(c.runtime.scheduling, Scheduling::Adaptive);

    let r = &c.registries[0];
    assert_eq!(r.prefix, "/outrigger");
    assert_eq!(r.ttl, secs(5));
    match &r.kind {
        RegistryKind::Etcd {
            endpoints,
            username,
            password,
        } => {
            assert_eq!(endpoints, &vec!["http://127.0.0.1:2379".to_owned()]);
            assert_eq!((username, password), (&None, &None));
        }
        other => panic!("expected etcd, got {other:?}"),
    }

    assert_eq!(c.outbound.mesh_domain, "mesh");
    let p = &c.outbound.defaults;
    assert_eq!(p.lb, LbKind::P2cEwma);
    assert_eq!(p.connect_timeout, secs(1));
    assert_eq!(p.timeout, secs(15));
    assert_eq!(p.per_try_timeout, None);
    assert_eq!(p.idle_timeout, secs(60));
    assert_eq!(p.retries, 2);
    assert_eq!(p.retry_budget_percent, 20);
    assert_eq!(p.retry_budget_min_per_sec, 10);
    assert_eq!(p.max_requests, 10_000);
    assert_eq!(p.max_requests_per_endpoint, 1_000);
    assert_eq!(p.panic_threshold_percent, 50);
    assert_eq!(p.outlier.consecutive_failures, 5);
    assert_eq!(p.outlier.consecutive_connect_failures, 2);
    assert_eq!(p.outlier.base_ejection, secs(30));
    assert_eq!(p.outlier.max_ejection, secs(300));
    assert_eq!(p.outlier.max_ejection_percent, 50);
    assert!(c.upstreams.is_empty());

    assert_eq!(c.limits.max_header_bytes, 61_440);
    assert_eq!(c.limits.max_headers, 100);
    assert_eq!(c.limits.header_read_timeout, secs(10));
    assert_eq!(c.limits.max_connections, 4096);
    assert_eq!(c.limits.max_concurrent_streams, 256);
    assert_eq!(c.limits.idle_connection_timeout, secs(90));
    assert!(c.tls.is_none());
}

#[test]
fn advertise_defaults_to_a_specific_inbound_address() {
    let c = load(&minimal_with("[listeners]\ninbound = \"10.1.2.3:15006\""));
    assert_eq!(c.service.advertise, "10.1.2.3:15006");
    let c = load(&minimal_with("[listeners]\ninbound = \"[::]:7000\""));
    assert_eq!(c.service.advertise, "node-7:7000");
}

#[test]
fn short_health_interval_shrinks_the_default_timeout() {
    let c = load(&format!(
        "{MINIMAL}\n[service.health]\ninterval = \"200ms\""
    ));
    assert_eq!(c.service.health.interval, Duration::from_millis(200));
    assert_eq!(c.service.health.timeout, Duration::from_millis(200));
}

#[test]
fn registry_list_of_every_kind() {
    let c = load(
        r#"
        [service]
        name = "b"
        address = "app:8080"
        [[registry]]
        kind = "etcd"
        endpoints = ["https://e1:2379", "https://e2:2379"]
        prefix = "/prod"
        [[registry]]
        kind = "consul"
        endpoints = ["https://consul:8501"]
        token = "t0k"
        deregister_critical_after = "5m"
        tags = ["blue", "v2"]
        wait = "30s"
        datacenter = "dc2"
        ca = "certs/consul-ca.pem"
        ttl = "10s"
        [[registry]]
        kind = "static"
        file = "endpoints.toml"
        poll_interval = "250ms"
        "#,
    );
    assert_eq!(c.registries.len(), 3);
    assert_eq!(c.registries[0].prefix, "/prod");
    assert!(matches!(
        &c.registries[0].kind,
        RegistryKind::Etcd { endpoints, .. } if endpoints == &["https://e1:2379", "https://e2:2379"]
    ));
    assert_eq!(c.registries[1].ttl, secs(10));
    match &c.registries[1].kind {
        RegistryKind::Consul {
            endpoints,
            token,
            deregister_critical_after,
            tags,
            wait,
            datacenter,
            ca,
        } => {
            assert_eq!(endpoints, &["https://consul:8501"]);
            assert_eq!(token.as_deref(), Some("t0k"));
            assert_eq!(*deregister_critical_after, secs(300));
            assert_eq!(tags, &["blue", "v2"]);
            assert_eq!(*wait, secs(30));
            assert_eq!(datacenter.as_deref(), Some("dc2"));
            // Relative paths are kept as given.
            assert_eq!(
                ca.as_deref(),
                Some(std::path::Path::new("certs/consul-ca.pem"))
            );
        }
        other => panic!("expected consul, got {other:?}"),
    }
    match &c.registries[2].kind {
        RegistryKind::Static {
            file,
            poll_interval,
        } => {
            assert_eq!(file, &PathBuf::from("endpoints.toml"));
            assert_eq!(*poll_interval, Duration::from_millis(250));
        }
        other => panic!("expected static, got {other:?}"),
    }
}

#[test]
fn consul_defaults() {
    let c = load("[service]\nname = \"b\"\naddress = \"app:1\"\n[registry]\nkind = \"consul\"");
    match &c.registries[0].kind {
        RegistryKind::Consul {
            endpoints,
            token,
            deregister_critical_after,
            tags,
            wait,
            datacenter,
            ca,
        } => {
            assert_eq!(endpoints, &["http://127.0.0.1:8500"]);
            assert_eq!(*deregister_critical_after, secs(60));
            assert_eq!(*wait, secs(60));
            assert!(tags.is_empty());
            assert_eq!((token, datacenter, ca), (&None, &None, &None));
        }
        other => panic!("expected consul, got {other:?}"),
    }
}

#[test]
fn outbound_policy_is_the_default_for_upstreams() {
    let c = load(&minimal_with(
        r#"
        [outbound]
        mesh_domain = "svc.mesh"
        lb = "least-request"
        retries = 5
        per_try_timeout = "3s"
        [outbound.outlier]
        consecutive_failures = 9
        [[upstreams]]
        name = "c"
        retries = 0
        lb = "random"
        [upstreams.outlier]
        max_ejection_percent = 10
        [[upstreams]]
        name = "d"
        timeout = "1m30s"
        "#,
    ));
    assert_eq!(c.outbound.mesh_domain, "svc.mesh");
    let defaults = &c.outbound.defaults;
    assert_eq!(defaults.lb, LbKind::LeastRequest);
    assert_eq!(defaults.retries, 5);
    assert_eq!(defaults.outlier.consecutive_failures, 9);

    let c_policy = c.policy_for("c");
    assert_eq!(c_policy.lb, LbKind::Random);
    assert_eq!(c_policy.retries, 0);
    assert_eq!(c_policy.per_try_timeout, Some(secs(3)), "inherited");
    assert_eq!(c_policy.outlier.consecutive_failures, 9, "inherited");
    assert_eq!(c_policy.outlier.max_ejection_percent, 10);

    let d_policy = c.policy_for("d");
    assert_eq!(d_policy.lb, LbKind::LeastRequest);
    assert_eq!(d_policy.retries, 5);
    assert_eq!(d_policy.timeout, secs(90));
    assert_eq!(d_policy.outlier.max_ejection_percent, 50);
    assert_eq!(c.upstreams[1].local_port, None);
}

#[test]
fn every_invalid_field_is_reported_at_once() {
    let paths = problem_paths(
        r#"
        [service]
        name = "B_1"
        address = "127.0.0.1:8080"
        weight = "heavy"
        [listeners]
        admin = "localhost"
        [registry]
        kind = "etcd"
        endpoints = ["http://ok:2379", "http://ok2:2379", "etcd:2379"]
        [[upstreams]]
        name = "c"
        [[upstreams]]
        name = "d"
        timeout = "2x"
        retries = 11
        [limits]
        max_header_bytes = "2MiB"
        "#,
    );
    assert_eq!(
        paths,
        vec![
            "service.name",
            "service.weight",
            "listeners.admin",
            "registry.endpoints[2]",
            "upstreams[1].timeout",
            "upstreams[1].retries",
            "limits.max_header_bytes",
        ]
    );
}

#[test]
fn problems_say_what_was_expected() {
    let got = problems(
        r#"
        [service]
        name = "b"
        address = "127.0.0.1:8080"
        weight = "heavy"
        tags = ["x", 3]
        metadata = { team = 7 }
        [service.health]
        http = "healthz"
        [registry]
        kind = "zookeeper"
        prefix = "/outrigger/"
        [outbound]
        lb = "fastest"
        connect_timeout = "0s"
        [[upstreams]]
        name = "c"
        [[upstreams]]
        name = "d"
        timeout = "2x"
        [runtime]
        worker_threads = 0
        drain_timeout = 10
        scheduling = "realtime"
        [limits]
        max_header_bytes = "2MiB"
        max_headers = true
        "#,
    );
    assert_eq!(
        got,
        vec![
            r#"service.weight: expected an integer 1..=10000, got "heavy""#,
            "service.tags[1]: expected a string, got 3",
            "service.metadata.team: expected a string, got 7",
            r#"service.health.http: "healthz" must start with '/'"#,
            "runtime.worker_threads: expected an integer 1..=64, got 0",
            r#"runtime.drain_timeout: expected a duration like "5s", got 10"#,
            r#"runtime.scheduling: expected "adaptive" or "normal", got "realtime""#,
            r#"registry.kind: expected one of "etcd", "consul", "static", got "zookeeper""#,
            r#"registry.prefix: "/outrigger/" must start with '/' and not end with '/' (e.g. "/outrigger")"#,
            r#"outbound.lb: expected one of "p2c-ewma", "round-robin", "least-request", "random", got "fastest""#,
            "outbound.connect_timeout: must be greater than 0s",
            r#"upstreams[1].timeout: "2x" is not a duration (use 500ms, 5s, 1m)"#,
            "limits.max_header_bytes: must be between 1KiB and 1MiB, got 2MiB",
            "limits.max_headers: expected an integer 1..=1000, got true",
        ]
    );
}

#[test]
fn missing_required_fields() {
    assert_eq!(
        problems("[tls]\nallow = []"),
        vec![
            "service.name: missing (required)",
            "service.address: missing (required)",
            "registry: missing (required)",
            "tls.ca: missing (required)",
            "tls.cert: missing (required)",
            "tls.key: missing (required)",
            "tls.trust_domain: missing (required)",
        ]
    );
    assert_eq!(
        problems("[service]\nname = \"b\"\naddress = \"a:1\"\n[registry]\nttl = \"5s\"\n[[upstreams]]\nretries = 1"),
        vec![
            "registry.kind: missing (required)",
            "upstreams[0].name: missing (required)",
        ]
    );
    assert_eq!(
        problems("[service]\nname = \"b\"\naddress = \"a:1\"\nregistry = []"),
        vec![
            "service.registry: unknown field",
            "registry: missing (required)",
        ]
    );
    assert_eq!(
        problems("registry = []\n[service]\nname = \"b\"\naddress = \"a:1\""),
        vec!["registry: needs at least one entry"]
    );
}

#[test]
fn unknown_fields_are_reported_with_suggestions() {
    let got = problems(&format!(
        r#"
        colour = "blue"
        {MINIMAL}
        [listeners]
        outbund = "127.0.0.1:15001"
        [outbound]
        retrys = 3
        [outbound.outlier]
        max_ejections = "1m"
        [limitz]
        max_headers = 10
        "#,
    ));
    assert_eq!(
        got,
        vec![
            "colour: unknown field",
            r#"limitz: unknown field (did you mean "limits"?)"#,
            r#"listeners.outbund: unknown field (did you mean "outbound"?)"#,
            r#"outbound.retrys: unknown field (did you mean "retries"?)"#,
            r#"outbound.outlier.max_ejections: unknown field (did you mean "max_ejection"?)"#,
        ]
    );
}

#[test]
fn fields_of_another_registry_kind_are_rejected() {
    let got = problems(
        r#"
        [service]
        name = "b"
        address = "app:8080"
        [[registry]]
        kind = "etcd"
        file = "endpoints.toml"
        token = "x"
        [[registry]]
        kind = "static"
        endpoints = ["http://etcd:2379"]
        [registry.extra]
        "#,
    );
    assert_eq!(
        got,
        vec![
            r#"registry[0].token: only valid with kind = "consul""#,
            r#"registry[0].file: only valid with kind = "static""#,
            "registry[1].extra: unknown field",
            r#"registry[1].endpoints: only valid with kind = "etcd""#,
            "registry[1].file: missing (required)",
        ]
    );
}

#[test]
fn registry_field_rules() {
    let got = problems(
        r#"
        [service]
        name = "b"
        address = "app:8080"
        [[registry]]
        kind = "etcd"
        ttl = "500ms"
        username = "u"
        endpoints = []
        [[registry]]
        kind = "consul"
        endpoints = ["consul:8500"]
        deregister_critical_after = "30s"
        wait = "11m"
        tags = [""]
        token = ""
        password = "p"
        [[registry]]
        kind = "static"
        file = ""
        poll_interval = "0s"
        "#,
    );
    assert_eq!(
        got,
        vec![
            "registry[0].ttl: must be at least 1s, got 500ms",
            "registry[0].endpoints: needs at least one endpoint",
            "registry[0].password: missing (required when username is set)",
            r#"registry[1].password: only valid with kind = "etcd""#,
            r#"registry[1].endpoints[0]: "consul:8500" must be an http:// or https:// URL (e.g. "http://127.0.0.1:2379")"#,
            "registry[1].wait: must be at most 10m (Consul caps blocking queries there)",
            r#"registry[1].tags[0]: "" is not a usable tag (1-255 printable characters)"#,
            "registry[1].token: must be a non-empty token without control characters",
            "registry[1].deregister_critical_after: must be at least 1m, got 30s",
            "registry[2].file: must not be empty",
            "registry[2].poll_interval: must be greater than 0s",
        ]
    );
}

#[test]
fn service_field_rules() {
    let got = problems(
        r#"
        [service]
        name = "-b"
        instance_id = "b 1"
        address = "app:0"
        advertise = "0.0.0.0:15006"
        weight = 0
        [service.health]
        http = "/hz"
        tcp = true
        interval = "50ms"
        unhealthy_threshold = 0
        [registry]
        kind = "etcd"
        "#,
    );
    assert_eq!(
        got,
        vec![
            r#"service.name: "-b" is not a valid service name (1-63 lowercase letters, digits or '-', starting and ending with a letter or digit)"#,
            r#"service.instance_id: "b 1" is not a valid instance id (1-128 letters, digits, '.', '_' or '-')"#,
            r#"service.address: "app:0" is not host:port (e.g. "127.0.0.1:8080" or "app:8080"; port 1..=65535)"#,
            r#"service.advertise: "0.0.0.0:15006" is a wildcard address peers cannot dial (use this host's name or IP)"#,
            "service.weight: expected an integer 1..=10000, got 0",
            "service.health.tcp: cannot be combined with http (choose one check)",
            "service.health.interval: must be at least 100ms, got 50ms",
            "service.health.unhealthy_threshold: expected an integer >= 1, got 0",
        ]
    );
    assert_eq!(
        problems(&format!(
            "{MINIMAL}\n[service.health]\ntcp = false\ninterval = \"1s\"\ntimeout = \"2s\""
        )),
        vec![
            r#"service.health.tcp: false needs http = "/path" (otherwise there is no check)"#,
            "service.health.timeout: must not exceed interval (1s), got 2s",
        ]
    );
}

#[test]
fn bad_hostname_cannot_default_instance_id() {
    let table: toml::Table = MINIMAL.parse().unwrap();
    let err = validate_with(&table, &|| "bad host!".to_owned()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid config: 1 problem\nservice.instance_id: not set, and the hostname cannot \
         serve as default: \"bad host!\" is not a valid instance id (1-128 letters, digits, \
         '.', '_' or '-')"
    );
}

#[test]
fn addresses_accept_hostnames_and_ipv6() {
    for ok in [
        "app:8080",
        "[::1]:8080",
        "10.0.0.1:1",
        "my-app.ns.svc:65535",
    ] {
        let c = load(&MINIMAL.replace("127.0.0.1:8080", ok));
        assert_eq!(c.service.address, ok);
    }
    for bad in [
        "app",
        "app:",
        ":80",
        "::1:8080",
        "app:65536",
        "a_b:80",
        "app:http",
    ] {
        let got = problem_paths(&MINIMAL.replace("127.0.0.1:8080", bad));
        assert_eq!(got, vec!["service.address"], "{bad}");
    }
}

#[test]
fn listener_and_port_conflicts() {
    let got = problems(&minimal_with(
        r#"
        [listeners]
        outbound = "127.0.0.1:15001"
        inbound = "0.0.0.0:15001"
        admin = "127.0.0.1:0"
        ingress = "0.0.0.0:0"
        [[upstreams]]
        name = "c"
        local_port = 15001
        [[upstreams]]
        name = "d"
        local_port = 9000
        [[upstreams]]
        name = "c"
        local_port = 9000
        "#,
    ));
    assert_eq!(
        got,
        vec![
            "listeners.inbound: 0.0.0.0:15001 conflicts with listeners.outbound (127.0.0.1:15001)",
            "upstreams[0].local_port: 15001 is already used by listeners.outbound (127.0.0.1:15001)",
            r#"upstreams[2].name: "c" is already configured by upstreams[0]"#,
            "upstreams[2].local_port: 9000 is already used by upstreams[1].local_port",
        ]
    );
    // A listener on another specific IP does not take the loopback port.
    let c = load(&minimal_with(
        "[listeners]\ningress = \"10.0.0.5:9000\"\n[[upstreams]]\nname = \"c\"\nlocal_port = 9000",
    ));
    assert_eq!(c.upstreams[0].local_port, Some(9000));
}

#[test]
fn outlier_ejection_bounds() {
    let got = problems(&minimal_with(
        r#"
        [outbound.outlier]
        base_ejection = "10m"
        [[upstreams]]
        name = "c"
        [[upstreams]]
        name = "d"
        [upstreams.outlier]
        max_ejection = "1m"
        base_ejection = "2m"
        consecutive_failures = 0
        "#,
    ));
    // The inherited clash is reported once, where it was written.
    assert_eq!(
        got,
        vec![
            "outbound.outlier.base_ejection: must not exceed max_ejection (5m), got 10m",
            "upstreams[1].outlier.consecutive_failures: expected an integer >= 1, got 0",
            "upstreams[1].outlier.max_ejection: must be at least base_ejection (2m), got 1m",
        ]
    );
}

#[test]
fn limits_and_tls_rules() {
    let c = load(&minimal_with(
        "[limits]\nmax_header_bytes = 4096\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\ntrust_domain = \"example.org\"",
    ));
    assert_eq!(c.limits.max_header_bytes, 4096);
    let tls = c.tls.unwrap();
    assert_eq!(tls.ca, PathBuf::from("ca.pem"));
    assert!(tls.allow.is_empty());
    assert_eq!(tls.reload_interval, secs(5));

    let got = problems(&minimal_with(
        r#"
        [limits]
        max_header_bytes = 512
        header_read_timeout = "0s"
        [tls]
        ca = "ca.pem"
        cert = "c.pem"
        key = "k.pem"
        trust_domain = "Mesh..Local"
        allow = ["a", "B"]
        mode = "loose"
        "#,
    ));
    assert_eq!(
        got,
        vec![
            "limits.max_header_bytes: must be between 1KiB and 1MiB, got 512B",
            "limits.header_read_timeout: must be greater than 0s",
            r#"tls.trust_domain: "Mesh..Local" is not a valid DNS name (lowercase labels of letters, digits and '-', separated by '.')"#,
            r#"tls.allow[1]: "B" is not a valid service name (1-63 lowercase letters, digits or '-', starting and ending with a letter or digit)"#,
            r#"tls.mode: "loose" is not a TLS mode (use "strict" or "permissive")"#,
        ]
    );
}

#[test]
fn wrong_section_shapes() {
    let got = problems(
        r#"
        service = "b"
        listeners = 5
        registry = "etcd"
        [upstreams]
        name = "c"
        "#,
    );
    assert_eq!(
        got,
        vec![
            r#"service: expected a table, got "b""#,
            "service.name: missing (required)",
            "service.address: missing (required)",
            "listeners: expected a table, got 5",
            r#"registry: expected a table ([registry]) or an array of tables ([[registry]]), got "etcd""#,
            "upstreams: expected an array of tables ([[upstreams]]), got a table",
        ]
    );
}

#[test]
fn error_display_formats() {
    let err = check("[service]\nname = \"b\"").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid config: 2 problems\nservice.address: missing (required)\nregistry: missing (required)"
    );
    let field = FieldError {
        path: "service.name".into(),
        message: "missing (required)".into(),
    };
    assert_eq!(field.to_string(), "service.name: missing (required)");

    let err = Config::from_str_with_env("[service", Vec::new()).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("config is not valid TOML: "),
        "{err}"
    );

    let err = Config::load(
        std::path::Path::new("/nonexistent/outrigger.toml"),
        Vec::new(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, ConfigError::Read { path, .. } if path == std::path::Path::new("/nonexistent/outrigger.toml"))
    );
    assert!(
        err.to_string()
            .starts_with("cannot read config file /nonexistent/outrigger.toml: "),
        "{err}"
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn load_reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let c = Config::load(&path, vec![("OUTRIGGER_SERVICE__ZONE".into(), "z9".into())]).unwrap();
    assert_eq!(c.service.zone.as_deref(), Some("z9"));
}

#[test]
fn redacted_json_hides_secrets_and_shows_everything_else() {
    let c = load(EXAMPLE);
    let j = c.redacted_json();
    let registry = &j["registry"][0];
    assert_eq!(registry["password"], json!("<redacted>"));
    assert_eq!(registry["username"], json!("u"));
    assert_eq!(registry["kind"], json!("etcd"));
    assert_eq!(registry["ttl"], json!("5s"));
    assert!(!j.to_string().contains("\"p\""), "password leaked: {j}");

    assert_eq!(
        j["service"],
        json!({
            "name": "b",
            "instance_id": "b-1",
            "address": "127.0.0.1:8080",
            "advertise": "b-1:15006",
            "zone": "z1",
            "weight": 100,
            "tags": ["x"],
            "metadata": { "k": "v" },
            "health": {
                "http": "/healthz",
                "interval": "1s",
                "timeout": "500ms",
                "healthy_threshold": 1,
                "unhealthy_threshold": 2,
            },
        })
    );
    assert_eq!(
        j["listeners"],
        json!({
            "outbound": "127.0.0.1:15001",
            "inbound": "0.0.0.0:15006",
            "admin": "127.0.0.1:15000",
            "ingress": "0.0.0.0:8080",
        })
    );
    assert_eq!(
        j["runtime"],
        json!({
            "worker_threads": 1,
            "drain_timeout": "10s",
            "state_dir": "/var/lib/outrigger",
            "scheduling": "normal",
        })
    );
    assert_eq!(j["outbound"]["mesh_domain"], json!("mesh"));
    assert_eq!(j["outbound"]["per_try_timeout"], json!(null));
    assert_eq!(
        j["upstreams"][0],
        json!({
            "name": "c",
            "local_port": 9191,
            "lb": "p2c-ewma",
            "connect_timeout": "1s",
            "timeout": "15s",
            "per_try_timeout": "2s",
            "idle_timeout": "1m",
            "retries": 2,
            "retry_budget_percent": 20,
            "retry_budget_min_per_sec": 10,
            "max_requests": 10000,
            "max_requests_per_endpoint": 1000,
            "panic_threshold_percent": 50,
            "outlier": {
                "consecutive_failures": 5,
                "consecutive_connect_failures": 2,
                "base_ejection": "30s",
                "max_ejection": "5m",
                "max_ejection_percent": 50,
            },
        })
    );
    assert_eq!(j["limits"]["max_header_bytes"], json!(61440));
    assert_eq!(j["limits"]["idle_connection_timeout"], json!("1m30s"));
    assert_eq!(j["tls"]["allow"], json!(["a"]));
    assert_eq!(j["tls"]["key"], json!("/certs/b-key.pem"));
}

#[test]
fn redaction_of_consul_token_and_unset_secrets() {
    let c = load(
        r#"
        [service]
        name = "b"
        address = "app:8080"
        [[registry]]
        kind = "consul"
        token = "s3cr3t"
        [[registry]]
        kind = "etcd"
        [[registry]]
        kind = "static"
        file = "e.toml"
        "#,
    );
    let j = c.redacted_json();
    assert_eq!(j["registry"][0]["token"], json!("<redacted>"));
    assert_eq!(j["registry"][0]["deregister_critical_after"], json!("1m"));
    // Unset secrets stay null so an operator can tell they are unset.
    assert_eq!(j["registry"][1]["password"], json!(null));
    assert_eq!(j["registry"][2]["file"], json!("e.toml"));
    assert_eq!(j["service"]["health"]["tcp"], json!(true));
    assert_eq!(j["tls"], json!(null));
    assert!(!j.to_string().contains("s3cr3t"));
}

#[test]
fn integer_range_wording() {
    let got = problems(&minimal_with(
        r#"
        [outbound]
        max_requests = 5000000000
        max_requests_per_endpoint = "many"
        retry_budget_min_per_sec = -1
        [service.health]
        tcp = "yes"
        "#,
    ));
    assert_eq!(
        got,
        vec![
            r#"service.health.tcp: expected true or false, got "yes""#,
            "outbound.retry_budget_min_per_sec: expected an integer >= 0, got -1",
            "outbound.max_requests: expected an integer 1..=4294967295, got 5000000000",
            r#"outbound.max_requests_per_endpoint: expected an integer >= 1, got "many""#,
        ]
    );
}

#[test]
fn consul_ttl_must_span_two_probe_ticks() {
    let got = problems(
        r#"
        [service]
        name = "b"
        address = "app:8080"
        [service.health]
        interval = "2s"
        [[registry]]
        kind = "etcd"
        ttl = "2s"
        [[registry]]
        kind = "consul"
        ttl = "3s"
        "#,
    );
    assert_eq!(
        got,
        vec![
            r#"registry[1].ttl: must be at least twice service.health.interval (2s) for kind = "consul": the check is passed on probe ticks"#
        ]
    );
    // Enough: no problem.
    let c = load(
        "[service]\nname = \"b\"\naddress = \"app:1\"\n[registry]\nkind = \"consul\"\nttl = \"2s\"",
    );
    assert_eq!(c.registries[0].ttl, secs(2));
}
