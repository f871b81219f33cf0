//! Selection: which replicas a new session may try, best first.
//!
//! Two tiers, always in this order: the primary, then the other replicas. Only healthy
//! replicas below their capacity are candidates. Within a tier the policy decides the order:
//! `failover` (config order, the reference behaviour), `least_sessions` (fewest active
//! sessions per unit of weight) or `round_robin` (rotation in proportion to weight). The proxy
//! tries candidates in order until one completes the handshake. No locks: one atomic counter.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::Policy;
use crate::registry::{ReplicaState, Snapshot};

pub struct Balancer {
    policy: Policy,
    turns: AtomicU64,
}

/// Why there is no candidate, for the client's error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCandidate {
    NoHealthyReplica,
    AllAtCapacity,
}

impl Balancer {
    pub fn new(policy: Policy) -> Balancer {
        Balancer {
            policy,
            turns: AtomicU64::new(0),
        }
    }

    /// Candidates in the order they should be tried.
    pub fn candidates<'s>(
        &self,
        snapshot: &'s Snapshot,
    ) -> Result<Vec<&'s ReplicaState>, NoCandidate> {
        let usable = |r: &&ReplicaState| r.selectable() && !r.replica.is_full();
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
            self.order_tier(&mut order[start..]);
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

fn load(r: &ReplicaState) -> f64 {
    r.replica.active_sessions() as f64 / r.replica.weight
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
    use crate::registry::{Observation, Registry, SessionGuard};
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
        };
        reg.observe_all(healthy.iter().map(|&i| (i, ok.clone())));
    }

    fn order(balancer: &Balancer, reg: &Registry) -> Vec<usize> {
        balancer
            .candidates(&reg.snapshot())
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
        let err = Balancer::new(Policy::Failover)
            .candidates(&reg.snapshot())
            .unwrap_err();
        assert_eq!(err, NoCandidate::NoHealthyReplica);
    }

    #[test]
    fn failover_is_primary_first_then_config_order() {
        let reg = registry(Some(2), &[1.0; 4], "");
        set_healthy(&reg, &[0, 1, 2, 3]);
        assert_eq!(
            order(&Balancer::new(Policy::Failover), &reg),
            vec![2, 0, 1, 3]
        );
    }

    #[test]
    fn unhealthy_primary_is_skipped() {
        let reg = registry(Some(0), &[1.0; 3], "");
        set_healthy(&reg, &[0, 1, 2]);
        let fail = Observation::Failure {
            error: "x".into(),
            latency: None,
        };
        for _ in 0..3 {
            reg.observe(0, fail.clone());
        }
        assert_eq!(order(&Balancer::new(Policy::Failover), &reg), vec![1, 2]);
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
            order(&Balancer::new(Policy::LeastSessions), &reg),
            vec![0, 2, 3, 1]
        );
    }

    #[test]
    fn round_robin_follows_weights_and_interleaves() {
        let reg = registry(None, &[1.0, 2.0, 1.0], "");
        set_healthy(&reg, &[0, 1, 2]);
        let balancer = Balancer::new(Policy::RoundRobin);
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

    #[test]
    fn full_replicas_are_skipped_and_all_full_is_reported() {
        let reg = registry(Some(0), &[1.0, 1.0], "max_sessions = 2");
        set_healthy(&reg, &[0, 1]);
        let balancer = Balancer::new(Policy::Failover);
        let held = hold(&reg, 0, 2);
        assert!(
            reg.replicas()[0].try_reserve_session().is_none(),
            "capacity is enforced at reservation"
        );
        assert_eq!(order(&balancer, &reg), vec![1]);
        let held_too = hold(&reg, 1, 2);
        assert_eq!(
            balancer.candidates(&reg.snapshot()).unwrap_err(),
            NoCandidate::AllAtCapacity
        );
        drop((held, held_too));
        assert_eq!(order(&balancer, &reg), vec![0, 1]);
    }
}
