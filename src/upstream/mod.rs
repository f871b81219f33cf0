//! The way to a replica: a connector service (TCP today; where TLS and DNS plug in), the
//! WebSocket handshake on top of it, and one vocabulary for how that fails.
//!
//! The handshake is done before the client gets its 101, so a failure can move on to the
//! next replica and the replica's chosen subprotocol can be passed back.

mod handshake;

pub use handshake::{accept_key, has_token, is_permessage_deflate, Handshake, UpstreamRequest};

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::header::HeaderMap;
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::metrics::ConnectFailure;
use crate::registry::Replica;

/// The transport to a replica: plain TCP, or TLS for `https://` replicas.
pub enum UpstreamStream {
    Tcp(TcpStream),
    // Boxed: rustls' client state is a few hundred bytes.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A replica connection that completed its WebSocket handshake.
pub struct Upstream {
    pub stream: UpstreamStream,
    /// Bytes the replica sent right after its 101, read with the response head.
    pub leftover: Bytes,
    /// Headers to copy into the client's 101: the chosen subprotocol, the accepted
    /// permessage-deflate parameters and any cookies set.
    pub response_headers: HeaderMap,
    /// The replica accepted the client's permessage-deflate offer.
    pub compression: bool,
}

/// How reaching a replica failed. `Display` names the kind in words, which is all a client is
/// told (with the replica's name); [`ConnectError::detail`] is for the log.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused")]
    Refused(#[source] io::Error),
    #[error("timed out")]
    TimedOut,
    #[error("no answer")]
    NoAnswer(String),
    #[error("unreachable")]
    Unreachable(#[source] io::Error),
    #[error("no such host")]
    NoSuchHost(#[source] io::Error),
    #[error("bad answer")]
    BadAnswer(String),
    /// The TLS handshake failed: an untrusted, expired or misnamed certificate, a refused
    /// client certificate, no common protocol.
    #[error("TLS: {0}")]
    Tls(String),
    /// The replica refused this particular request (4xx): its verdict, passed to the client.
    #[error("refused the upgrade with HTTP {}", .0.as_u16())]
    Rejected(StatusCode),
    /// The router's own shortage (descriptors, memory, ports): no replica's fault.
    #[error("router out of resources")]
    Local(#[source] io::Error),
}

impl ConnectError {
    /// A connect error as a kind: refused, unreachable, a local shortage, or "no answer".
    pub fn from_connect(error: io::Error) -> ConnectError {
        if crate::net::is_local_shortage(&error) {
            return ConnectError::Local(error);
        }
        match error.kind() {
            io::ErrorKind::ConnectionRefused => ConnectError::Refused(error),
            io::ErrorKind::TimedOut => ConnectError::TimedOut,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectError::Unreachable(error)
            }
            _ => match error.raw_os_error() {
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => ConnectError::Unreachable(error),
                // A failed name lookup carries no OS error.
                None => ConnectError::NoSuchHost(error),
                Some(_) => ConnectError::NoAnswer(error.to_string()),
            },
        }
    }

    /// A read or write on an established connection failed. Over TLS 1.3 a refused client
    /// certificate shows here, as an alert after the handshake.
    fn from_io(error: io::Error, what: &str) -> ConnectError {
        if crate::net::is_local_shortage(&error) {
            ConnectError::Local(error)
        } else if crate::tls::is_tls_error(&error) {
            ConnectError::Tls(crate::tls::describe(&error))
        } else {
            ConnectError::NoAnswer(format!("{what}: {error}"))
        }
    }

    /// The kind, as counted.
    pub fn kind(&self) -> ConnectFailure {
        match self {
            ConnectError::Refused(_) => ConnectFailure::Refused,
            ConnectError::TimedOut => ConnectFailure::TimedOut,
            ConnectError::NoAnswer(_) => ConnectFailure::NoAnswer,
            ConnectError::Unreachable(_) | ConnectError::NoSuchHost(_) => {
                ConnectFailure::Unreachable
            }
            ConnectError::BadAnswer(_) | ConnectError::Rejected(_) => ConnectFailure::BadAnswer,
            ConnectError::Tls(_) => ConnectFailure::Tls,
            ConnectError::Local(_) => ConnectFailure::Local,
        }
    }

    /// Whether the failure says something about the replica itself, so passive health may
    /// count it: not a per-request answer, and not the router's own shortage.
    pub fn blames_replica(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused(_)
                | ConnectError::TimedOut
                | ConnectError::NoAnswer(_)
                | ConnectError::Unreachable(_)
                | ConnectError::NoSuchHost(_)
                | ConnectError::Tls(_)
        )
    }

    /// The whole story, for the log (may name addresses and OS errors; never sent to clients).
    pub fn detail(&self) -> String {
        match self {
            ConnectError::Refused(e)
            | ConnectError::Unreachable(e)
            | ConnectError::NoSuchHost(e)
            | ConnectError::Local(e) => format!("{self}: {e}"),
            ConnectError::NoAnswer(detail) | ConnectError::BadAnswer(detail) => {
                format!("{self}: {detail}")
            }
            ConnectError::TimedOut | ConnectError::Rejected(_) | ConnectError::Tls(_) => {
                self.to_string()
            }
        }
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Opens the transport to a replica: TCP, then TLS for `https://` replicas (SNI and
/// verification by the replica's settings). A tower service so the layers around it (the
/// connect timeout today; discovery later) stack on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Connector;

impl tower::Service<Arc<Replica>> for Connector {
    type Response = UpstreamStream;
    type Error = ConnectError;
    type Future = BoxFuture<Result<UpstreamStream, ConnectError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, replica: Arc<Replica>) -> Self::Future {
        Box::pin(async move {
            // A host name is looked up once per cycle by the discovery loop; until its first
            // good answer, by the system resolver here.
            let stream = match replica.addresses() {
                Some(addresses) => TcpStream::connect(&addresses[..]).await,
                None => TcpStream::connect(&replica.authority).await,
            }
            .map_err(ConnectError::from_connect)?;
            crate::net::prepare_socket(&stream).map_err(ConnectError::from_connect)?;
            let Some(tls) = &replica.tls else {
                return Ok(UpstreamStream::Tcp(stream));
            };
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            match connector.connect(tls.server_name.clone(), stream).await {
                Ok(stream) => Ok(UpstreamStream::Tls(Box::new(stream))),
                Err(e) if crate::tls::is_tls_error(&e) => {
                    Err(ConnectError::Tls(crate::tls::describe(&e)))
                }
                Err(e) => Err(ConnectError::from_io(e, "TLS handshake")),
            }
        })
    }
}

/// The connector stack for one join: handshake over TCP, bounded by `timeout`.
pub fn connector(
    timeout: std::time::Duration,
) -> impl tower::Service<
    (Arc<Replica>, Arc<UpstreamRequest>),
    Response = Upstream,
    Error = ConnectError,
    Future = impl Future<Output = Result<Upstream, ConnectError>> + Send,
> + Clone
       + Send
       + 'static {
    tower::ServiceBuilder::new()
        .map_err(
            |error: tower::BoxError| match error.downcast::<ConnectError>() {
                Ok(error) => *error,
                // The only other error the stack makes is the timeout's.
                Err(_) => ConnectError::TimedOut,
            },
        )
        .timeout(timeout)
        .service(Handshake::new(Connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_about_the_replica_count_against_it() {
        let refused = ConnectError::from_connect(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(matches!(refused, ConnectError::Refused(_)));
        assert!(refused.blames_replica());
        assert_eq!(refused.to_string(), "connection refused");
        assert!(
            refused.detail().contains("os error 111"),
            "{}",
            refused.detail()
        );
        let emfile = ConnectError::from_connect(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(matches!(emfile, ConnectError::Local(_)));
        assert!(!emfile.blames_replica());
        assert!(!ConnectError::BadAnswer("expected HTTP 101, got 500".into()).blames_replica());
        assert!(!ConnectError::Rejected(StatusCode::FORBIDDEN).blames_replica());
        assert!(ConnectError::TimedOut.blames_replica());
        let unreachable =
            ConnectError::from_connect(io::Error::from_raw_os_error(libc::EHOSTUNREACH));
        assert_eq!(unreachable.kind(), ConnectFailure::Unreachable);
    }
}
