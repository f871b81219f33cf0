//! The write side of a WebSocket connection, built for a proxy holding many idle sessions.
//!
//! Frames are formatted straight into one coalescing buffer, allocated on the first write of
//! a burst and freed when a flush empties it: an idle session holds no write buffer.
//! (fastwebsockets' writer formats each frame into a buffer of its own that keeps the
//! capacity of the largest frame it ever wrote, up to 16 KiB per direction for as long as the
//! session lives, and tokio's BufWriter keeps its whole buffer from the start.) Large frames
//! skip the buffer and go out in one vectored write, header and payload together.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use fastwebsockets::{Frame, OpCode, Role, WebSocketError};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Wire;

/// Writes at least this large go straight to the socket once the buffer is empty.
const DIRECT_WRITE_BYTES: usize = 16 * 1024;
/// A burst is pushed out once this much has been buffered, even before the flush.
const MAX_BUFFERED_BYTES: usize = 64 * 1024;
/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEAD_BYTES: usize = 14;

pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    written: usize,
    /// Client role: every frame is masked (RFC 6455 5.3).
    masks: bool,
    /// A Close went out; nothing else may follow it.
    closed: bool,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer for the side of the connection `role` names (a server's frames are unmasked).
    pub fn new(inner: W, role: Role) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
            written: 0,
            masks: role == Role::Client,
            closed: false,
        }
    }

    /// Queue `frame` (or write it out now if it is large); nothing is sent before
    /// [`FrameWriter::flush`] unless the buffer fills. Its payload is plain: a client writer
    /// masks it under a fresh key (RFC 6455 5.3), whatever key the frame came with.
    pub async fn write_frame(&mut self, frame: Frame<'_>) -> Result<(), WebSocketError> {
        self.write_forwarded(frame, Wire::default()).await
    }

    /// As [`FrameWriter::write_frame`] for a frame passed on as `wire` says: a payload
    /// already masked under `frame.mask` (a client writer only) is written as it is, a
    /// compressed one keeps RSV1.
    pub async fn write_forwarded(
        &mut self,
        frame: Frame<'_>,
        wire: Wire,
    ) -> Result<(), WebSocketError> {
        let total = self.check(&frame)?;
        if self.buf.len() + total > MAX_BUFFERED_BYTES {
            std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
        }
        if self.buf.is_empty() && total >= DIRECT_WRITE_BYTES {
            // The header alone is queued: it goes out in one vectored write with the payload.
            let mut frame = self.prepare(frame, wire.premasked);
            self.append_head(&mut frame, wire.compressed);
            self.write_raw(&frame.payload).await?;
        } else {
            self.append(frame, wire);
        }
        Ok(())
    }

    /// Queue `frame` if that needs no waiting: it is small and fits in the buffer (most
    /// frames). Otherwise the frame comes back untouched, for [`FrameWriter::write_frame`]
    /// (or [`FrameWriter::write_premasked`]). This keeps the caller's future small: it need not
    /// hold a write in flight.
    pub fn try_queue<'f>(
        &mut self,
        frame: Frame<'f>,
        wire: Wire,
    ) -> Result<Option<Frame<'f>>, WebSocketError> {
        let total = self.check(&frame)?;
        if total >= DIRECT_WRITE_BYTES || self.buf.len() + total > MAX_BUFFERED_BYTES {
            return Ok(Some(frame));
        }
        self.append(frame, wire);
        Ok(None)
    }

    /// The frame's size on the wire, if it may be written at all.
    fn check(&self, frame: &Frame<'_>) -> Result<usize, WebSocketError> {
        if self.closed {
            return Err(WebSocketError::ConnectionClosed);
        }
        let len = frame.payload.len();
        let length_bytes = match len {
            0..=125 => 0,
            126..=0xffff => 2,
            _ => 8,
        };
        Ok(2 + length_bytes + if self.masks { 4 } else { 0 } + len)
    }

    /// Mask the frame under a fresh key if this side masks (unless it is `premasked`), and
    /// note a Close.
    fn prepare<'f>(&mut self, frame: Frame<'f>, premasked: bool) -> Frame<'f> {
        self.closed = frame.opcode == OpCode::Close;
        if !self.masks {
            // A server's frames carry no mask, whatever the frame came with.
            return Frame::new(frame.fin, frame.opcode, None, frame.payload);
        }
        if premasked {
            return frame;
        }
        let mut frame = Frame::new(
            frame.fin,
            frame.opcode,
            Some(super::fresh_mask()),
            frame.payload,
        );
        frame.mask();
        frame
    }

    fn append(&mut self, frame: Frame<'_>, wire: Wire) {
        let mut frame = self.prepare(frame, wire.premasked);
        self.buf.reserve(MAX_HEAD_BYTES + frame.payload.len());
        self.append_head(&mut frame, wire.compressed);
        self.buf.extend_from_slice(&frame.payload);
    }

    /// Queue the header of a prepared frame, with RSV1 if it opens a compressed message.
    fn append_head(&mut self, frame: &mut Frame<'_>, compressed: bool) {
        let mut head = [0u8; MAX_HEAD_BYTES];
        let head_len = frame.fmt_head(&mut head);
        if compressed {
            head[0] |= 0x40;
        }
        self.buf.extend_from_slice(&head[..head_len]);
    }

    /// Queue a streamed frame's header: its payload follows through
    /// [`FrameWriter::write_raw`], and the header goes out with its first bytes.
    pub fn queue_raw_head(&mut self, head: &[u8]) -> Result<(), WebSocketError> {
        if self.closed {
            return Err(WebSocketError::ConnectionClosed);
        }
        self.buf.extend_from_slice(head);
        Ok(())
    }

    /// Write out what is queued, then `bytes` (part of a streamed payload, sent as it is: a
    /// masked client payload keeps its mask), in vectored writes.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), WebSocketError> {
        let mut sent = 0;
        std::future::poll_fn(|cx| self.poll_write_after_buffer(cx, bytes, &mut sent)).await?;
        Ok(())
    }

    fn poll_write_after_buffer(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
        sent: &mut usize,
    ) -> Poll<io::Result<()>> {
        loop {
            let queued = &self.buf[self.written..];
            let rest = &bytes[*sent..];
            let n = if queued.is_empty() {
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?
            } else {
                let slices = [io::IoSlice::new(queued), io::IoSlice::new(rest)];
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_queue = n.min(queued.len());
            self.written += from_queue;
            *sent += n - from_queue;
            if from_queue > 0 && self.written == self.buf.len() {
                self.buf = Vec::new();
                self.written = 0;
            }
        }
    }

    /// Write out everything queued.
    pub async fn flush(&mut self) -> Result<(), WebSocketError> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
        self.inner.flush().await?;
        Ok(())
    }

    /// Write out everything queued, then half-close.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
        self.inner.shutdown().await
    }

    /// The underlying writer (bytes written to it directly go out after what is queued only
    /// once [`FrameWriter::flush`] has run).
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying writer; anything still queued is dropped.
    pub fn into_inner(self) -> W {
        self.inner
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::FrameReader;
    use fastwebsockets::Payload;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn small_frames_wait_for_flush_and_large_ones_pass_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, Role::Server);
        w.write_frame(Frame::text(Payload::Borrowed(b"one")))
            .await
            .unwrap();
        w.write_frame(Frame::binary(Payload::Borrowed(b"two")))
            .await
            .unwrap();
        let mut probe = [0u8; 1];
        let nothing_yet =
            tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut probe)).await;
        assert!(nothing_yet.is_err(), "small frames must wait for the flush");
        let big = vec![b'x'; 70_000];
        w.write_frame(Frame::binary(Payload::Borrowed(&big)))
            .await
            .unwrap();
        w.write_frame(Frame::text(Payload::Borrowed(b"end")))
            .await
            .unwrap();
        w.flush().await.unwrap();
        assert!(w.buf.capacity() == 0, "the buffer is freed once flushed");
        w.shutdown().await.unwrap();
        drop(w);

        let mut frames = FrameReader::new(Role::Client, 1 << 20);
        for (opcode, payload) in [
            (OpCode::Text, &b"one"[..]),
            (OpCode::Binary, b"two"),
            (OpCode::Binary, &big),
            (OpCode::Text, b"end"),
        ] {
            let frame = frames.read_frame(&mut b).await.unwrap();
            assert_eq!((frame.opcode, &frame.payload[..]), (opcode, payload));
        }
    }

    #[tokio::test]
    async fn a_client_masks_every_frame_and_nothing_follows_a_close() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, Role::Client);
        for size in [5, 300, 20_000] {
            let payload = vec![b'p'; size];
            w.write_frame(Frame::binary(Payload::Owned(payload)))
                .await
                .unwrap();
        }
        w.write_frame(Frame::close(1000, b"bye")).await.unwrap();
        let after_close = w.write_frame(Frame::text(Payload::Borrowed(b"late"))).await;
        assert!(matches!(after_close, Err(WebSocketError::ConnectionClosed)));
        w.shutdown().await.unwrap();
        drop(w);

        let mut wire = Vec::new();
        b.read_to_end(&mut wire).await.unwrap();
        // Read as a server, which fails on any unmasked frame.
        let mut source = &wire[..];
        let mut frames = FrameReader::new(Role::Server, 1 << 20);
        for size in [5, 300, 20_000] {
            let frame = frames.read_frame(&mut source).await.unwrap();
            assert_eq!(&frame.payload[..], &vec![b'p'; size][..]);
        }
        let close = frames.read_frame(&mut source).await.unwrap();
        assert_eq!(close.opcode, OpCode::Close);
        assert!(
            frames.read_frame(&mut source).await.is_err(),
            "nothing after the close"
        );
    }

    #[tokio::test]
    async fn try_queue_takes_small_frames_and_hands_back_large_ones() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, Role::Server);
        assert!(w
            .try_queue(Frame::text(Payload::Borrowed(b"small")), Wire::default())
            .unwrap()
            .is_none());
        let big = vec![b'x'; DIRECT_WRITE_BYTES];
        let back = w
            .try_queue(Frame::binary(Payload::Borrowed(&big)), Wire::default())
            .unwrap();
        let back = back.expect("a large frame is not queued");
        assert_eq!(back.payload.len(), big.len());
        w.write_frame(back).await.unwrap();
        w.write_frame(Frame::close(1000, b"")).await.unwrap();
        assert!(matches!(
            w.try_queue(Frame::text(Payload::Borrowed(b"late")), Wire::default()),
            Err(WebSocketError::ConnectionClosed)
        ));
        w.shutdown().await.unwrap();
        drop(w);

        let mut frames = FrameReader::new(Role::Client, 1 << 20);
        for (opcode, len) in [
            (OpCode::Text, 5),
            (OpCode::Binary, big.len()),
            (OpCode::Close, 2),
        ] {
            let frame = frames.read_frame(&mut b).await.unwrap();
            assert_eq!((frame.opcode, frame.payload.len()), (opcode, len));
        }
    }
}
