//! One vocabulary for how a session ends: every reason the router closes (or refuses) a session,
//! with what each side is told (close code, wire reason, the JSON error a client gets) and the
//! label it is counted under.
//!
//! The client error contract (README, "Errors the client sees") is this table; nothing else
//! builds a close frame or an error frame.

/// Why a session ended (or, after its 101, could not start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client sent Close first; it was passed on.
    ClientClosed,
    /// The replica sent Close first; it was passed on.
    WorkerClosed,
    /// No replica is healthy.
    NoHealthyReplica,
    /// Healthy replicas exist, all at their capacity.
    AtCapacity,
    /// The router itself ran out of something (descriptors, memory, ports): no replica's fault.
    RouterOverloaded,
    /// Every candidate replica failed its upstream connect or handshake.
    ConnectFailed,
    /// The replica went away or broke the protocol mid-session.
    WorkerFailed,
    /// The replica sent a frame over `max_frame_bytes`.
    WorkerFrameTooLarge,
    /// The client went away without a Close.
    ClientGone,
    /// The client broke the protocol; `code` is what it is told (1002, 1007 or 1009).
    ClientProtocolError { code: u16 },
    /// The router is shutting down.
    Shutdown,
    /// The replica turned unhealthy (`close_on_unhealthy`).
    WorkerUnhealthy,
    /// The session reached `max_lifetime_seconds`.
    SessionExpired,
    /// Nothing was forwarded either way for `idle_timeout_seconds`.
    IdleTimeout,
    /// The client did not answer keepalive pings.
    ClientUnresponsive,
    /// The replica did not answer keepalive pings.
    WorkerUnresponsive,
}

/// What one side of a session is told when it ends: an optional JSON error text frame (clients
/// only), then an optional Close (none when that side is already gone or closed first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub error: Option<ErrorFrame>,
    pub close: Option<(u16, &'static str)>,
}

impl Notice {
    pub const NONE: Notice = Notice {
        error: None,
        close: None,
    };

    pub fn close(code: u16, reason: &'static str) -> Notice {
        Notice {
            error: None,
            close: Some((code, reason)),
        }
    }
}

/// The JSON error frame of the client contract:
/// `{"type":"error","code":...,"message":...,"retryable":true,"request_id":...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: &'static str,
    pub message: String,
    /// The id the router's log lines about this session carry.
    pub request_id: Option<RequestId>,
}

impl ErrorFrame {
    pub fn to_json(&self) -> String {
        let mut value = serde_json::json!({
            "type": "error",
            "code": self.code,
            "message": self.message,
            "retryable": true,
        });
        if let Some(id) = self.request_id {
            value["request_id"] = id.to_string().into();
        }
        value.to_string()
    }
}

/// Correlates what a client is told with the router's log lines: 16 hex digits, unique per
/// router process and unpredictable across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

impl RequestId {
    /// The next id: a per-process random start, then a counter mixed so ids do not reveal
    /// how many sessions the router served.
    pub fn next() -> RequestId {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static SEED: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(rand::random);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // splitmix64 of seed + n: a bijection, so ids never repeat within a process.
        let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        RequestId(z ^ (z >> 31))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl CloseReason {
    /// Every reason, for counters keyed by reason (`ClientProtocolError` stands for all codes).
    pub const ALL: [CloseReason; 16] = [
        CloseReason::ClientClosed,
        CloseReason::WorkerClosed,
        CloseReason::NoHealthyReplica,
        CloseReason::AtCapacity,
        CloseReason::RouterOverloaded,
        CloseReason::ConnectFailed,
        CloseReason::WorkerFailed,
        CloseReason::WorkerFrameTooLarge,
        CloseReason::ClientGone,
        CloseReason::ClientProtocolError { code: 1002 },
        CloseReason::Shutdown,
        CloseReason::WorkerUnhealthy,
        CloseReason::SessionExpired,
        CloseReason::IdleTimeout,
        CloseReason::ClientUnresponsive,
        CloseReason::WorkerUnresponsive,
    ];

    /// Position in [`CloseReason::ALL`].
    pub fn index(self) -> usize {
        match self {
            CloseReason::ClientClosed => 0,
            CloseReason::WorkerClosed => 1,
            CloseReason::NoHealthyReplica => 2,
            CloseReason::AtCapacity => 3,
            CloseReason::RouterOverloaded => 4,
            CloseReason::ConnectFailed => 5,
            CloseReason::WorkerFailed => 6,
            CloseReason::WorkerFrameTooLarge => 7,
            CloseReason::ClientGone => 8,
            CloseReason::ClientProtocolError { .. } => 9,
            CloseReason::Shutdown => 10,
            CloseReason::WorkerUnhealthy => 11,
            CloseReason::SessionExpired => 12,
            CloseReason::IdleTimeout => 13,
            CloseReason::ClientUnresponsive => 14,
            CloseReason::WorkerUnresponsive => 15,
        }
    }

    /// The label it is counted and logged under.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::WorkerClosed => "worker_closed",
            CloseReason::NoHealthyReplica => "no_healthy_replica",
            CloseReason::AtCapacity => "at_capacity",
            CloseReason::RouterOverloaded => "router_overloaded",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::WorkerFailed => "worker_failed",
            CloseReason::WorkerFrameTooLarge => "worker_frame_too_large",
            CloseReason::ClientGone => "client_gone",
            CloseReason::ClientProtocolError { .. } => "client_protocol_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::WorkerUnhealthy => "worker_unhealthy",
            CloseReason::SessionExpired => "session_expired",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ClientUnresponsive => "client_unresponsive",
            CloseReason::WorkerUnresponsive => "worker_unresponsive",
        }
    }

    /// Whether the router ended a live session on its own account (counted as "stopped").
    pub fn is_router_stop(self) -> bool {
        matches!(
            self,
            CloseReason::Shutdown
                | CloseReason::WorkerUnhealthy
                | CloseReason::SessionExpired
                | CloseReason::IdleTimeout
                | CloseReason::ClientUnresponsive
                | CloseReason::WorkerUnresponsive
        )
    }

    /// The JSON error code and default message the client gets, if any.
    fn error(self) -> Option<(&'static str, &'static str)> {
        Some(match self {
            CloseReason::NoHealthyReplica => (
                "gpu_unavailable",
                "no healthy replica is available; try again shortly",
            ),
            CloseReason::AtCapacity => (
                "gpu_unavailable",
                "every healthy replica is at capacity; try again shortly",
            ),
            CloseReason::RouterOverloaded => (
                "gpu_unavailable",
                "the router is out of resources for new sessions; try again shortly",
            ),
            CloseReason::ConnectFailed => ("worker_failed", "could not reach any worker"),
            CloseReason::WorkerFailed => ("worker_failed", "the connection to the worker failed"),
            CloseReason::WorkerFrameTooLarge => (
                "worker_failed",
                "the worker sent a frame larger than the router accepts",
            ),
            CloseReason::WorkerUnresponsive => {
                ("worker_failed", "the worker stopped answering pings")
            }
            CloseReason::WorkerUnhealthy => (
                "worker_unhealthy",
                "the worker serving this session became unhealthy; reconnect to continue on another",
            ),
            CloseReason::SessionExpired => (
                "session_expired",
                "the session reached its maximum lifetime; reconnect to continue",
            ),
            _ => return None,
        })
    }

    /// What the client is told. `detail`, when given, replaces the default message (for
    /// instance the per-replica failures of a join); `request_id` goes into the JSON.
    pub fn to_client(self, detail: Option<String>, request_id: Option<RequestId>) -> Notice {
        let close = match self {
            CloseReason::ClientClosed | CloseReason::ClientGone => None,
            CloseReason::WorkerClosed => None,
            CloseReason::NoHealthyReplica => Some((1013, "no_healthy_replica")),
            CloseReason::AtCapacity => Some((1013, "at_capacity")),
            CloseReason::RouterOverloaded => Some((1013, "router_overloaded")),
            CloseReason::ConnectFailed
            | CloseReason::WorkerFailed
            | CloseReason::WorkerUnresponsive => Some((1011, "worker_failed")),
            CloseReason::WorkerFrameTooLarge => Some((1009, "worker_failed")),
            CloseReason::ClientProtocolError { code } => Some((code, "protocol error")),
            CloseReason::Shutdown => Some((1001, "router shutting down")),
            CloseReason::WorkerUnhealthy | CloseReason::SessionExpired => Some((1012, "reconnect")),
            CloseReason::IdleTimeout => Some((1001, "idle timeout")),
            CloseReason::ClientUnresponsive => Some((1001, "no answer to ping")),
        };
        let error = self.error().map(|(code, message)| ErrorFrame {
            code,
            message: detail.unwrap_or_else(|| message.to_string()),
            request_id,
        });
        Notice { error, close }
    }

    /// What the replica is told (it never gets JSON). `owed` is the close code a replica that
    /// broke the protocol has earned, if it is still there to hear it.
    pub fn to_replica(self, owed: Option<u16>) -> Notice {
        match self {
            CloseReason::ClientClosed | CloseReason::WorkerClosed => Notice::NONE,
            CloseReason::ClientGone | CloseReason::ClientProtocolError { .. } => {
                Notice::close(1001, "client went away")
            }
            CloseReason::WorkerFailed | CloseReason::WorkerFrameTooLarge => match owed {
                Some(code) => Notice::close(code, "protocol error"),
                None => Notice::NONE,
            },
            CloseReason::Shutdown => Notice::close(1001, "router shutting down"),
            CloseReason::WorkerUnhealthy | CloseReason::SessionExpired => {
                Notice::close(1001, "session moved")
            }
            CloseReason::IdleTimeout => Notice::close(1001, "idle timeout"),
            CloseReason::ClientUnresponsive => Notice::close(1001, "client went away"),
            CloseReason::WorkerUnresponsive => Notice::close(1001, "no answer to ping"),
            // Refusals happen before any replica session exists.
            CloseReason::NoHealthyReplica
            | CloseReason::AtCapacity
            | CloseReason::RouterOverloaded
            | CloseReason::ConnectFailed => Notice::NONE,
        }
    }
}

/// A close frame's code as counted: the codes RFC 6455 names, or "other".
pub fn code_label(code: Option<u16>) -> &'static str {
    match code {
        None => "none",
        Some(1000) => "1000",
        Some(1001) => "1001",
        Some(1002) => "1002",
        Some(1003) => "1003",
        Some(1005) => "1005",
        Some(1007) => "1007",
        Some(1008) => "1008",
        Some(1009) => "1009",
        Some(1010) => "1010",
        Some(1011) => "1011",
        Some(1012) => "1012",
        Some(1013) => "1013",
        Some(_) => "other",
    }
}

/// Every label [`code_label`] gives, in order.
pub const CODE_LABELS: [&str; 14] = [
    "none", "1000", "1001", "1002", "1003", "1005", "1007", "1008", "1009", "1010", "1011", "1012",
    "1013", "other",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_and_label() {
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
        let labels: std::collections::HashSet<_> =
            CloseReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), CloseReason::ALL.len());
        for label in CODE_LABELS {
            assert!(CODE_LABELS.iter().filter(|l| **l == label).count() == 1);
        }
    }

    #[test]
    fn the_client_contract_holds() {
        let unavailable = CloseReason::NoHealthyReplica.to_client(None, None);
        assert_eq!(unavailable.close, Some((1013, "no_healthy_replica")));
        assert_eq!(unavailable.error.unwrap().code, "gpu_unavailable");
        let full = CloseReason::AtCapacity.to_client(None, None);
        assert_eq!(full.close, Some((1013, "at_capacity")));
        assert!(full.error.unwrap().message.contains("capacity"));
        let failed = CloseReason::ConnectFailed
            .to_client(Some("gpu-1: connection refused".into()), Some(RequestId(1)));
        assert_eq!(failed.close, Some((1011, "worker_failed")));
        let json: serde_json::Value =
            serde_json::from_str(&failed.error.unwrap().to_json()).unwrap();
        assert_eq!(json["code"], "worker_failed");
        assert_eq!(json["retryable"], true);
        assert_eq!(json["request_id"], "0000000000000001");
        assert_eq!(json["message"], "gpu-1: connection refused");
        assert_eq!(
            CloseReason::Shutdown.to_client(None, None),
            Notice::close(1001, "router shutting down")
        );
        assert_eq!(
            CloseReason::WorkerUnhealthy.to_replica(None),
            Notice::close(1001, "session moved")
        );
        assert_eq!(
            CloseReason::WorkerFailed.to_replica(Some(1002)),
            Notice::close(1002, "protocol error")
        );
        assert_eq!(
            CloseReason::ClientProtocolError { code: 1007 }.to_client(None, None),
            Notice::close(1007, "protocol error")
        );
    }

    #[test]
    fn request_ids_do_not_repeat() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| RequestId::next()).collect();
        assert_eq!(ids.len(), 10_000);
        assert_eq!(RequestId(0xab).to_string(), "00000000000000ab");
    }
}
