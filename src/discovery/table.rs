//! The routing snapshot: service → endpoints, immutable once published.
//!
//! A new [`Table`] is built for every batch of registry changes and swapped
//! in whole (`ArcSwap::store`), so a request sees one consistent view and the
//! data path never takes a lock. Per-endpoint *learned* state is not in here:
//! each [`Endpoint`] points at its long-lived [`EndpointState`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::SystemTime;

use crate::balance::{EndpointState, RetryBudget};
use crate::config::UpstreamPolicy;
use crate::metrics::RequestMetrics;
use crate::registry::EndpointRecord;

/// One published routing table.
#[derive(Debug, Default)]
pub struct Table {
    /// Routes by service name.
    pub services: HashMap<Arc<str>, Arc<ServiceRoutes>>,
    /// Increments with every published table.
    pub generation: u64,
    /// True while any registry is unreachable (or the table came from the
    /// state file): routing continues on the last known endpoints.
    pub stale: bool,
    /// When this table was built.
    pub built_at: Option<SystemTime>,
}

/// The endpoints of one service, plus state that belongs to the service.
#[derive(Debug)]
pub struct ServiceRoutes {
    /// Service name.
    pub name: Arc<str>,
    /// Endpoints, sorted by instance id for stable output. Held inline,
    /// not behind an `Arc` each: a full swap then makes one allocation per
    /// service instead of one per endpoint, and a pick scans contiguous
    /// memory.
    pub endpoints: Vec<Endpoint>,
    /// The service's policy (`[[upstreams]]` over `[outbound]`), resolved
    /// when the routes are built so a request never searches the config.
    pub policy: Arc<UpstreamPolicy>,
    /// Round-robin cursor (resetting it on a table swap is harmless).
    pub rr: AtomicUsize,
    /// Long-lived per-service state (budget, concurrency), shared across
    /// table generations.
    pub shared: Arc<ServiceState>,
}

/// Per-service state that must survive table swaps.
#[derive(Debug)]
pub struct ServiceState {
    /// Retry budget for calls to this service.
    pub budget: RetryBudget,
    /// Requests in flight to this service (circuit breaker).
    pub in_flight: AtomicU64,
    /// Its outbound request series, resolved once (see [`RequestMetrics`]).
    pub requests: RequestMetrics,
}

/// One endpoint in a snapshot.
#[derive(Debug)]
pub struct Endpoint {
    /// The registry record.
    pub record: Arc<EndpointRecord>,
    /// Balancing weight (from the record).
    pub weight: u32,
    /// Whether the endpoint is in this sidecar's zone.
    pub local: bool,
    /// Which registry reported it (index in config order; the state file
    /// uses the index after the last registry).
    pub source: usize,
    /// Registry revision of the record.
    pub revision: u64,
    /// When this sidecar learned the current record.
    pub seen_at: SystemTime,
    /// Long-lived learned state and connection pool.
    pub state: Arc<EndpointState>,
}

// === impl Table ===

impl Table {
    /// Look up a service.
    pub fn get(&self, service: &str) -> Option<&Arc<ServiceRoutes>> {
        self.services.get(service)
    }

    /// Total endpoints across services.
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }
}
