//! What the fleet did at each period boundary, for its `fleet: boundary …` lines: how many
//! reports went out, how many were receipted and how long after the boundary the last receipt
//! came (real time), and how many were sent again. Pure: the caller passes the instants.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::Timestamp;

/// Per-boundary figures of one fleet.
#[derive(Debug)]
pub struct Tally {
    devices: usize,
    boundaries: BTreeMap<Timestamp, Figures>,
}

/// One boundary's figures.
#[derive(Clone, Debug, Default, PartialEq)]
struct Figures {
    /// When the boundary was reached, in real time.
    real_at: Option<Instant>,
    /// Devices that have reported for it.
    devices: usize,
    reports: u64,
    receipted: u64,
    last_receipt: Option<Duration>,
    resent: u64,
}

impl Tally {
    /// Figures for a fleet of `devices`.
    pub fn new(devices: usize) -> Tally {
        Tally {
            devices,
            boundaries: BTreeMap::new(),
        }
    }

    /// The clock reached `boundary` at real instant `real_at`.
    pub fn begin(&mut self, boundary: Timestamp, real_at: Instant) {
        self.boundaries.entry(boundary).or_default().real_at = Some(real_at);
    }

    /// A device sent its `reports` for `boundary` (after its jitter).
    pub fn reported(&mut self, boundary: Timestamp, reports: usize) {
        if let Some(f) = self.boundaries.get_mut(&boundary) {
            f.devices += 1;
            f.reports += reports as u64;
        }
    }

    /// A report of `boundary` was receipted at real instant `now`.
    pub fn receipted(&mut self, boundary: Timestamp, now: Instant) {
        if let Some(f) = self.boundaries.get_mut(&boundary) {
            f.receipted += 1;
            if let Some(at) = f.real_at {
                let after = now.saturating_duration_since(at);
                f.last_receipt = Some(f.last_receipt.map_or(after, |l| l.max(after)));
            }
        }
    }

    /// A report of `boundary` was sent again.
    pub fn resent(&mut self, boundary: Timestamp) {
        if let Some(f) = self.boundaries.get_mut(&boundary) {
            f.resent += 1;
        }
    }

    /// Whether a boundary's lines are still to come.
    pub fn pending(&self) -> bool {
        !self.boundaries.is_empty()
    }

    /// The lines of the boundaries that are done, removed: every device reported and every
    /// report was receipted; or a later one, `current`, has begun (what is still missing then
    /// is shown missing); or `all`, at shutdown.
    pub fn finished(&mut self, current: Option<Timestamp>, all: bool) -> Vec<String> {
        let devices = self.devices;
        let done: Vec<Timestamp> = self
            .boundaries
            .iter()
            .filter(|(b, f)| {
                all || (f.devices >= devices && f.receipted >= f.reports)
                    || current.is_some_and(|c| **b < c)
            })
            .map(|(b, _)| *b)
            .collect();
        done.into_iter()
            .filter_map(|b| self.boundaries.remove(&b).map(|f| line(b, &f)))
            .collect()
    }
}

/// `fleet: boundary 2026-11-30T00:30:00Z reports 1000 receipted 1000 last receipt +1.234 s
/// resent 0`: the reports are those of the period that ended at the boundary (and any
/// missed before it).
fn line(boundary: Timestamp, f: &Figures) -> String {
    let last = f.last_receipt.map_or_else(
        || "none".to_owned(),
        |d| format!("+{:.3} s", d.as_secs_f64()),
    );
    format!(
        "fleet: boundary {boundary} reports {} receipted {} last receipt {last} resent {}",
        f.reports, f.receipted, f.resent
    )
}

/// A device's delay after each boundary, uniformly in `[0, jitter)`, from its own generator:
/// a real fleet's units do not report in the same millisecond, and the broker and the cloud
/// see the spread they would see.
pub fn jitter(rng: &mut fastrand::Rng, jitter: Duration) -> Duration {
    let micros = u64::try_from(jitter.as_micros()).unwrap_or(u64::MAX);
    if micros == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(rng.u64(0..micros))
}

#[cfg(test)]
mod tests {
    use super::*;
    use max300_protocol::clock::monotonic;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_boundary_is_printed_once_every_device_reported_and_was_receipted() {
        let mut t = Tally::new(2);
        let (b, t0) = (ts("2026-11-30T00:30:00Z"), monotonic());
        t.begin(b, t0);
        t.reported(b, 1);
        t.receipted(b, t0 + Duration::from_millis(300));
        assert!(
            t.finished(None, false).is_empty(),
            "one device has not reported"
        );
        t.reported(b, 2);
        t.resent(b);
        t.receipted(b, t0 + Duration::from_millis(1234));
        assert!(
            t.finished(None, false).is_empty(),
            "one report is not receipted"
        );
        t.receipted(b, t0 + Duration::from_millis(900));
        assert_eq!(
            t.finished(None, false),
            [
                "fleet: boundary 2026-11-30T00:30:00Z reports 3 receipted 3 last receipt +1.234 s resent 1"
            ]
        );
        assert!(!t.pending());
    }

    #[test]
    fn an_unfinished_boundary_is_printed_when_the_next_begins_or_at_shutdown() {
        let mut t = Tally::new(2);
        let (b1, b2) = (ts("2026-11-30T00:30:00Z"), ts("2026-11-30T01:00:00Z"));
        t.begin(b1, monotonic());
        t.reported(b1, 1);
        t.begin(b2, monotonic());
        assert_eq!(
            t.finished(Some(b2), false),
            [
                "fleet: boundary 2026-11-30T00:30:00Z reports 1 receipted 0 last receipt none resent 0"
            ]
        );
        assert_eq!(t.finished(Some(b2), true).len(), 1);
        assert!(!t.pending());
    }

    #[test]
    fn jitter_stays_in_range_and_is_the_same_for_the_same_seed() {
        let max = Duration::from_millis(1000);
        let mut rng = fastrand::Rng::with_seed(7);
        let draws: Vec<Duration> = (0..1000).map(|_| jitter(&mut rng, max)).collect();
        assert!(draws.iter().all(|d| *d < max));
        assert!(draws.iter().any(|d| *d > max / 2) && draws.iter().any(|d| *d < max / 2));
        let mut again = fastrand::Rng::with_seed(7);
        assert_eq!(jitter(&mut again, max), draws[0]);
        assert_eq!(jitter(&mut rng, Duration::ZERO), Duration::ZERO);
    }
}
