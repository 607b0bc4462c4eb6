//! Outbound: calls from the local service to its peers.
//!
//! The request path, in order (each step is a function below):
//! 1. **target** — which service the request names ([`route`]);
//! 2. **lookup** — one `ArcSwap` load of the routing snapshot;
//! 3. **prepare** — header hygiene, request id, caller identity, and keeping
//!    small bodies so they can be retried ([`retry`]);
//! 4. **try loop** — pick an endpoint ([`crate::balance`]), get a pooled
//!    connection ([`pool`]), send; connect failures go straight to another
//!    endpoint, gateway failures are retried when safe and the budget
//!    allows; every outcome feeds outlier detection;
//! 5. **respond** — the upstream's response, streaming, with the endpoint's
//!    load held until its body ends; or a sidecar error through
//!    [`crate::http::error::respond`].

pub mod dial;
pub mod h1_pool;
pub mod h2_client;
pub mod pool;
pub mod retry;
pub mod route;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use tokio::time::Instant;

use crate::balance::{self, Failure, PickError};
use crate::config::{Config, UpstreamPolicy};
use crate::discovery::{self, ServiceRoutes, Table};
use crate::http::error::respond;
use crate::http::headers::{self, CALLER, ORIG_PROTO};
use crate::http::{Body, ProxyError};
use crate::inbound::local_h1;
use crate::metrics::{Metrics, RequestMetrics};
use pool::H1Route;
use retry::{ReqBody, Tried};

/// Label used for requests to services not in the table, so a caller
/// inventing host names cannot blow up metric cardinality.
const UNKNOWN_SERVICE_LABEL: &str = "unknown";

/// Shared state of the outbound side.
pub struct Outbound {
    table: Arc<ArcSwap<Table>>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// `x-outrigger-caller` value: our own service name.
    caller: HeaderValue,
    /// Request series of requests that named no known service.
    unknown: RequestMetrics,
}

/// Counts a request against its service's concurrency limit until dropped.
struct ServiceSlot<'a>(&'a ServiceRoutes);

impl Drop for ServiceSlot<'_> {
    fn drop(&mut self) {
        self.0.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one try produced.
enum TryOutcome {
    /// A response to return (possibly a 5xx we may not retry).
    Response(Response<Body>),
    /// The try failed; retry if `retry_ok`, else answer with the error.
    Failed { err: ProxyError, retry_ok: bool },
    /// The endpoint answered 502/503/504 and a retry is allowed; if no
    /// other endpoint is left, this response is what the caller gets.
    RetryableResponse(Response<Body>),
}

// === impl Outbound ===

impl Outbound {
    /// Outbound state over the shared routing table.
    pub fn new(table: Arc<ArcSwap<Table>>, config: Arc<Config>, metrics: Arc<Metrics>) -> Self {
        let caller = HeaderValue::from_str(&config.service.name)
            .unwrap_or(HeaderValue::from_static("unknown"));
        let unknown = metrics.request_metrics("outbound", &UNKNOWN_SERVICE_LABEL.into());
        Outbound {
            table,
            config,
            metrics,
            caller,
            unknown,
        }
    }

    /// Handle one request from the local service. `fixed` is the service of
    /// an `[[upstreams]] local_port` listener.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Body>,
        remote: SocketAddr,
        fixed: Option<Arc<str>>,
    ) -> Response<Body> {
        let start = Instant::now();
        let mut req = req;
        let request_id = headers::ensure_request_id(req.headers_mut());

        // 1. target and 2. lookup: one `ArcSwap` load (no reference count
        // taken on the table), keeping only this service's routes.
        let found = {
            let table = self.table.load();
            match &fixed {
                Some(s) => table
                    .get(s)
                    .cloned()
                    .ok_or_else(|| ProxyError::UnknownService(s.to_string())),
                None => route::lookup(&table, &req, &self.config.outbound.mesh_domain).cloned(),
            }
        };
        let routes = match found {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, ProxyError::UnknownService(_)) {
                    self.metrics.unknown_service.inc();
                }
                let res = respond(&e, &request_id, "outbound");
                self.unknown.record(res.status().as_u16(), start.elapsed());
                return res;
            }
        };
        let res = self.relay(req, remote, &routes, &request_id, start).await;
        let res = match res {
            Ok(r) => r,
            Err(e) => respond(&e, &request_id, "outbound"),
        };
        routes
            .shared
            .requests
            .record(res.status().as_u16(), start.elapsed());
        res
    }

    async fn relay(
        &self,
        mut req: Request<Body>,
        remote: SocketAddr,
        routes: &Arc<ServiceRoutes>,
        request_id: &HeaderValue,
        start: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let policy: &UpstreamPolicy = &routes.policy;
        let service = &routes.name;

        // Circuit breaker for the whole upstream.
        let prev = routes.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let _slot = ServiceSlot(routes);
        if prev >= policy.max_requests as u64 {
            self.metrics
                .overloaded
                .get_or_create(&Metrics::service(service))
                .inc();
            return Err(ProxyError::Overloaded(service.to_string()));
        }
        routes.shared.budget.deposit(start);

        // 3. prepare
        let upgrade = headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        headers::append_forwarded_for(&mut parts.headers, remote.ip());
        parts.headers.insert(CALLER, self.caller.clone());
        // Set by us alone (see `as_h2`), never passed on from a client.
        parts.headers.remove(ORIG_PROTO);
        let deadline = start + policy.timeout;

        if let Some(client_upgrade) = client_upgrade {
            // Boxed: an upgrade's future (dial, TLS handshake, splice) is
            // large, and inline it would be part of every request's future,
            // which hyper moves (memcpy) into place for each request.
            return Box::pin(self.relay_upgrade(
                parts,
                body,
                client_upgrade,
                routes,
                policy,
                request_id,
            ))
            .await;
        }

        // HTTP/1.1 stays HTTP/1.1 between the sidecars, on a pooled
        // connection ([`h1_pool`]); HTTP/2 (gRPC, h2c) is multiplexed,
        // but for bodiless requests while few are in flight (below).
        let use_h1 = parts.version != Version::HTTP_2;
        if use_h1 {
            ensure_host(&mut parts, service)?;
            parts.version = Version::HTTP_11;
        } else {
            parts.uri = absolute_uri(&parts, service)?;
            // Over HTTP/2 the authority travels as :authority.
            parts.headers.remove(http::header::HOST);
        }

        let idempotent = retry::is_idempotent(&parts.method, &parts.headers);
        let empty_body = http_body::Body::is_end_stream(&body);
        // Bodiless idempotent requests (most of a mesh's calls) take lean
        // HTTP/1.1 connections: see `h1_pool` and `local_h1`. That holds
        // for those that arrived as HTTP/2 as well (the far side speaks
        // HTTP/2 to its service again, see `as_h1`): HTTP/2 between the
        // sidecars costs both hops HPACK and stream state, which at low
        // concurrency is most of what the link costs (at high concurrency
        // they stay on HTTP/2: see the route below). Not when the caller
        // accepts trailers (`te: trailers`, as gRPC does): those
        // stay on HTTP/2 end to end.
        let lean = local_h1::fits(&parts, empty_body)
            && (use_h1 || !parts.headers.contains_key(http::header::TE));
        // An empty body (most GETs) needs no reading, and so no timer.
        let prepared = if empty_body {
            Ok(Ok(ReqBody::Kept(bytes::Bytes::new())))
        } else {
            tokio::time::timeout_at(deadline, retry::prepare(body)).await
        };
        let mut body = match prepared {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                return Err(ProxyError::Upstream {
                    service: service.to_string(),
                    endpoint: "-".into(),
                    message: format!("reading the request body: {e}"),
                })
            }
            Err(_) => return Err(self.timeout(service, policy)),
        };

        // Whether a second try could ever need these parts again. When none
        // can (one endpoint, no retries, a non-idempotent method or a
        // streaming body), the first try takes them instead of a copy: the
        // header map is the largest thing a request carries. A try refused
        // before sending hands its request back, so it needs no copy either.
        let replayable = idempotent
            && matches!(body, ReqBody::Kept(_))
            && policy.retries > 0
            && routes.endpoints.len() > 1;
        let mut parts = Some(parts);

        // 4. try loop
        let mut tried = Tried::default();
        let mut retries = 0u32;
        let mut pending: Option<Request<Body>> = None;
        // Pooled HTTP/1.1 connections found closed as a request was handed
        // to them (the peer closed them an instant before): retried on the
        // same endpoint without counting against it, a few times at most.
        let mut stale_h1 = 0u8;
        let mut last_err: Option<ProxyError> = None;
        // The last retryable 5xx: returned as-is when no endpoint is left,
        // so the caller sees the upstream's own answer, not ours.
        let mut last_response: Option<Response<Body>> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.timeout(service, policy));
            }
            let pick =
                match balance::pick(&routes.endpoints, policy, &routes.rr, tried.as_slice(), now) {
                    Ok(p) => p,
                    Err(PickError::NoEndpoints) => {
                        return Err(ProxyError::NoEndpoints(service.to_string()))
                    }
                    Err(PickError::Overloaded) => {
                        self.metrics
                            .overloaded
                            .get_or_create(&Metrics::service(service))
                            .inc();
                        return Err(last_err.unwrap_or(ProxyError::Overloaded(service.to_string())));
                    }
                    Err(PickError::Exhausted) => {
                        if let Some(res) = last_response {
                            return Ok(res);
                        }
                        return Err(
                            last_err.unwrap_or(ProxyError::NoEndpoints(service.to_string()))
                        );
                    }
                };
            if pick.panic {
                self.metrics
                    .panic_routing
                    .get_or_create(&Metrics::service(service))
                    .inc();
            }
            tried.push(pick.index);
            let ep = &routes.endpoints[pick.index];

            // Connect (or reuse). A failure here means nothing was sent.
            // The pooled connection is taken without an await; the connect
            // path is boxed so its large future (TCP, TLS, HTTP/2 handshake)
            // is not carried inline by every request's future.
            let pool = &ep.state.pool;
            let lean = lean && pool.lean_ok();
            let route = match (use_h1, lean) {
                (true, _) => pool.h1_route(lean),
                // An HTTP/2 caller's request goes over HTTP/1.1 only when
                // nothing else is in flight to the endpoint. Its requests
                // arrive batched, several in one read, and the HTTP/2 link
                // keeps them batched, where HTTP/1.1 needs a read and a
                // write per request at both hops. Full `PROTO=h2` harness
                // runs against the build that kept them all on HTTP/2: with
                // this rule, CPU per request at the fixed load 246 -> 233 us
                // and added p50 338 -> 306 us, saturation unchanged (32.2k
                // -> 32.1k req/s); without it, max RPS fell 8-10 % and CPU
                // per request at saturation rose 27 -> 33 us.
                (false, true) if ep.state.in_flight() == 0 => pool.h1_route(true),
                (false, _) => H1Route::NeedH2,
            };
            let sender = match route {
                H1Route::Idle(s) => Ok(Ok(PeerSender::H1(s))),
                H1Route::Lean(conn) => Ok(Ok(PeerSender::lean(conn, true, pool))),
                H1Route::Dial(slot) if lean => tokio::time::timeout_at(
                    deadline,
                    Box::pin(pool.dial_lean(slot, policy.connect_timeout)),
                )
                .await
                .map(|r| r.map(|conn| PeerSender::lean(conn, false, pool))),
                H1Route::Dial(slot) => tokio::time::timeout_at(
                    deadline,
                    Box::pin(pool.dial_h1(slot, policy.connect_timeout)),
                )
                .await
                .map(|r| r.map(PeerSender::H1)),
                H1Route::NeedH2 => match pool.ready() {
                    Some(s) => Ok(Ok(PeerSender::H2(s))),
                    None => tokio::time::timeout_at(
                        deadline,
                        Box::pin(pool.get(policy.connect_timeout)),
                    )
                    .await
                    .map(|r| r.map(PeerSender::H2)),
                },
            };
            let mut sender = match sender {
                Err(_) => return Err(self.timeout(service, policy)),
                Ok(Err(e)) => {
                    tracing::debug!(request_id = ?request_id, endpoint = %ep.state.addr, error = %e, "connect failed; trying another endpoint");
                    self.record_failure(routes, pick.index, Failure::Connect, policy);
                    last_err = Some(ProxyError::Connect {
                        service: service.to_string(),
                        endpoint: ep.state.addr.to_string(),
                        message: e.message,
                    });
                    continue;
                }
                Ok(Ok(s)) => s,
            };
            ep.state.record_connected();

            let request = match pending.take() {
                Some(r) => r,
                None => match build_try(&mut parts, &mut body, replayable) {
                    Some(r) => r,
                    // The body (or the only copy of the parts) already
                    // went out: cannot resend.
                    None => {
                        return Err(last_err.unwrap_or(ProxyError::NoEndpoints(service.to_string())))
                    }
                },
            };
            // A request goes out in the form of the connection it got: an
            // HTTP/1.1 request over HTTP/2 while that connection is being
            // (re)made, and back if it was refused there unsent.
            let request = match (&sender, request.version() == Version::HTTP_2) {
                (PeerSender::H2(_), false) => as_h2(request, service)?,
                (PeerSender::H1(_) | PeerSender::Lean { .. }, true) => as_h1(request, service)?,
                _ => request,
            };
            let guard = ep.state.start();
            let sent_at = Instant::now();
            let try_deadline = match policy.per_try_timeout {
                Some(t) => deadline.min(sent_at + t),
                None => deadline,
            };
            let sent =
                tokio::time::timeout_at(try_deadline, sender.try_send_request(request)).await;
            let outcome = match sent {
                Ok(Ok(res)) => {
                    // The connection goes back to the pool when the
                    // response body ends.
                    // (A lean connection has gone back already, or goes
                    // back when its body has been read.)
                    let guard = match sender {
                        PeerSender::H1(s) => guard.with_h1(s),
                        PeerSender::H2(_) | PeerSender::Lean { .. } => guard,
                    };
                    let status = res.status();
                    if status.is_server_error() {
                        self.record_failure(routes, pick.index, Failure::Gateway, policy);
                    } else {
                        ep.state.record_success(sent_at.elapsed(), Instant::now());
                    }
                    if retry::is_retryable_status(status)
                        && idempotent
                        && matches!(body, ReqBody::Kept(_))
                        && tried.len() < routes.endpoints.len()
                        && self.may_retry(routes, retries, policy)
                    {
                        TryOutcome::RetryableResponse(into_response(
                            res,
                            guard,
                            policy.idle_timeout,
                        ))
                    } else {
                        TryOutcome::Response(into_response(res, guard, policy.idle_timeout))
                    }
                }
                Ok(Err(TryError::Unsent {
                    request: unsent,
                    error: e,
                })) => {
                    let unsent = *unsent;
                    let h1 = sender.is_h1();
                    // Refused before any byte left: safe for any method.
                    if h1 && stale_h1 < MAX_STALE_H1 {
                        stale_h1 += 1;
                        tracing::debug!(request_id = ?request_id, endpoint = %ep.state.addr, error = %e, "pooled HTTP/1.1 connection closed; trying again");
                        tried.pop();
                        pending = Some(unsent);
                        continue;
                    }
                    if !h1 {
                        ep.state.pool.invalidate();
                    }
                    self.record_failure(routes, pick.index, Failure::Connect, policy);
                    pending = Some(unsent);
                    last_err = Some(ProxyError::Connect {
                        service: service.to_string(),
                        endpoint: ep.state.addr.to_string(),
                        message: error_chain(&*e),
                    });
                    continue;
                }
                Ok(Err(TryError::Failed {
                    error: e,
                    connection,
                })) => {
                    let h1 = sender.is_h1();
                    self.record_failure(routes, pick.index, Failure::Gateway, policy);
                    // A broken HTTP/1.1 connection is simply not
                    // returned; the HTTP/2 one may be fine.
                    if !h1 && connection {
                        ep.state.pool.invalidate();
                    }
                    let err = ProxyError::Upstream {
                        service: service.to_string(),
                        endpoint: ep.state.addr.to_string(),
                        message: error_chain(&*e),
                    };
                    let retry_ok = idempotent
                        && matches!(body, ReqBody::Kept(_))
                        && self.may_retry(routes, retries, policy);
                    TryOutcome::Failed { err, retry_ok }
                }
                Err(_) => {
                    self.record_failure(routes, pick.index, Failure::Gateway, policy);
                    let err = self.timeout(service, policy);
                    let retry_ok = Instant::now() < deadline
                        && idempotent
                        && matches!(body, ReqBody::Kept(_))
                        && self.may_retry(routes, retries, policy);
                    TryOutcome::Failed { err, retry_ok }
                }
            };
            match outcome {
                TryOutcome::Response(res) => return Ok(res),
                TryOutcome::RetryableResponse(res) => {
                    retries += 1;
                    self.metrics
                        .retries
                        .get_or_create(&Metrics::service(service))
                        .inc();
                    tracing::debug!(request_id = ?request_id, status = %res.status(), retries, "retrying on another endpoint");
                    last_response = Some(res);
                }
                TryOutcome::Failed {
                    err,
                    retry_ok: true,
                } => {
                    retries += 1;
                    self.metrics
                        .retries
                        .get_or_create(&Metrics::service(service))
                        .inc();
                    tracing::debug!(request_id = ?request_id, error = %err, retries, "retrying on another endpoint");
                    last_err = Some(err);
                }
                TryOutcome::Failed {
                    err,
                    retry_ok: false,
                } => return Err(err),
            }
        }
    }

    /// Retries left and budget available (taking one from the budget).
    fn may_retry(&self, routes: &ServiceRoutes, used: u32, policy: &UpstreamPolicy) -> bool {
        if used >= policy.retries {
            return false;
        }
        if routes.shared.budget.try_withdraw(Instant::now()) {
            return true;
        }
        self.metrics
            .retry_budget_exhausted
            .get_or_create(&Metrics::service(&routes.name))
            .inc();
        false
    }

    fn record_failure(
        &self,
        routes: &ServiceRoutes,
        index: usize,
        kind: Failure,
        policy: &UpstreamPolicy,
    ) {
        let now = Instant::now();
        let ep = &routes.endpoints[index];
        if ep.state.pool.take_unresponsive() {
            ep.state.record_failure(kind, now, &policy.outlier, false);
            self.eject_unresponsive(routes, index, now);
            return;
        }
        let may = balance::may_eject(&routes.endpoints, policy.outlier.max_ejection_percent, now);
        if let Some(time) = ep.state.record_failure(kind, now, &policy.outlier, may) {
            let cause = match kind {
                Failure::Connect => "connect-failures",
                Failure::Gateway => "gateway-failures",
            };
            self.ejected(routes, ep, time, cause);
        }
    }

    /// Eject the endpoints whose peer connection died of an unanswered
    /// PING, as the pools report them ([`pool::PoolSettings::hung`]).
    /// Runs for the life of the sidecar.
    ///
    /// Ejecting here, not on the next failed request, matters because a
    /// hung peer may get no request at all: P2C-EWMA steers traffic away
    /// from an endpoint whose latency estimate is above its peers', and a
    /// connection that has just died leaves no request behind to fail.
    pub async fn eject_hung(self: Arc<Self>, mut reports: tokio::sync::mpsc::Receiver<Arc<str>>) {
        while let Some(addr) = reports.recv().await {
            let table = self.table.load();
            for routes in table.services.values() {
                let found = routes.endpoints.iter().position(|e| e.state.addr == addr);
                // The flag is the hand-off with the request path: whichever
                // takes it ejects, so one hang is one ejection.
                if let Some(i) =
                    found.filter(|&i| routes.endpoints[i].state.pool.take_unresponsive())
                {
                    self.eject_unresponsive(routes, i, Instant::now());
                }
            }
        }
    }

    /// Eject an endpoint the PING detector declared hung, whatever its
    /// failure counts (within the pool's max-ejection share). The caller
    /// has taken its `unresponsive` flag.
    fn eject_unresponsive(&self, routes: &ServiceRoutes, index: usize, now: Instant) {
        let outlier = &routes.policy.outlier;
        let may = balance::may_eject(&routes.endpoints, outlier.max_ejection_percent, now);
        let ep = &routes.endpoints[index];
        if let Some(time) = ep.state.eject_now(now, outlier, may) {
            self.ejected(routes, ep, time, "ping-timeout");
        }
    }

    /// Book an ejection: drop the endpoint's connection, count it, log it.
    fn ejected(
        &self,
        routes: &ServiceRoutes,
        ep: &discovery::Endpoint,
        time: std::time::Duration,
        cause: &'static str,
    ) {
        ep.state.pool.invalidate();
        self.metrics
            .ejections
            .get_or_create(&Metrics::service(&routes.name))
            .inc();
        tracing::warn!(
            service = %routes.name,
            endpoint = %ep.state.addr,
            instance = %ep.record.instance,
            ejected_for_s = time.as_secs(),
            cause,
            "ejecting endpoint"
        );
    }

    fn timeout(&self, service: &str, policy: &UpstreamPolicy) -> ProxyError {
        ProxyError::Timeout {
            service: service.to_string(),
            after_ms: policy.timeout.as_millis() as u64,
        }
    }

    /// Relay a protocol upgrade (WebSocket) over a dedicated HTTP/1.1
    /// connection: HTTP/2 between sidecars cannot carry `Upgrade`.
    async fn relay_upgrade(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        client_upgrade: hyper::upgrade::OnUpgrade,
        routes: &Arc<ServiceRoutes>,
        policy: &UpstreamPolicy,
        request_id: &HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let service = &routes.name;
        let mut tried = Vec::new();
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|pq| Uri::from(pq.clone()))
            .unwrap_or_else(|| Uri::from_static("/"));
        parts.version = Version::HTTP_11;
        let mut last_err = None;
        let mut body = Some(body);
        loop {
            let now = Instant::now();
            let pick = match balance::pick(&routes.endpoints, policy, &routes.rr, &tried, now) {
                Ok(p) => p,
                Err(_) => {
                    return Err(last_err.unwrap_or(ProxyError::NoEndpoints(service.to_string())))
                }
            };
            tried.push(pick.index);
            let ep = &routes.endpoints[pick.index];
            let mut sender = match ep.state.pool.connect_http1(policy.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    self.record_failure(routes, pick.index, Failure::Connect, policy);
                    last_err = Some(ProxyError::Connect {
                        service: service.to_string(),
                        endpoint: ep.state.addr.to_string(),
                        message: e.message,
                    });
                    continue;
                }
            };
            let Some(b) = body.take() else {
                return Err(last_err.unwrap_or(ProxyError::NoEndpoints(service.to_string())));
            };
            let req = Request::from_parts(clone_parts(&parts), b);
            let mut res = sender
                .send_request(req)
                .await
                .map_err(|e| ProxyError::Upstream {
                    service: service.to_string(),
                    endpoint: ep.state.addr.to_string(),
                    message: error_chain(&e),
                })?;
            if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                let upstream_upgrade = hyper::upgrade::on(&mut res);
                crate::http::upgrade::splice(
                    client_upgrade,
                    upstream_upgrade,
                    request_id.to_str().unwrap_or("-").to_owned(),
                );
                let (parts, _) = res.into_parts();
                return Ok(Response::from_parts(parts, Body::empty()));
            }
            let guard = ep.state.start();
            return Ok(into_response(
                res.map(Body::incoming),
                guard,
                policy.idle_timeout,
            ));
        }
    }
}

/// The URI to send over HTTP/2: `http://` + the authority to forward with
/// (the absolute URI's, else the Host header's, else the service name) +
/// the original path. Assembled from parsed parts: the path is shared, not
/// re-parsed, and only a Host header is parsed as an authority.
fn absolute_uri(parts: &http::request::Parts, service: &str) -> Result<Uri, ProxyError> {
    let authority = match parts.uri.authority() {
        Some(a) => a.clone(),
        None => {
            let raw = match parts.headers.get(http::header::HOST) {
                Some(h) => h.as_bytes(),
                None => service.as_bytes(),
            };
            Authority::try_from(raw)
                .map_err(|_| ProxyError::BadTarget(String::from_utf8_lossy(raw).into_owned()))?
        }
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    // A clone of an Authority shares its bytes; the error text is only
    // built when it is needed, not on every request.
    let shown = authority.clone();
    uri.authority = Some(authority);
    Uri::from_parts(uri).map_err(|_| ProxyError::BadTarget(shown.as_str().to_owned()))
}

/// Build the request for one try, or `None` if it cannot be sent (again).
/// `keep` copies the parts, for a request that may be tried again;
/// otherwise the first try takes them.
fn build_try(
    parts: &mut Option<http::request::Parts>,
    body: &mut ReqBody,
    keep: bool,
) -> Option<Request<Body>> {
    let head = if keep {
        clone_parts(parts.as_ref()?)
    } else {
        parts.take()?
    };
    let body = match body {
        ReqBody::Kept(b) => Body::full(b.clone()),
        ReqBody::Stream(s) => s.take()?,
    };
    Some(Request::from_parts(head, body))
}

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

fn into_response(
    res: Response<Body>,
    guard: balance::LoadGuard,
    idle: std::time::Duration,
) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    let body = body.with_guard(guard).with_idle_timeout(idle);
    Response::from_parts(parts, body)
}

/// A connection to a peer, of any kind ([`pool`]).
enum PeerSender {
    /// hyper's HTTP/1.1 client.
    H1(h1_pool::H1Sender),
    /// A lean HTTP/1.1 connection ([`local_h1`]), used once.
    Lean {
        conn: Option<local_h1::Conn>,
        /// Taken from the idle list, so possibly closed by the peer since.
        reused: bool,
        pool: Arc<h1_pool::H1Pool>,
    },
    H2(h2_client::H2Sender),
}

/// A failed try, from either kind of connection.
enum TryError {
    /// Refused before any byte left: the request comes back.
    Unsent {
        request: Box<Request<Body>>,
        error: crate::http::body::BoxError,
    },
    /// Sent, or partly sent.
    Failed {
        error: crate::http::body::BoxError,
        /// The connection itself failed (not just this request's stream).
        connection: bool,
    },
}

impl PeerSender {
    fn lean(conn: local_h1::Conn, reused: bool, pool: &pool::PeerPool) -> Self {
        PeerSender::Lean {
            conn: Some(conn),
            reused,
            pool: pool.h1_pool().clone(),
        }
    }

    fn is_h1(&self) -> bool {
        !matches!(self, PeerSender::H2(_))
    }

    async fn try_send_request(&mut self, req: Request<Body>) -> Result<Response<Body>, TryError> {
        match self {
            PeerSender::Lean { conn, reused, pool } => {
                let Some(conn) = conn.take() else {
                    return Err(TryError::Failed {
                        error: "lean connection already used".into(),
                        connection: true,
                    });
                };
                let (parts, body) = req.into_parts();
                match pool.exchange_lean(conn, &parts).await {
                    Ok(res) => Ok(res),
                    // The peer closed a pooled connection before it read
                    // the request: nothing was processed.
                    Err(h1_pool::LeanError::Stale) if *reused => Err(TryError::Unsent {
                        request: Box::new(Request::from_parts(parts, body)),
                        error: "pooled HTTP/1.1 connection closed".into(),
                    }),
                    Err(e) => Err(TryError::Failed {
                        error: e.into(),
                        connection: true,
                    }),
                }
            }
            PeerSender::H1(s) => match s.try_send_request(req).await {
                Ok(res) => Ok(res.map(Body::incoming)),
                Err(mut e) => match e.take_message() {
                    Some(request) => Err(TryError::Unsent {
                        request: Box::new(request),
                        error: e.into_error().into(),
                    }),
                    None => {
                        let e = e.into_error();
                        Err(TryError::Failed {
                            connection: e.is_closed() || e.is_canceled(),
                            error: e.into(),
                        })
                    }
                },
            },
            PeerSender::H2(s) => s.send(req).await.map_err(|e| match e {
                h2_client::SendError::Unsent { request, error } => TryError::Unsent {
                    request,
                    error: error.into(),
                },
                h2_client::SendError::Failed { error, connection } => {
                    TryError::Failed { error, connection }
                }
            }),
        }
    }
}

/// A request in HTTP/2's form: the authority in the URI, not in Host. One
/// that arrived as HTTP/1.1 gets its original protocol named, so the peer
/// speaks HTTP/1.1 to its service; one that arrived as HTTP/2 (and was
/// turned into HTTP/1.1 by [`as_h1`] for a try that was refused unsent)
/// loses the name again.
fn as_h2(req: Request<Body>, service: &str) -> Result<Request<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    parts.uri = absolute_uri(&parts, service)?;
    parts.headers.remove(http::header::HOST);
    if parts.headers.remove(ORIG_PROTO).is_none() {
        parts.headers.insert(ORIG_PROTO, headers::ORIG_H1);
    }
    parts.version = Version::HTTP_2;
    Ok(Request::from_parts(parts, body))
}

/// The reverse of [`as_h2`]: a request in HTTP/1.1's form, with a Host
/// header (the absolute URI is valid HTTP/1.1 too). One that arrived as
/// HTTP/2 (a bodiless one on a lean connection) gets its original protocol
/// named, so the peer speaks HTTP/2 to its service.
fn as_h1(req: Request<Body>, service: &str) -> Result<Request<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    ensure_host(&mut parts, service)?;
    if parts.headers.remove(ORIG_PROTO).is_none() {
        parts.headers.insert(ORIG_PROTO, headers::ORIG_H2);
    }
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

/// How many closed pooled HTTP/1.1 connections one request may run into
/// before it counts as a connect failure of the endpoint.
const MAX_STALE_H1: u8 = 2;

/// Give an HTTP/1.1 request the Host header HTTP/1.1 requires: from its
/// absolute URI, else the service name. A client's own Host is kept.
fn ensure_host(parts: &mut http::request::Parts, service: &str) -> Result<(), ProxyError> {
    if parts.headers.contains_key(http::header::HOST) {
        return Ok(());
    }
    let host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()),
        None => HeaderValue::from_str(service),
    }
    .map_err(|_| ProxyError::BadTarget(service.to_string()))?;
    parts.headers.insert(http::header::HOST, host);
    Ok(())
}

/// hyper's errors keep the useful part in their source chain.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
