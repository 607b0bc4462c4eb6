//! Validation of the raw TOML tree into a [`Config`], collecting every
//! problem, plus the redacted JSON rendering served at `/config`.

mod policy;
mod redact;
mod registry;
mod sections;
mod service;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

use super::raw::{Problems, Section};
use super::Config;

pub(crate) use policy::builtin_policy;
pub(crate) use redact::redacted_json;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML (nothing else can be checked then).
    #[error("config is not valid TOML: {message}")]
    Syntax {
        /// The TOML parser's message, with line and column.
        message: String,
    },
    /// The TOML is well-formed but some fields are wrong: all of them.
    #[error("{}", InvalidDisplay(.0))]
    Invalid(Vec<FieldError>),
}

/// One invalid field: where (`upstreams[1].timeout`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// Dotted path with indexes, e.g. `registry[0].endpoints[2]`; for
    /// environment overrides, the variable's name.
    pub path: String,
    /// What is wrong and, where it helps, what was expected.
    pub message: String,
}

/// `invalid config: N problems` then one `path: message` per line.
struct InvalidDisplay<'a>(&'a [FieldError]);

impl fmt::Display for InvalidDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        let plural = if n == 1 { "" } else { "s" };
        write!(f, "invalid config: {n} problem{plural}")?;
        for problem in self.0 {
            write!(f, "\n{problem}")?;
        }
        Ok(())
    }
}

/// Top-level sections.
const ROOT_KEYS: &[&str] = &[
    "service",
    "listeners",
    "runtime",
    "registry",
    "outbound",
    "upstreams",
    "limits",
    "tls",
];

/// Validate a parsed (and env-overridden) document.
pub(crate) fn validate(table: toml::Table) -> Result<Config, ConfigError> {
    validate_with(&table, &system_hostname)
}

/// [`validate`] with the hostname source injected, so the defaults derived
/// from it (`instance_id`, `advertise`) are testable.
pub(super) fn validate_with(
    table: &toml::Table,
    hostname: &dyn Fn() -> String,
) -> Result<Config, ConfigError> {
    let problems = Problems::default();
    let root = Section::root(table, &problems);
    root.deny_unknown(ROOT_KEYS);

    // Every builder returns a value even when fields are wrong (falling back
    // to defaults or placeholders) so that later sections are still checked;
    // the placeholders never escape because any problem fails the whole load.
    let mut service = service::service(&root.table("service"), hostname);
    let listeners = sections::listeners(&root.table("listeners"));
    if service.advertise.is_empty() {
        service.advertise = service::default_advertise(listeners.inbound, hostname);
    }
    let runtime = sections::runtime(&root.table("runtime"));
    let registries = registry::registries(&root);
    registry::check_consul_ttls(&root, &registries, service.health.interval);
    let outbound = policy::outbound(&root.table("outbound"));
    let upstreams = policy::upstreams(&root, &outbound.defaults, &listeners);
    let limits = sections::limits(&root.table("limits"));
    let tls = sections::tls(&root.table("tls"));

    let problems = problems.into_vec();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }
    Ok(Config {
        service,
        listeners,
        runtime,
        registries,
        outbound,
        upstreams,
        limits,
        tls,
    })
}

/// The machine's hostname: `/proc/sys/kernel/hostname`, else `$HOSTNAME`,
/// else `localhost` (in containers the first is the pod/container name,
/// which is what peers and operators know the replica by).
fn system_hostname() -> String {
    let non_empty = |s: String| {
        let s = s.trim().to_owned();
        (!s.is_empty()).then_some(s)
    };
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(non_empty)
        .or_else(|| std::env::var("HOSTNAME").ok().and_then(non_empty))
        .unwrap_or_else(|| "localhost".to_owned())
}

// === shared format checks ===

/// A DNS label: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    let edge_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(edge_ok)
        && bytes.last().is_some_and(edge_ok)
        && bytes.iter().all(|b| edge_ok(b) || *b == b'-')
}

/// A service name (used in hostnames like `b.mesh` and SPIFFE ids, hence a
/// DNS label).
fn check_service_name(s: &str) -> Result<String, String> {
    if is_dns_label(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a valid service name (1-63 lowercase letters, digits or '-', \
             starting and ending with a letter or digit)"
        ))
    }
}

/// A lowercase dotted DNS name such as `mesh` or `mesh.local`.
fn check_dns_name(s: &str) -> Result<String, String> {
    if s.len() <= 253 && s.split('.').all(is_dns_label) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a valid DNS name (lowercase labels of letters, digits and '-', \
             separated by '.')"
        ))
    }
}

/// A hostname as written in `host:port` (any case; labels of letters,
/// digits and '-').
fn is_hostname(s: &str) -> bool {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    s.len() <= 253 && s.split('.').all(label_ok)
}

/// `host:port` where host is an IP (IPv6 in brackets) or a hostname, and
/// port is 1..=65535.
fn check_host_port(s: &str) -> Result<String, String> {
    let bad = || {
        format!(r#"{s:?} is not host:port (e.g. "127.0.0.1:8080" or "app:8080"; port 1..=65535)"#)
    };
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return if addr.port() == 0 {
            Err(bad())
        } else {
            Ok(s.to_owned())
        };
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(port) if port != 0 && is_hostname(host) => Ok(s.to_owned()),
        _ => Err(bad()),
    }
}
