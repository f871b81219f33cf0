//! Frame boundaries of a byte stream, followed as the bytes pass to fastwebsockets: frame
//! headers are parsed, payloads skipped by count (no copy, no per-byte work on payloads).
//!
//! Two uses. RFC 6455 5.1: a server must fail the connection when a client frame is not
//! masked; fastwebsockets accepts unmasked frames and keeps the mask private. And a pump may
//! drop its idle reader (and the reader's buffer) only when every byte handed to it belongs
//! to a frame it has already returned, which is known here.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The error a client read fails with when a frame arrives unmasked.
#[derive(Debug)]
pub struct UnmaskedFrame;

impl std::fmt::Display for UnmaskedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client frame is not masked")
    }
}

impl std::error::Error for UnmaskedFrame {}

/// Whether `error` is the one [`Tracked`] raises for an unmasked client frame.
pub fn is_unmasked_frame(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<UnmaskedFrame>())
}

/// Where the parser stands in a frame stream.
#[derive(Debug, Default)]
struct FrameCursor {
    /// Bytes of the current frame header seen so far (at most 14).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: u64,
}

impl FrameCursor {
    /// Follow `bytes` through the frame stream; `false` as soon as a header says "unmasked"
    /// when masks are required.
    fn follow(&mut self, mut bytes: &[u8], require_mask: bool) -> bool {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len() as u64) as usize;
                self.payload_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if self.header_len < 2 {
                continue;
            }
            let masked = self.header[1] & 0x80 != 0;
            if require_mask && !masked {
                return false;
            }
            let extended = match self.header[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            if self.header_len < 2 + extended + if masked { 4 } else { 0 } {
                continue;
            }
            self.payload_left = match extended {
                0 => u64::from(self.header[1] & 0x7f),
                2 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                _ => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
            };
            self.header_len = 0;
        }
        true
    }

    /// Every byte followed so far belongs to a complete frame.
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }
}

/// A read half that follows the frames it passes on: fails with [`UnmaskedFrame`] when masks
/// are required and one is missing, and keeps `at_boundary` up to date.
pub struct Tracked<'a, R> {
    inner: &'a mut R,
    cursor: FrameCursor,
    require_mask: bool,
    at_boundary: &'a AtomicBool,
}

impl<'a, R> Tracked<'a, R> {
    /// Start at a frame boundary (a fresh reader holds nothing).
    pub fn new(inner: &'a mut R, require_mask: bool, at_boundary: &'a AtomicBool) -> Self {
        at_boundary.store(true, Ordering::Relaxed);
        Tracked {
            inner,
            cursor: FrameCursor::default(),
            require_mask,
            at_boundary,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Tracked<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut *this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !this
                    .cursor
                    .follow(&buf.filled()[before..], this.require_mask)
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        UnmaskedFrame,
                    )));
                }
                this.at_boundary
                    .store(this.cursor.at_boundary(), Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked_frame(len: usize) -> Vec<u8> {
        let mut frame = vec![0x82];
        match len {
            0..=125 => frame.push(0x80 | len as u8),
            126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[1, 2, 3, 4]);
        // Payload bytes that would look like an unmasked header if they were parsed as one.
        frame.extend(std::iter::repeat_n(0x02, len));
        frame
    }

    #[test]
    fn masked_frames_of_every_length_form_pass_in_any_split() {
        let stream: Vec<u8> = [0, 5, 125, 126, 300, 70_000]
            .into_iter()
            .flat_map(masked_frame)
            .collect();
        for chunk in [1, 3, 7, 4096, stream.len()] {
            let mut cursor = FrameCursor::default();
            assert!(
                stream.chunks(chunk).all(|part| cursor.follow(part, true)),
                "chunks of {chunk}"
            );
            assert!(cursor.at_boundary());
        }
    }

    #[test]
    fn an_unmasked_frame_after_masked_ones_is_caught() {
        let mut stream = masked_frame(200);
        stream.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
        for chunk in [1, 5, stream.len()] {
            let mut cursor = FrameCursor::default();
            assert!(
                !stream.chunks(chunk).all(|part| cursor.follow(part, true)),
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn unmasked_replica_frames_are_followed_to_their_boundaries() {
        let mut cursor = FrameCursor::default();
        let mut stream = vec![0x82, 126, 0x01, 0x00];
        stream.extend(std::iter::repeat_n(0x82, 256));
        assert!(cursor.follow(&stream[..100], false));
        assert!(!cursor.at_boundary());
        assert!(cursor.follow(&stream[100..], false));
        assert!(cursor.at_boundary());
        assert!(cursor.follow(&[0x81], false));
        assert!(
            !cursor.at_boundary(),
            "a lone header byte is not a boundary"
        );
    }
}
