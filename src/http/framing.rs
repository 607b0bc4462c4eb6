//! HTTP/1 message framing, followed on the raw bytes of a connection, to
//! catch request smuggling before hyper normalizes the evidence away.
//!
//! hyper resolves a request that carries both `Transfer-Encoding` and
//! `Content-Length` by dropping `Content-Length` (RFC 9112 §6.3 allows that
//! if the connection is closed afterwards, which hyper does), and it accepts
//! repeated identical `Content-Length` fields. Both are classic smuggling
//! vectors (CL.TE, TE.CL): a proxy in front of the sidecar may have framed
//! the same bytes differently. By the time a handler sees the request the
//! evidence is gone, so [`Framing`] reads the byte stream alongside hyper —
//! heads with `httparse` (hyper's own parser), bodies by length or chunk,
//! mirroring hyper's chunked decoder — and reports a head whose framing is
//! ambiguous. The server then refuses every request on that connection with
//! 400 and closes it, so nothing with ambiguous framing is relayed (Envoy
//! and HAProxy refuse these too).
//!
//! It only ever *reports* a head it parsed completely. On anything it does
//! not follow (HTTP/2, a malformed head or chunk that hyper rejects on its
//! own, an oversized head) it stops looking instead of guessing.

use std::mem::MaybeUninit;

/// A head with ambiguous framing: why it is refused.
pub type Ambiguity = &'static str;

/// Chunk extensions hyper accepts per body before it gives up (its
/// `CHUNKED_EXTENSIONS_LIMIT`); past it hyper fails the body, and so do we.
const MAX_CHUNK_EXTENSION_BYTES: u64 = 16 * 1024;

/// Where the tracker is in the connection's byte stream.
#[derive(Debug)]
pub enum Framing {
    /// Collecting a request head (request line and fields).
    Head {
        /// The head so far; bounded by `max_head_bytes`.
        buf: Vec<u8>,
        /// hyper's read-buffer limit: a longer head gets 431 from hyper.
        max_head_bytes: usize,
        /// hyper's field-count limit.
        max_headers: usize,
    },
    /// Inside a `Content-Length` body: bytes left.
    Body {
        /// Body bytes still to come.
        left: u64,
        /// What the next head is checked against.
        next: HeadLimits,
    },
    /// Inside a chunked body.
    Chunked {
        /// The chunked decoder's state.
        chunk: Chunk,
        /// What the next head is checked against.
        next: HeadLimits,
    },
    /// Not following the stream (HTTP/2, or something hyper rejects anyway).
    Off,
}

/// The head limits carried across a body.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    max_head_bytes: usize,
    max_headers: usize,
}

/// hyper's chunked decoder states, minus the bytes it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    state: ChunkState,
    /// The size being parsed, then the data bytes left in the chunk.
    size: u64,
    /// Extension bytes seen in this body.
    extension_bytes: u64,
}

/// What a complete head means for the bytes after it.
enum Next {
    Ambiguous(Ambiguity),
    Length(u64),
    Chunked,
    Unknown,
}

// === impl Framing ===

impl Framing {
    /// Start of a connection: the first thing expected is a request head.
    pub fn new(max_head_bytes: usize, max_headers: usize) -> Framing {
        HeadLimits {
            max_head_bytes,
            max_headers,
        }
        .head()
    }

    /// Whether the tracker still follows the stream.
    pub fn is_active(&self) -> bool {
        !matches!(self, Framing::Off)
    }

    /// Whether part of a request head has arrived and the rest has not
    /// (the header read timeout runs only then; see
    /// [`super::conn_guard::GuardedIo`]).
    pub fn mid_head(&self) -> bool {
        matches!(self, Framing::Head { buf, .. } if !buf.is_empty())
    }

    /// Feed the next bytes read from the client. Returns the reason when a
    /// head with ambiguous framing completes; the tracker then stops.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<Ambiguity> {
        while !bytes.is_empty() {
            match self {
                Framing::Off => return None,
                Framing::Head {
                    buf,
                    max_head_bytes,
                    max_headers,
                } => {
                    let limits = HeadLimits {
                        max_head_bytes: *max_head_bytes,
                        max_headers: *max_headers,
                    };
                    if buf.is_empty() {
                        // httparse skips empty lines before a request line.
                        let skip = bytes
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return None;
                        }
                    }
                    let Some(end) = head_end(buf, bytes) else {
                        if buf.len() + bytes.len() > limits.max_head_bytes {
                            *self = Framing::Off;
                        } else {
                            buf.extend_from_slice(bytes);
                        }
                        return None;
                    };
                    if buf.len() + end > limits.max_head_bytes {
                        *self = Framing::Off;
                        return None;
                    }
                    let (head, rest) = bytes.split_at(end);
                    bytes = rest;
                    // The usual case is a head that arrived in one read: it is
                    // classified where it lies, not copied first (this and the
                    // uninitialized header slots in `classify` saved ~0.57k
                    // instructions per request at hop A, by callgrind).
                    let next = if buf.is_empty() {
                        classify(head, limits.max_headers)
                    } else {
                        buf.extend_from_slice(head);
                        classify(buf, limits.max_headers)
                    };
                    match next {
                        Next::Ambiguous(why) => {
                            *self = Framing::Off;
                            return Some(why);
                        }
                        Next::Unknown => {
                            *self = Framing::Off;
                            return None;
                        }
                        Next::Length(0) => buf.clear(),
                        Next::Length(left) => *self = Framing::Body { left, next: limits },
                        Next::Chunked => {
                            *self = Framing::Chunked {
                                chunk: Chunk {
                                    state: ChunkState::Start,
                                    size: 0,
                                    extension_bytes: 0,
                                },
                                next: limits,
                            }
                        }
                    }
                }
                Framing::Body { left, next } => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        let next = *next;
                        *self = next.head();
                    }
                }
                Framing::Chunked { chunk, next } => {
                    if chunk.state == ChunkState::Data {
                        let n = chunk.size.min(bytes.len() as u64);
                        chunk.size -= n;
                        bytes = &bytes[n as usize..];
                        if chunk.size == 0 {
                            chunk.state = ChunkState::DataCr;
                        }
                        continue;
                    }
                    let (byte, rest) = (bytes[0], &bytes[1..]);
                    bytes = rest;
                    match chunk.step(byte) {
                        Some(true) => {
                            let next = *next;
                            *self = next.head();
                        }
                        Some(false) => {}
                        None => *self = Framing::Off,
                    }
                }
            }
        }
        None
    }
}

// === impl HeadLimits ===

impl HeadLimits {
    fn head(self) -> Framing {
        Framing::Head {
            buf: Vec::new(),
            max_head_bytes: self.max_head_bytes,
            max_headers: self.max_headers,
        }
    }
}

// === impl Chunk ===

impl Chunk {
    /// One byte through hyper's chunked state machine (`decode.rs`):
    /// `Some(true)` when the body ended, `None` where hyper fails the body.
    fn step(&mut self, b: u8) -> Option<bool> {
        use ChunkState::*;
        self.state = match (self.state, b) {
            (Start | Size, _) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).map(u64::from)?;
                self.size = self.size.checked_mul(16)?.checked_add(digit)?;
                Size
            }
            (Size | SizeLws, b'\t' | b' ') => SizeLws,
            (Size | SizeLws, b';') => Extension,
            (Size | SizeLws | Extension, b'\r') => SizeLf,
            (Extension, b'\n') => return None,
            (Extension, _) => {
                self.extension_bytes += 1;
                if self.extension_bytes >= MAX_CHUNK_EXTENSION_BYTES {
                    return None;
                }
                Extension
            }
            (SizeLf, b'\n') if self.size == 0 => EndCr,
            (SizeLf, b'\n') => Data,
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => {
                self.size = 0;
                Start
            }
            (Trailer, b'\r') => TrailerLf,
            (Trailer, _) => Trailer,
            (TrailerLf, b'\n') => EndCr,
            (EndCr, b'\r') => EndLf,
            (EndCr, _) => Trailer,
            (EndLf, b'\n') => return Some(true),
            _ => return None,
        };
        Some(false)
    }
}

/// How many bytes of `bytes` complete the head whose start is in `buf`: the
/// head ends at an empty line (`\n\n` or `\n\r\n`, as httparse accepts).
fn head_end(buf: &[u8], bytes: &[u8]) -> Option<usize> {
    // The byte `back` places before `bytes[i]`, reaching into what is
    // buffered when the head was split across reads.
    let before = |i: usize, back: usize| match i.checked_sub(back) {
        Some(j) => Some(bytes[j]),
        None => buf.len().checked_sub(back - i).map(|j| buf[j]),
    };
    // Only line feeds can end a head, so jump between them (memchr scans a
    // word or a vector at a time; a byte-by-byte state machine here was
    // ~0.5k instructions per request at hop A).
    memchr::memchr_iter(b'\n', bytes)
        .find(|&i| match before(i, 1) {
            Some(b'\n') => true,
            Some(b'\r') => before(i, 2) == Some(b'\n'),
            _ => false,
        })
        .map(|i| i + 1)
}

/// Decide what a complete head means, the way a careful proxy must.
fn classify(head: &[u8], max_headers: usize) -> Next {
    // The default limit (100) fits on the stack; only a raised one allocates.
    // Uninitialized slots: initializing 128 empty headers (4 KiB) cost more
    // than parsing a typical head does.
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut heap;
    let fields: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= stack.len() {
        &mut stack[..max_headers]
    } else {
        heap = vec![MaybeUninit::uninit(); max_headers];
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, fields) {
        Ok(httparse::Status::Complete(_)) => {}
        // hyper refuses it on its own (400/431/501), or it is HTTP/2.
        _ => return Next::Unknown,
    }
    let mut lengths = 0usize;
    let mut length = None;
    let mut codings = 0usize;
    let mut chunked = false;
    let mut hosts = 0usize;
    for field in req.headers.iter() {
        if field.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            // 1*DIGIT, nothing else: no sign, no list, no spaces inside.
            let digits = !field.value.is_empty() && field.value.iter().all(u8::is_ascii_digit);
            length = std::str::from_utf8(field.value)
                .ok()
                .filter(|_| digits)
                .and_then(|v| v.parse::<u64>().ok());
            if length.is_none() {
                return Next::Ambiguous("invalid content-length");
            }
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            chunked = field.value.eq_ignore_ascii_case(b"chunked");
        } else if field.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        }
    }
    // Two `Host` fields route one request two ways (RFC 9112 §3.2: 400).
    if hosts > 1 {
        return Next::Ambiguous("repeated host");
    }
    match (lengths, codings) {
        (2.., _) => Next::Ambiguous("repeated content-length"),
        (_, 2..) => Next::Ambiguous("repeated transfer-encoding"),
        (1, 1) => Next::Ambiguous("both content-length and transfer-encoding"),
        (_, 1) if !chunked => Next::Ambiguous("transfer-encoding other than chunked"),
        (_, 1) if req.version == Some(0) => Next::Ambiguous("transfer-encoding in HTTP/1.0"),
        (_, 1) => Next::Chunked,
        _ => Next::Length(length.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(parts: &[&[u8]]) -> Option<Ambiguity> {
        let mut f = Framing::new(64 * 1024, 100);
        parts.iter().find_map(|p| f.feed(p))
    }

    #[test]
    fn head_end_is_found_across_any_split_with_crlf_or_bare_lf() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"[..],
            &b"GET / HTTP/1.1\nHost: b\n\n"[..],
            &b"GET / HTTP/1.1\r\nHost: b\n\r\n"[..],
        ] {
            let mut stream = head.to_vec();
            stream.extend_from_slice(b"BODY\r\n\r\n");
            for split in 0..head.len() {
                let (buf, bytes) = stream.split_at(split);
                assert_eq!(
                    head_end(buf, bytes),
                    Some(head.len() - split),
                    "{head:?} split at {split}"
                );
            }
            // Not complete until its last byte has arrived.
            assert_eq!(head_end(&head[..1], &head[1..head.len() - 1]), None);
        }
    }

    #[test]
    fn clean_requests_pass_in_any_split() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: b\r\n\r\n\
POST /c HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n\
POST /d HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n";
        for split in 1..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(feed_all(&[a, b]), None, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(feed_all(&bytes), None);
    }

    #[test]
    fn ambiguous_heads_are_reported() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"POST / HTTP/1.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                "both",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                "repeated content-length",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                "invalid content-length",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                "invalid content-length",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
                "other than chunked",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "repeated transfer-encoding",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: b\r\nHost: c\r\n\r\n",
                "repeated host",
            ),
        ];
        for (head, why) in cases {
            let got = feed_all(&[head]);
            assert!(
                got.is_some_and(|g| g.contains(why)),
                "{:?}: {got:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_smuggled_head_after_clean_bodies_is_found() {
        // The CL.TE request hides behind a chunked and a fixed-length body.
        let stream: &[u8] =
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
POST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nwxyz\
POST /c HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(feed_all(&[stream]).is_some());
        // A body that merely contains such a head is not a head.
        let body = b"POST /c HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = format!("POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        assert_eq!(feed_all(&[head.as_bytes(), body]), None);
    }

    #[test]
    fn http2_and_garbage_turn_the_tracker_off() {
        let mut f = Framing::new(64 * 1024, 100);
        assert_eq!(f.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), None);
        assert!(!f.is_active());
        let mut f = Framing::new(1024, 100);
        assert_eq!(f.feed(&[b'a'; 2048]), None);
        assert!(!f.is_active(), "an oversized head stops the tracker");
    }
}
