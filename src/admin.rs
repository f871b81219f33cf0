//! Admin endpoints: `GET /status` (every replica, reference schema plus extras),
//! `GET /metrics` (Prometheus text) and `GET /health` (the router's own liveness).

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::proxy::stats::{Rejection, Stats, HISTOGRAM_BOUNDS};
use crate::proxy::Body;
use crate::registry::{ReplicaState, Snapshot, Status};

pub fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub fn error_body(code: &str, message: &str) -> Value {
    json!({"type": "error", "code": code, "message": message})
}

pub fn health() -> Response<Body> {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// The /status document: `replicas` keeps the reference fields (url, primary, status,
/// last_ok_at, last_latency_ms, consecutive_failures) and adds the rest.
pub fn status_json(snapshot: &Snapshot, active_sessions: usize, max_sessions: usize) -> Value {
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
                "last_ok_at": r.health.last_ok_at,
                "last_latency_ms": r.health.last_latency_ms,
                "consecutive_failures": r.health.consecutive_failures,
                "consecutive_successes": r.health.consecutive_successes,
                "last_error": r.health.last_error,
                "active_sessions": r.replica.active_sessions(),
                "max_sessions": (r.replica.max_sessions != usize::MAX).then_some(r.replica.max_sessions),
                "total_sessions": r.replica.total_sessions(),
            })
        })
        .collect();
    json!({
        "replicas": replicas,
        "sessions": {"active": active_sessions, "max": max_sessions},
    })
}

pub fn status(snapshot: &Snapshot, active_sessions: usize, max_sessions: usize) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &status_json(snapshot, active_sessions, max_sessions),
    )
}

/// Prometheus label values: escape backslash, quote and newline.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// `GET /metrics` in the Prometheus text format.
pub fn metrics(snapshot: &Snapshot, stats: &Stats, active_sessions: usize) -> Response<Body> {
    use std::fmt::Write;
    let mut out = String::with_capacity(4096);
    type Value = fn(&ReplicaState) -> f64;
    let per_replica: [(&str, &str, &str, Value); 6] = [
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
            "wsrouter_replica_connect_failures_total",
            "counter",
            "Failed upstream connects or handshakes.",
            |r| r.replica.connect_failures() as f64,
        ),
        (
            "wsrouter_replica_up",
            "gauge",
            "1 if the replica is healthy (selectable), else 0.",
            |r| f64::from(u8::from(r.selectable())),
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
            "Latency of the last probe.",
            |r| r.health.last_latency_ms.unwrap_or(f64::NAN) / 1000.0,
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
        "wsrouter_sessions_active",
        "gauge",
        "Sessions open or opening on the router.",
    );
    let _ = writeln!(out, "wsrouter_sessions_active {active_sessions}");
    family(
        &mut out,
        "wsrouter_sessions_rejected_total",
        "counter",
        "Upgrade requests that got no session, by reason.",
    );
    for why in Rejection::ALL {
        let _ = writeln!(
            out,
            "wsrouter_sessions_rejected_total{{reason=\"{}\"}} {}",
            why.label(),
            stats.rejected(why)
        );
    }
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
    let (up, down) = (&stats.traffic.to_upstream, &stats.traffic.to_client);
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let per_direction = [
        (
            "wsrouter_frames_total",
            "Frames forwarded, by direction.",
            [load(&up.frames), load(&down.frames)],
        ),
        (
            "wsrouter_frame_bytes_total",
            "Payload bytes forwarded, by direction.",
            [load(&up.bytes), load(&down.bytes)],
        ),
    ];
    for (name, help, values) in per_direction {
        family(&mut out, name, "counter", help);
        for (direction, value) in ["to_upstream", "to_client"].into_iter().zip(values) {
            let _ = writeln!(out, "{name}{{direction=\"{direction}\"}} {value}");
        }
    }
    let name = "wsrouter_upstream_handshake_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Upstream TCP connect plus WebSocket handshake, for sessions that opened.",
    );
    let (cumulative, sum) = stats.handshake_seconds.cumulative();
    let bounds = HISTOGRAM_BOUNDS
        .iter()
        .map(|b| b.to_string())
        .chain(["+Inf".to_string()]);
    for (bound, count) in bounds.zip(&cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "{name}_sum {sum}\n{name}_count {}",
        cumulative.last().copied().unwrap_or(0)
    );

    let mut response = Response::new(Body::new(Bytes::from(out)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
