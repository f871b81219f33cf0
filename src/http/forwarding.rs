//! What of a client's upgrade request goes on to the replica.
//!
//! Kept: the path and query, and end-to-end headers (Origin, Authorization, cookies,
//! subprotocols, ...). Dropped: hop-by-hop headers, headers the client's `Connection` names,
//! `Expect`, every extension offer but permessage-deflate's (its frames pass through
//! unchanged; any other extension could change framing the router checks), and every claim
//! about where the request came from. Those are rewritten by the router:
//! `X-Forwarded-For` / `-Proto` / `-Host` are kept (and extended) only from a trusted front
//! proxy and overwritten otherwise; `Forwarded` is dropped; `X-Real-IP` and `X-Request-Id`
//! are the router's own.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;

use crate::client::is_trusted;
use crate::close::RequestId;
use crate::config::Cidr;
use crate::upstream::{is_permessage_deflate, UpstreamRequest};

/// Headers never passed on as they came.
fn is_dropped(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "connection"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "content-length"
            | "expect"
            | "sec-websocket-key"
            | "sec-websocket-version"
            | "sec-websocket-accept"
            // Filtered: see `deflate_offers`.
            | "sec-websocket-extensions"
            | "forwarded"
            | "x-real-ip"
            | "x-request-id"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
    )
}

/// Header names the client's `Connection` header lists: hop-by-hop by its own say-so.
fn named_in_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

/// The client's permessage-deflate offers, the one extension offered on: compressed messages
/// are forwarded as they are (RSV1 on their first frame), nothing to inflate on the way.
fn deflate_offers(headers: &HeaderMap) -> Option<HeaderValue> {
    let offers: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|offer| is_permessage_deflate(offer))
        .collect();
    if offers.is_empty() {
        return None;
    }
    HeaderValue::from_str(&offers.join(", ")).ok()
}

/// The upstream request for a client's upgrade: `peer` is the TCP peer, `client` the client
/// address found for it (the peer, or from a trusted proxy's X-Forwarded-For).
pub fn upstream_request(
    parts: &Parts,
    peer: IpAddr,
    client: IpAddr,
    request_id: RequestId,
    trusted: &[Cidr],
) -> UpstreamRequest {
    use std::io::Write;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/")
        .to_string();
    let mut request = UpstreamRequest::new(path_and_query);
    let named = named_in_connection(&parts.headers);
    for (name, value) in &parts.headers {
        if !is_dropped(name) && !named.contains(name) {
            request.push(name, value);
        }
    }
    if let Some(offers) = deflate_offers(&parts.headers) {
        request.push(&header::SEC_WEBSOCKET_EXTENSIONS, &offers);
    }
    let from_trusted_proxy = is_trusted(peer, trusted);
    let kept = |name: &str| -> Option<&HeaderValue> {
        from_trusted_proxy
            .then(|| parts.headers.get(name))
            .flatten()
    };
    let prior = kept("x-forwarded-for").and_then(|v| v.to_str().ok());
    request.push_with("x-forwarded-for", |out| {
        if let Some(prior) = prior {
            out.extend_from_slice(prior.as_bytes());
            out.extend_from_slice(b", ");
        }
        let _ = write!(out, "{peer}");
    });
    let proto = kept("x-forwarded-proto").map_or(&b"http"[..], |v| v.as_bytes());
    request.push_with("x-forwarded-proto", |out| out.extend_from_slice(proto));
    if let Some(host) = kept("x-forwarded-host").or_else(|| parts.headers.get(header::HOST)) {
        request.push_with("x-forwarded-host", |out| {
            out.extend_from_slice(host.as_bytes())
        });
    }
    request.push_with("x-real-ip", |out| {
        let _ = write!(out, "{client}");
    });
    request.push_with("x-request-id", |out| {
        let _ = write!(out, "{request_id}");
    });
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut builder = hyper::Request::get("/v1/stream?token=abc");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn sent(request: &UpstreamRequest, name: &str) -> Vec<String> {
        request
            .headers()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
            .collect()
    }

    #[test]
    fn an_untrusted_client_cannot_say_where_it_comes_from() {
        let p = parts(&[
            ("host", "router.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-request-id", "forged"),
            ("connection", "Upgrade, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("expect", "100-continue"),
            ("origin", "https://app.example"),
            ("authorization", "Bearer t"),
        ]);
        let peer: IpAddr = "203.0.113.5".parse().unwrap();
        let request = upstream_request(&p, peer, peer, RequestId(7), &[]);
        assert_eq!(request.path_and_query(), "/v1/stream?token=abc");
        assert_eq!(sent(&request, "x-forwarded-for"), ["203.0.113.5"]);
        assert_eq!(sent(&request, "x-forwarded-proto"), ["http"]);
        assert_eq!(sent(&request, "x-forwarded-host"), ["router.example"]);
        assert_eq!(sent(&request, "x-real-ip"), ["203.0.113.5"]);
        assert_eq!(sent(&request, "x-request-id"), ["0000000000000007"]);
        for gone in ["forwarded", "x-secret-hop", "expect", "connection", "host"] {
            assert!(sent(&request, gone).is_empty(), "{gone} was passed on");
        }
        assert_eq!(sent(&request, "origin"), ["https://app.example"]);
        assert_eq!(sent(&request, "authorization"), ["Bearer t"]);
    }

    #[test]
    fn a_trusted_proxy_keeps_its_forwarding_headers_extended() {
        let p = parts(&[
            ("host", "internal:9000"),
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.example"),
        ]);
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let client: IpAddr = "198.51.100.7".parse().unwrap();
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let request = upstream_request(&p, proxy, client, RequestId(1), &trusted);
        assert_eq!(
            sent(&request, "x-forwarded-for"),
            ["198.51.100.7, 10.0.0.2"]
        );
        assert_eq!(sent(&request, "x-forwarded-proto"), ["https"]);
        assert_eq!(sent(&request, "x-forwarded-host"), ["app.example"]);
        assert_eq!(sent(&request, "x-real-ip"), ["198.51.100.7"]);
    }

    #[test]
    fn only_permessage_deflate_offers_go_on() {
        let p = parts(&[
            (
                "sec-websocket-extensions",
                "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
            ),
            (
                "sec-websocket-extensions",
                "Permessage-Deflate ;server_no_context_takeover",
            ),
            ("sec-websocket-extensions", "foo; permessage-deflate"),
        ]);
        let peer: IpAddr = "203.0.113.5".parse().unwrap();
        let request = upstream_request(&p, peer, peer, RequestId(1), &[]);
        assert_eq!(
            sent(&request, "sec-websocket-extensions"),
            ["permessage-deflate; client_max_window_bits, Permessage-Deflate ;server_no_context_takeover"]
        );
        assert!(request.offers_compression());

        let other = parts(&[("sec-websocket-extensions", "x-webkit-deflate-frame")]);
        let request = upstream_request(&other, peer, peer, RequestId(1), &[]);
        assert!(sent(&request, "sec-websocket-extensions").is_empty());
        assert!(!request.offers_compression());
    }
}
