//! The service stack for one connection, and the routing at its top: the stream path goes
//! down the admission stack; /health, /ready, /status, /metrics and the status page are
//! answered here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use hyper::{Method, Request, Response, StatusCode};
use tower::ServiceBuilder;
use tower_http::trace::TraceLayer;

use super::join::Join;
use super::layers::{
    DrainGateLayer, RequestIdLayer, SelectLayer, SessionPermitLayer, UpgradeCheckLayer,
};
use super::respond::{error_body, json_response, OpenSession};
use super::{admin, Body, Endpoints, Proxy};
use crate::admission::ConnectionGuard;
use crate::close::RequestId;
use crate::session::Transport;
use tokio::io::{AsyncRead, AsyncWrite};

/// The whole stack for a connection from `peer` over the transport `C`.
pub(super) fn stack<B, C>(
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    endpoints: Endpoints,
    connection: Arc<ConnectionGuard>,
) -> impl tower::Service<
    Request<B>,
    Response = Response<impl hyper::body::Body<Data = bytes::Bytes, Error = Infallible> + Send>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
where
    B: hyper::body::Body + Send + 'static,
    C: Transport + AsyncRead + AsyncWrite + Unpin,
{
    let admission = ServiceBuilder::new()
        .layer(UpgradeCheckLayer::new())
        .layer(DrainGateLayer::new(proxy.shutdown.clone()))
        .layer(SessionPermitLayer::new(proxy.sessions.clone()))
        .layer(SelectLayer::new(
            proxy.registry.clone(),
            proxy.settings.clone(),
        ))
        .service(Join::new(
            proxy.registry.clone(),
            proxy.settings.clone(),
            proxy.session_context.clone(),
        ));
    let stream = OpenSession::<_, C>::new(admission, proxy.clone(), peer, connection);
    ServiceBuilder::new()
        .layer(RequestIdLayer)
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |request: &Request<B>| {
                    // Path only: a query string may carry a token.
                    let id = request.extensions().get::<RequestId>().copied();
                    tracing::debug_span!(
                        "request",
                        request_id = %id.map(|id| id.to_string()).unwrap_or_default(),
                        %peer,
                        method = %request.method(),
                        path = request.uri().path(),
                        replica = tracing::field::Empty,
                    )
                })
                .on_request(())
                // A refusal is logged once, where it is made; 5xx is no failure of the stack.
                .on_failure(()),
        )
        .service(Routes {
            proxy,
            stream,
            endpoints,
            peer,
        })
}

/// Routing by path.
#[derive(Clone)]
struct Routes<S> {
    proxy: Arc<Proxy>,
    stream: S,
    endpoints: Endpoints,
    peer: SocketAddr,
}

impl<S, B> tower::Service<Request<B>> for Routes<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<std::future::Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (public, admin_here) = match self.endpoints {
            Endpoints::Public { admin } => (true, admin),
            Endpoints::Admin => (false, true),
        };
        if public && request.uri().path() == self.proxy.settings.load().stream_path {
            return Either::Right(self.stream.call(request));
        }
        let proxy = &self.proxy;
        let response = match (request.method(), request.uri().path()) {
            (&Method::GET, "/health") => admin::health(),
            (&Method::GET, "/ready") => admin::ready(proxy),
            (&Method::GET, "/status") if admin_here => admin::status(proxy),
            (&Method::GET, "/metrics") if admin_here => admin::metrics(proxy),
            (&Method::GET, "/" | "/dashboard") if admin_here => admin::dashboard(),
            _ => {
                let request_id = request.extensions().get::<RequestId>().copied();
                tracing::info!(
                    target: "wsrouter::access",
                    request_id = %request_id.map(|id| id.to_string()).unwrap_or_default(),
                    peer = %self.peer.ip(),
                    path = request.uri().path(),
                    status = 404,
                    reason = %"not_found",
                    "request refused"
                );
                json_response(
                    StatusCode::NOT_FOUND,
                    &error_body("not_found", "no such endpoint", request_id),
                )
            }
        };
        Either::Left(std::future::ready(Ok(response)))
    }
}
