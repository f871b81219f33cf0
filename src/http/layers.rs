//! The admission layers of the stream path, outermost first: upgrade check, drain gate,
//! session permit, replica selection. Each is a check on an [`Admission`] that either passes
//! it on (maybe adding to it) or refuses it; the join at the bottom completes it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use base64::Engine;
use futures_util::future::Either;
use hyper::header::{self, HeaderMap};
use hyper::http::request::Parts;
use hyper::{Method, Request, StatusCode};
use tokio::sync::watch;

use super::respond::Refusal;
use super::HttpSettings;
use crate::admission::{ConnectionGuard, SessionGate, SessionPermit};
use crate::balance::NoCandidate;
use crate::client::ClientKey;
use crate::close::{CloseReason, RequestId};
use crate::registry::{Registry, Replica};
use crate::upstream::has_token;

/// Who is asking, as the stream path sees it.
#[derive(Clone)]
pub struct ClientInfo {
    pub request_id: RequestId,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The client's address: the peer, or what a trusted proxy says in X-Forwarded-For.
    pub addr: IpAddr,
    pub key: ClientKey,
    /// X-Forwarded-For from a trusted proxy, for the access log.
    pub forwarded_for: Option<Box<str>>,
    /// The connection's place under the connection limits; a session holds it too.
    pub connection: Arc<ConnectionGuard>,
}

/// An upgrade request on its way through the admission layers (boxed as it goes: each layer
/// passes it on, and a box moves in one word).
pub struct Admission {
    pub parts: Parts,
    pub client: ClientInfo,
    /// Taken by the session permit layer; moves into the session.
    pub permit: Option<SessionPermit>,
    /// Filled by the select layer, best first.
    pub candidates: Candidates,
}

/// The replicas a session may try, best first.
pub type Candidates = Vec<Arc<Replica>>;

/// A check one layer makes.
pub trait Check: Clone {
    fn check(&self, admission: &mut Admission) -> Result<(), Refusal>;
}

/// A layer that runs a [`Check`] before its inner service.
#[derive(Clone)]
pub struct CheckLayer<C>(C);

/// The service a [`CheckLayer`] makes.
#[derive(Clone)]
pub struct Checked<S, C> {
    inner: S,
    check: C,
}

impl<S, C: Clone> tower::Layer<S> for CheckLayer<C> {
    type Service = Checked<S, C>;
    fn layer(&self, inner: S) -> Checked<S, C> {
        Checked {
            inner,
            check: self.0.clone(),
        }
    }
}

impl<S, C> tower::Service<Box<Admission>> for Checked<S, C>
where
    S: tower::Service<Box<Admission>, Error = Refusal>,
    C: Check,
{
    type Response = S::Response;
    type Error = Refusal;
    type Future = Either<std::future::Ready<Result<S::Response, Refusal>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut admission: Box<Admission>) -> Self::Future {
        match self.check.check(&mut admission) {
            Ok(()) => Either::Right(self.inner.call(admission)),
            Err(refusal) => Either::Left(std::future::ready(Err(refusal))),
        }
    }
}

/// Why a request is not a WebSocket upgrade the router takes, with the status it earns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRefusal {
    pub status: StatusCode,
    pub message: &'static str,
}

fn refuse(status: StatusCode, message: &'static str) -> Result<(), HandshakeRefusal> {
    Err(HandshakeRefusal { status, message })
}

/// Whether a comma-separated header contains `token` (case-insensitive), in any of its values.
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    let values = headers.get_all(name).into_iter().map(|v| v.as_bytes());
    has_token(values, |t| t.eq_ignore_ascii_case(token))
}

/// Check that a request is a WebSocket opening handshake the router takes (RFC 6455 4.2.1):
/// an upgrade (426), by GET (405), over HTTP/1.1 (400), version 13 with one 16-byte key
/// (400), without a body (400) and without an expectation the router cannot meet (417).
pub fn check_upgrade(
    method: &Method,
    version: hyper::Version,
    headers: &HeaderMap,
) -> Result<(), HandshakeRefusal> {
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint only accepts WebSocket upgrades",
        );
    }
    if method != Method::GET {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket upgrade must use GET",
        );
    }
    if version != hyper::Version::HTTP_11 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs HTTP/1.1",
        );
    }
    match headers.get(header::SEC_WEBSOCKET_VERSION) {
        Some(v) if v == "13" => {}
        _ => return refuse(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13"),
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
        return refuse(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be one base64-encoded 16-byte value",
        );
    }
    // An upgrade request has no body: a body (or a promise of one) is smuggling material.
    let content_length_zero = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .all(|v| v.as_bytes() == b"0");
    if headers.contains_key(header::TRANSFER_ENCODING) || !content_length_zero {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade must not carry a body",
        );
    }
    // "100-continue" promises a body there cannot be: dropped, never passed on. Anything else
    // asks for what the router does not do.
    for expect in headers.get_all(header::EXPECT) {
        if !expect.as_bytes().eq_ignore_ascii_case(b"100-continue") {
            return refuse(
                StatusCode::EXPECTATION_FAILED,
                "the only expectation taken is 100-continue",
            );
        }
    }
    Ok(())
}

/// 426 / 405 / 400 / 417 for what is not a WebSocket upgrade.
#[derive(Clone, Default)]
pub struct UpgradeCheck;

impl Check for UpgradeCheck {
    fn check(&self, admission: &mut Admission) -> Result<(), Refusal> {
        let parts = &admission.parts;
        check_upgrade(&parts.method, parts.version, &parts.headers).map_err(Refusal::BadHandshake)
    }
}

pub type UpgradeCheckLayer = CheckLayer<UpgradeCheck>;

impl UpgradeCheckLayer {
    pub fn new() -> UpgradeCheckLayer {
        CheckLayer(UpgradeCheck)
    }
}

impl Default for UpgradeCheckLayer {
    fn default() -> Self {
        UpgradeCheckLayer::new()
    }
}

/// 503 while the router drains.
#[derive(Clone)]
pub struct DrainGate {
    shutdown: watch::Receiver<bool>,
}

impl Check for DrainGate {
    fn check(&self, _: &mut Admission) -> Result<(), Refusal> {
        if *self.shutdown.borrow() {
            return Err(Refusal::Draining);
        }
        Ok(())
    }
}

pub type DrainGateLayer = CheckLayer<DrainGate>;

impl DrainGateLayer {
    pub fn new(shutdown: watch::Receiver<bool>) -> DrainGateLayer {
        CheckLayer(DrainGate { shutdown })
    }
}

/// A session permit (router-wide and per client) or 503 with Retry-After.
#[derive(Clone)]
pub struct SessionPermits {
    gate: Arc<SessionGate>,
}

impl Check for SessionPermits {
    fn check(&self, admission: &mut Admission) -> Result<(), Refusal> {
        let permit = self
            .gate
            .acquire(admission.client.key)
            .map_err(Refusal::Limit)?;
        admission.permit = Some(permit);
        Ok(())
    }
}

pub type SessionPermitLayer = CheckLayer<SessionPermits>;

impl SessionPermitLayer {
    pub fn new(gate: Arc<SessionGate>) -> SessionPermitLayer {
        CheckLayer(SessionPermits { gate })
    }
}

/// The candidates for this request, from the lock-free snapshot; none: gpu_unavailable.
#[derive(Clone)]
pub struct Select {
    registry: Arc<Registry>,
    settings: Arc<ArcSwap<HttpSettings>>,
}

impl Check for Select {
    fn check(&self, admission: &mut Admission) -> Result<(), Refusal> {
        let settings = self.settings.load();
        let balancer = &settings.balancer;
        let key = balancer.session_key(&admission.parts);
        match balancer.candidates(&self.registry.snapshot(), key) {
            Ok(candidates) => {
                admission.candidates = candidates.into_iter().map(|r| r.replica.clone()).collect();
                Ok(())
            }
            Err(none) => Err(Refusal::Unavailable {
                reason: match none {
                    NoCandidate::NoHealthyReplica => CloseReason::NoHealthyReplica,
                    NoCandidate::AllAtCapacity => CloseReason::AtCapacity,
                },
                detail: None,
                permit: admission.permit.take(),
            }),
        }
    }
}

pub type SelectLayer = CheckLayer<Select>;

impl SelectLayer {
    pub fn new(registry: Arc<Registry>, settings: Arc<ArcSwap<HttpSettings>>) -> SelectLayer {
        CheckLayer(Select { registry, settings })
    }
}

/// Gives every request an id (in its extensions), before anything logs about it.
#[derive(Clone, Default)]
pub struct RequestIdLayer;

#[derive(Clone)]
pub struct WithRequestId<S>(S);

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = WithRequestId<S>;
    fn layer(&self, inner: S) -> WithRequestId<S> {
        WithRequestId(inner)
    }
}

impl<S, B> tower::Service<Request<B>> for WithRequestId<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        request.extensions_mut().insert(RequestId::next());
        self.0.call(request)
    }
}
