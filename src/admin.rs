//! The admin listener: liveness, readiness, routes, metrics, config, drain.
//!
//! `/ready` is what orchestrators gate traffic on, so it is strict: the
//! first routing table is loaded, the local service passes its probe, the
//! instance is registered in every registry, and the sidecar is not
//! draining. `/live` only says the process is serving.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::discovery::{DiscoveryStatus, Table};
use crate::health::RegistryHandle;
use crate::http::Body;
use crate::metrics::{EndpointLabels, Metrics, RegistryLabels};

/// Everything the admin endpoints report on.
pub struct Admin {
    /// Routing snapshot.
    pub table: Arc<ArcSwap<Table>>,
    /// Discovery flags.
    pub discovery: Arc<DiscoveryStatus>,
    /// Registries and their registration flags.
    pub registries: Arc<Vec<RegistryHandle>>,
    /// Probe verdict.
    pub health: watch::Receiver<bool>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Validated config (rendered redacted).
    pub config: Arc<Config>,
    /// Flipped by `POST /drain` or a signal.
    pub drain: watch::Sender<bool>,
}

// === impl Admin ===

impl Admin {
    /// Serve one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Body>,
        _remote: SocketAddr,
    ) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => self.ready(),
            // Both render the whole table: 85 and 20 ms at 10k endpoints,
            // which every request would wait for on the request thread.
            (&Method::GET, "/routes") => offloaded(move || json_response(self.routes_json())).await,
            (&Method::GET, "/metrics") => offloaded(move || self.metrics()).await,
            (&Method::GET, "/config") => json_response(self.config.redacted_json()),
            (&Method::POST, "/drain") => {
                tracing::info!("drain requested through the admin API");
                self.drain.send_replace(true);
                text(StatusCode::ACCEPTED, "draining\n")
            }
            (_, "/live" | "/ready" | "/routes" | "/metrics" | "/config" | "/drain") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /live /ready /routes /metrics /config\n",
            ),
        }
    }

    fn ready(&self) -> Response<Body> {
        let mut missing = Vec::new();
        if *self.drain.borrow() {
            missing.push("draining".to_string());
        }
        if !self.discovery.loaded.load(Ordering::Relaxed) {
            missing.push("routing table not loaded".to_string());
        }
        if !*self.health.borrow() {
            missing.push("local service not healthy".to_string());
        }
        for r in self.registries.iter() {
            if !r.registered.load(Ordering::Relaxed) {
                missing.push(format!("not registered in {}", r.name));
            }
        }
        if missing.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", missing.join(", ")),
            )
        }
    }

    fn metrics(&self) -> Response<Body> {
        refresh_endpoint_gauges(&self.metrics, &self.table.load());
        let mut res = Response::new(Body::from(self.metrics.encode()));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        res
    }

    /// The routing table with endpoint state, as served on `/routes`.
    pub fn routes_json(&self) -> serde_json::Value {
        let table = self.table.load();
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut names: Vec<_> = table.services.keys().cloned().collect();
        names.sort();
        let services: Vec<_> = names
            .iter()
            .filter_map(|n| table.services.get(n))
            .map(|s| {
                let endpoints: Vec<_> = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let stats = e.state.stats(now);
                        let source = self
                            .registries
                            .get(e.source)
                            .map(|r| r.name.to_string())
                            .unwrap_or_else(|| "state-file".into());
                        json!({
                            "instance": e.record.instance,
                            "address": e.record.address,
                            "zone": e.record.zone,
                            "weight": e.weight,
                            "local_zone": e.local,
                            "state": if stats.ejected { "ejected" } else { "healthy" },
                            "connected": e.state.pool.is_connected(),
                            "source": source,
                            "revision": e.revision,
                            "age_s": wall.duration_since(e.seen_at).map(|d| d.as_secs()).unwrap_or(0),
                            "stats": stats,
                        })
                    })
                    .collect();
                json!({ "name": &*s.name, "endpoints": endpoints })
            })
            .collect();
        // Each registry's own state, so an operator migrating between
        // registries sees which one is up and holds our registration.
        let registries: Vec<_> = self
            .registries
            .iter()
            .map(|r| {
                let labels = RegistryLabels {
                    registry: r.name.clone(),
                };
                json!({
                    "name": &*r.name,
                    "kind": r.registry.kind(),
                    "connected": self.metrics.registry_connected.get_or_create(&labels).get() == 1,
                    "registered": r.registered.load(Ordering::Relaxed),
                })
            })
            .collect();
        json!({
            "generation": table.generation,
            "stale": table.stale,
            "registries": registries,
            "services": services,
        })
    }
}

/// Set the per-service endpoint gauges from the live table (ejection is
/// time-based, so it is read at scrape time).
pub fn refresh_endpoint_gauges(metrics: &Metrics, table: &Table) {
    let now = Instant::now();
    for (name, routes) in &table.services {
        let ejected = routes
            .endpoints
            .iter()
            .filter(|e| e.state.is_ejected(now))
            .count();
        for (state, n) in [
            ("healthy", routes.endpoints.len() - ejected),
            ("ejected", ejected),
        ] {
            metrics
                .endpoints
                .get_or_create(&EndpointLabels {
                    service: name.clone(),
                    state,
                })
                .set(n as i64);
        }
    }
}

fn text(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    let mut res = Response::new(body.into());
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// Render a response through [`crate::offload`]; a 500 if that panicked.
async fn offloaded<F>(render: F) -> Response<Body>
where
    F: FnOnce() -> Response<Body> + Send + 'static,
{
    match crate::offload::run(render).await {
        Ok(res) => res,
        Err(e) => {
            tracing::error!(error = %e, "rendering an admin response failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}

fn json_response(v: serde_json::Value) -> Response<Body> {
    let mut res = Response::new(Body::from(v.to_string()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
