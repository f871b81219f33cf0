//! Hot reload: a valid new config is swapped in, health state kept for unchanged replicas,
//! live sessions untouched; an invalid one changes nothing.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use fastwebsockets::{Frame, OpCode, Payload};
use wsrouter::echo::EchoReplica;
use wsrouter::registry::Status;
use wsrouter::reload::Reload;

fn config_text(replicas: &[(&EchoReplica, bool)], extra: &str) -> String {
    let mut text = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = 0\n[health_check]\ninterval_seconds = 0.05\n{extra}\n"
    );
    for (i, (replica, primary)) in replicas.iter().enumerate() {
        text += &format!(
            "[[replicas]]\nname = \"r{i}\"\nurl = \"{}\"\nprimary = {primary}\n",
            replica.url()
        );
    }
    text
}

struct Watched {
    router: TestRouter,
    reloader: wsrouter::Reloader,
    path: PathBuf,
    _dir: TempDir,
}

/// A router started from a config file that it watches (polled every 20 ms).
async fn watched(text: &str) -> Watched {
    let dir = TempDir::new("reload");
    let path = dir.0.join("router.toml");
    std::fs::write(&path, text).unwrap();
    let (router, reloader) = watched_router(&path).await;
    Watched {
        reloader,
        router,
        path,
        _dir: dir,
    }
}

fn names(router: &TestRouter) -> Vec<String> {
    router
        .registry
        .snapshot()
        .replicas
        .iter()
        .map(|r| r.replica.name.clone())
        .collect()
}

#[tokio::test]
async fn a_changed_file_is_applied_keeping_health_and_live_sessions() {
    let (a, b) = (
        EchoReplica::start().await.unwrap(),
        EchoReplica::start().await.unwrap(),
    );
    let w = watched(&config_text(&[(&a, true)], "")).await;
    w.router.wait_status(0, Status::Healthy).await;
    let mut on_a = connect(w.router.addr).await;
    assert_eq!(a.open_sessions(), 1);

    // b becomes the primary; a stays, renamed by position ("r1").
    std::fs::write(&w.path, config_text(&[(&b, true), (&a, false)], "")).unwrap();
    until("the reload", || names(&w.router).len() == 2).await;
    assert_eq!(
        w.router.status_of(1),
        Status::Healthy,
        "a kept its health across the reload"
    );
    assert_eq!(
        w.router.registry.snapshot().replicas[1]
            .replica
            .active_sessions(),
        1
    );
    echo_once(&mut on_a, b"still on a").await;

    w.router.wait_status(0, Status::Healthy).await;
    let _on_b = connect(w.router.addr).await;
    assert_eq!(
        (a.open_sessions(), b.open_sessions()),
        (1, 1),
        "new sessions follow the new config"
    );

    // a removed from the config: it takes no new sessions, its live one is untouched, and it
    // stays listed, draining, until that session ends.
    std::fs::write(&w.path, config_text(&[(&b, true)], "")).unwrap();
    until("the second reload", || {
        let snapshot = w.router.registry.snapshot();
        snapshot.replicas.len() == 2 && snapshot.replicas[1].replica.removed
    })
    .await;
    echo_once(
        &mut on_a,
        b"a is gone from the config, not from this session",
    )
    .await;
    let status = raw_http(w.router.addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let body: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let listed = &body["replicas"][1];
    assert_eq!(
        (
            &listed["url"],
            &listed["draining"],
            &listed["removed"],
            &listed["active_sessions"]
        ),
        (
            &serde_json::json!(a.url()),
            &serde_json::json!(true),
            &serde_json::json!(true),
            &serde_json::json!(1)
        ),
        "{body}"
    );
    let _also_on_b = connect(w.router.addr).await;
    assert_eq!((a.open_sessions(), b.open_sessions()), (1, 2));
    drop(on_a);
    until("the drained replica to leave", || {
        names(&w.router) == ["r0"]
    })
    .await;
}

#[tokio::test]
async fn drain_true_turns_new_sessions_away_and_lets_live_ones_run() {
    let (a, b) = (
        EchoReplica::start().await.unwrap(),
        EchoReplica::start().await.unwrap(),
    );
    let w = watched(&config_text(&[(&a, true), (&b, false)], "")).await;
    w.router.wait_status(0, Status::Healthy).await;
    w.router.wait_status(1, Status::Healthy).await;
    let mut on_a = connect(w.router.addr).await;
    assert_eq!(a.open_sessions(), 1);

    let drained = config_text(&[(&a, true), (&b, false)], "").replacen(
        "primary = true\n",
        "primary = true\ndrain = true\n",
        1,
    );
    std::fs::write(&w.path, drained).unwrap();
    until("the reload", || {
        w.router.registry.snapshot().replicas[0].replica.draining
    })
    .await;
    let _on_b = connect(w.router.addr).await;
    assert_eq!(
        (a.open_sessions(), b.open_sessions()),
        (1, 1),
        "the draining primary takes no new session"
    );
    echo_once(&mut on_a, b"a drains; this session runs on").await;
    let metrics = raw_http(w.router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        metrics.contains("wsrouter_replica_draining{replica=\"r0\"} 1")
            && metrics.contains("wsrouter_replica_draining{replica=\"r1\"} 0"),
        "{metrics}"
    );
    // Still probed, still listed after its last session: it is in the config.
    drop(on_a);
    until("a's session to end", || {
        w.router.registry.snapshot().replicas[0]
            .replica
            .active_sessions()
            == 0
    })
    .await;
    assert_eq!(names(&w.router), ["r0", "r1"]);
    assert_eq!(w.router.status_of(0), Status::Healthy);
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_a_fixed_one_applies() {
    let (a, b) = (
        EchoReplica::start().await.unwrap(),
        EchoReplica::start().await.unwrap(),
    );
    let w = watched(&config_text(&[(&a, true)], "")).await;
    w.router.wait_status(0, Status::Healthy).await;

    let mut broken = config_text(&[(&a, true), (&b, false)], "");
    broken += "weight = 0\n";
    std::fs::write(&w.path, &broken).unwrap();
    // A reload of that file reports the precise error and changes nothing.
    let error = match w.reloader.reload_file(&w.path) {
        Reload::Rejected(error) => error.to_string(),
        other => panic!("expected a rejection, got {other:?}"),
    };
    assert!(error.contains("replicas[1].weight"), "{error}");
    assert_eq!(names(&w.router), ["r0"]);
    assert_eq!(w.router.status_of(0), Status::Healthy);
    let mut ws = connect(w.router.addr).await;
    echo_once(&mut ws, b"the old config still serves").await;

    std::fs::write(&w.path, config_text(&[(&a, true), (&b, false)], "")).unwrap();
    until("the fixed config", || names(&w.router).len() == 2).await;
}

#[tokio::test]
async fn balance_and_session_settings_apply_to_new_sessions() {
    let a = EchoReplica::start().await.unwrap();
    let w = watched(&config_text(&[(&a, true)], "")).await;
    w.router.wait_status(0, Status::Healthy).await;
    let mut old = connect(w.router.addr).await;
    std::fs::write(
        &w.path,
        config_text(&[(&a, true)], "[sessions]\nmax_lifetime_seconds = 0.2"),
    )
    .unwrap();
    // The new lifetime reaches a new session; the old one keeps the settings it started with.
    let mut new = bounded("a session under the new settings", async {
        loop {
            let mut ws = connect(w.router.addr).await;
            ws.write_frame(Frame::text(Payload::Borrowed(b"x")))
                .await
                .unwrap();
            let _echo = read(&mut ws).await;
            let started = std::time::Instant::now();
            let frame = tokio::time::timeout(Duration::from_millis(600), ws.read_frame()).await;
            if let Ok(Ok(frame)) = frame {
                if frame.opcode == OpCode::Text && started.elapsed() < Duration::from_millis(600) {
                    return (ws, frame);
                }
            }
        }
    })
    .await;
    let json: serde_json::Value = serde_json::from_slice(&new.1.payload).unwrap();
    assert_eq!(json["code"], "session_expired");
    assert_eq!(close_code(&read(&mut new.0).await).0, 1012);
    echo_once(&mut old, b"the old session has no lifetime").await;
}

#[tokio::test]
async fn an_unreadable_file_changes_nothing_and_overflowing_values_are_refused_whole() {
    let (a, b) = (
        EchoReplica::start().await.unwrap(),
        EchoReplica::start().await.unwrap(),
    );
    let w = watched(&config_text(&[(&a, true)], "")).await;
    w.router.wait_status(0, Status::Healthy).await;
    // A value that passed once and then panicked the reload is refused before anything
    // changes, and the reloads after it still work.
    let overflowing = config_text(
        &[(&a, true), (&b, false)],
        "[sessions]\nmax_lifetime_seconds = 1e300",
    );
    std::fs::write(&w.path, overflowing).unwrap();
    match w.reloader.reload_file(&w.path) {
        Reload::Rejected(error) => assert!(
            error.to_string().contains("sessions.max_lifetime_seconds"),
            "{error}"
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(names(&w.router), ["r0"]);
    let failed_reloads = || async {
        let metrics = raw_http(w.router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("wsrouter_config_reloads_total{result=\"failed\"} "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap()
    };
    // The watcher may have seen the file too: it counts as one more rejection, no harm done.
    let rejected = failed_reloads().await;
    assert!(rejected >= 1);
    // A file that cannot be read (a directory in its place) is "unchanged", not "rejected".
    std::fs::remove_file(&w.path).unwrap();
    std::fs::create_dir(&w.path).unwrap();
    assert!(matches!(w.reloader.reload_file(&w.path), Reload::Unread(_)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(names(&w.router), ["r0"]);
    let mut ws = connect(w.router.addr).await;
    echo_once(&mut ws, b"still serving").await;
    assert_eq!(
        failed_reloads().await,
        rejected,
        "an unreadable file is not a rejected one"
    );
    // Readable and valid again: applied.
    std::fs::remove_dir(&w.path).unwrap();
    std::fs::write(&w.path, config_text(&[(&a, true), (&b, false)], "")).unwrap();
    until("the valid config", || names(&w.router).len() == 2).await;
}

#[tokio::test]
async fn splice_turned_on_applies_to_sessions_opened_after_the_reload() {
    let a = EchoReplica::start().await.unwrap();
    let w = watched(&config_text(&[(&a, true)], "")).await;
    w.router.wait_status(0, Status::Healthy).await;
    let payload = vec![5u8; 1 << 20];
    let echo_large = |mut ws: Client| {
        let payload = &payload;
        async move {
            ws.set_max_message_size(2 << 20);
            ws.write_frame(Frame::binary(Payload::Borrowed(payload)))
                .await
                .unwrap();
            assert!(read(&mut ws).await.payload[..] == payload[..]);
            ws
        }
    };
    let old = echo_large(connect(w.router.addr).await).await;
    assert_eq!(spliced_bytes(&w.router).await, 0, "off by default");

    let text = config_text(&[(&a, true)], "").replace("port = 0\n", "port = 0\nsplice = true\n");
    std::fs::write(&w.path, text).unwrap();
    if on_the_ring() {
        return;
    }
    bounded("a new session to splice", async {
        loop {
            drop(echo_large(connect(w.router.addr).await).await);
            if spliced_bytes(&w.router).await > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let spliced = spliced_bytes(&w.router).await;
    drop(echo_large(old).await);
    assert_eq!(
        spliced_bytes(&w.router).await,
        spliced,
        "a session keeps the setting it opened with"
    );
}
