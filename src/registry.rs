//! Replicas, their health state, and the immutable snapshot the hot path reads.
//!
//! Writers (the health loop, and session setup reporting how an upstream connect went) take a
//! short mutex, update the state machines and publish a fresh [`Snapshot`] through arc-swap.
//! Readers (session setup, /status) only `load()` the snapshot: no lock.
//!
//! Passive health: a failed upstream connect counts like a failed probe, but only failures
//! that say something about the replica (refused, timed out, no answer, unreachable), never
//! a per-request answer or the router's own shortage; within one run of failures each client
//! address counts once, so no single client can turn a replica unhealthy; and a completed
//! handshake ends the run.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::client::ClientKey;
use crate::config::{self, Config, HealthCheck};
use crate::metrics::{
    ConnectFailure, Counters, Histogram, ProbeFailure, Traffic, HANDSHAKE_BOUNDS,
};

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
    /// For `https://` replicas: how to speak TLS to it.
    pub tls: Option<config::ReplicaTls>,
    pub primary: bool,
    pub weight: f64,
    /// Capacity; `usize::MAX` when the config sets none.
    pub max_sessions: usize,
    /// Takes no new sessions; live ones run on (`drain = true`, or removed from the config).
    pub draining: bool,
    /// No longer in the config (or in DNS): kept only until its last session ends.
    pub removed: bool,
    /// The replica group that found it through DNS.
    pub group: Option<String>,
    live: Arc<Live>,
}

/// Counters and status shared by every config generation of a replica.
#[derive(Debug)]
struct Live {
    /// Sessions open or being opened here (a slot is reserved before the upstream connect).
    active_sessions: AtomicUsize,
    total_sessions: AtomicU64,
    connect_failures: Counters<ConnectFailure>,
    /// What the last failed upstream connect or handshake found, whether or not it counted
    /// against health.
    last_connect_error: Mutex<Option<String>>,
    probe_failures: Counters<ProbeFailure>,
    traffic: Traffic,
    handshake_seconds: Histogram,
    /// The published health status, for sessions that must react when it changes.
    status: watch::Sender<Status>,
    /// For a url with a host name: the addresses its last good lookup found (the discovery
    /// loop looks it up once per cycle, not once per connect).
    addresses: arc_swap::ArcSwapOption<Vec<std::net::SocketAddr>>,
}

impl Live {
    fn new() -> Live {
        Live {
            active_sessions: AtomicUsize::new(0),
            total_sessions: AtomicU64::new(0),
            connect_failures: Counters::default(),
            last_connect_error: Mutex::new(None),
            probe_failures: Counters::default(),
            traffic: Traffic::default(),
            handshake_seconds: Histogram::new(HANDSHAKE_BOUNDS),
            status: watch::Sender::new(Status::Unknown),
            addresses: arc_swap::ArcSwapOption::empty(),
        }
    }
}

impl Replica {
    fn new(index: usize, config: &config::Replica, live: Arc<Live>) -> Replica {
        Replica {
            index,
            name: config.name.clone(),
            url: config.url.clone(),
            authority: config.authority.clone(),
            tls: config.tls.clone(),
            primary: config.primary,
            weight: config.weight,
            max_sessions: config.max_sessions.unwrap_or(usize::MAX),
            draining: config.drain,
            removed: false,
            group: config.group.clone(),
            live,
        }
    }

    /// This replica after a reload removed it from the config: draining, until its last
    /// session ends.
    fn removed(&self, index: usize) -> Replica {
        Replica {
            index,
            name: self.name.clone(),
            url: self.url.clone(),
            authority: self.authority.clone(),
            tls: self.tls.clone(),
            primary: false,
            weight: self.weight,
            max_sessions: self.max_sessions,
            draining: true,
            removed: true,
            group: self.group.clone(),
            live: self.live.clone(),
        }
    }

    /// The host name and port to look up, for a url that names its host (not an address).
    pub fn host_name(&self) -> Option<(&str, u16)> {
        let (host, port) = self.authority.rsplit_once(':')?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() {
            return None;
        }
        Some((host, port.parse().ok()?))
    }

    /// Where to connect: the addresses of the last good lookup of its host name, if any.
    pub fn addresses(&self) -> Option<Arc<Vec<std::net::SocketAddr>>> {
        self.live.addresses.load_full()
    }

    /// Keep what a lookup of its host name found (not empty).
    pub fn set_addresses(&self, addresses: Vec<std::net::SocketAddr>) {
        if self.addresses().as_deref() != Some(&addresses) {
            tracing::debug!(replica = %self.name, ?addresses, "replica host name resolved");
            self.live.addresses.store(Some(Arc::new(addresses)));
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

    /// Failed upstream connects or handshakes, by kind.
    pub fn connect_failures(&self) -> &Counters<ConnectFailure> {
        &self.live.connect_failures
    }

    /// Note a failed upstream connect or handshake: counted by kind, its detail kept for
    /// /status. Health is a separate matter ([`Registry::passive_failure`]).
    pub fn note_connect_failure(&self, kind: ConnectFailure, detail: String) {
        self.live.connect_failures.add(kind);
        *self
            .live
            .last_connect_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(detail);
    }

    /// The last failed upstream connect's detail.
    pub fn last_connect_error(&self) -> Option<String> {
        self.live
            .last_connect_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Failed probes, by kind.
    pub fn probe_failures(&self) -> &Counters<ProbeFailure> {
        &self.live.probe_failures
    }

    /// Frames and bytes forwarded to and from this replica.
    pub fn traffic(&self) -> &Traffic {
        &self.live.traffic
    }

    /// Upstream connect plus handshake, for sessions that opened here.
    pub fn handshake_seconds(&self) -> &Histogram {
        &self.live.handshake_seconds
    }

    /// Count a completed session handshake (for totals and metrics).
    pub fn count_session(&self, handshake: Duration) {
        self.live.total_sessions.fetch_add(1, Ordering::Relaxed);
        self.live.handshake_seconds.observe(handshake);
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
    /// Latency of the last successful probe.
    pub last_latency_ms: Option<f64>,
    pub last_error: Option<String>,
    /// Unix time (seconds) of the last change of `status`.
    pub last_change_at: Option<f64>,
    /// What the replica said of its own load in its last successful health answer.
    pub reported: Option<Report>,
    /// This router's sessions there when that report came: those it opened or closed since
    /// are not in the report yet.
    own_at_report: usize,
    /// Clients whose failed connects count in the current run of failures (each once).
    passive_clients: Vec<ClientKey>,
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
            last_change_at: None,
            reported: None,
            own_at_report: 0,
            passive_clients: Vec::new(),
        }
    }
}

/// What one probe found (or, as a failure, one upstream connect).
#[derive(Debug, Clone)]
pub enum Observation {
    Success {
        latency: Duration,
        report: Option<Report>,
    },
    Failure {
        error: String,
    },
}

/// A replica's own account of its load, from its health answer: `{"status":"ok",
/// "sessions":3,"max_sessions":8}`, or `"status":"draining"` (or HTTP 503) when it takes no
/// new sessions. Several routers in front of one fleet each see only their own sessions;
/// this is what they share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub sessions: Option<u64>,
    pub max_sessions: Option<u64>,
    pub draining: bool,
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
            Observation::Success { latency, report } => {
                self.reported = report.clone();
                self.consecutive_failures = 0;
                self.passive_clients.clear();
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
            Observation::Failure { error } => {
                self.consecutive_successes = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = Some(error.clone());
                if self.consecutive_failures >= failure_threshold {
                    self.status = Status::Unhealthy;
                }
            }
        }
    }
}

/// Where `replica` (of any config generation) is in the current members.
fn position_of(replicas: &[Arc<Replica>], replica: &Replica) -> Option<usize> {
    replicas
        .iter()
        .position(|r| Arc::ptr_eq(&r.live, &replica.live))
}

/// Count `observation` in `health` and log a change of status.
fn apply(replica: &Replica, health: &mut Health, observation: &Observation, check: &HealthCheck) {
    let before = health.status;
    if let Observation::Success {
        report: Some(_), ..
    } = observation
    {
        health.own_at_report = replica.active_sessions();
    }
    health.observe(
        observation,
        check.failure_threshold,
        check.recovery_threshold,
    );
    note_change(replica, health, before);
}

/// Make the members what `members.wanted()` says, keeping the state of every replica whose url
/// stays; see [`Registry::reconfigure`].
fn replace(members: &mut Members) -> Changes {
    let wanted = members.wanted();
    let mut changes = Changes::default();
    let mut replicas = Vec::with_capacity(wanted.len());
    let mut health = Vec::with_capacity(wanted.len());
    for (index, entry) in wanted.iter().enumerate() {
        // Validation normalised the url, so equal strings mean the same replica.
        let known = members.replicas.iter().position(|r| r.url == entry.url);
        let (live, state) = match known {
            Some(i) => (members.replicas[i].live.clone(), members.health[i].clone()),
            None => (Arc::new(Live::new()), Health::default()),
        };
        let replica = Arc::new(Replica::new(index, entry, live));
        match known {
            Some(_) => changes.kept.push(replica.name.clone()),
            None => changes.added.push(replica.name.clone()),
        }
        replicas.push(replica);
        health.push(state);
    }
    for (old, state) in members.replicas.iter().zip(&members.health) {
        if replicas.iter().any(|r| r.url == old.url) {
            continue;
        }
        if !old.removed {
            changes.removed.push(old.name.clone());
        }
        if old.active_sessions() > 0 {
            changes.draining.push(old.name.clone());
            replicas.push(Arc::new(old.removed(replicas.len())));
            health.push(state.clone());
        }
    }
    members.replicas = replicas;
    members.health = health;
    changes
}

/// Drop removed replicas whose last session has ended; whether any was dropped. Run with every
/// batch of probe results, so a drained replica leaves within a probe interval.
fn drop_finished(members: &mut Members) -> bool {
    if !members.replicas.iter().any(|r| r.removed) {
        return false;
    }
    let before = members.replicas.len();
    (members.replicas, members.health) = std::mem::take(&mut members.replicas)
        .into_iter()
        .zip(std::mem::take(&mut members.health))
        .filter(|(replica, _)| {
            let drained = replica.removed && replica.active_sessions() == 0;
            if drained {
                tracing::info!(replica = %replica.name, "removed replica has no sessions left; dropped");
            }
            !drained
        })
        .unzip();
    members.replicas.len() != before
}

/// Log a status change and note its time.
fn note_change(replica: &Replica, health: &mut Health, before: Status) {
    let after = health.status;
    if after != before {
        health.last_change_at = Some(unix_now());
        tracing::info!(
            replica = %replica.name,
            from = before.as_str(),
            to = after.as_str(),
            error = health.last_error.as_deref().unwrap_or(""),
            "replica health changed"
        );
    }
}

pub fn unix_now() -> f64 {
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
    /// Whether new sessions may be sent here (capacity aside).
    pub fn selectable(&self) -> bool {
        self.health.status == Status::Healthy && !self.draining()
    }

    /// Takes no new sessions: by config (`drain`, or removed) or by its own word.
    pub fn draining(&self) -> bool {
        self.replica.draining || self.health.reported.as_ref().is_some_and(|r| r.draining)
    }

    /// Sessions on the replica as best known: what it reported, corrected by the sessions
    /// this router opened or ended there since; without a report, this router's own.
    pub fn load(&self) -> u64 {
        let own = self.replica.active_sessions();
        match self.health.reported.as_ref().and_then(|r| r.sessions) {
            Some(reported) => {
                let corrected = reported as i128 + own as i128 - self.health.own_at_report as i128;
                (corrected.max(0) as u64).max(own as u64)
            }
            None => own as u64,
        }
    }

    /// The capacity in force: the config's and the replica's own, whichever is lower.
    pub fn capacity(&self) -> Option<u64> {
        let configured =
            (self.replica.max_sessions != usize::MAX).then_some(self.replica.max_sessions as u64);
        let reported = self.health.reported.as_ref().and_then(|r| r.max_sessions);
        match (configured, reported) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// At capacity: this router's own reservations (exact), or the load as best known.
    pub fn is_full(&self) -> bool {
        self.replica.is_full() || self.capacity().is_some_and(|max| self.load() >= max)
    }
}

/// An immutable view of every replica: config order, then those found through DNS (group by
/// group), then replicas a reload or DNS removed that still have sessions.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub replicas: Vec<ReplicaState>,
    pub groups: Vec<GroupState>,
}

/// One address a replica group's lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub ip: IpAddr,
    pub port: u16,
    /// The name it was found under (an SRV group: the record's target).
    pub host: String,
}

/// How a replica group's lookups have gone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupState {
    pub name: String,
    /// What it looks up, as `dns NAME port N` or `srv NAME`.
    pub lookup: String,
    /// Addresses the last good lookup found.
    pub found: usize,
    pub lookups_ok: u64,
    /// Lookups that answered with no address: the last good set stays.
    pub lookups_empty: u64,
    /// Lookups that failed: the last good set stays.
    pub lookups_failed: u64,
    pub last_ok_at: Option<f64>,
    pub last_error: Option<String>,
}

pub struct Registry {
    snapshot: ArcSwap<Snapshot>,
    /// Writers only: serialises updates so none is lost between load and store.
    members: Mutex<Members>,
    /// Woken when the replica set or the health settings change.
    changed: Notify,
    /// Woken when a reload applies a new config.
    reconfigured: Notify,
}

struct Members {
    replicas: Vec<Arc<Replica>>,
    health: Vec<Health>,
    check: HealthCheck,
    /// The config's own [[replicas]].
    configured: Vec<config::Replica>,
    groups: Vec<config::ReplicaGroup>,
    discovery: config::Discovery,
    /// Each group's last good lookup, by group name.
    found: HashMap<String, Vec<Found>>,
    group_states: Vec<GroupState>,
}

impl Members {
    /// The replicas there should be: the config's, then each group's (an address the config
    /// already lists is not added twice).
    fn wanted(&self) -> Vec<config::Replica> {
        let mut wanted = self.configured.clone();
        for group in &self.groups {
            for found in self.found.get(&group.name).into_iter().flatten() {
                match group.member(found.ip, found.port, &found.host) {
                    Ok(member) if !wanted.iter().any(|r| r.url == member.url) => {
                        wanted.push(member)
                    }
                    Ok(_) => {}
                    Err(reason) => {
                        tracing::warn!(group = %group.name, host = %found.host, %reason, "found address left out")
                    }
                }
            }
        }
        wanted
    }

    fn group_state(&mut self, name: &str) -> Option<&mut GroupState> {
        self.group_states.iter_mut().find(|g| g.name == name)
    }
}

/// What a reload changed in the replica set, by name.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub added: Vec<String>,
    /// Gone from the config (those with live sessions drain: see [`Changes::draining`]).
    pub removed: Vec<String>,
    /// Removed, but kept (draining) until their live sessions end.
    pub draining: Vec<String>,
    /// Kept (same url), with their health state and counters.
    pub kept: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.draining.is_empty()
    }
}

impl Registry {
    pub fn new(config: &Config) -> Registry {
        let registry = Registry {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            members: Mutex::new(Members {
                replicas: Vec::new(),
                health: Vec::new(),
                check: config.health_check.clone(),
                configured: Vec::new(),
                groups: Vec::new(),
                discovery: config::Discovery::default(),
                found: HashMap::new(),
                group_states: Vec::new(),
            }),
            changed: Notify::new(),
            reconfigured: Notify::new(),
        };
        registry.reconfigure(config);
        registry
    }

    /// Take a new config's replica set, groups and health settings. A replica whose url was
    /// already known keeps its health state, counters and live sessions; settings (name,
    /// weight, primary, capacity, drain) come from the new config. A replica the config no
    /// longer lists stays, draining, while it has sessions (they run on; it is still probed,
    /// so `close_on_unhealthy` still applies), and is dropped when the last one ends. A group
    /// that looks up the same name keeps what it found.
    pub fn reconfigure(&self, config: &Config) -> Changes {
        let mut members = self.members.lock().unwrap();
        let old_groups = std::mem::take(&mut members.groups);
        let mut found = std::mem::take(&mut members.found);
        found.retain(|name, _| {
            let lookup = |groups: &[config::ReplicaGroup]| {
                groups
                    .iter()
                    .find(|g| &g.name == name)
                    .map(|g| g.lookup.clone())
            };
            lookup(&old_groups).is_some() && lookup(&old_groups) == lookup(&config.replica_groups)
        });
        let old_states = std::mem::take(&mut members.group_states);
        members.group_states = config
            .replica_groups
            .iter()
            .map(|group| {
                let lookup = match &group.lookup {
                    config::GroupLookup::Host { name, port } => format!("dns {name} port {port}"),
                    config::GroupLookup::Srv { name } => format!("srv {name}"),
                };
                match old_states.iter().find(|s| s.name == group.name) {
                    Some(state) if found.contains_key(&group.name) => state.clone(),
                    _ => GroupState {
                        name: group.name.clone(),
                        lookup,
                        ..GroupState::default()
                    },
                }
            })
            .collect();
        members.found = found;
        members.configured = config.replicas.clone();
        members.groups = config.replica_groups.clone();
        members.discovery = config.discovery.clone();
        members.check = config.health_check.clone();
        let changes = replace(&mut members);
        self.publish(&members);
        drop(members);
        self.changed.notify_waiters();
        self.reconfigured.notify_waiters();
        changes
    }

    /// A group's lookup found `found` (not empty): its members become those addresses. New
    /// ones start `unknown`; one that left drains like a replica removed from the config.
    pub fn found(&self, group: &str, found: Vec<Found>) -> Changes {
        let mut members = self.members.lock().unwrap();
        let Some(state) = members.group_state(group) else {
            return Changes::default();
        };
        state.lookups_ok += 1;
        state.last_ok_at = Some(unix_now());
        state.last_error = None;
        state.found = found.len();
        let changed = members.found.get(group) != Some(&found);
        members.found.insert(group.to_string(), found);
        let changes = if changed {
            replace(&mut members)
        } else {
            Changes::default()
        };
        self.publish(&members);
        drop(members);
        if !changes.is_empty() {
            tracing::info!(
                group,
                added = %changes.added.join(","),
                removed = %changes.removed.join(","),
                draining = %changes.draining.join(","),
                "replica group changed"
            );
            self.changed.notify_waiters();
        }
        changes
    }

    /// A group's lookup failed, or found nothing (`error` says which): its last good set stays.
    pub fn lookup_failed(&self, group: &str, empty: bool, error: String) {
        let mut members = self.members.lock().unwrap();
        let Some(state) = members.group_state(group) else {
            return;
        };
        if empty {
            state.lookups_empty += 1;
        } else {
            state.lookups_failed += 1;
        }
        state.last_error = Some(error);
        self.publish(&members);
    }

    /// The replica groups and discovery settings in force.
    pub fn groups(&self) -> (Vec<config::ReplicaGroup>, config::Discovery) {
        let members = self.members.lock().unwrap();
        (members.groups.clone(), members.discovery.clone())
    }

    /// Resolves at the next config reload (create the future before reading what it guards).
    pub fn reconfigured(&self) -> tokio::sync::futures::Notified<'_> {
        self.reconfigured.notified()
    }

    /// Resolves at the next change of the replica set or health settings (create the future
    /// before reading what it guards, so no change falls between).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
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
            ..
        } = &mut *members;
        for (replica, observation) in observations {
            if let Some(i) = position_of(replicas, &replica) {
                apply(&replicas[i], &mut health[i], &observation, check);
            }
        }
        let dropped = drop_finished(&mut members);
        self.publish(&members);
        drop(members);
        if dropped {
            self.changed.notify_waiters();
        }
    }

    /// Apply one observation.
    pub fn observe(&self, replica: &Arc<Replica>, observation: Observation) {
        self.observe_all([(replica.clone(), observation)]);
    }

    /// A session's upstream connect to `replica` failed in a way that says something about
    /// the replica. It counts as a failed probe unless `client` has already counted in the
    /// current run of failures: one client alone cannot turn a replica unhealthy.
    pub fn passive_failure(&self, replica: &Arc<Replica>, client: ClientKey, error: String) {
        let mut members = self.members.lock().unwrap();
        let Members {
            replicas,
            health,
            check,
            ..
        } = &mut *members;
        let Some(i) = position_of(replicas, replica) else {
            return;
        };
        if health[i].passive_clients.contains(&client) {
            tracing::debug!(replica = %replica.name, %error, "connect failure not counted: this client already counted in this run");
            return;
        }
        health[i].passive_clients.push(client);
        apply(
            &replicas[i],
            &mut health[i],
            &Observation::Failure { error },
            check,
        );
        self.publish(&members);
    }

    /// A session's upstream handshake with `replica` completed: a run of connect failures
    /// ends (the status itself moves only with probes). Lock-free unless there was a run.
    pub fn connect_succeeded(&self, replica: &Arc<Replica>) {
        let snapshot = self.snapshot.load();
        let in_a_run = snapshot
            .replicas
            .iter()
            .find(|r| Arc::ptr_eq(&r.replica.live, &replica.live))
            .is_some_and(|r| r.health.consecutive_failures > 0);
        if !in_a_run {
            return;
        }
        let mut members = self.members.lock().unwrap();
        let Some(i) = members
            .replicas
            .iter()
            .position(|r| Arc::ptr_eq(&r.live, &replica.live))
        else {
            return;
        };
        members.health[i].consecutive_failures = 0;
        members.health[i].passive_clients.clear();
        self.publish(&members);
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
        self.snapshot.store(Arc::new(Snapshot {
            replicas,
            groups: members.group_states.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Observation {
        Observation::Success {
            latency: Duration::from_millis(3),
            report: None,
        }
    }
    fn fail() -> Observation {
        Observation::Failure {
            error: "refused".into(),
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

    fn config(replicas: &[(&str, bool)]) -> Config {
        let text: String = replicas
            .iter()
            .map(|(url, drain)| format!("[[replicas]]\nurl = \"{url}\"\ndrain = {drain}\n"))
            .collect();
        Config::parse(&text).unwrap()
    }

    fn healthy(registry: &Registry) {
        registry.observe_all(registry.replicas().into_iter().map(|r| (r, ok())));
    }

    fn listed(registry: &Registry) -> Vec<(String, bool, bool, bool)> {
        registry
            .snapshot()
            .replicas
            .iter()
            .map(|r| {
                (
                    r.replica.url.clone(),
                    r.selectable(),
                    r.replica.draining,
                    r.replica.removed,
                )
            })
            .collect()
    }

    #[test]
    fn a_draining_replica_takes_no_sessions_and_a_reload_can_undo_it() {
        let (a, b) = ("http://127.0.0.1:1", "http://127.0.0.1:2");
        let registry = Registry::new(&config(&[(a, false), (b, true)]));
        healthy(&registry);
        assert_eq!(
            listed(&registry),
            [
                (a.into(), true, false, false),
                (b.into(), false, true, false)
            ]
        );
        registry.reconfigure(&config(&[(a, false), (b, false)]));
        assert_eq!(listed(&registry)[1], (b.into(), true, false, false));
    }

    #[test]
    fn a_removed_replica_stays_draining_until_its_last_session_ends() {
        let (a, b, c) = (
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        );
        let registry = Registry::new(&config(&[(a, false), (b, false), (c, false)]));
        healthy(&registry);
        let session = registry.replicas()[1].try_reserve_session().unwrap();
        let changes = registry.reconfigure(&config(&[(a, false)]));
        assert_eq!(changes.removed, ["127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!(changes.draining, ["127.0.0.1:2"]);
        // The one with a session stays, draining, with its health; the other is gone.
        assert_eq!(
            listed(&registry),
            [
                (a.into(), true, false, false),
                (b.into(), false, true, true)
            ]
        );
        assert_eq!(
            registry.snapshot().replicas[1].health.status,
            Status::Healthy
        );
        // Probe results keep it while the session lives...
        healthy(&registry);
        assert_eq!(listed(&registry).len(), 2);
        // ...a second reload that still omits it does not count it as removed again...
        let again = registry.reconfigure(&config(&[(a, false)]));
        assert!(again.removed.is_empty(), "{again:?}");
        assert_eq!(again.draining, ["127.0.0.1:2"]);
        // ...and the first probe results after its last session ended drop it.
        drop(session);
        healthy(&registry);
        assert_eq!(listed(&registry), [(a.into(), true, false, false)]);
    }

    #[test]
    fn a_removed_replica_that_comes_back_keeps_its_sessions_and_health() {
        let (a, b) = ("http://127.0.0.1:1", "http://127.0.0.1:2");
        let registry = Registry::new(&config(&[(a, false), (b, false)]));
        healthy(&registry);
        let _session = registry.replicas()[1].try_reserve_session().unwrap();
        registry.reconfigure(&config(&[(a, false)]));
        let changes = registry.reconfigure(&config(&[(a, false), (b, false)]));
        assert_eq!(changes.kept.len(), 2, "{changes:?}");
        assert_eq!(listed(&registry)[1], (b.into(), true, false, false));
        assert_eq!(registry.replicas()[1].active_sessions(), 1);
    }

    #[test]
    fn unknown_turns_unhealthy_after_threshold_failures() {
        let mut h = Health::default();
        h.observe(&fail(), 1, 1);
        assert_eq!(h.status, Status::Unhealthy);
    }
}
