//! Fleets shared by several routers: load and draining as the replicas report them.

mod common;

use common::*;
use wsrouter::echo::EchoReplica;
use wsrouter::registry::Status;

/// What `router` last heard from its replica `index` about its sessions.
fn reported_sessions(router: &TestRouter, index: usize) -> Option<u64> {
    router.registry.snapshot().replicas[index]
        .health
        .reported
        .as_ref()
        .and_then(|r| r.sessions)
}

#[tokio::test]
async fn two_routers_stop_at_the_capacity_the_replica_reports() {
    let replica = EchoReplica::start().await.unwrap();
    replica.set_reported_max_sessions(Some(4));
    let routers = [
        TestRouter::start(config(&[replica.url()], "")).await,
        TestRouter::start(config(&[replica.url()], "")).await,
    ];
    for router in &routers {
        router.wait_status(0, Status::Healthy).await;
    }
    // Alternate routers; before each session, wait until both have heard of every session
    // so far (each router alone saw only half of them).
    let mut sessions = Vec::new();
    for n in 0..4u64 {
        for router in &routers {
            until("the replica's report to reach the router", || {
                reported_sessions(router, 0) == Some(n)
            })
            .await;
        }
        let mut ws = connect(routers[n as usize % 2].addr).await;
        echo_once(&mut ws, b"within the replica's capacity").await;
        sessions.push(ws);
    }
    assert_eq!(replica.open_sessions(), 4);
    for router in &routers {
        until("the full replica's report", || {
            reported_sessions(router, 0) == Some(4)
        })
        .await;
        let mut ws = connect(router.addr).await;
        let (json, code, _) = read_error_and_close(&mut ws).await;
        assert_eq!(code, 1013, "{json}");
        assert!(
            json["message"].as_str().unwrap().contains("capacity"),
            "{json}"
        );
    }
    assert_eq!(replica.open_sessions(), 4, "no router went past the report");
    // Room again: a session ends, the report says so, either router admits one more.
    drop(sessions.pop());
    until("the freed slot's report", || {
        reported_sessions(&routers[1], 0) == Some(3)
    })
    .await;
    let mut ws = connect(routers[1].addr).await;
    echo_once(&mut ws, b"the freed slot").await;
}

#[tokio::test]
async fn a_replica_that_says_it_drains_takes_no_new_sessions_and_keeps_its_live_ones() {
    let (a, b) = (
        EchoReplica::start().await.unwrap(),
        EchoReplica::start().await.unwrap(),
    );
    // close_on_unhealthy: draining is not unhealthy, live sessions must stay.
    let router = TestRouter::start(config(
        &[a.url(), b.url()],
        "[sessions]\nclose_on_unhealthy = true",
    ))
    .await;
    router.wait_status(0, Status::Healthy).await;
    router.wait_status(1, Status::Healthy).await;
    let mut on_a = connect(router.addr).await;
    echo_once(&mut on_a, b"on the primary").await;
    assert_eq!(a.open_sessions(), 1);

    // By its word in the health answer, then by 503.
    for say_draining in [&(|| a.set_draining(true)) as &dyn Fn(), &|| {
        a.set_draining(false);
        a.set_health_status(503);
    }] {
        say_draining();
        // A fresh report: the first probe answer after the change.
        let seen = a.health_checks();
        until("a probe after the change", || a.health_checks() > seen + 1).await;
        until("the router to see a draining", || {
            router.registry.snapshot().replicas[0].draining()
        })
        .await;
        assert_eq!(
            router.status_of(0),
            Status::Healthy,
            "draining is not unhealthy"
        );
        let before = b.open_sessions();
        let mut ws = connect(router.addr).await;
        echo_once(&mut ws, b"sent past the draining primary").await;
        assert_eq!((a.open_sessions(), b.open_sessions()), (1, before + 1));
        echo_once(&mut on_a, b"the live session runs on").await;
    }
    let status = raw_http(router.addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let body: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let listed = &body["replicas"][0];
    assert_eq!(listed["draining"], true, "{body}");
    assert_eq!(listed["reported"]["draining"], true, "{body}");
    assert_eq!(listed["status"], "healthy", "{body}");

    // Back in service when it says so.
    a.set_health_status(200);
    until("a to take sessions again", || {
        router.registry.snapshot().replicas[0].selectable()
    })
    .await;
}
