//! Both WebSocket handshakes: checking the client's upgrade request, and performing the
//! upstream handshake (before the client gets its 101, so a failure can move on to the
//! next replica and the negotiated subprotocol can be returned to the client).

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;

use crate::registry::Replica;

const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

/// Whether a comma-separated header contains `token` (case-insensitive), in any of its values.
fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Why a client's upgrade request was refused, with the HTTP status it earns.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: &'static str,
}

fn refuse(status: StatusCode, message: &'static str) -> Refusal {
    Refusal { status, message }
}

/// Check that a request is a valid WebSocket opening handshake (RFC 6455 section 4.2.1).
pub fn check_client_request<B>(req: &Request<B>) -> Result<(), Refusal> {
    let headers = req.headers();
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint only accepts WebSocket upgrades",
        ));
    }
    if req.method() != Method::GET {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket upgrade must use GET",
        ));
    }
    if req.version() != hyper::Version::HTTP_11 {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    match headers.get(header::SEC_WEBSOCKET_VERSION) {
        Some(v) if v == "13" => {}
        _ => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13",
            ))
        }
    }
    let key_ok = headers.get_all(header::SEC_WEBSOCKET_KEY).iter().count() == 1
        && headers
            .get(header::SEC_WEBSOCKET_KEY)
            .and_then(|k| {
                base64::engine::general_purpose::STANDARD
                    .decode(k.as_bytes())
                    .ok()
            })
            .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be one base64-encoded 16-byte value",
        ));
    }
    Ok(())
}

/// Request headers that describe this hop or the client's handshake, never forwarded as-is.
fn is_hop_header(name: &HeaderName) -> bool {
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
            | "sec-websocket-key"
            | "sec-websocket-version"
            | "sec-websocket-accept"
            // permessage-deflate cannot pass through a frame-level pump: never offer it upstream.
            | "sec-websocket-extensions"
            | "x-forwarded-proto"
            | "x-forwarded-host"
    )
}

/// Build the upstream handshake request from the client's request: same path and query,
/// end-to-end headers (subprotocols, Origin, Authorization, cookies, ...) kept, X-Forwarded-* added.
pub fn upstream_request(
    client: &hyper::http::request::Parts,
    client_addr: SocketAddr,
    replica: &Replica,
    key: &str,
) -> Request<Empty<Bytes>> {
    let path = client
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = path
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    let headers = req.headers_mut();
    for (name, value) in &client.headers {
        if !is_hop_header(name) && *name != "x-forwarded-for" {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&replica.authority).expect("validated authority"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(key).expect("base64 key"),
    );
    let ip = client_addr.ip().to_string();
    let forwarded_for = match client
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = client.headers.get(header::HOST) {
        headers.insert("x-forwarded-host", host.clone());
    }
    req
}

/// A replica connection that completed its WebSocket handshake.
pub struct Upstream {
    pub stream: TcpStream,
    /// Bytes the replica sent right after its 101, already read by the HTTP parser.
    pub leftover: Bytes,
    /// Headers to copy into the client's 101: the chosen subprotocol and any cookies set.
    pub response_headers: HeaderMap,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("no handshake within {0:.3}s")]
    Timeout(f64),
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The replica refused this particular request (4xx): its answer, not a replica fault.
    #[error("replica refused the upgrade with HTTP {0}")]
    Refused(StatusCode),
}

/// Connect to `replica` and complete the WebSocket handshake within `timeout`.
pub async fn connect(
    replica: &Replica,
    client: &hyper::http::request::Parts,
    client_addr: SocketAddr,
    timeout: Duration,
) -> Result<Upstream, UpstreamError> {
    match tokio::time::timeout(timeout, connect_inner(replica, client, client_addr)).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout(timeout.as_secs_f64())),
    }
}

async fn connect_inner(
    replica: &Replica,
    client: &hyper::http::request::Parts,
    client_addr: SocketAddr,
) -> Result<Upstream, UpstreamError> {
    let stream = TcpStream::connect(&replica.authority)
        .await
        .map_err(UpstreamError::Connect)?;
    stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
    let key = fastwebsockets::handshake::generate_key();
    let request = upstream_request(client, client_addr, replica, &key);
    let offered_protocols = client.headers.get_all(header::SEC_WEBSOCKET_PROTOCOL);

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::Handshake(e.to_string()))?;
    // The connection task ends when the upgrade hands the socket over (or on error).
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut response = sender
        .send_request(request)
        .await
        .map_err(|e| UpstreamError::Handshake(e.to_string()))?;
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(if status.is_client_error() {
            UpstreamError::Refused(status)
        } else {
            UpstreamError::Handshake(format!("expected HTTP 101, got {}", status.as_u16()))
        });
    }
    let headers = response.headers();
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(UpstreamError::Handshake(
            "101 without Upgrade: websocket / Connection: upgrade".into(),
        ));
    }
    let expected = accept_key(key.as_bytes());
    if headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|v| v.as_bytes())
        != Some(expected.as_bytes())
    {
        return Err(UpstreamError::Handshake(
            "wrong or missing Sec-WebSocket-Accept".into(),
        ));
    }
    if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Err(UpstreamError::Handshake(
            "replica enabled an extension that was not offered".into(),
        ));
    }
    let mut response_headers = HeaderMap::new();
    if let Some(chosen) = headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        let chosen_str = chosen.to_str().unwrap_or("").trim();
        let was_offered = offered_protocols
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == chosen_str);
        if !was_offered {
            return Err(UpstreamError::Handshake(format!(
                "replica chose subprotocol {chosen_str:?}, which the client did not offer"
            )));
        }
        response_headers.insert(header::SEC_WEBSOCKET_PROTOCOL, chosen.clone());
    }
    for cookie in headers.get_all(header::SET_COOKIE) {
        response_headers.append(header::SET_COOKIE, cookie.clone());
    }
    let upgraded = hyper::upgrade::on(&mut response)
        .await
        .map_err(|e| UpstreamError::Handshake(format!("upgrade: {e}")))?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| UpstreamError::Handshake("upgraded connection is not a TCP stream".into()))?;
    Ok(Upstream {
        stream: parts.io.into_inner(),
        leftover: parts.read_buf,
        response_headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/v1/stream");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn client_checks() {
        assert_eq!(check_client_request(&request(&GOOD)), Ok(()));
        assert_eq!(
            check_client_request(&request(&[])).unwrap_err().status,
            StatusCode::UPGRADE_REQUIRED
        );
        let bad_version = [GOOD[0], GOOD[1], ("sec-websocket-version", "8"), GOOD[3]];
        assert_eq!(
            check_client_request(&request(&bad_version))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let bad_key = [GOOD[0], GOOD[1], GOOD[2], ("sec-websocket-key", "short")];
        assert_eq!(
            check_client_request(&request(&bad_key)).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let no_key = [GOOD[0], GOOD[1], GOOD[2]];
        assert_eq!(
            check_client_request(&request(&no_key)).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
