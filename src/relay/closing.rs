//! The end of a WebSocket conversation: writing a close order, checking a Close frame, and
//! draining a peer until its Close arrives (without holding what it sends meanwhile).

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::orders::CloseOrder;
use crate::frames::{FrameReader, FrameWriter};

/// A close frame; reasons are cut to the 123 bytes a control frame can carry.
pub fn close_frame(code: u16, reason: &str) -> Frame<'static> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Frame::close(code, &reason.as_bytes()[..end])
}

/// The close code a Close frame's payload carries (`None` for an empty payload).
pub fn close_code(payload: &[u8]) -> Option<u16> {
    payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]))
}

/// Write `order` to `sink` and flush; what was written, as a close code (if a Close went out).
/// A sink that is gone is ignored: there is nobody left to tell.
pub async fn write_order<W: AsyncWrite + Unpin>(
    sink: &mut FrameWriter<W>,
    order: CloseOrder,
) -> Option<u16> {
    if let Some(json) = order.error_json {
        let _ = sink
            .write_frame(Frame::text(Payload::Owned(json.into_bytes())))
            .await;
    }
    let mut told = None;
    if let Some((code, reason)) = order.close {
        if sink.write_frame(close_frame(code, reason)).await.is_ok() {
            told = Some(code);
        }
    }
    let _ = sink.flush().await;
    told
}

/// The protocol error in a Close frame's payload, if any: a lone byte, a code no endpoint may
/// send, or a reason that is not UTF-8. A proxy must not pass a broken Close on.
pub fn close_payload_error(payload: &[u8]) -> Option<WebSocketError> {
    match payload {
        [] => None,
        [_] => Some(WebSocketError::InvalidCloseFrame),
        [high, low, reason @ ..] => {
            if !fastwebsockets::CloseCode::from(u16::from_be_bytes([*high, *low])).is_allowed() {
                Some(WebSocketError::InvalidCloseCode)
            } else if std::str::from_utf8(reason).is_err() {
                Some(WebSocketError::InvalidUTF8)
            } else {
                None
            }
        }
    }
}

/// Read and discard frames until the peer's Close arrives, the peer fails, or `deadline`.
/// Large frames are skipped as they arrive, never held. Returns the peer's close code when its
/// Close came (`Some(None)` for a Close without a code).
pub async fn drain_until_close<R: AsyncRead + Unpin>(
    frames: &mut FrameReader,
    source: &mut R,
    deadline: Instant,
) -> Option<Option<u16>> {
    let drained = async {
        loop {
            let head = std::future::poll_fn(|cx| frames.poll_frame(cx, &mut *source))
                .await
                .ok()?;
            if head.is_streamed() {
                let mut left = head.payload_len();
                frames.start_stream(head, None);
                while left > 0 {
                    let n = frames.stream_raw(left);
                    frames.consume_stream(n);
                    left -= n;
                    if left > 0 {
                        std::future::poll_fn(|cx| frames.poll_fill(cx, &mut *source, left))
                            .await
                            .ok()?;
                    }
                }
                frames.release();
                continue;
            }
            let frame = frames.take(head).ok()?;
            if frame.opcode == OpCode::Close {
                return Some(close_code(&frame.payload));
            }
        }
    };
    tokio::time::timeout_at(deadline, drained)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Role;

    #[test]
    fn close_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = close_frame(1011, &reason);
        assert!(frame.payload.len() <= 125);
        assert!(std::str::from_utf8(&frame.payload[2..]).is_ok());
    }

    #[tokio::test]
    async fn a_drain_skips_a_large_frame_without_holding_it() {
        // An unmasked 1 MiB binary frame, then a Close 1000.
        let len = 1usize << 20;
        let mut bytes = vec![0x82, 127];
        bytes.extend_from_slice(&(len as u64).to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, len));
        bytes.extend_from_slice(&[0x88, 0x02, 0x03, 0xe8]);
        let mut frames = FrameReader::new(Role::Client, 16 << 20);
        let mut source = &bytes[..];
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let code = drain_until_close(&mut frames, &mut source, deadline).await;
        assert_eq!(code, Some(Some(1000)));
    }
}
