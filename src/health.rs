//! The health loop: every replica is probed on its own schedule (start to start every
//! `interval`, never two probes of one replica at once), and each result is published as soon
//! as it arrives, so one hung replica slows nobody else's health.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::{ConnectFailure, ProbeFailure};
use crate::registry::{Observation, Registry, Replica, Report};
use crate::upstream::Connector;

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

pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<Option<Report>, ProbeError>> + Send>>;

/// One health probe of one replica. `Ok` means it answered well, with what it said of its
/// own load if it said anything. The loop measures latency and applies the timeout, so
/// implementations need not.
pub trait Probe: Send + Sync + 'static {
    fn probe(&self, replica: &Arc<Replica>, path: &str) -> ProbeFuture;

    /// Forget what is kept for replicas no longer in `replicas` (after a reload).
    fn retain(&self, _replicas: &[Arc<Replica>]) {}
}

/// `GET {path}` on a kept-alive connection to each replica, opened by the same connector as
/// sessions (TCP, or TLS with the replica's settings). 503 means draining; any other
/// status >= 400 is a failure. A JSON body may report load ([`Report`]).
#[derive(Default)]
pub struct HttpProbe {
    /// One idle connection per replica url, with the TLS settings it was opened under.
    idle: Arc<Mutex<HashMap<String, IdleConnection>>>,
}

struct IdleConnection {
    sender: http1::SendRequest<Empty<Bytes>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The addresses its host name had when it was kept: a name that moved is probed anew.
    addresses: Option<Arc<Vec<std::net::SocketAddr>>>,
}

impl HttpProbe {
    pub fn new() -> HttpProbe {
        HttpProbe::default()
    }

    fn take_idle(
        &self,
        replica: &Replica,
        addresses: &Option<Arc<Vec<std::net::SocketAddr>>>,
    ) -> Option<http1::SendRequest<Empty<Bytes>>> {
        let idle = self.idle.lock().unwrap().remove(&replica.url)?;
        let same_tls = match (&idle.tls, &replica.tls) {
            (None, None) => true,
            (Some(old), Some(new)) => Arc::ptr_eq(old, &new.config),
            _ => false,
        };
        let same_addresses = match (&idle.addresses, addresses) {
            (None, None) => true,
            (Some(old), Some(new)) => Arc::ptr_eq(old, new),
            _ => false,
        };
        (same_tls && same_addresses && !idle.sender.is_closed()).then_some(idle.sender)
    }
}

fn put_idle(
    idle: &Mutex<HashMap<String, IdleConnection>>,
    replica: &Replica,
    sender: http1::SendRequest<Empty<Bytes>>,
    addresses: Option<Arc<Vec<std::net::SocketAddr>>>,
) {
    let tls = replica.tls.as_ref().map(|tls| tls.config.clone());
    idle.lock().unwrap().insert(
        replica.url.clone(),
        IdleConnection {
            sender,
            tls,
            addresses,
        },
    );
}

/// A new connection to `replica`, ready for requests.
async fn open_connection(
    replica: &Arc<Replica>,
) -> Result<http1::SendRequest<Empty<Bytes>>, ProbeError> {
    let stream = tower::ServiceExt::oneshot(Connector, replica.clone())
        .await
        .map_err(|e| {
            let kind = match e.kind() {
                ConnectFailure::Local => ProbeFailure::Local,
                ConnectFailure::Tls => ProbeFailure::Tls,
                ConnectFailure::TimedOut => ProbeFailure::TimedOut,
                _ => ProbeFailure::Connect,
            };
            ProbeError::new(kind, e.detail())
        })?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProbeError::new(ProbeFailure::BadAnswer, e.to_string()))?;
    tokio::spawn(async move {
        // Ends when the replica closes it, or when the sender is dropped.
        let _ = connection.await;
    });
    Ok(sender)
}

/// The most of a health answer's body that is read; a longer one is a bad answer.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// What a health answer's body says of the replica's load, if it is a JSON object that says
/// anything: `sessions`, `max_sessions` (non-negative integers) and `"status": "draining"`.
fn report_from(status: hyper::StatusCode, body: &[u8]) -> Option<Report> {
    let draining_status = status == hyper::StatusCode::SERVICE_UNAVAILABLE;
    let json: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(body).ok();
    let report = json.map(|object| Report {
        sessions: object.get("sessions").and_then(serde_json::Value::as_u64),
        max_sessions: object
            .get("max_sessions")
            .and_then(serde_json::Value::as_u64),
        draining: draining_status
            || object.get("status").and_then(serde_json::Value::as_str) == Some("draining"),
    });
    match report {
        Some(report) if report != Report::default() => Some(report),
        _ if draining_status => Some(Report {
            draining: true,
            ..Report::default()
        }),
        _ => None,
    }
}

enum GetError {
    Http(hyper::Error),
    TooLong,
}

async fn get(
    sender: &mut http1::SendRequest<Empty<Bytes>>,
    replica: &Replica,
    path: &str,
) -> Result<(hyper::StatusCode, Bytes), GetError> {
    sender.ready().await.map_err(GetError::Http)?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, &replica.authority)
        .header(hyper::header::USER_AGENT, "wsrouter-health")
        .body(Empty::new())
        .expect("a path and a host validated at load make a request");
    let response = sender.send_request(request).await.map_err(GetError::Http)?;
    let status = response.status();
    // Read the body to the end so the connection can carry the next probe.
    let body = http_body_util::Limited::new(response.into_body(), MAX_HEALTH_BODY)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => GetError::Http(*e),
            Err(_) => GetError::TooLong,
        })?;
    Ok((status, body.to_bytes()))
}

impl Probe for HttpProbe {
    fn probe(&self, replica: &Arc<Replica>, path: &str) -> ProbeFuture {
        let replica = replica.clone();
        let path = path.to_string();
        // Taken first: a connection opened from here on is at these addresses or newer ones.
        let addresses = replica.addresses();
        let reused = self.take_idle(&replica, &addresses);
        let idle = self.idle.clone();
        Box::pin(async move {
            let (mut sender, mut fresh) = match reused {
                Some(sender) => (sender, false),
                None => (open_connection(&replica).await?, true),
            };
            let (status, body) = loop {
                match get(&mut sender, &replica, &path).await {
                    Ok(answer) => break answer,
                    Err(GetError::TooLong) => {
                        return Err(ProbeError::new(
                            ProbeFailure::BadAnswer,
                            format!("health answer longer than {MAX_HEALTH_BODY} bytes"),
                        ))
                    }
                    // A kept-alive connection the replica closed meanwhile says nothing
                    // about its health: try once on a new one.
                    Err(GetError::Http(e))
                        if !fresh
                            && (e.is_closed() || e.is_canceled() || e.is_incomplete_message()) =>
                    {
                        sender = open_connection(&replica).await?;
                        fresh = true;
                    }
                    Err(GetError::Http(e)) => {
                        // Over TLS 1.3 a refused client certificate shows here, as an alert.
                        if let Some(tls) = crate::tls::tls_cause(&e) {
                            return Err(ProbeError::new(ProbeFailure::Tls, format!("TLS: {tls}")));
                        }
                        let kind = if crate::net::has_local_shortage(&e) {
                            ProbeFailure::Local
                        } else {
                            ProbeFailure::BadAnswer
                        };
                        let detail = match std::error::Error::source(&e) {
                            Some(cause) => format!("{e}: {cause}"),
                            None => e.to_string(),
                        };
                        return Err(ProbeError::new(kind, detail));
                    }
                }
            };
            put_idle(&idle, &replica, sender, addresses);
            let report = report_from(status, &body);
            if status.as_u16() >= 400 && status != hyper::StatusCode::SERVICE_UNAVAILABLE {
                return Err(ProbeError::new(
                    ProbeFailure::Status,
                    format!("health check answered HTTP {}", status.as_u16()),
                ));
            }
            Ok(report)
        })
    }

    fn retain(&self, replicas: &[Arc<Replica>]) {
        self.idle
            .lock()
            .unwrap()
            .retain(|url, _| replicas.iter().any(|r| &r.url == url));
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
        Ok(report) => {
            tracing::trace!(replica = %replica.name, ?report, "probe ok");
            Some(Observation::Success {
                latency: started.elapsed(),
                report,
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
        probe.retain(&replicas);
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    #[test]
    fn health_answers_report_load_draining_or_nothing() {
        let ok = StatusCode::OK;
        assert_eq!(
            report_from(ok, br#"{"status":"ok","sessions":3,"max_sessions":8}"#),
            Some(Report {
                sessions: Some(3),
                max_sessions: Some(8),
                draining: false
            })
        );
        assert_eq!(
            report_from(ok, br#"{"status":"draining","sessions":2}"#),
            Some(Report {
                sessions: Some(2),
                max_sessions: None,
                draining: true
            })
        );
        // 503 is draining, whatever the body.
        for body in [&b"busy"[..], b"", br#"{"sessions":1}"#] {
            assert!(
                report_from(StatusCode::SERVICE_UNAVAILABLE, body)
                    .unwrap()
                    .draining
            );
        }
        // Nothing usable: no report. Negative or fractional counts are not counts.
        for body in [
            &b"ok"[..],
            b"",
            br#"{"status":"ok"}"#,
            br#"[1,2]"#,
            br#"{"sessions":-1,"max_sessions":2.5}"#,
        ] {
            assert_eq!(
                report_from(ok, body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
