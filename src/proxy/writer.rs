//! A write buffer that costs nothing while a session is idle.
//!
//! tokio's BufWriter allocates its whole buffer up front and keeps it; with tens of thousands
//! of mostly idle sessions that is most of the router's memory. This one allocates on the
//! first write of a burst and frees the buffer when a flush empties it. Large writes skip it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

/// Writes at least this large go straight to the socket once the buffer is empty.
const DIRECT_WRITE_BYTES: usize = 16 * 1024;
/// A burst is pushed out once this much has been buffered, even before the flush.
const MAX_BUFFERED_BYTES: usize = 64 * 1024;

pub struct Coalescing<W> {
    inner: W,
    buf: Vec<u8>,
    written: usize,
}

impl<W: AsyncWrite + Unpin> Coalescing<W> {
    pub fn new(inner: W) -> Self {
        Coalescing {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }

    /// Write out everything buffered; frees the buffer when done.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Coalescing<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() + data.len() > MAX_BUFFERED_BYTES {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.is_empty() && data.len() >= DIRECT_WRITE_BYTES {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.buf.len() + total > MAX_BUFFERED_BYTES {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.is_empty() && total >= DIRECT_WRITE_BYTES {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_writes_wait_for_flush_and_large_ones_pass_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalescing::new(a);
        w.write_all(b"one ").await.unwrap();
        w.write_all(b"two ").await.unwrap();
        let mut probe = [0u8; 1];
        let nothing_yet =
            tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut probe)).await;
        assert!(nothing_yet.is_err(), "small writes must wait for the flush");
        let big = vec![b'x'; 20_000];
        w.write_all(&big).await.unwrap();
        w.write_all(b" end").await.unwrap();
        w.flush().await.unwrap();
        assert!(w.buf.capacity() == 0, "the buffer is freed once flushed");
        drop(w);
        let mut out = Vec::new();
        b.read_to_end(&mut out).await.unwrap();
        let mut expected = b"one two ".to_vec();
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b" end");
        assert_eq!(out, expected);
    }
}
