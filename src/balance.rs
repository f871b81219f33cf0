//! Selection: which replicas a new session may try, best first.
//!
//! Two tiers, always in this order: the primary, then the other replicas. Only healthy
//! replicas below their capacity are candidates. Within a tier the policy decides the order:
//! `failover` (config order, the reference behaviour), `least_sessions` (fewest active
//! sessions per unit of weight) or `round_robin` (rotation in proportion to weight). The proxy
//! tries candidates in order until one completes the handshake. No locks: one atomic counter.
//!
//! Sticky sessions: when `sticky_key` is configured and a request carries a key, the tier is
//! ordered by weighted rendezvous hashing of (key, replica url) instead, so a reconnect lands
//! on the same replica, every router with the same config agrees without shared state, and a
//! replica leaving moves only its own keys.

use std::sync::atomic::{AtomicU64, Ordering};

use hyper::http::request::Parts;

use crate::config::{Policy, StickyKey};
use crate::registry::{ReplicaState, Snapshot};

pub struct Balancer {
    policy: Policy,
    sticky_key: Option<StickyKey>,
    turns: AtomicU64,
}

/// Why there is no candidate, for the client's error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCandidate {
    NoHealthyReplica,
    AllAtCapacity,
}

impl Balancer {
    pub fn new(policy: Policy, sticky_key: Option<StickyKey>) -> Balancer {
        Balancer {
            policy,
            sticky_key,
            turns: AtomicU64::new(0),
        }
    }

    /// The session key the request carries, when stickiness is configured. Empty values count
    /// as no key, so they do not all pile onto one replica.
    pub fn session_key<'r>(&self, request: &'r Parts) -> Option<&'r str> {
        let key = match self.sticky_key.as_ref()? {
            StickyKey::Query(name) => request
                .uri
                .query()?
                .split('&')
                .find_map(|pair| pair.strip_prefix(name.as_str())?.strip_prefix('=')),
            StickyKey::Header(name) => request.headers.get(name)?.to_str().ok(),
            StickyKey::Cookie(name) => request
                .headers
                .get_all(hyper::header::COOKIE)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(';'))
                .find_map(|pair| pair.trim().strip_prefix(name.as_str())?.strip_prefix('=')),
        };
        key.filter(|k| !k.is_empty())
    }

    /// Candidates in the order they should be tried. With a session key, each tier is ordered
    /// by rendezvous score instead of the policy.
    pub fn candidates<'s>(
        &self,
        snapshot: &'s Snapshot,
        session_key: Option<&str>,
    ) -> Result<Vec<&'s ReplicaState>, NoCandidate> {
        let usable = |r: &&ReplicaState| r.selectable() && !r.is_full();
        let mut order: Vec<&ReplicaState> = Vec::with_capacity(snapshot.replicas.len());
        for primary_tier in [true, false] {
            let start = order.len();
            order.extend(
                snapshot
                    .replicas
                    .iter()
                    .filter(|r| r.replica.primary == primary_tier)
                    .filter(usable),
            );
            match session_key {
                Some(key) => order_by_rendezvous(&mut order[start..], key),
                None => self.order_tier(&mut order[start..]),
            }
        }
        if order.is_empty() {
            return Err(if snapshot.replicas.iter().any(|r| r.selectable()) {
                NoCandidate::AllAtCapacity
            } else {
                NoCandidate::NoHealthyReplica
            });
        }
        Ok(order)
    }

    fn order_tier(&self, tier: &mut [&ReplicaState]) {
        if tier.len() < 2 {
            return;
        }
        match self.policy {
            Policy::Failover => {}
            Policy::LeastSessions => {
                // Stable sort: equal loads keep config order.
                tier.sort_by(|a, b| load(a).total_cmp(&load(b)));
            }
            Policy::RoundRobin => {
                let turn = self.turns.fetch_add(1, Ordering::Relaxed);
                let first = weighted_pick(tier, turn);
                tier.rotate_left(first);
            }
        }
    }
}

/// Highest score first. Scores are finite and positive, where the bit pattern orders like
/// the value, so the cached sort key can be a plain integer.
fn order_by_rendezvous(tier: &mut [&ReplicaState], key: &str) {
    if tier.len() > 1 {
        tier.sort_by_cached_key(|r| std::cmp::Reverse(rendezvous_score(key, r).to_bits()));
    }
}

fn load(r: &ReplicaState) -> f64 {
    r.load() as f64 / r.replica.weight
}

/// Weighted rendezvous score of `key` on a replica: the highest score wins. With h uniform in
/// (0, 1), `-weight / ln(h)` gives each replica keys in proportion to its weight.
fn rendezvous_score(key: &str, r: &ReplicaState) -> f64 {
    let h = stable_hash(key.as_bytes(), r.replica.url.as_bytes());
    let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -r.replica.weight / unit.ln()
}

/// FNV-1a over both inputs, then a splitmix64 finish: fixed here, so every router build and
/// instance computes the same value (std's hashers make no such promise).
fn stable_hash(key: &[u8], replica: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in key.iter().chain([0xff].iter()).chain(replica) {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The replica for turn `turn`: the golden-ratio sequence spreads turns evenly over the
/// cumulative weights, so picks interleave and converge to the weight proportions.
fn weighted_pick(tier: &[&ReplicaState], turn: u64) -> usize {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    let total: f64 = tier.iter().map(|r| r.replica.weight).sum();
    let point = ((turn as f64 * GOLDEN).fract()) * total;
    let mut cumulative = 0.0;
    for (i, r) in tier.iter().enumerate() {
        cumulative += r.replica.weight;
        if point < cumulative {
            return i;
        }
    }
    tier.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::registry::{Observation, Registry, Report, SessionGuard};
    use std::time::Duration;

    fn registry(primary: Option<usize>, weights: &[f64], extra: &str) -> Registry {
        let mut text = String::new();
        for (i, w) in weights.iter().enumerate() {
            text += &format!(
                "[[replicas]]\nurl = \"http://127.0.0.1:{}\"\nprimary = {}\nweight = {w}\n{extra}\n",
                8000 + i,
                primary == Some(i)
            );
        }
        Registry::new(&Config::parse(&text).unwrap())
    }

    fn set_healthy(reg: &Registry, healthy: &[usize]) {
        let ok = Observation::Success {
            latency: Duration::ZERO,
            report: None,
        };
        reg.observe_all(
            healthy
                .iter()
                .map(|&i| (reg.replicas()[i].clone(), ok.clone())),
        );
    }

    fn order(balancer: &Balancer, reg: &Registry) -> Vec<usize> {
        balancer
            .candidates(&reg.snapshot(), None)
            .unwrap()
            .iter()
            .map(|r| r.replica.index)
            .collect()
    }

    fn hold(reg: &Registry, index: usize, n: usize) -> Vec<SessionGuard> {
        (0..n)
            .map(|_| reg.replicas()[index].try_reserve_session().unwrap())
            .collect()
    }

    #[test]
    fn nothing_selectable_until_probed() {
        let reg = registry(Some(1), &[1.0; 3], "");
        let err = Balancer::new(Policy::Failover, None)
            .candidates(&reg.snapshot(), None)
            .unwrap_err();
        assert_eq!(err, NoCandidate::NoHealthyReplica);
    }

    #[test]
    fn failover_is_primary_first_then_config_order() {
        let reg = registry(Some(2), &[1.0; 4], "");
        set_healthy(&reg, &[0, 1, 2, 3]);
        assert_eq!(
            order(&Balancer::new(Policy::Failover, None), &reg),
            vec![2, 0, 1, 3]
        );
    }

    #[test]
    fn unhealthy_primary_is_skipped() {
        let reg = registry(Some(0), &[1.0; 3], "");
        set_healthy(&reg, &[0, 1, 2]);
        let fail = Observation::Failure { error: "x".into() };
        for _ in 0..3 {
            reg.observe(&reg.replicas()[0], fail.clone());
        }
        assert_eq!(
            order(&Balancer::new(Policy::Failover, None), &reg),
            vec![1, 2]
        );
    }

    /// `replica` answers its probe with `report`.
    fn report(reg: &Registry, replica: usize, report: Report) {
        reg.observe(
            &reg.replicas()[replica],
            Observation::Success {
                latency: Duration::ZERO,
                report: Some(report),
            },
        );
    }

    #[test]
    fn reported_load_orders_least_sessions_and_fills_capacity() {
        let reg = registry(None, &[1.0, 1.0, 1.0], "");
        set_healthy(&reg, &[0, 1, 2]);
        let sessions = |n| Report {
            sessions: Some(n),
            ..Report::default()
        };
        // Other routers' sessions count: r0 carries 7, r1 3, r2 5.
        report(&reg, 0, sessions(7));
        report(&reg, 1, sessions(3));
        report(&reg, 2, sessions(5));
        let balancer = Balancer::new(Policy::LeastSessions, None);
        assert_eq!(order(&balancer, &reg), vec![1, 2, 0]);
        // Sessions this router opens after the report add to it until the next one, and
        // those it ends come off.
        let mut held = hold(&reg, 1, 3);
        assert_eq!(order(&balancer, &reg), vec![2, 1, 0]);
        held.truncate(1);
        assert_eq!(order(&balancer, &reg), vec![1, 2, 0]);
        held.extend(hold(&reg, 1, 2));
        // The replica's own capacity: r2 full at 5 of 5; r0 draining by its own word.
        report(
            &reg,
            2,
            Report {
                sessions: Some(5),
                max_sessions: Some(5),
                draining: false,
            },
        );
        report(
            &reg,
            0,
            Report {
                draining: true,
                ..sessions(7)
            },
        );
        assert_eq!(order(&balancer, &reg), vec![1]);
        report(
            &reg,
            1,
            Report {
                max_sessions: Some(6),
                ..sessions(6)
            },
        );
        assert_eq!(
            balancer.candidates(&reg.snapshot(), None).unwrap_err(),
            NoCandidate::AllAtCapacity
        );
    }

    #[test]
    fn least_sessions_weighs_load_by_weight_and_keeps_the_primary_first() {
        let reg = registry(Some(0), &[1.0, 1.0, 2.0, 1.0], "");
        set_healthy(&reg, &[0, 1, 2, 3]);
        let _held = [
            hold(&reg, 0, 5),
            hold(&reg, 1, 2),
            hold(&reg, 2, 2),
            hold(&reg, 3, 1),
        ];
        // Loads: r1 2/1, r2 2/2 = 1, r3 1/1 = 1 -> r2 and r3 tie (config order), then r1.
        assert_eq!(
            order(&Balancer::new(Policy::LeastSessions, None), &reg),
            vec![0, 2, 3, 1]
        );
    }

    #[test]
    fn round_robin_follows_weights_and_interleaves() {
        let reg = registry(None, &[1.0, 2.0, 1.0], "");
        set_healthy(&reg, &[0, 1, 2]);
        let balancer = Balancer::new(Policy::RoundRobin, None);
        let mut counts = [0usize; 3];
        let mut firsts = Vec::new();
        for _ in 0..4000 {
            let o = order(&balancer, &reg);
            assert_eq!(o.len(), 3, "every candidate stays available for failover");
            counts[o[0]] += 1;
            firsts.push(o[0]);
        }
        for (i, expected) in [1000.0, 2000.0, 1000.0].iter().enumerate() {
            assert!(
                (counts[i] as f64 - expected).abs() < expected * 0.03,
                "{counts:?}"
            );
        }
        let longest_run = firsts
            .chunk_by(|a, b| a == b)
            .map(|c| c.len())
            .max()
            .unwrap();
        assert!(
            longest_run <= 3,
            "picks should interleave, longest run {longest_run}"
        );
    }

    // FNV-1a then splitmix64 of b"abc", 0xff, b"http://127.0.0.1:8000", computed independently.
    const PINNED_HASH: u64 = 241_659_959_820_080_690;

    fn sticky_first(balancer: &Balancer, reg: &Registry, key: &str) -> usize {
        balancer.candidates(&reg.snapshot(), Some(key)).unwrap()[0]
            .replica
            .index
    }

    #[test]
    fn sticky_keys_stay_put_follow_weights_and_move_only_when_their_replica_goes() {
        let reg = registry(None, &[1.0, 3.0, 1.0, 1.0], "");
        set_healthy(&reg, &[0, 1, 2, 3]);
        let balancer = Balancer::new(Policy::RoundRobin, None);
        let keys: Vec<String> = (0..6000).map(|i| format!("session-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| sticky_first(&balancer, &reg, k))
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| sticky_first(&balancer, &reg, k))
            .collect();
        assert_eq!(before, again, "the same key must pick the same replica");
        let mut counts = [0usize; 4];
        before.iter().for_each(|&i| counts[i] += 1);
        for (i, share) in [1.0, 3.0, 1.0, 1.0].iter().enumerate() {
            let expected = 6000.0 * share / 6.0;
            assert!(
                (counts[i] as f64 - expected).abs() < expected * 0.1,
                "{counts:?}"
            );
        }
        // Replica 2 goes unhealthy: only its keys move.
        let fail = Observation::Failure { error: "x".into() };
        for _ in 0..3 {
            reg.observe(&reg.replicas()[2], fail.clone());
        }
        for (key, &was) in keys.iter().zip(&before) {
            let now = sticky_first(&balancer, &reg, key);
            if was != 2 {
                assert_eq!(now, was, "key {key} moved although its replica is fine");
            } else {
                assert_ne!(now, 2);
            }
        }
    }

    #[test]
    fn the_hash_is_pinned_so_routers_of_different_versions_agree() {
        assert_eq!(stable_hash(b"abc", b"http://127.0.0.1:8000"), PINNED_HASH);
    }

    #[test]
    fn full_replicas_are_skipped_and_all_full_is_reported() {
        let reg = registry(Some(0), &[1.0, 1.0], "max_sessions = 2");
        set_healthy(&reg, &[0, 1]);
        let balancer = Balancer::new(Policy::Failover, None);
        let held = hold(&reg, 0, 2);
        assert!(
            reg.replicas()[0].try_reserve_session().is_none(),
            "capacity is enforced at reservation"
        );
        assert_eq!(order(&balancer, &reg), vec![1]);
        let held_too = hold(&reg, 1, 2);
        assert_eq!(
            balancer.candidates(&reg.snapshot(), None).unwrap_err(),
            NoCandidate::AllAtCapacity
        );
        drop((held, held_too));
        assert_eq!(order(&balancer, &reg), vec![0, 1]);
    }
}
