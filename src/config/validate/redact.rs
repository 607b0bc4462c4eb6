//! The `/config` rendering: every effective value (defaults included), in
//! the file's own vocabulary, with secrets replaced.

use std::path::Path;

use serde_json::{json, Value};

use crate::config::{
    format_duration, Config, HealthCheck, LbKind, OutlierConfig, RegistryConfig, RegistryKind,
    Scheduling, TlsMode, UpstreamPolicy,
};

/// What a set secret is shown as. Unset secrets are `null`, so an operator
/// can still see *whether* one is configured.
const REDACTED: &str = "<redacted>";

/// `config` as JSON with `password` and `token` redacted and durations as
/// strings like `"5s"`. Shaped like the TOML (`registry` is always a list).
pub(crate) fn redacted_json(config: &Config) -> Value {
    let service = &config.service;
    let health = &service.health;
    let mut health_json = json!({
        "interval": format_duration(health.interval),
        "timeout": format_duration(health.timeout),
        "healthy_threshold": health.healthy_threshold,
        "unhealthy_threshold": health.unhealthy_threshold,
    });
    match &health.check {
        HealthCheck::Http { path } => health_json["http"] = json!(path),
        HealthCheck::Tcp => health_json["tcp"] = json!(true),
    }

    let mut outbound = policy_json(&config.outbound.defaults);
    outbound["mesh_domain"] = json!(config.outbound.mesh_domain);

    let upstreams: Vec<Value> = config
        .upstreams
        .iter()
        .map(|upstream| {
            let mut entry = policy_json(&upstream.policy);
            entry["name"] = json!(upstream.name);
            entry["local_port"] = json!(upstream.local_port);
            entry
        })
        .collect();

    let limits = &config.limits;
    json!({
        "service": {
            "name": service.name,
            "instance_id": service.instance_id,
            "address": service.address,
            "advertise": service.advertise,
            "zone": service.zone,
            "weight": service.weight,
            "tags": service.tags,
            "metadata": service.metadata,
            "health": health_json,
        },
        "listeners": {
            "outbound": config.listeners.outbound.to_string(),
            "inbound": config.listeners.inbound.to_string(),
            "admin": config.listeners.admin.to_string(),
            "ingress": config.listeners.ingress.map(|a| a.to_string()),
        },
        "runtime": {
            "worker_threads": config.runtime.worker_threads,
            "drain_timeout": format_duration(config.runtime.drain_timeout),
            "state_dir": config.runtime.state_dir.as_deref().map(path),
            "scheduling": match config.runtime.scheduling {
                Scheduling::Adaptive => "adaptive",
                Scheduling::Normal => "normal",
            },
        },
        "registry": config.registries.iter().map(registry_json).collect::<Vec<_>>(),
        "outbound": outbound,
        "upstreams": upstreams,
        "limits": {
            "max_header_bytes": limits.max_header_bytes,
            "max_headers": limits.max_headers,
            "header_read_timeout": format_duration(limits.header_read_timeout),
            "max_connections": limits.max_connections,
            "max_concurrent_streams": limits.max_concurrent_streams,
            "idle_connection_timeout": format_duration(limits.idle_connection_timeout),
        },
        "tls": config.tls.as_ref().map(|tls| json!({
            "ca": path(&tls.ca),
            "cert": path(&tls.cert),
            "key": path(&tls.key),
            "trust_domain": tls.trust_domain,
            "allow": tls.allow,
            "reload_interval": format_duration(tls.reload_interval),
            "mode": match tls.mode {
                TlsMode::Strict => "strict",
                TlsMode::Permissive => "permissive",
            },
        })),
    })
}

fn registry_json(registry: &RegistryConfig) -> Value {
    let secret = |s: &Option<String>| s.as_ref().map(|_| REDACTED);
    let mut entry = match &registry.kind {
        RegistryKind::Etcd {
            endpoints,
            username,
            password,
        } => json!({
            "kind": "etcd",
            "endpoints": endpoints,
            "username": username,
            "password": secret(password),
        }),
        RegistryKind::Consul {
            endpoints,
            token,
            deregister_critical_after,
            tags,
            wait,
            datacenter,
            ca,
        } => json!({
            "kind": "consul",
            "endpoints": endpoints,
            "token": secret(token),
            "deregister_critical_after": format_duration(*deregister_critical_after),
            "tags": tags,
            "wait": format_duration(*wait),
            "datacenter": datacenter,
            "ca": ca.as_deref().map(path),
        }),
        RegistryKind::Static {
            file,
            poll_interval,
        } => json!({
            "kind": "static",
            "file": path(file),
            "poll_interval": format_duration(*poll_interval),
        }),
    };
    entry["prefix"] = json!(registry.prefix);
    entry["ttl"] = json!(format_duration(registry.ttl));
    entry
}

fn policy_json(policy: &UpstreamPolicy) -> Value {
    json!({
        "lb": lb_name(policy.lb),
        "connect_timeout": format_duration(policy.connect_timeout),
        "timeout": format_duration(policy.timeout),
        "per_try_timeout": policy.per_try_timeout.map(format_duration),
        "idle_timeout": format_duration(policy.idle_timeout),
        "retries": policy.retries,
        "retry_budget_percent": policy.retry_budget_percent,
        "retry_budget_min_per_sec": policy.retry_budget_min_per_sec,
        "max_requests": policy.max_requests,
        "max_requests_per_endpoint": policy.max_requests_per_endpoint,
        "panic_threshold_percent": policy.panic_threshold_percent,
        "outlier": outlier_json(&policy.outlier),
    })
}

fn outlier_json(outlier: &OutlierConfig) -> Value {
    json!({
        "consecutive_failures": outlier.consecutive_failures,
        "consecutive_connect_failures": outlier.consecutive_connect_failures,
        "base_ejection": format_duration(outlier.base_ejection),
        "max_ejection": format_duration(outlier.max_ejection),
        "max_ejection_percent": outlier.max_ejection_percent,
    })
}

fn lb_name(lb: LbKind) -> &'static str {
    match lb {
        LbKind::P2cEwma => "p2c-ewma",
        LbKind::RoundRobin => "round-robin",
        LbKind::LeastRequest => "least-request",
        LbKind::Random => "random",
    }
}

/// Paths as given; a non-UTF-8 path is shown lossily rather than failing.
fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
