//! The proxy: the HTTP service (routing, session limit, upgrade), the upstream connect with
//! failover, and the session task that bridges client and replica.

pub mod handshake;
pub mod pump;
pub mod reader;
pub mod stats;
mod writer;

pub use writer::FrameWriter;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use fastwebsockets::Role;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::admin;
use crate::balance::{Balancer, NoCandidate};
use crate::config::{optional_seconds, seconds, Config, Limits};
use crate::registry::{Observation, Registry, Replica, SessionGuard, Status};
use handshake::{Upstream, UpstreamError};
use pump::{CloseOrder, Keepalive, PumpEnd, Stop};
use stats::{Rejection, Stats};

pub type Body = Full<Bytes>;

/// The path clients open their WebSocket on (and the path used on the replicas).
pub const STREAM_PATH: &str = "/v1/stream";

/// Largest request head (request line plus headers) accepted; beyond it, 431.
const MAX_REQUEST_HEAD_BYTES: usize = 32 * 1024;

/// A session's hold on its resources: the router-wide permit and the replica's slot, both
/// released when it drops.
struct Session {
    id: u64,
    replica: Arc<Replica>,
    _slot: SessionGuard,
    _permit: OwnedSemaphorePermit,
}

/// Shared state of the HTTP service.
pub struct Proxy {
    registry: Arc<Registry>,
    /// Swapped whole on reload; a session reads it once when it starts.
    settings: ArcSwap<Settings>,
    stats: Stats,
    /// Fixed for the process lifetime (the semaphore's size).
    max_sessions: usize,
    sessions: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    next_session_id: AtomicU64,
}

/// The reloadable part of the proxy's configuration.
struct Settings {
    limits: Limits,
    balancer: Balancer,
    race_candidates: usize,
    race_delay: Duration,
    close_on_unhealthy: bool,
    max_lifetime: Option<Duration>,
    keepalive: Keepalive,
}

impl Settings {
    fn new(config: &Config) -> Settings {
        let (balance, sessions) = (&config.balance, &config.sessions);
        Settings {
            limits: config.limits.clone(),
            balancer: Balancer::new(balance.policy, balance.sticky_key.clone()),
            race_candidates: balance.race_candidates,
            race_delay: seconds(balance.race_delay_seconds),
            close_on_unhealthy: sessions.close_on_unhealthy,
            max_lifetime: optional_seconds(sessions.max_lifetime_seconds),
            keepalive: Keepalive {
                ping_interval: optional_seconds(sessions.ping_interval_seconds),
                idle_timeout: optional_seconds(sessions.idle_timeout_seconds),
            },
        }
    }
}

impl Proxy {
    pub fn new(registry: Arc<Registry>, config: &Config, shutdown: watch::Receiver<bool>) -> Proxy {
        let max_sessions = config.limits.max_sessions;
        Proxy {
            registry,
            settings: ArcSwap::from_pointee(Settings::new(config)),
            stats: Stats::default(),
            max_sessions,
            sessions: Arc::new(Semaphore::new(max_sessions)),
            shutdown,
            next_session_id: AtomicU64::new(1),
        }
    }

    /// Take a reloaded config for sessions that start from now on. `limits.max_sessions`
    /// keeps its first value: changing it needs a restart.
    pub fn reconfigure(&self, config: &Config) {
        self.settings.store(Arc::new(Settings::new(config)));
    }

    pub fn active_sessions(&self) -> usize {
        self.max_sessions - self.sessions.available_permits()
    }

    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Wait until every session (and every handshake in progress) has finished.
    pub async fn drained(&self) {
        let all = u32::try_from(self.max_sessions).unwrap_or(u32::MAX);
        let _ = self.sessions.acquire_many(all).await;
    }

    /// Serve one accepted connection: HTTP/1.1 with upgrades, a header-read timeout, and
    /// bounded request heads (hyper answers 431 beyond the buffer).
    pub async fn serve_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let proxy = self.clone();
        let service = tower::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
        });
        let result = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(seconds(
                self.settings.load().limits.header_read_timeout_seconds,
            ))
            .max_header_size(MAX_REQUEST_HEAD_BYTES)
            .serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .with_upgrades()
            .await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with error");
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (_, STREAM_PATH) => self.handle_stream(req, peer).await,
            (&hyper::Method::GET, "/health") => admin::health(),
            (&hyper::Method::GET, "/metrics") => admin::metrics(
                &self.registry.snapshot(),
                &self.stats,
                self.active_sessions(),
            ),
            (&hyper::Method::GET, "/status") => admin::status(
                &self.registry.snapshot(),
                self.active_sessions(),
                self.max_sessions(),
            ),
            _ => admin::json_response(
                StatusCode::NOT_FOUND,
                &admin::error_body("not_found", "no such endpoint"),
            ),
        }
    }

    async fn handle_stream(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        if let Err(refusal) = handshake::check_client_request(&req) {
            let mut response = admin::json_response(
                refusal.status,
                &admin::error_body("bad_handshake", refusal.message),
            );
            if refusal.status == StatusCode::UPGRADE_REQUIRED
                || refusal.status == StatusCode::BAD_REQUEST
            {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            if refusal.status == StatusCode::UPGRADE_REQUIRED {
                response
                    .headers_mut()
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            }
            return response;
        }
        if self.shutting_down() {
            return unavailable("the router is shutting down");
        }
        let Ok(permit) = self.sessions.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = self.max_sessions, "session limit reached");
            self.stats.reject(Rejection::SessionLimit);
            return unavailable("the router is at its session limit");
        };
        let id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
        let client_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _body) = req.into_parts();
        let accept = handshake::accept_key(parts.headers[header::SEC_WEBSOCKET_KEY].as_bytes());

        let candidates: Result<Vec<Arc<Replica>>, NoCandidate> = {
            let settings = self.settings.load();
            let balancer = &settings.balancer;
            balancer
                .candidates(&self.registry.snapshot(), balancer.session_key(&parts))
                .map(|c| c.into_iter().map(|r| r.replica.clone()).collect())
        };
        let candidates = match candidates {
            Ok(candidates) => candidates,
            Err(reason) => {
                return self.unavailable_session(id, peer, reason, client_upgrade, permit, &accept)
            }
        };

        let parts = Arc::new(parts);
        let failures = match self
            .clone()
            .join_upstream(id, candidates, parts.clone(), peer)
            .await
        {
            Joined::Won(replica, slot, upstream) => {
                replica.count_session();
                tracing::debug!(session = id, %peer, replica = %replica.name, "session open");
                let response = switching_protocols(&accept, Some(&upstream));
                let session = Session {
                    id,
                    replica,
                    _slot: slot,
                    _permit: permit,
                };
                let (upstream_read, upstream_write) = upstream_halves(upstream);
                tokio::spawn(self.clone().run_session(
                    session,
                    client_upgrade,
                    upstream_read,
                    upstream_write,
                ));
                return response;
            }
            Joined::Refused(replica, status) => {
                tracing::info!(session = id, replica = %replica.name, status = status.as_u16(), "replica refused the upgrade");
                return admin::json_response(
                    status,
                    &admin::error_body(
                        "upstream_refused",
                        &format!(
                            "the worker refused the session with HTTP {}",
                            status.as_u16()
                        ),
                    ),
                );
            }
            Joined::Failed(failures) => failures,
        };
        if failures.is_empty() {
            // Every candidate filled up between selection and reservation.
            return self.unavailable_session(
                id,
                peer,
                NoCandidate::AllAtCapacity,
                client_upgrade,
                permit,
                &accept,
            );
        }
        self.stats.reject(Rejection::ConnectFailed);
        let order = CloseOrder {
            error_json: Some(pump::error_json(
                "worker_failed",
                &format!("could not reach any worker ({})", failures.join("; ")),
            )),
            close: Some((1011, "worker_failed".into())),
        };
        tokio::spawn(self.clone().refuse_session(client_upgrade, order, permit));
        switching_protocols(&accept, None)
    }

    /// Complete an upstream handshake with one of `candidates`, in order. Up to
    /// `race_candidates` attempts run at once: the next one starts when the last started has
    /// run alone for `race_delay_seconds`, or at once when an attempt fails. The first
    /// completed handshake wins; attempts still in flight are abandoned before any session
    /// exists upstream, and ones that completed too late are closed with 1001.
    async fn join_upstream(
        self: Arc<Self>,
        id: u64,
        candidates: Vec<Arc<Replica>>,
        parts: Arc<Parts>,
        peer: SocketAddr,
    ) -> Joined {
        let settings = self.settings.load_full();
        let timeout = seconds(settings.limits.connect_timeout_seconds);
        let mut failures = Vec::new();
        if settings.race_candidates <= 1 {
            // No racing: one attempt at a time, run here rather than as a task of its own.
            for replica in candidates {
                let Some(slot) = replica.try_reserve_session() else {
                    continue;
                };
                let started = Instant::now();
                let result = handshake::connect(&replica, &parts, peer, timeout).await;
                let attempt = Attempt {
                    replica,
                    slot,
                    started,
                    result,
                };
                if let Some(joined) = self.settle(id, attempt, &mut failures) {
                    return joined;
                }
            }
            return Joined::Failed(failures);
        }
        let mut pending = candidates.into_iter();
        let mut attempts = JoinSet::new();
        let mut next_start = tokio::time::Instant::now();
        loop {
            let may_start = attempts.len() < settings.race_candidates && pending.len() > 0;
            if may_start && (attempts.is_empty() || tokio::time::Instant::now() >= next_start) {
                // Reserve before connecting so concurrent handshakes cannot overshoot capacity.
                let Some((replica, slot)) = pending.by_ref().find_map(|replica| {
                    let slot = replica.try_reserve_session()?;
                    Some((replica, slot))
                }) else {
                    continue;
                };
                let parts = parts.clone();
                attempts.spawn(async move {
                    let started = Instant::now();
                    let result = handshake::connect(&replica, &parts, peer, timeout).await;
                    Attempt {
                        replica,
                        slot,
                        started,
                        result,
                    }
                });
                next_start = tokio::time::Instant::now() + settings.race_delay;
                continue;
            }
            let attempt = tokio::select! {
                joined = attempts.join_next() => match joined {
                    None => return Joined::Failed(failures),
                    Some(Ok(attempt)) => attempt,
                    Some(Err(e)) => {
                        failures.push(format!("handshake task failed: {e}"));
                        continue;
                    }
                },
                () = tokio::time::sleep_until(next_start), if may_start => continue,
            };
            match self.settle(id, attempt, &mut failures) {
                Some(joined) => {
                    self.dismiss_attempts(id, attempts);
                    return joined;
                }
                // A failure lets the next candidate start at once.
                None => next_start = tokio::time::Instant::now(),
            }
        }
    }

    /// The outcome of one finished attempt: a session (or the replica's refusal) ends the
    /// join; a failure is recorded against the replica's health and the join goes on.
    fn settle(&self, id: u64, attempt: Attempt, failures: &mut Vec<String>) -> Option<Joined> {
        let Attempt {
            replica,
            slot,
            started,
            result,
        } = attempt;
        match result {
            Ok(upstream) => {
                self.stats.handshake_seconds.observe(started.elapsed());
                Some(Joined::Won(replica, slot, upstream))
            }
            Err(UpstreamError::Refused(status)) => Some(Joined::Refused(replica, status)),
            Err(error) => {
                drop(slot);
                tracing::warn!(session = id, replica = %replica.name, %error, "upstream connect failed; trying the next replica");
                replica.count_connect_failure();
                // Passive health: a failed connect counts like a failed probe.
                self.registry.observe(
                    &replica,
                    Observation::Failure {
                        error: error.to_string(),
                        latency: None,
                    },
                );
                failures.push(format!("{}: {error}", replica.name));
                None
            }
        }
    }

    /// Abandon the attempts that lost a race: in-flight ones are dropped (no session exists
    /// upstream yet); any that completed meanwhile get a clean close.
    fn dismiss_attempts(self: &Arc<Self>, id: u64, mut attempts: JoinSet<Attempt>) {
        if attempts.is_empty() {
            return;
        }
        attempts.abort_all();
        let proxy = self.clone();
        tokio::spawn(async move {
            while let Some(joined) = attempts.join_next().await {
                let Ok(Attempt {
                    replica,
                    result: Ok(upstream),
                    ..
                }) = joined
                else {
                    continue;
                };
                tracing::debug!(session = id, replica = %replica.name, "closing a handshake that lost the race");
                proxy
                    .close_upstream(upstream, (1001, "lost the race to another replica"))
                    .await;
            }
        });
    }

    /// Close a replica connection nobody will use: Close frame, bounded wait for the reply.
    async fn close_upstream(&self, upstream: Upstream, (code, reason): (u16, &str)) {
        let (mut read, mut write) = upstream_halves(upstream);
        let order = CloseOrder {
            error_json: None,
            close: Some((code, reason.to_string())),
        };
        self.close_handshake(&mut read, &mut write, Role::Client, order)
            .await;
        let _ = write.shutdown().await;
    }

    /// Answer 101, then gpu_unavailable and close 1013: nothing can take the session now.
    fn unavailable_session(
        self: &Arc<Self>,
        id: u64,
        peer: SocketAddr,
        reason: NoCandidate,
        upgrade: hyper::upgrade::OnUpgrade,
        permit: OwnedSemaphorePermit,
        accept: &str,
    ) -> Response<Body> {
        let message = match reason {
            NoCandidate::NoHealthyReplica => {
                self.stats.reject(Rejection::NoHealthyReplica);
                "no healthy replica is available; try again shortly"
            }
            NoCandidate::AllAtCapacity => {
                self.stats.reject(Rejection::AtCapacity);
                "every healthy replica is at capacity; try again shortly"
            }
        };
        tracing::warn!(session = id, %peer, message, "session refused");
        let order = CloseOrder {
            error_json: Some(pump::error_json("gpu_unavailable", message)),
            close: Some((1013, "no_healthy_replica".into())),
        };
        tokio::spawn(self.clone().refuse_session(upgrade, order, permit));
        switching_protocols(accept, None)
    }

    /// Complete the client's upgrade only to tell it why there is no session.
    async fn refuse_session(
        self: Arc<Self>,
        upgrade: hyper::upgrade::OnUpgrade,
        order: CloseOrder,
        permit: OwnedSemaphorePermit,
    ) {
        let Some(client) = ClientSocket::upgrade(upgrade).await else {
            return;
        };
        let (mut read, mut write) = client.into_halves();
        self.close_handshake(&mut read, &mut write, Role::Server, order)
            .await;
        drop(permit);
        finish_socket(read, write).await;
    }

    /// Send `order` on a WebSocket nobody forwards to, then wait (bounded) for the peer's Close.
    async fn close_handshake<R, W>(
        &self,
        mut read: R,
        write: &mut FrameWriter<W>,
        role: Role,
        order: CloseOrder,
    ) where
        R: AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let settings = self.settings.load_full();
        let limits = &settings.limits;
        let mut frames = reader::FrameReader::new(role, limits.max_frame_bytes);
        pump::write_order(write, order).await;
        let deadline = tokio::time::Instant::now() + seconds(limits.close_timeout_seconds);
        pump::drain_until_close(&mut frames, &mut read, deadline).await;
    }

    /// Resolves when the router must end a session on `replica`: shutdown, the replica turning
    /// unhealthy (with `close_on_unhealthy`), or the session reaching its maximum lifetime.
    fn stop_signal(&self, replica: &Replica) -> impl std::future::Future<Output = Stop> {
        let mut shutdown = self.shutdown.clone();
        let settings = self.settings.load();
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
                _ = shutdown.wait_for(|stopping| *stopping) => Stop::shutdown(),
                stop = optional => stop,
            }
        }
    }

    /// Bridge an upgraded client and a connected replica until the session ends.
    ///
    /// An async block rather than an async fn: an async fn moves its arguments into locals and
    /// keeps both copies, and every open session holds this future.
    #[allow(clippy::manual_async_fn)]
    fn run_session(
        self: Arc<Self>,
        session: Session,
        upgrade: hyper::upgrade::OnUpgrade,
        mut upstream_read: Prefixed<OwnedReadHalf>,
        mut upstream_write: FrameWriter<OwnedWriteHalf>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        async move {
            let Some(client) = ClientSocket::upgrade(upgrade).await else {
                return;
            };
            let (mut client_read, mut client_write) = client.into_halves();
            let (limits, keepalive) = {
                let settings = self.settings.load();
                let limits = pump::SessionLimits {
                    close_timeout: seconds(settings.limits.close_timeout_seconds),
                    max_frame_bytes: settings.limits.max_frame_bytes,
                };
                (limits, settings.keepalive)
            };
            let end = pump::bridge(
                &mut client_read,
                &mut client_write,
                &mut upstream_read,
                &mut upstream_write,
                limits,
                keepalive,
                // Boxed: the session future then holds it once, not as argument and local.
                Box::pin(self.stop_signal(&session.replica)),
                &self.stats.traffic,
            )
            .await;
            if let Some(why) = end.stopped {
                self.stats.count_stop(why);
            }
            log_session_end(session.id, &session.replica, &end);
            // The session is over; lingering on the sockets does not count against limits.
            drop(session);
            if matches!(
                (&end.upstream, &end.client),
                (PumpEnd::SourceClosed, PumpEnd::SourceClosed)
            ) {
                // Both Close frames have passed, so neither peer may send more: closing now
                // cannot reset anything in flight. Closing straight away, without tokio's
                // half-close on dropping a write half and without the linger, saves three
                // system calls per session.
                client_write.into_inner().forget();
                upstream_write.into_inner().forget();
                return;
            }
            tokio::join!(finish_socket(client_read, client_write), async {
                let _ = upstream_write.shutdown().await;
            });
        }
    }
}

/// The optional reasons to end a session: its replica turning unhealthy (`status` is watched
/// only with close_on_unhealthy) and its maximum lifetime.
async fn unhealthy_or_expired(
    mut status: Option<watch::Receiver<Status>>,
    lifetime: Option<Duration>,
) -> Stop {
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
        () = unhealthy => Stop::reconnect(
            "worker_unhealthy",
            "the worker serving this session became unhealthy; reconnect to continue on another",
        ),
        () = expired => Stop::reconnect(
            "session_expired",
            "the session reached its maximum lifetime; reconnect to continue",
        ),
    }
}

/// A replica connection split for a session: reads start with the bytes read ahead during
/// the handshake.
fn upstream_halves(upstream: Upstream) -> (Prefixed<OwnedReadHalf>, FrameWriter<OwnedWriteHalf>) {
    let (read, write) = upstream.stream.into_split();
    (
        Prefixed::new(upstream.leftover, read),
        FrameWriter::new(write, Role::Client),
    )
}

/// One upstream handshake attempt, with the slot it reserved on its replica.
struct Attempt {
    replica: Arc<Replica>,
    slot: SessionGuard,
    started: Instant,
    result: Result<Upstream, UpstreamError>,
}

/// How joining a replica ended.
enum Joined {
    Won(Arc<Replica>, SessionGuard, Upstream),
    /// A replica answered the upgrade with a 4xx: its verdict on this request.
    Refused(Arc<Replica>, StatusCode),
    /// Every candidate failed (one line per replica), or none had a free slot (empty).
    Failed(Vec<String>),
}

fn log_session_end(id: u64, replica: &Replica, end: &pump::SessionEnd) {
    let failed = |p: &PumpEnd| matches!(p, PumpEnd::SourceFailed { .. } | PumpEnd::SinkFailed(_));
    if failed(&end.upstream) || failed(&end.client) {
        tracing::info!(session = id, replica = %replica.name, client_side = ?end.upstream, replica_side = ?end.client, "session ended abnormally");
    } else {
        tracing::debug!(session = id, replica = %replica.name, stopped_by_router = end.stopped, "session closed");
    }
}

fn unavailable(message: &str) -> Response<Body> {
    let mut response = admin::json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &admin::error_body("unavailable", message),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn switching_protocols(accept: &str, upstream: Option<&Upstream>) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(accept).expect("base64"),
    );
    if let Some(upstream) = upstream {
        for (name, value) in &upstream.response_headers {
            headers.append(name.clone(), value.clone());
        }
    }
    response
}

/// The client's socket after hyper has answered 101.
struct ClientSocket {
    stream: TcpStream,
    leftover: Bytes,
}

impl ClientSocket {
    async fn upgrade(upgrade: hyper::upgrade::OnUpgrade) -> Option<ClientSocket> {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed");
                return None;
            }
        };
        // Served by hyper's http1 builder directly on a TcpStream, so this cannot fail.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => Some(ClientSocket {
                stream: parts.io.into_inner(),
                leftover: parts.read_buf,
            }),
            Err(_) => {
                tracing::error!("upgraded client connection is not a TCP stream");
                None
            }
        }
    }

    fn into_halves(self) -> (Prefixed<OwnedReadHalf>, FrameWriter<OwnedWriteHalf>) {
        let (read, write) = self.stream.into_split();
        (
            Prefixed::new(self.leftover, read),
            FrameWriter::new(write, Role::Server),
        )
    }
}

/// Flush and half-close our side, then read until the peer closes too (bounded), so unread
/// bytes do not turn our close into a reset that could destroy the close frame in flight.
async fn finish_socket(mut read: Prefixed<OwnedReadHalf>, mut write: FrameWriter<OwnedWriteHalf>) {
    let _ = write.shutdown().await;
    // On the heap, not in the session's future: that would make every session 4 KiB larger.
    let mut sink = Vec::with_capacity(4096);
    let linger = async {
        loop {
            sink.clear();
            match tokio::io::AsyncReadExt::read_buf(&mut read, &mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), linger).await;
}

/// A read half that first yields bytes read ahead during the HTTP handshake.
pub struct Prefixed<R> {
    prefix: Bytes,
    inner: R,
}

impl<R> Prefixed<R> {
    pub fn new(prefix: Bytes, inner: R) -> Self {
        // An empty slice may still pin hyper's whole read buffer: let it go.
        let prefix = if prefix.is_empty() {
            Bytes::new()
        } else {
            prefix
        };
        Prefixed { prefix, inner }
    }
}

impl pump::Source for Prefixed<OwnedReadHalf> {
    const PARKS: bool = true;
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            Poll::Ready(Ok(()))
        } else {
            AsRef::<TcpStream>::as_ref(&self.inner).poll_read_ready(cx)
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}
