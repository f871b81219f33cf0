//! The proxy over real sockets: forwarding, failover, errors, limits, shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fastwebsockets::{Frame, OpCode, Payload};
use wsrouter::echo::EchoReplica;
use wsrouter::registry::Status;
use wsrouter::Drain;

async fn one_replica(extra: &str) -> (EchoReplica, TestRouter) {
    let replica = EchoReplica::start().await.unwrap();
    let router = TestRouter::start(config(&[replica.url()], extra)).await;
    router.wait_status(0, Status::Healthy).await;
    (replica, router)
}

#[tokio::test]
async fn text_and_binary_are_echoed_through_the_router() {
    let (_replica, router) = one_replica("").await;
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::text(Payload::Borrowed(b"hello")))
        .await
        .unwrap();
    let frame = read(&mut ws).await;
    assert_eq!(
        (frame.opcode, &frame.payload[..]),
        (OpCode::Text, &b"hello"[..])
    );

    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.write_frame(Frame::binary(Payload::Borrowed(&big)))
        .await
        .unwrap();
    let frame = read(&mut ws).await;
    assert_eq!(frame.opcode, OpCode::Binary);
    assert!(
        frame.payload[..] == big[..],
        "binary payload changed in transit"
    );

    let status = router.registry.snapshot();
    assert_eq!(status.replicas[0].replica.active_sessions(), 1);
}

#[tokio::test]
async fn a_clean_close_handshake_closes_both_sockets_and_frees_the_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_replica, router) = one_replica("").await;
    let mut stream = raw_upgrade(router.addr).await;
    let close = raw_frame(0x88, &1000u16.to_be_bytes(), true);
    stream.write_all(&close).await.unwrap();
    let (first, payload) = read_raw_frame(&mut stream)
        .await
        .expect("the replica's close");
    assert_eq!((first, &payload[..2]), (0x88, &1000u16.to_be_bytes()[..]));
    // Then the router closes the connection: EOF, not a reset and not a hang.
    let mut rest = Vec::new();
    let read = bounded("the router's close", stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(0)), "{read:?} after {rest:?}");
    let replica = router.registry.snapshot().replicas[0].replica.clone();
    until("the session slot freed", || replica.active_sessions() == 0).await;
}

#[tokio::test]
async fn fragments_and_control_frames_pass_unchanged() {
    let (_replica, router) = one_replica("").await;
    let mut ws = connect(router.addr).await;
    let parts: [(&[u8], OpCode, bool); 3] = [
        (b"frag-1 ", OpCode::Text, false),
        (b"frag-2 ", OpCode::Continuation, false),
        (b"end", OpCode::Continuation, true),
    ];
    for (payload, opcode, fin) in parts {
        ws.write_frame(Frame::new(fin, opcode, None, Payload::Borrowed(payload)))
            .await
            .unwrap();
    }
    for (payload, opcode, fin) in parts {
        let frame = read(&mut ws).await;
        assert_eq!(
            (frame.opcode, frame.fin, &frame.payload[..]),
            (opcode, fin, payload),
            "fragment changed"
        );
    }
    // A ping travels to the replica, which answers; the pong comes back with the payload.
    ws.write_frame(Frame::new(
        true,
        OpCode::Ping,
        None,
        Payload::Borrowed(b"tick"),
    ))
    .await
    .unwrap();
    let frame = read(&mut ws).await;
    assert_eq!(
        (frame.opcode, &frame.payload[..]),
        (OpCode::Pong, &b"tick"[..])
    );
}

#[tokio::test]
async fn close_codes_pass_through_both_ways() {
    let (_replica, router) = one_replica("").await;
    // Client closes with 4000: the replica echoes its close, which comes back unchanged.
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::close(4000, b"client bye"))
        .await
        .unwrap();
    assert_eq!(
        close_code(&read(&mut ws).await),
        (4000, "client bye".into())
    );

    // The replica closes with 4001: the client sees that code, not a generic one.
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::text(Payload::Borrowed(b"close:4001:replica done")))
        .await
        .unwrap();
    assert_eq!(
        close_code(&read(&mut ws).await),
        (4001, "replica done".into())
    );
}

#[tokio::test]
async fn no_healthy_replica_gets_gpu_unavailable_and_1013() {
    let replica = EchoReplica::start().await.unwrap();
    replica.set_health_status(500);
    let router = TestRouter::start(config(&[replica.url()], "")).await;
    router.wait_status(0, Status::Unhealthy).await;
    let mut ws = connect(router.addr).await;
    let (json, code, reason) = read_error_and_close(&mut ws).await;
    assert_eq!(json["type"], "error");
    assert_eq!(json["code"], "gpu_unavailable");
    assert_eq!(json["retryable"], true);
    assert!(json["message"]
        .as_str()
        .unwrap()
        .contains("no healthy replica"));
    assert_eq!((code, reason.as_str()), (1013, "no_healthy_replica"));
}

#[tokio::test]
async fn primary_first_then_secondary_when_primary_is_unhealthy() {
    let primary = EchoReplica::start().await.unwrap();
    let secondary = EchoReplica::start().await.unwrap();
    let router = TestRouter::start(config(&[primary.url(), secondary.url()], "")).await;
    router.wait_status(0, Status::Healthy).await;
    router.wait_status(1, Status::Healthy).await;
    let _ws = connect(router.addr).await;
    assert!(
        primary.last_request().is_some(),
        "session should land on the primary"
    );
    assert!(secondary.last_request().is_none());

    primary.set_health_status(500);
    router.wait_status(0, Status::Unhealthy).await;
    let _ws2 = connect(router.addr).await;
    assert!(
        secondary.last_request().is_some(),
        "session should fail over to the secondary"
    );

    // Recovery needs recovery_threshold consecutive successes, then the primary is used again.
    primary.set_health_status(200);
    router.wait_status(0, Status::Healthy).await;
    let before = router.registry.snapshot().replicas[0]
        .replica
        .total_sessions();
    let _ws3 = connect(router.addr).await;
    assert_eq!(
        router.registry.snapshot().replicas[0]
            .replica
            .total_sessions(),
        before + 1
    );
}

#[tokio::test]
async fn failed_upstream_connect_moves_to_next_replica_and_counts_against_health() {
    let primary = EchoReplica::start().await.unwrap();
    let secondary = EchoReplica::start().await.unwrap();
    // Slow probes so the primary's death is seen by the proxy before the health loop.
    let text = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = 0\n[health_check]\ninterval_seconds = 30\nfailure_threshold = 1\n{}",
        replicas_toml(&[primary.url(), secondary.url()], true)
    );
    let router = TestRouter::start(wsrouter::Config::parse(&text).unwrap()).await;
    router.wait_status(0, Status::Healthy).await;
    router.wait_status(1, Status::Healthy).await;
    primary.kill();
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::text(Payload::Borrowed(b"still here")))
        .await
        .unwrap();
    assert_eq!(&read(&mut ws).await.payload[..], b"still here");
    assert!(secondary.last_request().is_some());
    // Passive health: the refused connect counted as a failure (threshold 1 -> unhealthy).
    let snapshot = router.registry.snapshot();
    assert_eq!(snapshot.replicas[0].health.status, Status::Unhealthy);
    assert!(snapshot.replicas[0]
        .health
        .last_error
        .as_deref()
        .unwrap()
        .contains("connect"));
}

#[tokio::test]
async fn every_replica_failing_gives_worker_failed_with_each_error() {
    // A listener that accepts TCP and never answers: the handshake times out.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_url = format!("http://{}", hang.local_addr().unwrap());
    let dead_url = format!("http://127.0.0.1:{}", dead_port());
    let text = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = 0\n[health_check]\ninterval_seconds = 30\n[limits]\nconnect_timeout_seconds = 0.3\n{}",
        replicas_toml(&[hang_url, dead_url], true)
    );
    let config = wsrouter::Config::parse(&text).unwrap();
    // Mark both healthy by hand, as if they had just passed their probes.
    let router = wsrouter::Router::bind_with_probe(config, std::sync::Arc::new(AlwaysHealthy))
        .await
        .unwrap();
    let router = TestRouter::run(router);
    router.wait_status(0, Status::Healthy).await;
    router.wait_status(1, Status::Healthy).await;
    let started = Instant::now();
    let mut ws = connect(router.addr).await;
    let (json, code, _) = read_error_and_close(&mut ws).await;
    assert_eq!(json["code"], "worker_failed");
    let message = json["message"].as_str().unwrap();
    assert!(message.contains("r0: timed out"), "{message}");
    assert!(message.contains("r1: connection refused"), "{message}");
    assert_eq!(code, 1011);
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(hang);
}

#[tokio::test]
async fn replica_killed_mid_session_gives_worker_failed_and_1011_promptly() {
    let (replica, router) = one_replica("").await;
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::text(Payload::Borrowed(b"ping")))
        .await
        .unwrap();
    read(&mut ws).await;
    let killed = Instant::now();
    replica.kill();
    let (json, code, reason) = read_error_and_close(&mut ws).await;
    assert_eq!(json["code"], "worker_failed");
    assert_eq!(json["retryable"], true);
    assert_eq!((code, reason.as_str()), (1011, "worker_failed"));
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "took {:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn query_headers_and_subprotocol_are_forwarded() {
    let (replica, router) = one_replica("").await;
    let headers = [
        ("sec-websocket-protocol", "v2.stream, v1.stream"),
        ("origin", "https://app.example"),
        ("authorization", "Bearer t0ken"),
        ("cookie", "session=abc"),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-real-ip", "10.1.2.3"),
        ("forwarded", "for=10.1.2.3"),
        (
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits",
        ),
    ];
    let (_ws, response) = bounded(
        "connect",
        connect_with(router.addr, "/v1/stream?model=fast&seed=7", &headers),
    )
    .await
    .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "v2.stream");
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    let seen = replica.last_request().unwrap();
    assert_eq!(seen.uri, "/v1/stream?model=fast&seed=7");
    let h = &seen.headers;
    assert_eq!(h["sec-websocket-protocol"], "v2.stream, v1.stream");
    assert_eq!(h["origin"], "https://app.example");
    assert_eq!(h["authorization"], "Bearer t0ken");
    assert_eq!(h["cookie"], "session=abc");
    // The client is not a trusted proxy: what it claims about its origin is overwritten.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert!(h.get("forwarded").is_none());
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], router.addr.to_string());
    assert_eq!(h["host"], replica.addr().to_string());
    // permessage-deflate is offered on (this replica declines it: the 101 has none).
    assert_eq!(
        h["sec-websocket-extensions"],
        "permessage-deflate; client_max_window_bits"
    );
}

#[tokio::test]
async fn bad_handshakes_get_http_errors() {
    let (_replica, router) = one_replica("").await;
    let plain = raw_http(
        router.addr,
        "GET /v1/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    let no_key = raw_http(
        router.addr,
        "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(no_key.starts_with("HTTP/1.1 400"), "{no_key}");
    let bad_version = raw_http(
        router.addr,
        "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(bad_version.starts_with("HTTP/1.1 400"), "{bad_version}");
    assert!(bad_version
        .to_ascii_lowercase()
        .contains("sec-websocket-version: 13"));
    let huge = format!(
        "GET /status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let too_big = raw_http(router.addr, &huge).await;
    assert!(
        too_big.starts_with("HTTP/1.1 431"),
        "{}",
        &too_big[..too_big.len().min(200)]
    );
    let missing = raw_http(router.addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
}

#[tokio::test]
async fn status_and_health_endpoints() {
    let (_replica, router) = one_replica("").await;
    let health = raw_http(router.addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("\"ok\""),
        "{health}"
    );
    let _ws = connect(router.addr).await;
    let status = raw_http(router.addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let body = &status[status.find("\r\n\r\n").unwrap() + 4..];
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    let r = &json["replicas"][0];
    for key in [
        "url",
        "primary",
        "status",
        "last_ok_at",
        "last_latency_ms",
        "consecutive_failures",
        "name",
        "weight",
        "active_sessions",
    ] {
        assert!(r.get(key).is_some(), "/status lacks {key}: {r}");
    }
    assert_eq!(r["status"], "healthy");
    assert_eq!(r["primary"], true);
    assert_eq!(r["active_sessions"], 1);
    assert_eq!(json["sessions"]["active"], 1);
    assert!(r["last_ok_at"].as_f64().unwrap() > 1.7e9);
}

#[tokio::test]
async fn oversized_frames_close_with_1009() {
    let (replica, router) = one_replica("[limits]\nmax_frame_bytes = 1024\n").await;
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::binary(Payload::Owned(vec![7; 1024])))
        .await
        .unwrap();
    assert_eq!(
        read(&mut ws).await.payload.len(),
        1024,
        "a frame at the limit passes"
    );
    ws.write_frame(Frame::binary(Payload::Owned(vec![7; 1025])))
        .await
        .unwrap();
    assert_eq!(close_code(&read(&mut ws).await).0, 1009);
    // The replica side is closed too: the session is gone from the counters.
    until("session to end", || {
        router.registry.snapshot().replicas[0]
            .replica
            .active_sessions()
            == 0
    })
    .await;
    drop(replica);
}

#[tokio::test]
async fn session_limit_answers_503() {
    let (_replica, router) = one_replica("[limits]\nmax_sessions = 1\n").await;
    let _first = connect(router.addr).await;
    let second = bounded(
        "second connect",
        connect_with(router.addr, "/v1/stream", &[]),
    )
    .await;
    match second {
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(503)) => {}
        other => panic!("expected 503, got {:?}", other.map(|(_, r)| r.status())),
    }
}

#[tokio::test]
async fn slow_request_head_is_cut_at_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_replica, router) = one_replica("[limits]\nheader_read_timeout_seconds = 0.3\n").await;
    let mut stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = bounded("connection close", stream.read_to_end(&mut buf)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

#[tokio::test]
async fn shutdown_sends_1001_to_both_sides_and_drains() {
    let (_replica, mut router) = one_replica("").await;
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::text(Payload::Borrowed(b"x")))
        .await
        .unwrap();
    read(&mut ws).await;
    let shutdown = tokio::spawn(async move { router.shutdown().await });
    assert_eq!(close_code(&read(&mut ws).await).0, 1001);
    // Our close reply (sent by fastwebsockets' auto_close) lets the drain complete.
    assert_eq!(bounded("drain", shutdown).await.unwrap(), Drain::Complete);
}

#[tokio::test]
async fn replica_with_a_wrong_accept_key_is_skipped_for_the_next() {
    let liar = raw_replica(RawMode::WrongAccept).await;
    let good = EchoReplica::start().await.unwrap();
    let router = start_always_healthy(&[format!("http://{liar}"), good.url()], "").await;
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::text(Payload::Borrowed(b"ok?")))
        .await
        .unwrap();
    assert_eq!(&read(&mut ws).await.payload[..], b"ok?");
    // A bad answer is noted, but it is an answer to one request: not held against health.
    let snapshot = router.registry.snapshot();
    let error = snapshot.replicas[0].replica.last_connect_error().unwrap();
    assert!(error.contains("Sec-WebSocket-Accept"), "{error}");
    assert_eq!(snapshot.replicas[0].health.consecutive_failures, 0);
}

/// A replica's 101 is read straight off the socket: whatever arrives with it or after it in
/// pieces is kept, and a 101 the client could not use sends the session to the next replica.
#[tokio::test]
async fn upstream_handshake_answers_are_read_and_checked() {
    /// An unmasked text frame "hello", as a replica sends it.
    const HELLO: &[u8] = b"\x81\x05hello";
    /// A valid 101 head, followed by `$rest`.
    macro_rules! upgraded {
        ($rest:literal) => {
            concat!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n", $rest)
        };
    }
    // (what the replica answers, what the session must show first: the replica's "hello"
    // frame, or the next replica echoing, with the error recorded against the first)
    let cases: [(RawMode, Result<(), &str>); 7] = [
        (RawMode::Answer(upgraded!("\r\n"), HELLO), Ok(())),
        (RawMode::Dribble(upgraded!("\r\n"), HELLO), Ok(())),
        (RawMode::Answer(upgraded!("Sec-WebSocket-Protocol: never-offered\r\n\r\n"), b""), Err("never-offered")),
        (RawMode::Answer(upgraded!("Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"), b""), Err("extension")),
        (RawMode::Answer("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n", b""), Err("Connection: upgrade")),
        (RawMode::Answer("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", b""), Err("expected HTTP 101, got 200")),
        (RawMode::Answer("this is not HTTP\r\n\r\n", b""), Err("invalid response")),
    ];
    for (mode, expected) in cases {
        let odd = raw_replica(mode).await;
        let good = EchoReplica::start().await.unwrap();
        let router = start_always_healthy(&[format!("http://{odd}"), good.url()], "").await;
        let mut ws = connect(router.addr).await;
        let health = || router.registry.snapshot().replicas[0].health.clone();
        match expected {
            Ok(()) => {
                let first = read(&mut ws).await;
                assert_eq!(
                    (first.opcode, &first.payload[..]),
                    (OpCode::Text, &b"hello"[..])
                );
                assert_eq!(health().consecutive_failures, 0);
            }
            Err(why) => {
                echo_once(&mut ws, b"served by the next replica").await;
                let replica = router.registry.snapshot().replicas[0].replica.clone();
                let error = replica.last_connect_error().unwrap_or_default();
                assert!(error.contains(why), "expected {why:?} in {error:?}");
                assert_eq!(
                    health().consecutive_failures,
                    0,
                    "a bad answer is not held against health"
                );
            }
        }
    }
}

#[tokio::test]
async fn oversized_upstream_response_heads_are_refused() {
    let huge: &'static str = Box::leak(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Padding: {}\r\n\r\n",
            "a".repeat(20_000)
        )
        .into_boxed_str(),
    );
    let odd = raw_replica(RawMode::Answer(huge, b"")).await;
    let good = EchoReplica::start().await.unwrap();
    let router = start_always_healthy(&[format!("http://{odd}"), good.url()], "").await;
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"served by the next replica").await;
    let error = router.registry.snapshot().replicas[0]
        .replica
        .last_connect_error()
        .unwrap_or_default();
    assert!(error.contains("larger than"), "{error}");
}

#[tokio::test]
async fn replica_cookies_reach_the_client_101() {
    let odd = raw_replica(RawMode::Answer(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
        b"",
    ))
    .await;
    let router = start_always_healthy(&[format!("http://{odd}")], "").await;
    let (_ws, response) = bounded("connect", connect_with(router.addr, "/v1/stream", &[]))
        .await
        .unwrap();
    let cookies: Vec<_> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
}

#[tokio::test]
async fn a_replica_dying_during_the_handshake_is_skipped_for_the_next() {
    let dying = raw_replica(RawMode::Hangup).await;
    let good = EchoReplica::start().await.unwrap();
    let router = start_always_healthy(&[format!("http://{dying}"), good.url()], "").await;
    let started = Instant::now();
    let mut ws = connect(router.addr).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "joined after {:?}",
        started.elapsed()
    );
    echo_once(&mut ws, b"joined the next").await;
    assert!(good.last_request().is_some());
    let health = router.registry.snapshot().replicas[0].health.clone();
    assert_eq!(health.consecutive_failures, 1, "{health:?}");
}

#[tokio::test]
async fn a_4xx_from_the_replica_is_relayed_and_not_held_against_it() {
    let strict = raw_replica(RawMode::Status(403)).await;
    let router = start_always_healthy(&[format!("http://{strict}")], "").await;
    match bounded("connect", connect_with(router.addr, "/v1/stream", &[])).await {
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(403)) => {}
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(
        router.registry.snapshot().replicas[0]
            .health
            .consecutive_failures,
        0
    );
}

#[tokio::test]
async fn shutdown_reaches_a_session_whose_replica_streams_nonstop() {
    let streamer = raw_replica(RawMode::Stream).await;
    let mut router = start_always_healthy(
        &[format!("http://{streamer}")],
        "[limits]\nclose_timeout_seconds = 0.5",
    )
    .await;
    let mut ws = connect(router.addr).await;
    assert_eq!(read(&mut ws).await.opcode, OpCode::Binary);
    let shutdown = tokio::spawn(async move { router.shutdown().await });
    let code = bounded("the 1001", async {
        loop {
            let frame = ws.read_frame().await.expect("frames until the close");
            if frame.opcode == OpCode::Close {
                return close_code(&frame).0;
            }
        }
    })
    .await;
    assert_eq!(code, 1001);
    // The streaming replica never answers its close: the drain still ends (close timeout).
    bounded("drain", shutdown).await.unwrap();
}
