//! The relay: two frame pumps, one per direction, run by a bridge that tells each what the
//! other's end means for it, carries out the router's orders (shutdown, close on unhealthy,
//! lifetime, keepalive) and reports how the session ended in the close vocabulary.

mod closing;
mod keepalive;
mod orders;
mod pump;
pub(crate) mod splice;
mod stream;

pub(crate) use closing::{drain_until_close, write_order};
pub(crate) use keepalive::{Keepalive, Watch};
pub use orders::{CloseOrder, Inbox, Order};
pub use pump::{pump, Direction, Link, PumpEnd, PumpOutcome, PumpState, Sink, Source};

use std::future::Future;
use std::sync::atomic::AtomicU8;
use std::time::Duration;

use tokio::time::Instant;

use crate::close::{CloseReason, RequestId};
use crate::frames::FrameWriter;
use crate::metrics::Traffic;
use keepalive::{tick, Look};

/// The limits a session's pumps work within.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// How long to wait for a peer's Close reply.
    pub close_timeout: Duration,
    pub max_frame_bytes: usize,
    /// permessage-deflate was negotiated end to end: compressed messages pass as they are.
    pub compression: bool,
    /// A replica's streamed payloads that pass as they are may be spliced to the client
    /// (`[listen] splice`; plain TCP on epoll only).
    pub splice: bool,
}

/// How a whole session ended.
#[derive(Debug)]
pub(crate) struct SessionEnd {
    pub reason: CloseReason,
    /// The close code on the client's connection: the one it sent first, or was sent.
    pub client_code: Option<u16>,
    /// The close code on the replica's connection, likewise.
    pub replica_code: Option<u16>,
    /// The pump reading the client, and the one reading the replica.
    pub upstream: PumpOutcome,
    pub client: PumpOutcome,
}

impl SessionEnd {
    /// Both Close frames passed: neither peer may send more.
    pub fn closed_cleanly(&self) -> bool {
        matches!(
            (&self.upstream.end, &self.client.end),
            (PumpEnd::SourceClosed { .. }, PumpEnd::SourceClosed { .. })
        )
    }

    /// What went wrong, for the log: the failing side's error, if any.
    pub fn error(&self) -> Option<String> {
        let describe = |end: &PumpEnd, side: &str| match end {
            PumpEnd::SourceFailed { error, .. } => Some(format!("{side} read: {error}")),
            PumpEnd::SinkFailed(error) => Some(format!("{side} write: {error}")),
            _ => None,
        };
        describe(&self.upstream.end, "client").or_else(|| describe(&self.client.end, "replica"))
    }
}

/// Run both pumps until the session is over, or until `stop` (or the keepalive watch) ends it.
/// A plain fn around an async block: an async fn would keep its arguments twice, and every
/// open session holds this future.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
pub(crate) fn bridge<'a, CS, CW, US, UW>(
    client_read: &'a mut CS,
    client_write: &'a mut FrameWriter<CW>,
    upstream_read: &'a mut US,
    upstream_write: &'a mut FrameWriter<UW>,
    limits: SessionLimits,
    mut watch: Option<Box<Watch>>,
    mut stop: impl Future<Output = CloseReason> + Unpin + 'a,
    traffic: [&'a Traffic; 2],
    request_id: RequestId,
) -> impl Future<Output = SessionEnd> + 'a
where
    CS: Source,
    CW: Sink,
    US: Source,
    UW: Sink,
{
    async move {
        let [router_traffic, replica_traffic] = traffic;
        let (to_up, to_down) = (Inbox::default(), Inbox::default());
        let heard_from_client = AtomicU8::new(0);
        let heard_from_upstream = AtomicU8::new(0);
        let up = pump(
            client_read,
            upstream_write,
            PumpState::new(
                Direction::ToUpstream,
                Link {
                    orders: &to_up,
                    stats: &router_traffic.to_upstream,
                    replica_stats: &replica_traffic.to_upstream,
                    heard: &heard_from_client,
                    request_id,
                },
                &limits,
            ),
        );
        let down = pump(
            upstream_read,
            client_write,
            PumpState::new(
                Direction::ToClient,
                Link {
                    orders: &to_down,
                    stats: &router_traffic.to_client,
                    replica_stats: &replica_traffic.to_client,
                    heard: &heard_from_upstream,
                    request_id,
                },
                &limits,
            ),
        );
        tokio::pin!(up, down);

        // Bound on waiting for the other pump once one has ended: its own drain deadline plus
        // slack. Worked out when needed: every open session holds this future.
        let within = || limits.close_timeout + Duration::from_secs(1);

        let reason = loop {
            tokio::select! {
                outcome = &mut up => {
                    // The client side stopped: tell the client (through the down pump) what it is owed.
                    let reason = match &outcome.end {
                        PumpEnd::SourceClosed { .. } | PumpEnd::Ordered { .. } => CloseReason::ClientClosed,
                        PumpEnd::SourceFailed { owed: Some(code), .. } => {
                            // A client that broke the protocol first gets what its replica already
                            // sent (the replica was just told 1001), then its close code.
                            let reason = CloseReason::ClientProtocolError { code: *code };
                            to_down.post(Order::CloseAfterSource(Box::new(reason.to_client(None, None).into())));
                            reason
                        }
                        PumpEnd::SourceFailed { owed: None, .. } => {
                            to_down.post(Order::Close(Box::default()));
                            CloseReason::ClientGone
                        }
                        PumpEnd::SinkFailed(_) => {
                            let reason = CloseReason::WorkerFailed;
                            to_down.post(Order::Close(Box::new(reason.to_client(None, Some(request_id)).into())));
                            reason
                        }
                    };
                    // The ending steps are boxed: the session future then only needs room for
                    // the running state, which is what every open session holds.
                    let client = Box::pin(finish(&mut down, within())).await;
                    return ended(reason, outcome, client);
                }
                outcome = &mut down => {
                    let reason = match &outcome.end {
                        PumpEnd::SourceClosed { .. } | PumpEnd::Ordered { .. } => CloseReason::WorkerClosed,
                        PumpEnd::SourceFailed { error, owed, .. } => {
                            let reason = pump::source_failure_reason(Direction::ToClient, error);
                            to_up.post(Order::Close(Box::new(reason.to_replica(*owed).into())));
                            reason
                        }
                        PumpEnd::SinkFailed(_) => {
                            let reason = CloseReason::ClientGone;
                            to_up.post(Order::Close(Box::new(reason.to_replica(None).into())));
                            reason
                        }
                    };
                    let upstream = Box::pin(finish(&mut up, within())).await;
                    return ended(reason, upstream, outcome);
                }
                reason = &mut stop => break reason,
                () = tick(&mut watch) => {
                    let watch = watch.as_mut().expect("only a watch ticks");
                    match watch.look([&heard_from_client, &heard_from_upstream], Instant::now()) {
                        Look::Ping(pings) => for pump in pings {
                            let inbox = match pump {
                                Direction::ToClient => &to_down,
                                Direction::ToUpstream => &to_up,
                            };
                            inbox.post(Order::Ping);
                        },
                        Look::End(reason) => break reason,
                    }
                }
            }
        };
        to_up.post(Order::Close(Box::new(reason.to_replica(None).into())));
        to_down.post(Order::Close(Box::new(
            reason.to_client(None, Some(request_id)).into(),
        )));
        let (upstream, client) = Box::pin(async {
            tokio::join!(finish(&mut up, within()), finish(&mut down, within()))
        })
        .await;
        ended(reason, upstream, client)
    }
}

/// Put a session's end together: `upstream` read the client, `client` read the replica.
fn ended(reason: CloseReason, upstream: PumpOutcome, client: PumpOutcome) -> SessionEnd {
    let (client_code, replica_code) = match reason {
        CloseReason::ClientClosed => {
            let code = upstream.end.source_code();
            (code, client.end.source_code().or(code))
        }
        CloseReason::WorkerClosed => {
            let code = client.end.source_code();
            (upstream.end.source_code().or(code), code)
        }
        _ => (
            client.end.sink_code().or(upstream.end.source_code()),
            upstream.end.sink_code().or(client.end.source_code()),
        ),
    };
    SessionEnd {
        reason,
        client_code,
        replica_code,
        upstream,
        client,
    }
}

async fn finish(pump: impl Future<Output = PumpOutcome>, within: Duration) -> PumpOutcome {
    tokio::time::timeout(within, pump)
        .await
        .unwrap_or(PumpOutcome {
            end: PumpEnd::Ordered {
                told: None,
                answer: None,
            },
            frames: 0,
            bytes: 0,
        })
}
