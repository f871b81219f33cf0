//! Frame pumps: one per direction, forwarding frames unchanged in type and fragmentation
//! (no message reassembly), with writes coalesced: a pump flushes its sink only when the
//! next read from its source would block.
//!
//! The session ends through close frames passed through both ways, through a failure on one
//! side (the other side is told why), or through a [`Stop`] from the router: shutdown, a
//! replica turning unhealthy, the session's lifetime, the idle timeout, or a peer that stopped
//! answering keepalive pings.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::reader::{is_unmasked_frame, FrameReader, Head};
use super::stats::{DirectionStats, Traffic};
use super::writer::FrameWriter;

/// Which way a pump forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToUpstream,
    ToClient,
}

/// What a pump must write to its sink before it stops forwarding and drains its source.
#[derive(Debug, Default)]
pub struct CloseOrder {
    /// A JSON error text frame sent before the close (client side only).
    pub error_json: Option<String>,
    /// Close code and reason; `None` when the sink's peer is already gone.
    pub close: Option<(u16, String)>,
}

/// What the bridge can tell a pump while it forwards.
#[derive(Debug)]
pub enum Order {
    /// Send a keepalive ping to the sink's peer.
    Ping,
    /// Stop forwarding: write this to the sink, then drain the source.
    Close(Box<CloseOrder>),
    /// Keep forwarding until the source's own Close (or the close timeout), then write this
    /// instead of that Close: the client that broke the protocol still gets what its replica
    /// sent before the replica heard of it.
    CloseAfterSource(Box<CloseOrder>),
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

/// A pump's order inbox: one slot per kind of order, held inside the session (a channel
/// would cost every session two heap blocks of slots). The bridge posts at most one close
/// order per pump; pings between are merged.
#[derive(Default)]
pub struct Inbox {
    pending: Mutex<Pending>,
    posted: Notify,
}

#[derive(Default)]
struct Pending {
    ping: bool,
    close_after_source: Option<Box<CloseOrder>>,
    close: Option<Box<CloseOrder>>,
}

impl Inbox {
    /// Leave an order for the pump. A second close order of the same kind is dropped: the
    /// first one decides how the pump ends.
    pub fn post(&self, order: Order) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match order {
                Order::Ping => pending.ping = true,
                Order::CloseAfterSource(order) => {
                    pending.close_after_source.get_or_insert(order);
                }
                Order::Close(order) => {
                    pending.close.get_or_insert(order);
                }
            }
        }
        self.posted.notify_one();
    }

    /// An order that has already arrived, if any (never waits). Close orders come first: a
    /// ping is moot once the pump is closing.
    fn take(&self) -> Option<Order> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(order) = pending.close_after_source.take() {
            return Some(Order::CloseAfterSource(order));
        }
        if let Some(order) = pending.close.take() {
            return Some(Order::Close(order));
        }
        std::mem::take(&mut pending.ping).then_some(Order::Ping)
    }

    /// The next order. Cancel-safe: an order is only taken out when it is returned.
    async fn next(&self) -> Order {
        loop {
            // A post between `take` and the wait leaves a permit, so it is not missed.
            if let Some(order) = self.take() {
                return order;
            }
            self.posted.notified().await;
        }
    }
}

/// What a pump shares with the bridge.
pub struct Link<'a> {
    pub orders: &'a Inbox,
    pub stats: &'a DirectionStats,
    pub heard: &'a AtomicU8,
}

fn mark(heard: &AtomicU8, bits: u8) {
    // A load first: the common case (already marked) costs no atomic write.
    if heard.load(Ordering::Relaxed) & bits != bits {
        heard.fetch_or(bits, Ordering::Relaxed);
    }
}

/// How a pump stopped.
#[derive(Debug)]
pub enum PumpEnd {
    /// The source sent Close; it was forwarded.
    SourceClosed,
    /// The source failed (gone, or broke the protocol). The pump already told the sink's
    /// peer; `owed_close` is the close code the source itself should get, if it is still there.
    SourceFailed {
        owed_close: Option<u16>,
        error: String,
    },
    /// Writing to the sink failed: its peer is gone.
    SinkFailed(String),
    /// The pump carried out a [`CloseOrder`] and drained its source.
    Ordered,
}

/// The close code owed to a peer whose read failed with `error`, or `None` if it is gone.
pub fn close_code_for(error: &WebSocketError) -> Option<u16> {
    match error {
        WebSocketError::IoError(e) if is_unmasked_frame(e) => Some(1002),
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => None,
        WebSocketError::FrameTooLarge => Some(1009),
        WebSocketError::InvalidUTF8 => Some(1007),
        _ => Some(1002),
    }
}

/// The protocol error in a Close frame's payload, if any: a lone byte, a code no endpoint may
/// send, or a reason that is not UTF-8. Checked here because the pumps read with auto_close
/// off, and a proxy must not pass a broken Close on.
fn close_payload_error(payload: &[u8]) -> Option<WebSocketError> {
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

pub fn error_json(code: &str, message: &str) -> String {
    serde_json::json!({"type": "error", "code": code, "message": message, "retryable": true})
        .to_string()
}

/// A close frame; reasons are cut to the 123 bytes a control frame can carry.
pub fn close_frame(code: u16, reason: &str) -> Frame<'static> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Frame::close(code, &reason.as_bytes()[..end])
}

pub async fn write_order<W: AsyncWrite + Unpin>(sink: &mut FrameWriter<W>, order: CloseOrder) {
    if let Some(json) = order.error_json {
        let _ = sink
            .write_frame(Frame::text(Payload::Owned(json.into_bytes())))
            .await;
    }
    if let Some((code, reason)) = order.close {
        let _ = sink.write_frame(close_frame(code, &reason)).await;
    }
    let _ = sink.flush().await;
}

/// What a source-side failure means for the sink: the client hears why the worker failed;
/// the replica hears that its client went away (or the protocol error it made).
fn failure_notice(direction: Direction, error: &WebSocketError) -> CloseOrder {
    match direction {
        Direction::ToClient => {
            let code = if matches!(error, WebSocketError::FrameTooLarge) {
                1009
            } else {
                1011
            };
            CloseOrder {
                error_json: Some(error_json(
                    "worker_failed",
                    &format!("the connection to the worker failed: {error}"),
                )),
                close: Some((code, "worker_failed".into())),
            }
        }
        Direction::ToUpstream => CloseOrder {
            error_json: None,
            close: Some((1001, "client went away".into())),
        },
    }
}

/// Read and discard frames until the peer's Close arrives, the peer fails, or `deadline`.
pub async fn drain_until_close<R: AsyncRead + Unpin>(
    frames: &mut FrameReader,
    source: &mut R,
    deadline: Instant,
) {
    while let Ok(Ok(frame)) = tokio::time::timeout_at(deadline, frames.read_frame(source)).await {
        if frame.opcode == OpCode::Close {
            return;
        }
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
}

/// In-memory pipes (benches, tests) never park.
impl<T: AsyncRead + Send + Sync> Source for tokio::io::ReadHalf<T> {
    const PARKS: bool = false;
    fn poll_readable(&self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

/// Forward frames from `source` to `sink` until one side closes or fails, or a close order
/// arrives.
pub async fn pump<S, W>(
    source: &mut S,
    sink: &mut FrameWriter<W>,
    direction: Direction,
    link: Link<'_>,
    close_timeout: Duration,
    max_frame_bytes: usize,
) -> PumpEnd
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    let mut state = PumpState {
        direction,
        stats: link.stats,
        heard: link.heard,
        orders: link.orders,
        closing: None,
        close_timeout,
        counted: Counted::default(),
    };
    let end = forward(source, sink, &mut state, max_frame_bytes).await;
    state.publish_counts();
    end
}

/// Frames forwarded but not yet added to the shared counters.
#[derive(Default)]
struct Counted {
    frames: u64,
    bytes: u64,
}

/// What a pump keeps besides its reader.
struct PumpState<'a> {
    direction: Direction,
    stats: &'a DirectionStats,
    heard: &'a AtomicU8,
    orders: &'a Inbox,
    /// Set by [`Order::CloseAfterSource`]: what to write instead of the source's Close, and
    /// until when to wait for it.
    closing: Option<(Box<CloseOrder>, Instant)>,
    close_timeout: Duration,
    counted: Counted,
}

impl PumpState<'_> {
    fn closing_deadline(&self) -> Option<Instant> {
        self.closing.as_ref().map(|(_, deadline)| *deadline)
    }

    fn close_after_source(&mut self, order: Box<CloseOrder>) {
        self.closing = Some((order, Instant::now() + self.close_timeout));
    }

    fn publish_counts(&mut self) {
        let counted = std::mem::take(&mut self.counted);
        self.stats.add(counted.frames, counted.bytes);
    }
}

async fn forward<S, W>(
    source: &mut S,
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
    max_frame_bytes: usize,
) -> PumpEnd
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    let direction = state.direction;
    let role = match direction {
        // The client side is read as its server: its frames must be masked.
        Direction::ToUpstream => Role::Server,
        Direction::ToClient => Role::Client,
    };
    let mut frames = FrameReader::new(role, max_frame_bytes);
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
/// itself boxed on every wake, and the rare steps are large (880 bytes to copy, not 360).
async fn forward_ready<S, W>(
    frames: &mut FrameReader,
    source: &mut S,
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
    mut next: Option<Result<Head, WebSocketError>>,
) -> Option<PumpEnd>
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    let direction = state.direction;
    loop {
        // Between frames: carry out the orders that came in meanwhile. This is what stops a
        // source that never pauses (a replica streaming non-stop).
        while let Some(order) = state.orders.take() {
            match order {
                Order::Ping => {
                    if let Err(e) = Box::pin(sink.write_frame(keepalive_ping())).await {
                        return Some(PumpEnd::SinkFailed(e.to_string()));
                    }
                }
                Order::Close(order) => {
                    let close_timeout = state.close_timeout;
                    let closing = close_ordered(frames, source, sink, *order, close_timeout);
                    return Some(Box::pin(closing).await);
                }
                Order::CloseAfterSource(order) => state.close_after_source(order),
            }
        }
        if let Some(deadline) = state.closing_deadline() {
            if Instant::now() >= deadline {
                return Some(Box::pin(close_instead(sink, state.closing.take())).await);
            }
        }
        let head = match next.take() {
            Some(head) => head,
            None => {
                match std::future::poll_fn(|cx| {
                    Poll::Ready(frames.poll_frame_or_stream(cx, source))
                })
                .await
                {
                    Poll::Ready(head) => head,
                    Poll::Pending => {
                        // Nothing more to read right now: push out what was coalesced.
                        state.publish_counts();
                        if let Err(e) = sink.flush().await {
                            return Some(PumpEnd::SinkFailed(e.to_string()));
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
            mark(state.heard, heard::ANY | heard::FORWARDED);
            state.counted.frames += 1;
            state.counted.bytes += head.payload_len() as u64;
            if let Err(end) = Box::pin(stream_frame(frames, source, sink, state, head)).await {
                return Some(end);
            }
            continue;
        }
        let frame = match head.and_then(|head| frames.take(head)) {
            Ok(frame) => frame,
            Err(error) => {
                return Some(
                    Box::pin(source_failed(sink, direction, error, state.closing.take())).await,
                )
            }
        };
        if frame.opcode == OpCode::Close {
            if let Some(error) = close_payload_error(&frame.payload) {
                return Some(
                    Box::pin(source_failed(sink, direction, error, state.closing.take())).await,
                );
            }
            if state.closing.is_some() {
                return Some(Box::pin(close_instead(sink, state.closing.take())).await);
            }
        }

        if frame.opcode == OpCode::Pong && &frame.payload[..] == KEEPALIVE_PAYLOAD {
            // The answer to the router's own ping: proof of life, nothing to forward.
            mark(state.heard, heard::ANY);
            continue;
        }
        mark(state.heard, heard::ANY | heard::FORWARDED);
        let is_close = frame.opcode == OpCode::Close;
        state.counted.frames += 1;
        state.counted.bytes += frame.payload.len() as u64;
        let frame = match direction {
            // Frames towards the client must carry no mask, whatever the replica sent.
            Direction::ToClient => Frame::new(frame.fin, frame.opcode, None, frame.payload),
            // The client's mask key is reused when the frame is re-masked for the replica.
            Direction::ToUpstream => frame,
        };
        // Most frames are queued without waiting; the rest wait in a box of their own (see
        // above).
        let written = match sink.try_queue(frame) {
            Ok(Some(frame)) => Box::pin(sink.write_frame(frame)).await,
            other => other.map(drop),
        };
        if let Err(e) = written {
            return Some(PumpEnd::SinkFailed(e.to_string()));
        }
        if is_close {
            if let Err(e) = sink.flush().await {
                return Some(PumpEnd::SinkFailed(e.to_string()));
            }
            return Some(PumpEnd::SourceClosed);
        }
    }
}

/// Pass a streamed frame on as its payload arrives: the header first (with the first
/// bytes), then each read as it comes, the bytes unchanged. Orders that arrive meanwhile wait
/// for the end of the frame, as nothing can be put inside it. A Close order that the frame
/// does not reach the end of within the close timeout, or a closing deadline passing, gives up
/// the frame and the session. A source that fails mid-frame gets its frame completed with
/// padding, so the failure notice after it reaches the sink's peer as a frame of its own.
async fn stream_frame<S, W>(
    frames: &mut FrameReader,
    source: &mut S,
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
    head: Head,
) -> Result<(), PumpEnd>
where
    S: Source,
    W: AsyncWrite + Unpin,
{
    let streamed = frames.start_stream(head);
    let sink_failed = |e: WebSocketError| PumpEnd::SinkFailed(e.to_string());
    sink.queue_raw_head(streamed.bytes()).map_err(sink_failed)?;
    let mut ping_owed = false;
    let mut close_order: Option<(Box<CloseOrder>, Instant)> = None;
    let mut left = streamed.payload_len;
    while left > 0 {
        let chunk = frames.stream_chunk(left);
        if !chunk.is_empty() {
            let n = chunk.len();
            sink.write_raw(chunk).await.map_err(sink_failed)?;
            frames.consume_stream(n);
            left -= n;
            continue;
        }
        let give_up_at = match (
            close_order.as_ref().map(|(_, at)| *at),
            state.closing_deadline(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            biased;
            filled = std::future::poll_fn(|cx| frames.poll_fill(cx, source)) => {
                if let Err(error) = filled {
                    let done = streamed.payload_len - left;
                    if !pad_frame(sink, streamed.mask, done, left, state.close_timeout).await {
                        // The sink's peer cannot be told more than the broken frame.
                        return Err(PumpEnd::SourceFailed {
                            owed_close: close_code_for(&error),
                            error: error.to_string(),
                        });
                    }
                    let closing = state.closing.take();
                    return Err(source_failed(sink, state.direction, error, closing).await);
                }
            }
            order = state.orders.next(), if close_order.is_none() => match order {
                Order::Ping => ping_owed = true,
                Order::CloseAfterSource(order) => state.close_after_source(order),
                Order::Close(order) => {
                    close_order = Some((order, Instant::now() + state.close_timeout));
                }
            },
            _ = until(give_up_at) => return Err(PumpEnd::Ordered),
        }
    }
    if ping_owed {
        sink.write_frame(keepalive_ping())
            .await
            .map_err(sink_failed)?;
    }
    if let Some((order, _)) = close_order {
        let close_timeout = state.close_timeout;
        return Err(close_ordered(frames, source, sink, *order, close_timeout).await);
    }
    Ok(())
}

/// Complete a streamed frame whose source failed: the payload it still owes, as zeros (under
/// the frame's mask, so they arrive as zeros), within `timeout`. Whether it was completed.
async fn pad_frame<W: AsyncWrite + Unpin>(
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

/// Wait for the next whole frame, carrying out orders meanwhile; `Err` when the pump ended
/// while waiting. An empty reader on a source that parks first waits for the socket to turn
/// readable, so a quiet peer costs no read buffer.
async fn wait_for_frame<S, W>(
    frames: &mut FrameReader,
    source: &mut S,
    sink: &mut FrameWriter<W>,
    state: &mut PumpState<'_>,
) -> Result<Result<Head, WebSocketError>, PumpEnd>
where
    S: Source,
    W: AsyncWrite + Unpin,
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
                frames.poll_frame_or_stream(cx, source)
            }) => return Ok(head),
            order = state.orders.next() => order,
            // The closing steps are boxed so a waiting pump does not carry their space.
            _ = until(deadline) => return Err(Box::pin(close_instead(sink, state.closing.take())).await),
        };
        match order {
            Order::Ping => {
                // Boxed: a write in flight is 320 bytes a waiting pump need not carry.
                if let Err(e) = Box::pin(send_ping(sink)).await {
                    return Err(PumpEnd::SinkFailed(e.to_string()));
                }
            }
            Order::CloseAfterSource(order) => state.close_after_source(order),
            Order::Close(order) => {
                let close_timeout = state.close_timeout;
                return Err(
                    Box::pin(close_ordered(frames, source, sink, *order, close_timeout)).await,
                );
            }
        }
    }
}

/// Carry out a [`Order::Close`]: write it, then read until the source's Close (bounded).
async fn close_ordered<R, W>(
    frames: &mut FrameReader,
    source: &mut R,
    sink: &mut FrameWriter<W>,
    order: CloseOrder,
    close_timeout: Duration,
) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    write_order(sink, order).await;
    drain_until_close(frames, source, Instant::now() + close_timeout).await;
    PumpEnd::Ordered
}

/// The source failed: tell the sink's peer why (or what it was promised, when the session
/// was already closing).
async fn source_failed<W: AsyncWrite + Unpin>(
    sink: &mut FrameWriter<W>,
    direction: Direction,
    error: WebSocketError,
    closing: Option<(Box<CloseOrder>, Instant)>,
) -> PumpEnd {
    let notice = match closing {
        Some((order, _)) => *order,
        None => failure_notice(direction, &error),
    };
    write_order(sink, notice).await;
    PumpEnd::SourceFailed {
        owed_close: close_code_for(&error),
        error: error.to_string(),
    }
}

/// End a [`Order::CloseAfterSource`]: write the promised close to the sink.
async fn close_instead<W: AsyncWrite + Unpin>(
    sink: &mut FrameWriter<W>,
    closing: Option<(Box<CloseOrder>, Instant)>,
) -> PumpEnd {
    if let Some((order, _)) = closing {
        write_order(sink, *order).await;
    }
    PumpEnd::Ordered
}

/// Sleep until `deadline`; forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        // Boxed: a timer is 112 bytes, and most waits have no deadline.
        Some(deadline) => Box::pin(tokio::time::sleep_until(deadline)).await,
        None => std::future::pending().await,
    }
}

/// Send a keepalive ping now (flushed: the peer is silent, so nothing else will flush it).
async fn send_ping<W: AsyncWrite + Unpin>(sink: &mut FrameWriter<W>) -> Result<(), WebSocketError> {
    sink.write_frame(keepalive_ping()).await?;
    sink.flush().await
}

fn keepalive_ping() -> Frame<'static> {
    Frame::new(
        true,
        OpCode::Ping,
        None,
        Payload::Borrowed(KEEPALIVE_PAYLOAD),
    )
}

/// How a whole session ended, for logs and counters.
#[derive(Debug)]
pub struct SessionEnd {
    pub upstream: PumpEnd,
    pub client: PumpEnd,
    /// Why the router ended the session, if it did.
    pub stopped: Option<&'static str>,
}

/// The router ending a session: what each side is told.
#[derive(Debug)]
pub struct Stop {
    pub why: &'static str,
    // Boxed: a session's future has room for a Stop while it runs, and a Stop is rare.
    pub to_client: Box<CloseOrder>,
    pub to_upstream: Box<CloseOrder>,
}

impl Stop {
    /// SIGTERM/SIGINT: 1001 ("going away") to both sides.
    pub fn shutdown() -> Stop {
        let going_away = || CloseOrder {
            error_json: None,
            close: Some((1001, "router shutting down".into())),
        };
        Stop {
            why: "shutdown",
            to_client: Box::new(going_away()),
            to_upstream: Box::new(going_away()),
        }
    }

    /// Move the client elsewhere: a retryable JSON error and 1012 ("service restart"), so it
    /// reconnects and is balanced again.
    pub fn reconnect(why: &'static str, message: &str) -> Stop {
        Stop {
            why,
            to_client: Box::new(CloseOrder {
                error_json: Some(error_json(why, message)),
                close: Some((1012, "reconnect".into())),
            }),
            to_upstream: Box::new(CloseOrder {
                error_json: None,
                close: Some((1001, "session moved".into())),
            }),
        }
    }

    fn idle() -> Stop {
        let idle = || CloseOrder {
            error_json: None,
            close: Some((1001, "idle timeout".into())),
        };
        Stop {
            why: "idle_timeout",
            to_client: Box::new(idle()),
            to_upstream: Box::new(idle()),
        }
    }

    fn unresponsive(side: Direction) -> Stop {
        let no_answer = || CloseOrder {
            error_json: None,
            close: Some((1001, "no answer to ping".into())),
        };
        match side {
            // The client went silent.
            Direction::ToUpstream => Stop {
                why: "client_unresponsive",
                to_client: Box::new(no_answer()),
                to_upstream: Box::new(CloseOrder {
                    error_json: None,
                    close: Some((1001, "client went away".into())),
                }),
            },
            Direction::ToClient => Stop {
                why: "worker_unresponsive",
                to_client: Box::new(CloseOrder {
                    error_json: Some(error_json(
                        "worker_failed",
                        "the worker stopped answering pings",
                    )),
                    close: Some((1011, "worker_failed".into())),
                }),
                to_upstream: Box::new(no_answer()),
            },
        }
    }
}

/// Keepalive settings of a session; `None` turns a mechanism off.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keepalive {
    /// Ping a side that has sent nothing for this long; if it still sends nothing for as long
    /// again, it is considered gone.
    pub ping_interval: Option<Duration>,
    /// End the session when no frame has been forwarded either way for this long.
    pub idle_timeout: Option<Duration>,
}

/// The bridge's view of one side's liveness.
struct Liveness {
    heard_at: Instant,
    pinged_at: Option<Instant>,
}

/// What a keepalive look found.
enum Look {
    /// The pumps (by the direction they write) that must send a ping; often none.
    Ping(Vec<Direction>),
    End(Stop),
}

/// Keepalive bookkeeping, run on a timer tick.
struct Watch {
    config: Keepalive,
    ticks: tokio::time::Interval,
    forwarded_at: Instant,
    /// Indexed by the direction of the pump that reads the side: [client, replica].
    sides: [Liveness; 2],
}

impl Watch {
    /// The bookkeeping for `config`; none when it asks for no keepalive. Boxed, so sessions
    /// without keepalive do not carry its room.
    fn new(config: Keepalive, now: Instant) -> Option<Box<Watch>> {
        let period = Watch::period(&config)?;
        let mut ticks = tokio::time::interval_at(now + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let side = || Liveness {
            heard_at: now,
            pinged_at: None,
        };
        Some(Box::new(Watch {
            config,
            ticks,
            forwarded_at: now,
            sides: [side(), side()],
        }))
    }

    /// How often to look: a quarter of the idle timeout bounds how late it fires.
    fn period(config: &Keepalive) -> Option<Duration> {
        let idle = config.idle_timeout.map(|t| t / 4);
        match (config.ping_interval, idle) {
            (Some(p), Some(i)) => Some(p.min(i)),
            (p, i) => p.or(i),
        }
        .map(|t| t.max(Duration::from_millis(10)))
    }

    /// Take in what the pumps heard since the last look, then decide.
    fn look(&mut self, heard: [&AtomicU8; 2], now: Instant) -> Look {
        for (side, bits) in self.sides.iter_mut().zip(heard) {
            let bits = bits.swap(0, Ordering::Relaxed);
            if bits & heard::ANY != 0 {
                side.heard_at = now;
                side.pinged_at = None;
            }
            if bits & heard::FORWARDED != 0 {
                self.forwarded_at = now;
            }
        }
        if let Some(idle) = self.config.idle_timeout {
            if now - self.forwarded_at >= idle {
                return Look::End(Stop::idle());
            }
        }
        let Some(interval) = self.config.ping_interval else {
            return Look::Ping(Vec::new());
        };
        let mut pings = Vec::new();
        for (side, direction) in self
            .sides
            .iter_mut()
            .zip([Direction::ToUpstream, Direction::ToClient])
        {
            match side.pinged_at {
                Some(pinged) if now - pinged >= interval => {
                    return Look::End(Stop::unresponsive(direction));
                }
                Some(_) => {}
                None if now - side.heard_at >= interval => {
                    side.pinged_at = Some(now);
                    // The ping goes out through the pump that writes to that side.
                    pings.push(match direction {
                        Direction::ToUpstream => Direction::ToClient,
                        Direction::ToClient => Direction::ToUpstream,
                    });
                }
                None => {}
            }
        }
        Look::Ping(pings)
    }
}

/// The limits a session's pumps work within.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// How long to wait for a peer's Close reply.
    pub close_timeout: Duration,
    pub max_frame_bytes: usize,
}

/// Run both pumps until the session is over, or until `stop` (or the keepalive watch) ends it.
#[allow(clippy::too_many_arguments)]
pub async fn bridge<CS, CW, US, UW>(
    client_read: &mut CS,
    client_write: &mut FrameWriter<CW>,
    upstream_read: &mut US,
    upstream_write: &mut FrameWriter<UW>,
    limits: SessionLimits,
    keepalive: Keepalive,
    mut stop: impl Future<Output = Stop> + Unpin,
    traffic: &Traffic,
) -> SessionEnd
where
    CS: Source,
    CW: AsyncWrite + Unpin,
    US: Source,
    UW: AsyncWrite + Unpin,
{
    let SessionLimits {
        close_timeout,
        max_frame_bytes,
    } = limits;
    let (to_up, to_down) = (Inbox::default(), Inbox::default());
    let heard_from_client = AtomicU8::new(0);
    let heard_from_upstream = AtomicU8::new(0);
    let up = pump(
        client_read,
        upstream_write,
        Direction::ToUpstream,
        Link {
            orders: &to_up,
            stats: &traffic.to_upstream,
            heard: &heard_from_client,
        },
        close_timeout,
        max_frame_bytes,
    );
    let down = pump(
        upstream_read,
        client_write,
        Direction::ToClient,
        Link {
            orders: &to_down,
            stats: &traffic.to_client,
            heard: &heard_from_upstream,
        },
        close_timeout,
        max_frame_bytes,
    );
    tokio::pin!(up, down);

    // Bound on waiting for the other pump once one has ended: its own drain deadline plus slack.
    let within = close_timeout + Duration::from_secs(1);
    let mut watch = Watch::new(keepalive, Instant::now());

    let stop = loop {
        tokio::select! {
            end = &mut up => {
                // The client side stopped: tell the client (through the down pump) what it is owed.
                let order = match &end {
                    PumpEnd::SourceClosed => None,
                    // A client that broke the protocol first gets what its replica already sent
                    // (the replica was just told 1001), then its close code.
                    PumpEnd::SourceFailed { owed_close: Some(code), .. } => {
                        to_down.post(Order::CloseAfterSource(Box::new(CloseOrder {
                            error_json: None,
                            close: Some((*code, "protocol error".into())),
                        })));
                        None
                    }
                    PumpEnd::SourceFailed { owed_close: None, .. } => Some(CloseOrder::default()),
                    PumpEnd::SinkFailed(error) => Some(CloseOrder {
                        error_json: Some(error_json("worker_failed", &format!("the connection to the worker failed: {error}"))),
                        close: Some((1011, "worker_failed".into())),
                    }),
                    PumpEnd::Ordered => None,
                };
                if let Some(order) = order {
                    to_down.post(Order::Close(Box::new(order)));
                }
                // The ending steps are boxed: the session future then only needs room for
                // the running state, which is what every open session holds.
                let client = Box::pin(finish(&mut down, within)).await;
                return SessionEnd { upstream: end, client, stopped: None };
            }
            end = &mut down => {
                let order = match &end {
                    PumpEnd::SourceClosed => None,
                    PumpEnd::SourceFailed { owed_close, .. } => Some(CloseOrder {
                        error_json: None,
                        close: owed_close.map(|code| (code, "protocol error".to_string())),
                    }),
                    PumpEnd::SinkFailed(_) => Some(CloseOrder {
                        error_json: None,
                        close: Some((1001, "client went away".into())),
                    }),
                    PumpEnd::Ordered => None,
                };
                if let Some(order) = order {
                    to_up.post(Order::Close(Box::new(order)));
                }
                let upstream = Box::pin(finish(&mut up, within)).await;
                return SessionEnd { upstream, client: end, stopped: None };
            }
            stop = &mut stop => break stop,
            watch = tick(&mut watch) => {
                match watch.look([&heard_from_client, &heard_from_upstream], Instant::now()) {
                    Look::Ping(pings) => for pump in pings {
                        let inbox = match pump {
                            Direction::ToClient => &to_down,
                            Direction::ToUpstream => &to_up,
                        };
                        inbox.post(Order::Ping);
                    },
                    Look::End(stop) => break stop,
                }
            }
        }
    };
    to_up.post(Order::Close(stop.to_upstream));
    to_down.post(Order::Close(stop.to_client));
    let (upstream, client) =
        Box::pin(async { tokio::join!(finish(&mut up, within), finish(&mut down, within)) }).await;
    SessionEnd {
        upstream,
        client,
        stopped: Some(stop.why),
    }
}

/// The next keepalive tick; never, without keepalive.
async fn tick(watch: &mut Option<Box<Watch>>) -> &mut Watch {
    match watch {
        Some(watch) => {
            watch.ticks.tick().await;
            watch
        }
        None => std::future::pending().await,
    }
}

async fn finish(pump: impl Future<Output = PumpEnd>, within: Duration) -> PumpEnd {
    tokio::time::timeout(within, pump)
        .await
        .unwrap_or(PumpEnd::Ordered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::pin::Pin;
    use std::task::Context;
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
    async fn inbox_gives_close_orders_first_and_keeps_the_first_of_each() {
        let close = |code| {
            Box::new(CloseOrder {
                error_json: None,
                close: Some((code, String::new())),
            })
        };
        let code = |order: Option<Order>| match order {
            Some(Order::Close(o)) | Some(Order::CloseAfterSource(o)) => o.close.unwrap().0,
            Some(Order::Ping) => 0,
            None => 1,
        };
        let inbox = Inbox::default();
        assert_eq!(code(inbox.take()), 1, "empty");
        inbox.post(Order::Ping);
        inbox.post(Order::Ping);
        inbox.post(Order::Close(close(1001)));
        inbox.post(Order::Close(close(1011)));
        inbox.post(Order::CloseAfterSource(close(1002)));
        assert_eq!(code(inbox.take()), 1002);
        assert_eq!(code(inbox.take()), 1001, "the first close order stands");
        assert_eq!(code(inbox.take()), 0, "two pings merge into one");
        assert_eq!(code(inbox.take()), 1, "empty again");

        // A pump already waiting is woken by a post.
        let mut waiting = std::pin::pin!(inbox.next());
        let first = std::future::poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        inbox.post(Order::Close(close(1000)));
        let order = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(code(order.ok()), 1000);
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
        inbox.post(Order::Close(Box::new(CloseOrder {
            error_json: None,
            close: Some((1001, "router shutting down".into())),
        })));
        let stats = DirectionStats::default();
        let heard = AtomicU8::new(0);
        let link = Link {
            orders: &inbox,
            stats: &stats,
            heard: &heard,
        };
        let end = pump(
            &mut source,
            &mut sink,
            Direction::ToClient,
            link,
            Duration::from_millis(50),
            1024,
        )
        .await;
        assert!(
            matches!(end, PumpEnd::Ordered),
            "the order must win over a source that never pauses: {end:?}"
        );
    }

    #[test]
    fn close_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = close_frame(1011, &reason);
        assert!(frame.payload.len() <= 125);
        assert!(std::str::from_utf8(&frame.payload[2..]).is_ok());
    }
}
