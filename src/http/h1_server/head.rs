//! Parsing a request head that the lean loop can serve, in place.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version};

use crate::http::Body;

/// Header fields a head may have and still be served here; past this, hyper
/// serves it (and applies `max_headers`, 431 beyond).
pub const MAX_FIELDS: usize = 64;

/// The limits a head must keep to be served here. Over any of them the
/// head goes to hyper, whose answers (431) are the listener's answers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `[limits] max_header_bytes`: the header block, as `server` counts it.
    pub max_header_bytes: usize,
    /// `[limits] max_headers`.
    pub max_headers: usize,
}

/// What the buffer's front holds.
// Returned once per head and matched at once: boxing the request would cost
// an allocation per request to save a move.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Head {
    /// A request to serve here; `close` if the client asked to close after
    /// it (`Connection: close`).
    Request { req: Request<Body>, close: bool },
    /// The start of a head: read more.
    Partial,
    /// Something hyper must serve: a body, an upgrade, `Expect`, CONNECT,
    /// HTTP/1.0, the HTTP/2 preface, a limit exceeded, or bytes that do not
    /// parse. Nothing was consumed.
    Unfit,
    /// A head that parsed but whose target or a field value `http` refuses;
    /// it was consumed, so the connection answers 400 and closes (as hyper
    /// does for a head it cannot parse).
    Invalid,
}

/// Room left in a request's header map for the fields the handler adds
/// (`x-request-id`, `x-forwarded-for`, `x-outrigger-caller`, ...): growing
/// a map rehashes every field, which cost ~1.8k instructions per request.
const HANDLER_FIELDS: usize = 8;

/// A field seen while classifying, built into the request once the head is
/// known to be served here. `value` is the value's span in the head.
pub type Field = (HeaderName, usize, usize);

/// Parse the head at the front of `buf`. A head that is served here is
/// split off `buf`; the values and the target share its bytes, as hyper's
/// do. `fields` is scratch space kept by the connection so that a request
/// does not allocate for it; `cached` is the last response's header map,
/// emptied, reused as hyper does so that a request allocates no map.
pub fn parse(
    buf: &mut BytesMut,
    limits: &Limits,
    fields: &mut Vec<Field>,
    cached: &mut Option<HeaderMap>,
) -> Head {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Unfit,
    };
    if parsed.version != Some(1) || parsed.headers.len() > limits.max_headers {
        return Head::Unfit;
    }
    let method = match parsed.method.map(|m| Method::from_bytes(m.as_bytes())) {
        Some(Ok(m)) if m != Method::CONNECT => m,
        _ => return Head::Unfit,
    };
    let base = buf.as_ptr() as usize;
    let Some(path) = parsed.path else {
        return Head::Unfit;
    };
    let path_at = path.as_ptr() as usize - base;
    let path_span = (path_at, path_at + path.len());

    fields.clear();
    let mut close = false;
    // Repeated, these make the framing or the target ambiguous; hyper's
    // side of the smuggling check refuses them (400).
    let mut lengths = 0u8;
    let mut hosts = 0u8;
    let mut block = 0usize;
    for h in parsed.headers.iter() {
        block += h.name.len() + h.value.len() + 4;
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Head::Unfit;
        };
        // Anything that gives the request a body or changes the protocol
        // is hyper's to serve; `Content-Length: 0` is no body.
        if name == header::CONTENT_LENGTH {
            lengths += 1;
            if h.value != b"0" || lengths > 1 {
                return Head::Unfit;
            }
        } else if name == header::HOST {
            hosts += 1;
            if hosts > 1 {
                return Head::Unfit;
            }
        } else if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Head::Unfit;
        } else if name == header::CONNECTION {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Head::Unfit;
                }
            }
        }
        let at = h.value.as_ptr() as usize - base;
        fields.push((name, at, at + h.value.len()));
    }
    if block > limits.max_header_bytes {
        return Head::Unfit;
    }

    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_span.0..path_span.1)) else {
        return Head::Invalid;
    };
    let mut headers = cached.take().unwrap_or_default();
    headers.reserve(fields.len() + HANDLER_FIELDS);
    for (name, from, to) in fields.drain(..) {
        // httparse admits only bytes a header value may hold, so this does
        // not fail; if it ever did, the head is refused, not served.
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice(from..to)) else {
            return Head::Invalid;
        };
        headers.append(name, value);
    }
    let mut req = Request::new(Body::empty());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Head::Request { req, close }
}
