//! Worker threads: every worker accepts from the one listener and serves its own sessions;
//! shutdown drains all of them, and dropping the router stops them all.

mod common;

use std::io::{Read, Write};
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

#[tokio::test]
async fn a_blocked_worker_does_not_stop_the_others_from_serving() {
    let (url, _replica) = echo_replica_on_own_thread();
    let mut config = config(&[url], "");
    config.listen.workers = Some(2);
    let router = wsrouter::Router::bind_with_probe(config, std::sync::Arc::new(AlwaysHealthy))
        .await
        .unwrap();
    let router = TestRouter::run(router);
    router.wait_status(0, Status::Healthy).await;
    // From here the test blocks its own thread, which is worker 0: only worker 1 can accept
    // and serve this session.
    let mut stream = std::net::TcpStream::connect(router.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(UPGRADE_REQUEST).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream
            .read_exact(&mut byte)
            .expect("a worker other than the blocked one answers");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    stream.write_all(&raw_frame(0x81, b"hi", true)).unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).expect("the echo");
    assert_eq!(&echoed, b"\x81\x02hi");
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
    // Each worker holds a handle to the listening socket; it is closed once all let go.
    bounded("the port to close", async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}
