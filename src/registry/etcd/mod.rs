//! The etcd v3 registry backend.
//!
//! A sidecar publishes its instance under `{prefix}/services/{service}/{instance}`
//! (the value is [`EndpointRecord::encode`]'s JSON), bound to a lease that it
//! keeps alive, so the key dies with the sidecar. It discovers its peers by
//! reading the whole `{prefix}/services/` range at one revision and watching
//! from the next one.
//!
//! Why it is built the way it is:
//! - A sidecar must start while etcd is down, so [`EtcdRegistry::new`] does
//!   not connect: the first call does, and any failed call drops the client
//!   so that the next one reconnects on a fresh channel (the `etcd-client`
//!   crate does not recover every broken channel by itself).
//! - Every call is bounded by our own deadline on top of the gRPC timeouts,
//!   because a call on a balanced gRPC channel may otherwise wait for a
//!   ready endpoint indefinitely; shutdown paths use an even shorter one.
//!
//! # Layout
//! - this module: settings, the connection, keys, errors, backoff and the
//!   [`Registry`] impl that ties the two halves together;
//! - `lease`: registration: lease, keep-alive, claim transaction, checks;
//! - `watch`: discovery: paginated read, watch, compaction, reconnects.

mod lease;
mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{BoxFuture, EndpointRecord, Registry, RegistryError, UpdateTx};
use etcd_client::{Client, ConnectOptions};

/// How long opening a TCP connection to an etcd member may take. Short, so a
/// dead member is given up on quickly and the next attempt can try again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Deadline of one unary call, connecting included. etcd answers in
/// milliseconds when healthy; five seconds covers a leader election without
/// letting a hung member stall registration for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 PING interval. It must stay above etcd's
/// `--grpc-keepalive-min-time` (5 s by default), or etcd answers with a
/// GOAWAY `too_many_pings`.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a PING may stay unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest gRPC message we decode (bytes). A page of the initial read holds
/// up to [`watch::PAGE_KEYS`] records of a few hundred bytes each; the
/// default 4 MiB would be too tight for records with metadata.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Settings of one etcd registry (from `[registry]` with `kind = "etcd"`).
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// Client URLs, e.g. `http://etcd:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this mesh, e.g. `/outrigger`.
    pub prefix: String,
    /// Lease TTL; rounded up to whole seconds (etcd's unit), at least 1 s.
    pub ttl: Duration,
    /// Optional etcd user.
    pub username: Option<String>,
    /// Optional etcd password.
    pub password: Option<String>,
}

/// The etcd registry: registration (lease-bound key) and discovery (watch).
///
/// Cheap to construct and never connects in [`EtcdRegistry::new`]; the
/// first call does. Dropping it stops the lease keep-alive without revoking
/// the lease, so the key expires after the TTL, as if the process had died.
pub struct EtcdRegistry {
    /// The shared, lazily (re)connected client.
    conn: Arc<Conn>,
    /// Key layout under the configured prefix.
    keys: Keys,
    /// Registration state; lives as long as the registry.
    registrar: lease::Registrar,
}

/// Failures of single etcd operations, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The client could not be built or could not authenticate.
    #[error("connecting to etcd at {endpoints}: {source}")]
    Connect {
        /// The configured endpoints, comma separated.
        endpoints: String,
        /// The cause.
        source: etcd_client::Error,
    },
    /// An RPC failed.
    #[error("etcd {op}: {source}")]
    Rpc {
        /// What we were doing.
        op: &'static str,
        /// The cause.
        source: etcd_client::Error,
    },
    /// An RPC did not finish in time.
    #[error("etcd {op}: no answer within {timeout:?}")]
    Timeout {
        /// What we were doing.
        op: &'static str,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// etcd answered something we cannot use.
    #[error("etcd {op}: {message}")]
    Protocol {
        /// What we were doing.
        op: &'static str,
        /// What was wrong with the answer.
        message: String,
    },
}

/// The lazily built client, shared by registration and discovery.
struct Conn {
    /// Client URLs.
    endpoints: Vec<String>,
    /// Timeouts, keep-alive, require-leader and credentials.
    options: ConnectOptions,
    /// The current client and its generation; `None` until first use and
    /// after a failure. Never held across an `.await`.
    current: Mutex<Option<(Client, u64)>>,
    /// Generation counter, so a late failure report about an old client
    /// cannot drop a newer one.
    next_generation: AtomicU64,
}

/// A client handed out by [`Conn::client`], with the generation to report
/// failures against.
struct ClientHandle<'a> {
    conn: &'a Conn,
    client: Client,
    generation: u64,
}

/// Key layout: `{prefix}/services/{service}/{instance}`.
#[derive(Debug, Clone)]
struct Keys {
    /// `{prefix}/services/`, always ending in `/`.
    services: String,
}

/// Jittered exponential backoff.
#[derive(Debug)]
struct Backoff {
    /// First delay.
    min: Duration,
    /// Largest delay.
    max: Duration,
    /// The next delay before jitter.
    next: Duration,
}

// === impl EtcdRegistry ===

impl EtcdRegistry {
    /// A registry for `settings`. Does not connect.
    pub fn new(settings: EtcdSettings) -> Self {
        let ttl = lease::ttl_seconds(settings.ttl);
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            // etcd rejects PINGs on a connection without streams (it counts
            // them as abuse); the watch and keep-alive streams are enough.
            .with_keep_alive_while_idle(false)
            // A member cut off from the quorum fails our calls and streams
            // instead of serving a stale view forever.
            .with_require_leader(true);
        if let Some(user) = settings.username.as_deref() {
            options = options
                .with_user(user, settings.password.clone().unwrap_or_default())
                .with_auto_token_refresh(true);
        }
        let conn = Arc::new(Conn {
            endpoints: settings.endpoints,
            options,
            current: Mutex::new(None),
            next_generation: AtomicU64::new(1),
        });
        let keys = Keys::new(&settings.prefix);
        let registrar = lease::Registrar::new(conn.clone(), keys.clone(), ttl);
        EtcdRegistry {
            conn,
            keys,
            registrar,
        }
    }

    /// Whether our key is published on a lease we believe alive (for
    /// `/ready` and metrics).
    pub fn is_registered(&self) -> bool {
        self.registrar.is_registered()
    }

    /// The live lease we hold, if any (for metrics and logs).
    pub fn lease_id(&self) -> Option<i64> {
        self.registrar.lease_id()
    }

    /// The key `record` is published under.
    pub fn key_for(&self, record: &EndpointRecord) -> String {
        self.keys.instance(&record.service, &record.instance)
    }

    /// The lease TTL actually used (whole seconds, at least one).
    pub fn ttl(&self) -> Duration {
        self.registrar.ttl()
    }
}

impl Registry for EtcdRegistry {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn register<'a>(&'a self, me: &'a EndpointRecord) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(self.registrar.register(me))
    }

    fn withdraw(&self) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(self.registrar.withdraw())
    }

    fn deregister(&self) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(self.registrar.deregister())
    }

    fn discover(self: Arc<Self>, tx: UpdateTx) -> BoxFuture<'static, ()> {
        let conn = self.conn.clone();
        let keys = self.keys.clone();
        // The discovery loop only needs the connection and the key layout,
        // so it does not keep the registrar (and its lease) alive.
        drop(self);
        Box::pin(watch::run(conn, keys, tx))
    }
}

// === impl EtcdError ===

impl EtcdError {
    /// The gRPC status code etcd answered with, if it answered.
    fn grpc_code(&self) -> Option<i32> {
        match self {
            EtcdError::Rpc {
                source: etcd_client::Error::GRpcStatus(status),
                ..
            } => Some(i32::from(status.code())),
            _ => None,
        }
    }

    /// The gRPC status message etcd answered with, if it answered.
    fn grpc_message(&self) -> &str {
        match self {
            EtcdError::Rpc {
                source: etcd_client::Error::GRpcStatus(status),
                ..
            } => status.message(),
            EtcdError::Rpc {
                source: etcd_client::Error::LeaseKeepAliveError(message),
                ..
            } => message,
            _ => "",
        }
    }

    /// Whether the failure says nothing about the connection (etcd refused
    /// the request itself), so the client can be kept.
    fn is_request_error(&self) -> bool {
        matches!(self, EtcdError::Protocol { .. })
            || self.grpc_code().is_some_and(|c| {
                matches!(
                    c,
                    grpc::INVALID_ARGUMENT
                        | grpc::NOT_FOUND
                        | grpc::ALREADY_EXISTS
                        | grpc::PERMISSION_DENIED
                        | grpc::FAILED_PRECONDITION
                        | grpc::OUT_OF_RANGE
                )
            })
    }

    /// Whether etcd said the lease does not exist (expired or revoked).
    /// `etcd-client` reports it as a status (`NotFound`) on unary calls and
    /// as a keep-alive error when the first keep-alive answer has TTL 0.
    fn is_lease_not_found(&self) -> bool {
        self.grpc_message().contains("lease not found")
    }

    /// Whether a response exceeded our decoding limit (tonic reports it as
    /// `OutOfRange`, like etcd's compaction, hence the message check).
    fn is_message_too_large(&self) -> bool {
        self.grpc_code() == Some(grpc::OUT_OF_RANGE)
            && self.grpc_message().contains("message length too large")
    }

    /// Whether etcd said the requested revision has been compacted.
    fn is_compacted(&self) -> bool {
        self.grpc_code() == Some(grpc::OUT_OF_RANGE) && self.grpc_message().contains("compacted")
    }
}

/// gRPC status codes we act on (stable numbers from the gRPC spec; the
/// crate does not re-export `tonic::Code`).
mod grpc {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const ALREADY_EXISTS: i32 = 6;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const OUT_OF_RANGE: i32 = 11;
}

impl From<EtcdError> for RegistryError {
    fn from(e: EtcdError) -> Self {
        RegistryError::Unavailable {
            backend: "etcd",
            message: e.to_string(),
        }
    }
}

// === impl Conn ===

impl Conn {
    /// The current client, connecting first if there is none.
    async fn client(&self) -> Result<ClientHandle<'_>, EtcdError> {
        if let Some((client, generation)) = self.lock().as_ref() {
            return Ok(ClientHandle {
                conn: self,
                client: client.clone(),
                generation: *generation,
            });
        }
        // Without credentials this only builds the (lazy) channel; with
        // them it authenticates, which is a round trip, hence the deadline.
        let connect = Client::connect(&self.endpoints, Some(self.options.clone()));
        let client = match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(source)) => {
                return Err(EtcdError::Connect {
                    endpoints: self.endpoints.join(","),
                    source,
                })
            }
            Err(_) => {
                return Err(EtcdError::Timeout {
                    op: "connect",
                    timeout: REQUEST_TIMEOUT,
                })
            }
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let mut current = self.lock();
        // Another task may have connected meanwhile; keep the first one so
        // that both share a channel.
        let (client, generation) = current.get_or_insert((client, generation)).clone();
        Ok(ClientHandle {
            conn: self,
            client,
            generation,
        })
    }

    /// Runs one call on the current client with [`REQUEST_TIMEOUT`].
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_within(op, REQUEST_TIMEOUT, f).await
    }

    /// Runs one call on the current client (connecting first if needed),
    /// all within `timeout`; on a failure that may be the connection's,
    /// drops the client so the next call reconnects.
    async fn call_within<T, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        // The generation of the client in use (0: none yet), readable after
        // a timeout.
        let used = AtomicU64::new(0);
        let attempt = async {
            let handle = self.client().await?;
            used.store(handle.generation, Ordering::Relaxed);
            f(handle.client)
                .await
                .map_err(|source| EtcdError::Rpc { op, source })
        };
        let error = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error,
            Err(_) => EtcdError::Timeout { op, timeout },
        };
        let generation = used.load(Ordering::Relaxed);
        if generation != 0 && !error.is_request_error() {
            self.forget(generation);
        }
        Err(error)
    }

    /// Drops client `generation` (if still current) after a failure.
    fn forget(&self, generation: u64) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|(_, g)| *g == generation) {
            *current = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Client, u64)>> {
        // The guarded value is always valid, even if a holder panicked.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl ClientHandle ===

impl ClientHandle<'_> {
    /// Reports that this client failed in a way that may be the connection's.
    fn failed(&self) {
        self.conn.forget(self.generation);
    }
}

// === impl Keys ===

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            services: format!("{}/services/", prefix.trim_end_matches('/')),
        }
    }

    /// `{prefix}/services/{service}/{instance}`.
    fn instance(&self, service: &str, instance: &str) -> String {
        format!("{}{service}/{instance}", self.services)
    }

    /// `(service, instance)` of a key under the services prefix, if it has
    /// exactly that shape.
    fn parse<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.services)?;
        let (service, instance) = rest.split_once('/')?;
        (!service.is_empty() && !instance.is_empty() && !instance.contains('/'))
            .then_some((service, instance))
    }

    /// The end of the services range: the prefix with its last byte
    /// incremented (`/` + 1 = `0`), as etcd's `--prefix` does.
    fn services_end(&self) -> Vec<u8> {
        let mut end = self.services.as_bytes().to_vec();
        // The prefix ends in '/', which is below 0xff, so this cannot wrap.
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    }
}

// === impl Backoff ===

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The next delay, ±20% jitter so a fleet restarted together does not
    /// reconnect in lockstep.
    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + fastrand::f64() * 0.4)
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_layout() {
        let keys = Keys::new("/outrigger/");
        assert_eq!(keys.instance("b", "b-1"), "/outrigger/services/b/b-1");
        assert_eq!(keys.parse("/outrigger/services/b/b-1"), Some(("b", "b-1")));
        assert_eq!(keys.parse("/outrigger/services/b"), None);
        assert_eq!(keys.parse("/outrigger/services/b/x/y"), None);
        assert_eq!(keys.parse("/outrigger/services//x"), None);
        assert_eq!(keys.parse("/other/services/b/b-1"), None);
        assert_eq!(keys.services_end(), b"/outrigger/services0".to_vec());
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
