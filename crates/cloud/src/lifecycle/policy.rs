//! The lifecycle's timing: when an unacknowledged message goes out again, when an
//! acknowledged command is given up as incomplete, and how far back a report still counts.

use std::time::Duration;

use jiff::SignedDuration;
use max300_protocol::Backoff;

/// The longest wait between two publishes of the same message.
pub const RESEND_MAX: SignedDuration = SignedDuration::from_mins(15);

/// How long after its date ends an acknowledged command may still have periods unreported
/// before it turns `incomplete` (DESIGN §6).
pub const INCOMPLETE_AFTER: SignedDuration = SignedDuration::from_hours(1);

/// The timing the lifecycle follows, from the service's settings and its clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// The first wait for an ack, in clock time (`ack_timeout_s`, default 60 s).
    pub ack_timeout: SignedDuration,
    /// The shortest wait between two publishes of one message, in clock time: 2 s of real
    /// time at the clock's speed, so a fast clock cannot cause a resend storm.
    pub floor: SignedDuration,
    /// Reports of periods that started longer ago than this are refused
    /// (`retention_days`, default 400).
    pub retention: SignedDuration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            ack_timeout: SignedDuration::from_secs(60),
            floor: SignedDuration::from_secs(2),
            retention: SignedDuration::from_hours(24 * 400),
        }
    }
}

impl Policy {
    /// The wait after the `attempt`-th publish (1-based): the ack timeout, doubling with each
    /// attempt up to 15 minutes ([`RESEND_MAX`]), and never under the floor. No jitter: the
    /// attempt count is stored with the command, and the wait is a pure function of it.
    pub fn resend_delay(&self, attempt: u32) -> SignedDuration {
        // A negative ack timeout (refused by the config) would wait the floor.
        let first = Duration::try_from(self.ack_timeout).unwrap_or(Duration::ZERO);
        let max = Duration::try_from(RESEND_MAX).unwrap_or(Duration::MAX);
        let wait = Backoff::new(first, max).delay(attempt.saturating_sub(1));
        SignedDuration::try_from(wait)
            .unwrap_or(RESEND_MAX)
            .max(self.floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resends_back_off_from_the_ack_timeout_to_fifteen_minutes() {
        let p = Policy::default();
        let delays: Vec<i64> = (1..=6).map(|n| p.resend_delay(n).as_secs()).collect();
        assert_eq!(delays, [60, 120, 240, 480, 900, 900]);
        assert_eq!(p.resend_delay(40), RESEND_MAX);
    }

    #[test]
    fn a_fast_clock_never_resends_faster_than_the_real_time_floor() {
        // At 1200×, 2 s of real time is 40 minutes of clock time.
        let p = Policy {
            floor: SignedDuration::from_mins(40),
            ..Policy::default()
        };
        assert_eq!(p.resend_delay(1), SignedDuration::from_mins(40));
        assert_eq!(p.resend_delay(9), SignedDuration::from_mins(40));
    }
}
