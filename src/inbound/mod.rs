//! Inbound: calls from peer sidecars (and, on the ingress listener, from
//! clients outside the mesh) to the local service.
//!
//! The local service is reached over keep-alive pools: a lean HTTP/1.1
//! client for bodiless idempotent requests, hyper's for the rest, and one
//! HTTP/2 connection. The protocol follows the original caller's: the
//! calling sidecar marks requests that started as HTTP/1.1
//! (`x-outrigger-orig-proto`), and everything else (gRPC, h2c) goes out as
//! HTTP/2. Upgrades get a dedicated HTTP/1.1 connection.
//!
//! With mTLS, each inbound request is authorized first: the caller's
//! identity comes from its verified client certificate (never from a
//! header), must be in `tls.allow`, and is passed to the local service as
//! `x-outrigger-caller`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::config::Config;
use crate::http::error::respond;
use crate::http::headers::{self, CALLER, ORIG_PROTO};
use crate::http::{Body, ProxyError};
use crate::metrics::{Metrics, RequestMetrics};
use crate::tls::{PeerIdentity, Tls};

pub(crate) mod idle;
pub(crate) mod local_h1;
mod local_h2;
mod local_pool;
#[cfg(test)]
mod test_server;
use local_h1::LocalH1;
use local_h2::LocalH2;
use local_pool::LocalPool;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a peer sidecar.
    Inbound,
    /// From outside the mesh: nothing it says about identity is trusted.
    Ingress,
}

/// Shared state of the inbound and ingress listeners.
pub struct Inbound {
    local: String,
    /// `local`, parsed once: every relayed request's URI points there.
    /// `None` if the address is not a valid authority (then every request
    /// fails with a clear error rather than the sidecar refusing to start).
    local_authority: Option<Authority>,
    /// HTTP/1.1 keep-alive connections for bodiless, idempotent requests
    /// (most traffic), on our own lean client.
    lean_h1: LocalH1,
    /// HTTP/1.1 keep-alive connections on hyper's client, for requests
    /// with a body.
    http1: Arc<LocalPool>,
    /// One multiplexed HTTP/2 connection (gRPC, h2c callers).
    http2: LocalH2,
    /// mTLS: who may call (`tls.allow`); `None` for a plaintext mesh.
    tls: Option<Arc<Tls>>,
    /// Request series of the inbound and ingress listeners, resolved once.
    inbound_requests: RequestMetrics,
    ingress_requests: RequestMetrics,
}

// === impl Inbound ===

impl Inbound {
    /// Relay to the local service configured in `config`.
    pub fn new(config: &Config, metrics: Arc<Metrics>, tls: Option<Arc<Tls>>) -> Self {
        let service: Arc<str> = config.service.name.as_str().into();
        Inbound {
            local: config.service.address.clone(),
            local_authority: Authority::try_from(config.service.address.as_str()).ok(),
            lean_h1: LocalH1::new(config.service.address.clone()),
            http1: LocalPool::new(config.service.address.clone()),
            http2: LocalH2::new(config.service.address.clone()),
            tls,
            inbound_requests: metrics.request_metrics("inbound", &service),
            ingress_requests: metrics.request_metrics("ingress", &service),
        }
    }

    /// Handle one request from a peer (or an outside client).
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Body>,
        remote: SocketAddr,
        direction: Direction,
    ) -> Response<Body> {
        let start = Instant::now();
        let (label, requests) = match direction {
            Direction::Inbound => ("inbound", &self.inbound_requests),
            Direction::Ingress => ("ingress", &self.ingress_requests),
        };
        if direction == Direction::Ingress {
            // Outside the mesh: identity and forwarding claims are spoofable.
            headers::strip_outrigger_headers(req.headers_mut());
            headers::reset_forwarded_for(req.headers_mut(), remote.ip());
        }
        let request_id = headers::ensure_request_id(req.headers_mut());
        if direction == Direction::Inbound {
            if let Err(e) = self.authorize(&mut req) {
                let res = respond(&e, &request_id, label);
                requests.record(res.status().as_u16(), start.elapsed());
                return res;
            }
        }
        let res = match self.relay(req, &request_id).await {
            Ok(r) => r,
            Err(e) => respond(&e, &request_id, label),
        };
        requests.record(res.status().as_u16(), start.elapsed());
        res
    }

    /// With mTLS, the caller is who its verified certificate says: any
    /// `x-outrigger-caller` it sent is replaced by that identity's service
    /// name, and a caller not in `tls.allow` is refused. A plaintext
    /// request (permissive mode only) has no identity to offer: the header
    /// is removed and `allow` cannot apply.
    fn authorize(&self, req: &mut Request<Body>) -> Result<(), ProxyError> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        req.headers_mut().remove(CALLER);
        let Some(PeerIdentity(id)) = req.extensions().get::<PeerIdentity>().cloned() else {
            return Ok(());
        };
        if !tls.allows(&id.service) {
            return Err(ProxyError::Forbidden(id.to_string()));
        }
        if let Ok(v) = HeaderValue::from_str(&id.service) {
            req.headers_mut().insert(CALLER, v);
        }
        Ok(())
    }

    async fn relay(
        &self,
        mut req: Request<Body>,
        request_id: &HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        let wants_h1 =
            headers::caller_spoke_h1(parts.version, &parts.headers) || self.http2.http1_only();
        parts.headers.remove(ORIG_PROTO);

        if let Some(client_upgrade) = client_upgrade {
            origin_form(&mut parts);
            parts.version = Version::HTTP_11;
            // Boxed: the upgrade path's future (connect, handshake) would
            // otherwise be carried inline by every request's future, which
            // hyper moves into place for each request.
            return Box::pin(self.relay_upgrade(parts, body, client_upgrade, request_id)).await;
        }

        let bad_target = |message: String| ProxyError::LocalUpstream {
            address: self.local.clone(),
            message: format!("bad request target: {message}"),
        };
        let Some(authority) = &self.local_authority else {
            return Err(bad_target("the service address is not host:port".into()));
        };

        let res = if wants_h1 {
            origin_form(&mut parts);
            self.send_h1(parts, body).await?
        } else {
            // Assembled from parsed parts (the path shared, the authority
            // parsed at start-up), not re-parsed from text for every request.
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(h2_authority(&mut parts, authority));
            uri.path_and_query = Some(pq_of(&parts.uri));
            parts.uri = Uri::from_parts(uri).map_err(|e| bad_target(e.to_string()))?;
            parts.version = Version::HTTP_2;
            let req = Request::from_parts(parts, body);
            match self.http2.send(req).await {
                Ok(res) => res,
                Err(local_h2::Failure::Error(e)) => return Err(e),
                // Found out on this request's connection: nothing was sent.
                Err(local_h2::Failure::NotHttp2 { request, confirmed }) => {
                    let (mut parts, body) = request.into_parts();
                    origin_form(&mut parts);
                    let res = self.send_h1(parts, body).await?;
                    if !confirmed {
                        self.http2.mark_http1_only();
                    }
                    res
                }
            }
        };
        let (mut parts, body) = res.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, body))
    }

    /// Send an origin-form request to the service over HTTP/1.1: bodiless
    /// ones on the lean client, the rest through hyper's.
    async fn send_h1(
        &self,
        mut parts: http::request::Parts,
        body: Body,
    ) -> Result<Response<Body>, ProxyError> {
        parts.version = Version::HTTP_11;
        if local_h1::fits(&parts, http_body::Body::is_end_stream(&body)) {
            self.lean_h1.send(&parts).await
        } else {
            Ok(self
                .http1
                .send(Request::from_parts(parts, body))
                .await?
                .map(Body::incoming))
        }
    }

    async fn relay_upgrade(
        &self,
        parts: http::request::Parts,
        body: Body,
        client_upgrade: hyper::upgrade::OnUpgrade,
        request_id: &HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let stream = local_pool::dial(&self.local).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| local_pool::connect_error(&self.local, e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut res = sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| local_pool::upstream_error(&self.local, &e))?;
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut res);
            crate::http::upgrade::splice(
                client_upgrade,
                upstream,
                request_id.to_str().unwrap_or("-").to_owned(),
            );
            let (parts, _) = res.into_parts();
            return Ok(Response::from_parts(parts, Body::empty()));
        }
        let (mut parts, body) = res.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, Body::incoming(body)))
    }
}

/// The `:authority` of a request to the service over HTTP/2: the caller's
/// (its Host, or the `:authority` it came with), as RFC 9113 §8.3.1 asks of
/// an intermediary, else the service's own address. The Host header goes:
/// a client must not send one that differs from `:authority`, and a strict
/// server treats such a request as malformed. Dropping it also spares
/// HPACK a field on every request.
fn h2_authority(parts: &mut http::request::Parts, local: &Authority) -> Authority {
    let from_host = parts
        .headers
        .remove(http::header::HOST)
        .and_then(|v| Authority::try_from(v.as_bytes()).ok());
    from_host
        .or_else(|| parts.uri.authority().cloned())
        .unwrap_or_else(|| local.clone())
}

/// A request in the form HTTP/1.1 servers expect: the target in origin
/// form, and a Host header, kept if the caller sent one, else rebuilt from
/// the URI's authority (HTTP/2 carries the caller's Host as `:authority`).
fn origin_form(parts: &mut http::request::Parts) {
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
    }
    parts.uri = Uri::from(pq_of(&parts.uri));
}

/// A URI's path and query, `/` if it has none.
fn pq_of(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}
