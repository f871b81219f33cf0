//! The live status page: where it is served, what it may load, and what a real browser shows.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use wsrouter::registry::Status;

fn status_of(answer: &str) -> &str {
    answer.split(' ').nth(1).unwrap_or("")
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

#[tokio::test]
async fn the_status_page_is_served_where_status_is_and_loads_nothing_from_elsewhere() {
    let (_replica, router) = single_echo("[admin]\nlisten = \"127.0.0.1:0\"").await;
    let admin = router.admin.unwrap();
    for path in ["/", "/dashboard"] {
        let page = raw_http(admin, &get(path)).await;
        assert_eq!(status_of(&page), "200", "{path} on the admin listener");
        let head = page.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(head.contains("content-type: text/html"), "{head}");
        // The browser itself refuses anything but the router's own endpoints.
        assert!(
            head.contains("content-security-policy: default-src 'none';")
                && head.contains("connect-src 'self'"),
            "{head}"
        );
        assert!(page.contains("fetch(\"/status\""), "the page polls /status");
        assert!(
            !page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"),
            "the page names no other origin"
        );
        let public = raw_http(router.addr, &get(path)).await;
        assert_eq!(status_of(&public), "404", "{path} on the public listener");
    }
    // Without an admin listener the page is where /status is: on the public port.
    let (_replica, router) = single_echo("").await;
    assert_eq!(status_of(&raw_http(router.addr, &get("/")).await), "200");
}

/// Where a headless Chromium is: `CHROMIUM`, else the usual names on PATH.
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(path.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| {
            ["chromium", "chromium-browser", "google-chrome"]
                .into_iter()
                .map(move |name| dir.join(name))
        })
        .find(|candidate| candidate.is_file())
}

/// The Chrome DevTools protocol over one WebSocket, attached to one page.
struct DevTools {
    ws: FragmentCollector<TokioIo<Upgraded>>,
    next_id: u64,
    session: Option<String>,
}

impl DevTools {
    async fn connect(url: &str) -> DevTools {
        let rest = url.strip_prefix("ws://").expect("a ws:// DevTools url");
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let addr: SocketAddr = host.parse().expect("DevTools on an IP address");
        assert!(addr.ip().is_loopback(), "DevTools must listen on loopback");
        let (ws, _) = bounded("the DevTools WebSocket", connect_with(addr, path, &[]))
            .await
            .expect("DevTools handshake");
        DevTools {
            ws: FragmentCollector::new(ws),
            next_id: 1,
            session: None,
        }
    }

    /// Send one command and wait for its answer, skipping events.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let text = message.to_string();
        self.ws
            .write_frame(Frame::text(Payload::Owned(text.into_bytes())))
            .await
            .expect("send a DevTools command");
        bounded(method, async {
            loop {
                let frame = self.ws.read_frame().await.expect("a DevTools message");
                assert_eq!(frame.opcode, OpCode::Text, "DevTools closed");
                let answer: Value = serde_json::from_slice(&frame.payload).unwrap();
                if answer["id"] == json!(id) {
                    assert!(answer.get("error").is_none(), "{method}: {answer}");
                    return answer["result"].clone();
                }
            }
        })
        .await
    }

    /// Evaluate `expression` in the page; its value, which must be JSON.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Evaluate until `wanted` holds for the value (the page polls once a second).
    async fn eval_until(&mut self, what: &str, expression: &str, wanted: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.eval(expression).await;
            if wanted(&value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}; last: {value}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

const REPLICA_STATES: &str = "JSON.stringify(Object.fromEntries([...document.querySelectorAll('tr[data-replica]')].map((r) => [r.dataset.replica, r.dataset.state])))";

/// The replica names in the order the table shows them, comma-separated.
const SHOWN_ROWS: &str =
    "[...document.querySelectorAll('#replicas tr')].map((r) => r.dataset.replica).join(',')";

fn states(value: &Value) -> Value {
    serde_json::from_str(value.as_str().unwrap_or("{}")).unwrap_or_default()
}

#[tokio::test]
async fn a_real_browser_sees_a_replica_go_unhealthy_within_seconds() {
    let Some(chromium) = chromium() else {
        // .ci/run installs Chromium and sets this, so CI cannot skip the test.
        assert!(
            std::env::var("WSROUTER_BROWSER_TESTS").as_deref() != Ok("required"),
            "no chromium on PATH (set CHROMIUM to its path)"
        );
        eprintln!("skipped: no chromium on PATH (apt-get install chromium, or set CHROMIUM)");
        return;
    };
    let first = wsrouter::echo::EchoReplica::start().await.unwrap();
    let second = wsrouter::echo::EchoReplica::start().await.unwrap();
    let router = TestRouter::start(config(
        &[first.url(), second.url()],
        "[admin]\nlisten = \"127.0.0.1:0\"\n[health_check]\ninterval_seconds = 0.2",
    ))
    .await;
    router.wait_status(0, Status::Healthy).await;
    router.wait_status(1, Status::Healthy).await;
    let mut session = connect(router.addr).await;
    echo_once(&mut session, b"one live session for the page to count").await;

    let profile = TempDir::new("chromium-profile");
    let mut browser = tokio::process::Command::new(&chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,760",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let mut stderr = BufReader::new(browser.stderr.take().unwrap()).lines();
    let devtools_url = bounded("chromium's DevTools address", async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("DevTools listening on ") {
                return url.trim().to_string();
            }
        }
        panic!("chromium exited before it listened");
    })
    .await;
    // Keep reading so a chatty browser never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });

    let mut devtools = DevTools::connect(&devtools_url).await;
    let page = format!("http://{}/dashboard", router.admin.unwrap());
    let target = devtools
        .call("Target.createTarget", json!({"url": page}))
        .await;
    let attached = devtools
        .call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )
        .await;
    devtools.session = Some(attached["sessionId"].as_str().unwrap().to_string());

    devtools
        .eval_until("both replicas healthy", REPLICA_STATES, |v| {
            states(v) == json!({"r0": "healthy", "r1": "healthy"})
        })
        .await;
    devtools
        .eval_until(
            "the live session",
            "document.getElementById('sessions').textContent",
            |v| v.as_str().is_some_and(|s| s.starts_with("1 / ")),
        )
        .await;

    let killed = Instant::now();
    drop(second);
    devtools
        .eval_until("r1 unhealthy, r0 healthy", REPLICA_STATES, |v| {
            states(v) == json!({"r0": "healthy", "r1": "unhealthy"})
        })
        .await;
    let shown_after = killed.elapsed();
    assert!(
        shown_after < Duration::from_secs(5),
        "the page took {shown_after:?} to show the dead replica"
    );
    let error = devtools
        .eval("document.querySelector('tr[data-replica=\"r1\"] td.error').textContent")
        .await;
    assert!(
        error.as_str().is_some_and(|e| !e.is_empty()),
        "the dead replica's last error is shown: {error}"
    );

    // Filter by state, sort by a column.
    devtools
        .eval("const f = document.getElementById('state-filter'); f.value = 'unhealthy'; f.dispatchEvent(new Event('change'))")
        .await;
    assert_eq!(devtools.eval(SHOWN_ROWS).await, json!("r1"));
    devtools
        .eval("const g = document.getElementById('state-filter'); g.value = ''; g.dispatchEvent(new Event('change'))")
        .await;
    devtools
        .eval("document.querySelector('th[data-key=\"name\"]').click()")
        .await;
    assert_eq!(devtools.eval(SHOWN_ROWS).await, json!("r0,r1"));
    devtools
        .eval("document.querySelector('th[data-key=\"name\"]').click()")
        .await;
    assert_eq!(devtools.eval(SHOWN_ROWS).await, json!("r1,r0"));

    let shot = devtools
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&target_dir).unwrap();
    std::fs::write(target_dir.join("dashboard.png"), png).unwrap();

    // A fleet of 200: every replica listed, and the name filter narrows it.
    let port = dead_port();
    let dead: Vec<String> = (1..=200)
        .map(|i| format!("http://127.1.0.{i}:{port}"))
        .collect();
    let fleet = TestRouter::start(config(
        &dead,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[health_check]\ninterval_seconds = 1",
    ))
    .await;
    let page = format!("http://{}/dashboard", fleet.admin.unwrap());
    devtools.call("Page.navigate", json!({"url": page})).await;
    devtools
        .eval_until("200 replicas", SHOWN_ROWS, |v| {
            v.as_str()
                .is_some_and(|rows| rows.split(',').count() == 200)
        })
        .await;
    devtools
        .eval("const t = document.getElementById('text-filter'); t.value = 'r19'; t.dispatchEvent(new Event('input'))")
        .await;
    let shown = devtools.eval(SHOWN_ROWS).await;
    let mut shown: Vec<&str> = shown.as_str().unwrap().split(',').collect();
    shown.sort();
    let mut wanted: Vec<String> = std::iter::once("r19".to_string())
        .chain((190..200).map(|i| format!("r{i}")))
        .collect();
    wanted.sort();
    assert_eq!(shown, wanted);
    browser.kill().await.expect("stop chromium");
}
