//! A chunked transfer-coding decoder (RFC 9112 §7.1) over a connection's
//! read buffer: data comes out as slices of the buffer, not copies.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Longest chunk-size line (size and extensions) accepted; past it the
/// body fails rather than buffering without bound.
const MAX_SIZE_LINE: usize = 4096;
/// Chunk-extension bytes accepted per body (hyper's limit), so a service
/// cannot keep a body busy with extensions alone.
const MAX_EXTENSION_BYTES: usize = 16 * 1024;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most trailer fields accepted.
const MAX_TRAILER_FIELDS: usize = 64;

/// What one call to [`Decoder::decode`] produced.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Body data.
    Data(Bytes),
    /// The trailer section (the body ends after it).
    Trailers(HeaderMap),
    /// The body has ended.
    Done,
    /// The buffer holds no complete next item: read more.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// The decoder's position in one chunked body.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    line_bytes: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Size,
            line_bytes: 0,
        }
    }
}

impl Decoder {
    /// Decode from the front of `buf`, consuming what it returns. Bytes
    /// after the body's end are left in `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, &'static str> {
        loop {
            match self.state {
                State::Size => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    // httparse takes an empty size as 0; hyper (and the
                    // RFC) want at least one digit.
                    if !buf[0].is_ascii_hexdigit() {
                        return Err("invalid chunk size");
                    }
                    match httparse::parse_chunk_size(buf) {
                        Ok(httparse::Status::Complete((used, size))) => {
                            // Only what follows the size and precedes the
                            // line end counts: a long body of small chunks
                            // has many size lines, and no extensions.
                            let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                            let ending = if buf[..used].ends_with(b"\r\n") { 2 } else { 1 };
                            self.line_bytes += used.saturating_sub(digits + ending);
                            if self.line_bytes > MAX_EXTENSION_BYTES {
                                return Err("chunk extensions too large");
                            }
                            buf.advance(used);
                            self.state = if size == 0 {
                                State::Trailers
                            } else {
                                State::Data(size)
                            };
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_SIZE_LINE => {
                            return Err("chunk size line too long");
                        }
                        Ok(httparse::Status::Partial) => return Ok(Step::NeedMore),
                        Err(_) => return Err("invalid chunk size"),
                    }
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Step::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] == b"\r\n" {
                        buf.advance(2);
                        self.state = State::Done;
                        return Ok(Step::Done);
                    }
                    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
                        if buf.len() > MAX_TRAILERS {
                            return Err("trailer section too large");
                        }
                        return Ok(Step::NeedMore);
                    };
                    let section = buf.split_to(end + 4);
                    self.state = State::Done;
                    return parse_trailers(&section).map(Step::Trailers);
                }
                State::Done => return Ok(Step::Done),
            }
        }
    }
}

/// The trailer fields, minus those that describe the connection or the
/// framing: they mean nothing past this hop, and HTTP/2 forbids them.
fn parse_trailers(section: &[u8]) -> Result<HeaderMap, &'static str> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    let parsed = match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        _ => return Err("invalid trailer section"),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| "invalid trailer name")?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| "invalid trailer value")?;
        map.append(name, value);
    }
    crate::http::headers::strip_hop_by_hop(&mut map, false);
    map.remove(http::header::CONTENT_LENGTH);
    map.remove(http::header::HOST);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `wire` fed in pieces of `step` bytes; returns the data, the
    /// trailers and the bytes left after the body.
    fn decode_in_steps(
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, HeaderMap, Vec<u8>), &'static str> {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = HeaderMap::new();
        let mut fed = 0;
        loop {
            match dec.decode(&mut buf)? {
                Step::Data(d) => data.extend_from_slice(&d),
                Step::Trailers(t) => trailers = t,
                Step::Done => return Ok((data, trailers, buf.to_vec())),
                Step::NeedMore => {
                    assert!(
                        fed < wire.len(),
                        "the decoder wants more than the whole body"
                    );
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn decodes_data_extensions_and_trailers_at_every_split() {
        let wire = b"4;name=value\r\nRust\r\n0C \t; x\r\n hello world\r\n0\r\nx-sum: 42\r\ntransfer-encoding: chunked\r\n\r\nNEXT";
        for step in 1..=wire.len() {
            let (data, trailers, rest) = decode_in_steps(wire, step).unwrap();
            assert_eq!(data, b"Rust hello world", "step {step}");
            assert_eq!(trailers.get("x-sum").unwrap(), "42");
            assert!(
                !trailers.contains_key("transfer-encoding"),
                "hop-by-hop trailer relayed"
            );
            // Whatever was fed past the body stays in the buffer.
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
    }

    #[test]
    fn size_lines_are_not_extensions() {
        // 20,000 one-byte chunks: 60,000 bytes of size lines, no extension.
        let mut wire = b"1\r\nx\r\n".repeat(20_000);
        wire.extend_from_slice(b"0\r\n\r\n");
        let (data, _, _) = decode_in_steps(&wire, 4096).unwrap();
        assert_eq!(data.len(), 20_000);
    }

    #[test]
    fn extensions_past_the_per_body_limit_are_an_error() {
        let one = [b"1;".as_slice(), &[b'x'; 1000], b"\r\nx\r\n"].concat();
        let wire = one.repeat(MAX_EXTENSION_BYTES / 1000 + 2);
        assert_eq!(
            decode_in_steps(&wire, 4096).unwrap_err(),
            "chunk extensions too large"
        );
    }

    #[test]
    fn an_empty_trailer_section_ends_the_body() {
        let (data, trailers, rest) = decode_in_steps(b"2\r\nok\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!(data, b"ok");
        assert!(trailers.is_empty());
        assert!(rest.is_empty());
    }

    #[test]
    fn malformed_framing_is_an_error() {
        for (wire, why) in [
            (&b"\r\n"[..], "invalid chunk size"),
            (b"zz\r\n", "invalid chunk size"),
            (b"2\r\nokX\r\n0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"10000000000000000\r\n", "invalid chunk size"),
            (b"0\r\nbad field\r\n\r\n", "invalid trailer section"),
        ] {
            assert_eq!(
                decode_in_steps(wire, wire.len()).unwrap_err(),
                why,
                "{wire:?}"
            );
        }
        let long = [b"1;".as_slice(), &[b'x'; MAX_SIZE_LINE]].concat();
        assert_eq!(
            decode_in_steps(&long, long.len()).unwrap_err(),
            "chunk size line too long"
        );
    }
}
