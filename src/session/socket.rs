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
use crate::relay::{Sink, Source};
use crate::tls::{TlsHalf, TlsIo};
use crate::uring::{RingHalf, RingSocket};

/// The client's side of a TLS listener.
pub(crate) type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;
/// The router's side of a TLS connection to a replica.
pub(crate) type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// A connection to one peer of a session, as the pumps use it: split in two halves, each
/// able to say when it is readable without holding a buffer.
pub(crate) trait Transport: Sized + Send + 'static {
    type Read: AsyncRead + Readiness + Unpin + Send + Sync + 'static;
    type Write: Sink + Send + Sync + 'static;
    fn split(self) -> (Self::Read, Self::Write);
    /// A plain TCP stream (tokio's `TcpStream`): its sessions may move onto an io_uring ring.
    const PLAIN_TCP: bool = false;
    /// Close at once, without a half-close or a linger: both Close frames have passed.
    fn close_now(read: Self::Read, write: Self::Write);
}

/// Readiness without a read buffer (see [`Source`]).
pub(crate) trait Readiness {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// The plain TCP socket read, for splice(2).
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Readiness for OwnedReadHalf {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsRef::<TcpStream>::as_ref(self).poll_read_ready(cx)
    }

    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Sink for OwnedWriteHalf {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

/// rustls reads and writes through its own buffers: nothing to splice.
impl<S: TlsIo> Sink for TlsHalf<S> {}

/// The ring copies out of its own buffers: nothing to splice.
impl Sink for RingHalf {}

impl<S: TlsIo> Readiness for TlsHalf<S> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsHalf::poll_readable(self, cx)
    }
}

impl Transport for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;
    const PLAIN_TCP: bool = true;

    fn split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }

    fn close_now(read: OwnedReadHalf, write: OwnedWriteHalf) {
        // Dropping a write half would shut it down first (a system call for nothing).
        write.forget();
        drop(read);
    }
}

macro_rules! tls_transport {
    ($stream:ty) => {
        impl Transport for $stream {
            type Read = TlsHalf<$stream>;
            type Write = TlsHalf<$stream>;

            fn split(self) -> (Self::Read, Self::Write) {
                crate::tls::split(self)
            }

            fn close_now(read: Self::Read, write: Self::Write) {
                drop((read, write));
            }
        }
    };
}

tls_transport!(ServerTls);
tls_transport!(ClientTls);

impl Readiness for RingHalf {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        RingHalf::poll_readable(self, cx)
    }
}

impl Transport for RingSocket {
    type Read = RingHalf;
    type Write = RingHalf;

    fn split(self) -> (RingHalf, RingHalf) {
        RingSocket::split(self)
    }

    fn close_now(read: RingHalf, write: RingHalf) {
        drop((read, write));
    }
}

pub(crate) type ReadSide<T> = Prefixed<<T as Transport>::Read>;
pub(crate) type WriteSide<T> = FrameWriter<<T as Transport>::Write>;

/// The client's socket after hyper has answered 101.
pub(crate) struct ClientSocket<C> {
    stream: C,
    leftover: Bytes,
}

impl<C: Transport + AsyncRead + tokio::io::AsyncWrite + Unpin> ClientSocket<C> {
    pub(crate) async fn upgrade(upgrade: hyper::upgrade::OnUpgrade) -> Option<ClientSocket<C>> {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed");
                return None;
            }
        };
        // Served by hyper's http1 builder directly on the listener's transport, so this
        // cannot fail.
        match upgraded.downcast::<TokioIo<C>>() {
            Ok(parts) => Some(ClientSocket {
                stream: parts.io.into_inner(),
                leftover: parts.read_buf,
            }),
            Err(_) => {
                tracing::error!("upgraded client connection is not the listener's transport");
                None
            }
        }
    }

    pub(crate) fn into_halves(self) -> (ReadSide<C>, WriteSide<C>) {
        client_halves(self.stream, self.leftover)
    }

    /// The socket, and what the client sent after its upgrade request.
    pub(crate) fn into_parts(self) -> (C, Bytes) {
        (self.stream, self.leftover)
    }
}

/// A client connection split for a session: reads start with the bytes hyper read past the
/// upgrade request.
pub(crate) fn client_halves<C: Transport>(
    stream: C,
    leftover: Bytes,
) -> (ReadSide<C>, WriteSide<C>) {
    let (read, write) = stream.split();
    (
        Prefixed::new(leftover, read),
        FrameWriter::new(write, Role::Server),
    )
}

/// A replica connection split for a session: reads start with the bytes read ahead during
/// the handshake.
pub(crate) fn upstream_halves<U: Transport>(
    stream: U,
    leftover: Bytes,
) -> (ReadSide<U>, WriteSide<U>) {
    let (read, write) = stream.split();
    (
        Prefixed::new(leftover, read),
        FrameWriter::new(write, Role::Client),
    )
}

/// Flush and half-close our side, then read until the peer closes too (bounded), so unread
/// bytes do not turn our close into a reset that could destroy the close frame in flight.
pub(crate) async fn finish_socket<T: Transport>(mut read: ReadSide<T>, mut write: WriteSide<T>) {
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
    /// The read half, once nothing read ahead is left to give out.
    pub fn into_inner(self) -> R {
        self.inner
    }

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

impl<R: AsyncRead + Readiness + Unpin + Sync> Source for Prefixed<R> {
    const PARKS: bool = true;
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            Poll::Ready(Ok(()))
        } else {
            self.inner.poll_readable(cx)
        }
    }

    fn tcp(&self) -> Option<&TcpStream> {
        if self.prefix.has_remaining() {
            None
        } else {
            self.inner.tcp()
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
