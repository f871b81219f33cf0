//! The client handshake path: bytes parsed as an HTTP request head (as hyper would), then the
//! router's upgrade check, the sticky-key lookups, the client address behind a trusted proxy
//! and the upstream request it would send. Nothing panics, and the upstream request always is
//! a clean WebSocket upgrade to the replica that says where the client really came from.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use hyper::header::{HeaderName, HeaderValue};
use hyper::Request;
use libfuzzer_sys::fuzz_target;
use wsrouter::balance::Balancer;
use wsrouter::close::RequestId;
use wsrouter::config::{Cidr, Policy, StickyKey};
use wsrouter::http::{check_upgrade, upstream_request};
use wsrouter::registry::{Registry, Replica};

fn replica() -> &'static Arc<Replica> {
    static REPLICA: OnceLock<Arc<Replica>> = OnceLock::new();
    REPLICA.get_or_init(|| {
        let config = wsrouter::Config::parse(
            "[[replicas]]\nurl = \"http://127.0.0.1:8001\"\nprimary = true\n",
        )
        .expect("fixed config");
        Registry::new(&config).replicas().remove(0)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else {
        return;
    };
    let mut builder = Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"));
    for h in parsed.headers.iter() {
        // hyper refuses heads with invalid names or values before the router sees them.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        builder = builder.header(name, value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    if check_upgrade(request.method(), request.version(), request.headers()).is_err() {
        return;
    }
    let (parts, ()) = request.into_parts();
    for sticky in [
        StickyKey::Query("session".into()),
        StickyKey::Header("x-session".into()),
        StickyKey::Cookie("session".into()),
    ] {
        let balancer = Balancer::new(Policy::Failover, Some(sticky));
        if let Some(key) = balancer.session_key(&parts) {
            assert!(!key.is_empty());
        }
    }
    let peer: SocketAddr = "10.0.0.9:40000".parse().unwrap();
    let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
    let client = wsrouter::client::client_address(peer.ip(), &parts.headers, &trusted);
    let replica = replica();
    let request = upstream_request(&parts, peer.ip(), client, RequestId(1), &trusted);
    let upstream = request.head(replica, "dGhlIHNhbXBsZSBub25jZQ==");
    // What goes on the wire is one complete, well-formed request head and nothing more.
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut sent = httparse::Request::new(&mut headers);
    assert_eq!(
        sent.parse(&upstream),
        Ok(httparse::Status::Complete(upstream.len())),
        "{}",
        String::from_utf8_lossy(&upstream)
    );
    assert_eq!(sent.method, Some("GET"));
    assert!(sent.path.unwrap().starts_with('/'));
    let all = |name: &str| -> Vec<&[u8]> {
        sent.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    assert_eq!(all("host"), [replica.authority.as_bytes()]);
    assert_eq!(all("upgrade"), [b"websocket"]);
    assert_eq!(all("connection"), [b"Upgrade"]);
    assert_eq!(all("sec-websocket-version"), [b"13"]);
    assert_eq!(all("sec-websocket-key").len(), 1);
    assert!(all("sec-websocket-extensions").is_empty(), "extensions are never offered upstream");
    let forwarded = all("x-forwarded-for");
    assert_eq!(forwarded.len(), 1);
    assert!(forwarded[0].ends_with(b"10.0.0.9"));
    assert_eq!(all("x-real-ip"), [client.to_string().as_bytes()]);
    assert!(all("forwarded").is_empty());
    assert!(all("expect").is_empty());
});
