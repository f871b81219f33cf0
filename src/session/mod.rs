//! A session from its 101 to its end: the client's upgraded socket and the replica's are
//! handed to the relay, the router's reasons to end it early are watched, and the end is
//! counted and written to the access log. Also the short life of a refused session: a 101
//! only to tell the client why there is no session.

mod socket;

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use fastwebsockets::Role;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admission::{ConnectionGuard, SessionPermit};
use crate::close::{CloseReason, Notice, RequestId};
use crate::frames::FrameReader;
use crate::metrics::{CloseCode, Metrics};
use crate::registry::{Replica, SessionGuard, Status};
use crate::relay::{self, CloseOrder, Keepalive, SessionEnd, SessionLimits};
use crate::upstream::{Upstream, UpstreamStream};
use futures_util::future::{Either, FutureExt};
use socket::{client_halves, finish_socket, upstream_halves, ClientSocket, ReadSide, WriteSide};
use tokio::net::TcpStream;

use crate::uring::{Ring, RingSocket};
pub(crate) use socket::{ClientTls, ServerTls, Transport};

/// What sessions read when they start (swapped whole on reload; live sessions keep theirs).
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub limits: SessionLimits,
    pub keepalive: Keepalive,
    pub close_on_unhealthy: bool,
    pub max_lifetime: Option<Duration>,
    /// For the access log.
    pub stream_path: String,
}

/// What every session shares.
pub struct SessionContext {
    pub settings: ArcSwap<SessionSettings>,
    pub metrics: Arc<Metrics>,
    /// Turns true when the stopping router closes every session with 1001.
    pub close_all: watch::Receiver<bool>,
}

/// Who a session (or a refused upgrade) is for, as the access log names it, and since when.
#[derive(Debug, Clone)]
pub struct Peer {
    pub request_id: RequestId,
    /// The TCP peer.
    pub addr: IpAddr,
    /// X-Forwarded-For as a trusted front proxy sent it.
    pub forwarded_for: Option<Box<str>>,
    pub started: Instant,
}

/// A session's hold on its resources: the router-wide and per-client permit, the client
/// connection's place and the replica's slot, all released when it drops.
pub struct Session {
    /// Boxed: only the access log reads it, and every open session holds this struct.
    pub peer: Box<Peer>,
    pub replica: Arc<Replica>,
    // Held for what their drop gives back: the replica's slot, the session permit and the
    // client connection's place under the connection limits.
    #[allow(dead_code)]
    pub slot: SessionGuard,
    #[allow(dead_code)]
    pub permit: Option<SessionPermit>,
    #[allow(dead_code)]
    pub connection: Arc<ConnectionGuard>,
}

/// What a session carries from its opening into the relay, on either data plane.
pub(crate) struct Opening {
    pub context: Arc<SessionContext>,
    pub session: Session,
    /// Both agreed on permessage-deflate: compressed messages pass through as they are.
    pub compression: bool,
}

/// Bridge an upgraded client and a connected replica until the session ends.
///
/// Built from combinators rather than one async block: what the upgrade needs and what the
/// relay needs then share room (an async block keeps its captures for its whole life), and
/// every open session holds this future.
/// `leftover`: the bytes the replica sent past its 101.
pub(crate) fn run<C, U>(
    opening: Opening,
    upgrade: hyper::upgrade::OnUpgrade,
    upstream: U,
    leftover: bytes::Bytes,
) -> impl Future<Output = ()> + Send + 'static
where
    C: Transport + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: Transport,
{
    // Split out here: the future then holds the halves, not the handshake's leftovers.
    let upstream = upstream_halves(upstream, leftover);
    ClientSocket::<C>::upgrade(upgrade).then(move |client| match client {
        Some(client) => Either::Left(relay_session::<C, U>(
            opening,
            client.into_halves(),
            upstream,
        )),
        None => Either::Right(std::future::ready(())),
    })
}

/// As [`run`] for a plain-TCP client and replica, whose sockets move onto this worker's
/// io_uring `ring` once the client's upgrade is done.
pub(crate) fn run_on_ring(
    opening: Opening,
    upgrade: hyper::upgrade::OnUpgrade,
    upstream: TcpStream,
    leftover: bytes::Bytes,
    ring: Arc<Ring>,
) -> impl Future<Output = ()> + Send + 'static {
    ClientSocket::<TcpStream>::upgrade(upgrade).then(move |client| {
        let adopted = client.map(|client| {
            let (stream, client_leftover) = client.into_parts();
            (
                RingSocket::adopt(stream, ring.clone()),
                RingSocket::adopt(upstream, ring),
                client_leftover,
            )
        });
        match adopted {
            Some((Ok(client), Ok(upstream), client_leftover)) => {
                opening
                    .context
                    .metrics
                    .ring_sessions
                    .fetch_add(1, Ordering::Relaxed);
                Either::Left(relay_session::<RingSocket, RingSocket>(
                    opening,
                    client_halves(client, client_leftover),
                    upstream_halves(upstream, leftover),
                ))
            }
            Some((Err(error), _, _) | (_, Err(error), _)) => {
                tracing::warn!(%error, "cannot move a session's sockets onto the ring");
                Either::Right(std::future::ready(()))
            }
            None => Either::Right(std::future::ready(())),
        }
    })
}

/// The session itself, from the 101 on: the relay, the record of its end, and the sockets'
/// close.
#[allow(clippy::manual_async_fn)]
fn relay_session<C: Transport, U: Transport>(
    opening: Opening,
    (mut client_read, mut client_write): (ReadSide<C>, WriteSide<C>),
    (mut upstream_read, mut upstream_write): (ReadSide<U>, WriteSide<U>),
) -> impl Future<Output = ()> + Send + 'static {
    // Taken apart outside the async block, which would otherwise keep the whole and its parts.
    let Opening {
        context,
        session,
        compression,
    } = opening;
    async move {
        let (limits, keepalive) = {
            let settings = context.settings.load();
            let limits = SessionLimits {
                compression,
                ..settings.limits
            };
            (limits, settings.keepalive)
        };
        let end = relay::bridge(
            &mut client_read,
            &mut client_write,
            &mut upstream_read,
            &mut upstream_write,
            limits,
            keepalive.watch(Instant::now()),
            // Boxed: the session future then holds it once, not as argument and local.
            Box::pin(stop_signal(&context, &session.replica)),
            [&context.metrics.traffic, session.replica.traffic()],
            session.peer.request_id,
        )
        .await;
        // Boxed: rare, and every open session's future would otherwise have room for it.
        Box::pin(record_end(&context, &session, &end)).await;
        let closed_cleanly = end.closed_cleanly();
        // The session is over; lingering on the sockets does not count against limits.
        drop(session);
        if closed_cleanly {
            // Both Close frames have passed, so neither peer may send more: closing now
            // cannot reset anything in flight. Closing straight away, without tokio's
            // half-close on dropping a write half and without the linger, saves three
            // system calls per session.
            C::close_now(client_read.into_inner(), client_write.into_inner());
            U::close_now(upstream_read.into_inner(), upstream_write.into_inner());
            return;
        }
        tokio::join!(finish_socket::<C>(client_read, client_write), async {
            let _ = upstream_write.shutdown().await;
        });
    }
}

/// Resolves when the router must end a session on `replica`: shutdown, the replica turning
/// unhealthy (with `close_on_unhealthy`), or the session reaching its maximum lifetime.
fn stop_signal(
    context: &SessionContext,
    replica: &Replica,
) -> impl Future<Output = CloseReason> + Send + 'static {
    let mut close_all = context.close_all.clone();
    let settings = context.settings.load();
    let status = settings.close_on_unhealthy.then(|| replica.watch_status());
    let lifetime = settings.max_lifetime;
    drop(settings);
    // On the heap and only when configured: every open session holds this future.
    let optional = (status.is_some() || lifetime.is_some())
        .then(|| Box::pin(unhealthy_or_expired(status, lifetime)));
    async move {
        let optional = async {
            match optional {
                Some(stop) => stop.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = close_all.wait_for(|closing| *closing) => CloseReason::Shutdown,
            stop = optional => stop,
        }
    }
}

/// The optional reasons to end a session: its replica turning unhealthy (`status` is watched
/// only with close_on_unhealthy) and its maximum lifetime.
async fn unhealthy_or_expired(
    mut status: Option<watch::Receiver<Status>>,
    lifetime: Option<Duration>,
) -> CloseReason {
    let unhealthy = async {
        let turned = match status.as_mut() {
            Some(status) => status.wait_for(|s| *s == Status::Unhealthy).await.is_ok(),
            None => false,
        };
        if !turned {
            std::future::pending::<()>().await;
        }
    };
    let expired = async {
        match lifetime {
            Some(lifetime) => tokio::time::sleep(lifetime).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = unhealthy => CloseReason::WorkerUnhealthy,
        () = expired => CloseReason::SessionExpired,
    }
}

/// Count a session's end and write its access-log line.
async fn record_end(context: &SessionContext, session: &Session, end: &SessionEnd) {
    let metrics = &context.metrics;
    let duration = session.peer.started.elapsed();
    metrics.ended.add(end.reason);
    metrics.client_close_codes.add(CloseCode(end.client_code));
    metrics.replica_close_codes.add(CloseCode(end.replica_code));
    metrics.session_seconds.observe(duration);
    let settings = context.settings.load();
    let peer = &session.peer;
    tracing::info!(
        target: "wsrouter::access",
        request_id = %peer.request_id,
        peer = %peer.addr,
        forwarded_for = %peer.forwarded_for.as_deref().unwrap_or("-"),
        path = %settings.stream_path,
        status = 101,
        replica = %session.replica.name,
        duration_ms = duration.as_millis() as u64,
        to_replica_frames = end.upstream.frames,
        to_replica_bytes = end.upstream.bytes,
        to_client_frames = end.client.frames,
        to_client_bytes = end.client.bytes,
        client_close = %code_text(end.client_code),
        replica_close = %code_text(end.replica_code),
        reason = %end.reason.label(),
        error = end.error().as_deref().unwrap_or("-"),
        "session"
    );
}

fn code_text(code: Option<u16>) -> String {
    code.map_or_else(|| "-".to_string(), |c| c.to_string())
}

/// Complete the client's upgrade only to tell it why there is no session (`reason`, with
/// `detail` as the message when given), then wait (bounded) for its Close. The permit is held
/// until then, so a drain waits for these too.
pub(crate) async fn refuse<C>(
    context: Arc<SessionContext>,
    upgrade: hyper::upgrade::OnUpgrade,
    peer: Peer,
    reason: CloseReason,
    detail: Option<String>,
    permit: Option<SessionPermit>,
) where
    C: Transport + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let notice: Notice = reason.to_client(detail, Some(peer.request_id));
    let told = notice.close.map(|(code, _)| code);
    context.metrics.ended.add(reason);
    context.metrics.client_close_codes.add(CloseCode(told));
    let (close_timeout, max_frame_bytes, path) = {
        let settings = context.settings.load();
        (
            settings.limits.close_timeout,
            settings.limits.max_frame_bytes,
            settings.stream_path.clone(),
        )
    };
    tracing::info!(
        target: "wsrouter::access",
        request_id = %peer.request_id,
        peer = %peer.addr,
        forwarded_for = %peer.forwarded_for.as_deref().unwrap_or("-"),
        path = %path,
        status = 101,
        replica = "-",
        client_close = %code_text(told),
        reason = %reason.label(),
        "session refused"
    );
    let Some(client) = ClientSocket::<C>::upgrade(upgrade).await else {
        return;
    };
    let (mut read, mut write) = client.into_halves();
    relay::write_order(&mut write, CloseOrder::from(notice)).await;
    let mut frames = FrameReader::new(Role::Server, max_frame_bytes);
    relay::drain_until_close(&mut frames, &mut read, Instant::now() + close_timeout).await;
    drop(permit);
    tracing::trace!(
        elapsed_ms = peer.started.elapsed().as_millis() as u64,
        "refusal done"
    );
    finish_socket::<C>(read, write).await;
}

/// Close a replica connection nobody will use (a handshake that lost a race): Close 1001,
/// then a bounded wait for the reply.
pub async fn close_unused(context: Arc<SessionContext>, upstream: Upstream) {
    match upstream.stream {
        UpstreamStream::Tcp(stream) => {
            close_unused_on(context, stream, upstream.leftover, upstream.compression).await
        }
        UpstreamStream::Tls(stream) => {
            close_unused_on(context, *stream, upstream.leftover, upstream.compression).await
        }
    }
}

async fn close_unused_on<U: Transport>(
    context: Arc<SessionContext>,
    stream: U,
    leftover: bytes::Bytes,
    compression: bool,
) {
    let (close_timeout, max_frame_bytes) = {
        let settings = context.settings.load();
        (
            settings.limits.close_timeout,
            settings.limits.max_frame_bytes,
        )
    };
    let (mut read, mut write) = upstream_halves(stream, leftover);
    let order = CloseOrder {
        error_json: None,
        close: Some((1001, "lost the race to another replica")),
    };
    relay::write_order(&mut write, order).await;
    let mut frames = FrameReader::new(Role::Client, max_frame_bytes).compressed(compression);
    relay::drain_until_close(&mut frames, &mut read, Instant::now() + close_timeout).await;
    let _ = write.shutdown().await;
}

#[cfg(test)]
mod budget {
    use super::*;

    /// What every open session holds, in bytes: its task's future (tokio puts it in a cell
    /// with 200 bytes of its own, aligned to 128, so 1,848 bytes make a 2,048-byte cell; 1 byte
    /// more makes it 2,176, which the allocator serves from its 2,560-byte bin) and the
    /// structs inside it. Measured on x86_64; the README's idle-memory figure rests on these.
    const SESSION_FUTURE: usize = 1848;
    const SESSION: usize = 64;
    const FRAME_READER: usize = 48;

    /// The size of what `f` returns.
    fn returned_size<A, B, C, D, E, R>(_: fn(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[tokio::test]
    async fn an_idle_session_stays_within_its_memory_budget() {
        let config = crate::Config::parse("[[replicas]]\nurl = \"http://127.0.0.1:1\"\n").unwrap();
        let registry = crate::registry::Registry::new(&config);
        let replica = registry.replicas().remove(0);
        let slot = replica.try_reserve_session().unwrap();
        let gate = crate::admission::SessionGate::new(10, &config.limits);
        let connections = crate::admission::ConnectionGate::new(10, &config.limits, &[]);
        let localhost: IpAddr = "127.0.0.1".parse().unwrap();
        let connection = Arc::new(connections.admit(localhost).ok().unwrap());
        let permit = gate.acquire(crate::client::ClientKey::from(localhost)).ok();
        let (_close_all, close_all) = watch::channel(false);
        let context = Arc::new(SessionContext {
            settings: ArcSwap::from_pointee(SessionSettings {
                limits: SessionLimits {
                    close_timeout: Duration::from_secs(1),
                    max_frame_bytes: 1 << 20,
                    compression: false,
                    splice: false,
                },
                keepalive: Keepalive::default(),
                close_on_unhealthy: false,
                max_lifetime: None,
                stream_path: "/v1/stream".into(),
            }),
            metrics: Arc::new(Metrics::default()),
            close_all,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let session = Session {
            peer: Box::new(Peer {
                request_id: RequestId(1),
                addr: localhost,
                forwarded_for: None,
                started: Instant::now(),
            }),
            replica,
            slot,
            permit,
            connection,
        };
        let mut request = hyper::Request::new(());
        let upgrade = hyper::upgrade::on(&mut request);
        let opening = Opening {
            context,
            session,
            compression: false,
        };
        let future = run::<tokio::net::TcpStream, tokio::net::TcpStream>(
            opening,
            upgrade,
            stream,
            bytes::Bytes::new(),
        );
        let sizes = [
            (
                "session future",
                std::mem::size_of_val(&future),
                SESSION_FUTURE,
            ),
            (
                "session future on a ring",
                returned_size(run_on_ring as fn(_, _, _, _, _) -> _),
                SESSION_FUTURE,
            ),
            ("Session", std::mem::size_of::<Session>(), SESSION),
            (
                "FrameReader",
                std::mem::size_of::<FrameReader>(),
                FRAME_READER,
            ),
        ];
        for (what, size, budget) in sizes {
            assert!(
                size <= budget,
                "{what} is {size} bytes, over its budget of {budget}: every idle session pays for it \
                 (see the budget's comment before raising it)"
            );
        }
    }
}
