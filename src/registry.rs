//! Replicas, their health state, and the immutable snapshot the hot path reads.
//!
//! Writers (the health loop, and the proxy reporting a failed upstream connect) take a
//! short mutex, update the state machines and publish a fresh [`Snapshot`] through
//! arc-swap. Readers (session setup, /status) only `load()` the snapshot: no lock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{self, Config, HealthCheck};

/// One replica: its settings from the config generation that listed it, and live state
/// that carries over to the next generation when a reload keeps its url.
#[derive(Debug)]
pub struct Replica {
    /// Position in the config (for display; identity is the url).
    pub index: usize,
    pub name: String,
    pub url: String,
    /// `host:port`, for connecting and for the Host header.
    pub authority: String,
    pub primary: bool,
    pub weight: f64,
    /// Capacity; `usize::MAX` when the config sets none.
    pub max_sessions: usize,
    live: Arc<Live>,
}

/// Counters and status shared by every config generation of a replica.
#[derive(Debug)]
struct Live {
    /// Sessions open or being opened here (a slot is reserved before the upstream connect).
    active_sessions: AtomicUsize,
    total_sessions: AtomicU64,
    connect_failures: AtomicU64,
    /// The published health status, for sessions that must react when it changes.
    status: watch::Sender<Status>,
}

impl Replica {
    fn new(index: usize, config: &config::Replica, live: Arc<Live>) -> Replica {
        let addr = config::parse_replica_url(&config.url).expect("validated at load");
        Replica {
            index,
            name: config
                .name
                .clone()
                .unwrap_or_else(|| addr.authority.clone()),
            url: addr.url,
            authority: addr.authority,
            primary: config.primary,
            weight: config.weight,
            max_sessions: config.max_sessions.unwrap_or(usize::MAX),
            live,
        }
    }

    /// Follow this replica's published health status.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.live.status.subscribe()
    }

    pub fn active_sessions(&self) -> usize {
        self.live.active_sessions.load(Ordering::Relaxed)
    }

    pub fn total_sessions(&self) -> u64 {
        self.live.total_sessions.load(Ordering::Relaxed)
    }

    pub fn is_full(&self) -> bool {
        self.active_sessions() >= self.max_sessions
    }

    /// Reserve a session slot if the replica is below capacity; the slot is held until the
    /// returned guard drops. Lock-free: concurrent handshakes cannot overshoot `max_sessions`.
    pub fn try_reserve_session(&self) -> Option<SessionGuard> {
        self.live
            .active_sessions
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max_sessions).then_some(n + 1)
            })
            .ok()?;
        Some(SessionGuard(self.live.clone()))
    }

    pub fn connect_failures(&self) -> u64 {
        self.live.connect_failures.load(Ordering::Relaxed)
    }

    /// Count a failed upstream connect or handshake.
    pub fn count_connect_failure(&self) {
        self.live.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a completed session handshake (for totals and metrics).
    pub fn count_session(&self) {
        self.live.total_sessions.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct SessionGuard(Arc<Live>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.active_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Unknown,
    Healthy,
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// The health state machine of one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub status: Status,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    /// Unix time (seconds) of the last successful probe.
    pub last_ok_at: Option<f64>,
    pub last_latency_ms: Option<f64>,
    pub last_error: Option<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            status: Status::Unknown,
            consecutive_failures: 0,
            consecutive_successes: 0,
            last_ok_at: None,
            last_latency_ms: None,
            last_error: None,
        }
    }
}

/// What one probe (or one passive observation) found.
#[derive(Debug, Clone)]
pub enum Observation {
    Success {
        latency: Duration,
    },
    Failure {
        error: String,
        latency: Option<Duration>,
    },
}

impl Health {
    /// Apply one observation. `unknown` turns healthy on its first success; `failure_threshold`
    /// consecutive failures make a replica unhealthy; `recovery_threshold` consecutive successes
    /// bring an unhealthy one back.
    pub fn observe(
        &mut self,
        observation: &Observation,
        failure_threshold: u32,
        recovery_threshold: u32,
    ) {
        match observation {
            Observation::Success { latency } => {
                self.consecutive_failures = 0;
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                self.last_ok_at = Some(unix_now());
                self.last_latency_ms = Some(latency.as_secs_f64() * 1000.0);
                self.last_error = None;
                match self.status {
                    Status::Unknown => self.status = Status::Healthy,
                    Status::Unhealthy if self.consecutive_successes >= recovery_threshold => {
                        self.status = Status::Healthy
                    }
                    _ => {}
                }
            }
            Observation::Failure { error, latency } => {
                self.consecutive_successes = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if let Some(latency) = latency {
                    self.last_latency_ms = Some(latency.as_secs_f64() * 1000.0);
                }
                self.last_error = Some(error.clone());
                if self.consecutive_failures >= failure_threshold {
                    self.status = Status::Unhealthy;
                }
            }
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One replica as seen in a snapshot.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    pub replica: Arc<Replica>,
    pub health: Health,
}

impl ReplicaState {
    /// Whether new sessions may be sent here.
    pub fn selectable(&self) -> bool {
        self.health.status == Status::Healthy
    }
}

/// An immutable view of every replica, in config order.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub replicas: Vec<ReplicaState>,
}

pub struct Registry {
    snapshot: ArcSwap<Snapshot>,
    /// Writers only: serialises updates so none is lost between load and store.
    members: Mutex<Members>,
}

struct Members {
    replicas: Vec<Arc<Replica>>,
    health: Vec<Health>,
    check: HealthCheck,
}

/// What a reload changed in the replica set, by name.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Kept (same url), with their health state and counters.
    pub kept: Vec<String>,
}

impl Registry {
    pub fn new(config: &Config) -> Registry {
        let registry = Registry {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            members: Mutex::new(Members {
                replicas: Vec::new(),
                health: Vec::new(),
                check: config.health_check.clone(),
            }),
        };
        registry.reconfigure(config);
        registry
    }

    /// Take a new config's replica set and health settings. A replica whose url was already
    /// known keeps its health state, counters and live sessions; settings (name, weight,
    /// primary, capacity) come from the new config.
    pub fn reconfigure(&self, config: &Config) -> Changes {
        let mut members = self.members.lock().unwrap();
        let mut changes = Changes::default();
        let mut replicas = Vec::with_capacity(config.replicas.len());
        let mut health = Vec::with_capacity(config.replicas.len());
        for (index, entry) in config.replicas.iter().enumerate() {
            // Validation normalised the url, so equal strings mean the same replica.
            let known = members.replicas.iter().position(|r| r.url == entry.url);
            let (live, state) = match known {
                Some(i) => (members.replicas[i].live.clone(), members.health[i].clone()),
                None => (
                    Arc::new(Live {
                        active_sessions: AtomicUsize::new(0),
                        total_sessions: AtomicU64::new(0),
                        connect_failures: AtomicU64::new(0),
                        status: watch::Sender::new(Status::Unknown),
                    }),
                    Health::default(),
                ),
            };
            let replica = Arc::new(Replica::new(index, entry, live));
            match known {
                Some(_) => changes.kept.push(replica.name.clone()),
                None => changes.added.push(replica.name.clone()),
            }
            replicas.push(replica);
            health.push(state);
        }
        changes.removed = members
            .replicas
            .iter()
            .filter(|old| !replicas.iter().any(|r| r.url == old.url))
            .map(|old| old.name.clone())
            .collect();
        members.replicas = replicas;
        members.health = health;
        members.check = config.health_check.clone();
        self.publish(&members);
        changes
    }

    /// The current snapshot; lock-free.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// The current replicas, in config order.
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.members.lock().unwrap().replicas.clone()
    }

    /// The current health-check settings.
    pub fn health_check(&self) -> HealthCheck {
        self.members.lock().unwrap().check.clone()
    }

    /// Apply a batch of observations and publish once. Observations of replicas that a reload
    /// removed meanwhile are dropped.
    pub fn observe_all(&self, observations: impl IntoIterator<Item = (Arc<Replica>, Observation)>) {
        // Collected before locking: the iterator may itself read the registry.
        let observations: Vec<_> = observations.into_iter().collect();
        let mut members = self.members.lock().unwrap();
        let Members {
            replicas,
            health,
            check,
        } = &mut *members;
        for (replica, observation) in observations {
            let Some(i) = replicas
                .iter()
                .position(|r| Arc::ptr_eq(&r.live, &replica.live))
            else {
                continue;
            };
            let before = health[i].status;
            health[i].observe(
                &observation,
                check.failure_threshold,
                check.recovery_threshold,
            );
            let after = health[i].status;
            if after != before {
                tracing::info!(
                    replica = %replicas[i].name,
                    from = before.as_str(),
                    to = after.as_str(),
                    error = health[i].last_error.as_deref().unwrap_or(""),
                    "replica health changed"
                );
            }
        }
        self.publish(&members);
    }

    /// Apply one observation, e.g. a failed upstream connect seen by the proxy.
    pub fn observe(&self, replica: &Arc<Replica>, observation: Observation) {
        self.observe_all([(replica.clone(), observation)]);
    }

    fn publish(&self, members: &Members) {
        for (replica, health) in members.replicas.iter().zip(&members.health) {
            replica.live.status.send_if_modified(|status| {
                let changed = *status != health.status;
                *status = health.status;
                changed
            });
        }
        let replicas = members
            .replicas
            .iter()
            .zip(&members.health)
            .map(|(replica, health)| ReplicaState {
                replica: replica.clone(),
                health: health.clone(),
            })
            .collect();
        self.snapshot.store(Arc::new(Snapshot { replicas }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Observation {
        Observation::Success {
            latency: Duration::from_millis(3),
        }
    }
    fn fail() -> Observation {
        Observation::Failure {
            error: "refused".into(),
            latency: None,
        }
    }

    #[test]
    fn state_machine_follows_thresholds() {
        let mut h = Health::default();
        assert_eq!(h.status, Status::Unknown);
        h.observe(&fail(), 3, 2);
        assert_eq!(
            h.status,
            Status::Unknown,
            "failures below threshold keep unknown"
        );
        h.observe(&ok(), 3, 2);
        assert_eq!(
            h.status,
            Status::Healthy,
            "first success makes unknown healthy"
        );
        h.observe(&fail(), 3, 2);
        h.observe(&fail(), 3, 2);
        assert_eq!(h.status, Status::Healthy);
        h.observe(&fail(), 3, 2);
        assert_eq!(h.status, Status::Unhealthy);
        assert_eq!(h.consecutive_failures, 3);
        h.observe(&ok(), 3, 2);
        assert_eq!(
            h.status,
            Status::Unhealthy,
            "one success is below recovery threshold"
        );
        h.observe(&fail(), 3, 2);
        h.observe(&ok(), 3, 2);
        assert_eq!(h.status, Status::Unhealthy, "successes must be consecutive");
        h.observe(&ok(), 3, 2);
        assert_eq!(h.status, Status::Healthy);
        assert!(h.last_ok_at.is_some());
        assert_eq!(h.consecutive_failures, 0);
    }

    #[test]
    fn unknown_turns_unhealthy_after_threshold_failures() {
        let mut h = Health::default();
        h.observe(&fail(), 1, 1);
        assert_eq!(h.status, Status::Unhealthy);
    }
}
