//! How long to wait before trying again: one pure exponential backoff for every retry loop
//! (the MQTT reconnect, the provider fetch, the daily fetch, lost store races, DynamoDB
//! throttling, the lifecycle's resends).
//!
//! A [`Backoff`] is a value, not a timer: it turns an attempt count into a pause, and the
//! caller sleeps (in real time or clock time, as its loop requires) and keeps the count. The
//! random part comes in as an argument, so the lifecycle can store its count in a database and
//! tests can pin the jitter.
//!
//! ```text
//!  attempt:   0      1       2        3  ...
//!  pause:   first  first·f  first·f²  ... capped at max, then × jitter in [low, high]
//! ```

use std::time::Duration;

/// An exponential backoff: `first`, growing `factor` times per attempt up to `max`, then
/// spread by a jitter multiplier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    first: Duration,
    factor: u32,
    max: Duration,
    /// The pause before jitter is multiplied by `low + (high - low) × sample`.
    low: f64,
    high: f64,
}

impl Backoff {
    /// Pauses of `first`, doubling with each attempt up to `max`, without jitter.
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            factor: 2,
            max,
            low: 1.0,
            high: 1.0,
        }
    }

    /// Each pause is `factor` times the one before (at least 1).
    pub const fn factor(self, factor: u32) -> Backoff {
        Backoff {
            factor: if factor == 0 { 1 } else { factor },
            ..self
        }
    }

    /// Spread each pause over `low..=high` times itself, e.g. `0.5, 1.5` for ±50 %, or
    /// `1.0, 2.0` for up to double. Two clients that failed together then retry apart.
    ///
    /// # Panics
    /// If the multipliers are not finite, negative, or `low > high`: a constant's mistake,
    /// caught when it is evaluated.
    pub const fn jitter(self, low: f64, high: f64) -> Backoff {
        assert!(
            low.is_finite() && high.is_finite() && 0.0 <= low && low <= high,
            "backoff jitter must be 0 <= low <= high"
        );
        Backoff { low, high, ..self }
    }

    /// The pause before jitter after `attempt` failures (0-based): `first × factor^attempt`,
    /// never more than `max`. It never overflows, however large `attempt` is.
    pub fn delay(&self, attempt: u32) -> Duration {
        let grown = match self.factor.checked_pow(attempt) {
            Some(times) => self.first.saturating_mul(times),
            None => self.max,
        };
        grown.min(self.max)
    }

    /// The pause after `attempt` failures, jittered by `sample`, a uniform random number in
    /// `0..=1` (e.g. `fastrand::f64()`); out-of-range samples are clamped. Without jitter
    /// this is [`Backoff::delay`].
    pub fn jittered(&self, attempt: u32, sample: f64) -> Duration {
        let base = self.delay(attempt);
        // NaN fails the comparison, and counts as 0.
        let sample = if sample >= 0.0 { sample.min(1.0) } else { 0.0 };
        let times = self.low + (self.high - self.low) * sample;
        if times == 1.0 {
            return base;
        }
        Duration::try_from_secs_f64(base.as_secs_f64() * times).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_from_first_up_to_max() {
        let b = Backoff::new(MS * 200, Duration::from_secs(30));
        let pauses: Vec<u128> = (0..10).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(
            pauses,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
    }

    #[test]
    fn a_factor_other_than_two_grows_by_that_factor() {
        let b = Backoff::new(MS * 500, Duration::from_secs(60)).factor(4);
        let pauses: Vec<u128> = (0..5).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(pauses, [500, 2000, 8000, 32000, 60000]);
        let flat = Backoff::new(MS * 5, Duration::from_secs(1)).factor(0);
        assert_eq!(flat.delay(1000), MS * 5, "a factor of 0 counts as 1");
    }

    #[test]
    fn a_huge_attempt_count_is_the_max_and_never_overflows() {
        let b = Backoff::new(Duration::from_secs(60), Duration::from_secs(900));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(900));
        assert_eq!(b.jittered(u32::MAX, 1.0), Duration::from_secs(900));
        let unbounded = Backoff::new(Duration::from_secs(1), Duration::MAX).jitter(1.0, 2.0);
        assert_eq!(unbounded.delay(200), Duration::MAX);
        assert_eq!(unbounded.jittered(200, 1.0), Duration::MAX);
    }

    #[test]
    fn a_first_pause_above_the_max_is_capped() {
        let b = Backoff::new(Duration::from_secs(20 * 60), Duration::from_secs(15 * 60));
        assert_eq!(b.delay(0), Duration::from_secs(15 * 60));
    }

    #[test]
    fn jitter_spreads_the_pause_between_its_multipliers() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(30)).jitter(0.5, 1.5);
        assert_eq!(b.jittered(0, 0.0), Duration::from_secs(1));
        assert_eq!(b.jittered(0, 0.5), Duration::from_secs(2));
        assert_eq!(b.jittered(0, 1.0), Duration::from_secs(3));
        // The cap applies before jitter: 30 s spread to 15..45 s.
        assert_eq!(b.jittered(10, 1.0), Duration::from_secs(45));
        let up = Backoff::new(MS * 5, MS * 320).jitter(1.0, 2.0);
        assert_eq!(up.jittered(1, 0.0), MS * 10);
        assert_eq!(up.jittered(1, 1.0), MS * 20);
    }

    #[test]
    fn samples_outside_zero_to_one_are_clamped() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(30)).jitter(0.5, 1.5);
        assert_eq!(b.jittered(0, -3.0), Duration::from_secs(1));
        assert_eq!(b.jittered(0, f64::NAN), Duration::from_secs(1));
        assert_eq!(b.jittered(0, 7.0), Duration::from_secs(3));
    }

    #[test]
    fn without_jitter_the_sample_changes_nothing() {
        let b = Backoff::new(Duration::from_secs(30), Duration::from_secs(900));
        for sample in [0.0, 0.3, 1.0] {
            assert_eq!(b.jittered(3, sample), b.delay(3));
        }
    }

    #[test]
    #[should_panic(expected = "low <= high")]
    fn jitter_with_low_above_high_is_refused() {
        let _ = Backoff::new(MS, MS).jitter(1.5, 0.5);
    }

    proptest::proptest! {
        #[test]
        fn a_pause_never_shrinks_and_stays_within_its_jitter(
            first_ms in 0u64..100_000,
            max_ms in 0u64..10_000_000,
            factor in 0u32..10,
            attempt in 0u32..200,
            sample in 0.0f64..=1.0,
        ) {
            let max = Duration::from_millis(max_ms);
            let b = Backoff::new(Duration::from_millis(first_ms), max)
                .factor(factor)
                .jitter(0.5, 1.5);
            let (now, next) = (b.delay(attempt), b.delay(attempt + 1));
            proptest::prop_assert!(next >= now);
            proptest::prop_assert!(now <= max);
            // Within a microsecond of the exact product: the jitter is computed in f64.
            let j = b.jittered(attempt, sample);
            let us = Duration::from_micros(1);
            proptest::prop_assert!(j + us >= now.mul_f64(0.5) && j <= now.mul_f64(1.5) + us);
        }
    }
}
