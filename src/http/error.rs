//! Errors the sidecar itself produces, and the one function that turns them
//! into responses.
//!
//! Keeping the mapping in one place (as linkerd2-proxy's `errors/respond.rs`
//! and pingora do) makes the status codes a reviewed contract rather than a
//! scattering of ad-hoc `Response::builder()` calls: upstream faults are 502,
//! timeouts 504, missing routes/endpoints and overload 503, client faults 4xx.

use http::{HeaderValue, Response, StatusCode};

use super::headers::{ERROR, REQUEST_ID};
use super::Body;

/// Why a request could not be relayed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request names no service (no Host, no absolute URI).
    #[error("request names no service: send Host: <service> or an absolute URI")]
    NoTarget,
    /// The Host names something that is not a mesh service name.
    #[error("{0:?} is not a service name")]
    BadTarget(String),
    /// The routing table has no such service.
    #[error("no route to service {0:?}: it is not in the registry")]
    UnknownService(String),
    /// The service exists but has no endpoint.
    #[error("service {0:?} has no endpoints")]
    NoEndpoints(String),
    /// Every endpoint refused or timed out the connection.
    #[error("could not connect to service {service:?} ({endpoint}): {message}")]
    Connect {
        /// Target service.
        service: String,
        /// Last endpoint tried.
        endpoint: String,
        /// The cause.
        message: String,
    },
    /// The upstream failed after the request was sent (reset, protocol error).
    #[error("upstream {endpoint} of service {service:?} failed: {message}")]
    Upstream {
        /// Target service.
        service: String,
        /// Endpoint that failed.
        endpoint: String,
        /// The cause.
        message: String,
    },
    /// The per-try or overall deadline passed.
    #[error("service {service:?} did not answer within {after_ms} ms")]
    Timeout {
        /// Target service.
        service: String,
        /// Elapsed deadline in milliseconds.
        after_ms: u64,
    },
    /// A circuit breaker (concurrency limit) is open.
    #[error("service {0:?} is overloaded: concurrency limit reached")]
    Overloaded(String),
    /// Retries were needed but the retry budget is spent.
    #[error("service {0:?} is failing and the retry budget is exhausted")]
    BudgetExhausted(String),
    /// The local service (inbound side) could not be reached.
    #[error("local service at {address} is unreachable: {message}")]
    LocalConnect {
        /// The local service address.
        address: String,
        /// The cause.
        message: String,
    },
    /// The local service failed mid-request.
    #[error("local service at {address} failed: {message}")]
    LocalUpstream {
        /// The local service address.
        address: String,
        /// The cause.
        message: String,
    },
    /// The peer is not allowed to call this service (mTLS authorization).
    #[error("caller {0:?} is not allowed to call this service")]
    Forbidden(String),
    /// The sidecar is draining and takes no new requests.
    #[error("sidecar is shutting down")]
    Draining,
    /// The request's HTTP/1 framing could be read two ways (both
    /// `Content-Length` and `Transfer-Encoding`, repeated lengths, an unknown
    /// transfer coding): a request-smuggling attempt. Refused, never relayed.
    #[error("ambiguous request framing: {0}")]
    AmbiguousFraming(&'static str),
    /// The request's header block exceeds `limits.max_header_bytes`.
    #[error("request header block of {size} bytes exceeds the {limit}-byte limit")]
    HeadersTooLarge {
        /// Bytes in the header block.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
}

// === impl ProxyError ===

impl ProxyError {
    /// The status code this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoTarget | ProxyError::BadTarget(_) | ProxyError::AmbiguousFraming(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UnknownService(_)
            | ProxyError::NoEndpoints(_)
            | ProxyError::Overloaded(_)
            | ProxyError::BudgetExhausted(_)
            | ProxyError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::LocalConnect { .. }
            | ProxyError::LocalUpstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `x-outrigger-error` value: which stage failed, for callers and
    /// dashboards that must tell "no route" from "upstream down".
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoTarget | ProxyError::BadTarget(_) => "bad-target",
            ProxyError::UnknownService(_) => "no-route",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::Connect { .. } | ProxyError::LocalConnect { .. } => "connect",
            ProxyError::Upstream { .. } | ProxyError::LocalUpstream { .. } => "upstream",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Overloaded(_) => "overloaded",
            ProxyError::BudgetExhausted(_) => "retry-budget",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::Draining => "draining",
            ProxyError::HeadersTooLarge { .. } => "headers-too-large",
            ProxyError::AmbiguousFraming(_) => "bad-framing",
        }
    }
}

/// Turn an error into the response the caller sees, and log it once with
/// the request id. This is the only place sidecar errors become responses.
pub fn respond(
    err: &ProxyError,
    request_id: &HeaderValue,
    direction: &'static str,
) -> Response<Body> {
    let status = err.status();
    let rid = request_id.to_str().unwrap_or("-");
    if status.is_server_error() {
        tracing::warn!(request_id = rid, direction, status = status.as_u16(), error = %err, "request failed");
    } else {
        tracing::info!(request_id = rid, direction, status = status.as_u16(), error = %err, "request refused");
    }
    let mut res = Response::new(Body::from(format!("{err}\n")));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(ERROR, HeaderValue::from_static(err.kind()));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(REQUEST_ID, request_id.clone());
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_contract() {
        let rid = HeaderValue::from_static("r1");
        let cases = [
            (ProxyError::UnknownService("x".into()), 503, "no-route"),
            (
                ProxyError::Connect {
                    service: "b".into(),
                    endpoint: "e".into(),
                    message: "refused".into(),
                },
                502,
                "connect",
            ),
            (
                ProxyError::Timeout {
                    service: "b".into(),
                    after_ms: 5,
                },
                504,
                "timeout",
            ),
            (ProxyError::Overloaded("b".into()), 503, "overloaded"),
            (ProxyError::Forbidden("a".into()), 403, "forbidden"),
            (ProxyError::AmbiguousFraming("x"), 400, "bad-framing"),
        ];
        for (err, code, kind) in cases {
            let res = respond(&err, &rid, "outbound");
            assert_eq!(res.status().as_u16(), code, "{err}");
            assert_eq!(res.headers()[ERROR], kind);
            assert_eq!(res.headers()[REQUEST_ID], "r1");
        }
    }

    #[test]
    fn unknown_service_body_names_it() {
        let err = ProxyError::UnknownService("zed".into());
        assert!(err.to_string().contains("\"zed\""));
    }
}
