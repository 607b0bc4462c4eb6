//! Dialing a peer sidecar: TCP, then mTLS when the mesh uses it.
//!
//! Whether a connection is TLS is decided per endpoint from its registry
//! record and our own `[tls]`, never by trying one and falling back to the
//! other (a fallback would let anyone who can reset a handshake downgrade
//! the connection):
//!
//! | our `[tls]` | peer record | dial |
//! |---|---|---|
//! | none | `tls = false` | plaintext |
//! | none | `tls = true`, accepts plaintext (permissive) | plaintext |
//! | none | `tls = true`, strict | refused: configure `[tls]` |
//! | set | `tls = true` | mTLS, peer identity = the target service |
//! | set, permissive | `tls = false` | plaintext (peer not migrated yet) |
//! | set, strict | `tls = false` | refused: never leave the mesh's mTLS |

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::TlsMode;
use crate::tls::Tls;

/// The protocol token a permissive inbound adds to its registry record's
/// `protocols`: it takes plaintext as well as mTLS.
pub const PLAINTEXT_PROTOCOL: &str = "plaintext";

/// How to reach one endpoint, from its record.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// The target service: the identity the peer's certificate must carry.
    pub service: Arc<str>,
    /// The record says the inbound speaks mTLS.
    pub tls: bool,
    /// The record says the inbound also takes plaintext (permissive, or no
    /// TLS at all).
    pub plaintext: bool,
}

/// A connection to a peer, plaintext or TLS.
#[derive(Debug)]
pub enum PeerStream {
    /// h2c / HTTP/1.1 in the clear.
    Plain(TcpStream),
    /// mTLS.
    Tls(Box<TlsStream<TcpStream>>),
}

/// Whether to dial with TLS (`true`) or plaintext, or why not at all;
/// `ours` is our `tls.mode`, `None` without `[tls]`.
pub fn plan(ours: Option<TlsMode>, peer: &PeerTls) -> Result<bool, String> {
    match (ours, peer.tls) {
        (Some(_), true) => Ok(true),
        (Some(TlsMode::Permissive), false) => Ok(false),
        (Some(_), false) => Err(
            "the endpoint does not speak mTLS (its registration says tls = false) and this \
             sidecar's [tls] mode is strict"
                .into(),
        ),
        (None, true) if peer.plaintext => Ok(false),
        (None, true) => Err(
            "the endpoint requires mTLS (its registration says tls = true); configure [tls] \
             on this sidecar"
                .into(),
        ),
        (None, false) => Ok(false),
    }
}

/// Complete the TLS handshake on `tcp`, verifying the peer is `service`.
pub async fn handshake(
    tls: &Tls,
    tcp: TcpStream,
    service: &str,
    h2: bool,
) -> Result<PeerStream, String> {
    let name = ServerName::try_from(service.to_owned())
        .map_err(|e| format!("{service:?} cannot be a TLS server name: {e}"))?;
    match tls.connector(h2).connect(name, tcp).await {
        Ok(s) => {
            tls.record_handshake("outbound", true);
            Ok(PeerStream::Tls(Box::new(s)))
        }
        Err(e) => {
            tls.record_handshake("outbound", false);
            Err(format!("mTLS handshake: {e}"))
        }
    }
}

// === impl PeerStream ===

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerStream::Plain(s) => s.is_write_vectored(),
            PeerStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(tls: bool, plaintext: bool) -> PeerTls {
        PeerTls {
            service: "b".into(),
            tls,
            plaintext,
        }
    }

    #[test]
    fn never_downgrades_and_never_dials_tls_without_certificates() {
        use TlsMode::{Permissive, Strict};
        // (ours, peer tls, peer takes plaintext) -> Some(use TLS) / None (refused)
        let cases = [
            (None, false, true, Some(false)),
            (None, true, true, Some(false)),
            (None, true, false, None),
            (Some(Strict), true, false, Some(true)),
            (Some(Strict), true, true, Some(true)),
            (Some(Permissive), true, true, Some(true)),
            (Some(Permissive), false, true, Some(false)),
            (Some(Strict), false, true, None),
        ];
        for (ours, tls, plaintext, want) in cases {
            let got = plan(ours, &peer(tls, plaintext)).ok();
            assert_eq!(
                got, want,
                "ours {ours:?}, peer tls {tls}, plaintext {plaintext}"
            );
        }
    }
}
