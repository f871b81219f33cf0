//! The HTTP side: each accepted connection is served by hyper with a tower stack.
//!
//! ```text
//!   request id            (RequestIdLayer: an id per request, for logs and the client)
//!   trace                 (tower-http TraceLayer: one span per request and its session)
//!   routes                (stream path, /health, /ready, /status, /metrics, 404)
//!   └─ stream path:
//!      open session       (the edge: 101 and spawn, or the one answer for every refusal)
//!      upgrade check      (426 / 400 / 405 / 417; body or Expect refused)
//!      drain gate         (503 while shutting down)
//!      session permit     (503 + Retry-After at max_sessions or the client's limit)
//!      select             (candidates from the snapshot, or gpu_unavailable)
//!      join               (fast-join racing over the connector: timeout, handshake, TCP)
//! ```
//!
//! Each layer is small and takes its state in its constructor, so it is tested with
//! `oneshot` and no sockets. Errors travel as [`Refusal`] to the edge, which alone turns them
//! into an answer and counts them.

mod admin;
mod forwarding;
mod join;
mod layers;
mod respond;
mod routes;

pub use forwarding::upstream_request;
pub(crate) use join::RaceSettings;
pub use layers::{check_upgrade, HandshakeRefusal};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admission::{ConnectionGuard, SessionGate};
use crate::balance::Balancer;
use crate::config::{Cidr, Config, Io};
use crate::metrics::{Label, Metrics, TlsAccept};
use crate::registry::Registry;
use crate::relay::{Keepalive, SessionLimits};
use crate::session::{ServerTls, SessionContext, SessionSettings};

pub(crate) type Body = Full<Bytes>;

/// Largest request head (request line plus headers) accepted; beyond it, 431.
const MAX_REQUEST_HEAD_BYTES: usize = 32 * 1024;

/// The reloadable part of the HTTP side's configuration.
pub(crate) struct HttpSettings {
    pub stream_path: String,
    pub trusted_proxies: Vec<Cidr>,
    pub header_read_timeout: Duration,
    pub balancer: Balancer,
    pub race: RaceSettings,
    /// The listener's TLS settings (`listen.tls`), certificate included: a reload that
    /// renews the certificate applies to connections accepted from then on.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl HttpSettings {
    pub fn new(config: &Config) -> HttpSettings {
        let balance = &config.balance;
        HttpSettings {
            stream_path: config.listen.stream_path.clone(),
            trusted_proxies: config.listen.trusted_proxies.clone(),
            header_read_timeout: config.limits.header_read_timeout,
            balancer: Balancer::new(balance.policy, balance.sticky_key.clone()),
            race: RaceSettings {
                candidates: balance.race_candidates,
                delay: balance.race_delay,
                connect_timeout: config.limits.connect_timeout,
            },
            tls: config.listen.tls.as_ref().map(|tls| tls.config.clone()),
        }
    }
}

fn session_settings(config: &Config) -> SessionSettings {
    SessionSettings {
        limits: SessionLimits {
            close_timeout: config.limits.close_timeout,
            max_frame_bytes: config.limits.max_frame_bytes,
            // Negotiated per session: see `session::run`.
            compression: false,
            splice: config.listen.splice,
        },
        keepalive: Keepalive {
            ping_interval: config.sessions.ping_interval,
            idle_timeout: config.sessions.idle_timeout,
        },
        close_on_unhealthy: config.sessions.close_on_unhealthy,
        max_lifetime: config.sessions.max_lifetime,
        stream_path: config.listen.stream_path.clone(),
    }
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoints {
    /// The stream path, /health and /ready; /status and /metrics too when `admin` is false.
    Public { admin: bool },
    /// /status, /metrics, /health and /ready only.
    Admin,
}

/// What the HTTP side shares across connections and workers.
pub(crate) struct Proxy {
    pub registry: Arc<Registry>,
    pub settings: Arc<ArcSwap<HttpSettings>>,
    pub sessions: Arc<SessionGate>,
    pub session_context: Arc<SessionContext>,
    pub metrics: Arc<Metrics>,
    /// Turns true when the router stops: no new connections or sessions, /ready says draining.
    pub shutdown: watch::Receiver<bool>,
    /// Whether /status and /metrics are on the public listener.
    pub public_admin: bool,
    /// Open connections and their limit, for /status and /metrics.
    pub connections: Arc<crate::admission::ConnectionGate>,
    /// Plain-TCP sessions move to their worker's io_uring ring after the 101.
    pub io_uring: bool,
}

impl Proxy {
    pub fn new(
        registry: Arc<Registry>,
        config: &Config,
        sessions: Arc<SessionGate>,
        connections: Arc<crate::admission::ConnectionGate>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        close_all: watch::Receiver<bool>,
    ) -> Proxy {
        Proxy {
            registry,
            settings: Arc::new(ArcSwap::from_pointee(HttpSettings::new(config))),
            sessions,
            session_context: Arc::new(SessionContext {
                settings: ArcSwap::from_pointee(session_settings(config)),
                metrics: metrics.clone(),
                close_all,
            }),
            metrics,
            shutdown,
            public_admin: config.admin.is_none(),
            connections,
            io_uring: config.listen.io == Io::IoUring && crate::uring::usable(),
        }
    }

    /// Take a reloaded config for requests and sessions that start from now on. Built first,
    /// swapped after: nothing is half-applied.
    pub fn reconfigure(&self, config: &Config) {
        let mut http = HttpSettings::new(config);
        // Whether the listener speaks TLS is fixed at start (clients' urls depend on it): a
        // reload renews the certificate, but does not turn TLS on or off.
        let running_tls = self.settings.load().tls.clone();
        if http.tls.is_some() != running_tls.is_some() {
            http.tls = running_tls;
        }
        let http = Arc::new(http);
        let session = Arc::new(session_settings(config));
        self.sessions.reconfigure(&config.limits);
        self.connections
            .reconfigure(&config.limits, &config.listen.trusted_proxies);
        self.settings.store(http);
        self.session_context.settings.store(session);
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Serve one accepted connection: TLS first when the listener has it, then HTTP/1.1 with
    /// upgrades, a header-read timeout (the TLS handshake included), and bounded request
    /// heads (hyper answers 431 beyond the buffer). `guard` holds the connection's place
    /// under the connection limits until the connection (or its session) ends.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        endpoints: Endpoints,
        guard: ConnectionGuard,
    ) {
        // No Nagle and TCP keepalive: inherited from the listener (see `server::listen`).
        let settings = self.settings.load();
        let header_read_timeout = settings.header_read_timeout;
        let tls = match endpoints {
            Endpoints::Public { .. } => settings.tls.clone(),
            // The admin listener is for the operator's network: plain HTTP.
            Endpoints::Admin => None,
        };
        drop(settings);
        let guard = Arc::new(guard);
        let Some(tls) = tls else {
            let service = routes::stack::<_, TcpStream>(self, peer, endpoints, guard);
            return serve_http(stream, service, header_read_timeout, peer).await;
        };
        let started = Instant::now();
        let accepted =
            tokio::time::timeout(header_read_timeout, accept_tls(stream, tls, peer)).await;
        let outcome = match accepted {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(outcome)) => Err(outcome),
            Err(_) => Err(TlsAccept::TimedOut),
        };
        match outcome {
            Ok(stream) => {
                self.metrics.tls_accepts.add(TlsAccept::Completed);
                // The handshake spent part of the time the client has to send its request.
                let left = header_read_timeout
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_millis(1));
                let service = routes::stack::<_, ServerTls>(self, peer, endpoints, guard);
                serve_http(stream, service, left, peer).await;
            }
            Err(outcome) => {
                self.metrics.tls_accepts.add(outcome);
                tracing::debug!(%peer, outcome = outcome.label(), "TLS handshake did not complete");
            }
        }
    }
}

/// The body of the answer to a plain HTTP request on the TLS listener, so that a client
/// pointed at the wrong scheme learns why rather than seeing the connection drop.
const PLAIN_HTTP_ON_TLS_PORT: &str =
    "{\"error\":\"tls_required\",\"message\":\"this port speaks TLS: connect with wss://\"}\n";

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Complete the client's TLS handshake, or say why not.
async fn accept_tls(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
) -> Result<ServerTls, TlsAccept> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(1) => {
            // Best effort: the client may be gone already.
            let mut stream = stream;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{PLAIN_HTTP_ON_TLS_PORT}",
                PLAIN_HTTP_ON_TLS_PORT.len()
            );
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer.as_bytes()).await;
            // Read what the client sent before closing, or the close may reset the connection
            // and destroy the answer in flight (bounded by the caller's timeout and 16 KiB).
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            let mut sink = Vec::with_capacity(4096);
            while sink.len() < 16 * 1024 {
                match tokio::io::AsyncReadExt::read_buf(&mut stream, &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            return Err(TlsAccept::NotTls);
        }
        _ => return Err(TlsAccept::Failed),
    }
    tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|e| {
            tracing::debug!(%peer, error = %crate::tls::describe(&e), "client TLS handshake failed");
            TlsAccept::Failed
        })
}

/// Serve HTTP/1.1 on an established connection with `service`.
async fn serve_http<I, S, R>(io: I, service: S, header_read_timeout: Duration, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<R>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    R: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let result = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_REQUEST_HEAD_BYTES)
        .serve_connection(
            TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(service),
        )
        .with_upgrades()
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
