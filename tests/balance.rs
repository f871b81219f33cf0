//! Balancing policies, per-replica capacity and /metrics over real sockets.

mod common;

use common::*;
use fastwebsockets::{Frame, Payload};
use wsrouter::echo::EchoReplica;
use wsrouter::registry::Status;

async fn replicas(n: usize) -> Vec<EchoReplica> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(EchoReplica::start().await.unwrap());
    }
    out
}

async fn router_for(replicas: &[EchoReplica], extra: &str, per_replica: &str) -> TestRouter {
    let urls: Vec<String> = replicas.iter().map(|r| r.url()).collect();
    let mut text = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = 0\n[health_check]\ninterval_seconds = 0.05\n{extra}\n"
    );
    for (i, url) in urls.iter().enumerate() {
        text += &format!("[[replicas]]\nname = \"r{i}\"\nurl = \"{url}\"\n{per_replica}\n");
    }
    let router = TestRouter::start(wsrouter::Config::parse(&text).unwrap()).await;
    for i in 0..urls.len() {
        router.wait_status(i, Status::Healthy).await;
    }
    router
}

fn active(router: &TestRouter) -> Vec<usize> {
    router
        .registry
        .snapshot()
        .replicas
        .iter()
        .map(|r| r.replica.active_sessions())
        .collect()
}

#[tokio::test]
async fn capacity_spills_to_the_next_replica_then_refuses_with_1013() {
    let fleet = replicas(2).await;
    let router = router_for(&fleet, "", "max_sessions = 1").await;
    let _a = connect(router.addr).await;
    let _b = connect(router.addr).await;
    assert_eq!(
        active(&router),
        vec![1, 1],
        "the second session goes to the second replica"
    );
    let mut refused = connect(router.addr).await;
    let (json, code, _) = read_error_and_close(&mut refused).await;
    assert_eq!(json["code"], "gpu_unavailable");
    assert!(
        json["message"].as_str().unwrap().contains("capacity"),
        "{json}"
    );
    assert_eq!(code, 1013);
    // A freed slot is usable again.
    drop(_a);
    until("the slot to free", || active(&router)[0] == 0).await;
    let _c = connect(router.addr).await;
    assert_eq!(active(&router), vec![1, 1]);
}

#[tokio::test]
async fn least_sessions_spreads_by_weight() {
    let fleet = replicas(2).await;
    let urls: Vec<String> = fleet.iter().map(|r| r.url()).collect();
    let text = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = 0\n[health_check]\ninterval_seconds = 0.05\n[balance]\npolicy = \"least_sessions\"\n\
         [[replicas]]\nurl = \"{}\"\nweight = 1\n[[replicas]]\nurl = \"{}\"\nweight = 3\n",
        urls[0], urls[1]
    );
    let router = TestRouter::start(wsrouter::Config::parse(&text).unwrap()).await;
    router.wait_status(0, Status::Healthy).await;
    router.wait_status(1, Status::Healthy).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect(router.addr).await);
    }
    assert_eq!(active(&router), vec![2, 6]);
}

#[tokio::test]
async fn round_robin_rotates_over_the_tier() {
    let fleet = replicas(3).await;
    let router = router_for(&fleet, "[balance]\npolicy = \"round_robin\"", "").await;
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(connect(router.addr).await);
    }
    let counts = active(&router);
    assert!(counts.iter().all(|&n| (8..=12).contains(&n)), "{counts:?}");
}

#[tokio::test]
async fn metrics_count_sessions_frames_and_rejections() {
    let fleet = replicas(1).await;
    let router = router_for(&fleet, "[limits]\nmax_sessions = 1", "").await;
    let mut ws = connect(router.addr).await;
    for _ in 0..3 {
        ws.write_frame(Frame::text(Payload::Borrowed(b"12345")))
            .await
            .unwrap();
        read(&mut ws).await;
    }
    let _ = bounded(
        "refused connect",
        connect_with(router.addr, "/v1/stream", &[]),
    )
    .await;
    let text = raw_http(router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let metric = |line: &str| {
        text.lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(
        metric("wsrouter_replica_sessions_active{replica=\"r0\"}"),
        1.0
    );
    assert_eq!(
        metric("wsrouter_replica_sessions_total{replica=\"r0\"}"),
        1.0
    );
    assert_eq!(metric("wsrouter_replica_up{replica=\"r0\"}"), 1.0);
    assert_eq!(
        metric("wsrouter_replica_health{replica=\"r0\",state=\"healthy\"}"),
        1.0
    );
    assert_eq!(
        metric("wsrouter_sessions_rejected_total{reason=\"session_limit\"}"),
        1.0
    );
    assert_eq!(metric("wsrouter_upstream_handshake_seconds_count"), 1.0);
    // A pump publishes its frame counts before it flushes, so the third echo implies all three.
    let to_upstream = metric("wsrouter_frames_total{direction=\"to_upstream\"}");
    let bytes_up = metric("wsrouter_frame_bytes_total{direction=\"to_upstream\"}");
    assert_eq!((to_upstream, bytes_up), (3.0, 15.0));
    assert!(text.contains("# TYPE wsrouter_upstream_handshake_seconds histogram"));
}

/// Which replica a session opened with `path` and `headers` lands on; the session is closed
/// again before returning.
async fn landing(router: &TestRouter, path: &str, headers: &[(&str, &str)]) -> usize {
    let (ws, _) = bounded("sticky connect", connect_with(router.addr, path, headers))
        .await
        .expect("handshake");
    let counts = active(router);
    assert_eq!(counts.iter().sum::<usize>(), 1, "{counts:?}");
    let index = counts.iter().position(|&n| n == 1).unwrap();
    drop(ws);
    until("the session to end", || {
        active(router).iter().all(|&n| n == 0)
    })
    .await;
    index
}

#[tokio::test]
async fn a_query_key_sticks_to_one_replica_and_routers_agree() {
    let fleet = replicas(4).await;
    let extra = "[balance]\npolicy = \"round_robin\"\nsticky_key = { query = \"session_id\" }";
    let router = router_for(&fleet, extra, "").await;
    let twin = router_for(&fleet, extra, "").await;
    let mut seen = std::collections::HashSet::new();
    for key in 0..12 {
        let path = format!("/v1/stream?model=x&session_id=user-{key}");
        let first = landing(&router, &path, &[]).await;
        for _ in 0..3 {
            assert_eq!(landing(&router, &path, &[]).await, first, "key {key} moved");
        }
        assert_eq!(
            landing(&twin, &path, &[]).await,
            first,
            "routers disagree on {key}"
        );
        seen.insert(first);
    }
    assert!(
        seen.len() >= 3,
        "12 keys should spread over the fleet: {seen:?}"
    );
    // Without a key the policy applies: round robin visits every replica.
    let mut keyless = std::collections::HashSet::new();
    for _ in 0..8 {
        keyless.insert(landing(&router, "/v1/stream?session_idx=1", &[]).await);
    }
    assert_eq!(keyless.len(), 4, "a look-alike parameter is not the key");
}

#[tokio::test]
async fn a_sticky_key_moves_when_its_replica_dies_and_header_and_cookie_keys_work() {
    let fleet = replicas(3).await;
    let router = router_for(
        &fleet,
        "[balance]\npolicy = \"round_robin\"\nsticky_key = { header = \"X-Session\" }",
        "",
    )
    .await;
    let home = landing(&router, "/v1/stream", &[("x-session", "abc")]).await;
    fleet[home].kill();
    router.wait_status(home, Status::Unhealthy).await;
    let moved = landing(&router, "/v1/stream", &[("x-session", "abc")]).await;
    assert_ne!(moved, home);
    assert_eq!(
        landing(&router, "/v1/stream", &[("x-session", "abc")]).await,
        moved
    );

    let cookie_fleet = replicas(3).await;
    let cookies = router_for(
        &cookie_fleet,
        "[balance]\npolicy = \"round_robin\"\nsticky_key = { cookie = \"sid\" }",
        "",
    )
    .await;
    for key in ["a", "b", "c", "d"] {
        let cookie = format!("theme=dark; sid={key}; other=1");
        let first = landing(&cookies, "/v1/stream", &[("cookie", &cookie)]).await;
        let again = landing(&cookies, "/v1/stream", &[("cookie", &format!("sid={key}"))]).await;
        assert_eq!(first, again, "cookie key {key} moved");
    }
}
