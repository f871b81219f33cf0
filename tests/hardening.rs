//! The open internet: no client can make a replica look sick, hold memory it did not send,
//! exceed the limits, or learn the router's internals (issue 15, over real sockets).

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsrouter::registry::Status;

/// A valid 101 head for a raw replica, followed by a text frame "hello".
const UPGRADED: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n";
const HELLO: &[u8] = b"\x81\x05hello";

/// Open a session and expect the raw replica's "hello" first.
async fn hello_session(router: &TestRouter, source: &str) -> Client {
    let (mut ws, _) = bounded(
        "connect",
        connect_from(source, router.addr, "/v1/stream", &[]),
    )
    .await
    .expect("handshake");
    let frame = read(&mut ws).await;
    assert_eq!(&frame.payload[..], b"hello");
    ws
}

/// Open a session carrying `x-poison`, which the replicas below answer badly: the client gets
/// its 101 and then worker_failed.
async fn poisoned_session(router: &TestRouter, source: &str) {
    let (mut ws, _) = bounded(
        "connect",
        connect_from(source, router.addr, "/v1/stream", &[("x-poison", "1")]),
    )
    .await
    .expect("handshake");
    let (json, code, _) = read_error_and_close(&mut ws).await;
    assert_eq!((json["code"].as_str(), code), (Some("worker_failed"), 1011));
}

#[tokio::test]
async fn interim_answers_are_skipped_and_expect_is_never_forwarded() {
    // A replica that sends 103 Early Hints before its 101 still gets the session.
    let interim = raw_replica(RawMode::Interim).await;
    let router = start_always_healthy(&[format!("http://{interim}")], "").await;
    hello_session(&router, "127.0.0.1").await;
    assert_eq!(router.status_of(0), Status::Healthy);

    // Expect: 100-continue is taken and dropped; any other expectation is refused with 417.
    let (replica, router) = single_echo("").await;
    let (mut ws, _) = bounded(
        "connect",
        connect_with(router.addr, "/v1/stream", &[("expect", "100-continue")]),
    )
    .await
    .unwrap();
    echo_once(&mut ws, b"continued").await;
    assert!(replica
        .last_request()
        .unwrap()
        .headers
        .get("expect")
        .is_none());
    let refused = connect_with(router.addr, "/v1/stream", &[("expect", "302-found")]).await;
    assert!(
        matches!(
            refused,
            Err(fastwebsockets::WebSocketError::InvalidStatusCode(417))
        ),
        "{:?}",
        refused.map(|(_, r)| r.status())
    );
}

#[tokio::test]
async fn answers_to_one_request_never_make_a_replica_unhealthy() {
    // The replica answers 500 to requests carrying one odd header, and serves everyone else.
    let replica = raw_replica_with(|head| {
        if head.to_ascii_lowercase().contains("x-poison") {
            RawMode::Status(500)
        } else {
            RawMode::Answer(UPGRADED, HELLO)
        }
    })
    .await;
    let router = start_always_healthy(
        &[format!("http://{replica}")],
        "[health_check]\nfailure_threshold = 2\n[sessions]\nclose_on_unhealthy = true",
    )
    .await;
    let mut established = hello_session(&router, "127.0.0.1").await;
    for source in [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.1",
        "127.0.0.2",
    ] {
        poisoned_session(&router, source).await;
    }
    let health = router.registry.snapshot().replicas[0].health.clone();
    assert_eq!(health.status, Status::Healthy);
    assert_eq!(
        health.consecutive_failures, 0,
        "a 500 is an answer, not a sick replica"
    );
    // The established session was not closed, and a well-behaved client still gets through.
    let nothing = tokio::time::timeout(Duration::from_millis(300), established.read_frame()).await;
    assert!(nothing.is_err(), "the established session must stay open");
    hello_session(&router, "127.0.0.4").await;
}

#[tokio::test]
async fn one_client_alone_cannot_turn_a_replica_unhealthy() {
    // The replica hangs up on requests carrying one odd header: "no answer", which does count.
    let replica = raw_replica_with(|head| {
        if head.to_ascii_lowercase().contains("x-poison") {
            RawMode::Hangup
        } else {
            RawMode::Answer(UPGRADED, HELLO)
        }
    })
    .await;
    let router = start_always_healthy(
        &[format!("http://{replica}")],
        "[health_check]\nfailure_threshold = 2",
    )
    .await;
    let failures = || {
        router.registry.snapshot().replicas[0]
            .health
            .consecutive_failures
    };
    for _ in 0..5 {
        poisoned_session(&router, "127.0.0.1").await;
    }
    assert_eq!(failures(), 1, "one client counts once in a run of failures");
    assert_eq!(router.status_of(0), Status::Healthy);
    // A completed handshake ends the run.
    hello_session(&router, "127.0.0.1").await;
    assert_eq!(failures(), 0);
    // Two different clients failing in a row is what a sick replica looks like.
    poisoned_session(&router, "127.0.0.1").await;
    poisoned_session(&router, "127.0.0.2").await;
    assert_eq!(router.status_of(0), Status::Unhealthy);
}

/// Whether the router closed `stream` (EOF or reset) within a second.
async fn closed_at_once(stream: &mut tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn connection_and_session_limits_hold_per_client_and_in_all() {
    // One worker: with one listener per worker, which of two connections made back to back
    // is accepted first (and takes the last place) is up to the workers' race.
    let (_replica, router) = single_echo(
        "[listen]\nworkers = 1\n[limits]\nmax_connections = 5\nmax_sessions = 5\nmax_connections_per_client = 2\nmax_sessions_per_client = 1",
    )
    .await;
    let addr = router.addr;
    // Plain connections: two per address, the third is closed at once.
    let mut first = tcp_from("127.0.0.1", addr).await.unwrap();
    let _second = tcp_from("127.0.0.1", addr).await.unwrap();
    let mut third = tcp_from("127.0.0.1", addr).await.unwrap();
    assert!(
        closed_at_once(&mut third).await,
        "a third connection from one address"
    );
    assert!(!closed_at_once(&mut first).await, "the first two stay open");
    // Another address is its own client.
    let mut other = tcp_from("127.0.0.2", addr).await.unwrap();
    assert!(!closed_at_once(&mut other).await);
    // Three are open; two more fit under max_connections, the sixth does not.
    let fourth = tcp_from("127.0.0.3", addr).await.unwrap();
    let fifth = tcp_from("127.0.0.4", addr).await.unwrap();
    let mut sixth = tcp_from("127.0.0.5", addr).await.unwrap();
    assert!(closed_at_once(&mut sixth).await, "beyond max_connections");
    drop((first, _second, other, fourth, fifth));
    // Sessions: one per client; the second gets 503 with Retry-After.
    let (mut ws, _) = bounded("session", async {
        loop {
            // Until the dropped connections have been given back.
            if let Ok(session) = connect_from("127.0.0.6", addr, "/v1/stream", &[]).await {
                return session;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    echo_once(&mut ws, b"one").await;
    bounded("a 503 for the client's second session", async {
        loop {
            match connect_from("127.0.0.6", addr, "/v1/stream", &[]).await {
                Err(fastwebsockets::WebSocketError::InvalidStatusCode(503)) => return,
                Ok((_, response)) => panic!("expected 503, got {}", response.status()),
                // Closed at once: the dropped connections are not all given back yet.
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let metrics = bounded("room for a metrics request", async {
        loop {
            let text = raw_http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            if text.starts_with("HTTP/1.1 200") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for line in [
        "wsrouter_connections_refused_total{reason=\"client_connection_limit\"} 1",
        "wsrouter_sessions_rejected_total{reason=\"client_session_limit\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(metrics.contains("wsrouter_connections_refused_total{reason=\"connection_limit\"}"));
}

#[tokio::test]
async fn limits_that_do_not_fit_the_open_file_limit_are_refused_or_lowered() {
    let replica = raw_replica(RawMode::Mute).await;
    let port = dead_port();
    let base = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = {port}\n[[replicas]]\nurl = \"http://{replica}\"\n"
    );
    let explicit = format!("[limits]\nmax_connections = 1000\nmax_sessions = 1000\n{base}");
    let mut router = RouterProcess::spawn("fd-explicit", &explicit, port, Some(512)).unwrap();
    assert_eq!(router.exit_code().await, Some(1));
    let log = router.log();
    assert!(
        log.contains("open-file limit is 512") && log.contains("limits.max_connections"),
        "{log}"
    );

    // Left at their defaults, the limits are lowered to fit and the router starts.
    let router = RouterProcess::spawn("fd-default", &base, port, Some(512)).unwrap();
    router.wait_healthy().await;
    let status = raw_http(router.addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let body: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let (connections, sessions) = (
        body["connections"]["max"].as_u64().unwrap(),
        body["sessions"]["max"].as_u64().unwrap(),
    );
    assert!(
        connections + sessions < 512 && sessions >= 100,
        "{connections} + {sessions}"
    );
    assert!(router.log().contains("limits lowered"), "{}", router.log());
}

/// The head of a masked text frame claiming `len` bytes, and its key.
fn text_head(len: u64) -> (Vec<u8>, [u8; 4]) {
    let key = [0x5a, 0x17, 0xc3, 0x08];
    let mut head = vec![0x81, 0x80 | 127];
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(&key);
    (head, key)
}

fn mask(payload: &[u8], key: [u8; 4], offset: usize) -> Vec<u8> {
    payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[(offset + i) % 4])
        .collect()
}

/// What 100 sessions may add to the router's RSS while each is in the middle of a 16 MiB text
/// frame it has sent 1 MiB of: streamed, not buffered (documented in the README).
const MID_FRAME_RSS_BOUND: u64 = 32 << 20;

#[tokio::test]
async fn sessions_stalled_mid_way_through_huge_text_frames_hold_little_memory() {
    let sink = raw_replica(RawMode::Mute).await;
    let port = dead_port();
    let config = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = {port}\nworkers = 1\n[health_check]\ninterval_seconds = 0.2\n[[replicas]]\nurl = \"http://{sink}\"\n"
    );
    let router = RouterProcess::spawn("text-frames", &config, port, None).unwrap();
    router.wait_healthy().await;
    let before = router.rss();
    let (head, key) = text_head(16 << 20);
    let sent = 1 << 20;
    let chunk = mask(&vec![b'a'; sent], key, 0);
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut client = raw_upgrade(router.addr).await;
        client.write_all(&head).await.unwrap();
        client.write_all(&chunk).await.unwrap();
        clients.push(client);
    }
    // Give the router time to take in what was sent (bounded), then look.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let growth = router.rss().saturating_sub(before);
    eprintln!(
        "router RSS growth with 100 stalled 16 MiB text frames: {} KiB",
        growth >> 10
    );
    assert!(
        growth < MID_FRAME_RSS_BOUND,
        "100 sessions mid-way through 16 MiB text frames grew the router by {} MiB",
        growth >> 20
    );
    // The rest of one frame, with a byte that is not UTF-8 in it: checked as it streams.
    let client = &mut clients[0];
    let mut bad = vec![b'a'; 100];
    bad[50] = 0xff;
    client.write_all(&mask(&bad, key, sent)).await.unwrap();
    let close = bounded("a close after bad UTF-8", async {
        loop {
            match read_raw_frame(client).await {
                Some((0x88, payload)) => return u16::from_be_bytes([payload[0], payload[1]]),
                Some(_) => continue,
                None => panic!("closed without a Close"),
            }
        }
    })
    .await;
    assert_eq!(close, 1007);
}

#[tokio::test]
async fn upgrade_requests_with_a_body_are_refused() {
    let (_replica, router) = single_echo("").await;
    let head = std::str::from_utf8(UPGRADE_REQUEST)
        .unwrap()
        .trim_end_matches("\r\n");
    for (extra, status) in [
        ("Content-Length: 5\r\n\r\nhello", "400"),
        (
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "400",
        ),
        ("Content-Length: 0\r\n\r\n", "101"),
    ] {
        let answer = raw_head(router.addr, &format!("{head}\r\n{extra}")).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{extra:?}: {answer}"
        );
    }
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_and_nobody_else_can() {
    let (replica, router) = single_echo(
        "[listen]\ntrusted_proxies = [\"127.0.0.2\"]\n[limits]\nmax_sessions_per_client = 1",
    )
    .await;
    let seen = |header: &str| {
        replica
            .last_request()
            .unwrap()
            .headers
            .get(header)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (_via_proxy, _) = connect_from(
        "127.0.0.2",
        router.addr,
        "/v1/stream",
        &[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        seen("x-forwarded-for").as_deref(),
        Some("198.51.100.7, 127.0.0.2")
    );
    assert_eq!(seen("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(seen("x-real-ip").as_deref(), Some("198.51.100.7"));
    // Sessions are counted per client behind the proxy: another client there is let in, the
    // same one again is not.
    let other = connect_from(
        "127.0.0.2",
        router.addr,
        "/v1/stream",
        &[("x-forwarded-for", "198.51.100.8")],
    )
    .await;
    assert!(other.is_ok());
    let again = connect_from(
        "127.0.0.2",
        router.addr,
        "/v1/stream",
        &[("x-forwarded-for", "198.51.100.7")],
    )
    .await;
    assert!(matches!(
        again,
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(503))
    ));
    // Anyone else's claims are overwritten.
    let (_direct, _) = connect_from(
        "127.0.0.3",
        router.addr,
        "/v1/stream",
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(seen("x-forwarded-for").as_deref(), Some("127.0.0.3"));
    assert_eq!(seen("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(seen("x-real-ip").as_deref(), Some("127.0.0.3"));
}

#[tokio::test]
async fn frames_to_the_replica_carry_fresh_mask_keys() {
    let (replica, mut received) = recording_replica(Vec::new()).await;
    let router = start_always_healthy(&[format!("http://{replica}")], "").await;
    let mut client = raw_upgrade(router.addr).await;
    // Three frames masked with the same key (and one with a zero key, which would put the
    // plaintext on the wire if reused).
    let frames = [
        raw_frame(0x82, b"binary payload", true),
        raw_frame(0x81, b"text payload", true),
        raw_frame(0x82, &[7u8; 300], true),
    ];
    let mut zero_keyed = vec![0x82, 0x80 | 4, 0, 0, 0, 0];
    zero_keyed.extend_from_slice(b"open");
    for frame in frames.iter().chain([&zero_keyed]) {
        client.write_all(frame).await.unwrap();
    }
    let sent_len: usize = frames.iter().map(Vec::len).sum::<usize>() + zero_keyed.len();
    let wire = receive(&mut received, sent_len).await;
    // Walk the frames the replica got: same payloads, each under a key of its own.
    let mut at = 0;
    let mut keys = Vec::new();
    for expected in [
        &b"binary payload"[..],
        b"text payload",
        &[7u8; 300],
        b"open",
    ] {
        assert!(wire[at + 1] & 0x80 != 0, "frames to a replica are masked");
        let (len, head_len) = match wire[at + 1] & 0x7f {
            126 => (u16::from_be_bytes([wire[at + 2], wire[at + 3]]) as usize, 4),
            len => (len as usize, 2),
        };
        let key: [u8; 4] = wire[at + head_len..at + head_len + 4].try_into().unwrap();
        let start = at + head_len + 4;
        assert_eq!(mask(&wire[start..start + len], key, 0), expected);
        keys.push(key);
        at = start + len;
    }
    assert!(
        !keys.contains(&[0x37, 0xfa, 0x21, 0x3d]),
        "the client's key is not reused: {keys:x?}"
    );
    assert!(!keys.contains(&[0, 0, 0, 0]), "{keys:x?}");
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 4, "a fresh key per frame");
}

#[tokio::test]
async fn a_client_that_vanishes_is_reclaimed_and_its_replica_slot_freed() {
    // The defaults ping after 30 s and give up 30 s later; the same at a test's pace.
    let (replica, router) = single_echo(
        "[sessions]\nping_interval_seconds = 0.2\n[limits]\nclose_timeout_seconds = 0.5",
    )
    .await;
    // A client that completes the upgrade and then neither reads nor writes, as a peer whose
    // host vanished would (its kernel still acknowledges, so TCP alone cannot tell).
    let _vanished = raw_upgrade(router.addr).await;
    until("the replica session to open", || {
        replica.open_sessions() == 1
    })
    .await;
    let active = || {
        router.registry.snapshot().replicas[0]
            .replica
            .active_sessions()
    };
    assert_eq!(active(), 1);
    until("the session to be reclaimed", || {
        active() == 0 && replica.open_sessions() == 0
    })
    .await;
    assert_eq!(
        replica.close_codes(),
        [1001],
        "the replica is told its client went away"
    );
}
