//! A client stream that reports the first bytes its server sends.
//!
//! An HTTP/2 client speaks first (the preface) and the server answers with
//! its SETTINGS, so the first bytes read tell whether the far side is alive
//! and whether it speaks HTTP/2 at all: an HTTP/2 server's first frame is
//! SETTINGS (RFC 9113 §3.4), while a server that knows only HTTP/1.x takes
//! the preface for a request line (`PRI * HTTP/2.0`) and answers it with an
//! error, as a status line or (Python's `http.server`) a bare HTML page.
//! Checking costs one branch per read.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// What a server's first bytes looked like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// The start of a SETTINGS frame: a 24-bit length whose top byte is 0
    /// (SETTINGS are short) and frame type 4.
    Settings,
    /// Anything else: the server does not speak HTTP/2.
    NotHttp2,
}

impl Greeting {
    fn of(first: &[u8]) -> Greeting {
        // A read too short to hold the type byte is given the benefit of
        // the doubt.
        if first.first() == Some(&0) && first.get(3).is_none_or(|t| *t == 4) {
            Greeting::Settings
        } else {
            Greeting::NotHttp2
        }
    }
}

/// `inner`, reporting its first non-empty read once on a oneshot channel.
/// The channel closes unanswered if the stream ends or fails first.
pub struct FirstRead<T> {
    inner: T,
    notify: Option<oneshot::Sender<Greeting>>,
}

impl<T> FirstRead<T> {
    /// Wrap `inner`; the receiver gets the [`Greeting`].
    pub fn new(inner: T) -> (Self, oneshot::Receiver<Greeting>) {
        let (tx, rx) = oneshot::channel();
        let io = FirstRead {
            inner,
            notify: Some(tx),
        };
        (io, rx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstRead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some(tx) = self.notify.take() {
                let _ = tx.send(Greeting::of(&buf.filled()[before..]));
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstRead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn greeting_of(first: &'static [u8]) -> Greeting {
        let (client, mut server) = tokio::io::duplex(64);
        let (mut io, rx) = FirstRead::new(client);
        server.write_all(first).await.unwrap();
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        rx.await.unwrap()
    }

    #[tokio::test]
    async fn a_settings_frame_is_told_from_http1_answers() {
        for answer in [
            &b"HTTP/1.1 505 HTTP Version Not Supported\r\n"[..],
            b"<!DOCTYPE HTML>",
        ] {
            assert_eq!(greeting_of(answer).await, Greeting::NotHttp2);
        }
        // SETTINGS with one setting (6 bytes), then with none.
        assert_eq!(
            greeting_of(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]).await,
            Greeting::Settings
        );
        assert_eq!(
            greeting_of(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await,
            Greeting::Settings
        );
        // A GOAWAY (type 7) first is not an HTTP/2 server's greeting.
        assert_eq!(
            greeting_of(&[0, 0, 8, 7, 0, 0, 0, 0, 0]).await,
            Greeting::NotHttp2
        );
    }

    #[tokio::test]
    async fn a_stream_that_ends_first_leaves_the_channel_unanswered() {
        let (client, server) = tokio::io::duplex(64);
        let (mut io, rx) = FirstRead::new(client);
        drop(server);
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        drop(io);
        assert!(rx.await.is_err());
    }
}
