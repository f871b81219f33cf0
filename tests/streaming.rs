//! Large binary frames are streamed: passed on as their payload arrives, never buffered whole.

mod common;

use std::time::Duration;

use common::*;
use fastwebsockets::{Frame, OpCode, Payload};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Larger than the size from which the router streams a frame.
const FRAME: usize = 1 << 20;
const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// The header of a masked 1 MiB binary client frame, in its shortest form.
fn masked_head() -> Vec<u8> {
    let mut head = vec![0x82, 0x80 | 127];
    head.extend_from_slice(&(FRAME as u64).to_be_bytes());
    head.extend_from_slice(&KEY);
    head
}

fn fragment_opcode(index: usize) -> OpCode {
    if index == 0 {
        OpCode::Binary
    } else {
        OpCode::Continuation
    }
}

fn masked(payload: &[u8], offset: usize) -> Vec<u8> {
    masked_with(KEY, payload, offset)
}

fn masked_with(key: [u8; 4], payload: &[u8], offset: usize) -> Vec<u8> {
    payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[(offset + i) % 4])
        .collect()
}

/// The mask key of a streamed (8-byte length) frame header as it reached the replica, after
/// checking the rest of the header is the client's: the router re-keys with a key of its own.
fn rekeyed_head(got: &[u8], sent: &[u8]) -> [u8; 4] {
    assert_eq!(&got[..10], &sent[..10], "fin, opcode and length are kept");
    let key: [u8; 4] = got[10..14].try_into().unwrap();
    assert_ne!(
        key, KEY,
        "the client's mask key must not be reused (RFC 6455 5.3)"
    );
    key
}

#[tokio::test]
async fn a_large_frame_reaches_the_replica_before_the_client_has_sent_all_of_it() {
    let (replica, mut received) = recording_replica(Vec::new()).await;
    let router = start_always_healthy(&[format!("http://{replica}")], "").await;
    let mut client = raw_upgrade(router.addr).await;

    let payload: Vec<u8> = (0..FRAME).map(|i| (i * 7 % 251) as u8).collect();
    let head = masked_head();
    let first = 128 * 1024;
    client.write_all(&head).await.unwrap();
    client
        .write_all(&masked(&payload[..first], 0))
        .await
        .unwrap();

    // Only part of the frame is sent, and it is already upstream: the same frame, re-keyed
    // to a fresh mask of the router's.
    let got = receive(&mut received, head.len() + first).await;
    let key = rekeyed_head(&got, &head);
    assert_eq!(
        &got[head.len()..head.len() + first],
        &masked_with(key, &payload[..first], 0)[..]
    );

    client
        .write_all(&masked(&payload[first..], first))
        .await
        .unwrap();
    let rest = receive(&mut received, head.len() + FRAME - got.len()).await;
    let mut wire = got;
    wire.extend(rest);
    assert_eq!(wire.len(), head.len() + FRAME);
    assert_eq!(&wire[head.len()..], &masked_with(key, &payload, 0)[..]);
}

#[tokio::test]
async fn large_and_fragmented_binary_messages_echo_intact() {
    let (_replica, router) = single_echo("").await;
    let mut ws = connect(router.addr).await;
    ws.set_max_message_size(4 * FRAME);
    let whole: Vec<u8> = (0..FRAME).map(|i| (i % 253) as u8).collect();
    ws.write_frame(Frame::binary(Payload::Borrowed(&whole)))
        .await
        .unwrap();
    let echoed = read(&mut ws).await;
    assert_eq!(echoed.opcode, OpCode::Binary);
    assert!(echoed.payload[..] == whole[..], "1 MiB frame changed");

    // A message in three fragments, two of them streamed, then a small text frame after it.
    let parts: [&[u8]; 3] = [
        &whole[..300_000],
        &whole[300_000..310_000],
        &whole[310_000..],
    ];
    for (i, part) in parts.iter().enumerate() {
        let opcode = fragment_opcode(i);
        let fin = i == parts.len() - 1;
        ws.write_frame(Frame::new(fin, opcode, None, Payload::Borrowed(part)))
            .await
            .unwrap();
    }
    for (i, part) in parts.iter().enumerate() {
        let frame = read(&mut ws).await;
        let opcode = fragment_opcode(i);
        assert_eq!((frame.opcode, frame.fin), (opcode, i == parts.len() - 1));
        assert!(frame.payload[..] == part[..], "fragment {i} changed");
    }
    echo_once(&mut ws, b"after").await;
}

#[tokio::test]
async fn a_replica_dying_mid_frame_still_gets_its_client_worker_failed_and_1011() {
    replica_dies_mid_frame("", 100 * 1024).await;
}

#[tokio::test]
async fn a_replica_dying_mid_spliced_frame_still_gets_its_client_worker_failed_and_1011() {
    replica_dies_mid_frame(SPLICE, 700 * 1024 + 3).await;
}

/// The replica starts a 1 MiB binary frame, sends `sent` bytes of it and dies.
async fn replica_dies_mid_frame(extra: &str, sent: usize) {
    let mut start = vec![0x82, 127];
    start.extend_from_slice(&(FRAME as u64).to_be_bytes());
    start.extend(std::iter::repeat_n(0xab, sent));
    let (replica, _received) = recording_replica(start).await;
    let router = start_always_healthy(&[format!("http://{replica}")], extra).await;
    let mut ws = connect(router.addr).await;
    ws.set_max_message_size(4 * FRAME);

    // The frame arrives completed, so the notice after it is readable.
    let frame = read(&mut ws).await;
    assert_eq!((frame.opcode, frame.payload.len()), (OpCode::Binary, FRAME));
    assert!(frame.payload[..sent].iter().all(|&b| b == 0xab));
    assert!(frame.payload[sent..].iter().all(|&b| b == 0));
    let (json, code, reason) = read_error_and_close(&mut ws).await;
    assert_eq!(json["code"], "worker_failed");
    assert_eq!((code, reason.as_str()), (1011, "worker_failed"));
}

#[tokio::test]
async fn a_client_dying_mid_frame_gets_the_replica_a_completed_frame_and_1001() {
    let (replica, mut received) = recording_replica(Vec::new()).await;
    let router = start_always_healthy(&[format!("http://{replica}")], "").await;
    let mut client: TcpStream = raw_upgrade(router.addr).await;
    let head = masked_head();
    let sent = 3001; // not a multiple of 4: the padding must stay in step with the mask
    client.write_all(&head).await.unwrap();
    client
        .write_all(&masked(&vec![0xcd; sent], 0))
        .await
        .unwrap();
    let mut wire = receive(&mut received, head.len() + sent).await;
    drop(client);

    // The rest of the frame (masked zeros), then a Close 1001 from the router.
    bounded("the replica's side to end", async {
        while let Some(chunk) = received.recv().await {
            wire.extend(chunk);
        }
    })
    .await;
    let frame_end = head.len() + FRAME;
    assert!(
        wire.len() > frame_end,
        "no close after the frame: {} of {frame_end} bytes",
        wire.len()
    );
    let key = rekeyed_head(&wire, &head);
    let unmasked: Vec<u8> = masked_with(key, &wire[head.len()..frame_end], 0);
    assert!(unmasked[..sent].iter().all(|&b| b == 0xcd));
    assert!(unmasked[sent..].iter().all(|&b| b == 0), "padding is zeros");
    let close = &wire[frame_end..];
    assert_eq!(close[0], 0x88, "a Close frame follows");
    let close_key = [close[2], close[3], close[4], close[5]];
    let code = u16::from_be_bytes([close[6] ^ close_key[0], close[7] ^ close_key[1]]);
    assert_eq!(code, 1001);
}

#[tokio::test]
async fn shutdown_waits_for_a_streamed_frame_to_end_before_its_close() {
    let (replica, mut received) = recording_replica(Vec::new()).await;
    let mut router = start_always_healthy(&[format!("http://{replica}")], "").await;
    let mut client = raw_upgrade(router.addr).await;
    let head = masked_head();
    client.write_all(&head).await.unwrap();
    client.write_all(&masked(&[1; 1000], 0)).await.unwrap();
    let mut wire = receive(&mut received, head.len() + 1000).await;

    let _drain = tokio::spawn(async move { router.shutdown().await });
    // The client finishes its frame after shutdown began (the pause only makes it likely that
    // the close order reaches the pump mid-frame); the Close may only follow the frame.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client
        .write_all(&masked(&vec![1; FRAME - 1000], 1000))
        .await
        .unwrap();
    let rest = receive(&mut received, head.len() + FRAME + 2 - wire.len()).await;
    wire.extend(rest);
    assert_eq!(
        wire[head.len() + FRAME],
        0x88,
        "the Close comes after the frame"
    );
    let (first, payload) = read_raw_frame(&mut client)
        .await
        .expect("the client's Close");
    assert_eq!(first, 0x88);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
}

/// Turns on splice(2) for a replica's large payloads (off by default).
const SPLICE: &str = "[listen]\nsplice = true";

#[tokio::test]
async fn with_splice_on_a_replicas_large_binary_payloads_bypass_user_space_and_arrive_intact() {
    let (_replica, router) = single_echo(SPLICE).await;
    let mut ws = connect(router.addr).await;
    ws.set_max_message_size(8 * FRAME);
    // Before a pipe is made, one read of the payload (at most 256 KiB) goes through user space.
    let first_read = 256 * 1024;
    let mut least = 0;
    let mut most = 0;
    for size in [FRAME, 3 * FRAME + 3, 300_000] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 13 % 241) as u8).collect();
        ws.write_frame(Frame::binary(Payload::Borrowed(&payload)))
            .await
            .unwrap();
        let echoed = read(&mut ws).await;
        assert_eq!((echoed.opcode, echoed.fin), (OpCode::Binary, true));
        assert!(echoed.payload[..] == payload[..], "{size} bytes changed");
        least += size.saturating_sub(first_read);
        most += size;
    }
    let spliced = spliced_bytes(&router).await;
    if on_the_ring() {
        assert_eq!(spliced, 0);
    } else {
        assert!(
            (least..=most).contains(&spliced),
            "spliced {spliced}, expected {least}..={most}"
        );
    }

    // Text is checked as UTF-8 on its way, so it goes through user space, however large.
    let text = "é".repeat(FRAME / 2);
    ws.write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
        .await
        .unwrap();
    let echoed = read(&mut ws).await;
    assert_eq!(echoed.opcode, OpCode::Text);
    assert!(echoed.payload[..] == *text.as_bytes());
    assert_eq!(
        spliced_bytes(&router).await,
        spliced,
        "text is never spliced"
    );
    echo_once(&mut ws, b"after").await;
}

#[tokio::test]
async fn without_splice_on_large_payloads_are_copied_through_the_router() {
    let (_replica, router) = single_echo("").await;
    let mut ws = connect(router.addr).await;
    ws.set_max_message_size(2 * FRAME);
    let payload = vec![7u8; FRAME];
    ws.write_frame(Frame::binary(Payload::Borrowed(&payload)))
        .await
        .unwrap();
    assert!(read(&mut ws).await.payload[..] == payload[..]);
    assert_eq!(spliced_bytes(&router).await, 0);
}

/// Read exactly `len` bytes from a raw client socket, bounded.
async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut bytes = vec![0; len];
    bounded("bytes at the client", stream.read_exact(&mut bytes))
        .await
        .expect("client connection open");
    bytes
}

#[tokio::test]
async fn a_spliced_frame_ends_whole_before_the_close_of_a_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replica_addr = listener.local_addr().unwrap();
    let mut router = start_always_healthy(&[format!("http://{replica_addr}")], SPLICE).await;
    let (mut client, mut replica) = tokio::join!(raw_upgrade(router.addr), async {
        accept_one_upgrade(&listener).await
    });
    let payload: Vec<u8> = (0..FRAME).map(|i| (i * 31 % 239) as u8).collect();
    let mut head = vec![0x82, 127];
    head.extend_from_slice(&(FRAME as u64).to_be_bytes());
    let (first, second) = (200 * 1024, 600 * 1024);

    // The start of the frame goes through user space (one read), then a pipe is made.
    replica.write_all(&head).await.unwrap();
    replica.write_all(&payload[..first]).await.unwrap();
    let mut got = read_exactly(&mut client, head.len() + first).await;
    assert_eq!(got[..head.len()], head[..]);
    replica.write_all(&payload[first..second]).await.unwrap();
    got.extend(read_exactly(&mut client, second - first).await);
    if on_the_ring() {
        assert_eq!(spliced_bytes(&router).await, 0);
    } else {
        let spliced = spliced_bytes(&router).await;
        assert!(spliced >= second - first, "spliced only {spliced}");
    }

    // Shutdown while the frame is mid-way: its close waits for the frame's end.
    let _drain = tokio::spawn(async move { router.shutdown().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    replica.write_all(&payload[second..]).await.unwrap();
    got.extend(read_exactly(&mut client, FRAME - second).await);
    assert!(
        got[head.len()..] == payload[..],
        "the spliced frame changed"
    );
    let close = loop {
        let (first_byte, frame) = read_raw_frame(&mut client).await.expect("the close");
        if first_byte == 0x88 {
            break frame;
        }
        assert_eq!(first_byte, 0x81, "only the JSON notice comes between");
    };
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1001);
}

#[tokio::test]
async fn a_client_gone_mid_spliced_frame_gets_its_replica_told_1001() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replica_addr = listener.local_addr().unwrap();
    let router = start_always_healthy(&[format!("http://{replica_addr}")], SPLICE).await;
    let (mut client, mut replica) = tokio::join!(raw_upgrade(router.addr), async {
        accept_one_upgrade(&listener).await
    });
    let mut head = vec![0x82, 127];
    head.extend_from_slice(&(4 * FRAME as u64).to_be_bytes());
    replica.write_all(&head).await.unwrap();
    replica.write_all(&vec![9; FRAME]).await.unwrap();
    read_exactly(&mut client, head.len() + FRAME / 2).await;
    let spliced = spliced_bytes(&router).await;
    assert!(on_the_ring() || spliced > 0, "nothing spliced yet");
    drop(client);

    // The replica goes on sending its frame; the router, unable to write to the client, tells
    // the replica 1001 (client gone) and closes.
    let mut sink = vec![0u8; 64 * 1024];
    let mut seen = Vec::new();
    bounded("the replica's connection to end", async {
        use tokio::io::AsyncReadExt;
        loop {
            let _ = replica.write_all(&sink[..4096]).await;
            match tokio::time::timeout(Duration::from_millis(20), replica.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => seen.extend_from_slice(&sink[..n]),
                Err(_) => {}
            }
        }
    })
    .await;
    assert!(seen.len() >= 8, "no Close reached the replica: {seen:?}");
    assert_eq!(seen[0], 0x88, "a Close goes to the replica");
    assert!(seen[1] & 0x80 != 0, "masked");
    let key = &seen[2..6];
    let code = u16::from_be_bytes([seen[6] ^ key[0], seen[7] ^ key[1]]);
    assert_eq!(code, 1001);
}
