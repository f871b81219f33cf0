//! An in-process echo replica: `GET /health` and a WebSocket at `/v1/stream` that sends every
//! frame back as it came (same type, same fragmentation). Used by `wsrouter demo`, the tests
//! and the load tools. Its health answer reports its load as the reference streaming server
//! does: `{"status":"ok","sessions":N}` (plus `max_sessions` when set, and `"draining"`).
//!
//! A text message `close:<code>:<reason>` makes it close the session with that code, so tests
//! can check that replica close codes reach the client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocket};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the replica saw of the last upgrade request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub uri: String,
    pub headers: HeaderMap,
}

struct Shared {
    health_status: AtomicU16,
    last_request: Mutex<Option<SeenRequest>>,
    upgrade_delay_ms: AtomicU64,
    open_sessions: AtomicUsize,
    close_codes: Mutex<Vec<u16>>,
    health_checks: AtomicU64,
    connections: AtomicU64,
    /// Reported in the health answer when non-zero.
    reported_max_sessions: AtomicU64,
    draining: std::sync::atomic::AtomicBool,
}

pub struct EchoReplica {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl EchoReplica {
    /// Start on 127.0.0.1 with a free port.
    pub async fn start() -> std::io::Result<EchoReplica> {
        EchoReplica::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> std::io::Result<EchoReplica> {
        EchoReplica::start_with(addr, None).await
    }

    /// Start on 127.0.0.1 with a free port, speaking TLS with `tls` (which may ask clients
    /// for a certificate).
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> std::io::Result<EchoReplica> {
        EchoReplica::start_with("127.0.0.1:0".parse().unwrap(), Some(tls)).await
    }

    async fn start_with(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<EchoReplica> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            health_status: AtomicU16::new(200),
            last_request: Mutex::new(None),
            upgrade_delay_ms: AtomicU64::new(0),
            open_sessions: AtomicUsize::new(0),
            close_codes: Mutex::new(Vec::new()),
            health_checks: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            reported_max_sessions: AtomicU64::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        let (stop, stop_rx) = watch::channel(false);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(accept_loop(listener, tls, shared.clone(), stop_rx));
        Ok(EchoReplica {
            addr,
            scheme,
            shared,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The status `/health` answers with from now on (200 by default).
    pub fn set_health_status(&self, status: u16) {
        self.shared.health_status.store(status, Ordering::Relaxed);
    }

    /// Report `max_sessions` in the health answer from now on (`None`: report none).
    pub fn set_reported_max_sessions(&self, max: Option<u64>) {
        self.shared
            .reported_max_sessions
            .store(max.unwrap_or(0), Ordering::Relaxed);
    }

    /// Answer `"status":"draining"` to health checks from now on (sessions are still served).
    pub fn set_draining(&self, draining: bool) {
        self.shared.draining.store(draining, Ordering::Relaxed);
    }

    pub fn last_request(&self) -> Option<SeenRequest> {
        self.shared.last_request.lock().unwrap().clone()
    }

    /// Answer upgrade requests only after `delay` (a slow worker).
    pub fn set_upgrade_delay(&self, delay: Duration) {
        self.shared
            .upgrade_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// WebSocket sessions currently open on this replica.
    pub fn open_sessions(&self) -> usize {
        self.shared.open_sessions.load(Ordering::Relaxed)
    }

    /// `GET /health` requests answered so far.
    pub fn health_checks(&self) -> u64 {
        self.shared.health_checks.load(Ordering::Relaxed)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Close codes received from peers, in arrival order (1005 for a Close without a code).
    pub fn close_codes(&self) -> Vec<u16> {
        self.shared.close_codes.lock().unwrap().clone()
    }

    /// Die abruptly: stop listening and drop every connection without a close frame.
    pub fn kill(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for EchoReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let _ = stream.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let session_stop = stop.clone();
        let mut conn_stop = stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let stop = session_stop.clone();
                async move {
                    let delay = shared.upgrade_delay_ms.load(Ordering::Relaxed);
                    if delay > 0 && req.uri().path() != "/health" {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    Ok::<_, std::convert::Infallible>(handle(req, shared, stop))
                }
            });
            let serve = async move {
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    }
                    Some(tls) => {
                        if let Ok(stream) = tls.accept(stream).await {
                            let _ = http
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await;
                        }
                    }
                }
            };
            tokio::select! {
                () = serve => {}
                _ = conn_stop.wait_for(|s| *s) => {}
            }
        });
    }
}

fn handle(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/health" => {
            shared.health_checks.fetch_add(1, Ordering::Relaxed);
            let status = StatusCode::from_u16(shared.health_status.load(Ordering::Relaxed))
                .unwrap_or(StatusCode::OK);
            let mut report = serde_json::json!({
                "status": if shared.draining.load(Ordering::Relaxed) { "draining" } else { "ok" },
                "sessions": shared.open_sessions.load(Ordering::Relaxed),
            });
            let max = shared.reported_max_sessions.load(Ordering::Relaxed);
            if max > 0 {
                report["max_sessions"] = max.into();
            }
            let mut response = Response::new(Full::new(Bytes::from(report.to_string())));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        // Any path: a router may serve its stream path under another name.
        _ if fastwebsockets::upgrade::is_upgrade_request(&req) => {
            *shared.last_request.lock().unwrap() = Some(SeenRequest {
                uri: req.uri().to_string(),
                headers: req.headers().clone(),
            });
            let protocol = req
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(|p| p.trim().to_string());
            let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
                Ok(pair) => pair,
                Err(_) => {
                    let mut response = Response::new(Full::new(Bytes::from_static(b"bad upgrade")));
                    *response.status_mut() = StatusCode::BAD_REQUEST;
                    return response;
                }
            };
            tokio::spawn(async move {
                let mut stop = stop;
                if let Ok(ws) = upgrade.await {
                    shared.open_sessions.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = echo(ws, &shared) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                    shared.open_sessions.fetch_sub(1, Ordering::Relaxed);
                }
            });
            let (parts, _) = response.into_parts();
            let mut response = Response::from_parts(parts, Full::new(Bytes::new()));
            if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
                response
                    .headers_mut()
                    .insert(header::SEC_WEBSOCKET_PROTOCOL, p);
            }
            response
        }
        _ => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"not found")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

async fn echo<S>(
    mut ws: WebSocket<S>,
    shared: &Shared,
) -> Result<(), fastwebsockets::WebSocketError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.set_max_message_size(64 << 20);
    let mut text = FragmentedText::default();
    // auto_close answers Close with the same code; auto_pong answers pings.
    loop {
        let frame = ws.read_frame().await?;
        if !text.accepts(frame.fin, frame.opcode, &frame.payload) {
            ws.write_frame(Frame::close(1007, b"invalid UTF-8")).await?;
            while ws.read_frame().await?.opcode != OpCode::Close {}
            return Ok(());
        }
        match frame.opcode {
            OpCode::Close => {
                let code = match frame.payload.get(..2) {
                    Some(code) => u16::from_be_bytes([code[0], code[1]]),
                    None => 1005,
                };
                shared.close_codes.lock().unwrap().push(code);
                return Ok(());
            }
            OpCode::Ping | OpCode::Pong => continue,
            OpCode::Text if frame.fin && frame.payload.starts_with(b"close:") => {
                let text = String::from_utf8_lossy(&frame.payload[6..]).to_string();
                let (code, reason) = text.split_once(':').unwrap_or((&text, ""));
                let code = code.parse().unwrap_or(1000);
                ws.write_frame(Frame::close(code, reason.as_bytes()))
                    .await?;
                // Wait for the peer's reply, then end.
                while ws.read_frame().await?.opcode != OpCode::Close {}
                return Ok(());
            }
            _ => {
                // A frame read on the server side keeps its mask key: send it back unmasked.
                ws.write_frame(Frame::new(frame.fin, frame.opcode, None, frame.payload))
                    .await?;
            }
        }
    }
}

/// UTF-8 check of a fragmented text message, fragment by fragment, so the replica fails fast
/// on invalid text while still echoing frames as they come (fastwebsockets checks only text
/// frames that are whole messages).
#[derive(Default)]
struct FragmentedText {
    in_message: bool,
    /// The incomplete code point at the end of the previous fragment.
    tail: Vec<u8>,
}

impl FragmentedText {
    fn accepts(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) -> bool {
        match opcode {
            OpCode::Text if !fin => {
                self.in_message = true;
                self.tail.clear();
            }
            OpCode::Continuation if self.in_message => {}
            _ => return true,
        }
        self.tail.extend_from_slice(payload);
        let valid = match std::str::from_utf8(&self.tail) {
            Ok(_) => {
                self.tail.clear();
                true
            }
            Err(e) if e.error_len().is_none() && !fin => {
                self.tail.drain(..e.valid_up_to());
                true
            }
            Err(_) => false,
        };
        if fin {
            self.in_message = false;
        }
        valid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragmented_text_is_checked_across_fragment_boundaries() {
        let euro = "€".as_bytes(); // three bytes
        let mut check = FragmentedText::default();
        assert!(check.accepts(false, OpCode::Text, &euro[..1]));
        assert!(check.accepts(false, OpCode::Continuation, &euro[1..2]));
        assert!(check.accepts(true, OpCode::Continuation, &euro[2..]));

        let mut check = FragmentedText::default();
        assert!(check.accepts(false, OpCode::Text, &euro[..2]));
        assert!(!check.accepts(false, OpCode::Continuation, b"a"));

        // A message may not end inside a code point.
        let mut check = FragmentedText::default();
        assert!(check.accepts(false, OpCode::Text, b"ok"));
        assert!(!check.accepts(true, OpCode::Continuation, &euro[..2]));

        // Binary continuations are not text.
        let mut check = FragmentedText::default();
        assert!(check.accepts(false, OpCode::Binary, &[0xff]));
        assert!(check.accepts(true, OpCode::Continuation, &[0xff]));
    }
}
