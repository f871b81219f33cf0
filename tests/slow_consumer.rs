//! A client that stops reading while its replica streams 1 GiB: the router (the real binary,
//! so its RSS is its own) must not buffer the stream; backpressure must reach the replica.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::read_head;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const STREAM_BYTES: u64 = 1 << 30;
const FRAME_BYTES: usize = 64 << 10;
/// Allowed growth of the router's RSS while it carries the stream.
const RSS_BOUND: u64 = 64 << 20;

/// A replica that answers `/health` and streams STREAM_BYTES in binary frames to each
/// session, then closes with 1000; `written` counts what the socket accepted.
async fn streaming_replica(written: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let written = written.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                if head.starts_with("GET /health") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    return;
                }
                let response = common::switching_protocols(&head);
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                let mut frame = vec![0x82, 127];
                frame.extend_from_slice(&(FRAME_BYTES as u64).to_be_bytes());
                frame.extend(std::iter::repeat_n(0x5a, FRAME_BYTES));
                for _ in 0..STREAM_BYTES / FRAME_BYTES as u64 {
                    if stream.write_all(&frame).await.is_err() {
                        return;
                    }
                    written.fetch_add(FRAME_BYTES as u64, Ordering::Relaxed);
                }
                let _ = stream.write_all(&[0x88, 0x02, 0x03, 0xe8]).await;
                // Hold the socket until the router closes it.
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// The router binary, stopped when dropped.
struct RouterProcess(Child);

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Wait until `counter` has not moved for half a second.
async fn until_stalled(counter: &AtomicU64) -> u64 {
    common::bounded("the replica to be held back", async {
        let mut last = counter.load(Ordering::Relaxed);
        let mut still = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = counter.load(Ordering::Relaxed);
            still = if now == last { still + 1 } else { 0 };
            last = now;
            if still >= 5 && now > 0 {
                return now;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_client_that_stops_reading_holds_back_its_replica_without_router_growth() {
    let written = Arc::new(AtomicU64::new(0));
    let replica = streaming_replica(written.clone()).await;
    let port = common::dead_port();
    let dir = std::env::temp_dir().join(format!("wsrouter-slow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        format!("[listen]\nhost = \"127.0.0.1\"\nport = {port}\n[health_check]\ninterval_seconds = 0.2\n[limits]\nmax_frame_bytes = 1048576\n[[replicas]]\nurl = \"http://{replica}\"\n"),
    )
    .unwrap();
    let router = RouterProcess(
        Command::new(env!("CARGO_BIN_EXE_wsrouter"))
            .args(["--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = router.0.id();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    common::bounded("the replica to be healthy", async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let status =
                    common::raw_http(addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
                if status.contains("\"status\":\"healthy\"") {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let rss_before = rss_bytes(pid);

    // The client upgrades, then reads nothing.
    let client = common::raw_upgrade(addr).await;
    let held_at = until_stalled(&written).await;
    let rss_held = rss_bytes(pid);
    assert!(
        held_at < 64 << 20,
        "the replica got {held_at} bytes out to a client that reads nothing"
    );
    assert!(
        rss_held.saturating_sub(rss_before) < RSS_BOUND,
        "router RSS grew {} bytes while holding the stream",
        rss_held - rss_before
    );

    // Now the client reads all of it, pausing now and then; the router stays flat throughout.
    let mut client = BufReader::with_capacity(1 << 20, client);
    let mut received = 0u64;
    let mut rss_peak = rss_held;
    let mut payload = vec![0u8; FRAME_BYTES];
    let close = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            let first = client.read_u8().await.expect("frame header");
            let len = match client.read_u8().await.unwrap() & 0x7f {
                126 => u64::from(client.read_u16().await.unwrap()),
                127 => client.read_u64().await.unwrap(),
                len => u64::from(len),
            } as usize;
            payload.resize(len, 0);
            client.read_exact(&mut payload).await.unwrap();
            if first & 0x0f == 0x8 {
                return payload[..2].to_vec();
            }
            assert!(payload.iter().all(|&b| b == 0x5a), "stream corrupted");
            received += len as u64;
            if received.is_multiple_of(128 << 20) {
                rss_peak = rss_peak.max(rss_bytes(pid));
                if received.is_multiple_of(256 << 20) {
                    until_stalled(&written).await;
                    rss_peak = rss_peak.max(rss_bytes(pid));
                }
            }
        }
    })
    .await
    .expect("the whole stream within 300 s");
    assert_eq!(received, STREAM_BYTES);
    assert_eq!(close, vec![0x03, 0xe8], "the replica's close 1000 arrives");
    assert!(
        rss_peak.saturating_sub(rss_before) < RSS_BOUND,
        "router RSS grew {} bytes carrying 1 GiB",
        rss_peak - rss_before
    );
    eprintln!(
        "slow consumer: replica held at {} KiB; router RSS {} KiB before, {} KiB peak",
        held_at >> 10,
        rss_before >> 10,
        rss_peak >> 10
    );
}
