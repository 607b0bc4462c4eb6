//! Test certificates for the mTLS suite, made with rcgen in a temp dir: a
//! mesh CA and service certificates, plus the broken kinds a sidecar must
//! refuse (foreign CA, two URI SANs, expired). Also a direct TLS client
//! that presents any of them to a sidecar's inbound listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use outrigger::tls::certs::{ca_params, service_params};
use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;
use tokio::net::TcpStream;

use super::client::BoxError;

/// A CA and the files it issued.
pub struct Pki {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    /// The trust domain.
    pub trust_domain: String,
}

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

impl Pki {
    /// A fresh CA for `trust_domain`, written to `ca.pem`.
    pub fn new(trust_domain: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("outrigger-pki-")
            .tempdir()
            .expect("temp dir");
        let key = KeyPair::generate().expect("CA key");
        let params = ca_params(trust_domain);
        let cert = params.self_signed(&key).expect("CA cert");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
        Pki {
            dir,
            issuer: Issuer::new(params, key),
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// The CA bundle.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The temp dir (extra files go here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A good certificate for `service`, as `<file>.pem` / `<file>-key.pem`.
    pub fn service(&self, file: &str, service: &str) -> CertFiles {
        let params = service_params(&self.trust_domain, service, 30).expect("params");
        self.issue(file, params)
    }

    /// A certificate from `params`, signed by this CA.
    pub fn issue(&self, file: &str, params: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// Service params with a second URI SAN.
    pub fn two_uri_params(&self, service: &str) -> CertificateParams {
        let mut params = service_params(&self.trust_domain, service, 30).expect("params");
        let extra = format!("spiffe://{}/service/{service}-admin", self.trust_domain);
        params
            .subject_alt_names
            .push(SanType::URI(extra.try_into().expect("ia5")));
        params
    }

    /// Service params valid in 2020 only.
    pub fn expired_params(&self, service: &str) -> CertificateParams {
        let mut params = service_params(&self.trust_domain, service, 30).expect("params");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 2, 1);
        params
    }

    /// The `[tls]` section for a sidecar using `files`.
    pub fn tls_toml(&self, files: &CertFiles, allow: &[&str], extra: &str) -> String {
        let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\ntrust_domain = {:?}\nallow = [{}]\n{extra}\n",
            self.ca().display().to_string(),
            files.cert.display().to_string(),
            files.key.display().to_string(),
            self.trust_domain,
            allow.join(", ")
        )
    }
}

/// An HTTP/1.1-over-TLS connection to a sidecar's inbound listener,
/// presenting `client` and verifying the server as `service` under `ca`.
pub struct TlsConn {
    sender: http1::SendRequest<Empty<Bytes>>,
    /// The server's leaf certificate, as presented in the handshake.
    pub server_cert: Vec<u8>,
}

/// Connect and handshake. TLS 1.3 client-certificate rejections surface on
/// the first read, so a successful return does not yet mean the server
/// accepted the client: [`TlsConn::get`] does.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&CertFiles>,
    trust_domain: &str,
    service: &str,
) -> Result<TlsConn, BoxError> {
    let provider = outrigger::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let verifier = outrigger::tls::verify::PeerServerVerifier::new(
        Arc::new(roots),
        trust_domain,
        provider.clone(),
    );
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some(files) => {
            let chain =
                CertificateDer::pem_file_iter(&files.cert)?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(&files.key)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = connector
        .connect(ServerName::try_from(service.to_owned())?, tcp)
        .await?;
    let server_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(TlsConn {
        sender,
        server_cert,
    })
}

impl TlsConn {
    /// `GET path` with `Host: host` and extra headers on this connection.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response<Bytes>, BoxError> {
        self.sender.ready().await?;
        let mut req = Request::get(path).header("host", "b");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self.sender.send_request(req.body(Empty::new())?).await?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

/// Connect, then one GET: the status, or why there was none.
pub async fn tls_get(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&CertFiles>,
    trust_domain: &str,
    headers: &[(&str, &str)],
) -> Result<Response<Bytes>, BoxError> {
    let mut conn = tls_connect(addr, ca, client, trust_domain, "b").await?;
    conn.get("/who", headers).await
}
