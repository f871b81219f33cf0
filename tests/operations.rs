//! What operators see: the admin listener, readiness, the configurable stream path, the
//! access log and log formats, metrics, the build's version.

mod common;

use std::time::Duration;

use common::*;
use fastwebsockets::{Frame, Payload};
use wsrouter::registry::Status;

fn status_of(answer: &str) -> &str {
    answer.split(' ').nth(1).unwrap_or("")
}

#[tokio::test]
async fn status_and_metrics_move_to_the_admin_listener_when_it_is_set() {
    let (_replica, router) = single_echo("[admin]\nlisten = \"127.0.0.1:0\"").await;
    let admin = router.admin.expect("an admin listener");
    for path in ["/status", "/metrics"] {
        let public = raw_http(
            router.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert_eq!(status_of(&public), "404", "{path} on the public listener");
        let private = raw_http(admin, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        assert_eq!(status_of(&private), "200", "{path} on the admin listener");
    }
    for addr in [router.addr, admin] {
        let health = raw_http(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status_of(&health), "200");
    }
    // No sessions on the admin listener.
    let stream = raw_http(admin, "GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&stream), "404");
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"the public listener serves sessions").await;
}

#[tokio::test]
async fn ready_answers_503_without_a_healthy_replica_and_while_draining() {
    let replica = wsrouter::echo::EchoReplica::start().await.unwrap();
    replica.set_health_status(500);
    let mut router = TestRouter::start(config(
        &[replica.url()],
        "[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\nclose_timeout_seconds = 2\ndrain_timeout_seconds = 5",
    ))
    .await;
    let admin = router.admin.unwrap();
    let ready = || async move { raw_http(admin, "GET /ready HTTP/1.1\r\nHost: x\r\n\r\n").await };
    router.wait_status(0, Status::Unhealthy).await;
    let answer = ready().await;
    assert!(
        status_of(&answer) == "503" && answer.contains("no_healthy_replica"),
        "{answer}"
    );
    replica.set_health_status(200);
    router.wait_status(0, Status::Healthy).await;
    assert_eq!(status_of(&ready().await), "200");
    // A client that never answers the router's Close keeps the drain going for a while.
    let _silent = raw_upgrade(router.addr).await;
    until("the session to open", || replica.open_sessions() == 1).await;
    let shutdown = tokio::spawn(async move { router.shutdown().await });
    let answer = bounded("a draining /ready", async {
        loop {
            let answer = ready().await;
            if status_of(&answer) == "503" {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(answer.contains("draining"), "{answer}");
    let _ = shutdown.await;
}

#[tokio::test]
async fn the_stream_path_is_configurable() {
    let (_replica, router) = single_echo("[listen]\nstream_path = \"/ws\"").await;
    let (mut ws, _) = bounded("connect", connect_with(router.addr, "/ws?x=1", &[]))
        .await
        .unwrap();
    echo_once(&mut ws, b"on /ws").await;
    let old = raw_http(router.addr, "GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&old), "404");
}

#[tokio::test]
async fn metrics_cover_failures_closes_durations_and_the_process() {
    let (_replica, router) = single_echo("").await;
    let mut ws = connect(router.addr).await;
    ws.write_frame(Frame::text(Payload::Borrowed(b"close:4000:bye")))
        .await
        .unwrap();
    let close = read(&mut ws).await;
    assert_eq!(close_code(&close).0, 4000);
    let _ = ws.write_frame(Frame::close(4000, b"")).await;
    let metrics = bounded("the session's end in /metrics", async {
        loop {
            let text = raw_http(router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            if text.contains("wsrouter_sessions_ended_total{reason=\"worker_closed\"} 1") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    for expected in [
        "wsrouter_close_codes_total{side=\"client\",code=\"other\"} 1",
        "wsrouter_close_codes_total{side=\"replica\",code=\"other\"} 1",
        "wsrouter_session_duration_seconds_count 1",
        "wsrouter_replica_handshake_seconds_count{replica=\"r0\"} 1",
        "wsrouter_replica_frames_total{replica=\"r0\",direction=\"to_upstream\"}",
        "wsrouter_replica_connect_failures_total{replica=\"r0\",reason=\"refused\"} 0",
        "wsrouter_replica_probe_failures_total{replica=\"r0\",reason=\"timed_out\"} 0",
        "wsrouter_build_info{version=",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
        "wsrouter_config_reloads_total{result=\"ok\"} 0",
    ] {
        assert!(metrics.contains(expected), "no {expected} in\n{metrics}");
    }
}

/// Run the binary with `extra` config, open one session with secrets in it and refuse one
/// request; return the log.
async fn logged_session(name: &str, extra: &str) -> String {
    let replica = wsrouter::echo::EchoReplica::start().await.unwrap();
    let port = dead_port();
    let config = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = {port}\n[health_check]\ninterval_seconds = 0.2\n{extra}\n[[replicas]]\nname = \"gpu-0\"\nurl = \"{}\"\n",
        replica.url()
    );
    let router = RouterProcess::spawn(name, &config, port, None).unwrap();
    router.wait_healthy().await;
    let (mut ws, _) = bounded(
        "connect",
        connect_with(
            router.addr,
            "/v1/stream?token=query-secret",
            &[
                ("authorization", "Bearer header-secret"),
                ("cookie", "sid=cookie-secret"),
            ],
        ),
    )
    .await
    .unwrap();
    echo_once(&mut ws, b"twelve bytes").await;
    ws.write_frame(Frame::close(1000, b"")).await.unwrap();
    let _ = read(&mut ws).await;
    let _ = raw_http(router.addr, "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The session's line comes when the router has finished with it, after the client's close.
    bounded("the access log lines", async {
        while !router.log().contains("request refused") || !router.log().contains("client_closed") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    router.log()
}

#[tokio::test]
async fn each_session_and_refusal_is_one_access_log_line_with_nothing_secret() {
    let log = logged_session("access-text", "").await;
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI colours in a log file:\n{log}"
    );
    for secret in ["query-secret", "header-secret", "cookie-secret"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    let session: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("wsrouter::access") && l.contains(" session"))
        .collect();
    assert_eq!(session.len(), 1, "{log}");
    for field in [
        "peer=127.0.0.1",
        "path=/v1/stream",
        "replica=gpu-0",
        "to_replica_frames=2",
        "to_replica_bytes=14",
        "to_client_frames=2",
        "client_close=1000",
        "replica_close=1000",
        "reason=client_closed",
        "request_id=",
        "duration_ms=",
    ] {
        assert!(
            session[0].contains(field),
            "{field} missing from {}",
            session[0]
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("request refused") && l.contains("status=404")),
        "{log}"
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let log = logged_session("access-json", "[log]\nformat = \"json\"").await;
    let mut sessions = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if event["target"] == "wsrouter::access" && event["message"] == "session" {
            sessions += 1;
            assert_eq!(event["replica"], "gpu-0");
            assert_eq!(event["reason"], "client_closed");
        }
    }
    assert_eq!(sessions, 1, "{log}");
}

#[test]
fn version_names_the_commit() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsrouter"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("wsrouter ") && text.contains("(commit "),
        "{text}"
    );
}

/// Poll the admin listener's /ready until it says draining: the router has stopped accepting.
async fn until_draining(admin: std::net::SocketAddr) {
    bounded("a draining /ready", async {
        loop {
            let answer = raw_http(admin, "GET /ready HTTP/1.1\r\nHost: x\r\n\r\n").await;
            if answer.contains("draining") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_new_instance_takes_over_the_address_while_the_old_one_waits_for_its_sessions() {
    let replica = wsrouter::echo::EchoReplica::start().await.unwrap();
    let wait = "[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\ndrain_mode = \"wait\"\ndrain_timeout_seconds = 30";
    // An explicit port, as in production: port 0 asks for a port of its own.
    let port = dead_port();
    let mut old = TestRouter::start(config(
        &[replica.url()],
        &format!("[listen]\nport = {port}\nworkers = 1\n{wait}"),
    ))
    .await;
    old.wait_status(0, Status::Healthy).await;
    let mut long_session = connect(old.addr).await;
    echo_once(&mut long_session, b"on the old instance").await;

    // The same address, bound while the old instance still listens (SO_REUSEPORT).
    let new = TestRouter::start(config(
        &[replica.url()],
        &format!("[listen]\nport = {port}\nworkers = 1\n{wait}"),
    ))
    .await;
    assert_eq!(new.addr, old.addr);
    new.wait_status(0, Status::Healthy).await;

    let old_admin = old.admin.unwrap();
    let old_registry = old.registry.clone();
    let stopping = tokio::spawn(async move { old.shutdown().await });
    until_draining(old_admin).await;
    // Every new session now lands on the new instance...
    let mut fresh = Vec::new();
    for _ in 0..5 {
        let mut ws = connect(new.addr).await;
        echo_once(&mut ws, b"on the new instance").await;
        fresh.push(ws);
    }
    assert_eq!(
        new.registry.snapshot().replicas[0]
            .replica
            .active_sessions(),
        5
    );
    // ...and the old one's session runs on, with no 1001, until its client ends it.
    echo_once(&mut long_session, b"still on the old instance").await;
    assert!(!stopping.is_finished());
    assert_eq!(
        old_registry.snapshot().replicas[0]
            .replica
            .active_sessions(),
        1
    );
    long_session
        .write_frame(Frame::close(1000, b"done"))
        .await
        .unwrap();
    assert_eq!(close_code(&read(&mut long_session).await).0, 1000);
    assert_eq!(
        bounded("the old instance to finish", stopping)
            .await
            .unwrap(),
        wsrouter::Drain::Complete
    );
}

#[tokio::test]
async fn drain_mode_wait_closes_what_is_left_with_1001_at_the_drain_timeout() {
    let (_replica, mut router) = single_echo(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[limits]\ndrain_mode = \"wait\"\ndrain_timeout_seconds = 0.5",
    )
    .await;
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"before the stop").await;
    let admin = router.admin.unwrap();
    let stopping = tokio::spawn(async move { router.shutdown().await });
    until_draining(admin).await;
    let since = std::time::Instant::now();
    echo_once(&mut ws, b"the session runs on while the router drains").await;
    assert_eq!(close_code(&read(&mut ws).await).0, 1001);
    assert!(
        since.elapsed() >= Duration::from_millis(300),
        "1001 came {:?} into a 500 ms drain",
        since.elapsed()
    );
    assert_eq!(
        bounded("the drain", stopping).await.unwrap(),
        wsrouter::Drain::Complete
    );
}
