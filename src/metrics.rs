//! Prometheus metrics (`prometheus-client`), served by the admin listener.
//!
//! Label values are `Arc<str>` and `&'static str` so recording a request
//! clones pointers rather than allocating strings. The request path goes
//! further and records through [`RequestMetrics`], handles resolved once per
//! service, so it hashes no label set at all.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds: sub-millisecond resolution for the mesh hop,
/// up to the default 15 s overall timeout.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
];

/// Table build buckets in seconds: a rebuild is expected well under 1 ms
/// and must stay under 10 ms even for 10k endpoints.
const BUILD_BUCKETS: [f64; 8] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1];

/// `requests_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound`, `inbound` or `ingress`.
    pub direction: &'static str,
    /// Target service (outbound) or the local service (inbound).
    pub service: Arc<str>,
    /// Response status.
    pub code: u16,
}

/// `request_duration_seconds` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    /// `outbound`, `inbound` or `ingress`.
    pub direction: &'static str,
    /// Service.
    pub service: Arc<str>,
}

/// Per-service labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// Service.
    pub service: Arc<str>,
}

/// `endpoints` gauge labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Service.
    pub service: Arc<str>,
    /// `healthy` or `ejected`.
    pub state: &'static str,
}

/// Per-registry labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// Registry index and kind, e.g. `0-etcd`.
    pub registry: Arc<str>,
}

/// Registry operation failure labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryOpLabels {
    /// Registry index and kind.
    pub registry: Arc<str>,
    /// `register`, `withdraw`, `deregister`.
    pub op: &'static str,
}

/// `consul_requests_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsulRequestLabels {
    /// Registry index and kind, e.g. `1-consul`.
    pub registry: Arc<str>,
    /// `register`, `check_update`, `deregister`, `catalog`, `health`.
    pub op: &'static str,
    /// `ok`, `status` (the agent refused) or `error` (no answer).
    pub outcome: &'static str,
}

/// `consul_index_resets_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IndexResetLabels {
    /// Registry index and kind.
    pub registry: Arc<str>,
    /// `catalog` or `health`.
    pub query: &'static str,
    /// `backwards` (reset to 0) or `below_one` (raised to 1).
    pub reason: &'static str,
}

/// `tls_handshakes_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` (we are the server) or `outbound` (we dialed).
    pub direction: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// `tls_reloads_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` (a new pair is in use) or `error` (rejected; the old pair stays).
    pub result: &'static str,
}

/// The request series of one (direction, service), resolved once.
///
/// `Family::get_or_create` hashes the whole label set and takes the family's
/// lock on every call; for `requests_total` and `request_duration_seconds`
/// that was two hashes per request per hop. The handles here share their
/// storage with the family (prometheus-client metrics are `Arc`s inside), so
/// recording through them is the same series at the cost of the atomics.
#[derive(Debug)]
pub struct RequestMetrics {
    direction: &'static str,
    service: Arc<str>,
    /// The family, to create a counter for a status not seen before.
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    /// Counters by status code seen so far. A service answers with a
    /// handful of codes, so a short scan under an uncontended lock beats
    /// hashing; the list is bounded by the number of valid codes.
    codes: Mutex<Vec<(u16, Counter)>>,
}

/// All metrics of one sidecar.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by direction, service and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency (to response headers).
    pub duration: Family<DurationLabels, Histogram>,
    /// Endpoints per service and state.
    pub endpoints: Family<EndpointLabels, Gauge>,
    /// Retries sent.
    pub retries: Family<ServiceLabels, Counter>,
    /// Retries refused by the budget.
    pub retry_budget_exhausted: Family<ServiceLabels, Counter>,
    /// Endpoints ejected by outlier detection.
    pub ejections: Family<ServiceLabels, Counter>,
    /// Picks made while the panic threshold was in force.
    pub panic_routing: Family<ServiceLabels, Counter>,
    /// Requests refused by a circuit breaker.
    pub overloaded: Family<ServiceLabels, Counter>,
    /// Requests for services not in the table.
    pub unknown_service: Counter,
    /// 1 while the registry is reachable.
    pub registry_connected: Family<RegistryLabels, Gauge>,
    /// 1 while our instance is registered there.
    pub registered: Family<RegistryLabels, Gauge>,
    /// Failed registry operations.
    pub registry_errors: Family<RegistryOpLabels, Counter>,
    /// Malformed registry values skipped (each distinct value once).
    pub malformed_values: Family<RegistryLabels, Counter>,
    /// Consul agent HTTP requests by operation and outcome.
    pub consul_requests: Family<ConsulRequestLabels, Counter>,
    /// Consul blocking-query index resets (Consul's index rules).
    pub consul_index_resets: Family<IndexResetLabels, Counter>,
    /// Times a registry was lost (watch broken, unreachable, stalled).
    pub registry_disconnects: Family<RegistryLabels, Counter>,
    /// Full re-reads of a registry after its first one: after a
    /// reconnect, or because etcd compacted past the watch.
    pub registry_resyncs: Family<RegistryLabels, Counter>,
    /// Routing tables published.
    pub table_updates: Counter,
    /// Time to build one routing table (the applier's work per batch).
    pub table_build: Histogram,
    /// 1 while the table is stale (a registry is down, or loaded from the
    /// state file).
    pub table_stale: Gauge,
    /// 1 while the local service passes its probe.
    pub local_healthy: Gauge,
    /// Resident memory in bytes, sampled at scrape time.
    pub resident_memory: Gauge,
    /// mTLS handshakes between sidecars, by direction and result.
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    /// Certificate reloads, by result.
    pub tls_reloads: Family<ReloadLabels, Counter>,
    /// notAfter of the certificate in use, in Unix seconds (0 without TLS),
    /// so an alert can fire well before it lapses.
    pub tls_cert_expiry: Gauge,
    /// 1 while the sidecar runs under `SCHED_BATCH` (`crate::scheduling`).
    pub sched_batch: Gauge,
    /// Times the run-queue delay sent the sidecar back to the normal policy.
    pub sched_fallbacks: Counter,
}

// === impl Metrics ===

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outrigger");
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(LATENCY_BUCKETS.iter().copied())
            }),
            endpoints: Family::default(),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            ejections: Family::default(),
            panic_routing: Family::default(),
            overloaded: Family::default(),
            unknown_service: Counter::default(),
            registry_connected: Family::default(),
            registered: Family::default(),
            registry_errors: Family::default(),
            malformed_values: Family::default(),
            consul_requests: Family::default(),
            consul_index_resets: Family::default(),
            registry_disconnects: Family::default(),
            registry_resyncs: Family::default(),
            table_updates: Counter::default(),
            table_build: Histogram::new(BUILD_BUCKETS.iter().copied()),
            table_stale: Gauge::default(),
            local_healthy: Gauge::default(),
            resident_memory: Gauge::default(),
            tls_handshakes: Family::default(),
            tls_reloads: Family::default(),
            tls_cert_expiry: Gauge::default(),
            sched_batch: Gauge::default(),
            sched_fallbacks: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "requests",
            "Requests relayed, by direction, service and status",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to response headers",
            m.duration.clone(),
        );
        r.register(
            "endpoints",
            "Endpoints per service and state",
            m.endpoints.clone(),
        );
        r.register("retries", "Retries sent", m.retries.clone());
        r.register(
            "retry_budget_exhausted",
            "Retries refused by the retry budget",
            m.retry_budget_exhausted.clone(),
        );
        r.register(
            "ejections",
            "Endpoints ejected by passive outlier detection",
            m.ejections.clone(),
        );
        r.register(
            "panic_routing",
            "Picks made below the panic threshold (ejections ignored)",
            m.panic_routing.clone(),
        );
        r.register(
            "overloaded",
            "Requests refused by a concurrency limit",
            m.overloaded.clone(),
        );
        r.register(
            "unknown_service",
            "Requests for services not in the routing table",
            m.unknown_service.clone(),
        );
        r.register(
            "registry_connected",
            "1 while the registry is reachable",
            m.registry_connected.clone(),
        );
        r.register(
            "registered",
            "1 while this instance is registered",
            m.registered.clone(),
        );
        r.register(
            "registry_errors",
            "Failed registry operations",
            m.registry_errors.clone(),
        );
        r.register(
            "registry_malformed_values",
            "Malformed registry values skipped",
            m.malformed_values.clone(),
        );
        r.register(
            "consul_requests",
            "Consul agent HTTP requests, by operation and outcome",
            m.consul_requests.clone(),
        );
        r.register(
            "consul_index_resets",
            "Consul blocking-query index resets (backwards: to 0; below_one: to 1)",
            m.consul_index_resets.clone(),
        );
        r.register(
            "registry_disconnects",
            "Times a registry was lost (the last table keeps serving)",
            m.registry_disconnects.clone(),
        );
        r.register(
            "registry_resyncs",
            "Full re-reads of a registry after the first (reconnect or compaction)",
            m.registry_resyncs.clone(),
        );
        r.register(
            "routing_table_updates",
            "Routing tables published",
            m.table_updates.clone(),
        );
        r.register(
            "routing_table_build_seconds",
            "Time to build and publish one routing table",
            m.table_build.clone(),
        );
        r.register(
            "routing_table_stale",
            "1 while routing on a stale table",
            m.table_stale.clone(),
        );
        r.register(
            "local_service_healthy",
            "1 while the local service passes its probe",
            m.local_healthy.clone(),
        );
        r.register(
            "resident_memory_bytes",
            "Resident set size",
            m.resident_memory.clone(),
        );
        r.register(
            "tls_handshakes",
            "mTLS handshakes between sidecars, by direction and result",
            m.tls_handshakes.clone(),
        );
        r.register(
            "tls_reloads",
            "Certificate reloads, by result (error: the old pair stays in use)",
            m.tls_reloads.clone(),
        );
        r.register(
            "tls_cert_expiry_timestamp_seconds",
            "notAfter of the certificate in use (Unix seconds; 0 without TLS)",
            m.tls_cert_expiry.clone(),
        );
        r.register(
            "sched_batch",
            "1 while running under SCHED_BATCH (runtime.scheduling = adaptive)",
            m.sched_batch.clone(),
        );
        r.register(
            "sched_fallbacks",
            "Times run-queue delay under SCHED_BATCH sent the sidecar back to the normal policy",
            m.sched_fallbacks.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count one finished request.
    pub fn record_request(
        &self,
        direction: &'static str,
        service: &Arc<str>,
        code: u16,
        elapsed: std::time::Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                service: service.clone(),
                code,
            })
            .inc();
        self.duration
            .get_or_create(&DurationLabels {
                direction,
                service: service.clone(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Handles on the request series of `direction` and `service`, for a
    /// caller that records many requests to one service.
    pub fn request_metrics(&self, direction: &'static str, service: &Arc<str>) -> RequestMetrics {
        let duration = self
            .duration
            .get_or_create(&DurationLabels {
                direction,
                service: service.clone(),
            })
            .clone();
        RequestMetrics {
            direction,
            service: service.clone(),
            requests: self.requests.clone(),
            duration,
            codes: Mutex::new(Vec::new()),
        }
    }

    /// Per-service label set.
    pub fn service(service: &Arc<str>) -> ServiceLabels {
        ServiceLabels {
            service: service.clone(),
        }
    }

    /// Render the Prometheus text exposition.
    pub fn encode(&self) -> String {
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

// === impl RequestMetrics ===

impl RequestMetrics {
    /// Count one finished request.
    pub fn record(&self, code: u16, elapsed: std::time::Duration) {
        self.counter(code).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    fn counter(&self, code: u16) -> Counter {
        let Ok(mut codes) = self.codes.lock() else {
            // Poisoned only if a panic hit mid-push; the family still works.
            return self.family_counter(code);
        };
        if let Some((_, c)) = codes.iter().find(|(k, _)| *k == code) {
            return c.clone();
        }
        let c = self.family_counter(code);
        codes.push((code, c.clone()));
        c
    }

    fn family_counter(&self, code: u16) -> Counter {
        self.requests
            .get_or_create(&RequestLabels {
                direction: self.direction,
                service: self.service.clone(),
                code,
            })
            .clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// RSS from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_handles_record_into_the_exported_series() {
        let m = Metrics::new();
        let svc: Arc<str> = "b".into();
        let h = m.request_metrics("outbound", &svc);
        h.record(200, std::time::Duration::from_millis(1));
        h.record(200, std::time::Duration::from_millis(1));
        h.record(503, std::time::Duration::from_millis(1));
        // The slow path and the handle are one series, not two.
        m.record_request("outbound", &svc, 200, std::time::Duration::from_millis(1));
        let text = m.encode();
        assert!(
            text.contains(
                r#"outrigger_requests_total{direction="outbound",service="b",code="200"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"outrigger_requests_total{direction="outbound",service="b",code="503"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"outrigger_request_duration_seconds_count{direction="outbound",service="b"} 4"#
            ),
            "{text}"
        );
    }
}
