//! Test harness: a real router on 127.0.0.1:0 in front of real replicas, and a real
//! WebSocket client. Every wait is bounded.
#![allow(dead_code)]

pub mod dns;
pub mod pki;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocket};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wsrouter::registry::{Registry, Status};
use wsrouter::{Config, Drain, Router};

pub const WAIT: Duration = Duration::from_secs(10);

/// Await `fut`, failing the test if it takes longer than `WAIT`.
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Poll `check` until it holds (bounded): for state that changes on its own schedule.
pub async fn until(what: &str, mut check: impl FnMut() -> bool) {
    bounded(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

pub struct TestRouter {
    pub addr: SocketAddr,
    /// The admin listener's address, when the config sets one.
    pub admin: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Drain>>,
}

/// Replicas section for `urls` (the first is primary when `primary_first`).
pub fn replicas_toml(urls: &[String], primary_first: bool) -> String {
    urls.iter()
        .enumerate()
        .map(|(i, u)| {
            format!(
                "[[replicas]]\nname = \"r{i}\"\nurl = \"{u}\"\nprimary = {}\n",
                primary_first && i == 0
            )
        })
        .collect()
}

/// `extra` with `defaults` for `table`: put at the top of `extra`'s own `[table]` if it has
/// one (TOML allows a table once), else as a table of their own.
pub fn with_table(extra: &str, table: &str, defaults: &str) -> String {
    let header = format!("[{table}]\n");
    // The keys `extra` sets in its own `[table]`: those are not defaulted.
    let own: Vec<&str> = extra
        .lines()
        .skip_while(|l| l.trim() != header.trim())
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .map(|l| l.split('=').next().unwrap_or("").trim())
        .collect();
    let defaults: Vec<&str> = defaults
        .lines()
        .filter(|line| !own.contains(&line.split('=').next().unwrap_or("").trim()))
        .collect();
    let defaults = defaults.join("\n");
    if extra.contains(&header) {
        extra.replacen(&header, &format!("{header}{defaults}\n"), 1)
    } else {
        format!("{header}{defaults}\n{extra}")
    }
}

/// A config with fast health checks on 127.0.0.1:0; `extra` is spliced in before the replicas
/// (its own `[listen]` or `[health_check]` keys join the defaults here).
pub fn config(urls: &[String], extra: &str) -> Config {
    let extra = with_table(extra, "listen", "host = \"127.0.0.1\"\nport = 0");
    let extra = with_table(
        &extra,
        "health_check",
        "interval_seconds = 0.05\ntimeout_seconds = 0.5\nfailure_threshold = 2\nrecovery_threshold = 2",
    );
    let text = format!("{extra}\n{}", replicas_toml(urls, true));
    Config::parse(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

impl TestRouter {
    pub async fn start(config: Config) -> TestRouter {
        let router = Router::bind(config).await.expect("bind router");
        TestRouter::run(router)
    }

    pub fn run(router: Router) -> TestRouter {
        let addr = router.local_addr();
        let admin = router.admin_addr();
        let registry = router.registry();
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(router.serve(async {
            let _ = stop_rx.await;
        }));
        TestRouter {
            addr,
            admin,
            registry,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn status_of(&self, index: usize) -> Status {
        self.registry.snapshot().replicas[index].health.status
    }

    pub async fn wait_status(&self, index: usize, status: Status) {
        until(&format!("replica {index} to be {status:?}"), || {
            self.status_of(index) == status
        })
        .await;
    }

    /// Trigger the drain and wait for `serve` to return.
    pub async fn shutdown(&mut self) -> Drain {
        let _ = self.stop.take().expect("running").send(());
        bounded("router shutdown", self.task.take().unwrap())
            .await
            .expect("serve task")
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/stream", self.addr)
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

pub type Client = WebSocket<TokioIo<Upgraded>>;

/// Open a WebSocket to `addr` at `path` with extra headers; returns the socket and the 101.
pub async fn connect_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, hyper::Response<hyper::body::Incoming>), fastwebsockets::WebSocketError> {
    connect_from("127.0.0.1", addr, path, headers).await
}

/// A TCP connection to `addr` from the loopback address `source` (127.0.0.x): the router sees
/// a different client for each.
pub async fn tcp_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(addr).await
}

/// As [`connect_with`], from the loopback address `source`.
pub async fn connect_from(
    source: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, hyper::Response<hyper::body::Incoming>), fastwebsockets::WebSocketError> {
    let stream = tcp_from(source, addr).await.expect("tcp connect");
    websocket_with(stream, &addr.to_string(), path, headers).await
}

pub async fn connect(addr: SocketAddr) -> Client {
    bounded("websocket connect", connect_with(addr, "/v1/stream", &[]))
        .await
        .expect("websocket handshake")
        .0
}

pub async fn read(ws: &mut Client) -> Frame<'static> {
    bounded("a frame", ws.read_frame())
        .await
        .expect("read frame")
}

pub fn close_code(frame: &Frame) -> (u16, String) {
    assert_eq!(frame.opcode, OpCode::Close, "expected a close frame");
    let code = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
    (
        code,
        String::from_utf8_lossy(&frame.payload[2..]).to_string(),
    )
}

/// Read the JSON error frame and the close that follows it.
pub async fn read_error_and_close(ws: &mut Client) -> (serde_json::Value, u16, String) {
    let frame = read(ws).await;
    assert_eq!(
        frame.opcode,
        OpCode::Text,
        "expected the JSON error frame first"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&frame.payload).expect("error frame is JSON");
    let close = read(ws).await;
    let (code, reason) = close_code(&close);
    (json, code, reason)
}

/// A free loopback port with nothing listening on it.
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Send a raw HTTP request and return the response head only (for answers that keep the
/// connection, such as a 101).
pub async fn raw_head(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    bounded("a response head", async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read_u8().await {
                Ok(byte) => head.push(byte),
                Err(_) => break,
            }
        }
    })
    .await;
    String::from_utf8_lossy(&head).to_string()
}

/// Send a raw HTTP request and return the status line and the full response text.
pub async fn raw_http(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    bounded("raw http response", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    // Stop at the end of a response with Content-Length.
                    let text = String::from_utf8_lossy(&out);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text[..head_end].lines().find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        });
                        if let Some(len) = len {
                            if out.len() >= head_end + 4 + len {
                                break;
                            }
                        }
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).to_string()
}

/// How a [`raw_replica`] answers WebSocket upgrades.
#[derive(Clone, Copy)]
pub enum RawMode {
    /// Complete the handshake, then send binary frames as fast as the socket takes them.
    Stream,
    /// Answer 101 with a wrong Sec-WebSocket-Accept (a replica that lies).
    WrongAccept,
    /// Answer with this HTTP status instead of upgrading.
    Status(u16),
    /// Read the request and never answer (a hung worker).
    Silent,
    /// Read the request, then close the connection (a worker dying during the handshake).
    Hangup,
    /// Complete the handshake, then read everything and never write (not even pongs).
    Mute,
    /// Answer with this head (`{accept}` replaced by the right Sec-WebSocket-Accept) and
    /// these bytes in one write, then keep the connection open without writing more.
    Answer(&'static str, &'static [u8]),
    /// Like `Answer`, but one byte per write with a pause between them.
    Dribble(&'static str, &'static [u8]),
    /// An interim 103 answer, then a valid 101, then a text frame "hello".
    Interim,
}

/// The `Sec-WebSocket-Accept` answering the key in a raw request head.
/// The 101 a replica answers the upgrade request `head` with.
pub fn switching_protocols(head: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        accept_for(head)
    )
}

/// Read an HTTP head (request or response) byte by byte, so nothing after it is consumed;
/// `None` if the stream ends or fails first.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.ok()?);
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// Accept one connection on `listener`, read its upgrade request and answer 101.
pub async fn accept_one_upgrade(listener: &tokio::net::TcpListener) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let (mut stream, _) = listener.accept().await.unwrap();
    let head = read_head(&mut stream).await.unwrap();
    let response = switching_protocols(&head);
    stream.write_all(response.as_bytes()).await.unwrap();
    stream
}

pub fn accept_for(head: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("sec-websocket-key:")
                .then(|| l[18..].trim().to_string())
        })
        .unwrap_or_default();
    wsrouter::upstream::accept_key(key.as_bytes())
}

/// A hand-written replica on 127.0.0.1 for behaviour the echo replica cannot show. It answers
/// `GET /health` with 200 (and closes), so a real HTTP probe finds it healthy.
pub async fn raw_replica(mode: RawMode) -> SocketAddr {
    raw_replica_with(move |_| mode).await
}

/// A [`raw_replica`] that picks its answer per request head.
pub async fn raw_replica_with(
    choose: impl Fn(&str) -> RawMode + Send + Sync + 'static,
) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let choose = Arc::new(choose);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let choose = choose.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                if head.starts_with("GET /health ") {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    return;
                }
                let mode = choose(&head);
                let accept = accept_for(&head);
                match mode {
                    RawMode::Silent => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    RawMode::Hangup => return,
                    _ => {}
                }
                let response = match mode {
                    RawMode::Silent | RawMode::Hangup => unreachable!(),
                    RawMode::Interim => {
                        let mut answer = format!("HTTP/1.1 103 Early Hints\r\nlink: </x>; rel=preload\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n").into_bytes();
                        answer.extend_from_slice(b"\x81\x05hello");
                        if stream.write_all(&answer).await.is_ok() {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        return;
                    }
                    RawMode::Answer(head, then) => {
                        let mut answer = head.replace("{accept}", &accept).into_bytes();
                        answer.extend_from_slice(then);
                        if stream.write_all(&answer).await.is_ok() {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        return;
                    }
                    RawMode::Dribble(head, then) => {
                        let head = head.replace("{accept}", &accept);
                        for &byte in head.as_bytes().iter().chain(then) {
                            if stream.write_all(&[byte]).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        return;
                    }
                    RawMode::Status(code) => format!("HTTP/1.1 {code} Nope\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
                    RawMode::WrongAccept => "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n".to_string(),
                    RawMode::Stream | RawMode::Mute => switching_protocols(&head),
                };
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                if let RawMode::Stream = mode {
                    // Unmasked binary frames of 1000 bytes, back to back, until the router stops reading.
                    let mut frame = vec![0x82, 126, 0x03, 0xe8];
                    frame.extend_from_slice(&[7u8; 1000]);
                    let batch: Vec<u8> = frame
                        .iter()
                        .copied()
                        .cycle()
                        .take(frame.len() * 64)
                        .collect();
                    let (mut r, mut w) = stream.into_split();
                    tokio::spawn(async move {
                        let mut sink = [0u8; 4096];
                        while let Ok(n) = r.read(&mut sink).await {
                            if n == 0 {
                                break;
                            }
                        }
                    });
                    while w.write_all(&batch).await.is_ok() {}
                } else if let RawMode::Mute = mode {
                    let mut sink = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                } else {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            });
        }
    });
    addr
}

/// A probe that calls every replica healthy (for replicas without a /health endpoint).
pub struct AlwaysHealthy;

impl wsrouter::health::Probe for AlwaysHealthy {
    fn probe(
        &self,
        _: &std::sync::Arc<wsrouter::registry::Replica>,
        _: &str,
    ) -> wsrouter::health::ProbeFuture {
        Box::pin(async { Ok(None) })
    }
}

/// A router whose replicas are all considered healthy by their probe.
pub async fn start_always_healthy(urls: &[String], extra: &str) -> TestRouter {
    let extra = with_table(extra, "listen", "host = \"127.0.0.1\"\nport = 0");
    let extra = with_table(&extra, "health_check", "interval_seconds = 30");
    let text = format!("{extra}\n{}", replicas_toml(urls, true));
    let config = Config::parse(&text).unwrap();
    let router = Router::bind_with_probe(config, Arc::new(AlwaysHealthy))
        .await
        .unwrap();
    let router = TestRouter::run(router);
    for i in 0..urls.len() {
        router.wait_status(i, Status::Healthy).await;
    }
    router
}

/// Send one text frame and expect it echoed back unchanged.
pub async fn echo_once(ws: &mut Client, text: &'static [u8]) {
    ws.write_frame(Frame::text(fastwebsockets::Payload::Borrowed(text)))
        .await
        .unwrap();
    let frame = read(ws).await;
    assert_eq!((frame.opcode, &frame.payload[..]), (OpCode::Text, text));
}

/// One echo replica behind a router configured with `extra`, healthy and ready.
pub async fn single_echo(extra: &str) -> (wsrouter::echo::EchoReplica, TestRouter) {
    let replica = wsrouter::echo::EchoReplica::start().await.unwrap();
    let router = TestRouter::start(config(&[replica.url()], extra)).await;
    router.wait_status(0, Status::Healthy).await;
    (replica, router)
}

/// A valid client upgrade request head for /v1/stream, as raw bytes.
pub const UPGRADE_REQUEST: &[u8] =
    b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A WebSocket client on a bare TCP stream, for frames no conforming client would send.
pub async fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(UPGRADE_REQUEST).await.unwrap();
    // Byte by byte, so nothing past the response head is consumed.
    let mut head = Vec::new();
    bounded("101 response", async {
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("response head"));
        }
    })
    .await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// A client frame as raw bytes: FIN plus `first_byte_flags` (opcode, RSV bits), masked with a
/// fixed key unless `masked` is false.
pub fn raw_frame(first_byte: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![first_byte];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => frame.push(mask_bit | len as u8),
        len @ 126..=0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        frame.extend_from_slice(&KEY);
        frame.extend(payload.iter().zip(KEY.iter().cycle()).map(|(b, k)| b ^ k));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// Read one unmasked server frame from a raw stream: (first byte, payload); `None` at EOF.
pub async fn read_raw_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    bounded("a raw frame", async {
        let first = stream.read_u8().await.ok()?;
        let len = match stream.read_u8().await.ok()? & 0x7f {
            126 => u64::from(stream.read_u16().await.ok()?),
            127 => stream.read_u64().await.ok()?,
            len => u64::from(len),
        };
        let mut payload = vec![0; len as usize];
        stream.read_exact(&mut payload).await.ok()?;
        Some((first, payload))
    })
    .await
}

/// The router binary with a config file of its own, stopped when dropped. Its stderr (the
/// log) goes to a file that [`RouterProcess::log`] reads. `WSROUTER_BIN` runs another build
/// instead (to show a test fails on an earlier one).
pub struct RouterProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
    log: std::path::PathBuf,
}

impl RouterProcess {
    /// Start `wsrouter --config` with `config` (which must listen on `port`) and wait until it
    /// answers `/health`. `open_files` sets the process's open-file limit first.
    pub fn spawn(
        name: &str,
        config: &str,
        port: u16,
        open_files: Option<u64>,
    ) -> std::io::Result<RouterProcess> {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("wsrouter-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("router.toml");
        std::fs::write(&path, config)?;
        let log = dir.join("router.log");
        let binary =
            std::env::var("WSROUTER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsrouter").into());
        let mut command = std::process::Command::new(binary);
        command
            .args(["--config", path.to_str().unwrap()])
            .env("RUST_LOG", "wsrouter=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some(limit) = open_files {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn()?;
        Ok(RouterProcess {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the router has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (bounded) until `/status` reports every replica healthy.
    pub async fn wait_healthy(&self) {
        let addr = self.addr;
        bounded("the router's replicas to be healthy", async {
            loop {
                if TcpStream::connect(addr).await.is_ok() {
                    let status = raw_http(addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
                    let body = status.split("\r\n\r\n").nth(1).unwrap_or("");
                    if let Ok(json) = serde_json::from_str::<serde_json::Value>(body) {
                        let replicas = json["replicas"].as_array().cloned().unwrap_or_default();
                        if !replicas.is_empty() && replicas.iter().all(|r| r["status"] == "healthy")
                        {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// The process's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        rss_bytes(self.pid())
    }

    /// Wait (bounded) for the process to exit; its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        bounded("the router to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status.code();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's resident memory, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kib * 1024
}

/// A replica that accepts one upgrade, then hands each chunk it reads to the test; `after_101`
/// is written right after the 101.
pub async fn recording_replica(
    after_101: Vec<u8>,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (chunks, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = accept_one_upgrade(&listener).await;
        stream.write_all(&after_101).await.unwrap();
        if after_101.is_empty() {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || chunks.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        }
        // With something written after the 101, the replica then dies: the socket drops.
    });
    (addr, received)
}

/// Read from `received` until `len` bytes have come.
pub async fn receive(
    received: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    len: usize,
) -> Vec<u8> {
    let mut got = Vec::new();
    bounded("bytes at the replica", async {
        while got.len() < len {
            got.extend(received.recv().await.expect("replica connection open"));
        }
    })
    .await;
    got
}

/// A directory of its own under the system's temporary directory, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wsrouter-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A WebSocket handshake at `path` on an established connection (TLS, say).
pub async fn websocket_over<S>(
    stream: S,
    host: &str,
    path: &str,
) -> Result<(Client, hyper::Response<hyper::body::Incoming>), fastwebsockets::WebSocketError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    websocket_with(stream, host, path, &[]).await
}

/// As [`websocket_over`], with extra request headers.
pub async fn websocket_with<S>(
    stream: S,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, hyper::Response<hyper::body::Incoming>), fastwebsockets::WebSocketError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut req = hyper::Request::get(path)
        .header("host", host)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header(
            "sec-websocket-key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("sec-websocket-version", "13");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let (mut ws, response) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await?;
    ws.set_auto_pong(false);
    Ok((ws, response))
}

/// A router started from the config file at `path`, reloading it when it (or a TLS file it
/// names) changes, looked at every 20 ms.
pub async fn watched_router(path: &std::path::Path) -> (TestRouter, wsrouter::Reloader) {
    let router = Router::bind(Config::load(path).unwrap()).await.unwrap();
    let reloader = router.reloader();
    tokio::spawn(
        reloader
            .clone()
            .watch(path.to_path_buf(), Duration::from_millis(20)),
    );
    (TestRouter::run(router), reloader)
}

/// The router's count of payload bytes spliced to clients (`wsrouter_spliced_bytes_total`).
pub async fn spliced_bytes(router: &TestRouter) -> usize {
    let metrics = raw_http(router.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("wsrouter_spliced_bytes_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no spliced bytes count in {metrics}"))
}

/// Sessions run on the io_uring ring in this run (CI runs the suite both ways): the ring keeps
/// its own buffers, so nothing is spliced there.
pub fn on_the_ring() -> bool {
    std::env::var("WSROUTER_IO").is_ok_and(|io| io == "io_uring")
}
