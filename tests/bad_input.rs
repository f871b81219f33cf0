//! Bad input from clients: broken frames, garbage, floods. Each is answered with the right
//! close code or HTTP status, the replica side is closed too, and the router keeps serving.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use wsrouter::echo::EchoReplica;

/// Send `bytes` on a fresh raw session and return the close code the router answers with
/// (after any data frames, which are returned too).
async fn close_code_for_bytes(router: &TestRouter, bytes: &[u8]) -> (Vec<Vec<u8>>, u16) {
    let mut stream = raw_upgrade(router.addr).await;
    stream.write_all(bytes).await.unwrap();
    let mut data = Vec::new();
    loop {
        let (first, payload) = read_raw_frame(&mut stream)
            .await
            .expect("a close frame before EOF");
        if first & 0x0f == 0x8 {
            assert!(payload.len() >= 2, "close without a code");
            return (data, u16::from_be_bytes([payload[0], payload[1]]));
        }
        data.push(payload);
    }
}

async fn until_sessions_end(router: &TestRouter, replica: &EchoReplica) {
    until("the replica side to close", || {
        replica.open_sessions() == 0
            && router.registry.snapshot().replicas[0]
                .replica
                .active_sessions()
                == 0
    })
    .await;
}

#[tokio::test]
async fn invalid_frames_get_the_right_close_code_and_the_replica_is_closed() {
    let (replica, router) = single_echo("").await;
    let mut invalid_close_reason = vec![0x03, 0xe8];
    invalid_close_reason.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xf4, 0x90, 0x80]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("reserved opcode 3", raw_frame(0x83, b"", true), 1002),
        (
            "reserved control opcode 0xb",
            raw_frame(0x8b, b"", true),
            1002,
        ),
        (
            "RSV1 without an extension",
            raw_frame(0xc1, b"hi", true),
            1002,
        ),
        ("RSV3", raw_frame(0x91, b"hi", true), 1002),
        (
            "invalid UTF-8 text",
            raw_frame(0x81, &[b'a', 0xff, b'b'], true),
            1007,
        ),
        ("unmasked text frame", raw_frame(0x81, b"hi", false), 1002),
        ("fragmented ping", raw_frame(0x09, b"", true), 1002),
        (
            "ping longer than 125 bytes",
            raw_frame(0x89, &[0; 126], true),
            1002,
        ),
        (
            "close with a 1-byte payload",
            raw_frame(0x88, &[0x03], true),
            1002,
        ),
        (
            "close with reserved code 1005",
            raw_frame(0x88, &[0x03, 0xed], true),
            1002,
        ),
        (
            "close with code 999",
            raw_frame(0x88, &[0x03, 0xe7], true),
            1002,
        ),
        (
            "close with an invalid UTF-8 reason",
            raw_frame(0x88, &invalid_close_reason, true),
            1007,
        ),
    ];
    for (what, bytes, want) in cases {
        let (data, code) = close_code_for_bytes(&router, &bytes).await;
        assert_eq!((code, data.len()), (want, 0), "{what}");
        until_sessions_end(&router, &replica).await;
        assert_eq!(
            replica.close_codes().last(),
            Some(&1001),
            "{what}: the replica must hear its client went away"
        );
    }
    // Still serving.
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"still here").await;
}

#[tokio::test]
async fn what_the_replica_sent_before_a_client_error_still_reaches_the_client() {
    let (replica, router) = single_echo("").await;
    let mut bytes = raw_frame(0x81, b"first", true);
    bytes.extend(raw_frame(0xc1, b"second", true));
    let (data, code) = close_code_for_bytes(&router, &bytes).await;
    assert_eq!(data, vec![b"first".to_vec()]);
    assert_eq!(code, 1002);
    until_sessions_end(&router, &replica).await;
}

#[tokio::test]
async fn garbage_gets_an_http_error_or_a_close_and_nothing_breaks() {
    let (replica, router) = single_echo("").await;
    // Garbage instead of a request head.
    let answer = raw_http(router.addr, "\x16\x03\x01\x02\x00 hello\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Garbage after a completed upgrade: 'G' (0x47) sets RSV bits.
    let (_, code) = close_code_for_bytes(&router, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(code, 1002);
    until_sessions_end(&router, &replica).await;
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"still here").await;
}

#[tokio::test]
async fn a_connection_flood_beyond_the_session_limit_gets_503_and_the_router_recovers() {
    let (replica, router) = single_echo("[limits]\nmax_sessions = 20\n").await;
    let attempts: Vec<_> = (0..200)
        .map(|_| tokio::spawn(connect_with(router.addr, "/v1/stream", &[])))
        .collect();
    let mut sessions = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        match bounded("a flood attempt", attempt).await.unwrap() {
            Ok((ws, _)) => sessions.push(ws),
            Err(fastwebsockets::WebSocketError::InvalidStatusCode(503)) => refused += 1,
            Err(e) => panic!("unexpected flood answer: {e}"),
        }
    }
    assert_eq!((sessions.len(), refused), (20, 180));
    for ws in &mut sessions {
        echo_once(ws, b"held").await;
    }
    drop(sessions);
    until_sessions_end(&router, &replica).await;
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"after the flood").await;
}

#[tokio::test]
async fn a_request_head_dribbled_byte_by_byte_is_cut_at_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let (_replica, router) = single_echo("[limits]\nheader_read_timeout_seconds = 0.5\n").await;
    let mut stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let head = UPGRADE_REQUEST;
    let started = std::time::Instant::now();
    // One byte every 50 ms: the whole head would take about 8 s; each byte alone is prompt.
    let cut = bounded("the router to cut the dribble", async {
        for byte in head.iter() {
            if stream.write_all(&[*byte]).await.is_err() {
                return true;
            }
            let mut probe = [0u8; 64];
            match tokio::time::timeout(
                std::time::Duration::from_millis(50),
                stream.read(&mut probe),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => return true, // an error response, then the close
                Err(_) => {}
            }
        }
        false
    })
    .await;
    let waited = started.elapsed();
    assert!(cut, "the whole dribbled head was accepted");
    assert!(
        waited >= std::time::Duration::from_millis(450)
            && waited < std::time::Duration::from_secs(3),
        "cut after {waited:?}"
    );
}

#[tokio::test]
async fn frames_arriving_in_pieces_with_pauses_are_forwarded_whole() {
    // A quiet pump drops its reader between frames; it must never do so inside one.
    let (_replica, router) = single_echo("").await;
    let mut stream = raw_upgrade(router.addr).await;
    let payload: Vec<u8> = (0..300u16).map(|i| (i % 251) as u8).collect();
    let frame = raw_frame(0x82, &payload, true);
    for _ in 0..2 {
        // Cut inside the header, inside the mask key and inside the payload.
        for piece in [&frame[..1], &frame[1..5], &frame[5..100], &frame[100..]] {
            stream.write_all(piece).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        let (first, echoed) = read_raw_frame(&mut stream).await.expect("the echo");
        assert_eq!((first, echoed.len()), (0x82, payload.len()));
        assert_eq!(echoed, payload);
    }
}
