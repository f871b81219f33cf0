//! The health loop: probe every replica in parallel, start-to-start every interval, and
//! publish the results to the registry in one snapshot per cycle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinSet;

use crate::config::{seconds, HealthCheck};
use crate::registry::{Observation, Registry, Replica};

pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One health probe of one replica. `Ok` means healthy; `Err` carries the reason.
/// The loop measures latency and applies the timeout, so implementations need not.
pub trait Probe: Send + Sync + 'static {
    fn probe(&self, replica: &Replica) -> ProbeFuture;
}

/// `GET {url}{path}` over a pooled keep-alive client; status >= 400 is a failure.
pub struct HttpProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
    path: String,
}

impl HttpProbe {
    pub fn new(path: &str) -> HttpProbe {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the pool never expires idle connections.
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1)
            .build(connector);
        HttpProbe {
            client,
            path: path.to_string(),
        }
    }
}

impl Probe for HttpProbe {
    fn probe(&self, replica: &Replica) -> ProbeFuture {
        let client = self.client.clone();
        let uri = format!("{}{}", replica.url, self.path);
        Box::pin(async move {
            let uri: hyper::Uri = uri.parse().map_err(|e| format!("bad probe url: {e}"))?;
            let response =
                client
                    .get(uri)
                    .await
                    .map_err(|e| match std::error::Error::source(&e) {
                        Some(cause) => format!("{e}: {cause}"),
                        None => e.to_string(),
                    })?;
            let status = response.status();
            // Read the body to the end so the connection goes back to the pool.
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading health body: {e}"))?;
            if status.as_u16() >= 400 {
                return Err(format!("health check answered HTTP {}", status.as_u16()));
            }
            Ok(())
        })
    }
}

/// Run one probe with the configured timeout and turn it into an observation.
async fn observe(probe: ProbeFuture, timeout: Duration) -> Observation {
    let started = Instant::now();
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(())) => Observation::Success {
            latency: started.elapsed(),
        },
        Ok(Err(error)) => Observation::Failure {
            error,
            latency: Some(started.elapsed()),
        },
        Err(_) => Observation::Failure {
            error: format!("health check timed out after {:.3}s", timeout.as_secs_f64()),
            latency: None,
        },
    }
}

/// Probe every replica once, in parallel, and publish the results together.
pub async fn run_cycle(registry: &Registry, probe: &dyn Probe, timeout: Duration) {
    let mut probes = JoinSet::new();
    for replica in registry.replicas() {
        let index = replica.index;
        let fut = probe.probe(replica);
        probes.spawn(async move { (index, observe(fut, timeout).await) });
    }
    let mut results = Vec::with_capacity(registry.replicas().len());
    while let Some(joined) = probes.join_next().await {
        if let Ok(result) = joined {
            results.push(result);
        }
    }
    for (index, observation) in &results {
        let name = &registry.replicas()[*index].name;
        match observation {
            Observation::Success { .. } => tracing::trace!(replica = %name, "probe ok"),
            Observation::Failure { error, .. } => {
                tracing::debug!(replica = %name, %error, "probe failed")
            }
        }
    }
    let before: Vec<_> = registry
        .snapshot()
        .replicas
        .iter()
        .map(|r| r.health.status)
        .collect();
    registry.observe_all(results);
    for (state, old) in registry.snapshot().replicas.iter().zip(before) {
        if state.health.status != old {
            tracing::info!(
                replica = %state.replica.name,
                from = old.as_str(),
                to = state.health.status.as_str(),
                error = state.health.last_error.as_deref().unwrap_or(""),
                "replica health changed"
            );
        }
    }
}

/// The loop: a cycle starts every `interval_seconds` (start to start); a cycle that
/// overruns delays the next one rather than stacking probes.
pub async fn run(registry: Arc<Registry>, probe: Arc<dyn Probe>, config: HealthCheck) {
    let mut ticker = tokio::time::interval(seconds(config.interval_seconds));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = seconds(config.timeout_seconds);
    loop {
        ticker.tick().await;
        run_cycle(&registry, probe.as_ref(), timeout).await;
    }
}
