//! Both WebSocket handshakes: checking the client's upgrade request, and performing the
//! upstream handshake (before the client gets its 101, so a failure can move on to the
//! next replica and the negotiated subprotocol can be returned to the client).

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Whether comma-separated header values contain a token `matches` accepts.
fn has_token<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    mut matches: impl FnMut(&str) -> bool,
) -> bool {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .any(|t| matches(t.trim()))
}

/// Whether a comma-separated header contains `token` (case-insensitive), in any of its values.
fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    let values = headers.get_all(name).into_iter().map(|v| v.as_bytes());
    has_token(values, |t| t.eq_ignore_ascii_case(token))
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

/// The upstream handshake request, as the bytes sent to the replica: same path and query,
/// end-to-end headers (subprotocols, Origin, Authorization, cookies, ...) kept,
/// X-Forwarded-* added. Written straight into one buffer: names, values and the path were
/// validated by hyper when the client's request was parsed, so none can break the framing.
pub fn upstream_request(
    client: &hyper::http::request::Parts,
    client_addr: SocketAddr,
    replica: &Replica,
    key: &str,
) -> Vec<u8> {
    let path = client
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let mut line = |name: &[u8], value: &[u8]| {
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    };
    line(b"host", replica.authority.as_bytes());
    line(b"connection", b"Upgrade");
    line(b"upgrade", b"websocket");
    line(b"sec-websocket-version", b"13");
    line(b"sec-websocket-key", key.as_bytes());
    for (name, value) in &client.headers {
        if !is_hop_header(name) && *name != "x-forwarded-for" {
            line(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let ip = client_addr.ip().to_string();
    match client
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) => line(b"x-forwarded-for", format!("{prior}, {ip}").as_bytes()),
        None => line(b"x-forwarded-for", ip.as_bytes()),
    }
    line(b"x-forwarded-proto", b"http");
    if let Some(host) = client.headers.get(header::HOST) {
        line(b"x-forwarded-host", host.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A replica connection that completed its WebSocket handshake.
pub struct Upstream {
    pub stream: TcpStream,
    /// Bytes the replica sent right after its 101, read with the response head.
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

fn handshake_error(message: impl Into<String>) -> UpstreamError {
    UpstreamError::Handshake(message.into())
}

/// Largest response head a replica may send for its 101.
const MAX_RESPONSE_HEAD_BYTES: usize = 16 * 1024;
/// Most headers a replica's 101 may carry.
const MAX_RESPONSE_HEADERS: usize = 64;

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

/// The upstream handshake is one request head out and one response head back, so it is
/// written and parsed (httparse, as hyper does) directly on the socket: no client connection
/// task, request channel or upgrade hand-off per session.
async fn connect_inner(
    replica: &Replica,
    client: &hyper::http::request::Parts,
    client_addr: SocketAddr,
) -> Result<Upstream, UpstreamError> {
    let mut stream = TcpStream::connect(&replica.authority)
        .await
        .map_err(UpstreamError::Connect)?;
    stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
    let key = fastwebsockets::handshake::generate_key();
    let request = upstream_request(client, client_addr, replica, &key);
    stream
        .write_all(&request)
        .await
        .map_err(|e| handshake_error(format!("sending the request: {e}")))?;

    let mut buf = BytesMut::with_capacity(1024);
    let (head_len, response_headers) = loop {
        let read = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| handshake_error(format!("reading the response: {e}")))?;
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let code = response.code.unwrap_or_default();
                let status = StatusCode::from_u16(code)
                    .map_err(|_| handshake_error(format!("invalid status {code}")))?;
                break (len, check_response(status, response.headers, &key, client)?);
            }
            Ok(httparse::Status::Partial) if read == 0 => {
                return Err(handshake_error(
                    "the replica closed the connection before its response",
                ))
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD_BYTES => {
                return Err(handshake_error(format!(
                    "response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes"
                )))
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(handshake_error(format!("invalid response: {e}"))),
        }
    };
    let leftover = buf.split_off(head_len).freeze();
    Ok(Upstream {
        stream,
        leftover,
        response_headers,
    })
}

/// Check a replica's answer to the upgrade; keep the headers the client's 101 carries over.
fn check_response(
    status: StatusCode,
    headers: &[httparse::Header<'_>],
    key: &str,
    client: &hyper::http::request::Parts,
) -> Result<HeaderMap, UpstreamError> {
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(if status.is_client_error() {
            UpstreamError::Refused(status)
        } else {
            handshake_error(format!("expected HTTP 101, got {}", status.as_u16()))
        });
    }
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let named_has = |name, token: &str| has_token(named(name), |t| t.eq_ignore_ascii_case(token));
    if !named_has("upgrade", "websocket") || !named_has("connection", "upgrade") {
        return Err(handshake_error(
            "101 without Upgrade: websocket / Connection: upgrade",
        ));
    }
    let expected = accept_key(key.as_bytes());
    if named("sec-websocket-accept").ne(std::iter::once(expected.as_bytes())) {
        return Err(handshake_error("wrong or missing Sec-WebSocket-Accept"));
    }
    if named("sec-websocket-extensions").next().is_some() {
        return Err(handshake_error(
            "replica enabled an extension that was not offered",
        ));
    }
    let mut kept = HeaderMap::new();
    if let Some(chosen) = named("sec-websocket-protocol").next() {
        let chosen_str = std::str::from_utf8(chosen).unwrap_or("").trim();
        let offered = client.headers.get_all(header::SEC_WEBSOCKET_PROTOCOL);
        let was_offered = has_token(offered.into_iter().map(|v| v.as_bytes()), |p| {
            p == chosen_str
        });
        if !was_offered {
            return Err(handshake_error(format!(
                "replica chose subprotocol {chosen_str:?}, which the client did not offer"
            )));
        }
        let value = HeaderValue::from_bytes(chosen)
            .map_err(|_| handshake_error("invalid Sec-WebSocket-Protocol value"))?;
        kept.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    for cookie in named("set-cookie") {
        let value = HeaderValue::from_bytes(cookie)
            .map_err(|_| handshake_error("invalid Set-Cookie value"))?;
        kept.append(header::SET_COOKIE, value);
    }
    Ok(kept)
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
