//! Header hygiene applied at every hop.
//!
//! Hop-by-hop fields (RFC 9110 §7.6.1) describe one connection, so relaying
//! them would let a client steer the next connection (or smuggle framing
//! through it). They are removed together with every field the `Connection`
//! header names. `te: trailers` is the one survivor: gRPC needs it end to end.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The sidecar's own headers; anything with this prefix arriving from outside
/// the mesh is dropped so it cannot be spoofed.
pub const OUTRIGGER_PREFIX: &str = "x-outrigger-";
/// Names the calling service; set by the caller's sidecar (or, with mTLS, from
/// the verified client certificate).
pub const CALLER: HeaderName = HeaderName::from_static("x-outrigger-caller");
/// Says which stage failed when the sidecar itself produced an error.
pub const ERROR: HeaderName = HeaderName::from_static("x-outrigger-error");
/// The caller's original protocol when the sidecar hop carries a request
/// in the other one: an HTTP/1.1 request multiplexed over HTTP/2
/// ([`ORIG_H1`]), or a bodiless HTTP/2 request on a lean HTTP/1.1
/// connection ([`ORIG_H2`]). The far side then speaks the caller's protocol
/// to its service.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-outrigger-orig-proto");
/// [`ORIG_PROTO`]'s value for a request that arrived as HTTP/1.1.
pub const ORIG_H1: HeaderValue = HeaderValue::from_static("HTTP/1.1");
/// [`ORIG_PROTO`]'s value for a request that arrived as HTTP/2.
pub const ORIG_H2: HeaderValue = HeaderValue::from_static("HTTP/2");
/// Request id, added when missing so one call can be followed across hops.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Appended with the client address at each hop.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Marks a POST (or other) request safe to retry.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Fixed hop-by-hop fields (RFC 9110 §7.6.1 plus the de-facto ones).
/// `Trailer` is deliberately absent: RFC 9110 made it end-to-end, and an
/// HTTP/1.1 hop only emits trailers when the response declares them.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove hop-by-hop headers and the fields `Connection` names. `TE` is
/// reduced to `trailers` when it listed it, and dropped otherwise.
///
/// When `keep_upgrade` is set (a WebSocket or other upgrade being relayed),
/// `Connection: upgrade` and `Upgrade` are kept, because the next hop needs
/// them to perform the same upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Fast path: most messages carry none of these. One pass over the names
    // (comparing standard names is an enum compare) is much cheaper than a
    // hashed lookup per hop-by-hop name: it cut this function from ~2k to
    // ~0.15k instructions per request at each hop (callgrind, bench/README.md).
    if !keep_upgrade
        && !headers
            .keys()
            .any(|k| *k == header::TE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let te_trailers = te_has_trailers(headers);
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if keep_upgrade && name == header::UPGRADE {
                continue;
            }
            headers.remove(&name);
        }
    }
    for name in HOP_BY_HOP.iter() {
        if keep_upgrade && (*name == header::CONNECTION || *name == header::UPGRADE) {
            continue;
        }
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    if headers.contains_key(header::TE) {
        headers.remove(header::TE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn te_has_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Whether the request asks for a protocol upgrade (WebSocket et al.).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Whether the caller spoke HTTP/1.1: the protocol a request arrived in,
/// unless the sidecar hop changed it and said so in [`ORIG_PROTO`].
pub fn caller_spoke_h1(version: http::Version, headers: &HeaderMap) -> bool {
    match headers.get(ORIG_PROTO) {
        Some(v) => v != ORIG_H2,
        None => version != http::Version::HTTP_2,
    }
}

/// Remove every `x-outrigger-*` header (requests from outside the mesh).
pub fn strip_outrigger_headers(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(OUTRIGGER_PREFIX))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// Ensure `x-request-id` is present; returns it for logging.
///
/// The relayed value is marked sensitive, which HPACK encodes as a literal
/// that is never indexed. A request id is unique per request, so indexing it
/// only evicts useful entries from the HTTP/2 header tables at both ends of
/// the sidecar hop: callgrind put that churn at ~3k instructions per
/// request across the two hops (bench/README.md).
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get_mut(&REQUEST_ID) {
        // An HTTP/2 peer's never-indexed value arrives marked sensitive,
        // which would print as "Sensitive" in our logs.
        let mut id = v.clone();
        id.set_sensitive(false);
        v.set_sensitive(true);
        return id;
    }
    let id = new_request_id();
    let mut relayed = id.clone();
    relayed.set_sensitive(true);
    headers.insert(REQUEST_ID, relayed);
    id
}

/// A random 128-bit id, hex encoded (the W3C trace-id shape).
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    let n = fastrand::u128(..);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((n >> (i * 4)) & 0xf) as usize];
    }
    // 32 ASCII hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

/// Append the client address to `x-forwarded-for`. Several field lines
/// are one list (RFC 9110 §5.3), so all of them are kept, in order.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    let prev = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok());
    if prev.is_none_or(str::is_empty) && client == std::net::Ipv4Addr::LOCALHOST {
        // The outbound listener's only client is the local service, on
        // loopback: its value is a constant, not a formatted string.
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("127.0.0.1"));
        return;
    }
    let ip = client.to_string();
    let mut chain: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    chain.push(&ip);
    let value = chain.join(", ");
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// Replace `x-forwarded-for` with the client address: a client outside the
/// mesh cannot vouch for addresses before it.
pub fn reset_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    if let Ok(v) = HeaderValue::from_str(&client.to_string()) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_callers_protocol_is_the_named_one_else_the_arrived_one() {
        use http::Version;
        let none = HeaderMap::new();
        assert!(caller_spoke_h1(Version::HTTP_11, &none));
        assert!(!caller_spoke_h1(Version::HTTP_2, &none));
        // Carried over HTTP/2 for an HTTP/1.1 caller, and the reverse.
        assert!(caller_spoke_h1(
            Version::HTTP_2,
            &map(&[("x-outrigger-orig-proto", "HTTP/1.1")])
        ));
        assert!(!caller_spoke_h1(
            Version::HTTP_11,
            &map(&[("x-outrigger-orig-proto", "HTTP/2")])
        ));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_fields() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("te", "gzip, trailers"),
            ("traceparent", "00-abc-def-01"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["traceparent"], "00-abc-def-01");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn te_without_trailers_is_dropped() {
        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn upgrade_headers_survive_when_relaying_an_upgrade() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn request_id_added_once() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(ensure_request_id(&mut h), id);
        // Relayed never-indexed; the copy for logs prints as itself.
        assert!(h[REQUEST_ID].is_sensitive());
        assert!(!id.is_sensitive());
        assert_eq!(format!("{id:?}"), format!("{:?}", id.to_str().unwrap()));
    }

    #[test]
    fn a_message_without_hop_by_hop_fields_is_untouched() {
        let mut h = map(&[("accept", "*/*"), ("x-a", "1"), ("x-a", "2")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }

    #[test]
    fn forwarded_for_appends_or_resets() {
        let mut h = map(&[("x-forwarded-for", "1.2.3.4")]);
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        h.append("x-forwarded-for", HeaderValue::from_static("5.6.7.8"));
        append_forwarded_for(&mut h, "10.0.0.3".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.1, 5.6.7.8, 10.0.0.3");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        reset_forwarded_for(&mut h, "10.0.0.2".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.2");
        append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.2, 127.0.0.1");
        let mut fresh = HeaderMap::new();
        append_forwarded_for(&mut fresh, "127.0.0.1".parse().unwrap());
        assert_eq!(fresh["x-forwarded-for"], "127.0.0.1");
    }

    #[test]
    fn outrigger_headers_from_outside_are_dropped() {
        let mut h = map(&[("x-outrigger-caller", "admin"), ("x-other", "1")]);
        strip_outrigger_headers(&mut h);
        assert!(!h.contains_key("x-outrigger-caller"));
        assert!(h.contains_key("x-other"));
    }
}
