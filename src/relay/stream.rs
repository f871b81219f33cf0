//! Streamed frames: data frames of 256 KiB and more pass through as their payload arrives,
//! never held whole. Text is checked as UTF-8 piece by piece; a client's payload is re-keyed to
//! the router's mask as it passes.

use std::task::ready;
use std::time::Duration;

use fastwebsockets::WebSocketError;

use tokio::time::Instant;

use super::orders::{CloseOrder, Order};
use super::pump::{
    close_code_for, close_ordered, keepalive_ping, source_failed, until, PumpEnd, PumpState, Sink,
    Source,
};
use super::splice::{Broken, Pipe, SPLICE_MIN_BYTES};
use crate::frames::{fresh_mask, FrameReader, FrameWriter, Head};

/// Pass a streamed frame on as its payload arrives: the header first (with the first bytes),
/// then each read as it comes. Orders that arrive meanwhile wait for the end of the frame, as
/// nothing can be put inside it. A Close order that the frame does not reach the end of within
/// the close timeout, or a closing deadline passing, gives up the frame and the session. A
/// source that fails mid-frame (gone, or its text is not UTF-8) gets its frame completed with
/// padding, so the failure notice after it reaches the sink's peer as a frame of its own.
///
/// While the source has nothing to read, the read buffer is given back: a peer that stalls
/// mid-frame costs no buffer. Between two plain TCP sockets, a payload that passes as it is
/// (a replica's binary or compressed data) is spliced past the bytes already read.
pub(super) async fn stream_frame<S, W>(
    frames: &mut FrameReader,
    source: &mut S,
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
    head: Head,
) -> Result<(), PumpEnd>
where
    S: Source,
    W: Sink,
{
    let new_key = state.sink_masks().then(fresh_mask);
    let streamed = frames.start_stream(head, new_key);
    sink.queue_raw_head(streamed.bytes())
        .map_err(PumpEnd::SinkFailed)?;
    let mut ping_owed = false;
    let mut close_order: Option<(Box<CloseOrder>, Instant)> = None;
    let mut left = streamed.payload_len;
    let mut may_splice = state.splices() && streamed.passes_as_is();
    let mut pipe: Option<Pipe> = None;
    while left > 0 {
        if pipe.is_none() {
            let chunk = match frames.stream_chunk(&streamed, left) {
                Ok(chunk) => chunk,
                Err(error) => return Err(fail_mid_frame(sink, state, &streamed, left, error).await),
            };
            if !chunk.is_empty() {
                let n = chunk.len();
                sink.write_raw(chunk).await.map_err(PumpEnd::SinkFailed)?;
                frames.consume_stream(n);
                left -= n;
                continue;
            }
            if may_splice
                && left >= SPLICE_MIN_BYTES
                && source.tcp().is_some()
                && sink.get_ref().tcp().is_some()
            {
                // The rest of the payload bypasses user space, behind what is queued (the
                // header at least). Out of descriptors for a pipe: it is copied as before.
                may_splice = false;
                frames.release();
                sink.flush().await.map_err(PumpEnd::SinkFailed)?;
                pipe = Pipe::new().ok();
            }
        }
        let give_up_at = match (
            close_order.as_ref().map(|(_, at)| *at),
            state.closing_deadline(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let progress = async {
            match pipe.as_mut() {
                Some(pipe) => {
                    let from = source.tcp().expect("a TCP source, checked when piped");
                    let to = sink
                        .get_ref()
                        .tcp()
                        .expect("a TCP sink, checked when piped");
                    pipe.step(from, to, left).await
                }
                None => std::future::poll_fn(|cx| {
                    if S::PARKS && !frames.holds_buffer() {
                        ready!(source.poll_readable(cx))?;
                    }
                    let filled = frames.poll_fill(cx, source, left);
                    if filled.is_pending() && S::PARKS {
                        // Stalled mid-frame: hold no buffer until bytes arrive.
                        frames.release();
                    }
                    filled
                })
                .await
                .map(|()| 0)
                .map_err(Broken::Source),
            }
        };
        tokio::select! {
            biased;
            progress = progress => match progress {
                Ok(spliced) => {
                    left -= spliced;
                    if spliced > 0 {
                        state.link.stats.count_spliced(spliced);
                    }
                }
                Err(Broken::Source(error)) => {
                    return Err(fail_mid_frame(sink, state, &streamed, left, error).await);
                }
                Err(Broken::Sink(error)) => return Err(PumpEnd::SinkFailed(error)),
            },
            order = state.link.orders.next(), if close_order.is_none() => match order {
                Order::Ping => ping_owed = true,
                Order::CloseAfterSource(order) => state.close_after_source(*order),
                Order::Close(order) => {
                    close_order = Some((order, Instant::now() + state.close_timeout()));
                }
            },
            _ = until(give_up_at) => return Err(PumpEnd::Ordered { told: None, answer: None }),
        }
    }
    if ping_owed {
        sink.write_frame(keepalive_ping())
            .await
            .map_err(PumpEnd::SinkFailed)?;
    }
    if let Some((order, _)) = close_order {
        let close_timeout = state.close_timeout();
        return Err(close_ordered(frames, source, sink, *order, close_timeout).await);
    }
    Ok(())
}

/// The source failed `left` bytes before the end of a streamed frame: complete the frame, then
/// tell the sink's peer.
async fn fail_mid_frame<W: Sink>(
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
    streamed: &crate::frames::StreamedHead,
    left: usize,
    error: WebSocketError,
) -> PumpEnd {
    let done = streamed.payload_len - left;
    if !pad_frame(sink, streamed.mask(), done, left, state.close_timeout()).await {
        // The sink's peer cannot be told more than the broken frame.
        return PumpEnd::SourceFailed {
            owed: close_code_for(&error),
            error,
            told: None,
        };
    }
    let closing = state.closing.take();
    source_failed(sink, state.direction, error, closing, state.link.request_id).await
}

/// Complete a streamed frame whose source failed: the payload it still owes, as zeros (under
/// the frame's mask, so they arrive as zeros; zeros are valid UTF-8 too), within `timeout`.
/// Whether it was completed.
async fn pad_frame<W: Sink>(
    sink: &mut FrameWriter<W>,
    mask: Option<[u8; 4]>,
    done: usize,
    mut left: usize,
    timeout: Duration,
) -> bool {
    const PAD_CHUNK: usize = 16 * 1024;
    // Masked zeros are the mask key's bytes, in step with the payload position.
    let phase = done % 4;
    let pad: Vec<u8> = (0..PAD_CHUNK.min(left))
        .map(|i| mask.map_or(0, |key| key[(phase + i) % 4]))
        .collect();
    let padding = async {
        while left > 0 {
            // Chunks are whole multiples of 4, so the mask phase holds from one to the next.
            let n = left.min(pad.len());
            if sink.write_raw(&pad[..n]).await.is_err() {
                return false;
            }
            left -= n;
        }
        true
    };
    tokio::time::timeout(timeout, padding)
        .await
        .unwrap_or(false)
}
