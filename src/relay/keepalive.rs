//! Keepalive: ping a side that has gone quiet, end the session when it stays quiet, and end
//! a session nothing has passed through for too long. Run by the bridge on a timer tick.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::pump::{heard, Direction};
use crate::close::CloseReason;

/// Keepalive settings of a session; `None` turns a mechanism off.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keepalive {
    /// Ping a side that has sent nothing for this long; if it still sends nothing for as long
    /// again, it is considered gone.
    pub ping_interval: Option<Duration>,
    /// End the session when no frame has been forwarded either way for this long.
    pub idle_timeout: Option<Duration>,
}

/// The bridge's view of one side's liveness.
struct Liveness {
    heard_at: Instant,
    pinged_at: Option<Instant>,
}

/// What a keepalive look found.
pub(super) enum Look {
    /// The pumps (by the direction they write) that must send a ping; often none.
    Ping(Vec<Direction>),
    End(CloseReason),
}

/// A session's keepalive bookkeeping ([`Keepalive::watch`]).
pub struct Watch {
    config: Keepalive,
    /// The next look; `timer` fires then (boxed: a timer is 100 bytes).
    due: Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The timer was polled for `due` and will wake the session when it fires.
    armed: bool,
    forwarded_at: Instant,
    /// Indexed by the direction of the pump that reads the side: [client, replica].
    sides: [Liveness; 2],
}

impl Keepalive {
    /// The bookkeeping for a session starting `now`; none when this asks for no keepalive.
    /// Boxed, so sessions without keepalive do not carry its room.
    pub fn watch(self, now: Instant) -> Option<Box<Watch>> {
        Watch::new(self, now)
    }
}

impl Watch {
    fn new(config: Keepalive, now: Instant) -> Option<Box<Watch>> {
        let due = now + Watch::period(&config)?;
        let side = || Liveness {
            heard_at: now,
            pinged_at: None,
        };
        Some(Box::new(Watch {
            config,
            due,
            timer: Box::pin(tokio::time::sleep_until(due)),
            armed: false,
            forwarded_at: now,
            sides: [side(), side()],
        }))
    }

    /// How often to look: a quarter of the idle timeout bounds how late it fires.
    fn period(config: &Keepalive) -> Option<Duration> {
        let idle = config.idle_timeout.map(|t| t / 4);
        match (config.ping_interval, idle) {
            (Some(p), Some(i)) => Some(p.min(i)),
            (p, i) => p.or(i),
        }
        .map(|t| t.max(Duration::from_millis(10)))
    }

    /// Ready when it is time to look. An armed timer wakes the session when it fires, so until
    /// `due` it is not polled again: the session is woken for every read and write, and a
    /// trip through tokio's timer on each would cost about a tenth of a small message's CPU.
    fn poll_due(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.armed && Instant::now() < self.due {
            return std::task::Poll::Pending;
        }
        if std::future::Future::poll(self.timer.as_mut(), cx).is_pending() {
            self.armed = true;
            return std::task::Poll::Pending;
        }
        // A late look delays the next one rather than bunching them up.
        let period = Watch::period(&self.config).expect("a watch has a period");
        self.due = Instant::now() + period;
        self.timer.as_mut().reset(self.due);
        self.armed = false;
        std::task::Poll::Ready(())
    }

    /// Take in what the pumps heard since the last look, then decide.
    pub(super) fn look(&mut self, heard: [&AtomicU8; 2], now: Instant) -> Look {
        for (side, bits) in self.sides.iter_mut().zip(heard) {
            let bits = bits.swap(0, Ordering::Relaxed);
            if bits & heard::ANY != 0 {
                side.heard_at = now;
                side.pinged_at = None;
            }
            if bits & heard::FORWARDED != 0 {
                self.forwarded_at = now;
            }
        }
        if let Some(idle) = self.config.idle_timeout {
            if now - self.forwarded_at >= idle {
                return Look::End(CloseReason::IdleTimeout);
            }
        }
        let Some(interval) = self.config.ping_interval else {
            return Look::Ping(Vec::new());
        };
        let mut pings = Vec::new();
        for (side, direction) in self
            .sides
            .iter_mut()
            .zip([Direction::ToUpstream, Direction::ToClient])
        {
            match side.pinged_at {
                Some(pinged) if now - pinged >= interval => {
                    return Look::End(match direction {
                        Direction::ToUpstream => CloseReason::ClientUnresponsive,
                        Direction::ToClient => CloseReason::WorkerUnresponsive,
                    });
                }
                Some(_) => {}
                None if now - side.heard_at >= interval => {
                    side.pinged_at = Some(now);
                    // The ping goes out through the pump that writes to that side.
                    pings.push(match direction {
                        Direction::ToUpstream => Direction::ToClient,
                        Direction::ToClient => Direction::ToUpstream,
                    });
                }
                None => {}
            }
        }
        Look::Ping(pings)
    }
}

/// The next keepalive look; never, without keepalive.
pub(super) fn tick(watch: &mut Option<Box<Watch>>) -> impl std::future::Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match watch {
        Some(watch) => watch.poll_due(cx),
        None => std::task::Poll::Pending,
    })
}
