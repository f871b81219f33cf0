//! A session's two sockets: split for the pumps, with the bytes read ahead during each
//! handshake put back in front, and closed without losing a Close frame in flight.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use fastwebsockets::Role;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::frames::FrameWriter;
use crate::relay::Source;
use crate::upstream::Upstream;

pub(crate) type ReadSide = Prefixed<OwnedReadHalf>;
pub(crate) type WriteSide = FrameWriter<OwnedWriteHalf>;

/// The client's socket after hyper has answered 101.
pub(crate) struct ClientSocket {
    stream: TcpStream,
    leftover: Bytes,
}

impl ClientSocket {
    pub(crate) async fn upgrade(upgrade: hyper::upgrade::OnUpgrade) -> Option<ClientSocket> {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed");
                return None;
            }
        };
        // Served by hyper's http1 builder directly on a TcpStream, so this cannot fail.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => Some(ClientSocket {
                stream: parts.io.into_inner(),
                leftover: parts.read_buf,
            }),
            Err(_) => {
                tracing::error!("upgraded client connection is not a TCP stream");
                None
            }
        }
    }

    pub(crate) fn into_halves(self) -> (ReadSide, WriteSide) {
        let (read, write) = self.stream.into_split();
        (
            Prefixed::new(self.leftover, read),
            FrameWriter::new(write, Role::Server),
        )
    }
}

/// A replica connection split for a session: reads start with the bytes read ahead during
/// the handshake.
pub(crate) fn upstream_halves(upstream: Upstream) -> (ReadSide, WriteSide) {
    let (read, write) = upstream.stream.into_split();
    (
        Prefixed::new(upstream.leftover, read),
        FrameWriter::new(write, Role::Client),
    )
}

/// Flush and half-close our side, then read until the peer closes too (bounded), so unread
/// bytes do not turn our close into a reset that could destroy the close frame in flight.
pub(crate) async fn finish_socket(mut read: ReadSide, mut write: WriteSide) {
    let _ = write.shutdown().await;
    // On the heap, not in the session's future: that would make every session 4 KiB larger.
    let mut sink = Vec::with_capacity(4096);
    let linger = async {
        loop {
            sink.clear();
            match tokio::io::AsyncReadExt::read_buf(&mut read, &mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), linger).await;
}

/// A read half that first yields bytes read ahead during the HTTP handshake.
pub struct Prefixed<R> {
    prefix: Bytes,
    inner: R,
}

impl<R> Prefixed<R> {
    pub fn new(prefix: Bytes, inner: R) -> Self {
        // An empty slice may still pin hyper's whole read buffer: let it go.
        let prefix = if prefix.is_empty() {
            Bytes::new()
        } else {
            prefix
        };
        Prefixed { prefix, inner }
    }
}

impl Source for Prefixed<OwnedReadHalf> {
    const PARKS: bool = true;
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            Poll::Ready(Ok(()))
        } else {
            AsRef::<TcpStream>::as_ref(&self.inner).poll_read_ready(cx)
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}
