//! The running router: listener, health loop, accept loop, and the drain on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::config::{seconds, Config, ConfigError};
use crate::health::{self, HttpProbe, Probe};
use crate::proxy::Proxy;
use crate::registry::{Changes, Registry};

pub struct Router {
    /// Non-blocking; every worker registers its own handle to it with its event loop.
    listener: std::net::TcpListener,
    workers: usize,
    registry: Arc<Registry>,
    proxy: Arc<Proxy>,
    probe: Arc<dyn Probe>,
    config: Config,
    shutdown: watch::Sender<bool>,
}

/// How the shutdown went.
#[derive(Debug, PartialEq, Eq)]
pub enum Drain {
    /// Every session closed within the drain timeout.
    Complete,
    /// The drain timeout passed with this many sessions still open.
    TimedOut { sessions_left: usize },
}

impl Router {
    /// Bind the listener with the HTTP health probe.
    pub async fn bind(config: Config) -> io::Result<Router> {
        let probe = Arc::new(HttpProbe::new());
        Router::bind_with_probe(config, probe).await
    }

    /// Bind the listener with a custom probe (tests drive health through it).
    pub async fn bind_with_probe(config: Config, probe: Arc<dyn Probe>) -> io::Result<Router> {
        let listener = listen(config.listen_addr())?;
        let workers = config.workers();
        let registry = Arc::new(Registry::new(&config));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let proxy = Arc::new(Proxy::new(registry.clone(), &config, shutdown_rx));
        Ok(Router {
            listener,
            workers,
            registry,
            proxy,
            probe,
            config,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Worker threads `serve` runs, worker 0 included.
    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// A handle that applies new configs to this router while it serves.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            registry: self.registry.clone(),
            proxy: self.proxy.clone(),
            running: Arc::new(Mutex::new(self.config.clone())),
        }
    }

    /// Serve until `shutdown` resolves; then stop accepting, send 1001 to both sides of every
    /// session, and return once they are closed or the drain timeout has passed.
    ///
    /// The calling runtime is worker 0: it accepts, serves sessions and runs the health loop.
    /// Each further worker is a thread with its own single-threaded runtime accepting from the
    /// same listener, so a session lives on one thread from accept to close. Dropping this
    /// future stops every worker and drops its sessions.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Drain {
        let health = tokio::spawn(health::run(self.registry.clone(), self.probe.clone()));
        // Workers run until this is dropped: when serve returns or its future is dropped.
        let (_workers_alive, workers_stop) = watch::channel(());
        for index in 1..self.workers {
            if let Err(error) = self.spawn_worker(index, workers_stop.clone()) {
                tracing::error!(%error, index, "cannot start worker thread; serving with fewer");
                break;
            }
        }
        match TcpListener::from_std(self.listener) {
            Ok(listener) => accept_until(listener, self.proxy.clone(), shutdown).await,
            Err(error) => tracing::error!(%error, "cannot register the listener; not accepting"),
        }
        let open = self.proxy.active_sessions();
        tracing::info!(sessions = open, "shutting down: closing sessions with 1001");
        let _ = self.shutdown.send(true);
        let drain_timeout = seconds(self.config.limits.drain_timeout_seconds);
        let drain = match tokio::time::timeout(drain_timeout, self.proxy.drained()).await {
            Ok(()) => Drain::Complete,
            Err(_) => Drain::TimedOut {
                sessions_left: self.proxy.active_sessions(),
            },
        };
        health.abort();
        drain
    }

    /// Start worker thread `index`: it accepts until shutdown is signalled, keeps serving its
    /// sessions while they drain, and drops them when `alive` closes.
    fn spawn_worker(&self, index: usize, mut alive: watch::Receiver<()>) -> io::Result<()> {
        let listener = self.listener.try_clone()?;
        let proxy = self.proxy.clone();
        let mut shutdown = self.shutdown.subscribe();
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
                            Ok(listener) => accept_until(listener, proxy, stopped).await,
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

/// How many connections may wait for accept(2); the kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// Accept connections and spawn a task for each on this thread until `stop` resolves.
async fn accept_until(listener: TcpListener, proxy: Arc<Proxy>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(proxy.clone().serve_connection(stream, peer));
                }
                Err(error) => {
                    // Typically EMFILE under a flood: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut stop => break,
        }
    }
}

/// Applies reloaded configs to a running router: replicas, health checks, balancing, session
/// settings and limits for new sessions. Live sessions are untouched; replicas whose url is
/// unchanged keep their health state. The listen address and `limits.max_sessions` are fixed
/// at start: a change to them is reported and needs a restart.
#[derive(Clone)]
pub struct Reloader {
    registry: Arc<Registry>,
    proxy: Arc<Proxy>,
    running: Arc<Mutex<Config>>,
}

impl Reloader {
    pub fn apply(&self, config: Config) -> Changes {
        let mut running = self.running.lock().unwrap();
        if config.listen != running.listen {
            tracing::warn!(
                "[listen] (address or workers) changed in the config; it takes effect on restart"
            );
        }
        if config.limits.max_sessions != running.limits.max_sessions {
            tracing::warn!(
                running = running.limits.max_sessions,
                configured = config.limits.max_sessions,
                "limits.max_sessions changed in the config; it takes effect on restart"
            );
        }
        let changes = self.registry.reconfigure(&config);
        self.proxy.reconfigure(&config);
        tracing::info!(added = ?changes.added, removed = ?changes.removed, kept = changes.kept.len(), "config reloaded");
        *running = config;
        changes
    }

    /// Load `path` and apply it. An invalid file changes nothing: the running config stays.
    pub fn reload_file(&self, path: &Path) -> Result<Changes, ConfigError> {
        match Config::load(path) {
            Ok(config) => Ok(self.apply(config)),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "config reload rejected; the running config stays");
                Err(error)
            }
        }
    }

    /// Reload on SIGHUP, and whenever the file's contents change (looked at every `poll`).
    /// The SIGHUP handler is installed before this returns, so a signal sent once the router
    /// listens cannot hit SIGHUP's default action (exit). Call it inside the runtime.
    pub fn watch(self, path: PathBuf, poll: Duration) -> impl Future<Output = ()> {
        let seen = std::fs::read(&path).ok();
        #[cfg(unix)]
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        #[cfg(unix)]
        return self.watch_loop(path, poll, seen, hangups);
        #[cfg(not(unix))]
        return self.watch_loop(path, poll, seen);
    }

    async fn watch_loop(
        self,
        path: PathBuf,
        poll: Duration,
        mut seen: Option<Vec<u8>>,
        #[cfg(unix)] mut hangups: Option<tokio::signal::unix::Signal>,
    ) {
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hangups.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            let forced = tokio::select! {
                _ = hangup => true,
                () = tokio::time::sleep(poll) => false,
            };
            let contents = std::fs::read(&path).ok();
            if forced || contents != seen {
                if forced {
                    tracing::info!(path = %path.display(), "SIGHUP: reloading the config");
                }
                // Remembered even when invalid, so a bad file is reported once, not every poll.
                seen = contents;
                let _ = self.reload_file(&path);
            }
        }
    }
}
