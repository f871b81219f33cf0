//! Selection policy: which replicas a new session may try, best first.
//!
//! The reference policy (failover): the healthy primary, then every other healthy replica in
//! config order. The proxy tries them in this order until one completes the handshake.

use crate::registry::{ReplicaState, Snapshot};

/// Selectable replicas in the order they should be tried. No allocation, no lock.
pub fn candidates(snapshot: &Snapshot) -> impl Iterator<Item = &ReplicaState> + '_ {
    let primaries = snapshot
        .replicas
        .iter()
        .filter(|r| r.replica.primary && r.selectable());
    let others = snapshot
        .replicas
        .iter()
        .filter(|r| !r.replica.primary && r.selectable());
    primaries.chain(others)
}

/// The replica the reference router would pick.
pub fn select(snapshot: &Snapshot) -> Option<&ReplicaState> {
    candidates(snapshot).next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::registry::{Observation, Registry};
    use std::time::Duration;

    fn registry(primary: Option<usize>, n: usize) -> Registry {
        let mut text = String::new();
        for i in 0..n {
            text += &format!(
                "[[replicas]]\nurl = \"http://127.0.0.1:{}\"\nprimary = {}\n",
                8000 + i,
                primary == Some(i)
            );
        }
        Registry::new(&Config::parse(&text).unwrap())
    }

    fn set(reg: &Registry, healthy: &[usize]) {
        let ok = Observation::Success {
            latency: Duration::ZERO,
        };
        reg.observe_all(healthy.iter().map(|&i| (i, ok.clone())));
    }

    fn order(reg: &Registry) -> Vec<usize> {
        candidates(&reg.snapshot())
            .map(|r| r.replica.index)
            .collect()
    }

    #[test]
    fn nothing_selectable_until_probed() {
        let reg = registry(Some(1), 3);
        assert!(select(&reg.snapshot()).is_none());
    }

    #[test]
    fn primary_first_then_config_order() {
        let reg = registry(Some(2), 4);
        set(&reg, &[0, 1, 2, 3]);
        assert_eq!(order(&reg), vec![2, 0, 1, 3]);
    }

    #[test]
    fn unhealthy_primary_is_skipped() {
        let reg = registry(Some(0), 3);
        set(&reg, &[1, 2]);
        assert_eq!(order(&reg), vec![1, 2]);
        let fail = Observation::Failure {
            error: "x".into(),
            latency: None,
        };
        set(&reg, &[0]);
        for _ in 0..3 {
            reg.observe(0, fail.clone());
        }
        assert_eq!(order(&reg), vec![1, 2]);
    }
}
