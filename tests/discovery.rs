//! Replicas found through DNS: a real DNS server on 127.0.0.1 whose records change while the
//! router runs, replicas on 127.0.0.2, 127.0.0.3, ...

mod common;

use std::net::{IpAddr, SocketAddr};

use common::dns::TestDns;
use common::*;
use wsrouter::echo::EchoReplica;

const NAME: &str = "streamer.gpu.test";

/// Echo replicas on 127.0.0.{first}, 127.0.0.{first + 1}, ... all on one port, as the pods
/// behind a headless service are.
async fn replicas_on_one_port(first: u8, count: u8) -> (Vec<EchoReplica>, u16) {
    let lead = EchoReplica::start_on(format!("127.0.0.{first}:0").parse().unwrap())
        .await
        .unwrap();
    let port = lead.addr().port();
    let mut replicas = vec![lead];
    for i in 1..count {
        let addr: SocketAddr = format!("127.0.0.{}:{port}", first + i).parse().unwrap();
        replicas.push(EchoReplica::start_on(addr).await.unwrap());
    }
    (replicas, port)
}

fn ip(replica: &EchoReplica) -> IpAddr {
    replica.addr().ip()
}

fn group_config(dns: &TestDns, group: &str, extra: &str) -> wsrouter::Config {
    config(
        &[],
        &format!(
            "{extra}\n[discovery]\nnameserver = \"{}\"\n{group}",
            dns.addr
        ),
    )
}

fn dns_group(port: u16) -> String {
    format!("[[replica_groups]]\nname = \"gpu\"\ndns = \"{NAME}\"\nport = {port}\n")
}

/// The replicas the router lists: (name, healthy and taking sessions, removed).
fn listed(router: &TestRouter) -> Vec<(String, bool, bool)> {
    router
        .registry
        .snapshot()
        .replicas
        .iter()
        .map(|r| (r.replica.name.clone(), r.selectable(), r.replica.removed))
        .collect()
}

fn member(replica: &EchoReplica) -> String {
    format!("gpu/{}", replica.addr())
}

async fn until_listed(router: &TestRouter, wanted: Vec<(String, bool, bool)>) {
    let waited = tokio::time::timeout(WAIT, async {
        while listed(router) != wanted {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the router never listed {wanted:?}; it lists {:?}, its groups: {:?}",
        listed(router),
        router.registry.snapshot().groups
    );
}

#[tokio::test]
async fn scale_out_and_in_follow_dns_and_live_sessions_run_on() {
    let dns = TestDns::start().await;
    let (replicas, port) = replicas_on_one_port(2, 2).await;
    dns.set_addresses(NAME, &[ip(&replicas[0])], 1);
    let router = TestRouter::start(group_config(&dns, &dns_group(port), "")).await;
    until_listed(&router, vec![(member(&replicas[0]), true, false)]).await;
    let mut on_first = connect(router.addr).await;
    echo_once(&mut on_first, b"on the first pod").await;

    // Scale out: the new address is a replica, probed and then used.
    dns.set_addresses(NAME, &[ip(&replicas[0]), ip(&replicas[1])], 1);
    until_listed(
        &router,
        vec![
            (member(&replicas[0]), true, false),
            (member(&replicas[1]), true, false),
        ],
    )
    .await;

    // Scale in with a live session: the address that left takes no new sessions, its session
    // runs on, and it stays listed until that session ends.
    dns.set_addresses(NAME, &[ip(&replicas[1])], 1);
    until_listed(
        &router,
        vec![
            (member(&replicas[1]), true, false),
            (member(&replicas[0]), false, true),
        ],
    )
    .await;
    for _ in 0..3 {
        let mut ws = connect(router.addr).await;
        echo_once(&mut ws, b"on the second pod").await;
    }
    assert_eq!(replicas[0].open_sessions(), 1);
    echo_once(&mut on_first, b"the first pod left DNS, not this session").await;
    drop(on_first);
    until_listed(&router, vec![(member(&replicas[1]), true, false)]).await;
}

#[tokio::test]
async fn a_failed_empty_or_missing_answer_keeps_the_last_set() {
    let dns = TestDns::start().await;
    let (replicas, port) = replicas_on_one_port(6, 1).await;
    dns.set_addresses(NAME, &[ip(&replicas[0])], 1);
    let router = TestRouter::start(group_config(&dns, &dns_group(port), "")).await;
    let kept = vec![(member(&replicas[0]), true, false)];
    until_listed(&router, kept.clone()).await;
    let group = || router.registry.snapshot().groups[0].clone();

    dns.fail(true);
    until("a failed lookup", || group().lookups_failed >= 2).await;
    assert_eq!(listed(&router), kept);
    assert!(group().last_error.unwrap().contains("DNS lookup failed"));
    dns.fail(false);

    dns.set_addresses(NAME, &[], 1);
    until("an empty answer", || group().lookups_empty >= 2).await;
    dns.remove(NAME);
    let empties = group().lookups_empty;
    until("a missing name", || group().lookups_empty > empties).await;
    assert_eq!(group().last_error.as_deref(), Some("no such name"));
    assert_eq!(listed(&router), kept, "DNS trouble never empties the fleet");
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"served from the last good set").await;
    drop(ws);

    let metrics = raw_http(router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    for result in ["ok", "empty", "failed"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "wsrouter_discovery_lookups_total{{group=\"gpu\",result=\"{result}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no {result} line in\n{metrics}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
    // A good answer again replaces the set.
    let moved = EchoReplica::start_on(format!("127.0.0.7:{port}").parse().unwrap())
        .await
        .unwrap();
    dns.set_addresses(NAME, &[ip(&moved)], 1);
    until_listed(&router, vec![(member(&moved), true, false)]).await;
}

#[tokio::test]
async fn srv_records_supply_each_replicas_host_and_port() {
    let dns = TestDns::start().await;
    let a = EchoReplica::start_on("127.0.0.8:0".parse().unwrap())
        .await
        .unwrap();
    let b = EchoReplica::start_on("127.0.0.9:0".parse().unwrap())
        .await
        .unwrap();
    dns.set_srv(
        "_ws._tcp.streamer.gpu.test",
        // A record with port 0 is skipped, not a replica.
        &[
            (a.addr().port(), "a.gpu.test"),
            (0, "a.gpu.test"),
            (b.addr().port(), "b.gpu.test"),
        ],
        1,
    );
    dns.set_addresses("a.gpu.test", &[ip(&a)], 1);
    dns.set_addresses("b.gpu.test", &[ip(&b)], 1);
    let group = "[[replica_groups]]\nname = \"gpu\"\nsrv = \"_ws._tcp.streamer.gpu.test\"\n";
    let router = TestRouter::start(group_config(
        &dns,
        group,
        "[balance]\npolicy = \"least_sessions\"",
    ))
    .await;
    until_listed(
        &router,
        vec![(member(&a), true, false), (member(&b), true, false)],
    )
    .await;
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let mut ws = connect(router.addr).await;
        echo_once(&mut ws, b"through SRV").await;
        sessions.push(ws);
    }
    assert_eq!((a.open_sessions(), b.open_sessions()), (2, 2));
    let status = raw_http(router.addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let body: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["replicas"][0]["group"], "gpu", "{body}");
    assert_eq!(body["groups"][0]["found"], 2, "{body}");
    assert_eq!(
        body["groups"][0]["lookup"], "srv _ws._tcp.streamer.gpu.test",
        "{body}"
    );
}

#[tokio::test]
async fn a_short_ttl_brings_the_next_lookup_before_the_health_interval() {
    let dns = TestDns::start().await;
    let (replicas, port) = replicas_on_one_port(10, 2).await;
    dns.set_addresses(NAME, &[ip(&replicas[0])], 1);
    // Probes (and, without a TTL, lookups) every 60 s.
    let router = TestRouter::start(group_config(
        &dns,
        &dns_group(port),
        "[health_check]\ninterval_seconds = 60",
    ))
    .await;
    until_listed(&router, vec![(member(&replicas[0]), true, false)]).await;
    // The records said 1 s: the change shows within the test's bound (10 s), not in 60 s.
    dns.set_addresses(NAME, &[ip(&replicas[1])], 1);
    until_listed(&router, vec![(member(&replicas[1]), true, false)]).await;
}

#[tokio::test]
async fn two_routers_on_one_name_agree_on_sticky_keys_and_scaling_moves_only_the_gone_keys() {
    let dns = TestDns::start().await;
    let (replicas, port) = replicas_on_one_port(12, 3).await;
    let all: Vec<IpAddr> = replicas.iter().map(ip).collect();
    dns.set_addresses(NAME, &all, 1);
    let sticky = "[balance]\npolicy = \"least_sessions\"\nsticky_key = { query = \"session\" }";
    let routers = [
        TestRouter::start(group_config(&dns, &dns_group(port), sticky)).await,
        TestRouter::start(group_config(&dns, &dns_group(port), sticky)).await,
    ];
    let everyone: Vec<_> = replicas.iter().map(|r| (member(r), true, false)).collect();
    for router in &routers {
        until_listed(router, everyone.clone()).await;
    }
    // Which replica each key lands on, through `router`.
    let placement = |router: &TestRouter| {
        let addr = router.addr;
        let replicas = &replicas;
        async move {
            let mut placed = Vec::new();
            for key in 0..16 {
                let path = format!("/v1/stream?session=k{key}");
                let (mut ws, _) = bounded("a sticky session", connect_with(addr, &path, &[]))
                    .await
                    .unwrap();
                echo_once(&mut ws, b"sticky").await;
                // Sessions run one at a time: the replica that saw this path last served it.
                let on = (0..replicas.len())
                    .find(|&i| {
                        replicas[i]
                            .last_request()
                            .is_some_and(|seen| seen.uri.ends_with(&path[10..]))
                    })
                    .expect("the session is on one replica");
                drop(ws);
                placed.push(on);
            }
            placed
        }
    };
    let first = placement(&routers[0]).await;
    assert_eq!(placement(&routers[1]).await, first, "both routers agree");
    assert!(
        (0..3).all(|i| first.contains(&i)),
        "16 keys spread over 3 replicas: {first:?}"
    );

    // The third pod leaves DNS: only its keys move.
    dns.set_addresses(NAME, &all[..2], 1);
    for router in &routers {
        until_listed(router, everyone[..2].to_vec()).await;
    }
    let scaled_in = placement(&routers[1]).await;
    for (key, (&was, &now)) in first.iter().zip(&scaled_in).enumerate() {
        if was == 2 {
            assert_ne!(now, 2, "key k{key} left the gone replica");
        } else {
            assert_eq!(now, was, "key k{key} stayed where it was");
        }
    }
    // It comes back: every key is where it first was.
    dns.set_addresses(NAME, &all, 1);
    for router in &routers {
        until_listed(router, everyone.clone()).await;
    }
    assert_eq!(placement(&routers[0]).await, first);
}

#[tokio::test]
async fn wsrouter_check_looks_groups_up_and_names_the_one_that_finds_nothing() {
    let dns = TestDns::start().await;
    dns.set_srv("_ws._tcp.full.gpu.test", &[(8000, "a.gpu.test")], 30);
    dns.set_addresses("a.gpu.test", &["127.0.0.20".parse().unwrap()], 30);
    dns.set_srv("_ws._tcp.empty.gpu.test", &[], 30);
    let dir = TempDir::new("discovery-check");
    let check = |srv: &str| {
        let path = dir.0.join(format!("{srv}.toml"));
        std::fs::write(
            &path,
            format!(
                "[discovery]\nnameserver = \"{}\"\n[[replica_groups]]\nname = \"gpu\"\nsrv = \"{srv}\"\n",
                dns.addr
            ),
        )
        .unwrap();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsrouter"))
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        }
    };
    let (code, said) = bounded("check", check("_ws._tcp.full.gpu.test")).await;
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("group gpu: 1 found"), "{said}");
    let (code, said) = bounded("check", check("_ws._tcp.empty.gpu.test")).await;
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains("replica_groups[0].srv") && said.contains("no records"),
        "{said}"
    );
}

#[tokio::test]
async fn a_replica_url_with_a_host_name_is_looked_up_once_per_cycle_not_per_session() {
    let dns = TestDns::start().await;
    let (replicas, port) = replicas_on_one_port(16, 2).await;
    // A name only this DNS server knows: the system's resolver could not find it.
    dns.set_addresses("one.gpu.test", &[ip(&replicas[0])], 1);
    let router = TestRouter::start(config(
        &[format!("http://one.gpu.test:{port}")],
        &format!(
            "[discovery]\nnameserver = \"{}\"\n[health_check]\ninterval_seconds = 60",
            dns.addr
        ),
    ))
    .await;
    router
        .wait_status(0, wsrouter::registry::Status::Healthy)
        .await;
    let queries = dns.queries();
    for _ in 0..20 {
        let mut ws = connect(router.addr).await;
        echo_once(&mut ws, b"to the name's address").await;
    }
    assert_eq!(replicas[0].connections(), 21, "a probe and 20 sessions");
    // A lookup (A and AAAA) a second at most went by: far from one per session.
    assert!(
        dns.queries() - queries < 10,
        "{} queries for 20 sessions",
        dns.queries() - queries
    );
    // The name moves: sessions follow within a TTL.
    dns.set_addresses("one.gpu.test", &[ip(&replicas[1])], 1);
    bounded("a session on the name's new address", async {
        loop {
            let mut ws = connect(router.addr).await;
            echo_once(&mut ws, b"where is it now").await;
            if replicas[1].connections() > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn health_probes_follow_a_host_name_that_moves() {
    let dns = TestDns::start().await;
    let (replicas, port) = replicas_on_one_port(18, 2).await;
    dns.set_addresses("two.gpu.test", &[ip(&replicas[0])], 1);
    let router = TestRouter::start(config(
        &[format!("http://two.gpu.test:{port}")],
        &format!("[discovery]\nnameserver = \"{}\"", dns.addr),
    ))
    .await;
    until("probes of the first address", || {
        replicas[0].health_checks() > 2
    })
    .await;
    dns.set_addresses("two.gpu.test", &[ip(&replicas[1])], 1);
    // The kept-alive probe connection to the old address is not reused.
    until("probes of the new address", || {
        replicas[1].health_checks() > 2
    })
    .await;
    let before = replicas[0].health_checks();
    until("a few more probes", || replicas[1].health_checks() > 6).await;
    assert_eq!(
        replicas[0].health_checks(),
        before,
        "the old address is no longer probed"
    );
    drop(router);
}
