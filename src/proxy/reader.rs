//! The read side of a WebSocket connection, built for a proxy: frames come out one at a time,
//! unchanged in type and fragmentation, with their payload borrowed from one read buffer.
//!
//! Why not fastwebsockets' reader: its read future is not cancel-safe, its buffer is 8 KiB for
//! the life of the connection (an idle proxy session would hold two), and each frame's payload
//! is split off a `BytesMut`, an allocation per frame. Here bytes read stay in the reader
//! until they form a whole frame, so a waiting read can be dropped at any time; the buffer can
//! be freed whenever it holds no partial frame; and a frame costs no allocation.
//!
//! Checks, as fastwebsockets makes them (auto-close and auto-pong off): reserved bits, opcode,
//! fragmented control frames, ping payloads over 125 bytes, the frame size limit, UTF-8 of
//! unfragmented text frames. And two it does not: no control frame may carry over 125 bytes
//! (fastwebsockets checks pings only), and a server fails a client's frame that is not masked
//! (RFC 6455 5.1).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError};
use tokio::io::{AsyncRead, ReadBuf};

/// The error a server-side read fails with when a client frame arrives unmasked.
#[derive(Debug)]
pub struct UnmaskedFrame;

impl std::fmt::Display for UnmaskedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client frame is not masked")
    }
}

impl std::error::Error for UnmaskedFrame {}

/// Whether `error` is the one a server-side read raises for an unmasked client frame.
pub fn is_unmasked_frame(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<UnmaskedFrame>())
}

/// Room made for a read when the frame needs less: small frames arrive a few per read.
const READ_BYTES: usize = 8 * 1024;

/// Binary and continuation frames at least this large are streamed by
/// [`FrameReader::poll_frame_or_stream`]: handed on as their payload arrives instead of once
/// whole, so a session never buffers a large frame (up to `max_frame_bytes`) in memory.
/// Smaller frames stay whole: one write per frame is faster for them (64 KiB echoes measured
/// 5 % slower when streamed). Text frames are always whole: their UTF-8 is checked first.
pub const STREAM_BYTES: usize = 256 * 1024;
const _: () = assert!(
    STREAM_BYTES > 0xffff,
    "start_stream writes the 8-byte length form"
);
/// Read size while a streamed payload comes in.
const STREAM_READ_BYTES: usize = 256 * 1024;

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    head_len: usize,
    payload_len: usize,
    /// Handed out before its payload is in: see [`FrameReader::start_stream`].
    streamed: bool,
}

impl Head {
    pub fn is_streamed(&self) -> bool {
        self.streamed
    }

    pub fn payload_len(&self) -> usize {
        self.payload_len
    }
}

/// The header of a streamed frame, as it goes on to the other side: the same fin bit, opcode,
/// mask key and length (in the shortest length form, whatever form the sender used).
pub struct StreamedHead {
    bytes: [u8; 14],
    len: usize,
    pub mask: Option<[u8; 4]>,
    pub payload_len: usize,
}

impl StreamedHead {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

pub struct FrameReader {
    /// Bytes read; those before `start` were handed out already.
    buf: Vec<u8>,
    start: usize,
    /// Server side: every frame must be masked.
    requires_mask: bool,
    max_frame_bytes: usize,
}

impl FrameReader {
    /// A reader for the side of the connection `role` names; frames longer than
    /// `max_frame_bytes` fail with [`WebSocketError::FrameTooLarge`].
    pub fn new(role: Role, max_frame_bytes: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            requires_mask: role == Role::Server,
            max_frame_bytes,
        }
    }

    /// Every byte read so far belongs to a frame already handed out.
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    /// Free the buffer if it holds no partial frame (an idle session then holds none).
    pub fn release(&mut self) {
        if self.is_empty() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// Read until a whole frame is buffered, and return its header; [`FrameReader::take`]
    /// then hands the frame out. Cancel-safe: bytes read stay in the reader.
    pub fn poll_frame<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
    ) -> Poll<Result<Head, WebSocketError>> {
        self.poll_head(cx, source, false)
    }

    /// As [`FrameReader::poll_frame`], but a large binary or continuation frame comes out as
    /// soon as its header is in (marked [`Head::is_streamed`]): a proxy can pass it on while
    /// the rest arrives, and never buffers more of it than one read.
    pub fn poll_frame_or_stream<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
    ) -> Poll<Result<Head, WebSocketError>> {
        self.poll_head(cx, source, true)
    }

    fn poll_head<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
        may_stream: bool,
    ) -> Poll<Result<Head, WebSocketError>> {
        loop {
            let need = match self.parse_head()? {
                Some(mut head) => {
                    if may_stream && self.streams(&head) {
                        head.streamed = true;
                        return Poll::Ready(Ok(head));
                    }
                    let frame_len = head.head_len + head.payload_len;
                    if self.buf.len() - self.start >= frame_len {
                        return Poll::Ready(Ok(head));
                    }
                    frame_len
                }
                None => 14,
            };
            self.make_room(need);
            let spare = self.buf.spare_capacity_mut();
            let mut read = ReadBuf::uninit(spare);
            ready!(Pin::new(&mut *source).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(Err(WebSocketError::UnexpectedEOF));
            }
            let filled = self.buf.len() + n;
            // SAFETY: the read initialised the first `n` bytes of the spare capacity.
            unsafe { self.buf.set_len(filled) };
        }
    }

    /// Whether `head` is one a proxy streams. A frame that arrives masked from a server would
    /// need unmasking on its way, so it is read whole.
    fn streams(&self, head: &Head) -> bool {
        head.payload_len >= STREAM_BYTES
            && matches!(head.opcode, OpCode::Binary | OpCode::Continuation)
            && head.mask.is_some() == self.requires_mask
    }

    /// Begin handing out a streamed frame's payload: returns the header to send on. Then
    /// [`FrameReader::stream_chunk`], [`FrameReader::consume_stream`] and
    /// [`FrameReader::poll_fill`] pass the payload on as it is read, still masked (a client's
    /// frame goes on to the replica under the client's own mask key). The caller counts the
    /// payload bytes still to come (the reader keeps no room for it: every session holds one).
    pub fn start_stream(&mut self, head: Head) -> StreamedHead {
        debug_assert!(head.streamed);
        self.start += head.head_len;
        // Streamed frames are all longer than 0xffff bytes: the 8-byte length form.
        let mut bytes = [0u8; 14];
        bytes[0] = (head.fin as u8) << 7 | head.opcode as u8;
        bytes[1] = if head.mask.is_some() { 0x80 } else { 0 } | 127;
        bytes[2..10].copy_from_slice(&(head.payload_len as u64).to_be_bytes());
        let mut len = 10;
        if let Some(mask) = head.mask {
            bytes[len..len + 4].copy_from_slice(&mask);
            len += 4;
        }
        StreamedHead {
            bytes,
            len,
            mask: head.mask,
            payload_len: head.payload_len,
        }
    }

    /// The streamed payload bytes read and not yet handed out, of the `left` still to come
    /// (empty: call `poll_fill`).
    pub fn stream_chunk(&self, left: usize) -> &[u8] {
        let end = self.buf.len().min(self.start + left);
        &self.buf[self.start..end]
    }

    /// The first `n` bytes of [`FrameReader::stream_chunk`] were passed on.
    pub fn consume_stream(&mut self, n: usize) {
        self.start += n;
    }

    /// Read more of a streamed payload once [`FrameReader::stream_chunk`] is empty.
    /// Cancel-safe; what is read past the payload stays for the next frame.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
    ) -> Poll<Result<(), WebSocketError>> {
        debug_assert!(self.is_empty());
        self.buf.clear();
        self.start = 0;
        if self.buf.capacity() < STREAM_READ_BYTES {
            self.buf.reserve_exact(STREAM_READ_BYTES);
        }
        let mut read = ReadBuf::uninit(self.buf.spare_capacity_mut());
        ready!(Pin::new(&mut *source).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        if n == 0 {
            return Poll::Ready(Err(WebSocketError::UnexpectedEOF));
        }
        // SAFETY: the read initialised the first `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(n) };
        Poll::Ready(Ok(()))
    }

    /// Hand out the frame [`FrameReader::poll_frame`] found, its payload unmasked.
    pub fn take(&mut self, head: Head) -> Result<Frame<'_>, WebSocketError> {
        debug_assert!(!head.streamed);
        let payload_start = self.start + head.head_len;
        self.start = payload_start + head.payload_len;
        let payload = &mut self.buf[payload_start..self.start];
        if let Some(mask) = head.mask {
            fastwebsockets::unmask(payload, mask);
        }
        if head.opcode == OpCode::Text && head.fin && std::str::from_utf8(payload).is_err() {
            return Err(WebSocketError::InvalidUTF8);
        }
        Ok(Frame::new(
            head.fin,
            head.opcode,
            head.mask,
            Payload::BorrowedMut(payload),
        ))
    }

    /// The next frame.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        source: &mut R,
    ) -> Result<Frame<'_>, WebSocketError> {
        let head = std::future::poll_fn(|cx| self.poll_frame(cx, source)).await?;
        self.take(head)
    }

    /// The header of the frame at `start`, once its bytes are in.
    fn parse_head(&self) -> Result<Option<Head>, WebSocketError> {
        let bytes = &self.buf[self.start..];
        let [first, second, ..] = *bytes else {
            return Ok(None);
        };
        let masked = second & 0x80 != 0;
        if self.requires_mask && !masked {
            return Err(io::Error::new(io::ErrorKind::InvalidData, UnmaskedFrame).into());
        }
        if first & 0x70 != 0 {
            return Err(WebSocketError::ReservedBitsNotZero);
        }
        let fin = first & 0x80 != 0;
        let opcode = OpCode::try_from(first & 0x0f)?;
        let length_bytes = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let head_len = 2 + length_bytes + if masked { 4 } else { 0 };
        if bytes.len() < head_len {
            return Ok(None);
        }
        let payload_len = match length_bytes {
            0 => u64::from(second & 0x7f),
            2 => u64::from(u16::from_be_bytes([bytes[2], bytes[3]])),
            _ => u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes")),
        };
        let mask = masked.then(|| bytes[head_len - 4..head_len].try_into().expect("4 bytes"));
        if matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong) && !fin {
            return Err(WebSocketError::ControlFrameFragmented);
        }
        if payload_len > 125 {
            // RFC 6455 5.5: no control frame carries more.
            match opcode {
                OpCode::Ping => return Err(WebSocketError::PingFrameTooLarge),
                OpCode::Close => return Err(WebSocketError::InvalidCloseFrame),
                OpCode::Pong => return Err(WebSocketError::InvalidValue),
                _ => {}
            }
        }
        if payload_len > self.max_frame_bytes as u64 {
            return Err(WebSocketError::FrameTooLarge);
        }
        Ok(Some(Head {
            fin,
            opcode,
            mask,
            head_len,
            payload_len: payload_len as usize,
            streamed: false,
        }))
    }

    /// Room for a frame of `frame_len` bytes at the front of the buffer, and a read's worth.
    fn make_room(&mut self, frame_len: usize) {
        if self.start > 0 {
            // What is left is a partial frame: small, unless a large frame is arriving, and
            // then it was moved when its first bytes came in.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let want = frame_len.max(READ_BYTES);
        if self.buf.capacity() < want {
            self.buf.reserve_exact(want - self.buf.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            len @ 0..=125 => frame.push(mask_bit | len as u8),
            len @ 126..=0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let mut payload = payload.to_vec();
        if let Some(key) = mask {
            frame.extend_from_slice(&key);
            fastwebsockets::unmask(&mut payload, key);
        }
        frame.extend_from_slice(&payload);
        frame
    }

    /// A source that hands out `chunk` bytes per read.
    struct Trickle<'a> {
        bytes: &'a [u8],
        chunk: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.chunk.min(self.bytes.len()).min(buf.remaining());
            buf.put_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_of_every_length_form_come_out_whole_in_any_split() {
        let sizes = [0usize, 5, 125, 126, 300, 70_000];
        let stream: Vec<u8> = sizes
            .iter()
            .map(|&len| frame_bytes(0x2, &vec![0x82; len], Some([1, 2, 3, 4])))
            .collect::<Vec<_>>()
            .concat();
        for chunk in [1, 3, 7, 4096, stream.len()] {
            let mut source = Trickle {
                bytes: &stream,
                chunk,
            };
            let mut frames = FrameReader::new(Role::Server, 1 << 20);
            for &len in &sizes {
                let frame = frames.read_frame(&mut source).await.unwrap();
                assert_eq!(frame.opcode, OpCode::Binary);
                assert_eq!(
                    &frame.payload[..],
                    &vec![0x82; len][..],
                    "chunks of {chunk}"
                );
            }
            assert!(frames.is_empty());
            assert!(matches!(
                frames.read_frame(&mut source).await,
                Err(WebSocketError::UnexpectedEOF)
            ));
        }
    }

    #[tokio::test]
    async fn a_server_fails_an_unmasked_client_frame() {
        let mut stream = frame_bytes(0x1, b"masked", Some([9, 8, 7, 6]));
        stream.extend(frame_bytes(0x1, b"bare", None));
        let mut source = &stream[..];
        let mut frames = FrameReader::new(Role::Server, 1 << 20);
        assert_eq!(
            &frames.read_frame(&mut source).await.unwrap().payload[..],
            b"masked"
        );
        match frames.read_frame(&mut source).await {
            Err(WebSocketError::IoError(e)) => assert!(is_unmasked_frame(&e)),
            other => panic!(
                "expected the unmasked-frame error, got {:?}",
                other.map(|f| f.opcode)
            ),
        }
    }

    #[tokio::test]
    async fn broken_frames_fail_with_the_matching_error() {
        type Expected = fn(&WebSocketError) -> bool;
        let cases: [(Vec<u8>, Expected); 7] = [
            (vec![0xC2, 0x00], |e| {
                matches!(e, WebSocketError::ReservedBitsNotZero)
            }),
            (vec![0x83, 0x00], |e| {
                matches!(e, WebSocketError::InvalidValue)
            }),
            (vec![0x09, 0x00], |e| {
                matches!(e, WebSocketError::ControlFrameFragmented)
            }),
            (frame_bytes(0x9, &[0; 126], None), |e| {
                matches!(e, WebSocketError::PingFrameTooLarge)
            }),
            (frame_bytes(0x8, &[0x03; 126], None), |e| {
                matches!(e, WebSocketError::InvalidCloseFrame)
            }),
            (frame_bytes(0xA, &[0; 126], None), |e| {
                matches!(e, WebSocketError::InvalidValue)
            }),
            (frame_bytes(0x1, &[0xff, 0xfe], None), |e| {
                matches!(e, WebSocketError::InvalidUTF8)
            }),
        ];
        for (bytes, expected) in cases {
            let mut frames = FrameReader::new(Role::Client, 1 << 20);
            let result = frames.read_frame(&mut &bytes[..]).await;
            match result {
                Err(e) => assert!(expected(&e), "{bytes:x?}: {e:?}"),
                Ok(frame) => panic!("{bytes:x?} passed as {:?}", frame.opcode),
            }
        }
        // The size limit is inclusive.
        let mut frames = FrameReader::new(Role::Client, 100);
        let at_limit = frame_bytes(0x2, &[0; 100], None);
        assert!(frames.read_frame(&mut &at_limit[..]).await.is_ok());
        let over = frame_bytes(0x2, &[0; 101], None);
        assert!(matches!(
            frames.read_frame(&mut &over[..]).await,
            Err(WebSocketError::FrameTooLarge)
        ));
    }

    #[tokio::test]
    async fn the_buffer_is_freed_only_between_frames() {
        let stream = frame_bytes(0x2, &[7; 300], None);
        let mut frames = FrameReader::new(Role::Client, 1 << 20);
        let mut first_half = &stream[..100];
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        // The source runs dry mid-frame: the partial frame must survive a release.
        let mut source = tokio::io::AsyncReadExt::chain(&mut first_half, tokio_pending());
        assert!(frames.poll_frame(&mut cx, &mut source).is_pending());
        frames.release();
        assert!(!frames.is_empty() && frames.buf.capacity() > 0);
        let mut rest = &stream[100..];
        let frame = frames.read_frame(&mut rest).await.unwrap();
        assert_eq!(&frame.payload[..], &[7; 300][..]);
        frames.release();
        assert_eq!(frames.buf.capacity(), 0, "nothing held between frames");
    }

    /// A source that never has bytes.
    fn tokio_pending() -> impl AsyncRead + Unpin {
        struct Pending;
        impl AsyncRead for Pending {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Pending
            }
        }
        Pending
    }
}
