//! Admin endpoints: `GET /status` (every replica, reference schema plus extras) and
//! `GET /health` (the router's own liveness).

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::proxy::Body;
use crate::registry::Snapshot;

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
