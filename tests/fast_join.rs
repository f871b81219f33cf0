//! Fast join: racing upstream handshakes across candidates.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fastwebsockets::{Frame, OpCode, Payload};
use wsrouter::echo::EchoReplica;

const RACE: &str = "[balance]\nrace_candidates = 2\nrace_delay_seconds = 0.05\n[limits]\nconnect_timeout_seconds = 10";

#[tokio::test]
async fn a_hung_primary_does_not_delay_the_join_when_racing() {
    let hung = raw_replica(RawMode::Silent).await;
    let good = EchoReplica::start().await.unwrap();
    let router = start_always_healthy(&[format!("http://{hung}"), good.url()], RACE).await;
    let started = Instant::now();
    let mut ws = connect(router.addr).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the second candidate should win after the race delay, took {took:?}"
    );
    ws.write_frame(Frame::text(Payload::Borrowed(b"hi")))
        .await
        .unwrap();
    let echoed = read(&mut ws).await;
    assert_eq!(
        (echoed.opcode, &echoed.payload[..]),
        (OpCode::Text, &b"hi"[..])
    );
    assert_eq!(good.open_sessions(), 1);
}

#[tokio::test]
async fn without_racing_a_hung_primary_holds_the_join_until_the_connect_timeout() {
    // The control for the test above: the same fleet, one attempt at a time.
    let hung = raw_replica(RawMode::Silent).await;
    let good = EchoReplica::start().await.unwrap();
    let router = start_always_healthy(
        &[format!("http://{hung}"), good.url()],
        "[limits]\nconnect_timeout_seconds = 1",
    )
    .await;
    let started = Instant::now();
    let _ws = connect(router.addr).await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(good.open_sessions(), 1);
}

#[tokio::test]
async fn the_slower_attempt_is_abandoned_and_leaves_no_session_behind() {
    let slow = EchoReplica::start().await.unwrap();
    slow.set_upgrade_delay(Duration::from_millis(400));
    let fast = EchoReplica::start().await.unwrap();
    let router = start_always_healthy(&[slow.url(), fast.url()], RACE).await;
    let _ws = connect(router.addr).await;
    assert_eq!(fast.open_sessions(), 1);
    let active = |i: usize| {
        router.registry.snapshot().replicas[i]
            .replica
            .active_sessions()
    };
    // The loser is aborted on the router's worker thread, which may run after the client
    // already has its 101.
    until("the loser's slot to be released", || active(0) == 0).await;
    assert_eq!(active(1), 1);
    // Absence can only be checked by waiting: past the slow replica's delay, its answer
    // finds the connection gone and no session opens.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(slow.open_sessions(), 0);
}

#[tokio::test]
async fn no_replica_session_is_left_open_or_cut_without_a_close_after_a_race() {
    // No delay: both attempts start together and usually both complete.
    let fleet = [
        EchoReplica::start().await.unwrap(),
        EchoReplica::start().await.unwrap(),
    ];
    let urls: Vec<String> = fleet.iter().map(|r| r.url()).collect();
    let router = start_always_healthy(
        &urls,
        "[balance]\nrace_candidates = 2\nrace_delay_seconds = 0",
    )
    .await;
    for _ in 0..10 {
        let ws = connect(router.addr).await;
        until("losers to be closed", || {
            fleet.iter().map(|r| r.open_sessions()).sum::<usize>() == 1
        })
        .await;
        drop(ws);
        until("the session to end", || {
            fleet.iter().all(|r| r.open_sessions() == 0)
        })
        .await;
    }
    // Every replica session either served the client (closed by it going away: 1001 from the
    // router) or lost the race (1001 too): none was cut without a Close.
    let codes: Vec<u16> = fleet.iter().flat_map(|r| r.close_codes()).collect();
    assert!(codes.len() >= 10, "{codes:?}");
    assert!(codes.iter().all(|&c| c == 1001), "{codes:?}");
}

#[tokio::test]
async fn when_every_racer_fails_the_client_hears_every_error() {
    let dead = [dead_port(), dead_port()].map(|port| format!("http://127.0.0.1:{port}"));
    let router = start_always_healthy(&dead, RACE).await;
    let mut ws = connect(router.addr).await;
    let (json, code, _) = read_error_and_close(&mut ws).await;
    assert_eq!(code, 1011);
    assert_eq!(json["code"], "worker_failed");
    let message = json["message"].as_str().unwrap();
    assert!(
        message.contains("r0: connection refused") && message.contains("r1: connection refused"),
        "{message}"
    );
    // The client learns each replica's name and the kind of failure, never an address or an
    // OS error; the request id ties the message to the router's log lines.
    assert!(
        !message.contains("127.0.0.1") && !message.contains("os error"),
        "{message}"
    );
    assert_eq!(
        json["request_id"].as_str().map(str::len),
        Some(16),
        "{json}"
    );
}
