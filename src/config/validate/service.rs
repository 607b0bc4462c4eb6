//! `[service]` and `[service.health]`.

use std::net::SocketAddr;
use std::time::Duration;

use super::{check_host_port, check_service_name};
use crate::config::raw::Section;
use crate::config::{HealthCheck, HealthConfig, ServiceConfig};

const SERVICE_KEYS: &[&str] = &[
    "name",
    "instance_id",
    "address",
    "advertise",
    "zone",
    "weight",
    "tags",
    "metadata",
    "health",
];

const HEALTH_KEYS: &[&str] = &[
    "http",
    "tcp",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
];

/// `[service]`. `advertise` is left empty when unset: its default depends
/// on `[listeners]`, see [`default_advertise`].
pub(super) fn service(sec: &Section<'_>, hostname: &dyn Fn() -> String) -> ServiceConfig {
    sec.deny_unknown(SERVICE_KEYS);
    sec.require("name");
    let name = sec
        .parse("name", "a string", check_service_name)
        .unwrap_or_default();
    let instance_id = if sec.has("instance_id") {
        sec.parse("instance_id", "a string", check_instance_id)
            .unwrap_or_default()
    } else {
        // The hostname is usually a fine id, but it is not ours to trust.
        check_instance_id(&hostname()).unwrap_or_else(|message| {
            sec.error(
                "instance_id",
                format!("not set, and the hostname cannot serve as default: {message}"),
            );
            String::new()
        })
    };
    sec.require("address");
    let address = sec
        .parse("address", "a string", check_host_port)
        .unwrap_or_default();
    let advertise = sec
        .parse("advertise", "a string", check_advertise)
        .unwrap_or_default();
    ServiceConfig {
        name,
        instance_id,
        address,
        advertise,
        zone: sec.string("zone"),
        weight: sec.int("weight", 1, 10_000).unwrap_or(100),
        tags: sec.strings("tags", |_| Ok(())).unwrap_or_default(),
        metadata: sec.string_map("metadata").unwrap_or_default(),
        health: health(&sec.table("health")),
    }
}

/// What peers dial when `advertise` is unset: the inbound listener, unless
/// it is bound to a wildcard address nobody can dial, in which case the
/// hostname with the inbound port.
pub(super) fn default_advertise(inbound: SocketAddr, hostname: &dyn Fn() -> String) -> String {
    if inbound.ip().is_unspecified() {
        format!("{}:{}", hostname(), inbound.port())
    } else {
        inbound.to_string()
    }
}

/// `[A-Za-z0-9._-]{1,128}`: it becomes a registry key and a Consul id.
fn check_instance_id(s: &str) -> Result<String, String> {
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a valid instance id (1-128 letters, digits, '.', '_' or '-')"
        ))
    }
}

/// Like `address`, but a wildcard IP is useless to the peers dialing it.
fn check_advertise(s: &str) -> Result<String, String> {
    let s = check_host_port(s)?;
    match s.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => Err(format!(
            "{s:?} is a wildcard address peers cannot dial (use this host's name or IP)"
        )),
        _ => Ok(s),
    }
}

/// `[service.health]`; absent means a TCP check with the defaults.
fn health(sec: &Section<'_>) -> HealthConfig {
    sec.deny_unknown(HEALTH_KEYS);
    let http = sec.parse("http", r#"a path like "/healthz""#, |s| {
        if s.starts_with('/') {
            Ok(s.to_owned())
        } else {
            Err(format!("{s:?} must start with '/'"))
        }
    });
    let check = match (http, sec.bool("tcp")) {
        (Some(_), Some(true)) => {
            sec.error("tcp", "cannot be combined with http (choose one check)");
            HealthCheck::Tcp
        }
        (Some(path), _) => HealthCheck::Http { path },
        (None, Some(false)) if !sec.has("http") => {
            sec.error(
                "tcp",
                r#"false needs http = "/path" (otherwise there is no check)"#,
            );
            HealthCheck::Tcp
        }
        (None, _) => HealthCheck::Tcp,
    };
    let interval = sec
        .duration_at_least("interval", Duration::from_millis(100))
        .unwrap_or(Duration::from_secs(1));
    // The default timeout shrinks with a short interval instead of making a
    // valid `interval = "200ms"` fail over a value the user never wrote.
    let timeout = match sec.positive_duration("timeout") {
        Some(timeout) if timeout > interval => {
            sec.error(
                "timeout",
                format!(
                    "must not exceed interval ({}), got {}",
                    crate::config::format_duration(interval),
                    crate::config::format_duration(timeout)
                ),
            );
            timeout
        }
        Some(timeout) => timeout,
        None => Duration::from_millis(500).min(interval),
    };
    HealthConfig {
        check,
        interval,
        timeout,
        healthy_threshold: sec
            .int("healthy_threshold", 1, i64::from(u32::MAX))
            .unwrap_or(1),
        unhealthy_threshold: sec
            .int("unhealthy_threshold", 1, i64::from(u32::MAX))
            .unwrap_or(2),
    }
}
