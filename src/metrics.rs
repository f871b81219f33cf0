//! What the router counts, as lock-free atomics: every counter set is keyed by one of the
//! vocabularies ([`CloseReason`], [`Rejection`], [`ConnectFailure`], [`ProbeFailure`]), so a
//! label can neither be misspelt nor forgotten. Pumps add their frame counts in batches, when
//! they flush, not per frame. Rendering to Prometheus text lives with the admin endpoints.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::close::{code_label, CloseReason, CODE_LABELS};

/// A closed set of label values.
pub trait Label: Copy + 'static {
    const ALL: &'static [Self];
    fn index(self) -> usize;
    fn label(self) -> &'static str;
}

/// One counter per label value.
pub struct Counters<L: Label> {
    counts: Box<[AtomicU64]>,
    labels: PhantomData<L>,
}

impl<L: Label> Default for Counters<L> {
    fn default() -> Self {
        Counters {
            counts: L::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            labels: PhantomData,
        }
    }
}

impl<L: Label> std::fmt::Debug for Counters<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<L: Label> Counters<L> {
    pub fn add(&self, label: L) {
        self.counts[label.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, label: L) -> u64 {
        self.counts[label.index()].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Every label with its count, in the vocabulary's order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        L::ALL
            .iter()
            .zip(self.counts.iter())
            .map(|(l, c)| (l.label(), c.load(Ordering::Relaxed)))
    }
}

impl Label for CloseReason {
    const ALL: &'static [CloseReason] = &CloseReason::ALL;
    fn index(self) -> usize {
        CloseReason::index(self)
    }
    fn label(self) -> &'static str {
        CloseReason::label(self)
    }
}

/// Why an upgrade request got no session (counted once, where the answer is made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not a valid WebSocket upgrade (426, 400, 405, 417).
    BadHandshake,
    /// The router is draining (503).
    Draining,
    /// `max_sessions` reached (503).
    SessionLimit,
    /// `max_sessions_per_client` reached for this client (503).
    ClientSessionLimit,
    /// A replica answered the upgrade with a 4xx, passed on to the client.
    ReplicaRefused,
    /// After the 101: no healthy replica.
    NoHealthyReplica,
    /// After the 101: every healthy replica full.
    AtCapacity,
    /// After the 101: the router is out of descriptors, memory or ports.
    RouterOverloaded,
    /// After the 101: every candidate failed to connect.
    ConnectFailed,
}

impl Label for Rejection {
    const ALL: &'static [Rejection] = &[
        Rejection::BadHandshake,
        Rejection::Draining,
        Rejection::SessionLimit,
        Rejection::ClientSessionLimit,
        Rejection::ReplicaRefused,
        Rejection::NoHealthyReplica,
        Rejection::AtCapacity,
        Rejection::RouterOverloaded,
        Rejection::ConnectFailed,
    ];
    fn index(self) -> usize {
        self as usize
    }
    fn label(self) -> &'static str {
        match self {
            Rejection::BadHandshake => "bad_handshake",
            Rejection::Draining => "draining",
            Rejection::SessionLimit => "session_limit",
            Rejection::ClientSessionLimit => "client_session_limit",
            Rejection::ReplicaRefused => "replica_refused",
            Rejection::NoHealthyReplica => "no_healthy_replica",
            Rejection::AtCapacity => "at_capacity",
            Rejection::RouterOverloaded => "router_overloaded",
            Rejection::ConnectFailed => "connect_failed",
        }
    }
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// `max_connections` reached.
    ConnectionLimit,
    /// `max_connections_per_client` reached for this address.
    ClientConnectionLimit,
}

impl Label for ConnectionRefusal {
    const ALL: &'static [ConnectionRefusal] = &[
        ConnectionRefusal::ConnectionLimit,
        ConnectionRefusal::ClientConnectionLimit,
    ];
    fn index(self) -> usize {
        self as usize
    }
    fn label(self) -> &'static str {
        match self {
            ConnectionRefusal::ConnectionLimit => "connection_limit",
            ConnectionRefusal::ClientConnectionLimit => "client_connection_limit",
        }
    }
}

/// How a client's TLS handshake on the listener ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsAccept {
    Completed,
    /// Not done within `header_read_timeout`.
    TimedOut,
    /// The client spoke something else than TLS (plain HTTP, say).
    NotTls,
    /// A TLS error or alert (no shared version or cipher, bad record), or a dropped connection.
    Failed,
}

impl Label for TlsAccept {
    const ALL: &'static [TlsAccept] = &[
        TlsAccept::Completed,
        TlsAccept::TimedOut,
        TlsAccept::NotTls,
        TlsAccept::Failed,
    ];
    fn index(self) -> usize {
        self as usize
    }
    fn label(self) -> &'static str {
        match self {
            TlsAccept::Completed => "completed",
            TlsAccept::TimedOut => "timed_out",
            TlsAccept::NotTls => "not_tls",
            TlsAccept::Failed => "failed",
        }
    }
}

/// How an upstream connect or handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The replica refused the TCP connection.
    Refused,
    /// No connection or no answer within the connect timeout.
    TimedOut,
    /// The connection was reset or closed before the replica answered.
    NoAnswer,
    /// The network said the replica cannot be reached (unreachable, no route).
    Unreachable,
    /// The replica answered, but not with a valid 101 (a per-request answer).
    BadAnswer,
    /// The router's own resources ran out (descriptors, memory, ports).
    Local,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
}

impl Label for ConnectFailure {
    const ALL: &'static [ConnectFailure] = &[
        ConnectFailure::Refused,
        ConnectFailure::TimedOut,
        ConnectFailure::NoAnswer,
        ConnectFailure::Unreachable,
        ConnectFailure::BadAnswer,
        ConnectFailure::Local,
        ConnectFailure::Tls,
    ];
    fn index(self) -> usize {
        self as usize
    }
    fn label(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::TimedOut => "timed_out",
            ConnectFailure::NoAnswer => "no_answer",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::BadAnswer => "bad_answer",
            ConnectFailure::Local => "local",
            ConnectFailure::Tls => "tls",
        }
    }
}

/// How a health probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFailure {
    /// No TCP connection (refused, unreachable).
    Connect,
    /// No answer within the probe timeout.
    TimedOut,
    /// The replica answered with a status of 400 or more.
    Status,
    /// The answer broke off or was not HTTP.
    BadAnswer,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// The router's own resources ran out: not held against the replica.
    Local,
}

impl Label for ProbeFailure {
    const ALL: &'static [ProbeFailure] = &[
        ProbeFailure::Connect,
        ProbeFailure::TimedOut,
        ProbeFailure::Status,
        ProbeFailure::BadAnswer,
        ProbeFailure::Tls,
        ProbeFailure::Local,
    ];
    fn index(self) -> usize {
        self as usize
    }
    fn label(self) -> &'static str {
        match self {
            ProbeFailure::Connect => "connect",
            ProbeFailure::TimedOut => "timed_out",
            ProbeFailure::Status => "status",
            ProbeFailure::BadAnswer => "bad_answer",
            ProbeFailure::Tls => "tls",
            ProbeFailure::Local => "local",
        }
    }
}

/// A close code as counted (see [`code_label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub Option<u16>);

impl Label for CloseCode {
    const ALL: &'static [CloseCode] = &[
        CloseCode(None),
        CloseCode(Some(1000)),
        CloseCode(Some(1001)),
        CloseCode(Some(1002)),
        CloseCode(Some(1003)),
        CloseCode(Some(1005)),
        CloseCode(Some(1007)),
        CloseCode(Some(1008)),
        CloseCode(Some(1009)),
        CloseCode(Some(1010)),
        CloseCode(Some(1011)),
        CloseCode(Some(1012)),
        CloseCode(Some(1013)),
        CloseCode(Some(0)),
    ];
    fn index(self) -> usize {
        let label = code_label(self.0);
        CODE_LABELS
            .iter()
            .position(|l| *l == label)
            .expect("every label is listed")
    }
    fn label(self) -> &'static str {
        code_label(self.0)
    }
}

/// Frames and payload bytes forwarded in one direction.
#[derive(Debug, Default)]
pub struct DirectionStats {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    /// Payload bytes of these that moved by splice(2), never entering user space.
    pub spliced: AtomicU64,
}

impl DirectionStats {
    pub fn add(&self, frames: u64, bytes: u64) {
        if frames > 0 {
            self.frames.fetch_add(frames, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn count_spliced(&self, bytes: usize) {
        self.spliced.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    pub fn spliced(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Both directions of forwarded traffic.
#[derive(Debug, Default)]
pub struct Traffic {
    pub to_upstream: DirectionStats,
    pub to_client: DirectionStats,
}

/// A Prometheus-style histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("bounds", &self.bounds)
            .finish()
    }
}

/// Upstream handshakes: sub-millisecond on a LAN, seconds when a replica struggles.
pub const HANDSHAKE_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Session durations: a second to a day.
pub const SESSION_BOUNDS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Cumulative counts per bound (the last is +Inf), and the sum in seconds.
    pub fn cumulative(&self) -> (Vec<u64>, f64) {
        let mut total = 0;
        let counts = self
            .counts
            .iter()
            .map(|c| {
                total += c.load(Ordering::Relaxed);
                total
            })
            .collect();
        (counts, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Reload outcomes.
#[derive(Debug, Default)]
pub struct Reloads {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Unix time of the last successful reload, in milliseconds (0: none yet).
    pub last_ok_unix_ms: AtomicU64,
}

/// Everything the router counts (per-replica counters live with the replica).
#[derive(Debug)]
pub struct Metrics {
    pub rejected: Counters<Rejection>,
    pub connections_refused: Counters<ConnectionRefusal>,
    /// Client TLS handshakes on the listener, by outcome.
    pub tls_accepts: Counters<TlsAccept>,
    /// Every session that had a 101, by how it ended.
    pub ended: Counters<CloseReason>,
    /// Close codes on the client side and on the replica side of ended sessions.
    pub client_close_codes: Counters<CloseCode>,
    pub replica_close_codes: Counters<CloseCode>,
    pub traffic: Traffic,
    /// Upstream connect plus WebSocket handshake, for sessions that opened.
    pub handshake_seconds: Histogram,
    pub session_seconds: Histogram,
    pub reloads: Reloads,
    /// Connections accepted and still open (sessions included).
    pub open_connections: AtomicU64,
    /// Sessions whose sockets moved onto an io_uring ring (`[listen] io = "io_uring"`).
    pub ring_sessions: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            rejected: Counters::default(),
            connections_refused: Counters::default(),
            tls_accepts: Counters::default(),
            ended: Counters::default(),
            client_close_codes: Counters::default(),
            replica_close_codes: Counters::default(),
            traffic: Traffic::default(),
            handshake_seconds: Histogram::new(HANDSHAKE_BOUNDS),
            session_seconds: Histogram::new(SESSION_BOUNDS),
            reloads: Reloads::default(),
            open_connections: AtomicU64::new(0),
            ring_sessions: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Sessions the router ended on its own account, by reason.
    pub fn stopped(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CloseReason::ALL
            .iter()
            .filter(|r| r.is_router_stop())
            .map(|r| (r.label(), self.ended.get(*r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_vocabulary<L: Label + std::fmt::Debug>() {
        for (i, label) in L::ALL.iter().enumerate() {
            assert_eq!(label.index(), i, "{label:?}");
        }
        let names: std::collections::HashSet<_> = L::ALL.iter().map(|l| l.label()).collect();
        assert_eq!(names.len(), L::ALL.len());
    }

    #[test]
    fn every_vocabulary_indexes_its_own_slots() {
        check_vocabulary::<CloseReason>();
        check_vocabulary::<Rejection>();
        check_vocabulary::<ConnectionRefusal>();
        check_vocabulary::<TlsAccept>();
        check_vocabulary::<ConnectFailure>();
        check_vocabulary::<ProbeFailure>();
        check_vocabulary::<CloseCode>();
    }

    #[test]
    fn unusual_close_codes_share_one_slot() {
        let codes: Counters<CloseCode> = Counters::default();
        codes.add(CloseCode(Some(4000)));
        codes.add(CloseCode(Some(3001)));
        codes.add(CloseCode(Some(1000)));
        assert_eq!(codes.get(CloseCode(Some(0))), 2);
        assert_eq!(codes.get(CloseCode(Some(1000))), 1);
    }
}
