//! `[outbound]`, `[[upstreams]]` and the policy keys they share.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use super::sections::named_listeners;
use super::{check_dns_name, check_service_name};
use crate::config::raw::Section;
use crate::config::{
    format_duration, LbKind, Listeners, OutboundConfig, OutlierConfig, UpstreamConfig,
    UpstreamPolicy,
};

/// Keys valid both in `[outbound]` (as defaults) and in `[[upstreams]]`.
const POLICY_KEYS: &[&str] = &[
    "lb",
    "connect_timeout",
    "timeout",
    "per_try_timeout",
    "idle_timeout",
    "retries",
    "retry_budget_percent",
    "retry_budget_min_per_sec",
    "max_requests",
    "max_requests_per_endpoint",
    "panic_threshold_percent",
    "outlier",
];

const OUTLIER_KEYS: &[&str] = &[
    "consecutive_failures",
    "consecutive_connect_failures",
    "base_ejection",
    "max_ejection",
    "max_ejection_percent",
];

const U32_MAX: i64 = u32::MAX as i64;

/// The built-in policy, used where neither `[outbound]` nor the upstream's
/// own entry says otherwise.
pub(crate) fn builtin_policy() -> UpstreamPolicy {
    UpstreamPolicy {
        lb: LbKind::P2cEwma,
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(15),
        per_try_timeout: None,
        idle_timeout: Duration::from_secs(60),
        retries: 2,
        retry_budget_percent: 20,
        retry_budget_min_per_sec: 10,
        max_requests: 10_000,
        max_requests_per_endpoint: 1_000,
        outlier: OutlierConfig {
            consecutive_failures: 5,
            consecutive_connect_failures: 2,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        },
        panic_threshold_percent: 50,
    }
}

/// `[outbound]`.
pub(super) fn outbound(sec: &Section<'_>) -> OutboundConfig {
    let mut known = POLICY_KEYS.to_vec();
    known.push("mesh_domain");
    sec.deny_unknown(&known);
    OutboundConfig {
        mesh_domain: sec
            .parse("mesh_domain", "a string", check_dns_name)
            .unwrap_or_else(|| "mesh".to_owned()),
        defaults: policy(sec, &builtin_policy()),
    }
}

/// `[[upstreams]]`, each layered over `defaults`.
pub(super) fn upstreams(
    root: &Section<'_>,
    defaults: &UpstreamPolicy,
    listeners: &Listeners,
) -> Vec<UpstreamConfig> {
    let mut known = POLICY_KEYS.to_vec();
    known.extend(["name", "local_port"]);
    // Where each name / port was first claimed, for "already used by" errors.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for (key, addr) in named_listeners(listeners) {
        // local_port binds 127.0.0.1, which collides with these.
        let loopback_or_wildcard = addr.ip() == Ipv4Addr::LOCALHOST || addr.ip().is_unspecified();
        if loopback_or_wildcard && addr.port() != 0 {
            ports
                .entry(addr.port())
                .or_insert_with(|| format!("listeners.{key} ({addr})"));
        }
    }

    let sections = root.tables("upstreams", false).unwrap_or_default();
    let mut upstreams = Vec::with_capacity(sections.len());
    for sec in &sections {
        sec.deny_unknown(&known);
        sec.require("name");
        let name = sec.parse("name", "a string", check_service_name);
        if let Some(name) = &name {
            match names.get(name) {
                Some(first) => {
                    sec.error("name", format!("{name:?} is already configured by {first}"))
                }
                None => {
                    names.insert(name.clone(), sec.path().to_owned());
                }
            }
        }
        let local_port: Option<u16> = sec.int("local_port", 1, 65_535);
        if let Some(port) = local_port {
            match ports.get(&port) {
                Some(owner) => {
                    sec.error("local_port", format!("{port} is already used by {owner}"))
                }
                None => {
                    ports.insert(port, sec.field_path("local_port"));
                }
            }
        }
        upstreams.push(UpstreamConfig {
            name: name.unwrap_or_default(),
            policy: policy(sec, defaults),
            local_port,
        });
    }
    upstreams
}

/// The policy keys of `sec` layered over `base`.
fn policy(sec: &Section<'_>, base: &UpstreamPolicy) -> UpstreamPolicy {
    UpstreamPolicy {
        lb: sec.parse("lb", "a string", parse_lb).unwrap_or(base.lb),
        connect_timeout: sec
            .positive_duration("connect_timeout")
            .unwrap_or(base.connect_timeout),
        timeout: sec.positive_duration("timeout").unwrap_or(base.timeout),
        per_try_timeout: sec
            .positive_duration("per_try_timeout")
            .or(base.per_try_timeout),
        idle_timeout: sec
            .positive_duration("idle_timeout")
            .unwrap_or(base.idle_timeout),
        retries: sec.int("retries", 0, 10).unwrap_or(base.retries),
        retry_budget_percent: sec
            .int("retry_budget_percent", 0, 100)
            .unwrap_or(base.retry_budget_percent),
        retry_budget_min_per_sec: sec
            .int("retry_budget_min_per_sec", 0, U32_MAX)
            .unwrap_or(base.retry_budget_min_per_sec),
        max_requests: sec
            .int("max_requests", 1, U32_MAX)
            .unwrap_or(base.max_requests),
        max_requests_per_endpoint: sec
            .int("max_requests_per_endpoint", 1, U32_MAX)
            .unwrap_or(base.max_requests_per_endpoint),
        panic_threshold_percent: sec
            .int("panic_threshold_percent", 0, 100)
            .unwrap_or(base.panic_threshold_percent),
        outlier: outlier(&sec.table("outlier"), &base.outlier),
    }
}

fn outlier(sec: &Section<'_>, base: &OutlierConfig) -> OutlierConfig {
    sec.deny_unknown(OUTLIER_KEYS);
    let base_ejection = sec.positive_duration("base_ejection");
    let max_ejection = sec.positive_duration("max_ejection");
    let config = OutlierConfig {
        consecutive_failures: sec
            .int("consecutive_failures", 1, U32_MAX)
            .unwrap_or(base.consecutive_failures),
        consecutive_connect_failures: sec
            .int("consecutive_connect_failures", 1, U32_MAX)
            .unwrap_or(base.consecutive_connect_failures),
        base_ejection: base_ejection.unwrap_or(base.base_ejection),
        max_ejection: max_ejection.unwrap_or(base.max_ejection),
        max_ejection_percent: sec
            .int("max_ejection_percent", 0, 100)
            .unwrap_or(base.max_ejection_percent),
    };
    // Checked on the effective values, but reported only where one of the
    // two was written, so an inherited clash is reported once, at its source.
    if config.max_ejection < config.base_ejection {
        let (min, max) = (config.base_ejection, config.max_ejection);
        if max_ejection.is_some() {
            let message = format!(
                "must be at least base_ejection ({}), got {}",
                format_duration(min),
                format_duration(max)
            );
            sec.error("max_ejection", message);
        } else if base_ejection.is_some() {
            let message = format!(
                "must not exceed max_ejection ({}), got {}",
                format_duration(max),
                format_duration(min)
            );
            sec.error("base_ejection", message);
        }
    }
    config
}

fn parse_lb(s: &str) -> Result<LbKind, String> {
    match s {
        "p2c-ewma" => Ok(LbKind::P2cEwma),
        "round-robin" => Ok(LbKind::RoundRobin),
        "least-request" => Ok(LbKind::LeastRequest),
        "random" => Ok(LbKind::Random),
        _ => Err(format!(
            r#"expected one of "p2c-ewma", "round-robin", "least-request", "random", got {s:?}"#
        )),
    }
}
