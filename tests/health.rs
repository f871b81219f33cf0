//! The health loop against real replicas, and through the Probe trait.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use wsrouter::echo::EchoReplica;
use wsrouter::health::{run_cycle, HttpProbe, Probe, ProbeFuture};
use wsrouter::registry::{Registry, Replica, Status};

#[tokio::test]
async fn replica_that_accepts_but_never_answers_turns_unhealthy_by_timeout() {
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", hang.local_addr().unwrap());
    let text = format!(
        "[health_check]\ntimeout_seconds = 0.1\nfailure_threshold = 2\n{}",
        replicas_toml(&[url], false)
    );
    let registry = Registry::new(&wsrouter::Config::parse(&text).unwrap());
    let probe = HttpProbe::new();
    let started = Instant::now();
    run_cycle(&registry, &probe).await;
    assert_eq!(
        registry.snapshot().replicas[0].health.status,
        Status::Unknown
    );
    run_cycle(&registry, &probe).await;
    let health = &registry.snapshot().replicas[0].health;
    assert_eq!(health.status, Status::Unhealthy);
    assert!(health.last_error.as_deref().unwrap().contains("timed out"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn status_500_and_refused_connections_are_failures_and_recovery_needs_m_successes() {
    let replica = EchoReplica::start().await.unwrap();
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let text = format!(
        "[health_check]\nfailure_threshold = 1\nrecovery_threshold = 3\n{}",
        replicas_toml(&[replica.url(), dead], false)
    );
    let registry = Registry::new(&wsrouter::Config::parse(&text).unwrap());
    let probe = HttpProbe::new();
    let cycle = || run_cycle(&registry, &probe);
    cycle().await;
    let s = registry.snapshot();
    assert_eq!(s.replicas[0].health.status, Status::Healthy);
    assert_eq!(s.replicas[1].health.status, Status::Unhealthy);
    assert!(
        s.replicas[1]
            .health
            .last_error
            .as_deref()
            .unwrap()
            .contains("onnect"),
        "{:?}",
        s.replicas[1].health.last_error
    );

    replica.set_health_status(500);
    cycle().await;
    let h = registry.snapshot().replicas[0].health.clone();
    assert_eq!(h.status, Status::Unhealthy);
    assert!(h.last_error.unwrap().contains("HTTP 500"));

    replica.set_health_status(200);
    for expected in [Status::Unhealthy, Status::Unhealthy, Status::Healthy] {
        cycle().await;
        assert_eq!(registry.snapshot().replicas[0].health.status, expected);
    }
}

/// Sleeps before answering, counting how many probes run at once.
struct SlowProbe {
    delay: Duration,
    running: Arc<std::sync::atomic::AtomicUsize>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
}

impl Probe for SlowProbe {
    fn probe(&self, _: &Arc<Replica>, _: &str) -> ProbeFuture {
        use std::sync::atomic::Ordering::SeqCst;
        let (delay, running, peak) = (self.delay, self.running.clone(), self.peak.clone());
        Box::pin(async move {
            let now = running.fetch_add(1, SeqCst) + 1;
            peak.fetch_max(now, SeqCst);
            tokio::time::sleep(delay).await;
            running.fetch_sub(1, SeqCst);
            Ok(None)
        })
    }
}

#[tokio::test]
async fn a_flapping_replica_changes_status_only_after_consecutive_results() {
    let replica = EchoReplica::start().await.unwrap();
    let text = format!(
        "[health_check]\nfailure_threshold = 2\nrecovery_threshold = 2\n{}",
        replicas_toml(&[replica.url()], false)
    );
    let registry = Registry::new(&wsrouter::Config::parse(&text).unwrap());
    let probe = HttpProbe::new();
    let mut seen = Vec::new();
    // Each probe answers the next status of the pattern.
    let pattern = [
        200, 200, // healthy (an unknown replica needs one success)
        500, 200, 500, 200, 500, 200, // flapping: stays healthy
        500, 500, // unhealthy
        200, 500, 200, 500, // flapping: stays unhealthy
        200, 200, // healthy again
    ];
    for status in pattern {
        replica.set_health_status(status);
        run_cycle(&registry, &probe).await;
        seen.push(registry.snapshot().replicas[0].health.status);
    }
    use Status::*;
    assert_eq!(
        seen,
        [
            Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy,
            Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Healthy
        ]
    );
}

#[tokio::test]
async fn all_replicas_are_probed_in_parallel_and_published_together() {
    let urls: Vec<String> = (0..8)
        .map(|i| format!("http://127.0.0.1:{}", 10_000 + i))
        .collect();
    let registry = Registry::new(&wsrouter::Config::parse(&replicas_toml(&urls, false)).unwrap());
    let probe = SlowProbe {
        delay: Duration::from_millis(100),
        running: Default::default(),
        peak: Default::default(),
    };
    run_cycle(&registry, &probe).await;
    assert_eq!(
        probe.peak.load(std::sync::atomic::Ordering::SeqCst),
        8,
        "probes should overlap"
    );
    assert!(registry
        .snapshot()
        .replicas
        .iter()
        .all(|r| r.health.status == Status::Healthy));
}

#[tokio::test]
async fn a_held_snapshot_is_immutable_while_new_ones_are_published() {
    let replica = EchoReplica::start().await.unwrap();
    let registry =
        Registry::new(&wsrouter::Config::parse(&replicas_toml(&[replica.url()], false)).unwrap());
    let before = registry.snapshot();
    run_cycle(&registry, &HttpProbe::new()).await;
    assert_eq!(before.replicas[0].health.status, Status::Unknown);
    assert_eq!(
        registry.snapshot().replicas[0].health.status,
        Status::Healthy
    );
}

#[tokio::test]
async fn a_hung_replica_does_not_slow_the_probes_of_the_others() {
    // One replica accepts and never answers; probes time out after 2 s and start every 50 ms.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = format!("http://{}", hang.local_addr().unwrap());
    tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = hang.accept().await {
            sockets.push(socket);
        }
    });
    let echo = EchoReplica::start().await.unwrap();
    let started = Instant::now();
    let router = TestRouter::start(config(
        &[hung, echo.url()],
        "[health_check]\ntimeout_seconds = 2.0",
    ))
    .await;
    router.wait_status(1, Status::Healthy).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the healthy replica's result waited for the hung one: {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let probes = echo.health_checks();
    assert!(
        probes >= 10,
        "the healthy replica was probed {probes} times in about 1 s"
    );
    let hung_health = router.registry.snapshot().replicas[0].health.clone();
    assert_eq!(
        hung_health.status,
        Status::Unknown,
        "its first probe is still running"
    );
}

#[tokio::test]
async fn the_last_latency_is_that_of_the_last_successful_probe() {
    let (replica, router) = single_echo("").await;
    until("a latency", || {
        router.registry.snapshot().replicas[0]
            .health
            .last_latency_ms
            .is_some()
    })
    .await;
    replica.set_health_status(500);
    until("a failed probe", || {
        router.registry.snapshot().replicas[0]
            .health
            .consecutive_failures
            >= 1
    })
    .await;
    let latency = router.registry.snapshot().replicas[0]
        .health
        .last_latency_ms;
    until("more failed probes", || {
        router.registry.snapshot().replicas[0]
            .health
            .consecutive_failures
            >= 4
    })
    .await;
    let health = router.registry.snapshot().replicas[0].health.clone();
    assert_eq!(
        health.last_latency_ms, latency,
        "failed probes leave the last latency alone"
    );
    assert!(health.last_error.unwrap().contains("500"));
}
