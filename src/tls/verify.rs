//! Certificate verifiers that check SPIFFE identities instead of hostnames.
//!
//! Both directions first do ordinary X.509 path validation with webpki
//! against the CA bundle (signature chain, validity period, key usage), then
//! apply the SPIFFE rule: exactly one URI SAN, in our trust domain.
//!
//! * [`PeerServerVerifier`] (outbound): the peer must be the service we are
//!   calling. The target service travels as the TLS server name (the pool
//!   dials with `ServerName = "b"`), so one client config serves every
//!   peer and the check is `spiffe://<td>/service/<server name>`. DNS names
//!   in the certificate are never consulted: the check is on the identity.
//! * [`PeerClientVerifier`] (inbound): any workload of our trust domain may
//!   complete the handshake; *which* callers may reach the local service is
//!   decided per request by the `allow` list, so a refusal is a readable 403
//!   instead of an opaque handshake failure.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use super::identity::{identity_of, IdentityError};

/// Outbound: chain to our CA, and identity = the target service's.
#[derive(Debug)]
pub struct PeerServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

/// Inbound: chain to our CA (client auth), and a SPIFFE id in our domain.
#[derive(Debug)]
pub struct PeerClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

fn identity_failure(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The target service whose identity the peer must prove.
#[derive(Debug, thiserror::Error)]
#[error("peer is {found}, expected spiffe://{trust_domain}/service/{expected}")]
struct WrongPeer {
    found: String,
    trust_domain: String,
    expected: String,
}

// === impl PeerServerVerifier ===

impl PeerServerVerifier {
    /// A verifier trusting `roots` for identities in `trust_domain`.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: &str,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        PeerServerVerifier {
            roots,
            trust_domain: trust_domain.to_owned(),
            provider,
        }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = identity_of(end_entity, &self.trust_domain).map_err(identity_failure)?;
        let expected = match server_name {
            ServerName::DnsName(name) => name.as_ref(),
            _ => "",
        };
        if id.service != expected {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(WrongPeer {
                    found: id.to_string(),
                    trust_domain: self.trust_domain.clone(),
                    expected: expected.to_owned(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// === impl PeerClientVerifier ===

impl PeerClientVerifier {
    /// A verifier requiring a client certificate under `roots`, with a
    /// SPIFFE id in `trust_domain`.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: &str,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(PeerClientVerifier {
            inner,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        identity_of(end_entity, &self.trust_domain).map_err(identity_failure)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
