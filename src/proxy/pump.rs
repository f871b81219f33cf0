//! Frame pumps: one per direction, forwarding frames unchanged in type and fragmentation
//! (no message reassembly), with writes coalesced: a pump flushes its sink only when the
//! next read from its source would block.
//!
//! The session ends through close frames passed through both ways, through a failure on one
//! side (the other side is told why), or through an order from the router (shutdown).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketRead, WebSocketWrite};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::stats::{DirectionStats, Traffic};

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
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => None,
        WebSocketError::FrameTooLarge => Some(1009),
        WebSocketError::InvalidUTF8 => Some(1007),
        _ => Some(1002),
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

/// Nothing is ever owed by the reader with auto_close and auto_pong off.
fn no_obligated_send(_: Frame<'_>) -> std::future::Ready<Result<(), std::io::Error>> {
    std::future::ready(Ok(()))
}

/// Configure a freshly split WebSocket for forwarding: control frames are the peer's business.
pub fn configure<R, W>(
    read: &mut WebSocketRead<R>,
    write: &mut WebSocketWrite<W>,
    max_frame_bytes: usize,
) {
    read.set_auto_close(false);
    read.set_auto_pong(false);
    // fastwebsockets rejects payloads >= the limit; ours is inclusive.
    read.set_max_message_size(max_frame_bytes.saturating_add(1));
    write.set_writev(true);
    write.set_writev_threshold(16 * 1024);
}

pub fn split<R, W>(
    read: R,
    write: W,
    role: Role,
    max_frame_bytes: usize,
) -> (WebSocketRead<R>, WebSocketWrite<W>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut r, mut w) = fastwebsockets::after_handshake_split(read, write, role);
    configure(&mut r, &mut w, max_frame_bytes);
    (r, w)
}

pub async fn write_order<W: AsyncWrite + Unpin>(sink: &mut WebSocketWrite<W>, order: CloseOrder) {
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
    source: &mut WebSocketRead<R>,
    deadline: Instant,
) {
    let mut send = no_obligated_send;
    while let Ok(Ok(frame)) = tokio::time::timeout_at(deadline, source.read_frame(&mut send)).await
    {
        if frame.opcode == OpCode::Close {
            return;
        }
    }
}

/// One read's outcome inside the pump.
enum Step<'f> {
    Read(Result<Frame<'f>, WebSocketError>),
    /// An order was carried out while a read was in flight; this is that read's result.
    Ordered(
        Result<Result<Frame<'f>, WebSocketError>, tokio::time::error::Elapsed>,
        Instant,
    ),
}

/// Forward frames from `source` to `sink` until one side closes or fails, or an order arrives.
pub async fn pump<R, W>(
    source: &mut WebSocketRead<R>,
    sink: &mut WebSocketWrite<W>,
    direction: Direction,
    order: oneshot::Receiver<CloseOrder>,
    close_timeout: Duration,
    stats: &DirectionStats,
) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut counted = Counted::default();
    let end = forward(
        source,
        sink,
        direction,
        order,
        close_timeout,
        stats,
        &mut counted,
    )
    .await;
    stats.add(counted.frames, counted.bytes);
    end
}

/// Frames forwarded but not yet added to the shared counters.
#[derive(Default)]
struct Counted {
    frames: u64,
    bytes: u64,
}

async fn forward<R, W>(
    source: &mut WebSocketRead<R>,
    sink: &mut WebSocketWrite<W>,
    direction: Direction,
    order: oneshot::Receiver<CloseOrder>,
    close_timeout: Duration,
    stats: &DirectionStats,
    counted: &mut Counted,
) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut order = Some(order);
    let mut send = no_obligated_send;
    loop {
        // Between frames no read is in flight, so an order can be carried out here at no risk;
        // this is what stops a source that never pauses (a replica streaming non-stop).
        if let Some(received) = take_ready_order(&mut order) {
            write_order(sink, received).await;
            drain_until_close(source, Instant::now() + close_timeout).await;
            return PumpEnd::Ordered;
        }
        // `read_frame` is not cancel-safe: the in-flight read stays pinned and is polled to
        // its end even while an order is carried out.
        let step = {
            let read = source.read_frame(&mut send);
            tokio::pin!(read);
            match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
                Poll::Ready(result) => Step::Read(result),
                Poll::Pending => {
                    // Nothing more to read right now: push out what was coalesced.
                    stats.add(
                        std::mem::take(&mut counted.frames),
                        std::mem::take(&mut counted.bytes),
                    );
                    if let Err(e) = sink.flush().await {
                        return PumpEnd::SinkFailed(e.to_string());
                    }
                    tokio::select! {
                        result = &mut read => Step::Read(result),
                        received = OptionalOrder(&mut order) => {
                            write_order(sink, received).await;
                            let deadline = Instant::now() + close_timeout;
                            Step::Ordered(tokio::time::timeout_at(deadline, &mut read).await, deadline)
                        }
                    }
                }
            }
        };

        let frame = match step {
            Step::Ordered(Ok(Ok(frame)), deadline) => {
                if frame.opcode != OpCode::Close {
                    drain_until_close(source, deadline).await;
                }
                return PumpEnd::Ordered;
            }
            Step::Ordered(_, _) => return PumpEnd::Ordered,
            Step::Read(Ok(frame)) => frame,
            Step::Read(Err(error)) => {
                write_order(sink, failure_notice(direction, &error)).await;
                return PumpEnd::SourceFailed {
                    owed_close: close_code_for(&error),
                    error: error.to_string(),
                };
            }
        };

        let is_close = frame.opcode == OpCode::Close;
        counted.frames += 1;
        counted.bytes += frame.payload.len() as u64;
        let frame = match direction {
            // Frames towards the client must carry no mask, whatever the replica sent.
            Direction::ToClient => Frame::new(frame.fin, frame.opcode, None, frame.payload),
            // The client's mask key is reused when the frame is re-masked for the replica.
            Direction::ToUpstream => frame,
        };
        if let Err(e) = sink.write_frame(frame).await {
            return PumpEnd::SinkFailed(e.to_string());
        }
        if is_close {
            if let Err(e) = sink.flush().await {
                return PumpEnd::SinkFailed(e.to_string());
            }
            return PumpEnd::SourceClosed;
        }
    }
}

/// An order that has already arrived, if any (never waits).
fn take_ready_order(order: &mut Option<oneshot::Receiver<CloseOrder>>) -> Option<CloseOrder> {
    match order.as_mut()?.try_recv() {
        Ok(received) => {
            *order = None;
            Some(received)
        }
        Err(oneshot::error::TryRecvError::Empty) => None,
        Err(oneshot::error::TryRecvError::Closed) => {
            *order = None;
            None
        }
    }
}

/// A oneshot receiver that may already be used up: then it never resolves.
struct OptionalOrder<'a>(&'a mut Option<oneshot::Receiver<CloseOrder>>);

impl Future for OptionalOrder<'_> {
    type Output = CloseOrder;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<CloseOrder> {
        let Some(rx) = self.0.as_mut() else {
            return Poll::Pending;
        };
        match Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(order)) => {
                *self.0 = None;
                Poll::Ready(order)
            }
            Poll::Ready(Err(_)) => {
                *self.0 = None;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// How a whole session ended, for logs and counters.
#[derive(Debug)]
pub struct SessionEnd {
    pub upstream: PumpEnd,
    pub client: PumpEnd,
    pub shutdown: bool,
}

/// Run both pumps until the session is over. `shutdown` resolving makes the router say 1001
/// ("going away") to both sides.
#[allow(clippy::too_many_arguments)]
pub async fn bridge<CR, CW, UR, UW>(
    client_read: &mut WebSocketRead<CR>,
    client_write: &mut WebSocketWrite<CW>,
    upstream_read: &mut WebSocketRead<UR>,
    upstream_write: &mut WebSocketWrite<UW>,
    close_timeout: Duration,
    shutdown: impl Future<Output = ()>,
    traffic: &Traffic,
) -> SessionEnd
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let (order_up_tx, order_up_rx) = oneshot::channel();
    let (order_down_tx, order_down_rx) = oneshot::channel();
    let up = pump(
        client_read,
        upstream_write,
        Direction::ToUpstream,
        order_up_rx,
        close_timeout,
        &traffic.to_upstream,
    );
    let down = pump(
        upstream_read,
        client_write,
        Direction::ToClient,
        order_down_rx,
        close_timeout,
        &traffic.to_client,
    );
    tokio::pin!(up, down, shutdown);

    // Bound on waiting for the other pump once one has ended: its own drain deadline plus slack.
    let within = close_timeout + Duration::from_secs(1);

    tokio::select! {
        end = &mut up => {
            // The client side stopped: tell the client (through the down pump) what it is owed.
            let order = match &end {
                PumpEnd::SourceClosed => None,
                PumpEnd::SourceFailed { owed_close, .. } => Some(CloseOrder {
                    error_json: None,
                    close: owed_close.map(|code| (code, "protocol error".to_string())),
                }),
                PumpEnd::SinkFailed(error) => Some(CloseOrder {
                    error_json: Some(error_json("worker_failed", &format!("the connection to the worker failed: {error}"))),
                    close: Some((1011, "worker_failed".into())),
                }),
                PumpEnd::Ordered => None,
            };
            if let Some(order) = order {
                let _ = order_down_tx.send(order);
            }
            let client = finish(&mut down, within).await;
            SessionEnd { upstream: end, client, shutdown: false }
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
                let _ = order_up_tx.send(order);
            }
            let upstream = finish(&mut up, within).await;
            SessionEnd { upstream, client: end, shutdown: false }
        }
        () = &mut shutdown => {
            let going_away = || Some((1001, "router shutting down".to_string()));
            let _ = order_up_tx.send(CloseOrder { error_json: None, close: going_away() });
            let _ = order_down_tx.send(CloseOrder { error_json: None, close: going_away() });
            let (upstream, client) = tokio::join!(finish(&mut up, within), finish(&mut down, within));
            SessionEnd { upstream, client, shutdown: true }
        }
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

    #[tokio::test]
    async fn an_order_is_carried_out_even_when_the_source_never_pauses() {
        // Unmasked binary frames, as a replica sends them; 4 MB of them, then EOF.
        let source = NeverPausing {
            frame: &[0x82, 0x02, 1, 2],
            at: 0,
            left: 4 << 20,
        };
        let (mut source, _) = split(source, tokio::io::sink(), Role::Client, 1024);
        let (_, mut sink) = split(tokio::io::empty(), Vec::<u8>::new(), Role::Server, 1024);
        let (tx, rx) = oneshot::channel();
        tx.send(CloseOrder {
            error_json: None,
            close: Some((1001, "router shutting down".into())),
        })
        .unwrap();
        let stats = DirectionStats::default();
        let end = pump(
            &mut source,
            &mut sink,
            Direction::ToClient,
            rx,
            Duration::from_millis(50),
            &stats,
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
