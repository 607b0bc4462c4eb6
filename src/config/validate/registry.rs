//! `[registry]` / `[[registry]]`.

use std::time::Duration;

use toml::Value;

use crate::config::raw::Section;
use crate::config::{RegistryConfig, RegistryKind};

const COMMON_KEYS: &[&str] = &["kind", "prefix", "ttl"];

/// A registry backend and the keys that only it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Etcd,
    Consul,
    Static,
}

const BACKENDS: [Backend; 3] = [Backend::Etcd, Backend::Consul, Backend::Static];

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Etcd => "etcd",
            Backend::Consul => "consul",
            Backend::Static => "static",
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Backend::Etcd => &["endpoints", "username", "password"],
            Backend::Consul => &[
                "endpoints",
                "token",
                "deregister_critical_after",
                "tags",
                "wait",
                "datacenter",
                "ca",
            ],
            Backend::Static => &["file", "poll_interval"],
        }
    }

    fn parse(s: &str) -> Result<Backend, String> {
        BACKENDS
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!(r#"expected one of "etcd", "consul", "static", got {s:?}"#))
    }
}

/// All registries; `registry: missing (required)` if there is none.
pub(super) fn registries(root: &Section<'_>) -> Vec<RegistryConfig> {
    if !root.has("registry") {
        root.error("registry", "missing (required)");
        return Vec::new();
    }
    if matches!(root.raw("registry"), Some(Value::Array(items)) if items.is_empty()) {
        root.error("registry", "needs at least one entry");
        return Vec::new();
    }
    let sections = root.tables("registry", true).unwrap_or_default();
    sections.iter().filter_map(registry).collect()
}

/// A Consul check is passed from the probe's ticks, so its TTL must span
/// at least two of them or one late tick would turn it critical.
pub(super) fn check_consul_ttls(
    root: &Section<'_>,
    registries: &[RegistryConfig],
    interval: Duration,
) {
    let single = matches!(root.raw("registry"), Some(Value::Table(_)));
    for (i, r) in registries.iter().enumerate() {
        if matches!(r.kind, RegistryKind::Consul { .. }) && r.ttl < interval * 2 {
            let key = if single {
                "ttl".to_owned()
            } else {
                format!("[{i}].ttl")
            };
            root.error(
                &format!("registry{}{key}", if single { "." } else { "" }),
                format!(
                    "must be at least twice service.health.interval ({}) for kind = \"consul\": \
                     the check is passed on probe ticks",
                    crate::config::format_duration(interval)
                ),
            );
        }
    }
}

/// One registry table; `None` when its kind is missing or unknown (the
/// other problems in it are still reported).
fn registry(sec: &Section<'_>) -> Option<RegistryConfig> {
    let mut known = COMMON_KEYS.to_vec();
    for backend in BACKENDS {
        known.extend_from_slice(backend.keys());
    }
    sec.deny_unknown(&known);
    sec.require("kind");
    let backend = sec.parse("kind", "a string", Backend::parse);
    let prefix = sec
        .parse("prefix", "a string", check_prefix)
        .unwrap_or_else(|| "/outrigger".to_owned());
    let ttl = sec
        .duration_at_least("ttl", Duration::from_secs(1))
        .unwrap_or(Duration::from_secs(5));
    let backend = backend?;
    // Silently ignoring `file` under kind = "etcd" would hide a config that
    // was meant for another backend.
    // (A key several backends share, like `endpoints`, is fine for any of
    // them and reported once otherwise.)
    let mut reported: Vec<&str> = Vec::new();
    for other in BACKENDS.into_iter().filter(|b| *b != backend) {
        for key in other.keys().iter().filter(|key| sec.has(key)) {
            if backend.keys().contains(key) || reported.contains(key) {
                continue;
            }
            reported.push(key);
            sec.error(key, format!("only valid with kind = {:?}", other.name()));
        }
    }
    let kind = match backend {
        Backend::Etcd => etcd(sec),
        Backend::Consul => consul(sec),
        Backend::Static => static_file(sec),
    };
    Some(RegistryConfig { kind, prefix, ttl })
}

fn etcd(sec: &Section<'_>) -> RegistryKind {
    let endpoints = sec
        .strings("endpoints", check_url)
        .unwrap_or_else(|| vec!["http://127.0.0.1:2379".to_owned()]);
    if endpoints.is_empty() {
        sec.error("endpoints", "needs at least one endpoint");
    }
    let username = sec.string("username");
    let password = sec.string("password");
    // Half a credential is always a mistake, and etcd would only say
    // "authentication failed" much later.
    match (sec.has("username"), sec.has("password")) {
        (true, false) => sec.error("password", "missing (required when username is set)"),
        (false, true) => sec.error("username", "missing (required when password is set)"),
        _ => {}
    }
    RegistryKind::Etcd {
        endpoints,
        username,
        password,
    }
}

/// Consul's own floor for `DeregisterCriticalServiceAfter`: the agent
/// rounds anything shorter up to one minute, so a smaller value would
/// silently not mean what it says.
const CONSUL_MIN_DEREGISTER: Duration = Duration::from_secs(60);

/// Consul caps a blocking query's `wait` at ten minutes.
const CONSUL_MAX_WAIT: Duration = Duration::from_secs(600);

fn consul(sec: &Section<'_>) -> RegistryKind {
    let endpoints = sec
        .strings("endpoints", check_url)
        .unwrap_or_else(|| vec!["http://127.0.0.1:8500".to_owned()]);
    if endpoints.is_empty() {
        sec.error("endpoints", "needs at least one endpoint");
    }
    let wait = sec
        .duration_at_least("wait", Duration::from_secs(1))
        .unwrap_or(Duration::from_secs(60));
    if wait > CONSUL_MAX_WAIT {
        sec.error(
            "wait",
            "must be at most 10m (Consul caps blocking queries there)",
        );
    }
    let datacenter = sec.parse("datacenter", "a string", |s| {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(s.to_owned())
        } else {
            Err(format!(
                "{s:?} is not a datacenter name (letters, digits, '-', '_', '.')"
            ))
        }
    });
    let tags = sec
        .strings("tags", |t| {
            if t.is_empty() || t.len() > 255 || t.chars().any(char::is_control) {
                Err(format!(
                    "{t:?} is not a usable tag (1-255 printable characters)"
                ))
            } else {
                Ok(())
            }
        })
        .unwrap_or_default();
    RegistryKind::Consul {
        endpoints,
        token: sec.parse("token", "a string", |s| {
            if s.is_empty() || s.chars().any(char::is_control) {
                Err("must be a non-empty token without control characters".to_owned())
            } else {
                Ok(s.to_owned())
            }
        }),
        deregister_critical_after: sec
            .duration_at_least("deregister_critical_after", CONSUL_MIN_DEREGISTER)
            .unwrap_or(CONSUL_MIN_DEREGISTER),
        tags,
        wait,
        datacenter,
        ca: sec.path_buf("ca"),
    }
}

fn static_file(sec: &Section<'_>) -> RegistryKind {
    sec.require("file");
    RegistryKind::Static {
        file: sec.path_buf("file").unwrap_or_default(),
        poll_interval: sec
            .positive_duration("poll_interval")
            .unwrap_or(Duration::from_secs(1)),
    }
}

/// `/outrigger`: leading '/', no trailing '/' (keys are built as
/// `<prefix>/<service>/<id>`, so a trailing one would double up).
fn check_prefix(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.ends_with('/') {
        Ok(s.to_owned())
    } else {
        Err(format!(
            r#"{s:?} must start with '/' and not end with '/' (e.g. "/outrigger")"#
        ))
    }
}

/// An `http://` or `https://` URL with something after the scheme.
fn check_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    match rest {
        Some(rest) if !rest.is_empty() => Ok(()),
        _ => Err(format!(
            r#"{s:?} must be an http:// or https:// URL (e.g. "http://127.0.0.1:2379")"#
        )),
    }
}
