//! The router's own endpoints: `GET /health` (liveness), `GET /ready` (can it take sessions),
//! `GET /status` (every replica, the reference router's schema plus extras) and
//! `GET /metrics` (Prometheus text) and the status page (`GET /` or `/dashboard`).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use super::respond::json_response;
use super::{Body, Proxy};
use crate::close::CODE_LABELS;
use crate::metrics::{Counters, Histogram, Label};
use crate::registry::{ReplicaState, Status};

pub fn health() -> Response<Body> {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// 200 while the router can take sessions; 503 while it drains or no replica is healthy.
pub fn ready(proxy: &Proxy) -> Response<Body> {
    let (status, word) = if proxy.shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !proxy
        .registry
        .snapshot()
        .replicas
        .iter()
        .any(|r| r.selectable())
    {
        (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_replica")
    } else {
        (StatusCode::OK, "ready")
    };
    json_response(status, &json!({"status": word}))
}

/// The /status document: `replicas` keeps the reference fields (url, primary, status,
/// last_ok_at, last_latency_ms, consecutive_failures) and adds the rest.
pub fn status_json(proxy: &Proxy) -> Value {
    let snapshot = proxy.registry.snapshot();
    let replicas: Vec<Value> = snapshot
        .replicas
        .iter()
        .map(|r| {
            json!({
                "url": r.replica.url,
                "name": r.replica.name,
                "primary": r.replica.primary,
                "weight": r.replica.weight,
                "status": r.health.status.as_str(),
                "draining": r.draining(),
                "removed": r.replica.removed,
                "group": r.replica.group,
                "last_ok_at": r.health.last_ok_at,
                "last_latency_ms": r.health.last_latency_ms,
                "consecutive_failures": r.health.consecutive_failures,
                "consecutive_successes": r.health.consecutive_successes,
                "last_error": r.health.last_error,
                "last_change_at": r.health.last_change_at,
                "active_sessions": r.replica.active_sessions(),
                "max_sessions": (r.replica.max_sessions != usize::MAX).then_some(r.replica.max_sessions),
                "reported": r.health.reported.as_ref().map(|report| json!({
                    "sessions": report.sessions,
                    "max_sessions": report.max_sessions,
                    "draining": report.draining,
                })),
                "load": r.load(),
                "capacity": r.capacity(),
                "total_sessions": r.replica.total_sessions(),
                "connect_failures": r.replica.connect_failures().total(),
                "last_connect_error": r.replica.last_connect_error(),
            })
        })
        .collect();
    let groups: Vec<Value> = snapshot
        .groups
        .iter()
        .map(|g| {
            json!({
                "name": g.name,
                "lookup": g.lookup,
                "found": g.found,
                "lookups_ok": g.lookups_ok,
                "lookups_empty": g.lookups_empty,
                "lookups_failed": g.lookups_failed,
                "last_ok_at": g.last_ok_at,
                "last_error": g.last_error,
            })
        })
        .collect();
    json!({
        "replicas": replicas,
        "groups": groups,
        "sessions": {"active": proxy.sessions.active(), "max": proxy.sessions.max()},
        "connections": {"open": proxy.connections.open(), "max": proxy.connections.max()},
        "draining": proxy.shutting_down(),
        "io": if proxy.io_uring { "io_uring" } else { "epoll" },
    })
}

pub fn status(proxy: &Proxy) -> Response<Body> {
    json_response(StatusCode::OK, &status_json(proxy))
}

/// The live status page: one static file that the browser fills from /status and /metrics, so
/// the router does no work for it beyond those two answers, and none while nobody looks.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the page may do in the browser: run its own inline script and style and fetch from the
/// router, nothing else (no other origin, no frames, no forms).
const DASHBOARD_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub fn dashboard() -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from_static(DASHBOARD.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(DASHBOARD_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Prometheus label values: escape backslash, quote and newline.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One line per label value of `counters`, under `name{prefix,key="..."}`.
fn counter_lines<L: Label>(
    out: &mut String,
    name: &str,
    prefix: &str,
    key: &str,
    counters: &Counters<L>,
) {
    for (value, count) in counters.iter() {
        let _ = writeln!(out, "{name}{{{prefix}{key}=\"{value}\"}} {count}");
    }
}

fn histogram_lines(out: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    let (cumulative, sum) = histogram.cumulative();
    let bounds = histogram
        .bounds()
        .iter()
        .map(|b| b.to_string())
        .chain(["+Inf".to_string()]);
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, count) in bounds.zip(&cumulative) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(
        out,
        "{name}_sum{braces} {sum}\n{name}_count{braces} {}",
        cumulative.last().copied().unwrap_or(0)
    );
}

/// `GET /metrics` in the Prometheus text format.
pub fn metrics(proxy: &Proxy) -> Response<Body> {
    let snapshot = proxy.registry.snapshot();
    let stats = &proxy.metrics;
    let mut out = String::with_capacity(16 * 1024);
    type Value = fn(&ReplicaState) -> f64;
    let per_replica: [(&str, &str, &str, Value); 7] = [
        (
            "wsrouter_replica_sessions_active",
            "gauge",
            "Sessions open or opening on the replica.",
            |r| r.replica.active_sessions() as f64,
        ),
        (
            "wsrouter_replica_sessions_total",
            "counter",
            "Sessions opened on the replica.",
            |r| r.replica.total_sessions() as f64,
        ),
        (
            "wsrouter_replica_up",
            "gauge",
            "1 if the replica is healthy and not draining (selectable), else 0.",
            |r| f64::from(u8::from(r.selectable())),
        ),
        (
            "wsrouter_replica_draining",
            "gauge",
            "1 if the replica takes no new sessions (drain = true, removed from the config with sessions left, or its health answer says draining).",
            |r| f64::from(u8::from(r.draining())),
        ),
        (
            "wsrouter_replica_consecutive_failures",
            "gauge",
            "Consecutive failed probes or connects.",
            |r| f64::from(r.health.consecutive_failures),
        ),
        (
            "wsrouter_replica_probe_latency_seconds",
            "gauge",
            "Latency of the last successful probe.",
            |r| r.health.last_latency_ms.unwrap_or(f64::NAN) / 1000.0,
        ),
        (
            "wsrouter_replica_load_sessions",
            "gauge",
            "Sessions on the replica as best known: its own report plus those opened since (NaN-free: without a report, this router's own).",
            |r| r.load() as f64,
        ),
    ];
    for (name, kind, help, value) in per_replica {
        family(&mut out, name, kind, help);
        for r in &snapshot.replicas {
            let _ = writeln!(
                out,
                "{name}{{replica=\"{}\"}} {}",
                label(&r.replica.name),
                value(r)
            );
        }
    }
    family(
        &mut out,
        "wsrouter_replica_health",
        "gauge",
        "1 for the replica's current health state.",
    );
    for r in &snapshot.replicas {
        for state in [Status::Unknown, Status::Healthy, Status::Unhealthy] {
            let on = u8::from(r.health.status == state);
            let _ = writeln!(
                out,
                "wsrouter_replica_health{{replica=\"{}\",state=\"{}\"}} {on}",
                label(&r.replica.name),
                state.as_str()
            );
        }
    }
    family(
        &mut out,
        "wsrouter_replica_connect_failures_total",
        "counter",
        "Failed upstream connects or handshakes, by kind (refused, timed_out, no_answer, unreachable count against health; bad_answer and local do not).",
    );
    for r in &snapshot.replicas {
        let prefix = format!("replica=\"{}\",", label(&r.replica.name));
        counter_lines(
            &mut out,
            "wsrouter_replica_connect_failures_total",
            &prefix,
            "reason",
            r.replica.connect_failures(),
        );
    }
    family(
        &mut out,
        "wsrouter_replica_probe_failures_total",
        "counter",
        "Failed health probes, by kind (local ones are the router's own and do not count against health).",
    );
    for r in &snapshot.replicas {
        let prefix = format!("replica=\"{}\",", label(&r.replica.name));
        counter_lines(
            &mut out,
            "wsrouter_replica_probe_failures_total",
            &prefix,
            "reason",
            r.replica.probe_failures(),
        );
    }
    for (name, help, pick) in [
        (
            "wsrouter_replica_frames_total",
            "Frames forwarded to and from the replica.",
            true,
        ),
        (
            "wsrouter_replica_bytes_total",
            "Payload bytes forwarded to and from the replica.",
            false,
        ),
    ] {
        family(&mut out, name, "counter", help);
        for r in &snapshot.replicas {
            let traffic = r.replica.traffic();
            for (direction, stats) in [
                ("to_upstream", &traffic.to_upstream),
                ("to_client", &traffic.to_client),
            ] {
                let value = if pick { stats.frames() } else { stats.bytes() };
                let _ = writeln!(
                    out,
                    "{name}{{replica=\"{}\",direction=\"{direction}\"}} {value}",
                    label(&r.replica.name)
                );
            }
        }
    }
    let name = "wsrouter_replica_handshake_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Upstream connect plus WebSocket handshake, per replica, for sessions that opened.",
    );
    for r in &snapshot.replicas {
        histogram_lines(
            &mut out,
            name,
            &format!("replica=\"{}\"", label(&r.replica.name)),
            r.replica.handshake_seconds(),
        );
    }

    family(
        &mut out,
        "wsrouter_discovery_lookups_total",
        "counter",
        "DNS lookups of each replica group, by result (empty and failed keep the last set).",
    );
    for g in &snapshot.groups {
        for (result, n) in [
            ("ok", g.lookups_ok),
            ("empty", g.lookups_empty),
            ("failed", g.lookups_failed),
        ] {
            let _ = writeln!(
                out,
                "wsrouter_discovery_lookups_total{{group=\"{}\",result=\"{result}\"}} {n}",
                label(&g.name)
            );
        }
    }
    family(
        &mut out,
        "wsrouter_discovery_replicas",
        "gauge",
        "Addresses the last good lookup of each replica group found.",
    );
    for g in &snapshot.groups {
        let _ = writeln!(
            out,
            "wsrouter_discovery_replicas{{group=\"{}\"}} {}",
            label(&g.name),
            g.found
        );
    }

    let gauges = [
        (
            "wsrouter_sessions_active",
            "Sessions open or opening on the router.",
            proxy.sessions.active() as f64,
        ),
        (
            "wsrouter_sessions_max",
            "limits.max_sessions in force.",
            proxy.sessions.max() as f64,
        ),
        (
            "wsrouter_connections_open",
            "Accepted connections still open (sessions included).",
            proxy.connections.open() as f64,
        ),
        (
            "wsrouter_connections_max",
            "limits.max_connections in force.",
            proxy.connections.max() as f64,
        ),
        (
            "wsrouter_draining",
            "1 while the router drains.",
            f64::from(u8::from(proxy.shutting_down())),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "wsrouter_connections_refused_total",
        "counter",
        "Connections closed as soon as they were accepted, by the limit they hit.",
    );
    counter_lines(
        &mut out,
        "wsrouter_connections_refused_total",
        "",
        "reason",
        &stats.connections_refused,
    );
    family(
        &mut out,
        "wsrouter_io_uring_sessions_total",
        "counter",
        "Sessions whose sockets moved onto an io_uring ring (listen.io = \"io_uring\").",
    );
    let _ = writeln!(
        out,
        "wsrouter_io_uring_sessions_total {}",
        stats.ring_sessions.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "wsrouter_tls_handshakes_total",
        "counter",
        "Client TLS handshakes on the listener, by outcome (0 without listen.tls).",
    );
    counter_lines(
        &mut out,
        "wsrouter_tls_handshakes_total",
        "",
        "result",
        &stats.tls_accepts,
    );
    family(
        &mut out,
        "wsrouter_sessions_rejected_total",
        "counter",
        "Upgrade requests that got no session, by reason.",
    );
    counter_lines(
        &mut out,
        "wsrouter_sessions_rejected_total",
        "",
        "reason",
        &stats.rejected,
    );
    family(
        &mut out,
        "wsrouter_sessions_stopped_total",
        "counter",
        "Live sessions the router ended, by reason.",
    );
    for (why, n) in stats.stopped() {
        let _ = writeln!(
            out,
            "wsrouter_sessions_stopped_total{{reason=\"{why}\"}} {n}"
        );
    }
    family(
        &mut out,
        "wsrouter_sessions_ended_total",
        "counter",
        "Sessions that had a 101, by how they ended.",
    );
    counter_lines(
        &mut out,
        "wsrouter_sessions_ended_total",
        "",
        "reason",
        &stats.ended,
    );
    family(&mut out, "wsrouter_close_codes_total", "counter", "Close codes of ended sessions, on the client's connection and on the replica's (none: no Close passed).");
    for (side, counters) in [
        ("client", &stats.client_close_codes),
        ("replica", &stats.replica_close_codes),
    ] {
        counter_lines(
            &mut out,
            "wsrouter_close_codes_total",
            &format!("side=\"{side}\","),
            "code",
            counters,
        );
    }
    debug_assert_eq!(CODE_LABELS.len(), crate::metrics::CloseCode::ALL.len());
    let (up, down) = (&stats.traffic.to_upstream, &stats.traffic.to_client);
    for (name, help, values) in [
        (
            "wsrouter_frames_total",
            "Frames forwarded, by direction.",
            [up.frames(), down.frames()],
        ),
        (
            "wsrouter_frame_bytes_total",
            "Payload bytes forwarded, by direction.",
            [up.bytes(), down.bytes()],
        ),
    ] {
        family(&mut out, name, "counter", help);
        for (direction, value) in ["to_upstream", "to_client"].into_iter().zip(values) {
            let _ = writeln!(out, "{name}{{direction=\"{direction}\"}} {value}");
        }
    }
    family(
        &mut out,
        "wsrouter_spliced_bytes_total",
        "counter",
        "Payload bytes of replicas' large frames moved to clients by splice(2), never copied through the router.",
    );
    let _ = writeln!(out, "wsrouter_spliced_bytes_total {}", down.spliced());
    let name = "wsrouter_upstream_handshake_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Upstream TCP connect plus WebSocket handshake, for sessions that opened.",
    );
    histogram_lines(&mut out, name, "", &stats.handshake_seconds);
    let name = "wsrouter_session_duration_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "How long sessions lasted, from the 101 to the end.",
    );
    histogram_lines(&mut out, name, "", &stats.session_seconds);

    family(
        &mut out,
        "wsrouter_config_reloads_total",
        "counter",
        "Config reloads, by result (a file that could not be read counts as neither).",
    );
    let _ = writeln!(
        out,
        "wsrouter_config_reloads_total{{result=\"ok\"}} {}",
        stats.reloads.ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "wsrouter_config_reloads_total{{result=\"failed\"}} {}",
        stats.reloads.failed.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "wsrouter_config_last_reload_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful reload (0: none).",
    );
    let _ = writeln!(
        out,
        "wsrouter_config_last_reload_success_timestamp_seconds {}",
        stats.reloads.last_ok_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0
    );
    family(
        &mut out,
        "wsrouter_build_info",
        "gauge",
        "The running build: version and commit.",
    );
    let _ = writeln!(
        out,
        "wsrouter_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        crate::BUILD_COMMIT
    );
    process_metrics(&mut out);

    let mut response = Response::new(Body::new(Bytes::from(out)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// The standard process_* metrics, from /proc (Linux).
fn process_metrics(out: &mut String) {
    let Some(process) = crate::process::Usage::read() else {
        return;
    };
    for (name, kind, help, value) in [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            process.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            process.resident_bytes as f64,
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            process.open_fds as f64,
        ),
        (
            "process_max_fds",
            "gauge",
            "The open-file limit.",
            process.max_fds as f64,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            process.start_time_seconds,
        ),
    ] {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
}
