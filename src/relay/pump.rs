//! One direction of a session: read frames from a source, write them to a sink, unchanged in
//! type and fragmentation (no message reassembly), writes coalesced (the sink is flushed only
//! when the next read from the source would block).
//!
//! A client's data frames are re-keyed to a fresh mask in one pass on their way to the
//! replica; text is unmasked, checked as UTF-8 and masked again. Frames of 256 KiB and more
//! are streamed ([`super::stream`]).

use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::closing::{close_code, close_payload_error, drain_until_close, write_order};
use super::orders::{CloseOrder, Inbox, Order};
use super::stream::stream_frame;
use super::SessionLimits;
use crate::close::{CloseReason, RequestId};
use crate::frames::{fresh_mask, is_mask_violation, FrameReader, FrameWriter, Head};
use crate::metrics::DirectionStats;

/// Which way a pump forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToUpstream,
    ToClient,
}

/// Payload of the router's own pings; the matching pongs are answered to the router and
/// not forwarded.
pub const KEEPALIVE_PAYLOAD: &[u8] = b"wsrouter-keepalive";

/// Bits a pump sets when it reads from its source; the bridge clears them when it looks.
pub mod heard {
    /// Any frame arrived (the peer is alive).
    pub const ANY: u8 = 1;
    /// A frame was forwarded (the session is in use).
    pub const FORWARDED: u8 = 2;
}

fn mark(heard: &AtomicU8, bits: u8) {
    // A load first: the common case (already marked) costs no atomic write.
    if heard.load(Ordering::Relaxed) & bits != bits {
        heard.fetch_or(bits, Ordering::Relaxed);
    }
}

/// What a pump shares with the bridge.
pub struct Link<'a> {
    pub orders: &'a Inbox,
    /// Router-wide counters for this direction.
    pub stats: &'a DirectionStats,
    /// The replica's counters for this direction.
    pub replica_stats: &'a DirectionStats,
    pub heard: &'a AtomicU8,
    /// Carried in the JSON error a client gets.
    pub request_id: RequestId,
}

/// How a pump stopped.
#[derive(Debug)]
pub enum PumpEnd {
    /// The source sent Close (with this code); it was forwarded.
    SourceClosed { code: Option<u16> },
    /// The source failed (gone, or broke the protocol). The pump already told the sink's
    /// peer (`told`: the close code written); `owed` is the close code the source itself should
    /// get, if it is still there.
    SourceFailed {
        error: WebSocketError,
        owed: Option<u16>,
        told: Option<u16>,
    },
    /// Writing to the sink failed: its peer is gone.
    SinkFailed(WebSocketError),
    /// The pump carried out a [`CloseOrder`] (`told`: the close code it wrote) and drained its
    /// source (`answer`: the source's Close, if it came).
    Ordered {
        told: Option<u16>,
        answer: Option<Option<u16>>,
    },
}

impl PumpEnd {
    /// The close code the source's connection saw first: the one it sent, else the one it
    /// was sent.
    pub fn source_code(&self) -> Option<u16> {
        match self {
            PumpEnd::SourceClosed { code } => *code,
            PumpEnd::Ordered { answer, .. } => answer.flatten(),
            _ => None,
        }
    }

    /// The close code this pump wrote to its sink, if any.
    pub fn sink_code(&self) -> Option<u16> {
        match self {
            PumpEnd::SourceClosed { code } => *code,
            PumpEnd::SourceFailed { told, .. } | PumpEnd::Ordered { told, .. } => *told,
            PumpEnd::SinkFailed(_) => None,
        }
    }
}

/// A pump's end and what it forwarded.
#[derive(Debug)]
pub struct PumpOutcome {
    pub end: PumpEnd,
    pub frames: u64,
    pub bytes: u64,
}

/// The close code owed to a peer whose read failed with `error`, or `None` if it is gone.
pub fn close_code_for(error: &WebSocketError) -> Option<u16> {
    match error {
        WebSocketError::IoError(e) if is_mask_violation(e) => Some(1002),
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => None,
        WebSocketError::FrameTooLarge => Some(1009),
        WebSocketError::InvalidUTF8 => Some(1007),
        _ => Some(1002),
    }
}

/// Why the session ends when this direction's source fails with `error`.
pub fn source_failure_reason(direction: Direction, error: &WebSocketError) -> CloseReason {
    match (direction, close_code_for(error)) {
        (Direction::ToClient, Some(1009)) => CloseReason::WorkerFrameTooLarge,
        (Direction::ToClient, _) => CloseReason::WorkerFailed,
        (Direction::ToUpstream, None) => CloseReason::ClientGone,
        (Direction::ToUpstream, Some(code)) => CloseReason::ClientProtocolError { code },
    }
}

/// A pump's byte source. A socket can say when it is readable, so a pump whose peer is quiet
/// frees its read buffer until bytes arrive: idle sessions hold no read buffers.
pub trait Source: AsyncRead + Unpin + Sync {
    /// Whether [`Source::poll_readable`] works; a source that cannot park keeps its buffer.
    const PARKS: bool;
    /// Ready when a read would find bytes (or EOF, or an error). A poll function rather than
    /// an async one: a parked pump then holds no readiness future (tokio's is 150 bytes).
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
    /// The plain TCP socket beneath, with nothing read ahead waiting in front of it: a
    /// replica's large payloads may then be spliced from it ([`super::splice`]).
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// A pump's byte sink. A plain TCP socket says so, and may then be spliced into.
pub trait Sink: AsyncWrite + Unpin {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// In-memory pipes (benches, tests) take no splice.
impl<T: AsyncWrite> Sink for tokio::io::WriteHalf<T> {}
#[cfg(test)]
impl Sink for Vec<u8> {}

/// In-memory pipes (benches, tests) never park.
impl<T: AsyncRead + Send + Sync> Source for tokio::io::ReadHalf<T> {
    const PARKS: bool = false;
    fn poll_readable(&self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

/// Forward frames from `source` to `sink` until one side closes or fails, or a close order
/// arrives. A plain fn around an async block, with `state` built by the caller: an async fn
/// keeps its arguments as well as the locals made from them, and every open session holds
/// two pumps.
#[allow(clippy::manual_async_fn)]
pub fn pump<'a, S, W>(
    source: &'a mut S,
    sink: &'a mut FrameWriter<W>,
    mut state: PumpState<'a>,
) -> impl std::future::Future<Output = PumpOutcome> + 'a
where
    S: Source,
    W: Sink,
{
    async move {
        let end = forward(source, sink, &mut state).await;
        state.publish_counts();
        PumpOutcome {
            end,
            frames: state.total.frames,
            bytes: state.total.bytes,
        }
    }
}

/// Frames and payload bytes.
#[derive(Default, Clone, Copy)]
pub(super) struct Counted {
    pub(super) frames: u64,
    pub(super) bytes: u64,
}

/// What a pump keeps besides its reader.
pub struct PumpState<'a> {
    pub(super) direction: Direction,
    pub(super) link: Link<'a>,
    /// Set by [`Order::CloseAfterSource`]: what to write instead of the source's Close, and
    /// until when to wait for it. Boxed: rare, and every pump would carry its room.
    pub(super) closing: Option<Box<Closing>>,
    /// The session's limits (held by the bridge, shared by both pumps).
    limits: &'a SessionLimits,
    /// Forwarded, not yet added to the shared counters.
    counted: Counted,
    /// Forwarded in all.
    total: Counted,
}

/// A close promised to the sink once the source's own Close arrives (or the deadline).
pub(super) struct Closing {
    order: CloseOrder,
    deadline: Instant,
}

impl<'a> PumpState<'a> {
    /// A pump forwarding `direction`, sharing `link` with its bridge.
    pub fn new(direction: Direction, link: Link<'a>, limits: &'a SessionLimits) -> Self {
        PumpState {
            direction,
            link,
            closing: None,
            limits,
            counted: Counted::default(),
            total: Counted::default(),
        }
    }

    /// How long to wait for a peer's Close reply.
    pub(super) fn close_timeout(&self) -> Duration {
        self.limits.close_timeout
    }

    pub(super) fn closing_deadline(&self) -> Option<Instant> {
        self.closing.as_ref().map(|closing| closing.deadline)
    }

    pub(super) fn close_after_source(&mut self, order: CloseOrder) {
        self.closing = Some(Box::new(Closing {
            order,
            deadline: Instant::now() + self.close_timeout(),
        }));
    }

    pub(super) fn count(&mut self, bytes: usize) {
        self.counted.frames += 1;
        self.counted.bytes += bytes as u64;
    }

    fn publish_counts(&mut self) {
        let counted = std::mem::take(&mut self.counted);
        self.link.stats.add(counted.frames, counted.bytes);
        self.link.replica_stats.add(counted.frames, counted.bytes);
        self.total.frames += counted.frames;
        self.total.bytes += counted.bytes;
    }

    /// Whether payloads that pass as they are may be spliced from source to sink.
    pub(super) fn splices(&self) -> bool {
        self.limits.splice
    }

    /// Whether the sink masks (it is the replica's connection, written as its client).
    pub(super) fn sink_masks(&self) -> bool {
        self.direction == Direction::ToUpstream
    }
}

async fn forward<S, W>(
    source: &mut S,
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
) -> PumpEnd
where
    S: Source,
    W: Sink,
{
    let role = match state.direction {
        // The client side is read as its server: its frames must be masked.
        Direction::ToUpstream => Role::Server,
        Direction::ToClient => Role::Client,
    };
    let mut frames =
        FrameReader::new(role, state.limits.max_frame_bytes).compressed(state.limits.compression);
    let mut next = None;
    loop {
        // Boxed: a waiting pump then holds only its reader and the wait.
        let forwarded = Box::pin(forward_ready(&mut frames, source, sink, state, next)).await;
        if let Some(end) = forwarded {
            return end;
        }
        frames.release();
        next = match wait_for_frame(&mut frames, source, sink, state).await {
            Ok(head) => Some(head),
            Err(end) => return end,
        };
    }
}

/// Forward the frames that can be read without waiting, starting with `next` if the wait
/// already found one. `None` once a read would block (all that was forwarded is flushed).
/// Every step that may wait, other than the read and the flush, is boxed: this future is
/// itself boxed on every wake, and the rare steps are large.
async fn forward_ready<S, W>(
    frames: &mut FrameReader,
    source: &mut S,
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
    mut next: Option<Result<Head, WebSocketError>>,
) -> Option<PumpEnd>
where
    S: Source,
    W: Sink,
{
    loop {
        // Between frames: carry out the orders that came in meanwhile. This is what stops a
        // source that never pauses (a replica streaming non-stop).
        while let Some(order) = state.link.orders.take() {
            match order {
                Order::Ping => {
                    if let Err(e) = Box::pin(sink.write_frame(keepalive_ping())).await {
                        return Some(PumpEnd::SinkFailed(e));
                    }
                }
                Order::Close(order) => {
                    let close_timeout = state.close_timeout();
                    let closing = close_ordered(frames, source, sink, *order, close_timeout);
                    return Some(Box::pin(closing).await);
                }
                Order::CloseAfterSource(order) => state.close_after_source(*order),
            }
        }
        if let Some(deadline) = state.closing_deadline() {
            if Instant::now() >= deadline {
                return Some(Box::pin(close_instead(sink, state.closing.take(), None)).await);
            }
        }
        let head = match next.take() {
            Some(head) => head,
            None => {
                match std::future::poll_fn(|cx| Poll::Ready(frames.poll_frame(cx, source))).await {
                    Poll::Ready(head) => head,
                    Poll::Pending => {
                        // Nothing more to read right now: push out what was coalesced.
                        state.publish_counts();
                        if let Err(e) = sink.flush().await {
                            return Some(PumpEnd::SinkFailed(e));
                        }
                        return None;
                    }
                }
            }
        };
        if let Some(head) = head
            .as_ref()
            .ok()
            .filter(|head| head.is_streamed())
            .copied()
        {
            mark(state.link.heard, heard::ANY | heard::FORWARDED);
            state.count(head.payload_len());
            if let Err(end) = Box::pin(stream_frame(frames, source, sink, state, head)).await {
                return Some(end);
            }
            continue;
        }
        let new_key = state.sink_masks().then(fresh_mask);
        let taken = match head.and_then(|head| frames.take_rekeyed(head, new_key)) {
            Ok(taken) => taken,
            Err(error) => {
                let direction = state.direction;
                let (closing, request_id) = (state.closing.take(), state.link.request_id);
                return Some(
                    Box::pin(source_failed(sink, direction, error, closing, request_id)).await,
                );
            }
        };
        let frame = taken.frame;
        if frame.opcode == OpCode::Close {
            if let Some(error) = close_payload_error(&frame.payload) {
                let direction = state.direction;
                let (closing, request_id) = (state.closing.take(), state.link.request_id);
                return Some(
                    Box::pin(source_failed(sink, direction, error, closing, request_id)).await,
                );
            }
            if state.closing.is_some() {
                let code = close_code(&frame.payload);
                return Some(Box::pin(close_instead(sink, state.closing.take(), Some(code))).await);
            }
        }

        if frame.opcode == OpCode::Pong && &frame.payload[..] == KEEPALIVE_PAYLOAD {
            // The answer to the router's own ping: proof of life, nothing to forward.
            mark(state.link.heard, heard::ANY);
            continue;
        }
        mark(state.link.heard, heard::ANY | heard::FORWARDED);
        let close = (frame.opcode == OpCode::Close).then(|| close_code(&frame.payload));
        state.count(frame.payload.len());
        // Most frames are queued without waiting; the rest wait in a box of their own (see
        // above).
        let written = match sink.try_queue(frame, taken.wire) {
            Ok(Some(frame)) => Box::pin(sink.write_forwarded(frame, taken.wire)).await,
            other => other.map(drop),
        };
        if let Err(e) = written {
            return Some(PumpEnd::SinkFailed(e));
        }
        if let Some(code) = close {
            if let Err(e) = sink.flush().await {
                return Some(PumpEnd::SinkFailed(e));
            }
            return Some(PumpEnd::SourceClosed { code });
        }
    }
}

/// Wait for the next frame, carrying out orders meanwhile; `Err` when the pump ended while
/// waiting. An empty reader on a source that parks first waits for the socket to turn
/// readable, so a quiet peer costs no read buffer.
async fn wait_for_frame<S, W>(
    frames: &mut FrameReader,
    source: &mut S,
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
) -> Result<Result<Head, WebSocketError>, PumpEnd>
where
    S: Source,
    W: Sink,
{
    loop {
        let deadline = state.closing_deadline();
        // Biased: no random draw per wake; orders are also checked between frames.
        let order = tokio::select! {
            biased;
            head = std::future::poll_fn(|cx| {
                if S::PARKS && frames.is_empty() {
                    ready!(source.poll_readable(cx))?;
                }
                frames.poll_frame(cx, source)
            }) => return Ok(head),
            order = state.link.orders.next() => order,
            // The closing steps are boxed so a waiting pump does not carry their space.
            _ = until(deadline) => {
                return Err(Box::pin(close_instead(sink, state.closing.take(), None)).await)
            }
        };
        match order {
            Order::Ping => {
                // Boxed: a write in flight is 320 bytes a waiting pump need not carry.
                if let Err(e) = Box::pin(send_ping(sink)).await {
                    return Err(PumpEnd::SinkFailed(e));
                }
            }
            Order::CloseAfterSource(order) => state.close_after_source(*order),
            Order::Close(order) => {
                let close_timeout = state.close_timeout();
                return Err(
                    Box::pin(close_ordered(frames, source, sink, *order, close_timeout)).await,
                );
            }
        }
    }
}

/// Carry out a [`Order::Close`]: write it, then read until the source's Close (bounded).
pub(super) async fn close_ordered<R, W>(
    frames: &mut FrameReader,
    source: &mut R,
    sink: &mut FrameWriter<W>,
    order: CloseOrder,
    close_timeout: Duration,
) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: Sink,
{
    let told = write_order(sink, order).await;
    let answer = drain_until_close(frames, source, Instant::now() + close_timeout).await;
    PumpEnd::Ordered { told, answer }
}

/// The source failed: tell the sink's peer why (or what it was promised, when the session
/// was already closing).
pub(super) async fn source_failed<W: Sink>(
    sink: &mut FrameWriter<W>,
    direction: Direction,
    error: WebSocketError,
    closing: Option<Box<Closing>>,
    request_id: RequestId,
) -> PumpEnd {
    let notice = match closing {
        Some(closing) => closing.order,
        None => {
            let reason = source_failure_reason(direction, &error);
            match direction {
                Direction::ToClient => reason.to_client(None, Some(request_id)),
                Direction::ToUpstream => reason.to_replica(None),
            }
            .into()
        }
    };
    let told = write_order(sink, notice).await;
    PumpEnd::SourceFailed {
        owed: close_code_for(&error),
        error,
        told,
    }
}

/// End a [`Order::CloseAfterSource`]: write the promised close to the sink. `answer` is the
/// source's own Close, when that is what ended the wait.
async fn close_instead<W: Sink>(
    sink: &mut FrameWriter<W>,
    closing: Option<Box<Closing>>,
    answer: Option<Option<u16>>,
) -> PumpEnd {
    let told = match closing {
        Some(closing) => write_order(sink, closing.order).await,
        None => None,
    };
    PumpEnd::Ordered { told, answer }
}

/// Sleep until `deadline`; forever without one.
pub(super) async fn until(deadline: Option<Instant>) {
    match deadline {
        // Boxed: a timer is 112 bytes, and most waits have no deadline.
        Some(deadline) => Box::pin(tokio::time::sleep_until(deadline)).await,
        None => std::future::pending().await,
    }
}

/// Send a keepalive ping now (flushed: the peer is silent, so nothing else will flush it).
async fn send_ping<W: Sink>(sink: &mut FrameWriter<W>) -> Result<(), WebSocketError> {
    sink.write_frame(keepalive_ping()).await?;
    sink.flush().await
}

pub(super) fn keepalive_ping() -> Frame<'static> {
    Frame::new(
        true,
        OpCode::Ping,
        None,
        Payload::Borrowed(KEEPALIVE_PAYLOAD),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::pin::Pin;
    use tokio::io::ReadBuf;

    /// A source that always has another frame ready, up to `left` bytes, then ends.
    struct NeverPausing {
        frame: &'static [u8],
        at: usize,
        left: usize,
    }

    impl AsyncRead for NeverPausing {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            while buf.remaining() > 0 && self.left > 0 {
                let byte = self.frame[self.at];
                buf.put_slice(&[byte]);
                self.at = (self.at + 1) % self.frame.len();
                self.left -= 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    impl Source for NeverPausing {
        const PARKS: bool = false;
        fn poll_readable(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn an_order_is_carried_out_even_when_the_source_never_pauses() {
        // Unmasked binary frames, as a replica sends them; 4 MB of them, then EOF.
        let mut source = NeverPausing {
            frame: &[0x82, 0x02, 1, 2],
            at: 0,
            left: 4 << 20,
        };
        let mut sink = FrameWriter::new(Vec::<u8>::new(), Role::Server);
        let inbox = Inbox::default();
        inbox.post(Order::Close(Box::new(
            CloseReason::Shutdown.to_client(None, None).into(),
        )));
        let stats = DirectionStats::default();
        let heard = AtomicU8::new(0);
        let link = Link {
            orders: &inbox,
            stats: &stats,
            replica_stats: &stats,
            heard: &heard,
            request_id: RequestId(1),
        };
        let limits = SessionLimits {
            close_timeout: Duration::from_millis(50),
            max_frame_bytes: 1024,
            compression: false,
            splice: false,
        };
        let state = PumpState::new(Direction::ToClient, link, &limits);
        let outcome = pump(&mut source, &mut sink, state).await;
        assert!(
            matches!(
                outcome.end,
                PumpEnd::Ordered {
                    told: Some(1001),
                    ..
                }
            ),
            "the order must win over a source that never pauses: {:?}",
            outcome.end
        );
    }
}
