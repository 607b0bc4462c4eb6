//! mTLS between sidecars: rustls configs, SPIFFE identities, hot reload.
//!
//! Every sidecar is both a TLS server (its inbound listener) and a TLS
//! client (toward its peers), with one certificate whose single URI SAN is
//! `spiffe://<trust_domain>/service/<name>` (the SPIFFE X.509-SVID rule).
//!
//! * **Inbound** ([`Tls::acceptor`]): client certificates are mandatory and
//!   must chain to the CA bundle; the caller's identity is read from the
//!   verified certificate ([`peer_identity`]) and checked against
//!   `tls.allow` per request by [`crate::inbound`].
//! * **Outbound** ([`Tls::connector`]): the pool dials with the target
//!   service as the TLS server name, and [`verify::PeerServerVerifier`]
//!   requires the peer's identity to be that service's.
//! * **Reload** ([`Tls::run_reload`]): the files are polled every
//!   `tls.reload_interval`; a changed, valid set replaces the configs for
//!   new handshakes (established connections keep theirs); an invalid set
//!   is logged and counted, and the old pair stays in use.
//!
//! Only TLS 1.3 is offered, with ALPN `h2` (and `http/1.1` for upgrades,
//! which need a connection of their own). Session resumption is off on both
//! sides: connections between sidecars are long-lived, and a resumed
//! session would skip presenting a rotated certificate.
//!
//! Submodules: [`identity`] (SPIFFE ids), [`material`] (reading and
//! checking the files), [`verify`] (the verifiers), [`certs`] (the
//! `outrigger certs` development CA).

pub mod certs;
pub mod identity;
pub mod material;
pub mod verify;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{Config, ConfigError, FieldError, TlsConfig, TlsMode};
use crate::metrics::{HandshakeLabels, Metrics, ReloadLabels};
use identity::{identity_of, SpiffeId};
use material::{FileBytes, Material, MaterialError};
use verify::{PeerClientVerifier, PeerServerVerifier};

/// ALPN between sidecars: HTTP/2 for the multiplexed pool.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for the dedicated HTTP/1.1 connection an upgrade (WebSocket) needs.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The caller's identity on an inbound request, taken from its verified
/// client certificate. Put in the request's extensions by the listener;
/// absent on plaintext connections (permissive mode only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<SpiffeId>);

/// The rustls configs built from one [`Material`].
#[derive(Debug)]
struct Configs {
    server: Arc<ServerConfig>,
    client_h2: Arc<ClientConfig>,
    client_h1: Arc<ClientConfig>,
    material: Material,
}

/// A sidecar's TLS state: the current configs, swapped on reload.
#[derive(Debug)]
pub struct Tls {
    config: TlsConfig,
    /// Our service name: the identity our certificate must carry.
    service: String,
    current: ArcSwap<Configs>,
    /// The bytes of the last set that failed to load, so a broken file is
    /// logged once, not every interval.
    last_rejected: Mutex<Option<FileBytes>>,
    metrics: Arc<Metrics>,
}

/// What a reload poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The files are what is loaded already.
    Unchanged,
    /// A new, valid set is now used for new handshakes.
    Applied,
    /// The files changed but are unusable; the old pair stays.
    Rejected(String),
}

/// The crypto provider (ring), shared by every config.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Check the `[tls]` files of a validated config (readable, parse, key
/// matches, chain valid, own SPIFFE id); errors name the field. Run before
/// anything binds, and by `check-config`.
pub fn validate_files(config: &Config) -> Result<(), ConfigError> {
    let Some(tls) = &config.tls else {
        return Ok(());
    };
    match Material::load(tls, &config.service.name) {
        Ok(_) => Ok(()),
        Err(e) => Err(ConfigError::Invalid(vec![FieldError {
            path: e.field.to_owned(),
            message: e.message,
        }])),
    }
}

/// The SPIFFE id of the peer of a server-side TLS connection.
pub fn peer_identity(conn: &rustls::ServerConnection, trust_domain: &str) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    identity_of(leaf, trust_domain).ok()
}

// === impl Tls ===

impl Tls {
    /// Load the files named in `config.tls` (which must be set).
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Tls>, MaterialError> {
        let tls = config.tls.clone().ok_or_else(|| MaterialError {
            field: "tls",
            message: "not configured".into(),
        })?;
        let service = config.service.name.clone();
        let material = Material::load(&tls, &service)?;
        let configs = build(&tls, material)?;
        set_expiry(&metrics, &configs.material);
        Ok(Arc::new(Tls {
            config: tls,
            service,
            current: ArcSwap::from_pointee(configs),
            last_rejected: Mutex::new(None),
            metrics,
        }))
    }

    /// An acceptor with the current server config.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().server.clone())
    }

    /// A connector with the current client config, for HTTP/2 (`h2`) or
    /// for an upgrade's HTTP/1.1 connection.
    pub fn connector(&self, h2: bool) -> TlsConnector {
        let c = self.current.load();
        TlsConnector::from(if h2 {
            c.client_h2.clone()
        } else {
            c.client_h1.clone()
        })
    }

    /// Our trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// `tls.mode`.
    pub fn mode(&self) -> TlsMode {
        self.config.mode
    }

    /// Whether plaintext peers are accepted too (migration mode).
    pub fn permissive(&self) -> bool {
        self.config.mode == TlsMode::Permissive
    }

    /// Whether `caller` may reach the local service (`tls.allow`; empty
    /// allows any authenticated caller).
    pub fn allows(&self, caller: &str) -> bool {
        self.config.allow.is_empty() || self.config.allow.iter().any(|a| a == caller)
    }

    /// Our identity, from the certificate in use.
    pub fn identity(&self) -> SpiffeId {
        self.current.load().material.identity.clone()
    }

    /// Count one handshake (`direction` inbound/outbound).
    pub fn record_handshake(&self, direction: &'static str, ok: bool) {
        self.metrics
            .tls_handshakes
            .get_or_create(&HandshakeLabels {
                direction,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Poll the files every `tls.reload_interval`, forever.
    pub async fn run_reload(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            // File reads are small and local; a blocking-pool hop would
            // cost more than it saves on a one-thread runtime.
            self.reload_once();
        }
    }

    /// Check the files once and apply a valid change.
    pub fn reload_once(&self) -> ReloadOutcome {
        let current = self.current.load();
        let bytes = match FileBytes::read(&self.config) {
            Ok(b) => b,
            Err(e) => return self.reject(None, e),
        };
        if bytes == current.material.source {
            return ReloadOutcome::Unchanged;
        }
        if self
            .last_rejected
            .lock()
            .ok()
            .is_some_and(|r| r.as_ref() == Some(&bytes))
        {
            // Already reported; still broken.
            return ReloadOutcome::Rejected("unchanged since the last rejection".into());
        }
        let loaded = Material::from_bytes(bytes.clone(), &self.config, &self.service)
            .and_then(|m| build(&self.config, m));
        match loaded {
            Ok(configs) => {
                set_expiry(&self.metrics, &configs.material);
                tracing::info!(
                    identity = %configs.material.identity,
                    expires_unix = expiry_secs(&configs.material),
                    "TLS certificates reloaded; new handshakes use them"
                );
                self.current.store(Arc::new(configs));
                if let Ok(mut r) = self.last_rejected.lock() {
                    *r = None;
                }
                self.count_reload("ok");
                ReloadOutcome::Applied
            }
            Err(e) => self.reject(Some(bytes), e),
        }
    }

    fn reject(&self, bytes: Option<FileBytes>, e: MaterialError) -> ReloadOutcome {
        let mut last = self.last_rejected.lock().ok();
        // An unreadable file (mid-rename) is reported every time: there is
        // no content to remember it by.
        if let (Some(last), Some(bytes)) = (last.as_mut(), bytes) {
            **last = Some(bytes);
        }
        tracing::warn!(field = e.field, error = %e.message, "TLS reload rejected; keeping the certificates in use");
        self.count_reload("error");
        ReloadOutcome::Rejected(e.to_string())
    }

    fn count_reload(&self, result: &'static str) {
        self.metrics
            .tls_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }
}

fn expiry_secs(m: &Material) -> i64 {
    m.not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn set_expiry(metrics: &Metrics, m: &Material) {
    metrics.tls_cert_expiry.set(expiry_secs(m));
}

/// Server and client configs for one set of material.
fn build(config: &TlsConfig, material: Material) -> Result<Configs, MaterialError> {
    let provider = provider();
    let err = |message: String| MaterialError {
        field: "tls.ca",
        message,
    };
    let versions = &[&rustls::version::TLS13];

    let client_verifier = PeerClientVerifier::new(
        material.roots.clone(),
        &config.trust_domain,
        provider.clone(),
    )
    .map_err(|e| err(format!("cannot build the client verifier: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| err(e.to_string()))?
        .with_client_cert_verifier(Arc::new(client_verifier))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            material.certified.clone(),
        )));
    server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;

    let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, MaterialError> {
        let verifier = PeerServerVerifier::new(
            material.roots.clone(),
            &config.trust_domain,
            provider.clone(),
        );
        let mut c = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| err(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(AlwaysCert(material.certified.clone())));
        c.alpn_protocols = vec![alpn.to_vec()];
        c.resumption = Resumption::disabled();
        Ok(Arc::new(c))
    };
    Ok(Configs {
        server: Arc::new(server),
        client_h2: client(ALPN_H2)?,
        client_h1: client(ALPN_HTTP1)?,
        material,
    })
}

/// Presents our certificate whatever the server asks (its CA hints are
/// our own CA anyway).
#[derive(Debug)]
struct AlwaysCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for AlwaysCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// How long the inbound side waits for a TLS handshake to finish; a client
/// that connects and says nothing must not hold a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
