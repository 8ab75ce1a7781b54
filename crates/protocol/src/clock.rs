//! Clocks. This module is the only place that reads wall time (see `clippy.toml`).
//!
//! Plan timers (period boundaries, SoC integration, `late`/`expired`, the daily fetch) run on
//! a [`Clock`]; transport timers (keep-alive, timeouts, heartbeats) run on real time.

use std::fmt::Debug;
use std::sync::Mutex;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// A source of "now" for plan time.
pub trait Clock: Send + Sync + Debug {
    /// The current instant.
    fn now(&self) -> Timestamp;

    /// How many clock seconds pass per real second.
    fn speed(&self) -> f64 {
        1.0
    }

    /// How long, in real time, a span of clock time lasts. Negative spans are zero.
    fn real_duration(&self, span: SignedDuration) -> Duration {
        let secs = span.as_secs_f64() / self.speed();
        if secs.is_finite() && secs > 0.0 {
            Duration::from_secs_f64(secs)
        } else {
            Duration::ZERO
        }
    }

    /// How much clock time passes in a span of real time (saturating).
    fn clock_duration(&self, real: Duration) -> SignedDuration {
        SignedDuration::try_from(real.mul_f64(self.speed())).unwrap_or(SignedDuration::MAX)
    }

    /// How long, in real time, until the clock reads `instant`.
    fn real_until(&self, instant: Timestamp) -> Duration {
        self.real_duration(instant.duration_since(self.now()))
    }
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place that reads wall time
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// `sim = start + (real_now − anchor) × speed`: a whole day plays in minutes.
/// Processes that must agree share `start`, `anchor` and `speed`.
#[derive(Clone, Copy, Debug)]
pub struct ScaledClock {
    start: Timestamp,
    anchor: Timestamp,
    speed: f64,
}

impl ScaledClock {
    /// A clock that read `start` at real instant `anchor` and runs `speed` times real time.
    pub fn new(start: Timestamp, anchor: Timestamp, speed: f64) -> ScaledClock {
        ScaledClock {
            start,
            anchor,
            speed: if speed.is_finite() && speed > 0.0 {
                speed
            } else {
                1.0
            },
        }
    }

    /// A clock that reads `start` now.
    pub fn starting_now(start: Timestamp, speed: f64) -> ScaledClock {
        ScaledClock::new(start, SystemClock.now(), speed)
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> Timestamp {
        let real = SystemClock.now().duration_since(self.anchor);
        let scaled = SignedDuration::from_secs_f64(real.as_secs_f64() * self.speed);
        self.start.saturating_add(scaled).unwrap_or(self.start)
    }

    fn speed(&self) -> f64 {
        self.speed
    }
}

/// A clock that moves only when told: for unit tests of pure logic.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
}

impl ManualClock {
    /// A clock reading `now`.
    pub fn new(now: Timestamp) -> ManualClock {
        ManualClock {
            now: Mutex::new(now),
        }
    }

    /// Sets the time.
    pub fn set(&self, now: Timestamp) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// Moves the time forward.
    pub fn advance(&self, by: SignedDuration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = now.saturating_add(by).unwrap_or(*now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A monotonic instant for transport timers (outbox resend ages, latency figures).
#[allow(clippy::disallowed_methods)] // monotonic real time is read here and only here
pub fn monotonic() -> std::time::Instant {
    std::time::Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scaled_clock_runs_at_its_speed() {
        let start: Timestamp = "2026-11-30T00:00:00Z".parse().unwrap();
        let anchor = SystemClock.now() - SignedDuration::from_secs(2);
        let clock = ScaledClock::new(start, anchor, 600.0);
        let elapsed = clock.now().duration_since(start).as_secs();
        assert!((1200..1300).contains(&elapsed), "{elapsed}");
        assert_eq!(
            clock.real_duration(SignedDuration::from_secs(1800)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let t: Timestamp = "2026-11-30T00:00:00Z".parse().unwrap();
        let clock = ManualClock::new(t);
        assert_eq!(clock.now(), t);
        clock.advance(SignedDuration::from_secs(60));
        assert_eq!(clock.now().to_string(), "2026-11-30T00:01:00Z");
        assert_eq!(clock.real_until(t), Duration::ZERO);
    }
}
