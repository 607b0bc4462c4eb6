//! The Consul registry backend, over the local agent's HTTP API.
//!
//! A sidecar registers its instance with `PUT /v1/agent/service/register`
//! (ID = instance id; Meta = zone, protocols, version; a TTL check), passes
//! and fails that check from its own health probe, and deregisters on
//! shutdown. It discovers peers with blocking queries: one on
//! `/v1/catalog/services` for the set of mesh services, one per service on
//! `/v1/health/service/<name>?passing` for its healthy instances.
//!
//! Why it is built the way it is:
//! - A sidecar must start while the agent is down, so nothing here connects
//!   up front; every call goes to the current agent endpoint, and a failed
//!   call moves on to the next configured one.
//! - The agent may restart and forget our registration (a dev agent, a lost
//!   data dir). Any failed call, and any `404` on a check update, makes the
//!   next healthy tick re-register from scratch.
//! - Consul's TTL check is the liveness signal: if the sidecar dies, nobody
//!   passes the check, it goes critical within one TTL (so peers stop
//!   routing to us) and `DeregisterCriticalServiceAfter` reaps it.
//!
//! # Layout
//! - this module: settings, the agent client (endpoints, token, TLS,
//!   timeouts, metrics), errors, backoff and the [`Registry`] impl;
//! - `record`: the register body and health entries ↔ [`EndpointRecord`];
//! - `register`: registration, the TTL check and re-registration;
//! - `watch`: discovery: blocking queries, Consul's index rules, rate limit.

mod record;
mod register;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use super::{BoxFuture, EndpointRecord, Registry, RegistryError, UpdateTx};
use crate::metrics::{ConsulRequestLabels, Metrics};

pub use record::{check_id, register_body, HealthEntry, MESH_TAG};

/// How long opening a TCP (and TLS) connection to the agent may take. The
/// agent is normally on the same host or pod, so a slow connect means it is
/// gone; fail fast and try the next endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Deadline of a non-blocking call (register, check update, deregister). A
/// healthy agent answers in milliseconds; a server-side write may wait for
/// a Raft round, which five seconds covers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response body we read (bytes). A health answer for a service
/// with a thousand instances is around a megabyte; anything near this limit
/// is a misconfiguration and must not bloat every sidecar.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Settings of one Consul registry (from a `[[registry]]` with
/// `kind = "consul"`, plus the service's tags).
#[derive(Debug, Clone)]
pub struct ConsulSettings {
    /// Agent URLs, tried in order.
    pub endpoints: Vec<String>,
    /// ACL token; `None` sends none.
    pub token: Option<String>,
    /// TTL of the check the sidecar passes.
    pub ttl: Duration,
    /// `DeregisterCriticalServiceAfter` of that check.
    pub deregister_critical_after: Duration,
    /// Tags for the registration (the mesh tag is always added).
    pub tags: Vec<String>,
    /// Longest blocking-query wait.
    pub wait: Duration,
    /// Datacenter to query; `None` is the agent's own.
    pub datacenter: Option<String>,
    /// CA bundle (PEM) for `https://` endpoints.
    pub ca: Option<PathBuf>,
}

/// A Consul registry: registration state plus the shared agent client.
pub struct ConsulRegistry {
    /// The agent client, shared with the discovery loop.
    agent: Arc<Agent>,
    /// Registration state; lives as long as the registry.
    registrar: register::Registrar,
    /// Blocking-query settings for discovery.
    wait: Duration,
}

/// Failures of single agent calls, with the call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// The HTTP client could not be built (bad CA file).
    #[error("consul client setup: {0}")]
    Setup(String),
    /// No connection, a reset, or a TLS failure.
    #[error("consul {op} via {endpoint}: {source}")]
    Transport {
        /// What we were doing.
        op: &'static str,
        /// The agent URL used.
        endpoint: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// No answer in time.
    #[error("consul {op}: no answer within {timeout:?}")]
    Timeout {
        /// What we were doing.
        op: &'static str,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The agent answered with an error status.
    #[error("consul {op}: HTTP {status}: {body}")]
    Status {
        /// What we were doing.
        op: &'static str,
        /// The status.
        status: u16,
        /// The start of the answer body (Consul explains errors in text).
        body: String,
    },
    /// The answer could not be used.
    #[error("consul {op}: {message}")]
    Protocol {
        /// What we were doing.
        op: &'static str,
        /// What was wrong.
        message: String,
    },
}

/// One answer from the agent.
#[derive(Debug)]
pub(crate) struct Answer {
    /// HTTP status (2xx; other statuses are [`ConsulError::Status`], except
    /// where the caller asked to see them).
    pub status: StatusCode,
    /// `X-Consul-Index`, if present and numeric.
    pub index: Option<u64>,
    /// The body.
    pub body: Bytes,
}

/// The agent client: endpoints, credentials, metrics.
pub(crate) struct Agent {
    /// The HTTP client (connection pool, TLS).
    http: reqwest::Client,
    /// Agent base URLs without a trailing `/`.
    endpoints: Vec<String>,
    /// Index of the endpoint in use; moves on after a transport failure.
    current: AtomicUsize,
    /// `X-Consul-Token` value.
    token: Option<String>,
    /// `dc` query parameter for catalog and health reads.
    datacenter: Option<String>,
    /// Registry name for metrics and logs (`1-consul`).
    name: Arc<str>,
    /// Request counters.
    metrics: Arc<Metrics>,
}

/// Jittered exponential backoff.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// First delay.
    min: Duration,
    /// Largest delay.
    max: Duration,
    /// The next delay before jitter.
    next: Duration,
}

// === impl ConsulRegistry ===

impl ConsulRegistry {
    /// A registry for `settings`. Does not connect; fails only when the
    /// TLS setup is unusable (an unreadable CA file).
    pub fn new(
        settings: ConsulSettings,
        name: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConsulError> {
        let agent = Arc::new(Agent::new(&settings, name, metrics)?);
        let registrar = register::Registrar::new(agent.clone(), &settings);
        Ok(ConsulRegistry {
            agent,
            registrar,
            wait: settings.wait,
        })
    }

    /// Whether our instance is registered with a passing check, as far as
    /// we know.
    pub fn is_registered(&self) -> bool {
        self.registrar.is_registered()
    }
}

impl Registry for ConsulRegistry {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn register<'a>(&'a self, me: &'a EndpointRecord) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move { Ok(self.registrar.register(me).await?) })
    }

    fn withdraw(&self) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async move { Ok(self.registrar.withdraw().await?) })
    }

    fn deregister(&self) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(async move { Ok(self.registrar.deregister().await?) })
    }

    fn discover(self: Arc<Self>, tx: UpdateTx) -> BoxFuture<'static, ()> {
        let agent = self.agent.clone();
        let wait = self.wait;
        // Discovery only needs the agent client, not the registration.
        drop(self);
        Box::pin(watch::run(agent, wait, tx))
    }
}

impl From<ConsulError> for RegistryError {
    fn from(e: ConsulError) -> Self {
        RegistryError::Unavailable {
            backend: "consul",
            message: e.to_string(),
        }
    }
}

// === impl Agent ===

impl Agent {
    fn new(
        settings: &ConsulSettings,
        name: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConsulError> {
        // reqwest is built without a default crypto provider (no aws-lc);
        // make ring the process default before it builds its TLS config.
        // An error only means a provider is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            // The agent is addressed directly; a proxy from the environment
            // (HTTP_PROXY is how *services* reach the outbound listener)
            // must not capture it.
            .no_proxy()
            .user_agent(concat!("outrigger/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &settings.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| ConsulError::Setup(format!("reading CA {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ConsulError::Setup(format!("CA {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(ConsulError::Setup(format!(
                    "CA {}: no PEM certificate in it",
                    ca.display()
                )));
            }
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Setup(e.to_string()))?;
        Ok(Agent {
            http,
            endpoints: settings
                .endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_owned())
                .collect(),
            current: AtomicUsize::new(0),
            token: settings.token.clone(),
            datacenter: settings.datacenter.clone(),
            name,
            metrics,
        })
    }

    /// The registry name (`1-consul`).
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `&dc=<datacenter>` or nothing.
    pub(crate) fn dc_param(&self) -> String {
        match &self.datacenter {
            Some(dc) => format!("&dc={dc}"),
            None => String::new(),
        }
    }

    /// One call to the agent: `path_and_query` on the current endpoint,
    /// within `timeout`. Statuses in `accept` are returned as answers; any
    /// other non-2xx becomes [`ConsulError::Status`]. A transport failure or
    /// timeout moves on to the next endpoint for the next call.
    pub(crate) async fn call(
        &self,
        op: &'static str,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        accept: &[StatusCode],
    ) -> Result<Answer, ConsulError> {
        let slot = self.current.load(Ordering::Relaxed);
        // Validation guarantees at least one endpoint.
        let Some(endpoint) = self.endpoints.get(slot % self.endpoints.len().max(1)) else {
            return Err(ConsulError::Protocol {
                op,
                message: "no agent endpoint configured".into(),
            });
        };
        let url = format!("{endpoint}{path_and_query}");
        let mut req = self.http.request(method, &url).timeout(timeout);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        if let Some(body) = body {
            req = req
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let result = self.exchange(op, endpoint, req, timeout).await;
        let outcome = match &result {
            Ok(a) if a.status.is_success() => "ok",
            Ok(_) => "status",
            Err(ConsulError::Status { .. }) => "status",
            Err(_) => {
                // The endpoint may be gone: the next call tries another.
                let _ = self.current.compare_exchange(
                    slot,
                    slot.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                "error"
            }
        };
        self.metrics
            .consul_requests
            .get_or_create(&ConsulRequestLabels {
                registry: self.name.clone(),
                op,
                outcome,
            })
            .inc();
        match result {
            Ok(a) if a.status.is_success() || accept.contains(&a.status) => Ok(a),
            Ok(a) => Err(ConsulError::Status {
                op,
                status: a.status.as_u16(),
                body: String::from_utf8_lossy(&a.body[..a.body.len().min(256)])
                    .trim()
                    .to_owned(),
            }),
            Err(e) => Err(e),
        }
    }

    async fn exchange(
        &self,
        op: &'static str,
        endpoint: &str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Answer, ConsulError> {
        let transport = |source: reqwest::Error| {
            if source.is_timeout() {
                ConsulError::Timeout { op, timeout }
            } else {
                ConsulError::Transport {
                    op,
                    endpoint: endpoint.to_owned(),
                    source,
                }
            }
        };
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(ConsulError::Protocol {
                    op,
                    message: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            index,
            body: body.into(),
        })
    }
}

// === impl Backoff ===

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The next delay, ±20% jitter so a fleet whose agent restarted does
    /// not come back in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + fastrand::f64() * 0.4)
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Percent-encodes one path segment or query value (service names and
/// instance ids are already restricted, but tokens of safety are cheap).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ca: Option<PathBuf>) -> ConsulSettings {
        ConsulSettings {
            endpoints: vec!["https://consul:8501".into()],
            token: None,
            ttl: Duration::from_secs(5),
            deregister_critical_after: Duration::from_secs(60),
            tags: Vec::new(),
            wait: Duration::from_secs(60),
            datacenter: None,
            ca,
        }
    }

    #[test]
    fn tls_setup_reads_the_ca_and_names_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let name: Arc<str> = "0-consul".into();
        // No CA: the platform's roots (ring provider, no aws-lc needed).
        assert!(ConsulRegistry::new(settings(None), name.clone(), metrics.clone()).is_ok());
        let ca = rcgen::generate_simple_self_signed(vec!["consul".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert!(ConsulRegistry::new(settings(Some(good)), name.clone(), metrics.clone()).is_ok());
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = ConsulRegistry::new(settings(Some(junk.clone())), name.clone(), metrics.clone())
            .err()
            .expect("junk CA refused");
        assert!(err.to_string().contains("junk.pem"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = ConsulRegistry::new(settings(Some(missing)), name, metrics)
            .err()
            .expect("missing CA refused");
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }

    #[test]
    fn encodes_segments() {
        assert_eq!(encode_segment("b-1.x_y"), "b-1.x_y");
        assert_eq!(encode_segment("outrigger:b-1"), "outrigger%3Ab-1");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(6));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
