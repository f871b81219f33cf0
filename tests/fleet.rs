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

/// A replica whose every `GET /health` (kept alive) is answered 200 with `body`.
async fn answering_health(body: Vec<u8>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                loop {
                    let Ok(byte) = stream.read_u8().await else {
                        return;
                    };
                    head.push(byte);
                    if head.ends_with(b"\r\n\r\n") {
                        head.clear();
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err()
                            || stream.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_health_answer_too_long_to_read_is_a_failed_probe() {
    let addr = answering_health(vec![b' '; 100 * 1024]).await;
    let router = TestRouter::start(config(&[format!("http://{addr}")], "")).await;
    router.wait_status(0, Status::Unhealthy).await;
    let snapshot = router.registry.snapshot();
    let error = snapshot.replicas[0].health.last_error.clone().unwrap();
    assert!(error.contains("longer than 65536 bytes"), "{error}");
}

#[tokio::test]
async fn absurd_reports_neither_crash_nor_overflow_and_a_zero_capacity_takes_nothing() {
    let addr = answering_health(
        br#"{"status":"ok","sessions":18446744073709551615,"max_sessions":0}"#.to_vec(),
    )
    .await;
    let router = TestRouter::start(config(&[format!("http://{addr}")], "")).await;
    router.wait_status(0, Status::Healthy).await;
    until("the report", || {
        router.registry.snapshot().replicas[0]
            .health
            .reported
            .is_some()
    })
    .await;
    let state = router.registry.snapshot().replicas[0].clone();
    assert_eq!((state.load(), state.capacity()), (u64::MAX, Some(0)));
    assert!(state.is_full());
    let mut ws = connect(router.addr).await;
    let (json, code, _) = read_error_and_close(&mut ws).await;
    assert_eq!(code, 1013, "{json}");
    let status = raw_http(router.addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status.contains("\"load\":18446744073709551615"), "{status}");
}
