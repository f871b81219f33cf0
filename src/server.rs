//! The running router: listeners, worker threads, the accept loop with its connection limits,
//! the health loop, and the drain on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admission::{self, ConnectionGate, SessionGate};
use crate::config::{Config, DrainMode};
use crate::health::{self, HttpProbe, Probe};
use crate::http::{Endpoints, Proxy};
use crate::metrics::{Label, Metrics};
use crate::registry::Registry;
use crate::reload::Reloader;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot listen on {addr} (admin.listen): {source}")]
    Admin { addr: SocketAddr, source: io::Error },
    #[error("{0}")]
    Limits(String),
}

pub struct Router {
    /// One per worker, all on the same address (SO_REUSEPORT): the kernel hands each new
    /// connection to one worker's listener, so one accept wakes one worker. Non-blocking.
    listeners: Vec<std::net::TcpListener>,
    admin_listener: Option<std::net::TcpListener>,
    workers: usize,
    registry: Arc<Registry>,
    proxy: Arc<Proxy>,
    probe: Arc<dyn Probe>,
    config: Config,
    /// The config in force, shared with every reloader (the drain reads it when it starts).
    running: Arc<std::sync::Mutex<Config>>,
    /// Stop accepting and admitting.
    shutdown: watch::Sender<bool>,
    /// Close every session with 1001.
    close_all: watch::Sender<bool>,
    connections: Arc<ConnectionGate>,
    metrics: Arc<Metrics>,
}

/// How the shutdown went.
#[derive(Debug, PartialEq, Eq)]
pub enum Drain {
    /// Every session closed within the drain timeout.
    Complete,
    /// The drain timeout passed with this many sessions still open.
    TimedOut { sessions_left: usize },
}

/// How long the health loop waits for the first DNS lookups at start.
const FIRST_LOOKUPS: Duration = Duration::from_secs(5);

/// Connections the admin listener takes at once (it serves scrapes and probes, not clients).
const ADMIN_CONNECTIONS: usize = 64;

impl Router {
    /// Bind the listeners with the HTTP health probe.
    pub async fn bind(config: Config) -> Result<Router, StartError> {
        let probe = Arc::new(HttpProbe::new());
        Router::bind_with_probe(config, probe).await
    }

    /// Bind the listeners with a custom probe (tests drive health through it). The soft
    /// open-file limit is raised to the hard one, and the connection and session limits must
    /// fit it (defaults are lowered to fit, with a warning; explicit values that cannot fit are
    /// refused).
    pub async fn bind_with_probe(
        config: Config,
        probe: Arc<dyn Probe>,
    ) -> Result<Router, StartError> {
        let workers = config.workers();
        let open_files = crate::net::raise_open_file_limit().unwrap_or(u64::MAX);
        let reserved = admission::reserved_descriptors(config.replicas.len(), workers);
        let (max_connections, max_sessions, lowered) =
            admission::fit_to_open_files(&config.limits, open_files, reserved)
                .map_err(StartError::Limits)?;
        if let Some(why) = lowered {
            tracing::warn!("{why}");
        }
        let addr = config.listen_addr();
        let listen_error = |source| StartError::Listen { addr, source };
        let first = listen(addr).map_err(listen_error)?;
        // The others join the first's port (its own when `port = 0`).
        let bound = first.local_addr().map_err(listen_error)?;
        let mut listeners = vec![first];
        for _ in 1..workers {
            listeners.push(listen(bound).map_err(listen_error)?);
        }
        let admin_listener = match &config.admin {
            Some(admin) => Some(listen(admin.addr).map_err(|source| StartError::Admin {
                addr: admin.addr,
                source,
            })?),
            None => None,
        };
        let registry = Arc::new(Registry::new(&config));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (close_all, close_all_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let connections = ConnectionGate::new(
            max_connections,
            &config.limits,
            &config.listen.trusted_proxies,
        );
        let sessions = SessionGate::new(max_sessions, &config.limits);
        let proxy = Arc::new(Proxy::new(
            registry.clone(),
            &config,
            sessions,
            connections.clone(),
            metrics.clone(),
            shutdown_rx,
            close_all_rx,
        ));
        Ok(Router {
            listeners,
            admin_listener,
            workers,
            registry,
            proxy,
            probe,
            running: Arc::new(std::sync::Mutex::new(config.clone())),
            config,
            shutdown,
            close_all,
            connections,
            metrics,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listeners[0].local_addr().expect("bound listener")
    }

    /// Where /status and /metrics are served when `[admin] listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    /// Worker threads `serve` runs, worker 0 included.
    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The limits in force (after fitting them to the open-file limit).
    pub fn limits(&self) -> (usize, usize) {
        (self.connections.max(), self.proxy.sessions.max())
    }

    /// A handle that applies new configs to this router while it serves.
    pub fn reloader(&self) -> Reloader {
        Reloader::new(
            self.registry.clone(),
            self.proxy.clone(),
            self.metrics.clone(),
            self.running.clone(),
            self.limits(),
        )
    }

    /// Serve until `shutdown` resolves; then stop accepting and drain as `limits.drain_mode`
    /// (of the config in force then) says: send 1001 to both sides of every session at once,
    /// or let sessions end on their own for up to the drain timeout and close the rest then.
    /// Returns once every session is closed or the time is up.
    ///
    /// The calling runtime is worker 0: it accepts, serves sessions, runs the health loop and
    /// the admin listener. Each further worker is a thread with its own single-threaded
    /// runtime accepting from its own listener on the same address, so a session lives on one
    /// thread from accept to close. Dropping this future stops every worker and drops its
    /// sessions.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> Drain {
        let (first_lookups, looked_up) = tokio::sync::oneshot::channel();
        let discovery = tokio::spawn(crate::discovery::run(self.registry.clone(), first_lookups));
        let health = tokio::spawn({
            let (registry, probe) = (self.registry.clone(), self.probe.clone());
            async move {
                // The first probes go to what the first lookups found (bounded: DNS that does
                // not answer must not hold health back).
                let _ = tokio::time::timeout(FIRST_LOOKUPS, looked_up).await;
                health::run(registry, probe).await
            }
        });
        // Workers run until this is dropped: when serve returns or its future is dropped.
        let (_workers_alive, workers_stop) = watch::channel(());
        let mut listeners = std::mem::take(&mut self.listeners).into_iter();
        let own_listener = listeners.next().expect("one listener per worker");
        for (index, listener) in (1..).zip(listeners.by_ref()) {
            if let Err(error) = self.spawn_worker(index, listener, workers_stop.clone()) {
                tracing::error!(%error, index, "cannot start a worker thread; serving with fewer");
                break;
            }
        }
        // Listeners of workers that did not start: closed, so the kernel sends them nothing.
        drop(listeners);
        let admin = self.admin_listener.and_then(|listener| {
            let proxy = self.proxy.clone();
            let gate = ConnectionGate::new(ADMIN_CONNECTIONS, &self.config.limits, &[]);
            let mut stopping = self.shutdown.subscribe();
            match TcpListener::from_std(listener) {
                Ok(listener) => Some(tokio::spawn(async move {
                    // The admin listener stays up through the drain: /ready says "draining".
                    let stop = async move {
                        let _ = stopping.wait_for(|_| false).await;
                    };
                    accept_until(listener, proxy, gate, Endpoints::Admin, stop).await
                })),
                Err(error) => {
                    tracing::error!(%error, "cannot register the admin listener");
                    None
                }
            }
        });
        let endpoints = Endpoints::Public {
            admin: self.proxy.public_admin,
        };
        prepare_data_plane(&self.proxy);
        match TcpListener::from_std(own_listener) {
            Ok(listener) => {
                accept_until(
                    listener,
                    self.proxy.clone(),
                    self.connections.clone(),
                    endpoints,
                    shutdown,
                )
                .await
            }
            Err(error) => tracing::error!(%error, "cannot register the listener; not accepting"),
        }
        let _ = self.shutdown.send(true);
        let limits = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .limits
            .clone();
        let drain = drain(&self.proxy.sessions, &self.close_all, &limits).await;
        health.abort();
        discovery.abort();
        if let Some(admin) = admin {
            admin.abort();
        }
        drain
    }
    /// Start worker thread `index`: it accepts until shutdown is signalled, keeps serving its
    /// sessions while they drain, and drops them when `alive` closes.
    fn spawn_worker(
        &self,
        index: usize,
        listener: std::net::TcpListener,
        mut alive: watch::Receiver<()>,
    ) -> io::Result<()> {
        let proxy = self.proxy.clone();
        let gate = self.connections.clone();
        let mut shutdown = self.shutdown.subscribe();
        let endpoints = Endpoints::Public {
            admin: self.proxy.public_admin,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("wsrouter-worker-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let stopped = async {
                        let _ = shutdown.wait_for(|stopping| *stopping).await;
                    };
                    let serve = async {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                prepare_data_plane(&proxy);
                                accept_until(listener, proxy, gate, endpoints, stopped).await
                            }
                            Err(error) => {
                                tracing::error!(%error, index, "cannot register the listener")
                            }
                        }
                        std::future::pending::<()>().await
                    };
                    tokio::select! {
                        () = serve => {}
                        _ = alive.changed() => {}
                    }
                });
            })?;
        Ok(())
    }
}

/// Close the sessions as `limits.drain_mode` says; see [`Router::serve`].
async fn drain(
    sessions: &SessionGate,
    close_all: &watch::Sender<bool>,
    limits: &crate::config::Limits,
) -> Drain {
    let within = |timeout| async move {
        match tokio::time::timeout(timeout, sessions.drained()).await {
            Ok(()) => Drain::Complete,
            Err(_) => Drain::TimedOut {
                sessions_left: sessions.active(),
            },
        }
    };
    let open = sessions.active();
    match limits.drain_mode {
        DrainMode::Close => {
            tracing::info!(sessions = open, "shutting down: closing sessions with 1001");
            let _ = close_all.send(true);
            within(limits.drain_timeout).await
        }
        DrainMode::Wait => {
            tracing::info!(
                sessions = open,
                timeout_seconds = limits.drain_timeout.as_secs_f64(),
                "shutting down: waiting for sessions to end"
            );
            if let Drain::Complete = within(limits.drain_timeout).await {
                return Drain::Complete;
            }
            tracing::info!(
                sessions = sessions.active(),
                "drain timeout passed: closing the remaining sessions with 1001"
            );
            let _ = close_all.send(true);
            within(limits.close_timeout).await
        }
    }
}

/// Set up this worker's io_uring ring, when sessions go on one, before the first session.
fn prepare_data_plane(proxy: &Proxy) {
    if proxy.io_uring {
        let _ = crate::uring::Ring::current();
    }
}

/// How many connections may wait for accept(2); the kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Every worker listens on the address, and a new instance can bind it while this one
    // drains: a restart drops nothing. Safe for port 0 too: the kernel never picks a port for
    // it that another SO_REUSEPORT socket already holds (19,000 such binds here, no port
    // shared).
    socket.set_reuseport(true)?;
    // Every accepted connection inherits these: no system calls for them per connection.
    crate::net::prepare_socket(&socket)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// A warning that is logged at most once per second; what was held back is counted in the
/// next one.
struct Throttled {
    what: &'static str,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttled {
    const EVERY: Duration = Duration::from_secs(1);

    fn new(what: &'static str) -> Throttled {
        Throttled {
            what,
            last: None,
            held_back: 0,
        }
    }

    fn warn(&mut self, detail: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < Self::EVERY) {
            self.held_back += 1;
            return;
        }
        tracing::warn!(
            error = %detail,
            also_since_last_report = self.held_back,
            "{}",
            self.what
        );
        self.last = Some(now);
        self.held_back = 0;
    }
}

/// Accept connections and serve each on this thread until `stop` resolves. A connection over
/// the connection limits is closed at once. Accept errors (typically EMFILE) back off,
/// doubling from 10 ms to 1 s, and are logged at most once a second.
async fn accept_until(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    gate: Arc<ConnectionGate>,
    endpoints: Endpoints,
    stop: impl Future<Output = ()>,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    tokio::pin!(stop);
    let mut accept_errors = Throttled::new("accept failed; backing off");
    let mut refusals = Throttled::new("connection refused at a connection limit");
    let mut backoff = FIRST_BACKOFF;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = FIRST_BACKOFF;
                    match gate.admit(peer.ip()) {
                        Ok(guard) => {
                            tokio::spawn(proxy.clone().serve_connection(stream, peer, endpoints, guard));
                        }
                        Err(refusal) => {
                            proxy.metrics.connections_refused.add(refusal);
                            refusals.warn(&format_args!("{} from {}", refusal.label(), peer.ip()));
                            drop(stream);
                        }
                    }
                }
                Err(error) => {
                    accept_errors.warn(&error);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut stop => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
            () = &mut stop => break,
        }
    }
}
