//! The `wsrouter` binary: check, run, demo.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_wsrouter");

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wsrouter-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `wsrouter check --config path`.
fn check(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = Command::new(BIN)
        .args(["check", "--config", "config/router.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (2 replicas)"));
}

#[test]
fn check_rejects_with_exit_2_and_names_the_key() {
    let path = write_config("bad.toml", "[[replicas]]\nurl = \"http://a\"\nprimary = true\n[[replicas]]\nurl = \"http://b\"\nprimary = true\n");
    let out = check(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replicas[1].primary"), "{err}");

    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/router.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[test]
fn run_refuses_an_invalid_config() {
    let path = write_config(
        "bad-run.toml",
        "[health_check]\ninterval_seconds = 0\n[[replicas]]\nurl = \"http://a\"\n",
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("health_check.interval_seconds"));
}

/// `wsrouter demo` serves, proxies to its echo replicas, and exits cleanly on SIGTERM.
#[tokio::test]
async fn demo_serves_and_stops_on_sigterm() {
    let port = common::dead_port();
    let mut child = Command::new(BIN)
        .args(["demo", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = lines.next().unwrap().unwrap();
    assert!(banner.contains("two echo replicas"), "{banner}");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The replicas become healthy after their first probe.
    let mut ws = common::bounded("demo session", async {
        loop {
            if let Ok(Ok((mut ws, _))) = tokio::time::timeout(
                Duration::from_secs(1),
                common::connect_with(addr, "/v1/stream", &[]),
            )
            .await
            {
                ws.write_frame(fastwebsockets::Frame::text(
                    fastwebsockets::Payload::Borrowed(b"hi"),
                ))
                .await
                .unwrap();
                // Until the first probe completes, the answer is the gpu_unavailable frame.
                let frame = ws.read_frame().await.unwrap();
                if &frame.payload[..] == b"hi" {
                    return ws;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    unsafe_sigterm(child.id());
    let close = common::read(&mut ws).await;
    assert_eq!(common::close_code(&close).0, 1001);
    let status = common::bounded(
        "demo exit",
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A running router reloads its config file on SIGHUP (and does not die of it, which is
/// SIGHUP's default action).
#[tokio::test]
async fn run_reloads_its_config_on_sighup() {
    let port = common::dead_port();
    let replica = |p: u16| format!("[[replicas]]\nurl = \"http://127.0.0.1:{p}\"\n");
    let head = format!("[listen]\nhost = \"127.0.0.1\"\nport = {port}\n");
    let path = write_config(
        "sighup.toml",
        &format!("{head}{}", replica(common::dead_port())),
    );
    let mut child = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let replicas_listed = |status: &str| status.matches("\"url\"").count();
    let status = common::bounded("the router to listen", async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return common::raw_http(addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(replicas_listed(&status), 1, "{status}");

    let two = format!(
        "{head}{}{}",
        replica(common::dead_port()),
        replica(common::dead_port())
    );
    std::fs::write(&path, two).unwrap();
    send_signal("-HUP", child.id());
    common::bounded("the reload", async {
        loop {
            let status = common::raw_http(addr, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
            if replicas_listed(&status) == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the router"
    );
    unsafe_sigterm(child.id());
    let status = common::bounded("exit", tokio::task::spawn_blocking(move || child.wait()))
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

fn send_signal(signal: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn unsafe_sigterm(pid: u32) {
    send_signal("-TERM", pid);
}

#[test]
fn check_refuses_a_key_that_does_not_belong_to_the_certificate() {
    let pki = common::pki::Pki::new("cli");
    let (cert, _) = pki.write(
        &pki.issue(common::pki::Leaf::server(&["localhost"])),
        "router",
    );
    let (_, other_key) = pki.write(
        &pki.issue(common::pki::Leaf::server(&["localhost"])),
        "other",
    );
    let path = pki.dir.0.join("router.toml");
    std::fs::write(
        &path,
        format!(
            "[listen.tls]\ncert_file = {cert:?}\nkey_file = {other_key:?}\n[[replicas]]\nurl = \"http://a\"\n"
        ),
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen.tls.key_file") && stderr.contains("does not belong"),
        "{stderr}"
    );
}
