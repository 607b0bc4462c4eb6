//! The local health probe and the registration driver it steers.
//!
//! The sidecar registers its service only while the service answers its
//! probe: an HTTP GET (2xx passes) or a TCP connect, every `interval`, with
//! healthy/unhealthy thresholds so one slow answer does not flap the
//! registration. The driver turns the probe's verdict into registry calls:
//! `register` on every healthy tick (idempotent; it is also how a lost lease
//! or a restarted Consul agent gets repaired), `withdraw` when the verdict
//! turns unhealthy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{HealthCheck, HealthConfig};
use crate::metrics::{Metrics, RegistryLabels, RegistryOpLabels};
use crate::registry::{EndpointRecord, Registry, RegistryError};

/// One registry and its readiness flag.
pub struct RegistryHandle {
    /// `0-etcd`, `1-consul`: index and kind, for logs and metrics.
    pub name: Arc<str>,
    /// The backend.
    pub registry: Arc<dyn Registry>,
    /// Whether our instance is currently registered there.
    pub registered: AtomicBool,
}

/// Run one probe.
pub async fn probe_once(cfg: &HealthConfig, address: &str) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let HealthCheck::Http { path } = &cfg.check else {
            return Ok(());
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(path.as_str())
            .header(http::header::HOST, address)
            .header(http::header::USER_AGENT, "outrigger-health")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("{path} answered {}", res.status()))
        }
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", cfg.timeout.as_millis())),
    }
}

/// Probe forever, publishing the thresholded verdict on `tx`.
pub async fn run_probe(
    cfg: HealthConfig,
    address: String,
    tx: watch::Sender<bool>,
    metrics: Arc<Metrics>,
) {
    let mut ok_streak = 0u32;
    let mut fail_streak = 0u32;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe_once(&cfg, &address).await;
        let healthy = *tx.borrow();
        match result {
            Ok(()) => {
                fail_streak = 0;
                ok_streak = ok_streak.saturating_add(1);
                if !healthy && ok_streak >= cfg.healthy_threshold {
                    tracing::info!(address, "local service is healthy");
                    tx.send_replace(true);
                }
            }
            Err(e) => {
                ok_streak = 0;
                fail_streak = fail_streak.saturating_add(1);
                if healthy && fail_streak >= cfg.unhealthy_threshold {
                    tracing::warn!(address, error = %e, "local service is unhealthy; withdrawing registration");
                    tx.send_replace(false);
                } else {
                    tracing::debug!(address, error = %e, "probe failed");
                }
            }
        }
        metrics.local_healthy.set(*tx.borrow() as i64);
        if tx.is_closed() {
            return;
        }
    }
}

/// Keep every registry in line with the probe's verdict. Returns only on a
/// fatal error (a duplicate instance), which aborts start-up.
pub async fn run_registration(
    registries: Arc<Vec<RegistryHandle>>,
    me: EndpointRecord,
    mut health: watch::Receiver<bool>,
    tick: Duration,
    metrics: Arc<Metrics>,
) -> RegistryError {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = health.changed() => {
                if changed.is_err() {
                    // The prober is gone (shutdown): nothing left to steer.
                    std::future::pending::<()>().await;
                }
            }
        }
        let healthy = *health.borrow_and_update();
        for r in registries.iter() {
            let labels = RegistryLabels {
                registry: r.name.clone(),
            };
            if healthy {
                match r.registry.register(&me).await {
                    Ok(()) => {
                        if !r.registered.swap(true, Ordering::Relaxed) {
                            tracing::info!(registry = %r.name, service = %me.service, instance = %me.instance, "registered");
                        }
                        metrics.registered.get_or_create(&labels).set(1);
                    }
                    Err(e @ RegistryError::Duplicate { .. }) => return e,
                    Err(e) => {
                        if r.registered.swap(false, Ordering::Relaxed) {
                            tracing::warn!(registry = %r.name, error = %e, "registration lost");
                        } else {
                            tracing::debug!(registry = %r.name, error = %e, "registration failed; will retry");
                        }
                        metrics.registered.get_or_create(&labels).set(0);
                        metrics
                            .registry_errors
                            .get_or_create(&RegistryOpLabels {
                                registry: r.name.clone(),
                                op: "register",
                            })
                            .inc();
                    }
                }
            } else if r.registered.load(Ordering::Relaxed) {
                match r.registry.withdraw().await {
                    Ok(()) => {
                        r.registered.store(false, Ordering::Relaxed);
                        metrics.registered.get_or_create(&labels).set(0);
                        tracing::info!(registry = %r.name, "registration withdrawn");
                    }
                    Err(e) => {
                        tracing::warn!(registry = %r.name, error = %e, "withdraw failed; will retry");
                        metrics
                            .registry_errors
                            .get_or_create(&RegistryOpLabels {
                                registry: r.name.clone(),
                                op: "withdraw",
                            })
                            .inc();
                    }
                }
            }
        }
    }
}

/// Deregister everywhere (shutdown), each bounded by `limit`.
pub async fn deregister_all(registries: &[RegistryHandle], limit: Duration, metrics: &Metrics) {
    for r in registries {
        match tokio::time::timeout(limit, r.registry.deregister()).await {
            Ok(Ok(())) => tracing::info!(registry = %r.name, "deregistered"),
            Ok(Err(e)) => {
                tracing::warn!(registry = %r.name, error = %e, "deregister failed");
                metrics
                    .registry_errors
                    .get_or_create(&RegistryOpLabels {
                        registry: r.name.clone(),
                        op: "deregister",
                    })
                    .inc();
            }
            Err(_) => tracing::warn!(registry = %r.name, "deregister timed out"),
        }
        r.registered.store(false, Ordering::Relaxed);
        metrics
            .registered
            .get_or_create(&RegistryLabels {
                registry: r.name.clone(),
            })
            .set(0);
    }
}
