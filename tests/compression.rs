//! permessage-deflate end to end: the client's offer reaches the replica, the replica's
//! answer reaches the client, and compressed frames pass both ways as they are (RSV1 on a
//! message's first frame only, payload untouched, no UTF-8 check on compressed text).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsrouter::echo::EchoReplica;

/// "Hello" compressed with DEFLATE, as RFC 7692 7.2.3.1 shows it (not valid UTF-8 as it is).
const HELLO_DEFLATED: &[u8] = &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

const ANSWER: &str = "permessage-deflate; server_no_context_takeover";

/// A replica that accepts permessage-deflate when offered (or always, with `always`) and
/// echoes every frame back as it came, first byte (FIN, RSV, opcode) included. It keeps the
/// request heads it was sent.
async fn deflate_replica(always: bool) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let offered = head
                    .to_ascii_lowercase()
                    .contains("sec-websocket-extensions: permessage-deflate");
                seen.lock().unwrap().push(head.clone());
                let mut answer = switching_protocols(&head);
                if offered || always {
                    answer.insert_str(
                        answer.len() - 2,
                        &format!("sec-websocket-extensions: {ANSWER}\r\n"),
                    );
                }
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                // Echo: read a masked frame, send it back unmasked with the same first byte.
                loop {
                    let Ok(first) = stream.read_u8().await else {
                        return;
                    };
                    let Ok(second) = stream.read_u8().await else {
                        return;
                    };
                    let len = match second & 0x7f {
                        126 => usize::from(stream.read_u16().await.unwrap()),
                        127 => stream.read_u64().await.unwrap() as usize,
                        len => usize::from(len),
                    };
                    let mut key = [0u8; 4];
                    if second & 0x80 != 0 {
                        stream.read_exact(&mut key).await.unwrap();
                    }
                    let mut payload = vec![0u8; len];
                    stream.read_exact(&mut payload).await.unwrap();
                    for (i, byte) in payload.iter_mut().enumerate() {
                        *byte ^= key[i % 4];
                    }
                    let mut frame = raw_frame(first, &payload, false);
                    frame[0] = first;
                    if stream.write_all(&frame).await.is_err() || first & 0x0f == 0x8 {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// Upgrade through the router with `extensions` offered; the 101's head and the stream.
async fn upgrade_offering(addr: SocketAddr, extensions: &str) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Extensions: {extensions}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = bounded("the router's answer", read_head(&mut stream)).await;
    (head.expect("response head"), stream)
}

#[tokio::test]
async fn compressed_messages_pass_through_as_they_are() {
    let (replica, heads) = deflate_replica(false).await;
    let router = start_always_healthy(&[format!("http://{replica}")], "").await;
    let (head, mut client) = upgrade_offering(
        router.addr,
        "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("sec-websocket-extensions: {ANSWER}")),
        "the replica's answer reaches the client: {head}"
    );
    let sent = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(
        sent.contains("sec-websocket-extensions: permessage-deflate; client_max_window_bits\r\n"),
        "only the permessage-deflate offer goes on: {sent}"
    );

    // A compressed text message in one frame: RSV1 set, bytes that are not UTF-8 as they are.
    client
        .write_all(&raw_frame(0xc1, HELLO_DEFLATED, true))
        .await
        .unwrap();
    let (first, payload) = read_raw_frame(&mut client).await.unwrap();
    assert_eq!((first, &payload[..]), (0xc1, HELLO_DEFLATED));

    // Fragmented: RSV1 on the first frame only; a large compressed binary frame streams through.
    client
        .write_all(&raw_frame(0x41, &HELLO_DEFLATED[..3], true))
        .await
        .unwrap();
    client
        .write_all(&raw_frame(0x80, &HELLO_DEFLATED[3..], true))
        .await
        .unwrap();
    assert_eq!(
        read_raw_frame(&mut client).await.unwrap(),
        (0x41, HELLO_DEFLATED[..3].to_vec())
    );
    assert_eq!(
        read_raw_frame(&mut client).await.unwrap(),
        (0x80, HELLO_DEFLATED[3..].to_vec())
    );
    let large: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    client
        .write_all(&raw_frame(0xc2, &large, true))
        .await
        .unwrap();
    let (first, payload) = read_raw_frame(&mut client).await.unwrap();
    assert_eq!(first, 0xc2);
    assert!(payload == large, "the streamed payload arrives intact");

    // RSV1 on a continuation frame breaks RFC 7692: 1002, negotiated or not.
    client
        .write_all(&raw_frame(0x01, b"a", true))
        .await
        .unwrap();
    client
        .write_all(&raw_frame(0xc0, b"b", true))
        .await
        .unwrap();
    assert_eq!(
        read_raw_frame(&mut client).await.unwrap(),
        (0x01, b"a".to_vec())
    );
    let (first, payload) = read_raw_frame(&mut client).await.unwrap();
    assert_eq!(first, 0x88);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1002);
}

#[tokio::test]
async fn without_a_negotiated_extension_rsv1_is_a_protocol_error() {
    // The echo replica declines permessage-deflate: the client's 101 carries no extension and
    // a compressed frame is refused with 1002.
    let replica = EchoReplica::start().await.unwrap();
    let router = start_always_healthy(&[replica.url()], "").await;
    let (head, mut client) = upgrade_offering(router.addr, "permessage-deflate").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );
    client
        .write_all(&raw_frame(0xc1, HELLO_DEFLATED, true))
        .await
        .unwrap();
    let (first, payload) = read_raw_frame(&mut client).await.unwrap();
    assert_eq!(first, 0x88);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1002);
}

#[tokio::test]
async fn a_replica_enabling_an_extension_nobody_offered_is_passed_over() {
    let (pushy, _) = deflate_replica(true).await;
    let good = EchoReplica::start().await.unwrap();
    let router = start_always_healthy(&[format!("http://{pushy}"), good.url()], "").await;
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"plain").await;
    let snapshot = router.registry.snapshot();
    let error = snapshot.replicas[0].replica.last_connect_error().unwrap();
    assert!(error.contains("extension"), "{error}");
    assert_eq!(snapshot.replicas[0].health.consecutive_failures, 0);
}

#[tokio::test]
async fn negotiated_compression_allows_rsv1_on_a_message_start_and_nothing_else() {
    let (replica, _) = deflate_replica(false).await;
    let router = start_always_healthy(&[format!("http://{replica}")], "").await;
    for (what, frame) in [
        ("RSV1 on a ping", raw_frame(0xc9, b"p", true)),
        ("RSV1 on a close", raw_frame(0xc8, &[0x03, 0xe8], true)),
        ("RSV2 on a binary frame", raw_frame(0xa2, b"x", true)),
        ("RSV1 and RSV3 together", raw_frame(0xd2, b"x", true)),
    ] {
        let (head, mut client) = upgrade_offering(router.addr, "permessage-deflate").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client.write_all(&frame).await.unwrap();
        let (first, payload) = read_raw_frame(&mut client).await.unwrap();
        assert_eq!(first, 0x88, "{what}");
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1002, "{what}");
    }
    // A client's protocol error is the client's: nothing counts against the replica.
    let snapshot = router.registry.snapshot();
    assert_eq!(snapshot.replicas[0].health.consecutive_failures, 0);
}
