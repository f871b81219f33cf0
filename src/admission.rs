//! The router's own limits: connections (at accept) and sessions (at the upgrade), in all and
//! per client address, and fitting them to the open-file limit at start.
//!
//! Each admission is a guard that gives its place back when dropped; a session's permit moves
//! into the session and is held until the session ends, not released at the 101.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::client::{is_trusted, ClientKey};
use crate::config::{Cidr, Limits};
use crate::metrics::{ConnectionRefusal, Rejection};

/// Per-client counts, sharded so concurrent accepts rarely meet on one lock. Entries exist
/// only while a client holds something.
struct ClientCounts {
    shards: Box<[Mutex<HashMap<ClientKey, u32>>]>,
    hasher: std::collections::hash_map::RandomState,
}

const SHARDS: usize = 16;

impl ClientCounts {
    fn new() -> ClientCounts {
        ClientCounts {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &ClientKey) -> &Mutex<HashMap<ClientKey, u32>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// Count one more for `key` unless it already holds `limit`.
    fn try_add(&self, key: ClientKey, limit: usize) -> bool {
        let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        let count = shard.entry(key).or_insert(0);
        if *count as usize >= limit {
            if *count == 0 {
                shard.remove(&key);
            }
            return false;
        }
        *count += 1;
        true
    }

    fn remove(&self, key: ClientKey) {
        let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&key);
            }
        }
    }

    #[cfg(test)]
    fn get(&self, key: ClientKey) -> u32 {
        let shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(&key).copied().unwrap_or(0)
    }
}

/// Take one place under `max` in `count`.
fn try_take(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// Accepted connections: `max_connections` in all and `max_connections_per_client` per
/// address (trusted front proxies carry many clients and are exempt from the latter).
pub struct ConnectionGate {
    max: usize,
    per_client: AtomicUsize,
    open: AtomicUsize,
    clients: ClientCounts,
    trusted: arc_swap::ArcSwap<Vec<Cidr>>,
}

/// A connection's place; given back on drop.
pub struct ConnectionGuard {
    gate: Arc<ConnectionGate>,
    client: Option<ClientKey>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(client) = self.client {
            self.gate.clients.remove(client);
        }
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionGate {
    pub fn new(max: usize, limits: &Limits, trusted: &[Cidr]) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            max,
            per_client: AtomicUsize::new(limits.max_connections_per_client),
            open: AtomicUsize::new(0),
            clients: ClientCounts::new(),
            trusted: arc_swap::ArcSwap::from_pointee(trusted.to_vec()),
        })
    }

    /// Take the reloadable settings (the total is fixed at start).
    pub fn reconfigure(&self, limits: &Limits, trusted: &[Cidr]) {
        self.per_client
            .store(limits.max_connections_per_client, Ordering::Relaxed);
        self.trusted.store(Arc::new(trusted.to_vec()));
    }

    /// Admit a connection from `peer`, or say which limit it hit.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionGuard, ConnectionRefusal> {
        if !try_take(&self.open, self.max) {
            return Err(ConnectionRefusal::ConnectionLimit);
        }
        let per_client = self.per_client.load(Ordering::Relaxed);
        let client = if per_client == usize::MAX || is_trusted(peer, &self.trusted.load()) {
            None
        } else {
            let key = ClientKey::from(peer);
            if !self.clients.try_add(key, per_client) {
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(ConnectionRefusal::ClientConnectionLimit);
            }
            Some(key)
        };
        Ok(ConnectionGuard {
            gate: self.clone(),
            client,
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// Sessions: `max_sessions` in all and `max_sessions_per_client` per client address.
pub struct SessionGate {
    max: usize,
    per_client: AtomicUsize,
    active: AtomicUsize,
    clients: ClientCounts,
    /// Woken when the last session ends.
    idle: Notify,
}

/// A session's place, held by the session until it ends.
pub struct SessionPermit {
    gate: Arc<SessionGate>,
    client: Option<ClientKey>,
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        if let Some(client) = self.client {
            self.gate.clients.remove(client);
        }
        if self.gate.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gate.idle.notify_waiters();
        }
    }
}

impl SessionGate {
    pub fn new(max: usize, limits: &Limits) -> Arc<SessionGate> {
        Arc::new(SessionGate {
            max,
            per_client: AtomicUsize::new(limits.max_sessions_per_client),
            active: AtomicUsize::new(0),
            clients: ClientCounts::new(),
            idle: Notify::new(),
        })
    }

    pub fn reconfigure(&self, limits: &Limits) {
        self.per_client
            .store(limits.max_sessions_per_client, Ordering::Relaxed);
    }

    /// A place for a session of `client`, or which limit it hit.
    pub fn acquire(self: &Arc<Self>, client: ClientKey) -> Result<SessionPermit, Rejection> {
        if !try_take(&self.active, self.max) {
            return Err(Rejection::SessionLimit);
        }
        let per_client = self.per_client.load(Ordering::Relaxed);
        let client = if per_client == usize::MAX {
            None
        } else if self.clients.try_add(client, per_client) {
            Some(client)
        } else {
            if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.idle.notify_waiters();
            }
            return Err(Rejection::ClientSessionLimit);
        };
        Ok(SessionPermit {
            gate: self.clone(),
            client,
        })
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Sessions `client` holds now.
    #[cfg(test)]
    pub fn held_by(&self, client: ClientKey) -> u32 {
        self.clients.get(client)
    }

    /// Wait until no session is left (handshakes in progress included).
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Descriptors the router needs besides its sessions' two: listeners, the health probes'
/// connections, event loops, stdio, the config file, the pipes of spliced frames, and slack
/// for what comes and goes.
pub fn reserved_descriptors(replicas: usize, workers: usize) -> usize {
    64 + 2 * replicas + 4 * workers + 2 * crate::relay::splice::MAX_PIPES
}

/// `max_connections` and `max_sessions` that fit `open_files` descriptors: each connection
/// takes one, each session one more (its replica). Defaults give way; explicit values that do
/// not fit are an error. Returns the limits and, if a default was lowered, why.
pub fn fit_to_open_files(
    limits: &Limits,
    open_files: u64,
    reserved: usize,
) -> Result<(usize, usize, Option<String>), String> {
    let available = (open_files as usize).saturating_sub(reserved);
    let (connections, sessions) = (limits.max_connections, limits.max_sessions);
    if connections + sessions <= available {
        return Ok((connections, sessions, None));
    }
    let advice = format!(
        "the open-file limit is {open_files} ({reserved} kept for the router itself); raise it \
         (LimitNOFILE= for systemd, ulimit -n) or lower the limits"
    );
    let fitted = match (limits.connections_by_default, limits.sessions_by_default) {
        (false, false) => None,
        (true, false) => available
            .checked_sub(sessions)
            .filter(|c| *c >= sessions)
            .map(|c| (c, sessions)),
        (false, true) => available
            .checked_sub(connections)
            .filter(|s| *s >= 1)
            .map(|s| (connections, s.min(sessions))),
        (true, true) => {
            // Keep the defaults' proportion: 10 connections to 8 sessions.
            let sessions = available * 8 / 18;
            (sessions >= 1).then(|| (available - sessions, sessions))
        }
    };
    match fitted {
        Some((c, s)) => Ok((
            c,
            s,
            Some(format!(
                "limits lowered to max_connections = {c}, max_sessions = {s} to fit: {advice}"
            )),
        )),
        None => Err(format!(
            "limits.max_connections ({connections}) + limits.max_sessions ({sessions}) need \
             {} descriptors: {advice}",
            connections + sessions + reserved
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limits(extra: &str) -> Limits {
        Config::parse(&format!(
            "{extra}\n[[replicas]]\nurl = \"http://127.0.0.1:1\"\n"
        ))
        .unwrap()
        .limits
    }

    #[test]
    fn connections_are_limited_in_all_and_per_client_and_given_back() {
        let l = limits(
            "[limits]\nmax_connections = 3\nmax_sessions = 3\nmax_connections_per_client = 2",
        );
        let trusted: Vec<Cidr> = vec!["10.0.0.1".parse().unwrap()];
        let gate = ConnectionGate::new(3, &l, &trusted);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert_eq!(
            gate.admit(a).err(),
            Some(ConnectionRefusal::ClientConnectionLimit)
        );
        let _third = gate.admit(b).unwrap();
        assert_eq!(
            gate.admit(b).err(),
            Some(ConnectionRefusal::ConnectionLimit)
        );
        drop(first);
        assert_eq!(gate.open(), 2);
        let _again = gate.admit(a).unwrap();
        // A trusted proxy is exempt from the per-client limit (not from the total).
        let gate = ConnectionGate::new(10, &l, &trusted);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..5).map(|_| gate.admit(proxy).unwrap()).collect();
        assert_eq!(held.len(), 5);
    }

    #[tokio::test]
    async fn session_permits_count_per_client_and_drain() {
        let l = limits("[limits]\nmax_sessions = 2\nmax_sessions_per_client = 1");
        let gate = SessionGate::new(2, &l);
        let a = ClientKey::from("192.0.2.1".parse::<IpAddr>().unwrap());
        let b = ClientKey::from("192.0.2.2".parse::<IpAddr>().unwrap());
        let c = ClientKey::from("192.0.2.3".parse::<IpAddr>().unwrap());
        let pa = gate.acquire(a).unwrap();
        assert_eq!(gate.acquire(a).err(), Some(Rejection::ClientSessionLimit));
        let pb = gate.acquire(b).unwrap();
        assert_eq!(gate.acquire(c).err(), Some(Rejection::SessionLimit));
        assert_eq!(gate.active(), 2);
        let drained = tokio::spawn({
            let gate = gate.clone();
            async move { gate.drained().await }
        });
        drop(pa);
        assert_eq!(gate.held_by(a), 0);
        drop(pb);
        tokio::time::timeout(std::time::Duration::from_secs(5), drained)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn limits_fit_the_open_file_limit() {
        // Defaults on a 20,000-descriptor machine fit as they are.
        let l = limits("");
        assert_eq!(
            fit_to_open_files(&l, 20_000, 100).unwrap(),
            (10_000, 8_000, None)
        );
        // On a small limit the defaults give way, keeping their proportion.
        let (c, s, why) = fit_to_open_files(&l, 1024, 64).unwrap();
        assert!(c + s <= 960 && s >= 400, "{c} {s}");
        assert!(why.unwrap().contains("open-file limit is 1024"));
        // Explicit values that do not fit are refused, with the numbers.
        let l = limits("[limits]\nmax_connections = 10000\nmax_sessions = 10000");
        let e = fit_to_open_files(&l, 20_000, 64).unwrap_err();
        assert!(
            e.contains("20064 descriptors") && e.contains("open-file limit is 20000"),
            "{e}"
        );
        // An explicit session limit keeps its value; the default connection limit gives way.
        let l = limits("[limits]\nmax_sessions = 9968");
        assert_eq!(fit_to_open_files(&l, 20_000, 64).unwrap().1, 9968);
    }
}
