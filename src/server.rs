//! The running router: listener, health loop, accept loop, and the drain on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{seconds, Config};
use crate::health::{self, HttpProbe, Probe};
use crate::proxy::Proxy;
use crate::registry::Registry;

pub struct Router {
    listener: TcpListener,
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
        let listener = TcpListener::bind(config.listen_addr()).await?;
        let registry = Arc::new(Registry::new(&config));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let proxy = Arc::new(Proxy::new(registry.clone(), &config, shutdown_rx));
        Ok(Router {
            listener,
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

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Serve until `shutdown` resolves; then stop accepting, send 1001 to both sides of every
    /// session, and return once they are closed or the drain timeout has passed.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Drain {
        let health = tokio::spawn(health::run(self.registry.clone(), self.probe.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tokio::spawn(self.proxy.clone().serve_connection(stream, peer));
                    }
                    Err(error) => {
                        // Typically EMFILE under a flood: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        drop(self.listener);
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
}
