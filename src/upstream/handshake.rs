//! The upstream WebSocket handshake: one request head out, one response head back, written
//! and parsed (httparse, as hyper does) straight on the connection, with no client connection
//! task, request channel or upgrade hand-off per session.

use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use bytes::BytesMut;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::StatusCode;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{BoxFuture, ConnectError, Upstream, UpstreamStream};
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
pub fn has_token<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    mut matches: impl FnMut(&str) -> bool,
) -> bool {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .any(|t| matches(t.trim()))
}

/// Whether an extension offer or answer (`name; params`) is permessage-deflate's (RFC 7692).
pub fn is_permessage_deflate(extension: &str) -> bool {
    extension
        .split(';')
        .next()
        .is_some_and(|name| name.trim().eq_ignore_ascii_case("permessage-deflate"))
}

/// The upgrade request a session sends to whichever replica it joins, prepared once: the
/// client's path and query and the headers chosen to go on (see the http side's forwarding
/// rules), already rendered as request-head lines. Host and the handshake's own headers are
/// added per replica.
#[derive(Debug, Clone, Default)]
pub struct UpstreamRequest {
    path_and_query: String,
    /// `name: value\r\n` lines.
    lines: Vec<u8>,
    /// The subprotocols the client offered (its Sec-WebSocket-Protocol values).
    offered_protocols: Vec<HeaderValue>,
    /// permessage-deflate is offered (the only extension passed on).
    offers_compression: bool,
}

impl UpstreamRequest {
    pub fn new(path_and_query: String) -> UpstreamRequest {
        UpstreamRequest {
            path_and_query,
            lines: Vec::with_capacity(512),
            offered_protocols: Vec::new(),
            offers_compression: false,
        }
    }

    /// Add a header line. Names and values were validated by hyper when the client's request
    /// was parsed (or are the router's own), so none can break the framing.
    pub fn push(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == header::SEC_WEBSOCKET_PROTOCOL {
            self.offered_protocols.push(value.clone());
        }
        if name == header::SEC_WEBSOCKET_EXTENSIONS {
            self.offers_compression = true;
        }
        self.push_line(name.as_str(), value.as_bytes());
    }

    /// Add a header line whose value is written by `value` (no allocation on the way).
    pub fn push_with(&mut self, name: &str, value: impl FnOnce(&mut Vec<u8>)) {
        self.lines.extend_from_slice(name.as_bytes());
        self.lines.extend_from_slice(b": ");
        value(&mut self.lines);
        self.lines.extend_from_slice(b"\r\n");
    }

    fn push_line(&mut self, name: &str, value: &[u8]) {
        self.push_with(name, |out| out.extend_from_slice(value));
    }

    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    /// The headers that go on, as (name, value) pairs.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        std::str::from_utf8(&self.lines)
            .unwrap_or("")
            .split_terminator("\r\n")
            .filter_map(|line| line.split_once(": "))
    }

    /// The request head for `replica`, with the handshake `key`, as bytes.
    pub fn head(&self, replica: &Replica, key: &str) -> Vec<u8> {
        let mut head = Vec::with_capacity(192 + self.path_and_query.len() + self.lines.len());
        head.extend_from_slice(b"GET ");
        head.extend_from_slice(self.path_and_query.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(replica.authority.as_bytes());
        head.extend_from_slice(
            b"\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: ",
        );
        head.extend_from_slice(key.as_bytes());
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(&self.lines);
        head.extend_from_slice(b"\r\n");
        head
    }

    /// Whether permessage-deflate is offered to the replica.
    pub fn offers_compression(&self) -> bool {
        self.offers_compression
    }

    /// Whether the client offered the subprotocol `chosen`.
    fn offers_protocol(&self, chosen: &str) -> bool {
        let offered = self.offered_protocols.iter().map(|value| value.as_bytes());
        has_token(offered, |p| p == chosen)
    }
}

/// Largest response head a replica may send for its 101 (interim 1xx heads included).
const MAX_RESPONSE_HEAD_BYTES: usize = 16 * 1024;
/// Most headers a replica's 101 may carry.
const MAX_RESPONSE_HEADERS: usize = 64;

/// The WebSocket handshake over a connector's transport.
#[derive(Debug, Clone)]
pub struct Handshake<C> {
    connector: C,
}

impl<C> Handshake<C> {
    pub fn new(connector: C) -> Handshake<C> {
        Handshake { connector }
    }
}

impl<C> tower::Service<(Arc<Replica>, Arc<UpstreamRequest>)> for Handshake<C>
where
    C: tower::Service<Arc<Replica>, Response = UpstreamStream, Error = ConnectError>
        + Clone
        + Send
        + 'static,
    C::Future: Send,
{
    type Response = Upstream;
    type Error = ConnectError;
    type Future = BoxFuture<Result<Upstream, ConnectError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.connector.poll_ready(cx)
    }

    fn call(&mut self, (replica, request): (Arc<Replica>, Arc<UpstreamRequest>)) -> Self::Future {
        let connect = self.connector.call(replica.clone());
        Box::pin(async move {
            let stream = connect.await?;
            handshake(stream, &replica, &request).await
        })
    }
}

async fn handshake(
    mut stream: UpstreamStream,
    replica: &Replica,
    request: &UpstreamRequest,
) -> Result<Upstream, ConnectError> {
    let key = fastwebsockets::handshake::generate_key();
    stream
        .write_all(&request.head(replica, &key))
        .await
        .map_err(|e| ConnectError::from_io(e, "sending the request"))?;

    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let read = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| ConnectError::from_io(e, "reading the response"))?;
        // Interim answers (100 Continue, 103 Early Hints) come before the real one: skip them.
        while let Some((head_len, status)) = complete_interim(&buf)? {
            let _ = buf.split_to(head_len);
            tracing::debug!(replica = %replica.name, status, "skipped an interim answer");
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let code = response.code.unwrap_or_default();
                let status = StatusCode::from_u16(code)
                    .map_err(|_| ConnectError::BadAnswer(format!("invalid status {code}")))?;
                let (kept, compression) = check_response(status, response.headers, &key, request)?;
                let leftover = buf.split_off(head_len).freeze();
                return Ok(Upstream {
                    stream,
                    leftover,
                    response_headers: kept,
                    compression,
                });
            }
            Ok(httparse::Status::Partial) if read == 0 => {
                return Err(ConnectError::NoAnswer(if buf.is_empty() {
                    "the replica closed the connection without answering".into()
                } else {
                    "the replica closed the connection in the middle of its answer".into()
                }))
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD_BYTES => {
                return Err(ConnectError::BadAnswer(format!(
                    "response head larger than {MAX_RESPONSE_HEAD_BYTES} bytes"
                )))
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(ConnectError::BadAnswer(format!("invalid response: {e}"))),
        }
    }
}

/// A complete interim (1xx other than 101) response at the front of `buf`: its length and
/// status.
fn complete_interim(buf: &[u8]) -> Result<Option<(usize, u16)>, ConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => match response.code {
            Some(code @ 100..=199) if code != 101 => Ok(Some((len, code))),
            _ => Ok(None),
        },
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(ConnectError::BadAnswer(format!("invalid response: {e}"))),
    }
}

/// Check a replica's answer to the upgrade; keep the headers the client's 101 carries over,
/// and say whether permessage-deflate was accepted.
fn check_response(
    status: StatusCode,
    headers: &[httparse::Header<'_>],
    key: &str,
    request: &UpstreamRequest,
) -> Result<(HeaderMap, bool), ConnectError> {
    let bad = |message: String| ConnectError::BadAnswer(message);
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(if status.is_client_error() {
            ConnectError::Rejected(status)
        } else {
            bad(format!("expected HTTP 101, got {}", status.as_u16()))
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
        return Err(bad(
            "101 without Upgrade: websocket / Connection: upgrade".into()
        ));
    }
    let expected = accept_key(key.as_bytes());
    if named("sec-websocket-accept").ne(std::iter::once(expected.as_bytes())) {
        return Err(bad("wrong or missing Sec-WebSocket-Accept".into()));
    }
    let mut kept = HeaderMap::new();
    // One permessage-deflate answer to an offer, its parameters for the endpoints to agree on;
    // nothing else (RFC 6455 9.1: a server may only accept what was offered).
    let mut accepted = named("sec-websocket-extensions");
    let compression = if let Some(answer) = accepted.next() {
        let text = std::str::from_utf8(answer).unwrap_or("");
        let single_deflate = !text.contains(',') && is_permessage_deflate(text);
        if !request.offers_compression() || !single_deflate || accepted.next().is_some() {
            return Err(bad(
                "the replica enabled an extension that was not offered".into()
            ));
        }
        let value = HeaderValue::from_bytes(answer)
            .map_err(|_| bad("invalid Sec-WebSocket-Extensions value".into()))?;
        kept.insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
        true
    } else {
        false
    };
    if let Some(chosen) = named("sec-websocket-protocol").next() {
        let chosen_str = std::str::from_utf8(chosen).unwrap_or("").trim();
        if !request.offers_protocol(chosen_str) {
            return Err(bad(format!(
                "the replica chose subprotocol {chosen_str:?}, which the client did not offer"
            )));
        }
        let value = HeaderValue::from_bytes(chosen)
            .map_err(|_| bad("invalid Sec-WebSocket-Protocol value".into()))?;
        kept.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    for cookie in named("set-cookie") {
        let value =
            HeaderValue::from_bytes(cookie).map_err(|_| bad("invalid Set-Cookie value".into()))?;
        kept.append(header::SET_COOKIE, value);
    }
    Ok((kept, compression))
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

    #[test]
    fn a_replica_may_accept_only_the_permessage_deflate_it_was_offered() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let accept = accept_key(key.as_bytes());
        let answer = |extensions: &[&'static str], offered: bool| {
            let mut request = UpstreamRequest::new("/".into());
            if offered {
                request.push(
                    &header::SEC_WEBSOCKET_EXTENSIONS,
                    &HeaderValue::from_static("permessage-deflate"),
                );
            }
            let mut headers = vec![
                httparse::Header {
                    name: "upgrade",
                    value: b"websocket",
                },
                httparse::Header {
                    name: "connection",
                    value: b"Upgrade",
                },
                httparse::Header {
                    name: "sec-websocket-accept",
                    value: accept.as_bytes(),
                },
            ];
            for value in extensions {
                headers.push(httparse::Header {
                    name: "sec-websocket-extensions",
                    value: value.as_bytes(),
                });
            }
            check_response(StatusCode::SWITCHING_PROTOCOLS, &headers, key, &request)
        };
        let (kept, compression) =
            answer(&["permessage-deflate; server_no_context_takeover"], true).unwrap();
        assert!(compression);
        assert_eq!(
            kept[header::SEC_WEBSOCKET_EXTENSIONS],
            "permessage-deflate; server_no_context_takeover"
        );
        assert!(!answer(&[], true).unwrap().1, "an offer declined");
        for (extensions, offered) in [
            (&["permessage-deflate"][..], false),
            (&["x-webkit-deflate-frame"][..], true),
            (&["permessage-deflate, permessage-deflate"][..], true),
            (&["permessage-deflate", "permessage-deflate"][..], true),
            (&["permessage-deflate, x-other"][..], true),
        ] {
            assert!(
                matches!(answer(extensions, offered), Err(ConnectError::BadAnswer(_))),
                "{extensions:?} (offered: {offered})"
            );
        }
    }

    #[test]
    fn interim_answers_are_recognised_and_101_is_not_one() {
        let continue_then = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n";
        assert_eq!(complete_interim(continue_then).unwrap(), Some((25, 100)));
        assert_eq!(
            complete_interim(b"HTTP/1.1 101 Switching\r\n\r\n").unwrap(),
            None
        );
        assert_eq!(
            complete_interim(b"HTTP/1.1 103 Early\r\nLink: x\r\n").unwrap(),
            None
        );
        assert!(complete_interim(b"garbage\r\n\r\n").is_err());
    }
}
