//! A response body read off a pooled connection to the local service,
//! which goes back to the pool once the body has been read to its end.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::Frame;

use super::chunked::{Decoder, Step};
use super::{Conn, READ_CHUNK};
use crate::http::body::BoxError;
use crate::inbound::idle::IdleList;

/// How the body's end is found.
#[derive(Debug)]
pub enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Decoder),
    /// Until the service closes the connection.
    Close,
}

/// The streaming part of a response from the local service.
pub struct ResponseBody {
    /// `None` once the body has ended or failed.
    conn: Option<Conn>,
    framing: Framing,
    /// The connection may carry another exchange after this body.
    keep_alive: bool,
    pool: Arc<IdleList<Conn>>,
}

impl ResponseBody {
    pub(super) fn new(
        conn: Conn,
        framing: Framing,
        keep_alive: bool,
        pool: Arc<IdleList<Conn>>,
    ) -> Self {
        ResponseBody {
            conn: Some(conn),
            framing,
            keep_alive,
            pool,
        }
    }

    /// The body has been read to its end: the connection is reusable if
    /// the service said so and sent nothing past the body.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                self.pool.checkin(conn);
            }
        }
    }

    fn fail(&mut self, message: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        let message = message.into();
        Poll::Ready(Some(Err(Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            message,
        )))))
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Length(left) => {
                    if *left == 0 {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    if !conn.buf.is_empty() {
                        let take = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        let data = conn.buf.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Trailers(trailers)) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Step::Done) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(why) => {
                        return this.fail(format!("the upstream sent a bad chunked body: {why}"))
                    }
                },
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            match ready!(poll_fill(conn, cx)) {
                Ok(0) if matches!(this.framing, Framing::Close) => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail("the upstream closed the connection before the body ended")
                }
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the response body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.framing, &self.conn) {
            (Framing::Length(n), Some(_)) => http_body::SizeHint::with_exact(*n),
            (_, None) => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}

/// Read what the socket has into the connection's buffer.
fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    conn.buf.reserve(READ_CHUNK);
    loop {
        match conn.io.try_read_buf(&mut conn.buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(conn.io.poll_read_ready(cx))?,
            other => return Poll::Ready(other),
        }
    }
}
