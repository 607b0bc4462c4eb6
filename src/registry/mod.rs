//! Registries: where a sidecar publishes its own instance and learns its peers.
//!
//! Every backend implements [`Registry`]. Registration is *desired state*:
//! the driver in [`crate::health`] calls [`Registry::register`] on every
//! healthy probe tick (idempotent; cheap when nothing changed, and it is how
//! a lost lease or a restarted Consul agent gets repaired), and
//! [`Registry::withdraw`] when the probe fails. Discovery turns whatever the
//! backend watches into a stream of typed [`Update`]s; one task in
//! [`crate::discovery`] applies them and publishes the routing snapshot.

mod record;
pub mod static_file;

#[cfg(feature = "etcd")]
pub mod etcd;

#[cfg(feature = "consul")]
pub mod consul;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

pub use record::{
    check_host_port, is_instance_id, is_service_name, DecodeError, EndpointRecord, DEFAULT_WEIGHT,
    MAX_RECORD_BYTES, MAX_WEIGHT,
};

use crate::config::{RegistryConfig, RegistryKind, ServiceConfig};
use crate::metrics::Metrics;

/// A boxed, sendable future; the trait is object-safe so a sidecar can hold
/// several registries at once.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One change seen by a discovery source.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Everything this source currently knows; replaces its previous set
    /// (endpoints not listed are removed). Sent after a full read.
    Reset {
        /// The complete set.
        endpoints: Vec<EndpointRecord>,
        /// The source's revision of that read (etcd revision, Consul index).
        revision: u64,
    },
    /// Add or replace one endpoint (keyed by service and instance).
    Upsert {
        /// The new record.
        endpoint: EndpointRecord,
        /// Revision of the change.
        revision: u64,
    },
    /// One endpoint is gone.
    Remove {
        /// Its service.
        service: String,
        /// Its instance id.
        instance: String,
        /// Revision of the change.
        revision: u64,
    },
    /// The source lost (`false`) or regained (`true`) its registry; while
    /// lost, its last endpoints keep serving and are reported as stale.
    Connected(bool),
    /// A value was skipped as malformed (counted in metrics).
    Malformed {
        /// The registry key or file position.
        key: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// An [`Update`] tagged with the index of the registry that produced it.
#[derive(Debug, Clone)]
pub struct SourcedUpdate {
    /// Index into the configured registry list.
    pub source: usize,
    /// The change.
    pub update: Update,
}

/// Where discovery sources send their updates.
#[derive(Debug, Clone)]
pub struct UpdateTx {
    source: usize,
    tx: mpsc::Sender<SourcedUpdate>,
}

/// Registry failures, with enough context to log and act on.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Another live sidecar owns our instance key: starting would hijack it.
    #[error("instance {instance:?} of service {service:?} is already registered by another live sidecar ({key}); refusing to start: give this replica a unique instance_id")]
    Duplicate {
        /// Service name.
        service: String,
        /// Instance id.
        instance: String,
        /// The contested key.
        key: String,
    },
    /// The registry could not be reached or refused the call.
    #[error("{backend}: {message}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// A registry backend. See the module docs for the contract.
pub trait Registry: Send + Sync + 'static {
    /// Short backend name for logs and metrics (`etcd`, `consul`, `static`).
    fn kind(&self) -> &'static str;

    /// Ensure `me` is published. Idempotent; called on every healthy probe
    /// tick, so it must be cheap when already registered.
    fn register<'a>(&'a self, me: &'a EndpointRecord) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Remove our record but keep any session (the probe failed; it may
    /// recover).
    fn withdraw(&self) -> BoxFuture<'_, Result<(), RegistryError>>;

    /// Remove our record for good (shutdown): revoke the lease, deregister.
    fn deregister(&self) -> BoxFuture<'_, Result<(), RegistryError>>;

    /// Watch the registry and send updates until the receiver is dropped.
    /// Must never return early on a registry fault: it reconnects with
    /// backoff and reports `Connected(false)` meanwhile.
    fn discover(self: Arc<Self>, tx: UpdateTx) -> BoxFuture<'static, ()>;
}

// === impl UpdateTx ===

impl UpdateTx {
    /// A sender tagged with `source`.
    pub fn new(source: usize, tx: mpsc::Sender<SourcedUpdate>) -> Self {
        UpdateTx { source, tx }
    }

    /// Send one update; `false` once the discovery applier has gone away
    /// (shutdown), which tells the source to stop.
    pub async fn send(&self, update: Update) -> bool {
        self.tx
            .send(SourcedUpdate {
                source: self.source,
                update,
            })
            .await
            .is_ok()
    }

    /// Whether the applier has gone away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// What a backend may need besides its own section.
#[derive(Clone)]
pub struct BuildContext<'a> {
    /// The registry's name for logs and metrics (`1-consul`).
    pub name: Arc<str>,
    /// The local service (Consul registers its tags).
    pub service: &'a ServiceConfig,
    /// Where backends count their own requests and faults.
    pub metrics: Arc<Metrics>,
}

/// The name a registry goes by in logs, metrics and `/routes`: its index in
/// the config and its kind (`0-etcd`, `1-consul`).
pub fn registry_name(index: usize, cfg: &RegistryConfig) -> Arc<str> {
    let kind = match cfg.kind {
        RegistryKind::Etcd { .. } => "etcd",
        RegistryKind::Consul { .. } => "consul",
        RegistryKind::Static { .. } => "static",
    };
    format!("{index}-{kind}").into()
}

/// Build the backend for one registry section.
pub fn build(
    cfg: &RegistryConfig,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn Registry>, RegistryError> {
    // Only some backends need the context.
    let _ = ctx;
    match &cfg.kind {
        RegistryKind::Static {
            file,
            poll_interval,
        } => Ok(Arc::new(static_file::StaticRegistry::new(
            file.clone(),
            *poll_interval,
        ))),
        #[cfg(feature = "etcd")]
        RegistryKind::Etcd {
            endpoints,
            username,
            password,
        } => Ok(Arc::new(etcd::EtcdRegistry::new(etcd::EtcdSettings {
            endpoints: endpoints.clone(),
            prefix: cfg.prefix.clone(),
            ttl: cfg.ttl,
            username: username.clone(),
            password: password.clone(),
        }))),
        #[cfg(not(feature = "etcd"))]
        RegistryKind::Etcd { .. } => Err(RegistryError::Unavailable {
            backend: "etcd",
            message: "this build has no etcd support (feature `etcd`)".into(),
        }),
        #[cfg(feature = "consul")]
        RegistryKind::Consul {
            endpoints,
            token,
            deregister_critical_after,
            tags,
            wait,
            datacenter,
            ca,
        } => {
            // The service's own tags first, then the registry's.
            let mut all_tags = ctx.service.tags.clone();
            all_tags.extend(
                tags.iter()
                    .filter(|t| !ctx.service.tags.contains(t))
                    .cloned(),
            );
            let settings = consul::ConsulSettings {
                endpoints: endpoints.clone(),
                // Consul's own CLI convention: the environment supplies the
                // token when the config does not.
                token: token.clone().or_else(|| {
                    std::env::var("CONSUL_HTTP_TOKEN")
                        .ok()
                        .filter(|t| !t.trim().is_empty())
                }),
                ttl: cfg.ttl,
                deregister_critical_after: *deregister_critical_after,
                tags: all_tags,
                wait: *wait,
                datacenter: datacenter.clone(),
                ca: ca.clone(),
            };
            let registry =
                consul::ConsulRegistry::new(settings, ctx.name.clone(), ctx.metrics.clone())?;
            Ok(Arc::new(registry))
        }
        #[cfg(not(feature = "consul"))]
        RegistryKind::Consul { .. } => Err(RegistryError::Unavailable {
            backend: "consul",
            message: "this build has no consul support (feature `consul`)".into(),
        }),
    }
}
