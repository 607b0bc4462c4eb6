//! SPIFFE workload identity: `spiffe://<trust_domain>/service/<name>`.
//!
//! The SPIFFE X.509-SVID spec says an SVID carries *exactly one* URI SAN,
//! and that URI is the workload's identity. Everything that decides who a
//! peer is (the inbound `allow` list, `x-outrigger-caller`, the outbound
//! check that we reached the service we meant to) goes through
//! [`identity_of`], so there is one parser and one rule.

use std::fmt;

use x509_parser::extensions::GeneralName;

/// The path prefix outrigger uses inside a trust domain.
const SERVICE_PATH: &str = "/service/";

/// A verified-shape SPIFFE id naming a mesh service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    /// The trust domain (`mesh.local`).
    pub trust_domain: String,
    /// The service name (`b`).
    pub service: String,
}

/// Why a certificate does not carry a usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The DER is not an X.509 certificate.
    #[error("not a parseable X.509 certificate: {0}")]
    Parse(String),
    /// SPIFFE requires exactly one URI SAN; this has another count.
    #[error("a SPIFFE certificate carries exactly one URI SAN, this one has {0}")]
    UriSanCount(usize),
    /// The URI is not `spiffe://<trust_domain>/service/<name>`.
    #[error("URI SAN {0:?} is not spiffe://<trust_domain>/service/<name>")]
    Shape(String),
    /// A well-formed id from another trust domain.
    #[error("identity {id} is not in trust domain {expected:?}")]
    ForeignDomain {
        /// The id found.
        id: SpiffeId,
        /// Our trust domain.
        expected: String,
    },
}

// === impl SpiffeId ===

impl SpiffeId {
    /// The id of `service` in `trust_domain`.
    pub fn new(trust_domain: &str, service: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_owned(),
            service: service.to_owned(),
        }
    }

    /// Parse `spiffe://<trust_domain>/service/<name>`. Both parts must be
    /// lowercase DNS-ish (no empty labels, no further path segments), as the
    /// SPIFFE id spec requires of the trust domain.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let shape = || IdentityError::Shape(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(shape)?;
        let (domain, path) = rest.split_once('/').ok_or_else(shape)?;
        let service = format!("/{path}");
        let service = service.strip_prefix(SERVICE_PATH).ok_or_else(shape)?;
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if domain.is_empty() || !domain.split('.').all(label_ok) || !label_ok(service) {
            return Err(shape());
        }
        Ok(SpiffeId::new(domain, service))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}{SERVICE_PATH}{}",
            self.trust_domain, self.service
        )
    }
}

/// The SPIFFE id of a DER certificate, required to be in `trust_domain`.
pub fn identity_of(der: &[u8], trust_domain: &str) -> Result<SpiffeId, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(IdentityError::UriSanCount(uris.len()));
    };
    let id = SpiffeId::parse(uri)?;
    if id.trust_domain != trust_domain {
        return Err(IdentityError::ForeignDomain {
            id,
            expected: trust_domain.to_owned(),
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_ids_only() {
        let id = SpiffeId::parse("spiffe://mesh.local/service/b").unwrap();
        assert_eq!(id, SpiffeId::new("mesh.local", "b"));
        assert_eq!(id.to_string(), "spiffe://mesh.local/service/b");
        for bad in [
            "https://mesh.local/service/b",
            "spiffe://mesh.local/b",
            "spiffe://mesh.local/service/",
            "spiffe://mesh.local/service/b/extra",
            "spiffe://Mesh.local/service/b",
            "spiffe:///service/b",
            "spiffe://mesh..local/service/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
