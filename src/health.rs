//! The health loop: every replica is probed on its own schedule (start to start every
//! `interval`, never two probes of one replica at once), and each result is published as soon
//! as it arrives, so one hung replica slows nobody else's health.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::ProbeFailure;
use crate::registry::{Observation, Registry, Replica};

/// Why a probe failed: its kind (counted), and the detail (logged and shown in /status).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct ProbeError {
    pub kind: ProbeFailure,
    pub detail: String,
}

impl ProbeError {
    pub fn new(kind: ProbeFailure, detail: impl Into<String>) -> ProbeError {
        ProbeError {
            kind,
            detail: detail.into(),
        }
    }
}

pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), ProbeError>> + Send>>;

/// One health probe of one replica. `Ok` means healthy. The loop measures latency and
/// applies the timeout, so implementations need not.
pub trait Probe: Send + Sync + 'static {
    fn probe(&self, replica: &Replica, path: &str) -> ProbeFuture;
}

/// `GET {url}{path}` over a pooled keep-alive client; status >= 400 is a failure.
pub struct HttpProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for HttpProbe {
    fn default() -> Self {
        HttpProbe::new()
    }
}

impl HttpProbe {
    pub fn new() -> HttpProbe {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the pool never expires idle connections.
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1)
            .build(connector);
        HttpProbe { client }
    }
}

impl Probe for HttpProbe {
    fn probe(&self, replica: &Replica, path: &str) -> ProbeFuture {
        let client = self.client.clone();
        let uri = format!("{}{}", replica.url, path);
        Box::pin(async move {
            let uri: hyper::Uri = uri.parse().map_err(|e| {
                ProbeError::new(ProbeFailure::BadAnswer, format!("bad probe url: {e}"))
            })?;
            let response = client.get(uri).await.map_err(|e| {
                let kind = if crate::net::has_local_shortage(&e) {
                    ProbeFailure::Local
                } else if e.is_connect() {
                    ProbeFailure::Connect
                } else {
                    ProbeFailure::BadAnswer
                };
                let detail = match std::error::Error::source(&e) {
                    Some(cause) => format!("{e}: {cause}"),
                    None => e.to_string(),
                };
                ProbeError::new(kind, detail)
            })?;
            let status = response.status();
            // Read the body to the end so the connection goes back to the pool.
            response.into_body().collect().await.map_err(|e| {
                ProbeError::new(
                    ProbeFailure::BadAnswer,
                    format!("reading the health answer: {e}"),
                )
            })?;
            if status.as_u16() >= 400 {
                return Err(ProbeError::new(
                    ProbeFailure::Status,
                    format!("health check answered HTTP {}", status.as_u16()),
                ));
            }
            Ok(())
        })
    }
}

/// Run one probe with the configured timeout; `None` when it failed for the router's own
/// reasons (nothing to hold against the replica).
async fn probe_once(
    replica: &Replica,
    probe: ProbeFuture,
    timeout: Duration,
) -> Option<Observation> {
    let started = Instant::now();
    let result = match tokio::time::timeout(timeout, probe).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::new(
            ProbeFailure::TimedOut,
            format!("health check timed out after {:.3}s", timeout.as_secs_f64()),
        )),
    };
    match result {
        Ok(()) => {
            tracing::trace!(replica = %replica.name, "probe ok");
            Some(Observation::Success {
                latency: started.elapsed(),
            })
        }
        Err(error) => {
            replica.probe_failures().add(error.kind);
            if error.kind == ProbeFailure::Local {
                tracing::warn!(replica = %replica.name, %error, "probe failed for want of local resources; not held against the replica");
                return None;
            }
            tracing::debug!(replica = %replica.name, %error, "probe failed");
            Some(Observation::Failure {
                error: error.detail,
            })
        }
    }
}

/// Probe every replica once, in parallel, and publish the results together.
pub async fn run_cycle(registry: &Registry, probe: &dyn Probe) {
    let check = registry.health_check();
    let mut probes = JoinSet::new();
    for replica in registry.replicas() {
        let fut = probe.probe(&replica, &check.path);
        let timeout = check.timeout;
        probes.spawn(async move {
            let observation = probe_once(&replica, fut, timeout).await;
            (replica, observation)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = probes.join_next().await {
        if let Ok((replica, Some(observation))) = joined {
            results.push((replica, observation));
        }
    }
    registry.observe_all(results);
}

/// The loop. Each replica's next probe starts `interval` after its last one started (or as
/// soon as that one ends, if it took longer); results are published as they arrive, those
/// arriving together in one snapshot. Settings and the replica set are read afresh whenever
/// they change, so a reload takes effect at once: a new replica is probed straight away.
pub async fn run(registry: Arc<Registry>, probe: Arc<dyn Probe>) {
    let mut due: HashMap<String, Due> = HashMap::new();
    let mut in_flight = JoinSet::new();
    loop {
        let changed = registry.changed();
        let check = registry.health_check();
        let replicas = registry.replicas();
        let now = Instant::now();
        // Forget replicas that a reload removed; new ones are due at once.
        due.retain(|url, _| replicas.iter().any(|r| &r.url == url));
        for replica in replicas {
            let slot = due.entry(replica.url.clone()).or_insert(Due::At(now));
            match *slot {
                Due::At(at) if at <= now => {}
                _ => continue,
            }
            *slot = Due::InFlight;
            let fut = probe.probe(&replica, &check.path);
            let (timeout, interval) = (check.timeout, check.interval);
            in_flight.spawn(async move {
                let observation = probe_once(&replica, fut, timeout).await;
                (replica, observation, now + interval)
            });
        }
        let next_due = due
            .values()
            .filter_map(|d| match d {
                Due::At(at) => Some(*at),
                Due::InFlight => None,
            })
            .min();
        tokio::select! {
            Some(joined) = in_flight.join_next() => {
                let mut results = Vec::new();
                let mut finished = vec![joined];
                while let Some(more) = in_flight.try_join_next() {
                    finished.push(more);
                }
                for (replica, observation, next) in finished.into_iter().flatten() {
                    if let Some(slot) = due.get_mut(&replica.url) {
                        *slot = Due::At(next);
                    }
                    if let Some(observation) = observation {
                        results.push((replica, observation));
                    }
                }
                registry.observe_all(results);
            }
            () = sleep_until(next_due) => {}
            () = changed => {}
        }
    }
}

/// When a replica's next probe starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    At(Instant),
    /// A probe is in flight; the next is due when it returns.
    InFlight,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
