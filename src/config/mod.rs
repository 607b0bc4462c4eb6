//! Typed, validated configuration.
//!
//! The TOML file is first read into a `toml::Table` and walked by [`raw`],
//! then validated into the types below. Validation collects *every* problem
//! (with its field path, e.g. `upstreams[1].timeout`) before reporting, so an
//! operator fixes a broken file in one pass instead of one error per restart.
//! Nothing here binds a socket: `main` validates before `app` starts anything.

mod duration;
mod env;
#[cfg(test)]
mod proptests;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use duration::{format_duration, parse_duration};
pub use validate::{ConfigError, FieldError};

/// A complete, validated sidecar configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The local service this sidecar fronts, registers and probes.
    pub service: ServiceConfig,
    /// Listener addresses.
    pub listeners: Listeners,
    /// Process-level settings (threads, drain, state file).
    pub runtime: Runtime,
    /// One or more registries. Every one is registered in and discovered
    /// from; results are merged by instance id (so a mesh can migrate from
    /// one registry to another without downtime). `[registry]` (one table)
    /// and `[[registry]]` (a list) are both accepted.
    pub registries: Vec<RegistryConfig>,
    /// Outbound defaults: the mesh domain and the policy every upstream
    /// without its own `[[upstreams]]` entry gets.
    pub outbound: OutboundConfig,
    /// Per-service policy overrides, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Protocol limits shared by all listeners.
    pub limits: Limits,
    /// mTLS between sidecars; `None` means plaintext (h2c) between sidecars.
    pub tls: Option<TlsConfig>,
}

/// `[service]`: the local service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Logical service name peers route by (`b`). DNS-label characters only.
    pub name: String,
    /// Unique per replica; the registry key. Defaults to the hostname.
    pub instance_id: String,
    /// Where the local service listens (`host:port`), for inbound relaying
    /// and the health probe.
    pub address: String,
    /// What peers dial: this sidecar's inbound listener as seen from the
    /// network (`host:port`; a hostname is resolved by the caller at connect
    /// time). Defaults to the inbound listener address.
    pub advertise: String,
    /// Locality for failover preference; `None` means "no zone".
    pub zone: Option<String>,
    /// Relative load-balancing weight advertised to peers (1..=10000).
    pub weight: u32,
    /// Free-form tags (Consul tags; etcd value metadata).
    pub tags: Vec<String>,
    /// Free-form metadata published with the registration.
    pub metadata: BTreeMap<String, String>,
    /// The local health probe.
    pub health: HealthConfig,
}

/// `[service.health]`: how the sidecar decides the local service is healthy.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// HTTP GET of a path, or a bare TCP connect (the default).
    pub check: HealthCheck,
    /// Time between probes.
    pub interval: Duration,
    /// Per-probe deadline.
    pub timeout: Duration,
    /// Consecutive passes needed to go healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures needed to go unhealthy.
    pub unhealthy_threshold: u32,
}

/// The kind of local probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// `GET path`; any 2xx passes.
    Http {
        /// Request path, starting with `/`.
        path: String,
    },
    /// A TCP connect to the service address passes.
    Tcp,
}

/// `[listeners]`.
#[derive(Debug, Clone)]
pub struct Listeners {
    /// For the local service's outgoing calls.
    pub outbound: SocketAddr,
    /// For peer sidecars.
    pub inbound: SocketAddr,
    /// Operators, probes, Prometheus.
    pub admin: SocketAddr,
    /// Optional plaintext entry for clients outside the mesh.
    pub ingress: Option<SocketAddr>,
}

/// `[runtime]`.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Tokio worker threads; 1 means a current-thread runtime.
    pub worker_threads: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Where the last known routing table is persisted (`routes.json`), so
    /// a sidecar restarted during a registry outage can still route.
    pub state_dir: Option<PathBuf>,
    /// CPU scheduling policy (`crate::scheduling`).
    pub scheduling: Scheduling,
}

/// `runtime.scheduling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// `SCHED_BATCH` while the run-queue delay stays low (the default).
    Adaptive,
    /// Always the normal policy.
    Normal,
}

/// One registry section.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The backend and its settings.
    pub kind: RegistryKind,
    /// Key prefix (etcd) / namespace of this mesh.
    pub prefix: String,
    /// etcd lease TTL / Consul check TTL.
    pub ttl: Duration,
}

/// Registry backend selection.
#[derive(Debug, Clone)]
pub enum RegistryKind {
    /// etcd v3.
    Etcd {
        /// Client URLs, e.g. `http://etcd:2379`.
        endpoints: Vec<String>,
        /// Optional auth.
        username: Option<String>,
        /// Optional auth (redacted in `/config`).
        password: Option<String>,
    },
    /// Consul agent HTTP API.
    Consul {
        /// Agent URLs, e.g. `http://127.0.0.1:8500`; tried in order, the
        /// next one after a failure.
        endpoints: Vec<String>,
        /// ACL token (`X-Consul-Token`); the backend falls back to
        /// `CONSUL_HTTP_TOKEN` when unset. Redacted in `/config`.
        token: Option<String>,
        /// Consul `DeregisterCriticalServiceAfter` of the TTL check: how long
        /// a dead sidecar's registration lingers (critical, so unrouted)
        /// before the agent reaps it. At least 1m, Consul's minimum.
        deregister_critical_after: Duration,
        /// Extra Consul tags for the registration (after `service.tags`).
        tags: Vec<String>,
        /// Longest blocking-query wait; the agent caps it at 10m.
        wait: Duration,
        /// Consul datacenter to query; `None` means the agent's own.
        datacenter: Option<String>,
        /// CA bundle (PEM) for `https://` agent endpoints.
        ca: Option<PathBuf>,
    },
    /// A TOML file of endpoints, re-read when it changes.
    Static {
        /// The endpoints file.
        file: PathBuf,
        /// How often the file's metadata is checked for a change.
        poll_interval: Duration,
    },
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbKind {
    /// Power of two choices over peak-EWMA latency × (in-flight + 1).
    P2cEwma,
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Weighted random.
    Random,
}

/// `[outbound]`: outbound defaults.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// `b.<mesh_domain>` names service `b` (default `mesh`).
    pub mesh_domain: String,
    /// Policy for upstreams that have no `[[upstreams]]` entry.
    pub defaults: UpstreamPolicy,
}

/// `[[upstreams]]`: per-service policy.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Service name this entry applies to.
    pub name: String,
    /// The effective policy (defaults with this entry's overrides applied).
    pub policy: UpstreamPolicy,
    /// Optional fixed local port (on 127.0.0.1) that forwards everything to
    /// this service whatever the Host.
    pub local_port: Option<u16>,
}

/// Routing and resilience policy for one upstream service.
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    /// Balancer.
    pub lb: LbKind,
    /// TCP + HTTP/2 handshake deadline per endpoint.
    pub connect_timeout: Duration,
    /// Overall deadline for response headers, retries included.
    pub timeout: Duration,
    /// Optional deadline per try; `None` by default so long requests live.
    pub per_try_timeout: Option<Duration>,
    /// Idle deadline for streaming bodies (exempt from `timeout`).
    pub idle_timeout: Duration,
    /// Maximum retries per request (beyond the first try).
    pub retries: u32,
    /// Retry budget: retries may add this percentage of recent requests.
    pub retry_budget_percent: u32,
    /// Retry budget floor, retries per second always allowed.
    pub retry_budget_min_per_sec: u32,
    /// Concurrent requests allowed to the whole upstream (circuit breaker).
    pub max_requests: u32,
    /// Concurrent requests allowed to one endpoint.
    pub max_requests_per_endpoint: u32,
    /// Passive outlier detection.
    pub outlier: OutlierConfig,
    /// Below this percentage of usable endpoints, route to all of them.
    pub panic_threshold_percent: u32,
}

/// Passive outlier detection settings.
#[derive(Debug, Clone)]
pub struct OutlierConfig {
    /// Consecutive gateway failures (connect error, reset, 502/503/504)
    /// that eject an endpoint.
    pub consecutive_failures: u32,
    /// Consecutive connect failures that eject at once.
    pub consecutive_connect_failures: u32,
    /// Ejection time = base × ejection count...
    pub base_ejection: Duration,
    /// ...capped here.
    pub max_ejection: Duration,
    /// At most this share of a pool is ejected (but always at least one).
    pub max_ejection_percent: u32,
}

/// `[limits]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Header block limit for HTTP/1 (431 beyond) and the HTTP/2 header list.
    pub max_header_bytes: usize,
    /// Header count limit (431 beyond).
    pub max_headers: usize,
    /// Slowloris guard: a request's headers must arrive within this.
    pub header_read_timeout: Duration,
    /// Open connections per listener; further accepts wait.
    pub max_connections: usize,
    /// HTTP/2 concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// A client connection with no request in flight for this long is
    /// closed (HTTP/1) or sent GOAWAY (HTTP/2); see [`crate::http::server`].
    pub idle_connection_timeout: Duration,
}

/// `[tls]`: mTLS between sidecars.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// CA bundle (PEM) that signs every sidecar's certificate.
    pub ca: PathBuf,
    /// This sidecar's certificate chain (PEM).
    pub cert: PathBuf,
    /// This sidecar's private key (PEM).
    pub key: PathBuf,
    /// SPIFFE trust domain: `spiffe://<trust_domain>/service/<name>`.
    pub trust_domain: String,
    /// Callers allowed inbound; empty means any authenticated peer.
    pub allow: Vec<String>,
    /// How often the files are checked for a change.
    pub reload_interval: Duration,
    /// Whether the inbound listener also accepts plaintext peers.
    pub mode: TlsMode,
}

/// `tls.mode`: what the inbound listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// mTLS only: a plaintext connection is refused (the default).
    Strict,
    /// mTLS, and plaintext from peers that have not migrated yet (such
    /// requests carry no verified identity). For rolling mTLS out.
    Permissive,
}

// === impl UpstreamPolicy ===

impl Default for UpstreamPolicy {
    /// The built-in policy: what an upstream gets when neither `[outbound]`
    /// nor its own `[[upstreams]]` entry says otherwise.
    fn default() -> Self {
        validate::builtin_policy()
    }
}

// === impl Config ===

impl Config {
    /// Read, apply `OUTRIGGER_<SECTION>__<KEY>` overrides from `env`, and
    /// validate. Every invalid field is reported at once.
    pub fn load<I>(path: &std::path::Path, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        Self::from_str_with_env(&text, env)
    }

    /// Parse and validate TOML text with the given environment overrides.
    pub fn from_str_with_env<I>(text: &str, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut value: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    message: e.to_string(),
                })?;
        env::apply_overrides(&mut value, env)?;
        validate::validate(value)
    }

    /// The policy for `service`: its `[[upstreams]]` entry, or the defaults.
    pub fn policy_for(&self, service: &str) -> &UpstreamPolicy {
        self.upstreams
            .iter()
            .find(|u| u.name == service)
            .map(|u| &u.policy)
            .unwrap_or(&self.outbound.defaults)
    }

    /// A JSON rendering for `/config` with every secret redacted.
    pub fn redacted_json(&self) -> serde_json::Value {
        validate::redacted_json(self)
    }
}
