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

use crate::config::seconds;
use crate::registry::{Observation, Registry, Replica};

pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One health probe of one replica. `Ok` means healthy; `Err` carries the reason.
/// The loop measures latency and applies the timeout, so implementations need not.
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
pub async fn run_cycle(registry: &Registry, probe: &dyn Probe) {
    let check = registry.health_check();
    let timeout = seconds(check.timeout_seconds);
    let mut probes = JoinSet::new();
    for replica in registry.replicas() {
        let fut = probe.probe(&replica, &check.path);
        probes.spawn(async move {
            let observation = observe(fut, timeout).await;
            match &observation {
                Observation::Success { .. } => tracing::trace!(replica = %replica.name, "probe ok"),
                Observation::Failure { error, .. } => {
                    tracing::debug!(replica = %replica.name, %error, "probe failed")
                }
            }
            (replica, observation)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = probes.join_next().await {
        if let Ok(result) = joined {
            results.push(result);
        }
    }
    registry.observe_all(results);
}

/// The loop: a cycle starts every `interval_seconds` (start to start); a cycle that overruns
/// delays the next one rather than stacking probes. Settings are read each cycle, so a
/// reload takes effect from the next one.
pub async fn run(registry: Arc<Registry>, probe: Arc<dyn Probe>) {
    loop {
        let started = tokio::time::Instant::now();
        run_cycle(&registry, probe.as_ref()).await;
        let interval = seconds(registry.health_check().interval_seconds);
        tokio::time::sleep_until(started + interval).await;
    }
}
