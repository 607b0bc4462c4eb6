//! Loading and checking the certificate files: CA bundle, chain and key.
//!
//! The same checks run at start-up (where a failure is a config error that
//! names the field) and on every reload (where a failure keeps the pair in
//! use and is logged): the files parse, the key matches the certificate,
//! the certificate chains to the CA bundle and is within its validity, and
//! it carries this sidecar's own SPIFFE id.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use super::identity::{identity_of, SpiffeId};
use super::provider;
use crate::config::TlsConfig;

/// Largest certificate or key file read; real ones are a few KiB, and a
/// runaway file must not be read into memory every reload interval.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A checked set of TLS material, ready to build rustls configs from.
#[derive(Debug)]
pub struct Material {
    /// Trust anchors: the CA bundle.
    pub roots: Arc<RootCertStore>,
    /// Our chain and key.
    pub certified: Arc<CertifiedKey>,
    /// Our identity, as the certificate states it.
    pub identity: SpiffeId,
    /// When our certificate expires.
    pub not_after: SystemTime,
    /// The raw bytes of (ca, cert, key), to tell a real change from a touch.
    pub source: FileBytes,
}

/// The three files' bytes as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileBytes {
    /// CA bundle.
    pub ca: Vec<u8>,
    /// Certificate chain.
    pub cert: Vec<u8>,
    /// Private key.
    pub key: Vec<u8>,
}

/// A problem with one of the files; `field` is the config key (`tls.cert`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MaterialError {
    /// `tls.ca`, `tls.cert` or `tls.key`.
    pub field: &'static str,
    /// What is wrong, naming the file.
    pub message: String,
}

// === impl FileBytes ===

impl FileBytes {
    /// Read the three files named in `config`.
    pub fn read(config: &TlsConfig) -> Result<FileBytes, MaterialError> {
        Ok(FileBytes {
            ca: read_file("tls.ca", &config.ca)?,
            cert: read_file("tls.cert", &config.cert)?,
            key: read_file("tls.key", &config.key)?,
        })
    }
}

// === impl Material ===

impl Material {
    /// Read and check the files for the sidecar of `service`.
    pub fn load(config: &TlsConfig, service: &str) -> Result<Material, MaterialError> {
        Material::from_bytes(FileBytes::read(config)?, config, service)
    }

    /// Check already-read file contents.
    pub fn from_bytes(
        source: FileBytes,
        config: &TlsConfig,
        service: &str,
    ) -> Result<Material, MaterialError> {
        let ca_path = config.ca.display();
        let cert_path = config.cert.display();
        let key_path = config.key.display();
        let ca_err = |message: String| MaterialError {
            field: "tls.ca",
            message,
        };
        let cert_err = |message: String| MaterialError {
            field: "tls.cert",
            message,
        };
        let key_err = |message: String| MaterialError {
            field: "tls.key",
            message,
        };

        // CA bundle: every certificate is a trust anchor.
        let cas = pem_certs(&source.ca).map_err(|e| ca_err(format!("{ca_path}: {e}")))?;
        let mut roots = RootCertStore::empty();
        for (i, ca) in cas.into_iter().enumerate() {
            roots.add(ca).map_err(|e| {
                ca_err(format!(
                    "{ca_path}: certificate {i} is not a usable CA: {e}"
                ))
            })?;
        }

        // Chain and key, and that they belong together.
        let chain = pem_certs(&source.cert).map_err(|e| cert_err(format!("{cert_path}: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&source.key)
            .map_err(|e| key_err(format!("{key_path}: no PEM private key ({e})")))?;
        let certified = CertifiedKey::from_der(chain.clone(), key, &provider()).map_err(|e| {
            key_err(format!(
                "{key_path} does not match the certificate in {cert_path} ({e})"
            ))
        })?;

        // The certificate chains to the bundle and is valid now (this is the
        // check peers will make; failing it here beats failing every
        // handshake later).
        let leaf = &chain[0];
        let parsed =
            ParsedCertificate::try_from(leaf).map_err(|e| cert_err(format!("{cert_path}: {e}")))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| {
            cert_err(format!(
                "{cert_path} is not valid under the CA bundle {ca_path}: {e}"
            ))
        })?;

        // Our own identity.
        let identity = identity_of(leaf, &config.trust_domain)
            .map_err(|e| cert_err(format!("{cert_path}: {e}")))?;
        if identity.service != service {
            return Err(cert_err(format!(
                "{cert_path} is for {identity}, but this sidecar is {}",
                SpiffeId::new(&config.trust_domain, service)
            )));
        }
        let not_after = not_after(leaf).map_err(|e| cert_err(format!("{cert_path}: {e}")))?;
        Ok(Material {
            roots: Arc::new(roots),
            certified: Arc::new(certified),
            identity,
            not_after,
            source,
        })
    }
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, MaterialError> {
    let err = |message: String| MaterialError { field, message };
    let meta =
        std::fs::metadata(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(err(format!(
            "{} is {} bytes, larger than any certificate file ({MAX_FILE_BYTES} max)",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn pem_certs(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE block".into());
    }
    Ok(certs)
}

/// The certificate's notAfter.
fn not_after(der: &[u8]) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let ts = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(ts).unwrap_or(0)))
}
