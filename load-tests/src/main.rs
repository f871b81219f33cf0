//! wsload: bounded WebSocket load against loopback targets, one JSON result line per run.
//!
//! Modes: `echo` (N connections, K messages in flight, every echo checked byte for byte),
//! `handshake` (open+close rate and connect latency), `idle` (N idle sessions, memory per
//! session of the given processes), `replica` (an echo replica with /health), and `cert`
//! (a CA and an ECDSA P-256 certificate for localhost, for TLS targets).
//!
//! `wss://` urls are verified against `--ca`, as `localhost`; the client offers X25519 only,
//! which every peer compared supports, so each does the same key exchange.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wsload",
    about = "Bounded WebSocket load generator (loopback targets only)"
)]
struct Cli {
    /// Tokio worker threads.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args, Clone)]
struct Target {
    /// ws://127.0.0.1:PORT/path or wss://localhost:PORT/path (loopback only).
    #[arg(long)]
    url: String,
    /// Label copied into the result line.
    #[arg(long, default_value = "")]
    label: String,
    /// The CA that signed a wss:// target's certificate (PEM).
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// wss:// only: a full TLS handshake for every connection (no session resumption).
    #[arg(long)]
    no_resume: bool,
}

#[derive(Subcommand)]
enum Mode {
    /// Echo load: every message is checked byte for byte against what was sent.
    Echo {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Messages in flight per connection.
        #[arg(long, default_value_t = 1)]
        in_flight: usize,
        /// Message size in bytes (binary frames).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Total messages per second across all connections (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Handshake rate: connections opened, upgraded and closed per second.
    Handshake {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// Hold N idle sessions and report the RSS growth of the given processes per session.
    Idle {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 3.0)]
        hold: f64,
        /// Before going idle, each session echoes one message of this many bytes (0: none), so
        /// the figure includes whatever a proxy keeps from traffic a session once carried.
        #[arg(long, default_value_t = 0)]
        warm_bytes: usize,
        /// Process ids whose RSS is summed (e.g. the proxy and its workers).
        #[arg(long = "pid")]
        pids: Vec<u32>,
    },
    /// Write ca.pem, cert.pem and key.pem (ECDSA P-256, for localhost and 127.0.0.1) to DIR.
    Cert {
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// Run an echo replica (GET /health, WS /v1/stream) on HOST:PORT (loopback only). Its
    /// health answer reports its sessions: {"status":"ok","sessions":N}.
    Replica {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Report this capacity in the health answer ("max_sessions").
        #[arg(long)]
        max_sessions: Option<u64>,
        /// Stop by itself after this many seconds.
        #[arg(long, default_value_t = 3600.0)]
        max_seconds: f64,
    },
    /// Serve DNS (UDP) on 127.0.0.1:PORT from a zone file of `name address ttl` lines, read
    /// again for every query (rewrite it to move replicas in and out).
    Dns {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        zone: std::path::PathBuf,
        /// Stop by itself after this many seconds.
        #[arg(long, default_value_t = 3600.0)]
        max_seconds: f64,
    },
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async move {
        match cli.mode {
            Mode::Echo {
                target,
                connections,
                in_flight,
                size,
                duration,
                warmup,
                rate,
            } => echo(target, connections, in_flight, size, duration, warmup, rate).await,
            Mode::Handshake {
                target,
                concurrency,
                duration,
            } => handshake(target, concurrency, duration).await,
            Mode::Idle {
                target,
                connections,
                hold,
                warm_bytes,
                pids,
            } => idle(target, connections, hold, warm_bytes, pids).await,
            Mode::Replica {
                port,
                host,
                max_sessions,
                max_seconds,
            } => replica(host, port, max_sessions, max_seconds).await,
            Mode::Dns {
                port,
                zone,
                max_seconds,
            } => dns(port, zone, max_seconds).await,
            Mode::Cert { dir } => cert(&dir),
        }
    });
    match result {
        Ok(Some(line)) => println!("{line}"),
        Ok(None) => {}
        Err(e) => {
            eprintln!("wsload: {e}");
            std::process::exit(1);
        }
    }
}

type Client = WebSocket<TokioIo<Upgraded>>;

/// Where sessions go: a loopback address, the path, and TLS for wss:// targets.
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    path: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// TLS handshakes that resumed a session.
static RESUMED: AtomicU64 = AtomicU64::new(0);

/// The name wss:// targets are verified as (see `wsload cert`).
const TLS_NAME: &str = "localhost";

/// Parse a ws:// or wss:// url and refuse anything that is not loopback.
fn endpoint(target: &Target) -> Result<Endpoint, String> {
    let url = &target.url;
    let (rest, secure) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err("url must start with ws:// or wss://".into()),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let authority = authority.replace("localhost", "127.0.0.1");
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| format!("{authority:?} must be IP:PORT"))?;
    let loopback = match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback(),
    };
    if !loopback {
        return Err(format!(
            "{addr} is not a loopback address; wsload only targets 127.0.0.0/8 and ::1"
        ));
    }
    let tls = if secure {
        let ca = target.ca.as_ref().ok_or("a wss:// url needs --ca")?;
        Some(tls_connector(ca, !target.no_resume)?)
    } else {
        None
    };
    Ok(Endpoint { addr, path, tls })
}

fn tls_connector(ca: &std::path::Path, resume: bool) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("{}: {e}", ca.display()))?
    {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| e.to_string())?;
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

async fn open(endpoint: &Endpoint) -> Result<Client, String> {
    let stream = TcpStream::connect(endpoint.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let req = hyper::Request::get(&endpoint.path)
        .header("host", endpoint.addr.to_string())
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header(
            "sec-websocket-key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let (mut ws, _) = match &endpoint.tls {
        None => fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await,
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(TLS_NAME).expect("a DNS name");
            let stream = tls
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                RESUMED.fetch_add(1, Ordering::Relaxed);
            }
            fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await
        }
    }
    .map_err(|e| format!("handshake: {e}"))?;
    ws.set_max_message_size(64 << 20);
    Ok(ws)
}

async fn close(mut ws: Client) {
    if ws.write_frame(Frame::close(1000, b"")).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(frame) = ws.read_frame().await {
                if frame.opcode == OpCode::Close {
                    break;
                }
            }
        })
        .await;
    }
}

fn quantiles(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn merge(mut into: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(a), Some(b)) = (into.as_object_mut(), extra.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
    into
}

#[derive(Default)]
struct EchoCounts {
    /// Echoes completed in the measured window.
    messages: AtomicU64,
    /// Echoes completed in the whole run, warm-up included (for CPU per message).
    messages_total: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
}

#[allow(clippy::too_many_arguments)]
async fn echo(
    target: Target,
    connections: usize,
    in_flight: usize,
    size: usize,
    duration: f64,
    warmup: f64,
    rate: Option<f64>,
) -> Result<Option<String>, String> {
    let endpoint = endpoint(&target)?;
    if size < 8 {
        return Err("--size must be at least 8 (the sequence number)".into());
    }
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(open(&endpoint).await?);
    }
    let counts = Arc::new(EchoCounts::default());
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(duration);
    let send_interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
    let mut tasks = Vec::new();
    for (id, ws) in clients.into_iter().enumerate() {
        let counts = counts.clone();
        tasks.push(tokio::spawn(echo_connection(
            ws,
            id,
            in_flight.max(1),
            size,
            measure_from,
            end,
            send_interval,
            counts,
        )));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for task in tasks {
        if let Ok(h) = task.await {
            histogram.add(h).unwrap();
        }
    }
    let messages = counts.messages.load(Ordering::Relaxed);
    let line = json!({
        "mode": "echo", "target": target.label, "connections": connections, "in_flight": in_flight,
        "size": size, "duration_s": duration, "tls": target.url.starts_with("wss://"),
        "messages": messages,
        "messages_total": counts.messages_total.load(Ordering::Relaxed),
        "msgs_per_s": messages as f64 / duration,
        "mb_per_s": messages as f64 * size as f64 * 2.0 / duration / 1e6,
        "errors": counts.errors.load(Ordering::Relaxed),
        "mismatches": counts.mismatches.load(Ordering::Relaxed),
    });
    Ok(Some(merge(line, quantiles(&histogram)).to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn echo_connection(
    mut ws: Client,
    id: usize,
    in_flight: usize,
    size: usize,
    measure_from: Instant,
    end: Instant,
    send_interval: Option<Duration>,
    counts: Arc<EchoCounts>,
) -> Histogram<u64> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    // Each connection sends its own pattern; the first 8 bytes carry the sequence number.
    let pattern: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(id as u8))
        .collect();
    let mut message = pattern.clone();
    let mut sent: VecDeque<(u64, Instant)> = VecDeque::with_capacity(in_flight);
    let mut next_seq = 0u64;
    let mut next_send = Instant::now();
    for _ in 0..in_flight {
        if send(&mut ws, &mut message, &mut sent, &mut next_seq)
            .await
            .is_err()
        {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            return histogram;
        }
    }
    loop {
        let frame = match tokio::time::timeout_at(end.into(), ws.read_frame()).await {
            Err(_) => break,
            Ok(Err(_)) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                return histogram;
            }
            Ok(Ok(frame)) => frame,
        };
        if frame.opcode != OpCode::Binary {
            continue;
        }
        let (seq, sent_at) = sent.pop_front().expect("an echo we did not ask for");
        let payload = &frame.payload[..];
        if payload.len() != size
            || payload[..8] != seq.to_le_bytes()
            || payload[8..] != pattern[8..]
        {
            counts.mismatches.fetch_add(1, Ordering::Relaxed);
        }
        let now = Instant::now();
        counts.messages_total.fetch_add(1, Ordering::Relaxed);
        if now >= measure_from {
            counts.messages.fetch_add(1, Ordering::Relaxed);
            let _ = histogram.record((now - sent_at).as_micros().max(1) as u64);
        }
        if now >= end {
            break;
        }
        if let Some(interval) = send_interval {
            next_send += interval;
            tokio::time::sleep_until(next_send.into()).await;
        }
        if send(&mut ws, &mut message, &mut sent, &mut next_seq)
            .await
            .is_err()
        {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            return histogram;
        }
    }
    // Collect what is still in flight so the close is clean.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !sent.is_empty() {
            match ws.read_frame().await {
                Ok(f) if f.opcode == OpCode::Binary => {
                    sent.pop_front();
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    close(ws).await;
    histogram
}

/// Stamp the next sequence number into the message, note when it left, and send it.
async fn send(
    ws: &mut Client,
    message: &mut [u8],
    sent: &mut VecDeque<(u64, Instant)>,
    next_seq: &mut u64,
) -> Result<(), fastwebsockets::WebSocketError> {
    let seq = *next_seq;
    *next_seq += 1;
    message[..8].copy_from_slice(&seq.to_le_bytes());
    sent.push_back((seq, Instant::now()));
    ws.write_frame(Frame::binary(Payload::Borrowed(message)))
        .await
}

async fn handshake(
    target: Target,
    concurrency: usize,
    duration: f64,
) -> Result<Option<String>, String> {
    let endpoint = endpoint(&target)?;
    let tls = endpoint.tls.is_some();
    let end = Instant::now() + Duration::from_secs_f64(duration);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (endpoint, errors) = (endpoint.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            while Instant::now() < end {
                let started = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), open(&endpoint)).await {
                    Ok(Ok(ws)) => {
                        let _ = histogram.record(started.elapsed().as_micros().max(1) as u64);
                        close(ws).await;
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            histogram
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for task in tasks {
        if let Ok(h) = task.await {
            histogram.add(h).unwrap();
        }
    }
    let line = json!({
        "mode": "handshake", "target": target.label, "concurrency": concurrency, "duration_s": duration,
        "handshakes": histogram.len(),
        "handshakes_per_s": histogram.len() as f64 / duration,
        "errors": errors.load(Ordering::Relaxed),
        "tls": tls, "tls_resume": tls && !target.no_resume,
        "tls_resumed": RESUMED.load(Ordering::Relaxed),
    });
    Ok(Some(merge(line, quantiles(&histogram)).to_string()))
}

/// Resident memory of a process in bytes (Linux /proc).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn total_rss(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| rss_bytes(p)).sum()
}

async fn idle(
    target: Target,
    connections: usize,
    hold: f64,
    warm_bytes: usize,
    pids: Vec<u32>,
) -> Result<Option<String>, String> {
    let endpoint = endpoint(&target)?;
    let before = total_rss(&pids);
    let mut clients = Vec::with_capacity(connections);
    let mut open_errors = 0u64;
    // Open in batches so the target's accept queue is not the thing being measured.
    for chunk_start in (0..connections).step_by(100) {
        let batch = (chunk_start..connections.min(chunk_start + 100)).map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let mut ws = open(&endpoint).await?;
                if warm_bytes > 0 {
                    let payload = vec![0x5a; warm_bytes];
                    let echoed = async {
                        ws.write_frame(Frame::binary(Payload::Borrowed(&payload)))
                            .await
                            .ok()?;
                        loop {
                            let f = ws.read_frame().await.ok()?;
                            if f.opcode == OpCode::Binary {
                                return (f.payload[..] == payload[..]).then_some(());
                            }
                        }
                    };
                    tokio::time::timeout(Duration::from_secs(10), echoed)
                        .await
                        .ok()
                        .flatten()
                        .ok_or_else(|| "warm-up echo failed".to_string())?;
                }
                Ok::<_, String>(ws)
            })
        });
        for task in batch.collect::<Vec<_>>() {
            match task.await {
                Ok(Ok(ws)) => clients.push(ws),
                _ => open_errors += 1,
            }
        }
    }
    // Hold: every session answers the proxy's keepalive pings, as a browser would (reading
    // makes fastwebsockets answer them), until it is time to check it.
    let (check_tx, check_rx) = tokio::sync::watch::channel(false);
    let holders: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let mut check = check_rx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        frame = ws.read_frame() => match frame {
                            Ok(f) if f.opcode != OpCode::Close => {}
                            _ => return (ws, false),
                        },
                        _ = check.wait_for(|now| *now) => return (ws, true),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let during = total_rss(&pids);
    let _ = check_tx.send(true);
    let held = holders.len();
    let mut clients = Vec::with_capacity(held);
    let mut dead = 0u64;
    for holder in holders {
        match holder.await {
            Ok((ws, true)) => clients.push(ws),
            // Closed or failed during the hold.
            Ok((_, false)) | Err(_) => dead += 1,
        }
    }
    // Every session must still be alive: one echo each.
    for ws in clients.iter_mut() {
        let alive = async {
            ws.write_frame(Frame::binary(Payload::Borrowed(b"are you there")))
                .await
                .ok()?;
            loop {
                let f = ws.read_frame().await.ok()?;
                if f.opcode == OpCode::Binary {
                    return Some(());
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), alive)
            .await
            .ok()
            .flatten()
            .is_none()
        {
            dead += 1;
        }
    }
    for ws in clients {
        close(ws).await;
    }
    let growth = during.saturating_sub(before);
    let line = json!({
        "mode": "idle", "target": target.label, "connections": connections, "held": held,
        "warm_bytes": warm_bytes, "tls": target.url.starts_with("wss://"),
        "open_errors": open_errors, "dead_after_hold": dead,
        "rss_before_bytes": before, "rss_during_bytes": during,
        "rss_per_session_bytes": if held > 0 { growth as f64 / held as f64 } else { 0.0 },
    });
    Ok(Some(line.to_string()))
}

async fn replica(
    host: IpAddr,
    port: u16,
    max_sessions: Option<u64>,
    max_seconds: f64,
) -> Result<Option<String>, String> {
    if !host.is_loopback() {
        return Err(format!("{host} is not a loopback address"));
    }
    let addr = SocketAddr::new(host, port);
    let replica = wsrouter::echo::EchoReplica::start_on(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))?;
    replica.set_reported_max_sessions(max_sessions);
    eprintln!("wsload replica: echo at {}", replica.url());
    until_stopped(max_seconds).await;
    Ok(None)
}

/// Wait for `max_seconds`, SIGINT or SIGTERM.
async fn until_stopped(max_seconds: f64) {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(max_seconds)) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => { term.recv().await; }
                Err(_) => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// A DNS server for the fleet script: A and AAAA answers from `zone`, read at every query.
async fn dns(
    port: u16,
    zone: std::path::PathBuf,
    max_seconds: f64,
) -> Result<Option<String>, String> {
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA};
    use hickory_proto::rr::{RData, Record, RecordType};
    let socket = tokio::net::UdpSocket::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
    eprintln!("wsload dns: serving {} on 127.0.0.1:{port}", zone.display());
    let serve = async {
        let mut buffer = vec![0u8; 4096];
        loop {
            let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
                continue;
            };
            let Ok(request) = Message::from_vec(&buffer[..len]) else {
                continue;
            };
            let text = std::fs::read_to_string(&zone).unwrap_or_default();
            let mut response = Message::response(request.metadata.id, request.metadata.op_code);
            response.metadata.authoritative = true;
            response.metadata.recursion_desired = request.metadata.recursion_desired;
            response.metadata.recursion_available = true;
            for query in &request.queries {
                response.add_query(query.clone());
                let name = query.name().to_ascii().to_ascii_lowercase();
                let mut known = false;
                for line in text.lines() {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let [record_name, address, ttl] = fields[..] else {
                        continue;
                    };
                    if record_name.to_ascii_lowercase().trim_end_matches('.')
                        != name.trim_end_matches('.')
                    {
                        continue;
                    }
                    known = true;
                    let ttl: u32 = ttl.parse().unwrap_or(1);
                    let rdata = match (address.parse::<IpAddr>(), query.query_type()) {
                        (Ok(IpAddr::V4(ip)), RecordType::A) => RData::A(A(ip)),
                        (Ok(IpAddr::V6(ip)), RecordType::AAAA) => RData::AAAA(AAAA(ip)),
                        _ => continue,
                    };
                    response.add_answer(Record::from_rdata(query.name().clone(), ttl, rdata));
                }
                if !known {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
            }
            if let Ok(bytes) = response.to_vec() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    };
    tokio::select! {
        () = serve => {}
        () = until_stopped(max_seconds) => {}
    }
    Ok(None)
}

fn cert(dir: &std::path::Path) -> Result<Option<String>, String> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let fail = |e: rcgen::Error| e.to_string();
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "wsload test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(fail)?).map_err(fail)?;
    let mut leaf = CertificateParams::new(vec![TLS_NAME.to_string(), "127.0.0.1".to_string()])
        .map_err(fail)?;
    leaf.distinguished_name.push(DnType::CommonName, TLS_NAME);
    // KeyPair::generate makes ECDSA P-256 keys.
    let key = KeyPair::generate().map_err(fail)?;
    let cert = leaf.signed_by(&key, &ca).map_err(fail)?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for (name, contents) in [
        ("ca.pem", ca.pem()),
        ("cert.pem", cert.pem()),
        ("key.pem", key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), contents).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(None)
}
