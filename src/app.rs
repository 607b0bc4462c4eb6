//! Wiring: listeners, registries, discovery, health, admin; and the
//! shutdown sequence.
//!
//! Start-up, in order: bind every listener (the config was validated before
//! this is called, so a failure here is a real port conflict), seed the
//! routing table from the state file, start discovery, the probe and the
//! registration driver, then serve.
//!
//! Shutdown (SIGTERM, SIGINT or `POST /drain`): `/ready` turns 503, the
//! registration is removed *first* (so peers stop choosing us), a short
//! grace lets that news reach them, then listeners stop accepting and
//! in-flight requests get `drain_timeout` to finish. The admin listener
//! stops last.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use compact_str::CompactString;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::{Config, Scheduling, TlsMode};
use crate::discovery::{Applier, DiscoveryStatus, Table, UPDATE_CHANNEL};
use crate::health::{self, RegistryHandle};
use crate::http::server;
use crate::inbound::{Direction, Inbound};
use crate::metrics::Metrics;
use crate::outbound::dial::PLAINTEXT_PROTOCOL;
use crate::outbound::h1_pool::DEFAULT_IDLE_EXPIRY;
use crate::outbound::pool::{PoolSettings, HUNG_REPORTS};
use crate::outbound::Outbound;
use crate::registry::{self, EndpointRecord, RegistryError, UpdateTx};
use crate::tls::Tls;

/// How long each registry gets to deregister on shutdown; an unreachable
/// registry must not hold the drain hostage (the lease/TTL cleans up).
const DEREGISTER_LIMIT: Duration = Duration::from_secs(3);

/// Pause between deregistering and closing listeners, so peers watching the
/// registry drop us before we refuse their connections.
const DEREGISTER_GRACE: Duration = Duration::from_millis(500);

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        /// Which listener.
        listener: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A registry refused us for good (duplicate instance) or could not be
    /// set up.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The TLS files could not be loaded.
    #[error("invalid TLS material: {0}")]
    Tls(#[from] crate::tls::material::MaterialError),
}

/// Run the sidecar until shutdown completes.
pub async fn run(config: Config) -> Result<(), AppError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    // TLS material first: a bad file must stop us before any port opens.
    let tls = match &config.tls {
        Some(_) => Some(Tls::new(&config, metrics.clone())?),
        None => None,
    };

    // 1. Bind everything before starting anything.
    let l = &config.listeners;
    let outbound_l = bind("outbound", l.outbound).await?;
    let inbound_l = bind("inbound", l.inbound).await?;
    let admin_l = bind("admin", l.admin).await?;
    let ingress_l = match l.ingress {
        Some(a) => Some(bind("ingress", a).await?),
        None => None,
    };
    let mut fixed_l = Vec::new();
    for u in &config.upstreams {
        if let Some(port) = u.local_port {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let name: Arc<str> = u.name.as_str().into();
            fixed_l.push((name, bind("upstream local_port", addr).await?));
        }
    }

    // 2. Registries and discovery.
    let mut handles = Vec::new();
    for (i, rc) in config.registries.iter().enumerate() {
        let name = registry::registry_name(i, rc);
        let ctx = registry::BuildContext {
            name: name.clone(),
            service: &config.service,
            metrics: metrics.clone(),
        };
        let registry = registry::build(rc, &ctx)?;
        handles.push(RegistryHandle {
            name,
            registry,
            registered: AtomicBool::new(false),
        });
    }
    let registries = Arc::new(handles);
    let table = Arc::new(ArcSwap::from_pointee(Table::default()));
    let status = Arc::new(DiscoveryStatus::default());
    let (update_tx, update_rx) = mpsc::channel(UPDATE_CHANNEL);
    let (hung_tx, hung_rx) = mpsc::channel(HUNG_REPORTS);
    let mut applier = Applier::new(
        registries.iter().map(|r| r.name.clone()).collect(),
        config.clone(),
        Arc::new(PoolSettings {
            tls: tls.clone(),
            hung: Some(hung_tx),
            // Peers normally share our limits: expire idle HTTP/1.1
            // connections at half their idle timeout at the latest.
            h1_idle_expiry: DEFAULT_IDLE_EXPIRY.min(config.limits.idle_connection_timeout / 2),
        }),
        metrics.clone(),
        table.clone(),
        status.clone(),
    );
    applier.seed_from_state_file();
    let applier_task = tokio::spawn(applier.run(update_rx));
    let mut discovery_tasks = Vec::new();
    for (i, r) in registries.iter().enumerate() {
        let tx = UpdateTx::new(i, update_tx.clone());
        discovery_tasks.push(tokio::spawn(r.registry.clone().discover(tx)));
    }
    drop(update_tx);

    // 3. Health probe and registration.
    let (health_tx, health_rx) = watch::channel(false);
    let probe_task = tokio::spawn(health::run_probe(
        config.service.health.clone(),
        config.service.address.clone(),
        health_tx,
        metrics.clone(),
    ));
    let me = own_record(&config);
    let mut registration = tokio::spawn(health::run_registration(
        registries.clone(),
        me,
        health_rx.clone(),
        config.service.health.interval,
        metrics.clone(),
    ));

    // 4. Listeners.
    let (drain_tx, mut drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let drain_timeout = config.runtime.drain_timeout;
    let limits = config.limits.clone();
    let mut serving: Vec<JoinHandle<()>> = Vec::new();

    let outbound = Arc::new(Outbound::new(
        table.clone(),
        config.clone(),
        metrics.clone(),
    ));
    let ejector_task = tokio::spawn(outbound.clone().eject_hung(hung_rx));
    {
        let o = outbound.clone();
        serving.push(tokio::spawn(server::serve(
            outbound_l,
            "outbound",
            limits.clone(),
            move |req, remote| o.clone().handle(req, remote, None),
            stop_rx.clone(),
            drain_timeout,
            None,
        )));
    }
    for (name, listener) in fixed_l {
        let o = outbound.clone();
        serving.push(tokio::spawn(server::serve(
            listener,
            "upstream",
            limits.clone(),
            move |req, remote| o.clone().handle(req, remote, Some(name.clone())),
            stop_rx.clone(),
            drain_timeout,
            None,
        )));
    }
    let inbound = Arc::new(Inbound::new(&config, metrics.clone(), tls.clone()));
    {
        let i = inbound.clone();
        serving.push(tokio::spawn(server::serve(
            inbound_l,
            "inbound",
            limits.clone(),
            move |req, remote| i.clone().handle(req, remote, Direction::Inbound),
            stop_rx.clone(),
            drain_timeout,
            tls.clone(),
        )));
    }
    if let Some(listener) = ingress_l {
        let i = inbound.clone();
        serving.push(tokio::spawn(server::serve(
            listener,
            "ingress",
            limits.clone(),
            move |req, remote| i.clone().handle(req, remote, Direction::Ingress),
            stop_rx.clone(),
            drain_timeout,
            None,
        )));
    }
    let admin = Arc::new(Admin {
        table,
        discovery: status,
        registries: registries.clone(),
        health: health_rx,
        metrics: metrics.clone(),
        config: config.clone(),
        drain: drain_tx.clone(),
    });
    let admin_task = {
        let a = admin.clone();
        tokio::spawn(server::serve(
            admin_l,
            "admin",
            limits,
            move |req, remote| a.clone().handle(req, remote),
            admin_stop_rx,
            Duration::from_secs(1),
            None,
        ))
    };
    let reload_task = tls.clone().map(|t| tokio::spawn(t.run_reload()));
    let trim_task = tokio::spawn(crate::memory::trim_when_idle());
    let sched_task = (config.runtime.scheduling == Scheduling::Adaptive)
        .then(|| tokio::spawn(crate::scheduling::run(metrics.clone())));
    tracing::info!(
        service = %config.service.name,
        instance = %config.service.instance_id,
        mtls = tls.as_ref().map(|t| t.identity().to_string()).unwrap_or_else(|| "off".into()),
        outbound = %config.listeners.outbound,
        inbound = %config.listeners.inbound,
        admin = %config.listeners.admin,
        "outrigger started"
    );

    // 5. Wait for a reason to stop.
    let fatal = tokio::select! {
        sig = shutdown_signal() => {
            tracing::info!(signal = sig, "shutting down");
            None
        }
        _ = server::stopped(&mut drain_rx) => None,
        res = &mut registration => res.ok(),
    };
    drain_tx.send_replace(true);
    registration.abort();

    // 6. Deregister first, then drain.
    health::deregister_all(&registries, DEREGISTER_LIMIT, &metrics).await;
    if fatal.is_none() {
        tokio::time::sleep(DEREGISTER_GRACE.min(drain_timeout)).await;
    }
    stop_tx.send_replace(true);
    for t in serving {
        let _ = t.await;
    }
    probe_task.abort();
    trim_task.abort();
    if let Some(t) = sched_task {
        t.abort();
    }
    ejector_task.abort();
    if let Some(t) = reload_task {
        t.abort();
    }
    for t in discovery_tasks {
        t.abort();
    }
    admin_stop_tx.send_replace(true);
    let _ = admin_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(1), applier_task).await;
    tracing::info!("drained; exiting");
    match fatal {
        Some(e) => Err(AppError::Registry(e)),
        None => Ok(()),
    }
}

/// What this sidecar publishes about its service.
pub fn own_record(config: &Config) -> EndpointRecord {
    let s = &config.service;
    EndpointRecord {
        service: s.name.as_str().into(),
        instance: s.instance_id.as_str().into(),
        address: s.advertise.as_str().into(),
        zone: s.zone.as_deref().map(Into::into),
        weight: s.weight,
        protocols: protocols(config),
        tls: config.tls.is_some(),
        metadata: s.metadata.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// The inbound listener's protocols; a permissive mTLS listener also
/// advertises plaintext, so peers without `[tls]` may still call it during
/// a rollout.
fn protocols(config: &Config) -> Vec<CompactString> {
    let mut p = vec!["http1".into(), "h2".into()];
    if config
        .tls
        .as_ref()
        .is_some_and(|t| t.mode == TlsMode::Permissive)
    {
        p.push(PLAINTEXT_PROTOCOL.into());
    }
    p
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind {
            listener,
            addr,
            source,
        })
}

/// Resolves with the signal's name on SIGTERM or SIGINT.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
