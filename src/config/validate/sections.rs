//! `[listeners]`, `[runtime]`, `[limits]` and `[tls]`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::{check_dns_name, check_service_name};
use crate::config::raw::Section;
use crate::config::{Limits, Listeners, Runtime, Scheduling, TlsConfig, TlsMode};

const LISTENER_KEYS: &[&str] = &["outbound", "inbound", "admin", "ingress"];
const RUNTIME_KEYS: &[&str] = &["worker_threads", "drain_timeout", "state_dir", "scheduling"];
const LIMIT_KEYS: &[&str] = &[
    "max_header_bytes",
    "max_headers",
    "header_read_timeout",
    "max_connections",
    "max_concurrent_streams",
    "idle_connection_timeout",
];
const TLS_KEYS: &[&str] = &[
    "ca",
    "cert",
    "key",
    "trust_domain",
    "allow",
    "reload_interval",
    "mode",
];

/// `[listeners]`, rejecting two listeners that could not both bind.
pub(super) fn listeners(sec: &Section<'_>) -> Listeners {
    sec.deny_unknown(LISTENER_KEYS);
    let socket = |key: &str, default: SocketAddr| socket_addr(sec, key).unwrap_or(default);
    let listeners = Listeners {
        outbound: socket("outbound", SocketAddr::from((Ipv4Addr::LOCALHOST, 15001))),
        inbound: socket("inbound", SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15006))),
        admin: socket("admin", SocketAddr::from((Ipv4Addr::LOCALHOST, 15000))),
        ingress: socket_addr(sec, "ingress"),
    };
    // Caught here, this is one clear line instead of an "address in use"
    // from whichever listener happens to bind second.
    let named = named_listeners(&listeners);
    for (i, (name, addr)) in named.iter().enumerate() {
        let clash = named[..i]
            .iter()
            .find(|(_, earlier)| overlaps(*addr, *earlier));
        if let Some((other, other_addr)) = clash {
            sec.error(
                name,
                format!("{addr} conflicts with listeners.{other} ({other_addr})"),
            );
        }
    }
    listeners
}

/// The listeners by their config key, in declaration order.
pub(super) fn named_listeners(listeners: &Listeners) -> Vec<(&'static str, SocketAddr)> {
    let mut named = vec![
        ("outbound", listeners.outbound),
        ("inbound", listeners.inbound),
        ("admin", listeners.admin),
    ];
    named.extend(listeners.ingress.map(|addr| ("ingress", addr)));
    named
}

/// Whether two binds would collide: same port, and the same IP or either
/// one a wildcard. Port 0 (an ephemeral port, as in tests) never collides.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn socket_addr(sec: &Section<'_>, key: &str) -> Option<SocketAddr> {
    sec.parse(key, r#"a socket address like "127.0.0.1:15001""#, |s| {
        s.parse().map_err(|_| {
            format!(r#"{s:?} is not a socket address (use ip:port, e.g. "127.0.0.1:15001")"#)
        })
    })
}

/// `[runtime]`.
pub(super) fn runtime(sec: &Section<'_>) -> Runtime {
    sec.deny_unknown(RUNTIME_KEYS);
    Runtime {
        worker_threads: sec.int("worker_threads", 1, 64).unwrap_or(1),
        // Zero is allowed: it means "stop at once".
        drain_timeout: sec
            .duration("drain_timeout")
            .unwrap_or(Duration::from_secs(10)),
        state_dir: sec.path_buf("state_dir"),
        scheduling: sec
            .parse("scheduling", "a string", |s| match s {
                "adaptive" => Ok(Scheduling::Adaptive),
                "normal" => Ok(Scheduling::Normal),
                other => Err(format!(r#"expected "adaptive" or "normal", got {other:?}"#)),
            })
            .unwrap_or(Scheduling::Adaptive),
    }
}

/// `[limits]`.
pub(super) fn limits(sec: &Section<'_>) -> Limits {
    sec.deny_unknown(LIMIT_KEYS);
    let header_bytes = sec
        .size("max_header_bytes", 1 << 10, 1 << 20)
        .unwrap_or(60 << 10);
    Limits {
        // Bounded to 1MiB above, so the conversion cannot fail.
        max_header_bytes: usize::try_from(header_bytes).unwrap_or(60 << 10),
        max_headers: sec.int("max_headers", 1, 1_000).unwrap_or(100),
        header_read_timeout: sec
            .positive_duration("header_read_timeout")
            .unwrap_or(Duration::from_secs(10)),
        max_connections: sec
            .int("max_connections", 1, i64::from(u32::MAX))
            .unwrap_or(4096),
        max_concurrent_streams: sec
            .int("max_concurrent_streams", 1, i64::from(u32::MAX))
            .unwrap_or(256),
        idle_connection_timeout: sec
            .positive_duration("idle_connection_timeout")
            .unwrap_or(Duration::from_secs(90)),
    }
}

/// `[tls]`; absent means plaintext between sidecars.
pub(super) fn tls(sec: &Section<'_>) -> Option<TlsConfig> {
    if !sec.is_present() {
        return None;
    }
    sec.deny_unknown(TLS_KEYS);
    for key in ["ca", "cert", "key", "trust_domain"] {
        sec.require(key);
    }
    Some(TlsConfig {
        ca: sec.path_buf("ca").unwrap_or_default(),
        cert: sec.path_buf("cert").unwrap_or_default(),
        key: sec.path_buf("key").unwrap_or_default(),
        trust_domain: sec
            .parse("trust_domain", "a string", check_dns_name)
            .unwrap_or_default(),
        allow: sec
            .strings("allow", |s| check_service_name(s).map(drop))
            .unwrap_or_default(),
        reload_interval: sec
            .positive_duration("reload_interval")
            .unwrap_or(Duration::from_secs(5)),
        mode: sec
            .parse("mode", r#""strict" or "permissive""#, |s| match s {
                "strict" => Ok(TlsMode::Strict),
                "permissive" => Ok(TlsMode::Permissive),
                other => Err(format!(
                    r#"{other:?} is not a TLS mode (use "strict" or "permissive")"#
                )),
            })
            .unwrap_or(TlsMode::Strict),
    })
}
