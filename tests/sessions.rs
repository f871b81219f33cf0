//! What the router does to live sessions: closing them on a replica that turns unhealthy,
//! a maximum lifetime, the idle timeout and keepalive pings.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fastwebsockets::{Frame, OpCode, Payload};
use wsrouter::echo::EchoReplica;
use wsrouter::registry::Status;

/// Read frames, answering the router's pings, until the close; returns what preceded it.
async fn read_until_close(
    ws: &mut Client,
    answer_pings: bool,
) -> (Vec<Frame<'static>>, u16, String) {
    let mut before = Vec::new();
    loop {
        let frame = read(ws).await;
        match frame.opcode {
            OpCode::Close => {
                let (code, reason) = close_code(&frame);
                return (before, code, reason);
            }
            OpCode::Ping if answer_pings => {
                let pong = Frame::pong(Payload::Owned(frame.payload.to_vec()));
                ws.write_frame(pong).await.unwrap();
            }
            _ => before.push(frame),
        }
    }
}

#[tokio::test]
async fn sessions_on_a_replica_that_turns_unhealthy_are_moved_with_1012() {
    let fleet = [
        EchoReplica::start().await.unwrap(),
        EchoReplica::start().await.unwrap(),
    ];
    let urls: Vec<String> = fleet.iter().map(|r| r.url()).collect();
    let router = TestRouter::start(config(&urls, "[sessions]\nclose_on_unhealthy = true")).await;
    router.wait_status(0, Status::Healthy).await;
    router.wait_status(1, Status::Healthy).await;
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"on r0").await;
    assert_eq!(fleet[0].open_sessions(), 1);

    fleet[0].set_health_status(500);
    let (json, code, _) = read_error_and_close(&mut ws).await;
    assert_eq!(code, 1012);
    assert_eq!(json["code"], "worker_unhealthy");
    assert_eq!(json["retryable"], true);
    until("r0 to hear why", || fleet[0].close_codes() == [1001]).await;

    let mut again = connect(router.addr).await;
    echo_once(&mut again, b"on r1").await;
    assert_eq!(
        fleet[1].open_sessions(),
        1,
        "the reconnect lands on the healthy replica"
    );
}

#[tokio::test]
async fn without_close_on_unhealthy_sessions_stay() {
    let fleet = [
        EchoReplica::start().await.unwrap(),
        EchoReplica::start().await.unwrap(),
    ];
    let urls: Vec<String> = fleet.iter().map(|r| r.url()).collect();
    let router = TestRouter::start(config(&urls, "")).await;
    router.wait_status(0, Status::Healthy).await;
    let mut ws = connect(router.addr).await;
    fleet[0].set_health_status(500);
    router.wait_status(0, Status::Unhealthy).await;
    echo_once(&mut ws, b"still here").await;
}

#[tokio::test]
async fn a_session_ends_at_its_maximum_lifetime_with_1012() {
    let (replica, router) = single_echo("[sessions]\nmax_lifetime_seconds = 0.3").await;
    let started = Instant::now();
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"hello").await;
    let (json, code, _) = read_error_and_close(&mut ws).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        (code, json["code"].as_str()),
        (1012, Some("session_expired"))
    );
    until("the replica to hear it", || replica.close_codes() == [1001]).await;
}

#[tokio::test]
async fn an_idle_session_is_closed_but_a_busy_one_is_not() {
    let (_replica, router) = single_echo("[sessions]\nidle_timeout_seconds = 0.3").await;

    let mut busy = connect(router.addr).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        echo_once(&mut busy, b"tick").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    echo_once(&mut busy, b"still open after three idle timeouts").await;

    let mut idle = connect(router.addr).await;
    let started = Instant::now();
    let (before, code, reason) = read_until_close(&mut idle, false).await;
    assert!(before.is_empty());
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_server_push_stream_is_not_idle() {
    let pushing = raw_replica(RawMode::Stream).await;
    let router = start_always_healthy(
        &[format!("http://{pushing}")],
        "[sessions]\nidle_timeout_seconds = 0.2",
    )
    .await;
    let mut ws = connect(router.addr).await;
    let started = Instant::now();
    // The client never sends; the replica streams. One second is five idle timeouts.
    while started.elapsed() < Duration::from_secs(1) {
        let frame = read(&mut ws).await;
        assert_eq!(frame.opcode, OpCode::Binary);
    }
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_and_its_pongs_are_not_forwarded() {
    let (_replica, router) = single_echo("[sessions]\nping_interval_seconds = 0.1").await;
    let mut ws = connect(router.addr).await;
    let mut pings = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(800) {
        let frame = read(&mut ws).await;
        assert_eq!(frame.opcode, OpCode::Ping, "only keepalive pings arrive");
        assert_eq!(&frame.payload[..], b"wsrouter-keepalive");
        ws.write_frame(Frame::pong(Payload::Owned(frame.payload.to_vec())))
            .await
            .unwrap();
        pings += 1;
    }
    assert!(pings >= 3, "{pings} pings in 800 ms at a 100 ms interval");
    echo_once(&mut ws, b"alive").await;
    let metrics = raw_http(router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        metrics.contains("wsrouter_frames_total{direction=\"to_upstream\"} 1\n"),
        "only the text frame went upstream:\n{metrics}"
    );
}

#[tokio::test]
async fn a_client_that_ignores_pings_is_dropped_and_the_replica_told() {
    let (replica, router) = single_echo("[sessions]\nping_interval_seconds = 0.1").await;
    let mut ws = connect(router.addr).await;
    let (before, code, reason) = read_until_close(&mut ws, false).await;
    assert!(
        before.iter().all(|f| f.opcode == OpCode::Ping),
        "{:?}",
        before.len()
    );
    assert_eq!((code, reason.as_str()), (1001, "no answer to ping"));
    until("the replica to hear it", || replica.close_codes() == [1001]).await;
    let metrics = raw_http(router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        metrics.contains("wsrouter_sessions_stopped_total{reason=\"client_unresponsive\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_replica_that_stops_answering_pings_fails_the_session_with_1011() {
    let mute = raw_replica(RawMode::Mute).await;
    let router = start_always_healthy(
        &[format!("http://{mute}")],
        "[sessions]\nping_interval_seconds = 0.1",
    )
    .await;
    let mut ws = connect(router.addr).await;
    let (before, code, _) = read_until_close(&mut ws, true).await;
    assert_eq!(code, 1011);
    let json: serde_json::Value =
        serde_json::from_slice(&before.last().expect("the JSON error").payload).unwrap();
    assert_eq!(json["code"], "worker_failed");
    assert!(json["message"].as_str().unwrap().contains("ping"), "{json}");
}

/// On the ring, a pump reads straight from the buffers the kernel filled in its loop turn;
/// what it leaves, and what arrives past the buffers the ring lets sessions hold, is copied
/// out and read after them. Many sessions moving 64 KiB messages at once mix all three: each
/// must still get its own bytes, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_on_the_ring_at_once_each_get_their_own_bytes_in_order() {
    let (_replica, router) = single_echo("[listen]\nio = \"io_uring\"").await;
    let sessions = (0..48u8).map(|id| {
        let addr = router.addr;
        tokio::spawn(async move {
            let mut ws = connect(addr).await;
            ws.set_max_message_size(1 << 20);
            for round in 0..4u8 {
                let size = 64 * 1024 + usize::from(id) * 97;
                let payload: Vec<u8> = (0..size)
                    .map(|i| (i as u8).wrapping_mul(31) ^ id ^ round)
                    .collect();
                // Two in flight: the replica's echo of one arrives while the next is sent.
                for _ in 0..2 {
                    ws.write_frame(Frame::binary(Payload::Borrowed(&payload)))
                        .await
                        .unwrap();
                }
                for _ in 0..2 {
                    let frame = read(&mut ws).await;
                    assert!(
                        frame.payload[..] == payload[..],
                        "session {id} round {round}: bytes changed or reordered"
                    );
                }
            }
        })
    });
    for session in sessions.collect::<Vec<_>>() {
        bounded("a session's echoes", session).await.unwrap();
    }
}

/// `[listen] io = "io_uring"`: a session's sockets move onto the worker's ring after the 101
/// (counted in /metrics, shown in /status), and frames of every size, pings and the close
/// pass as on epoll. (CI also runs this whole suite with `WSROUTER_IO=io_uring`.)
#[tokio::test]
async fn sessions_on_the_io_uring_data_plane_move_frames_as_on_epoll() {
    let (_replica, router) = single_echo("[listen]\nio = \"io_uring\"").await;
    let overridden = std::env::var("WSROUTER_IO").is_ok_and(|io| io != "io_uring");
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"on the ring").await;
    for size in [125, 70_000, 300_000, 2 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        ws.write_frame(Frame::binary(Payload::Borrowed(&payload)))
            .await
            .unwrap();
        let frame = read(&mut ws).await;
        assert_eq!(frame.opcode, OpCode::Binary);
        assert!(frame.payload[..] == payload[..], "{size} bytes echo intact");
    }
    let metrics = raw_http(router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let status = raw_http(router.addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    if !overridden {
        assert!(
            metrics.contains("wsrouter_io_uring_sessions_total 1\n"),
            "{metrics}"
        );
        assert!(status.contains("\"io\":\"io_uring\""), "{status}");
    }
    ws.write_frame(Frame::close(4001, b"done")).await.unwrap();
    let (_, code, reason) = read_until_close(&mut ws, false).await;
    assert_eq!((code, reason.as_str()), (4001, "done"));
}
