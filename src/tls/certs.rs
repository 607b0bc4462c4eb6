//! `outrigger certs`: a development CA and one SPIFFE certificate per
//! service, for trying mTLS locally and for the compose mesh.
//!
//! Files written into the output directory:
//! `ca.pem`, `ca-key.pem`, and `<service>.pem`, `<service>-key.pem` per
//! service. Keys are mode 0600. Existing files are never overwritten
//! without `--force`: a run over a complete directory changes nothing (so a
//! compose init container can run it on every `up`), and a run naming a new
//! service issues only that service's pair, from the existing CA.
//!
//! This is a development tool: production meshes get their certificates
//! from their own CA (SPIRE, cert-manager, Vault), in the same layout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::identity::SpiffeId;

/// CA lifetime: long enough that a development mesh never sees it expire.
const CA_DAYS: u64 = 3650;
/// Certificates start this far in the past, so a peer whose clock is a bit
/// behind ours does not reject a fresh certificate as not yet valid.
const BACKDATE: Duration = Duration::from_secs(3600);

/// What to generate.
#[derive(Debug, Clone)]
pub struct CertsRequest {
    /// Output directory (created if missing).
    pub out: PathBuf,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Services to issue certificates for.
    pub services: Vec<String>,
    /// Lifetime of the service certificates, in days.
    pub days: u64,
    /// Replace existing files (a new CA and new certificates for all).
    pub force: bool,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileAction {
    /// Written now.
    Written(PathBuf),
    /// Already there; left alone.
    Kept(PathBuf),
}

/// Why certificates could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A bad argument (trust domain, service name).
    #[error("{0}")]
    Invalid(String),
    /// Existing files that cannot be used as they are.
    #[error("{0} (use --force to replace every file)")]
    Conflict(String),
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating {what}: {source}")]
    Rcgen {
        /// Which certificate.
        what: String,
        /// The cause.
        source: rcgen::Error,
    },
}

/// The CA's distinguished name; rebuilt identically to sign with an
/// existing CA, because the issuer name must match the CA's subject byte
/// for byte.
fn ca_name(trust_domain: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        DnValue::Utf8String(trust_domain.to_owned()),
    );
    dn.push(
        DnType::CommonName,
        DnValue::Utf8String("outrigger development CA".to_owned()),
    );
    dn
}

/// Seconds since the epoch, as a duration (for rcgen's validity fields,
/// which are `time::OffsetDateTime` = `date_time_ymd(1970, 1, 1) + d`).
fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Parameters of a service certificate: one URI SAN (the SPIFFE id), both
/// server and client auth (a sidecar is both), valid from an hour ago for
/// `days`.
pub fn service_params(
    trust_domain: &str,
    service: &str,
    days: u64,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let id = SpiffeId::new(trust_domain, service).to_string();
    params.subject_alt_names = vec![SanType::URI(id.try_into()?)];
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        DnValue::Utf8String(trust_domain.to_owned()),
    );
    dn.push(DnType::CommonName, DnValue::Utf8String(service.to_owned()));
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = since_epoch(SystemTime::now());
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + now.saturating_sub(BACKDATE);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + now + Duration::from_secs(days * 86_400);
    Ok(params)
}

/// Parameters of the development CA of `trust_domain`.
pub fn ca_params(trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_name(trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = since_epoch(SystemTime::now());
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + now.saturating_sub(BACKDATE);
    params.not_after =
        rcgen::date_time_ymd(1970, 1, 1) + now + Duration::from_secs(CA_DAYS * 86_400);
    params
}

/// Generate (or complete) the directory. Returns what happened to each file.
pub fn generate(req: &CertsRequest) -> Result<Vec<FileAction>, CertsError> {
    check_name(&req.trust_domain, true)?;
    if req.services.is_empty() {
        return Err(CertsError::Invalid("name at least one service".into()));
    }
    for s in &req.services {
        check_name(s, false)?;
    }
    if req.days == 0 {
        return Err(CertsError::Invalid("--days must be at least 1".into()));
    }
    std::fs::create_dir_all(&req.out).map_err(|source| CertsError::Io {
        path: req.out.clone(),
        source,
    })?;
    let ca_cert = req.out.join("ca.pem");
    let ca_key = req.out.join("ca-key.pem");
    let pairs: Vec<(String, PathBuf, PathBuf)> = req
        .services
        .iter()
        .map(|s| {
            (
                s.clone(),
                req.out.join(format!("{s}.pem")),
                req.out.join(format!("{s}-key.pem")),
            )
        })
        .collect();

    let mut actions = Vec::new();
    // 1. The CA: reuse a complete one, unless forced.
    let ca_exists = (ca_cert.exists(), ca_key.exists());
    let issuer = if ca_exists == (true, true) && !req.force {
        let key_pem = read(&ca_key)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| CertsError::Rcgen {
            what: format!("the CA key from {}", ca_key.display()),
            source,
        })?;
        let ca_pem = read(&ca_cert)?;
        let domain = ca_trust_domain(&ca_pem);
        if domain.as_deref() != Some(req.trust_domain.as_str()) {
            return Err(CertsError::Conflict(format!(
                "{} is not an outrigger CA for trust domain {:?} (it names {:?})",
                ca_cert.display(),
                req.trust_domain,
                domain.unwrap_or_default()
            )));
        }
        actions.push(FileAction::Kept(ca_cert.clone()));
        actions.push(FileAction::Kept(ca_key.clone()));
        Issuer::new(ca_params(&req.trust_domain), key)
    } else if req.force || ca_exists == (false, false) {
        if !req.force {
            if let Some((s, _, _)) = pairs.iter().find(|(_, c, k)| c.exists() || k.exists()) {
                return Err(CertsError::Conflict(format!(
                    "{} has files for service {s} but no CA",
                    req.out.display()
                )));
            }
        }
        let key = KeyPair::generate().map_err(|source| CertsError::Rcgen {
            what: "the CA key".into(),
            source,
        })?;
        let params = ca_params(&req.trust_domain);
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertsError::Rcgen {
                what: "the CA certificate".into(),
                source,
            })?;
        write_atomic(&ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&ca_cert, cert.pem().as_bytes(), 0o644)?;
        actions.push(FileAction::Written(ca_cert.clone()));
        actions.push(FileAction::Written(ca_key.clone()));
        Issuer::new(params, key)
    } else {
        return Err(CertsError::Conflict(format!(
            "only one of {} and {} exists",
            ca_cert.display(),
            ca_key.display()
        )));
    };

    // 2. One pair per service.
    for (service, cert_path, key_path) in &pairs {
        match (cert_path.exists(), key_path.exists()) {
            (true, true) if !req.force => {
                actions.push(FileAction::Kept(cert_path.clone()));
                actions.push(FileAction::Kept(key_path.clone()));
                continue;
            }
            (true, false) | (false, true) if !req.force => {
                return Err(CertsError::Conflict(format!(
                    "only one of {} and {} exists",
                    cert_path.display(),
                    key_path.display()
                )))
            }
            _ => {}
        }
        let what = || format!("the certificate of {service}");
        let key = KeyPair::generate().map_err(|source| CertsError::Rcgen {
            what: what(),
            source,
        })?;
        let params = service_params(&req.trust_domain, service, req.days).map_err(|source| {
            CertsError::Rcgen {
                what: what(),
                source,
            }
        })?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| CertsError::Rcgen {
                what: what(),
                source,
            })?;
        write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(cert_path, cert.pem().as_bytes(), 0o644)?;
        actions.push(FileAction::Written(cert_path.clone()));
        actions.push(FileAction::Written(key_path.clone()));
    }
    Ok(actions)
}

/// The organization (= trust domain) an existing `ca.pem` names.
fn ca_trust_domain(pem: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let org = cert.subject().iter_organization().next()?;
    org.as_str().ok().map(str::to_owned)
}

fn check_name(s: &str, dotted: bool) -> Result<(), CertsError> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let ok = if dotted {
        s.len() <= 253 && s.split('.').all(label_ok)
    } else {
        label_ok(s)
    };
    if ok {
        Ok(())
    } else if dotted {
        Err(CertsError::Invalid(format!(
            "{s:?} is not a valid trust domain (lowercase DNS name)"
        )))
    } else {
        Err(CertsError::Invalid(format!(
            "{s:?} is not a valid service name (a lowercase DNS label)"
        )))
    }
}

fn read(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|source| CertsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Write via a temp file and rename, so a sidecar polling the directory
/// never reads half a file; the temp file has `mode` from creation, so a
/// key is never readable by others even briefly.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity::identity_of;

    fn req(dir: &Path, services: &[&str], force: bool) -> CertsRequest {
        CertsRequest {
            out: dir.to_owned(),
            trust_domain: "mesh.local".into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            days: 30,
            force,
        }
    }

    fn cert_der(path: &Path) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(path)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn writes_ca_and_spiffe_certs_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let actions = generate(&req(dir.path(), &["a", "b"], false)).unwrap();
        assert_eq!(actions.len(), 6);
        assert!(actions.iter().all(|a| matches!(a, FileAction::Written(_))));
        let id = identity_of(&cert_der(&dir.path().join("b.pem")), "mesh.local").unwrap();
        assert_eq!(id.to_string(), "spiffe://mesh.local/service/b");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in ["ca-key.pem", "a-key.pem", "b-key.pem"] {
                let mode = std::fs::metadata(dir.path().join(key))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{key}");
            }
        }
    }

    #[test]
    fn rerun_keeps_files_and_new_service_uses_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        generate(&req(dir.path(), &["a"], false)).unwrap();
        let a_before = std::fs::read(dir.path().join("a.pem")).unwrap();
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let actions = generate(&req(dir.path(), &["a", "c"], false)).unwrap();
        assert!(actions.contains(&FileAction::Kept(dir.path().join("a.pem"))));
        assert!(actions.contains(&FileAction::Written(dir.path().join("c.pem"))));
        assert_eq!(std::fs::read(dir.path().join("a.pem")).unwrap(), a_before);
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        // c's certificate chains to the existing CA.
        let cfg = crate::config::TlsConfig {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("c.pem"),
            key: dir.path().join("c-key.pem"),
            trust_domain: "mesh.local".into(),
            allow: vec![],
            reload_interval: Duration::from_secs(5),
            mode: crate::config::TlsMode::Strict,
        };
        crate::tls::material::Material::load(&cfg, "c").unwrap();
        // --force replaces the CA.
        generate(&req(dir.path(), &["a"], true)).unwrap();
        assert_ne!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
    }

    #[test]
    fn half_a_pair_or_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        generate(&req(dir.path(), &["a"], false)).unwrap();
        std::fs::remove_file(dir.path().join("a-key.pem")).unwrap();
        let err = generate(&req(dir.path(), &["a"], false)).unwrap_err();
        assert!(err.to_string().contains("only one of"), "{err}");
        let err = generate(&req(dir.path(), &["B"], false)).unwrap_err();
        assert!(
            err.to_string().contains("not a valid service name"),
            "{err}"
        );
    }
}
