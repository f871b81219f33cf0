//! TLS on both legs, over real sockets with certificates made for each test: a wss:// client
//! through the router's TLS listener to https:// replicas, replica certificates that fail
//! verification, client certificates, clients that do not speak TLS or stall, and a renewed
//! certificate picked up by a running router.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{server_config, tls_connect, Issued, Leaf, Pki};
use common::*;
use fastwebsockets::{Frame, OpCode, Payload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsrouter::echo::EchoReplica;
use wsrouter::health::{run_cycle, HttpProbe};
use wsrouter::metrics::ProbeFailure;
use wsrouter::registry::{Registry, Status};
use wsrouter::Config;

fn listen_tls(cert: &Path, key: &Path) -> String {
    format!("[listen.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n")
}

/// The router's own certificate, for `localhost`, written to the PKI's directory.
fn router_cert(pki: &Pki) -> String {
    let issued = pki.issue(Leaf::server(&["localhost"]));
    let (cert, key) = pki.write(&issued, "router");
    listen_tls(&cert, &key)
}

/// A wss:// client verifying the router as `localhost` against `pki`.
async fn wss(addr: SocketAddr, pki: &Pki) -> Client {
    let tls = bounded(
        "TLS handshake",
        tls_connect(addr, "localhost", pki.client_config()),
    )
    .await
    .expect("TLS handshake with the router");
    bounded(
        "websocket handshake",
        websocket_over(tls, "localhost", "/v1/stream"),
    )
    .await
    .expect("websocket handshake over TLS")
    .0
}

/// The value of the metric line starting with `series` on the plain admin listener.
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = raw_http(admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    text.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Wait (bounded) until `series` reads `value`: a refused or timed-out handshake is counted
/// just after its connection closes, possibly on another worker than the one answering.
async fn metric_reaches(admin: SocketAddr, series: &str, value: f64) {
    bounded(series, async {
        while metric(admin, series).await != value {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

#[tokio::test]
async fn a_wss_client_reaches_an_https_replica_through_both_tls_legs() {
    let pki = Pki::new("both");
    let replica_cert = pki.issue(Leaf::server(&["127.0.0.1"]));
    let replica = EchoReplica::start_tls(server_config(&replica_cert, None))
        .await
        .unwrap();
    assert!(replica.url().starts_with("https://"));
    let extra = format!(
        "{}{ADMIN}[upstream_tls]\nca_file = {:?}\n",
        router_cert(&pki),
        pki.ca_file()
    );
    let router = TestRouter::start(config(&[replica.url()], &extra)).await;
    // Healthy means the probe spoke TLS to /health; its connection is kept across cycles.
    router.wait_status(0, Status::Healthy).await;
    until("three probes", || replica.health_checks() >= 3).await;
    assert_eq!(replica.connections(), 1, "one kept-alive probe connection");

    let mut ws = wss(router.addr, &pki).await;
    echo_once(&mut ws, b"through two TLS legs").await;
    // Larger than any TLS record (16 KiB): the frame crosses both legs in pieces.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.write_frame(Frame::binary(Payload::Owned(big.clone())))
        .await
        .unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < big.len() {
        let frame = read(&mut ws).await;
        assert!(matches!(
            frame.opcode,
            OpCode::Binary | OpCode::Continuation
        ));
        echoed.extend_from_slice(&frame.payload);
    }
    assert!(echoed == big, "the 300 KB message came back intact");
    assert_eq!(replica.open_sessions(), 1);

    // Close codes cross both TLS legs, either way, and the sessions end at the replica.
    ws.write_frame(Frame::close(4000, b"client bye"))
        .await
        .unwrap();
    assert_eq!(
        close_code(&read(&mut ws).await),
        (4000, "client bye".into())
    );
    let mut ws = wss(router.addr, &pki).await;
    ws.write_frame(Frame::text(Payload::Borrowed(b"close:4001:replica done")))
        .await
        .unwrap();
    assert_eq!(
        close_code(&read(&mut ws).await),
        (4001, "replica done".into())
    );
    until("both sessions to end at the replica", || {
        replica.open_sessions() == 0
    })
    .await;

    // A client that comes back resumes its TLS session instead of a full handshake.
    let client = pki.client_config();
    for expected in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
        let mut tls = tls_connect(router.addr, "localhost", client.clone())
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(expected));
        tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        bounded("health over TLS", tls.read_to_string(&mut answer))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let admin = router.admin.expect("admin listener");
    assert_eq!(
        metric(admin, "wsrouter_tls_handshakes_total{result=\"completed\"}").await,
        4.0
    );
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_told_to_use_tls() {
    let pki = Pki::new("plain");
    let replica = EchoReplica::start().await.unwrap();
    let extra = format!("{}{ADMIN}", router_cert(&pki));
    let router = TestRouter::start(config(&[replica.url()], &extra)).await;
    let answer = raw_http(
        router.addr,
        "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"tls_required\""), "{answer}");
    let admin = router.admin.unwrap();
    // Counted once the router has read what the client sent (the answer goes first).
    metric_reaches(
        admin,
        "wsrouter_tls_handshakes_total{result=\"not_tls\"}",
        1.0,
    )
    .await;
    // The admin listener stays plain.
    let status = raw_http(admin, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_after_the_header_timeout() {
    let pki = Pki::new("stall");
    let replica = EchoReplica::start().await.unwrap();
    let extra = format!(
        "{}{ADMIN}[limits]\nheader_read_timeout_seconds = 0.3\n",
        router_cert(&pki)
    );
    let router = TestRouter::start(config(&[replica.url()], &extra)).await;
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    // The start of a ClientHello record, and then nothing.
    stream
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = bounded(
        "the router to close the stalled connection",
        stream.read(&mut buf),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let admin = router.admin.unwrap();
    metric_reaches(
        admin,
        "wsrouter_tls_handshakes_total{result=\"timed_out\"}",
        1.0,
    )
    .await;
    // A client that is not TLS-stalled meanwhile still gets through.
    let mut ws = wss(router.addr, &pki).await;
    echo_once(&mut ws, b"after the stall").await;
}

/// A replica serving `issued`, and the config text that trusts `pki` for it.
async fn replica_with(issued: &Issued) -> EchoReplica {
    EchoReplica::start_tls(server_config(issued, None))
        .await
        .unwrap()
}

#[tokio::test]
async fn replica_certificates_that_fail_verification_are_refused_and_said_why() {
    let trusted = Pki::new("trusted");
    let stranger = Pki::new("stranger");
    let cases = [
        (
            stranger.issue(Leaf::server(&["127.0.0.1"])),
            "signed by an unknown CA",
        ),
        (
            trusted.issue(Leaf::server(&["other.example"])),
            "not valid for this host name",
        ),
        (
            trusted.issue(Leaf {
                names: &["127.0.0.1"],
                expired: true,
                client: false,
            }),
            "expired",
        ),
    ];
    for (issued, why) in cases {
        let replica = replica_with(&issued).await;
        let extra = format!("[upstream_tls]\nca_file = {:?}\n", trusted.ca_file());

        // The health probe: a TLS failure, with the reason.
        let registry = Registry::new(&config(&[replica.url()], &extra));
        run_cycle(&registry, &HttpProbe::new()).await;
        let snapshot = registry.snapshot();
        let entry = &snapshot.replicas[0];
        assert_eq!(
            entry.replica.probe_failures().get(ProbeFailure::Tls),
            1,
            "{why}"
        );
        let error = entry.health.last_error.clone().unwrap_or_default();
        assert!(error.contains(why), "{why}: {error}");

        // A session: refused with the reason, never the address.
        let router = start_always_healthy(&[replica.url()], &extra).await;
        let mut ws = connect(router.addr).await;
        let (json, code, _) = read_error_and_close(&mut ws).await;
        let message = json["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("TLS") && message.contains(why),
            "{why}: {json}"
        );
        assert!(!message.contains("127.0.0.1"), "{json}");
        assert_eq!(
            (code, json["code"].as_str()),
            (1011, Some("worker_failed")),
            "{json}"
        );
        assert_eq!(replica.open_sessions(), 0);
    }
}

#[tokio::test]
async fn a_replica_that_asks_for_a_client_certificate_gets_the_configured_one() {
    let servers = Pki::new("servers");
    let clients = Pki::new("clients");
    let replica_cert = servers.issue(Leaf::server(&["127.0.0.1"]));
    let replica = EchoReplica::start_tls(server_config(&replica_cert, Some(&clients)))
        .await
        .unwrap();
    let client_cert = clients.issue(Leaf {
        names: &["wsrouter"],
        expired: false,
        client: true,
    });
    let (cert, key) = clients.write(&client_cert, "router-client");
    let ca = servers.ca_file();

    let with_cert = format!(
        "[upstream_tls]\nca_file = {ca:?}\nclient_cert_file = {cert:?}\nclient_key_file = {key:?}\n"
    );
    let router = TestRouter::start(config(&[replica.url()], &with_cert)).await;
    router.wait_status(0, Status::Healthy).await;
    let mut ws = connect(router.addr).await;
    echo_once(&mut ws, b"with a client certificate").await;
    drop(router);

    // Without one: the replica's refusal is a TLS failure, for the probe and for sessions.
    let without = format!("[upstream_tls]\nca_file = {ca:?}\n");
    let registry = Registry::new(&config(&[replica.url()], &without));
    run_cycle(&registry, &HttpProbe::new()).await;
    let snapshot = registry.snapshot();
    assert_eq!(
        snapshot.replicas[0]
            .replica
            .probe_failures()
            .get(ProbeFailure::Tls),
        1,
        "{:?}",
        snapshot.replicas[0].health.last_error
    );
    let router = start_always_healthy(&[replica.url()], &without).await;
    let mut ws = connect(router.addr).await;
    let (json, code, _) = read_error_and_close(&mut ws).await;
    assert!(json["message"].as_str().unwrap().contains("TLS"), "{json}");
    assert_eq!(code, 1011);
}

/// The certificate the router presents to a new connection.
async fn presented(addr: SocketAddr, pki: &Pki) -> Vec<u8> {
    let tls = tls_connect(addr, "localhost", pki.client_config())
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(issued: &Issued) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_connections_and_live_sessions_keep_going() {
    let pki = Pki::new("renew");
    let replica = EchoReplica::start().await.unwrap();
    let first = pki.issue(Leaf::server(&["localhost"]));
    let (cert, key) = pki.write(&first, "router");
    let path = pki.dir.0.join("router.toml");
    let text = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = 0\n{}[health_check]\ninterval_seconds = 0.05\n\
         [[replicas]]\nname = \"r0\"\nurl = \"{}\"\n",
        listen_tls(&cert, &key),
        replica.url()
    );
    std::fs::write(&path, &text).unwrap();
    let (router, reloader) = watched_router(&path).await;
    router.wait_status(0, Status::Healthy).await;
    assert_eq!(presented(router.addr, &pki).await, der_of(&first));
    let mut live = wss(router.addr, &pki).await;

    // Renewal: new files in place (key first, so a look in between may see a mismatch and
    // reject it; the next look applies the pair). The config file itself is unchanged.
    let second = pki.issue(Leaf::server(&["localhost"]));
    std::fs::write(&key, &second.key_pem).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    bounded("the renewed certificate to be served", async {
        while presented(router.addr, &pki).await != der_of(&second) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    echo_once(&mut live, b"the live session kept its connection").await;
    let mut fresh = wss(router.addr, &pki).await;
    echo_once(&mut fresh, b"a new session on the new certificate").await;

    // A key that does not belong to the certificate: rejected, naming the key; the renewed
    // certificate stays in service.
    let stranger = pki.issue(Leaf::server(&["localhost"]));
    std::fs::write(&key, &stranger.key_pem).unwrap();
    match reloader.reload_file(&path) {
        wsrouter::reload::Reload::Rejected(error) => {
            let error = error.to_string();
            assert!(
                error.contains("listen.tls.key_file") && error.contains("does not belong"),
                "{error}"
            );
        }
        other => panic!("expected a rejected reload, got {other:?}"),
    }
    assert_eq!(presented(router.addr, &pki).await, der_of(&second));
    echo_once(&mut live, b"still alive").await;
}

#[tokio::test]
async fn tls_files_that_do_not_fit_are_rejected_at_load_naming_the_key() {
    let pki = Pki::new("load");
    let issued = pki.issue(Leaf::server(&["localhost"]));
    let (cert, key) = pki.write(&issued, "router");
    let other = pki.issue(Leaf::server(&["localhost"]));
    let (_, other_key) = pki.write(&other, "other");
    let missing = pki.dir.0.join("missing.pem");
    let cases = [
        (
            listen_tls(&cert, &other_key),
            "listen.tls.key_file",
            "does not belong",
        ),
        (
            listen_tls(&missing, &key),
            "listen.tls.cert_file",
            "cannot read",
        ),
        (
            listen_tls(&key, &key),
            "listen.tls.cert_file",
            "no PEM certificate",
        ),
        (
            listen_tls(&cert, &cert),
            "listen.tls.key_file",
            "no PEM private key",
        ),
        (
            format!("[upstream_tls]\nca_file = {missing:?}\n"),
            "upstream_tls.ca_file",
            "cannot read",
        ),
        (
            format!("[upstream_tls]\nclient_cert_file = {cert:?}\n"),
            "upstream_tls",
            "client_key_file",
        ),
    ];
    for (extra, key_named, says) in cases {
        let text = format!("{extra}\n[[replicas]]\nurl = \"https://127.0.0.1:1\"\n");
        let error = Config::parse(&text).expect_err(&text).to_string();
        assert!(
            error.contains(key_named) && error.contains(says),
            "{text}\n-> {error}"
        );
    }
    // Relative paths in a config file are relative to the file's directory.
    let path = pki.dir.0.join("router.toml");
    std::fs::write(
        &path,
        "[listen.tls]\ncert_file = \"router.crt\"\nkey_file = \"router.key\"\n\
         [[replicas]]\nurl = \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
    let config = Config::load(&path).expect("relative TLS paths load");
    assert_eq!(config.listen.tls.unwrap().cert_file, cert);
}

/// A TCP stream that counts the TLS records it reads (by their 5-byte headers).
struct RecordCounter {
    inner: tokio::net::TcpStream,
    records: Arc<std::sync::atomic::AtomicUsize>,
    /// Header bytes of the next record seen so far, or the body bytes still to skip.
    header: Vec<u8>,
    skip: usize,
}

impl RecordCounter {
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                self.records
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.skip = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                self.header.clear();
            }
        }
    }
}

impl tokio::io::AsyncRead for RecordCounter {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let fresh = buf.filled()[before..].to_vec();
        self.scan(&fresh);
        poll
    }
}

impl tokio::io::AsyncWrite for RecordCounter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn frames_that_arrive_together_leave_in_one_tls_record() {
    let pki = Pki::new("records");
    // The replica sends 50 small frames in one write right after its 101.
    let burst: Vec<u8> = (0..50u8)
        .flat_map(|i| raw_frame(0x81, format!("frame {i:02}").as_bytes(), false))
        .collect();
    let (replica, _) = recording_replica(burst).await;
    let extra = router_cert(&pki);
    let router = start_always_healthy(&[format!("http://{replica}")], &extra).await;

    let records = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tcp = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let counter = RecordCounter {
        inner: tcp,
        records: records.clone(),
        header: Vec::new(),
        skip: 0,
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(name, counter)
        .await
        .unwrap();
    let (mut ws, _) = websocket_over(tls, "localhost", "/v1/stream")
        .await
        .unwrap();
    let before_frames = records.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..50 {
        let frame = read(&mut ws).await;
        assert_eq!(frame.opcode, OpCode::Text);
        assert_eq!(&frame.payload[..], format!("frame {i:02}").as_bytes());
    }
    let for_frames = records.load(std::sync::atomic::Ordering::SeqCst) - before_frames;
    // The burst, and perhaps what followed it (the replica then hung up: error and Close).
    assert!(
        for_frames <= 3,
        "50 frames that arrived together took {for_frames} TLS records"
    );
}

#[tokio::test]
async fn a_drain_closes_tls_sessions_with_1001() {
    let pki = Pki::new("drain");
    let replica = EchoReplica::start().await.unwrap();
    let mut router = TestRouter::start(config(&[replica.url()], &router_cert(&pki))).await;
    router.wait_status(0, Status::Healthy).await;
    let mut ws = wss(router.addr, &pki).await;
    echo_once(&mut ws, b"before the drain").await;
    let (drain, frame) = tokio::join!(router.shutdown(), read(&mut ws));
    assert_eq!(close_code(&frame).0, 1001);
    assert!(matches!(drain, wsrouter::Drain::Complete), "{drain:?}");
}

/// A replica that accepts one upgrade and streams 64 KiB binary frames until the socket stops
/// taking them; `written` counts what it accepted.
async fn streaming_replica(written: Arc<std::sync::atomic::AtomicU64>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut stream = accept_one_upgrade(&listener).await;
        let frame = raw_frame(0x82, &[0x5a; 64 << 10], false);
        while stream.write_all(&frame).await.is_ok() {
            written.fetch_add(frame.len() as u64, std::sync::atomic::Ordering::SeqCst);
        }
    });
    addr
}

#[tokio::test]
async fn a_wss_client_that_stops_reading_holds_back_its_replica() {
    let pki = Pki::new("backpressure");
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let replica = streaming_replica(written.clone()).await;
    let router = start_always_healthy(&[format!("http://{replica}")], &router_cert(&pki)).await;
    let mut ws = wss(router.addr, &pki).await;
    // The client reads nothing: the stream stops at what the sockets and the router's bounded
    // buffers hold (TLS adds rustls' 64 KiB of unsent records at most).
    let held = bounded("the replica to be held back", async {
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = written.load(std::sync::atomic::Ordering::SeqCst);
            if now == last && now > 0 {
                return now;
            }
            last = now;
        }
    })
    .await;
    assert!(
        held < 32 << 20,
        "{held} bytes left the replica for a client that reads nothing"
    );
    // Reading resumes the stream, frames intact.
    let mut read = 0u64;
    while read < 4 * held {
        let frame = read_frame_bounded(&mut ws).await;
        assert!(frame.iter().all(|&b| b == 0x5a));
        read += frame.len() as u64;
    }
    assert!(written.load(std::sync::atomic::Ordering::SeqCst) > held);
}

async fn read_frame_bounded(ws: &mut Client) -> Vec<u8> {
    let frame = read(ws).await;
    assert!(
        matches!(frame.opcode, OpCode::Binary | OpCode::Continuation),
        "{:?} {:?}",
        frame.opcode,
        String::from_utf8_lossy(&frame.payload)
    );
    frame.payload.to_vec()
}
