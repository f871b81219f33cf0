//! Joining a replica: the upstream handshake with the candidates, in order, racing up to
//! `race_candidates` at once (fast join). The first completed handshake wins; attempts still
//! in flight are abandoned before any session exists upstream, and ones that completed too
//! late are closed with 1001.
//!
//! [`race`] is generic over what an attempt yields, so its timing is tested without sockets;
//! [`Join`] runs it over the real connector and turns the result into a session or a refusal.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use super::layers::Admission;
use super::respond::{Admitted, Refusal};
use super::{forwarding, HttpSettings};
use crate::close::CloseReason;
use crate::registry::{Registry, Replica, SessionGuard};
use crate::upstream::{self, ConnectError, Upstream};

/// How upstream handshakes are raced.
#[derive(Debug, Clone, Copy)]
pub struct RaceSettings {
    /// Attempts in flight at once; 1 = one after another.
    pub candidates: usize,
    /// How long an attempt runs alone before the next joins.
    pub delay: Duration,
    /// Connect plus handshake, per attempt.
    pub connect_timeout: Duration,
}

/// How joining ended.
pub enum Joined<T> {
    Won {
        replica: Arc<Replica>,
        slot: SessionGuard,
        upstream: T,
        handshake: Duration,
    },
    /// A replica answered the upgrade with a 4xx: its verdict on this request.
    Rejected {
        replica: Arc<Replica>,
        error: ConnectError,
    },
    /// The router ran out of something of its own: trying further replicas cannot help.
    Overloaded(ConnectError),
    /// Every candidate failed, or (empty) none had a free slot.
    Failed(Vec<(Arc<Replica>, ConnectError)>),
}

/// One attempt, with the slot it reserved on its replica.
struct Attempt<T> {
    replica: Arc<Replica>,
    slot: SessionGuard,
    started: Instant,
    result: Result<T, ConnectError>,
}

/// Join one of `candidates`: `attempt` starts a handshake with a replica; `failed` hears of
/// every failure as it happens (for health and logs); `close_late` closes a handshake that
/// completed after another had won.
pub async fn race<T, A, Fut, F, C, CFut>(
    candidates: Vec<Arc<Replica>>,
    settings: RaceSettings,
    mut attempt: A,
    mut failed: F,
    close_late: C,
) -> Joined<T>
where
    T: Send + 'static,
    A: FnMut(Arc<Replica>) -> Fut,
    Fut: Future<Output = Result<T, ConnectError>> + Send + 'static,
    F: FnMut(&Arc<Replica>, &ConnectError),
    C: Fn(Arc<Replica>, T) -> CFut + Send + 'static,
    CFut: Future<Output = ()> + Send,
{
    let mut failures = Vec::new();
    if settings.candidates <= 1 {
        // No racing: one attempt at a time, run here rather than as a task of its own.
        for replica in candidates {
            let Some(slot) = replica.try_reserve_session() else {
                continue;
            };
            let started = Instant::now();
            let result = attempt(replica.clone()).await;
            let outcome = Attempt {
                replica,
                slot,
                started,
                result,
            };
            if let Some(joined) = settle(outcome, &mut failures, &mut failed) {
                return joined;
            }
        }
        return Joined::Failed(failures);
    }
    let mut pending = candidates.into_iter();
    let mut attempts = JoinSet::new();
    let mut next_start = Instant::now();
    loop {
        let may_start = attempts.len() < settings.candidates && pending.len() > 0;
        if may_start && (attempts.is_empty() || Instant::now() >= next_start) {
            // Reserve before connecting so concurrent handshakes cannot overshoot capacity.
            let Some((replica, slot)) = pending.by_ref().find_map(|replica| {
                let slot = replica.try_reserve_session()?;
                Some((replica, slot))
            }) else {
                continue;
            };
            let handshake = attempt(replica.clone());
            attempts.spawn(async move {
                let started = Instant::now();
                let result = handshake.await;
                Attempt {
                    replica,
                    slot,
                    started,
                    result,
                }
            });
            next_start = Instant::now() + settings.delay;
            continue;
        }
        let outcome = tokio::select! {
            joined = attempts.join_next() => match joined {
                None => return Joined::Failed(failures),
                Some(Ok(outcome)) => outcome,
                // A panicked attempt: its slot went with it.
                Some(Err(_)) => continue,
            },
            () = tokio::time::sleep_until(next_start), if may_start => continue,
        };
        match settle(outcome, &mut failures, &mut failed) {
            Some(joined) => {
                dismiss(attempts, close_late);
                return joined;
            }
            // A failure lets the next candidate start at once.
            None => next_start = Instant::now(),
        }
    }
}

/// The outcome of one finished attempt: a session, a refusal or a local shortage ends the
/// join; a failure is reported and the join goes on.
fn settle<T>(
    attempt: Attempt<T>,
    failures: &mut Vec<(Arc<Replica>, ConnectError)>,
    failed: &mut impl FnMut(&Arc<Replica>, &ConnectError),
) -> Option<Joined<T>> {
    let Attempt {
        replica,
        slot,
        started,
        result,
    } = attempt;
    match result {
        Ok(upstream) => Some(Joined::Won {
            replica,
            slot,
            upstream,
            handshake: started.elapsed(),
        }),
        Err(error @ ConnectError::Rejected(_)) => Some(Joined::Rejected { replica, error }),
        Err(error) => {
            failed(&replica, &error);
            if matches!(error, ConnectError::Local(_)) {
                return Some(Joined::Overloaded(error));
            }
            failures.push((replica, error));
            None
        }
    }
}

/// Abandon the attempts that lost: in-flight ones are dropped (no session exists upstream
/// yet); any that completed meanwhile are closed.
fn dismiss<T, C, CFut>(mut attempts: JoinSet<Attempt<T>>, close_late: C)
where
    T: Send + 'static,
    C: Fn(Arc<Replica>, T) -> CFut + Send + 'static,
    CFut: Future<Output = ()> + Send,
{
    if attempts.is_empty() {
        return;
    }
    attempts.abort_all();
    tokio::spawn(async move {
        while let Some(joined) = attempts.join_next().await {
            if let Ok(Attempt {
                replica,
                result: Ok(upstream),
                ..
            }) = joined
            {
                close_late(replica, upstream).await;
            }
        }
    });
}

/// The bottom of the stream stack: join a replica for the admitted request.
#[derive(Clone)]
pub struct Join {
    registry: Arc<Registry>,
    settings: Arc<ArcSwap<HttpSettings>>,
    session_context: Arc<crate::session::SessionContext>,
}

impl Join {
    pub fn new(
        registry: Arc<Registry>,
        settings: Arc<ArcSwap<HttpSettings>>,
        session_context: Arc<crate::session::SessionContext>,
    ) -> Join {
        Join {
            registry,
            settings,
            session_context,
        }
    }
}

impl tower::Service<Box<Admission>> for Join {
    type Response = Admitted;
    type Error = Refusal;
    type Future = Pin<Box<dyn Future<Output = Result<Admitted, Refusal>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, admission: Box<Admission>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.join(admission).await })
    }
}

impl Join {
    async fn join(self, mut admission: Box<Admission>) -> Result<Admitted, Refusal> {
        let settings = self.settings.load_full();
        let client = &admission.client;
        let request = Arc::new(forwarding::upstream_request(
            &admission.parts,
            client.peer.ip(),
            client.addr,
            client.request_id,
            &settings.trusted_proxies,
        ));
        let connector = upstream::connector(settings.race.connect_timeout);
        let registry = self.registry.clone();
        let (request_id, client_key) = (client.request_id, client.key);
        let context = self.session_context.clone();
        let candidates = std::mem::take(&mut admission.candidates);
        let joined = race(
            candidates,
            settings.race,
            |replica| connector.clone().oneshot((replica, request.clone())),
            |replica, error| {
                let detail = error.detail();
                replica.note_connect_failure(error.kind(), detail.clone());
                if error.blames_replica() {
                    tracing::warn!(%request_id, replica = %replica.name, error = %detail, "upstream connect failed; trying the next replica");
                    registry.passive_failure(replica, client_key, detail);
                } else {
                    tracing::info!(%request_id, replica = %replica.name, error = %detail, "upstream handshake failed (not held against the replica)");
                }
            },
            move |replica, upstream: Upstream| {
                tracing::debug!(%request_id, replica = %replica.name, "closing a handshake that lost the race");
                crate::session::close_unused(context.clone(), upstream)
            },
        )
        .await;
        let permit = admission.permit.take();
        match joined {
            Joined::Won {
                replica,
                slot,
                upstream,
                handshake,
            } => {
                self.registry.connect_succeeded(&replica);
                tracing::Span::current().record("replica", replica.name.as_str());
                Ok(Admitted {
                    replica,
                    slot,
                    upstream,
                    handshake,
                    permit,
                })
            }
            Joined::Rejected { replica, error } => {
                replica.note_connect_failure(error.kind(), error.detail());
                let ConnectError::Rejected(status) = error else {
                    unreachable!("only a 4xx answer is a rejection")
                };
                Err(Refusal::ReplicaRejected { replica, status })
            }
            Joined::Overloaded(error) => {
                // Already noted by the failure callback.
                tracing::warn!(%request_id, error = %error.detail(), "the router is out of resources for an upstream connect");
                Err(Refusal::Unavailable {
                    reason: CloseReason::RouterOverloaded,
                    detail: None,
                    permit,
                })
            }
            // Every candidate filled up between selection and reservation.
            Joined::Failed(failures) if failures.is_empty() => Err(Refusal::Unavailable {
                reason: CloseReason::AtCapacity,
                detail: None,
                permit,
            }),
            Joined::Failed(failures) => {
                // What a client may know: each replica's name and the kind of failure.
                let each: Vec<String> = failures
                    .iter()
                    .map(|(replica, error)| format!("{}: {error}", replica.name))
                    .collect();
                Err(Refusal::Unavailable {
                    reason: CloseReason::ConnectFailed,
                    detail: Some(format!("could not reach any worker ({})", each.join("; "))),
                    permit,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn replicas(n: usize) -> Vec<Arc<Replica>> {
        let text: String = (0..n)
            .map(|i| {
                format!(
                    "[[replicas]]\nname = \"r{i}\"\nurl = \"http://127.0.0.1:{}\"\n",
                    1000 + i
                )
            })
            .collect();
        Registry::new(&Config::parse(&text).unwrap()).replicas()
    }

    fn settings(candidates: usize, delay_ms: u64) -> RaceSettings {
        RaceSettings {
            candidates,
            delay: Duration::from_millis(delay_ms),
            connect_timeout: Duration::from_secs(5),
        }
    }

    type Attempt = Pin<Box<dyn Future<Output = Result<usize, ConnectError>> + Send>>;

    /// An attempt that takes `ms` and then succeeds, or fails when `ms` is negative.
    fn timed(plan: &[i64]) -> impl FnMut(Arc<Replica>) -> Attempt {
        let plan = plan.to_vec();
        move |replica: Arc<Replica>| {
            let ms = plan[replica.index];
            let index = replica.index;
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms.unsigned_abs())).await;
                if ms < 0 {
                    Err(ConnectError::Refused(
                        std::io::ErrorKind::ConnectionRefused.into(),
                    ))
                } else {
                    Ok(index)
                }
            })
        }
    }

    fn winner(joined: &Joined<usize>) -> Option<usize> {
        match joined {
            Joined::Won { upstream, .. } => Some(*upstream),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_candidate_is_overtaken_after_the_race_delay() {
        let fleet = replicas(3);
        let started = Instant::now();
        let joined = race(
            fleet,
            settings(3, 100),
            timed(&[5_000, 50, 50]),
            |_, _| {},
            |_, _| async {},
        )
        .await;
        assert_eq!(winner(&joined), Some(1));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(150),
            "delay, then the second's own 50 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_starts_the_next_candidate_at_once_and_is_reported() {
        let fleet = replicas(2);
        let started = Instant::now();
        let mut reported = Vec::new();
        let joined = race(
            fleet,
            settings(2, 1_000),
            timed(&[-10, 20]),
            |replica, error| reported.push((replica.index, error.to_string())),
            |_, _| async {},
        )
        .await;
        assert_eq!(winner(&joined), Some(1));
        assert_eq!(started.elapsed(), Duration::from_millis(30));
        assert_eq!(reported, [(0, "connection refused".to_string())]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_racing_candidates_go_one_after_another() {
        let fleet = replicas(3);
        let started = Instant::now();
        let joined = race(
            fleet,
            settings(1, 1),
            timed(&[-30, -30, 40]),
            |_, _| {},
            |_, _| async {},
        )
        .await;
        assert_eq!(winner(&joined), Some(2));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn every_failure_is_listed_and_slots_are_given_back() {
        let fleet = replicas(2);
        let joined = race(
            fleet.clone(),
            settings(2, 10),
            timed(&[-5, -7]),
            |_, _| {},
            |_, _| async {},
        )
        .await;
        match joined {
            Joined::Failed(failures) => assert_eq!(failures.len(), 2),
            _ => panic!("expected every candidate to fail"),
        }
        assert!(fleet.iter().all(|r| r.active_sessions() == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_winner_is_handed_to_close_late() {
        let fleet = replicas(2);
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        // Both complete at 100 ms; the first to be settled wins, the other is closed.
        let joined = race(
            fleet,
            settings(2, 0),
            timed(&[100, 100]),
            |_, _| {},
            move |replica, _| {
                let closed_tx = closed_tx.clone();
                async move {
                    let _ = closed_tx.send(replica.index);
                }
            },
        )
        .await;
        let won = winner(&joined).unwrap();
        let lost = tokio::time::timeout(Duration::from_secs(1), closed.recv())
            .await
            .unwrap();
        assert_eq!(lost, Some(1 - won));
    }
}
