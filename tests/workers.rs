//! Worker threads: every worker accepts from a listener of its own on the router's address
//! and serves its own sessions; shutdown drains all of them, and dropping the router stops
//! them all.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use wsrouter::echo::EchoReplica;
use wsrouter::registry::Status;
use wsrouter::Drain;

/// An echo replica on its own thread and runtime, so it answers while the test's runtime
/// (which is the router's worker 0) is blocked. Dropping the sender stops it.
fn echo_replica_on_own_thread() -> (String, tokio::sync::oneshot::Sender<()>) {
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let replica = EchoReplica::start().await.unwrap();
            url_tx.send(replica.url()).unwrap();
            let _ = stopped.await;
        });
    });
    (url_rx.recv_timeout(WAIT).expect("replica started"), stop)
}

fn with_workers(replica: &EchoReplica, workers: usize) -> wsrouter::Config {
    let mut config = config(&[replica.url()], "");
    config.listen.workers = Some(workers);
    config
}

/// Every worker accepts from a listener of its own on the router's address (the kernel
/// hands each connection to one of them): while worker 0 (this test's thread) is blocked,
/// worker 1 answers the connections given to it, and those given to worker 0 wait in its
/// queue, none lost, until it runs again.
#[tokio::test]
async fn each_worker_accepts_from_its_own_listener() {
    const CONNECTIONS: usize = 24;
    let (url, _replica) = echo_replica_on_own_thread();
    let mut config = config(&[url], "");
    config.listen.workers = Some(2);
    let router = wsrouter::Router::bind_with_probe(config, std::sync::Arc::new(AlwaysHealthy))
        .await
        .unwrap();
    let router = TestRouter::run(router);
    router.wait_status(0, Status::Healthy).await;
    let mut streams: Vec<std::net::TcpStream> = (0..CONNECTIONS)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(router.addr).unwrap();
            stream.write_all(UPGRADE_REQUEST).unwrap();
            stream.set_nonblocking(true).unwrap();
            stream
        })
        .collect();
    // Blocking this thread (worker 0) on purpose: only worker 1 can answer meanwhile.
    let answered = |stream: &std::net::TcpStream| {
        let mut start = [0u8; 12];
        matches!(stream.peek(&mut start), Ok(12)) && &start == b"HTTP/1.1 101"
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !streams.iter().any(answered) {
        assert!(
            std::time::Instant::now() < deadline,
            "worker 1 answers while worker 0 is blocked"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Worker 0 runs again: every connection is answered and echoes.
    for stream in streams.drain(..) {
        let mut stream = tokio::net::TcpStream::from_std(stream).unwrap();
        bounded("every connection answered", async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let head = read_head(&mut stream).await.unwrap();
            assert!(head.starts_with("HTTP/1.1 101"));
            stream
                .write_all(&raw_frame(0x81, b"hi", true))
                .await
                .unwrap();
            let mut echoed = [0u8; 4];
            stream.read_exact(&mut echoed).await.unwrap();
            assert_eq!(&echoed, b"\x81\x02hi");
        })
        .await;
    }
}

#[tokio::test]
async fn shutdown_drains_the_sessions_of_every_worker() {
    let replica = EchoReplica::start().await.unwrap();
    let mut router = TestRouter::start(with_workers(&replica, 4)).await;
    router.wait_status(0, Status::Healthy).await;
    let mut clients = Vec::new();
    for _ in 0..32 {
        let mut ws = connect(router.addr).await;
        echo_once(&mut ws, b"up").await;
        clients.push(ws);
    }
    let shutdown = tokio::spawn(async move { router.shutdown().await });
    for ws in &mut clients {
        assert_eq!(close_code(&read(ws).await).0, 1001);
    }
    assert_eq!(bounded("drain", shutdown).await.unwrap(), Drain::Complete);
}

#[tokio::test]
async fn dropping_the_router_stops_every_worker_listening() {
    let replica = EchoReplica::start().await.unwrap();
    let router = TestRouter::start(with_workers(&replica, 4)).await;
    router.wait_status(0, Status::Healthy).await;
    let addr = router.addr;
    let mut ws = connect(addr).await;
    echo_once(&mut ws, b"up").await;
    drop(router);
    // Each worker holds a listening socket on the address; the port closes once all let go.
    bounded("the port to close", async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}
