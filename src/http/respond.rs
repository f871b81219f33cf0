//! The edge of the stream path: the one place where the admission stack's outcome becomes an
//! answer. A session gets its 101 and its task; a refusal gets its HTTP status (or a 101, a
//! JSON error frame and a close code), is counted once and logged once.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::Instrument;

use super::layers::{Admission, ClientInfo, HandshakeRefusal};
use super::{Body, Proxy};
use crate::admission::{ConnectionGuard, SessionPermit};
use crate::client::{client_address, is_trusted, ClientKey};
use crate::close::{CloseReason, RequestId};
use crate::metrics::Rejection;
use crate::registry::{Replica, SessionGuard};
use crate::session::{self, ClientTls, Peer, Session, Transport};
use crate::upstream::{accept_key, Upstream, UpstreamStream};
use crate::uring::Ring;

/// A request that joined a replica: everything its session needs.
pub struct Admitted {
    pub replica: Arc<Replica>,
    pub slot: SessionGuard,
    pub upstream: Upstream,
    pub handshake: Duration,
    pub permit: Option<SessionPermit>,
}

/// Why an upgrade request gets no session. Typed until here; turned into words only when the
/// answer is written.
pub enum Refusal {
    /// Not a WebSocket upgrade the router takes.
    BadHandshake(HandshakeRefusal),
    /// The router is draining.
    Draining,
    /// A session limit (router-wide or the client's).
    Limit(Rejection),
    /// The replica answered the upgrade with a 4xx.
    ReplicaRejected {
        replica: Arc<Replica>,
        status: StatusCode,
    },
    /// No session after all: the client gets a 101, a JSON error frame and a close code.
    /// `permit` is held until that is done.
    Unavailable {
        reason: CloseReason,
        detail: Option<String>,
        permit: Option<SessionPermit>,
    },
}

impl Refusal {
    /// The label it is counted under.
    pub fn rejection(&self) -> Rejection {
        match self {
            Refusal::BadHandshake(_) => Rejection::BadHandshake,
            Refusal::Draining => Rejection::Draining,
            Refusal::Limit(limit) => *limit,
            Refusal::ReplicaRejected { .. } => Rejection::ReplicaRefused,
            Refusal::Unavailable { reason, .. } => match reason {
                CloseReason::NoHealthyReplica => Rejection::NoHealthyReplica,
                CloseReason::AtCapacity => Rejection::AtCapacity,
                CloseReason::RouterOverloaded => Rejection::RouterOverloaded,
                _ => Rejection::ConnectFailed,
            },
        }
    }
}

impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(crate::metrics::Label::label(self.rejection()))
    }
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) fn error_body(code: &str, message: &str, request_id: Option<RequestId>) -> Value {
    let mut body = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = request_id {
        body["request_id"] = id.to_string().into();
    }
    body
}

/// The edge service of the stream path, around the admission stack `inner`; `C` is the
/// client connection's transport (TCP, or TLS), which its session takes over.
pub struct OpenSession<S, C> {
    inner: S,
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    connection: Arc<ConnectionGuard>,
    transport: PhantomData<fn() -> C>,
}

impl<S: Clone, C> Clone for OpenSession<S, C> {
    fn clone(&self) -> Self {
        OpenSession {
            inner: self.inner.clone(),
            proxy: self.proxy.clone(),
            peer: self.peer,
            connection: self.connection.clone(),
            transport: PhantomData,
        }
    }
}

impl<S, C> OpenSession<S, C> {
    pub fn new(
        inner: S,
        proxy: Arc<Proxy>,
        peer: SocketAddr,
        connection: Arc<ConnectionGuard>,
    ) -> Self {
        OpenSession {
            inner,
            proxy,
            peer,
            connection,
            transport: PhantomData,
        }
    }
}

impl<S, B, C> tower::Service<Request<B>> for OpenSession<S, C>
where
    S: tower::Service<Box<Admission>, Response = Admitted, Error = Refusal>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
    C: Transport + AsyncRead + AsyncWrite + Unpin,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let upgrade = hyper::upgrade::on(&mut request);
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .copied()
            .unwrap_or_else(RequestId::next);
        let (parts, _body) = request.into_parts();
        let client = {
            let settings = self.proxy.settings.load();
            let addr = client_address(self.peer.ip(), &parts.headers, &settings.trusted_proxies);
            let forwarded_for = is_trusted(self.peer.ip(), &settings.trusted_proxies)
                .then(|| crate::client::forwarded_for(&parts.headers))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .map(Box::from);
            ClientInfo {
                request_id,
                peer: self.peer,
                addr,
                key: ClientKey::from(addr),
                forwarded_for,
                connection: self.connection.clone(),
            }
        };
        let key = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned();
        let admission = Box::new(Admission {
            parts,
            client: client.clone(),
            permit: None,
            candidates: Vec::new(),
        });
        let (inner, proxy) = (self.inner.clone(), self.proxy.clone());
        Box::pin(async move {
            let accept = || {
                key.as_ref()
                    .map(|k| accept_key(k.as_bytes()))
                    .unwrap_or_default()
            };
            let response = match inner.oneshot(admission).await {
                Ok(admitted) => open::<C>(&proxy, client, upgrade, admitted, &accept()),
                Err(refusal) => refuse::<C>(&proxy, client, upgrade, refusal, accept),
            };
            Ok(response)
        })
    }
}

fn peer_of(client: &ClientInfo) -> Peer {
    Peer {
        request_id: client.request_id,
        addr: client.peer.ip(),
        forwarded_for: client.forwarded_for.clone(),
        started: Instant::now(),
    }
}

/// Answer 101 and start the session.
fn open<C: Transport + AsyncRead + AsyncWrite + Unpin>(
    proxy: &Arc<Proxy>,
    client: ClientInfo,
    upgrade: hyper::upgrade::OnUpgrade,
    admitted: Admitted,
    accept: &str,
) -> Response<Body> {
    let Admitted {
        replica,
        slot,
        upstream,
        handshake,
        permit,
    } = admitted;
    replica.count_session(handshake);
    proxy.metrics.handshake_seconds.observe(handshake);
    let mut response = switching_protocols(accept, client.request_id);
    for (name, value) in &upstream.response_headers {
        response.headers_mut().append(name.clone(), value.clone());
    }
    tracing::debug!(replica = %replica.name, "session open");
    let session = Session {
        peer: Box::new(peer_of(&client)),
        replica,
        slot,
        permit,
        connection: client.connection,
    };
    let opening = session::Opening {
        context: proxy.session_context.clone(),
        session,
        compression: upstream.compression,
    };
    let leftover = upstream.leftover;
    // Plain TCP on both sides goes on the worker's ring when the data plane is io_uring.
    let ring = || {
        (proxy.io_uring && C::PLAIN_TCP)
            .then(Ring::current)
            .flatten()
    };
    match upstream.stream {
        UpstreamStream::Tcp(stream) => match ring() {
            Some(ring) => spawn(session::run_on_ring(
                opening, upgrade, stream, leftover, ring,
            )),
            None => spawn(session::run::<C, TcpStream>(
                opening, upgrade, stream, leftover,
            )),
        },
        UpstreamStream::Tls(stream) => spawn(session::run::<C, ClientTls>(
            opening, upgrade, *stream, leftover,
        )),
    }
    response
}

/// Spawn a session. The request's span follows it only when the span is on: a span costs
/// every open session room, and nothing when it is off.
fn spawn(task: impl Future<Output = ()> + Send + 'static) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        tokio::spawn(task);
    } else {
        tokio::spawn(task.instrument(span));
    }
}

/// The answer to a refusal; counted and logged here, and nowhere else.
fn refuse<C: Transport + AsyncRead + AsyncWrite + Unpin>(
    proxy: &Arc<Proxy>,
    client: ClientInfo,
    upgrade: hyper::upgrade::OnUpgrade,
    refusal: Refusal,
    accept: impl FnOnce() -> String,
) -> Response<Body> {
    proxy.metrics.rejected.add(refusal.rejection());
    let request_id = client.request_id;
    let log = |status: StatusCode, reason: &str| {
        tracing::info!(
            target: "wsrouter::access",
            %request_id,
            peer = %client.peer.ip(),
            forwarded_for = %client.forwarded_for.as_deref().unwrap_or("-"),
            path = %proxy.settings.load().stream_path,
            status = status.as_u16(),
            reason = %reason,
            "request refused"
        );
    };
    let (status, body) = match refusal {
        Refusal::BadHandshake(HandshakeRefusal { status, message }) => {
            log(status, "bad_handshake");
            let mut response = json_response(
                status,
                &error_body("bad_handshake", message, Some(request_id)),
            );
            let headers = response.headers_mut();
            if status == StatusCode::UPGRADE_REQUIRED || status == StatusCode::BAD_REQUEST {
                headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            if status == StatusCode::UPGRADE_REQUIRED {
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            }
            return with_request_id(response, request_id);
        }
        Refusal::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            ("draining", "the router is shutting down"),
        ),
        Refusal::Limit(Rejection::ClientSessionLimit) => (
            StatusCode::SERVICE_UNAVAILABLE,
            (
                "client_session_limit",
                "this client holds as many sessions as it may",
            ),
        ),
        Refusal::Limit(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            ("session_limit", "the router is at its session limit"),
        ),
        Refusal::ReplicaRejected { replica, status } => {
            log(status, "replica_refused");
            tracing::info!(%request_id, replica = %replica.name, status = status.as_u16(), "the replica refused the upgrade");
            let message = format!(
                "the worker refused the session with HTTP {}",
                status.as_u16()
            );
            let response = json_response(
                status,
                &error_body("upstream_refused", &message, Some(request_id)),
            );
            return with_request_id(response, request_id);
        }
        Refusal::Unavailable {
            reason,
            detail,
            permit,
        } => {
            let context = proxy.session_context.clone();
            let peer = peer_of(&client);
            let connection = client.connection.clone();
            tokio::spawn(async move {
                session::refuse::<C>(context, upgrade, peer, reason, detail, permit).await;
                drop(connection);
            });
            return switching_protocols(&accept(), request_id);
        }
    };
    log(status, body.0);
    let mut response = json_response(status, &error_body(body.0, body.1, Some(request_id)));
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    with_request_id(response, request_id)
}

fn with_request_id(mut response: Response<Body>, request_id: RequestId) -> Response<Body> {
    if let Ok(value) = HeaderValue::from_str(&request_id.to_string()) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

fn switching_protocols(accept: &str, request_id: RequestId) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    with_request_id(response, request_id)
}
