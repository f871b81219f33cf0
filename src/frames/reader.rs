//! The read side of a WebSocket connection, built for a proxy: frames come out one at a time,
//! unchanged in type and fragmentation, with their payload borrowed from one read buffer.
//!
//! Why not fastwebsockets' reader: its read future is not cancel-safe, its buffer is 8 KiB for
//! the life of the connection (an idle proxy session would hold two), each frame's payload is
//! split off a `BytesMut` (an allocation per frame), and it reserves a frame's claimed length
//! before the bytes arrive. Here bytes read stay in the reader until they form a whole frame,
//! so a waiting read can be dropped at any time; the buffer is freed whenever it holds no
//! partial frame; it grows only as bytes arrive (to at most 8 times what a peer has sent); and
//! large frames of every data kind are streamed, never held whole.
//!
//! Checks: reserved bits (RSV1 only opens a compressed message, and only where
//! permessage-deflate was negotiated: see [`FrameReader::compressed`]), opcode, fragmented control frames, control frames over 125 bytes,
//! the frame size limit, the mask (a server's frames must not be masked, a client's must be:
//! RFC 6455 5.1), and UTF-8 of text messages, across fragments and reads.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError};
use tokio::io::{AsyncRead, ReadBuf};

use super::utf8::Utf8Stream;

/// The error a read fails with when a frame's mask breaks RFC 6455 5.1.
#[derive(Debug)]
struct MaskViolation(&'static str);

impl std::fmt::Display for MaskViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for MaskViolation {}

/// Whether `error` is the one a read raises for a frame masked the wrong way (close 1002).
pub fn is_mask_violation(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<MaskViolation>())
}

fn mask_violation(what: &'static str) -> WebSocketError {
    io::Error::new(io::ErrorKind::InvalidData, MaskViolation(what)).into()
}

/// Room made for a read when nothing says more is coming: small frames arrive a few per read.
const READ_BYTES: usize = 8 * 1024;

/// Data frames at least this large are streamed by [`FrameReader::poll_frame`]:
/// handed on as their payload arrives instead of once whole, so a session never buffers more
/// than this of one frame (up to `max_frame_bytes`). Smaller frames stay whole: one write per
/// frame is faster for them (64 KiB echoes measured 5 % slower when streamed).
pub const STREAM_BYTES: usize = 256 * 1024;
const _: () = assert!(
    STREAM_BYTES > 0xffff,
    "start_stream writes the 8-byte length form"
);
/// Most bytes one read of a streamed payload asks for.
const STREAM_READ_BYTES: usize = 256 * 1024;

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    head_len: usize,
    payload_len: usize,
    /// RSV1: the first frame of a permessage-deflate message.
    compressed: bool,
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

/// A frame handed out whole.
pub struct Taken<'a> {
    pub frame: Frame<'a>,
    /// What the writer must carry over besides the frame's fields.
    pub wire: Wire,
}

/// How a forwarded frame goes back on the wire, beyond what [`Frame`] holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wire {
    /// The payload is still masked, under the frame's mask (re-keyed, never unmasked): write
    /// it as it is.
    pub premasked: bool,
    /// RSV1 set: the first frame of a compressed message, passed on compressed.
    pub compressed: bool,
}

/// A streamed frame on its way: the header to send on (same fin bit, opcode and length, the
/// new mask key when the frame is re-keyed), and what its payload pieces need.
pub struct StreamedHead {
    bytes: [u8; 14],
    len: usize,
    pub payload_len: usize,
    /// The sender's mask key, and the one the frame goes on with.
    keys: Option<([u8; 4], [u8; 4])>,
    /// Its payload is text (a text frame, or a continuation of a text message).
    text: bool,
    fin: bool,
}

impl StreamedHead {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The key the payload goes on under (`None`: unmasked).
    pub fn mask(&self) -> Option<[u8; 4]> {
        self.keys.map(|(_, new)| new)
    }

    /// The payload passes as it came: unmasked, and not text to be checked.
    pub fn passes_as_is(&self) -> bool {
        self.keys.is_none() && !self.text
    }
}

pub struct FrameReader {
    /// Bytes read; those before `start` were handed out already.
    buf: Vec<u8>,
    start: usize,
    max_frame_bytes: usize,
    /// The open text message's UTF-8 state (kept in what would be padding).
    text: Utf8Stream,
    /// Server side: every frame must be masked; client side: none may be.
    requires_mask: bool,
    /// A fragmented text message is open: its continuations are text.
    in_text: bool,
    /// permessage-deflate was negotiated: a data message may open with RSV1 set.
    compression: bool,
}

impl FrameReader {
    /// A reader for the side of the connection `role` names; frames longer than
    /// `max_frame_bytes` fail with [`WebSocketError::FrameTooLarge`].
    pub fn new(role: Role, max_frame_bytes: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            max_frame_bytes,
            text: Utf8Stream::default(),
            requires_mask: role == Role::Server,
            in_text: false,
            compression: false,
        }
    }

    /// Accept compressed messages (permessage-deflate was negotiated): RSV1 on a message's
    /// first frame. Their payload is passed on as it came; a compressed text message cannot be
    /// checked for UTF-8 without inflating it, so that check is left to the endpoints.
    pub fn compressed(mut self, negotiated: bool) -> Self {
        self.compression = negotiated;
        self
    }

    /// Every byte read so far belongs to a frame already handed out.
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    /// Whether the reader holds a buffer at all.
    pub fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
    }

    /// Free the buffer if it holds no partial frame (an idle session then holds none).
    pub fn release(&mut self) {
        if self.is_empty() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// Read until a whole frame is buffered, and return its header; [`FrameReader::take`]
    /// then hands the frame out. A large data frame comes out as soon as its header is in
    /// (marked [`Head::is_streamed`]): a proxy passes it on while the rest arrives, and never
    /// buffers more of it than one read. Cancel-safe: bytes read stay in the reader.
    pub fn poll_frame<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
    ) -> Poll<Result<Head, WebSocketError>> {
        loop {
            let frame_len = match self.parse_head()? {
                Some(mut head) => {
                    if self.streams(&head) {
                        head.streamed = true;
                        return Poll::Ready(Ok(head));
                    }
                    let frame_len = head.head_len + head.payload_len;
                    if self.buf.len() - self.start >= frame_len {
                        return Poll::Ready(Ok(head));
                    }
                    Some(frame_len)
                }
                None => None,
            };
            self.make_room(frame_len);
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

    /// Whether `head` is one a proxy streams: every data frame from [`STREAM_BYTES`] up.
    fn streams(&self, head: &Head) -> bool {
        head.payload_len >= STREAM_BYTES
            && matches!(
                head.opcode,
                OpCode::Binary | OpCode::Text | OpCode::Continuation
            )
    }

    /// Whether a data frame starting with `head` carries text to check (uncompressed), and
    /// note where the message stands (a text or binary frame opens one; a final frame closes
    /// it).
    fn enter_frame(&mut self, head: &Head) -> bool {
        let text = match head.opcode {
            OpCode::Text => {
                self.text.reset();
                !head.compressed
            }
            OpCode::Binary => false,
            OpCode::Continuation => self.in_text,
            // Control frames may come between fragments; they leave the message as it is.
            _ => return false,
        };
        self.in_text = text && !head.fin;
        text
    }

    /// Hand out the frame [`FrameReader::poll_frame`] found, its payload unmasked and, if it
    /// is text, checked.
    pub fn take(&mut self, head: Head) -> Result<Frame<'_>, WebSocketError> {
        Ok(self.take_rekeyed(head, None)?.frame)
    }

    /// Hand out the frame found. With `new_key`, a masked frame that need not be read (binary
    /// data) is moved to that key in one pass instead of being unmasked ([`Wire::premasked`]);
    /// anything else comes out unmasked, text checked.
    pub fn take_rekeyed(
        &mut self,
        head: Head,
        new_key: Option<[u8; 4]>,
    ) -> Result<Taken<'_>, WebSocketError> {
        debug_assert!(!head.streamed);
        let text = self.enter_frame(&head);
        let payload_start = self.start + head.head_len;
        self.start = payload_start + head.payload_len;
        let payload = &mut self.buf[payload_start..self.start];
        let compressed = head.compressed;
        let premasked = match (head.mask, new_key) {
            (Some(old), Some(new)) if !text && is_data(head.opcode) => {
                super::rekey(payload, old, new, 0);
                true
            }
            (Some(old), _) => {
                fastwebsockets::unmask(payload, old);
                false
            }
            (None, _) => false,
        };
        if text {
            let last = head.fin;
            if !self.text.feed(payload, last) {
                return Err(WebSocketError::InvalidUTF8);
            }
        }
        let mask = if premasked { new_key } else { head.mask };
        Ok(Taken {
            frame: Frame::new(head.fin, head.opcode, mask, Payload::BorrowedMut(payload)),
            wire: Wire {
                premasked,
                compressed,
            },
        })
    }

    /// Begin handing out a streamed frame's payload: returns the header to send on, under
    /// `new_key` if the frame is masked (the router re-keys what it forwards as a client).
    /// Then [`FrameReader::stream_chunk`], [`FrameReader::consume_stream`] and
    /// [`FrameReader::poll_fill`] pass the payload on as it is read. The caller counts the
    /// payload bytes still to come (the reader keeps no room for it: every session holds one).
    pub fn start_stream(&mut self, head: Head, new_key: Option<[u8; 4]>) -> StreamedHead {
        debug_assert!(head.streamed);
        let text = self.enter_frame(&head);
        self.start += head.head_len;
        let keys = head.mask.map(|old| (old, new_key.unwrap_or(old)));
        // Streamed frames are all longer than 0xffff bytes: the 8-byte length form.
        let mut bytes = [0u8; 14];
        bytes[0] = (head.fin as u8) << 7 | (head.compressed as u8) << 6 | head.opcode as u8;
        bytes[1] = if keys.is_some() { 0x80 } else { 0 } | 127;
        bytes[2..10].copy_from_slice(&(head.payload_len as u64).to_be_bytes());
        let mut len = 10;
        if let Some((_, new)) = keys {
            bytes[len..len + 4].copy_from_slice(&new);
            len += 4;
        }
        StreamedHead {
            bytes,
            len,
            payload_len: head.payload_len,
            keys,
            text,
            fin: head.fin,
        }
    }

    /// The streamed payload bytes read and not yet handed out, of the `left` still to come,
    /// made ready to send: re-keyed, and checked if text (empty: call `poll_fill`). Call it
    /// once per piece, then [`FrameReader::consume_stream`] with the piece's length.
    pub fn stream_chunk(
        &mut self,
        head: &StreamedHead,
        left: usize,
    ) -> Result<&[u8], WebSocketError> {
        let end = self.buf.len().min(self.start + left);
        let done = head.payload_len - left;
        let last = head.fin && end - self.start == left;
        let (start, text) = (self.start, head.text);
        if text {
            let piece = &mut self.buf[start..end];
            if let Some((old, _)) = head.keys {
                super::apply_mask(piece, old, done);
            }
            if !self.text.feed(&self.buf[start..end], last) {
                return Err(WebSocketError::InvalidUTF8);
            }
            if let Some((_, new)) = head.keys {
                super::apply_mask(&mut self.buf[start..end], new, done);
            }
        } else if let Some((old, new)) = head.keys {
            if old != new {
                super::rekey(&mut self.buf[start..end], old, new, done);
            }
        }
        Ok(&self.buf[start..end])
    }

    /// The streamed payload bytes read and not yet handed out, of `left`, as they are (for
    /// discarding).
    pub fn stream_raw(&self, left: usize) -> usize {
        self.buf.len().min(self.start + left) - self.start
    }

    /// The first `n` bytes of [`FrameReader::stream_chunk`] were passed on.
    pub fn consume_stream(&mut self, n: usize) {
        self.start += n;
    }

    /// Read more of a streamed payload, of which `left` bytes are still to come, once
    /// [`FrameReader::stream_chunk`] is empty. Cancel-safe; what is read past the payload
    /// stays for the next frame.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
        left: usize,
    ) -> Poll<Result<(), WebSocketError>> {
        debug_assert!(self.is_empty());
        self.buf.clear();
        self.start = 0;
        // No more room than the frame still needs (a read's worth at least, so small frames
        // behind it come in with the same read).
        let want = left.clamp(READ_BYTES, STREAM_READ_BYTES);
        if self.buf.capacity() < want {
            self.buf.reserve_exact(want);
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

    /// The next frame, whole, for readers that do not stream (tests). A frame that would be streamed
    /// fails with [`WebSocketError::FrameTooLarge`]: use [`FrameReader::poll_frame`].
    #[cfg(test)]
    pub async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        source: &mut R,
    ) -> Result<Frame<'_>, WebSocketError> {
        let head = std::future::poll_fn(|cx| self.poll_frame(cx, source)).await?;
        if head.streamed {
            return Err(WebSocketError::FrameTooLarge);
        }
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
            return Err(mask_violation("client frame is not masked"));
        }
        if !self.requires_mask && masked {
            return Err(mask_violation("server frame is masked"));
        }
        let fin = first & 0x80 != 0;
        let opcode = OpCode::try_from(first & 0x0f)?;
        // RFC 7692 6: RSV1 marks a compressed message on its first frame only.
        let compressed = first & 0x70 == 0x40
            && self.compression
            && matches!(opcode, OpCode::Text | OpCode::Binary);
        if first & 0x70 != 0 && !compressed {
            return Err(WebSocketError::ReservedBitsNotZero);
        }
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
            compressed,
            streamed: false,
        }))
    }

    /// Room for the next read, towards a frame of `frame_len` bytes (`None`: its header is not
    /// in yet). The buffer grows only when a read has filled it, and then to at most
    /// [`GROWTH`] times what it holds (plus a header), never past the frame: a peer that
    /// claims a large frame and sends little of it makes the router hold little, while a
    /// 64 KiB frame behind a full first read grows the buffer once, straight to its size.
    fn make_room(&mut self, frame_len: Option<usize>) {
        if self.start > 0 {
            // What is left is a partial frame: small, or growing as above.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let held = self.buf.len();
        if self.buf.capacity() > held {
            return;
        }
        let target = match frame_len {
            None => READ_BYTES.max(2 * held),
            Some(len) => len.min(GROWTH * held + MAX_HEAD_BYTES).max(READ_BYTES),
        };
        self.buf.reserve_exact(target - held);
    }
}

/// How many times what it holds a full read buffer may grow to (see `make_room`).
const GROWTH: usize = 8;
/// The longest frame header: 2 bytes, 8 of length, 4 of mask.
const MAX_HEAD_BYTES: usize = 14;

fn is_data(opcode: OpCode) -> bool {
    matches!(opcode, OpCode::Binary | OpCode::Text | OpCode::Continuation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut frame = vec![first];
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

    fn final_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        frame_bytes(0x80 | opcode, payload, mask)
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
        let mut stream = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let payload = vec![i as u8; size];
            stream.extend(final_frame(0x2, &payload, Some([1, 2, 3, 4])));
        }
        for chunk in [1, 2, 3, 7, 13, 4096, usize::MAX] {
            let mut source = Trickle {
                bytes: &stream,
                chunk,
            };
            let mut frames = FrameReader::new(Role::Server, 1 << 20);
            for (i, &size) in sizes.iter().enumerate() {
                let frame = frames.read_frame(&mut source).await.unwrap();
                assert_eq!(frame.opcode, OpCode::Binary);
                assert_eq!(
                    &frame.payload[..],
                    &vec![i as u8; size][..],
                    "chunk {chunk}"
                );
            }
        }
    }

    #[tokio::test]
    async fn masks_must_follow_the_role() {
        let unmasked = final_frame(0x2, b"hello", None);
        let mut frames = FrameReader::new(Role::Server, 1 << 20);
        match frames.read_frame(&mut &unmasked[..]).await {
            Err(WebSocketError::IoError(e)) => assert!(is_mask_violation(&e)),
            other => panic!(
                "expected a mask violation, got {:?}",
                other.map(|f| f.opcode)
            ),
        }
        let masked = final_frame(0x2, b"hello", Some([9, 9, 9, 9]));
        let mut frames = FrameReader::new(Role::Client, 1 << 20);
        match frames.read_frame(&mut &masked[..]).await {
            Err(WebSocketError::IoError(e)) => assert!(is_mask_violation(&e)),
            other => panic!(
                "a masked server frame must fail, got {:?}",
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
            (final_frame(0x9, &[0; 126], None), |e| {
                matches!(e, WebSocketError::PingFrameTooLarge)
            }),
            (final_frame(0x8, &[0x03; 126], None), |e| {
                matches!(e, WebSocketError::InvalidCloseFrame)
            }),
            (final_frame(0xA, &[0; 126], None), |e| {
                matches!(e, WebSocketError::InvalidValue)
            }),
            (final_frame(0x1, &[0xff, 0xfe], None), |e| {
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
        let at_limit = final_frame(0x2, &[0; 100], None);
        assert!(frames.read_frame(&mut &at_limit[..]).await.is_ok());
        let over = final_frame(0x2, &[0; 101], None);
        assert!(matches!(
            frames.read_frame(&mut &over[..]).await,
            Err(WebSocketError::FrameTooLarge)
        ));
    }

    #[tokio::test]
    async fn text_is_checked_across_fragments_and_control_frames_between() {
        let euro = "€".as_bytes();
        let key = Some([7, 1, 8, 2]);
        // "€" split over two fragments with a ping in between: valid.
        let mut good = frame_bytes(0x1, &euro[..1], key);
        good.extend(final_frame(0x9, b"ping", key));
        good.extend(frame_bytes(0x0, &euro[1..2], key));
        good.extend(final_frame(0x0, &euro[2..], key));
        let mut frames = FrameReader::new(Role::Server, 1 << 20);
        let mut source = &good[..];
        for _ in 0..4 {
            frames.read_frame(&mut source).await.unwrap();
        }
        // The message ends inside the code point: invalid at its last fragment.
        let mut cut = frame_bytes(0x1, b"ok", key);
        cut.extend(final_frame(0x0, &euro[..2], key));
        let mut frames = FrameReader::new(Role::Server, 1 << 20);
        let mut source = &cut[..];
        frames.read_frame(&mut source).await.unwrap();
        assert!(matches!(
            frames.read_frame(&mut source).await,
            Err(WebSocketError::InvalidUTF8)
        ));
        // Binary continuations are not text.
        let mut binary = frame_bytes(0x2, &[0xff], key);
        binary.extend(final_frame(0x0, &[0xfe], key));
        let mut frames = FrameReader::new(Role::Server, 1 << 20);
        let mut source = &binary[..];
        frames.read_frame(&mut source).await.unwrap();
        frames.read_frame(&mut source).await.unwrap();
    }

    #[tokio::test]
    async fn binary_frames_are_rekeyed_in_one_pass_and_text_is_unmasked() {
        let old = [1, 2, 3, 4];
        let new = [0x55, 0x66, 0x77, 0x88];
        let payload: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        let mut bytes = final_frame(0x2, &payload, Some(old));
        bytes.extend(final_frame(0x1, b"plain text", Some(old)));
        let mut frames = FrameReader::new(Role::Server, 1 << 20);
        let mut source = &bytes[..];
        let head = std::future::poll_fn(|cx| frames.poll_frame(cx, &mut source))
            .await
            .unwrap();
        let taken = frames.take_rekeyed(head, Some(new)).unwrap();
        assert!(taken.wire.premasked);
        let mut expected = payload.clone();
        fastwebsockets::unmask(&mut expected, new);
        assert_eq!(&taken.frame.payload[..], &expected[..]);
        let head = std::future::poll_fn(|cx| frames.poll_frame(cx, &mut source))
            .await
            .unwrap();
        let taken = frames.take_rekeyed(head, Some(new)).unwrap();
        assert!(!taken.wire.premasked, "text is read, so it comes out plain");
        assert_eq!(&taken.frame.payload[..], b"plain text");
    }

    #[tokio::test]
    async fn a_claimed_length_reserves_only_what_arrived() {
        // A text frame claiming 200 KiB of which 100 bytes arrive: the reader may not reserve
        // the claimed length.
        let mut bytes = vec![0x81, 0xff];
        bytes.extend_from_slice(&(200u64 << 10).to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        bytes.extend(std::iter::repeat_n(b'a' ^ 1, 100));
        let mut frames = FrameReader::new(Role::Server, 1 << 30);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut source = tokio::io::AsyncReadExt::chain(&bytes[..], pending());
        assert!(frames.poll_frame(&mut cx, &mut source).is_pending());
        assert!(
            frames.buf.capacity() <= 2 * READ_BYTES,
            "{}",
            frames.buf.capacity()
        );
    }

    #[tokio::test]
    async fn the_buffer_is_freed_only_between_frames() {
        let stream = final_frame(0x2, &[7; 300], None);
        let mut frames = FrameReader::new(Role::Client, 1 << 20);
        let mut first_half = &stream[..100];
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        // The source runs dry mid-frame: the partial frame must survive a release.
        let mut source = tokio::io::AsyncReadExt::chain(&mut first_half, pending());
        assert!(frames.poll_frame(&mut cx, &mut source).is_pending());
        frames.release();
        assert!(!frames.is_empty() && frames.buf.capacity() > 0);
        let mut rest = &stream[100..];
        let frame = frames.read_frame(&mut rest).await.unwrap();
        assert_eq!(&frame.payload[..], &[7; 300][..]);
        frames.release();
        assert_eq!(frames.buf.capacity(), 0, "nothing held between frames");
    }

    #[test]
    fn the_reader_stays_small() {
        // Every session holds two; the UTF-8 state lives in what would be padding.
        assert_eq!(std::mem::size_of::<FrameReader>(), 48);
    }

    /// A source that never has bytes.
    fn pending() -> impl AsyncRead + Unpin {
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
