//! Counters the proxy keeps for /metrics: lock-free atomics, updated off the per-frame path
//! where possible (pumps add their counts in batches, when they flush).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a session could not be opened.
#[derive(Debug, Clone, Copy)]
pub enum Rejection {
    SessionLimit,
    NoHealthyReplica,
    AtCapacity,
    ConnectFailed,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::SessionLimit,
        Rejection::NoHealthyReplica,
        Rejection::AtCapacity,
        Rejection::ConnectFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::SessionLimit => "session_limit",
            Rejection::NoHealthyReplica => "no_healthy_replica",
            Rejection::AtCapacity => "at_capacity",
            Rejection::ConnectFailed => "connect_failed",
        }
    }
}

/// Frames and bytes forwarded in one direction.
#[derive(Default)]
pub struct DirectionStats {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
}

impl DirectionStats {
    pub fn add(&self, frames: u64, bytes: u64) {
        if frames > 0 {
            self.frames.fetch_add(frames, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
pub struct Traffic {
    pub to_upstream: DirectionStats,
    pub to_client: DirectionStats,
}

/// A Prometheus-style histogram with fixed buckets (seconds).
pub struct Histogram {
    counts: [AtomicU64; HISTOGRAM_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

pub const HISTOGRAM_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Default::default(),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = HISTOGRAM_BOUNDS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(HISTOGRAM_BOUNDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
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

/// Why the router ended live sessions (see `pump::Stop`).
pub const STOP_REASONS: [&str; 6] = [
    "shutdown",
    "worker_unhealthy",
    "session_expired",
    "idle_timeout",
    "client_unresponsive",
    "worker_unresponsive",
];

#[derive(Default)]
pub struct Stats {
    rejected: [AtomicU64; 4],
    stopped: [AtomicU64; STOP_REASONS.len()],
    pub traffic: Traffic,
    /// Upstream TCP connect plus WebSocket handshake, for sessions that opened.
    pub handshake_seconds: Histogram,
}

impl Stats {
    pub fn reject(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected[why as usize].load(Ordering::Relaxed)
    }

    pub fn count_stop(&self, why: &str) {
        if let Some(i) = STOP_REASONS.iter().position(|&r| r == why) {
            self.stopped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sessions the router ended, per reason in [`STOP_REASONS`].
    pub fn stopped(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        STOP_REASONS
            .iter()
            .zip(&self.stopped)
            .map(|(&why, n)| (why, n.load(Ordering::Relaxed)))
    }
}
