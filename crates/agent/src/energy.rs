//! The energy a unit delivers in one period, integrated from the readings the agent takes
//! anyway (at the boundary, at each re-assert and write, at each heartbeat): each reading is
//! (clock instant, kW flowing, charge positive). Pure: the shell feeds it readings, and reads
//! the total when the period ends.
//!
//! ```text
//!  kW │    ●───────●─╮                    between readings the power moves in a line;
//!     │  ┄┄│         │╲                   before the first it is the first's, after the
//!     │    │         │ ●─────────●┄┄┄┄    last the last's; nothing outside the period
//!   0 ┼────┼─────────┼───────────────┼──▶ counts
//!        start      write           end
//! ```

use jiff::Timestamp;
use max300_protocol::Mode;

/// The energy of one period, from readings of the power.
#[derive(Clone, Debug, PartialEq)]
pub struct PeriodEnergy {
    start: Timestamp,
    end: Timestamp,
    /// The last reading taken.
    last: Option<(Timestamp, f64)>,
    /// Net kWh (charge positive) from `start` up to the last reading.
    kwh: f64,
    /// The clock could not be trusted while the period ran: the total is unknown.
    unknown: bool,
}

impl PeriodEnergy {
    /// A period running from `start` to `end`, with no reading yet.
    pub fn new(start: Timestamp, end: Timestamp) -> PeriodEnergy {
        PeriodEnergy {
            start,
            end,
            last: None,
            kwh: 0.0,
            unknown: false,
        }
    }

    /// The period's start.
    pub fn start(&self) -> Timestamp {
        self.start
    }

    /// The period's end: the boundary at which its report is finalized.
    pub fn end(&self) -> Timestamp {
        self.end
    }

    /// Takes a reading: `kw` (charge positive) flowing at `at`. A non-finite reading is
    /// ignored; one earlier than the last (a clock that stepped back) makes the total unknown.
    pub fn sample(&mut self, at: Timestamp, kw: f64) {
        if self.unknown || !kw.is_finite() {
            return;
        }
        match self.last {
            // Before the first reading the unit is taken to run what it runs at the first.
            None => self.kwh += self.area((self.start, kw), (at, kw)),
            Some((t0, _)) if at < t0 => {
                self.unknown = true;
                return;
            }
            Some(prev) => self.kwh += self.area(prev, (at, kw)),
        }
        self.last = Some((at, kw));
    }

    /// Whether a reading at or after the end has been taken: the period needs no other.
    pub fn read_to_end(&self) -> bool {
        self.last.is_some_and(|(at, _)| at >= self.end)
    }

    /// Makes the total unknown: the clock was not trusted while the period ran.
    pub fn spoil(&mut self) {
        self.unknown = true;
    }

    /// The net energy over the whole period, kWh, charge positive, with the last reading held
    /// to the end. `None` without any reading, or when the clock was not trusted.
    pub fn net_kwh(&self) -> Option<f64> {
        if self.unknown {
            return None;
        }
        let (t, kw) = self.last?;
        Some(self.kwh + self.area((t, kw), (self.end.max(t), kw)))
    }

    /// The kWh of the line from `a` to `b` (instant, kW) that falls inside the period.
    fn area(&self, (t0, p0): (Timestamp, f64), (t1, p1): (Timestamp, f64)) -> f64 {
        let from = t0.max(self.start);
        let to = t1.min(self.end);
        if to <= from {
            return 0.0;
        }
        let span = t1.duration_since(t0).as_secs_f64();
        let power = |t: Timestamp| {
            if span <= 0.0 {
                p1
            } else {
                p0 + (p1 - p0) * t.duration_since(t0).as_secs_f64() / span
            }
        };
        let hours = to.duration_since(from).as_secs_f64() / 3600.0;
        (power(from) + power(to)) / 2.0 * hours
    }

    /// What a report says, `energy_kwh`: the energy moved in the period's direction, never
    /// negative, like the rates. Charge: into the battery; discharge: out of it; a flow the
    /// other way counts as 0. Idle: whatever moved, either way.
    pub fn delivered_kwh(&self, mode: Mode) -> Option<f64> {
        let net = self.net_kwh()?;
        Some(match mode {
            Mode::Charge => net.max(0.0),
            Mode::Discharge => (-net).max(0.0),
            Mode::Idle => net.abs(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn at(min: f64) -> Timestamp {
        let start: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        start + SignedDuration::from_secs_f64(min * 60.0)
    }

    fn period() -> PeriodEnergy {
        PeriodEnergy::new(at(0.0), at(30.0))
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-6)
    }

    #[test]
    fn a_steady_unit_delivers_its_rate_for_half_an_hour() {
        let mut e = period();
        // The first reading comes a few seconds after the boundary; heartbeats follow.
        for min in [0.05, 1.0, 11.0, 21.0, 29.0] {
            e.sample(at(min), 40.0);
        }
        assert!(close(e.net_kwh(), 20.0), "{:?}", e.net_kwh());
        assert!(close(e.delivered_kwh(Mode::Charge), 20.0));
    }

    #[test]
    fn a_unit_stopped_mid_period_delivers_only_until_it_stopped() {
        let mut e = period();
        e.sample(at(0.0), 40.0);
        e.sample(at(10.0), 40.0);
        // The re-assert at 15:00 reads 40 kW, writes idle and reads 0 kW back.
        e.sample(at(15.0), 40.0);
        e.sample(at(15.0 + 1e-4), 0.0);
        e.sample(at(25.0), 0.0);
        let kwh = e.delivered_kwh(Mode::Charge).unwrap();
        assert!((kwh - 10.0).abs() < 1e-3, "{kwh}");
    }

    #[test]
    fn the_next_periods_setpoint_written_at_the_boundary_counts_for_nothing_in_this_one() {
        let mut e = period();
        e.sample(at(0.0), 40.0);
        e.sample(at(29.0), 40.0);
        assert!(!e.read_to_end());
        // At the boundary the agent reads, writes the next period's discharge, reads again.
        e.sample(at(30.0 + 1e-5), 40.0);
        assert!(e.read_to_end());
        e.sample(at(30.0 + 2e-5), -30.0);
        assert!(close(e.net_kwh(), 20.0), "{:?}", e.net_kwh());
    }

    #[test]
    fn a_unit_that_does_not_deliver_reports_about_nothing() {
        let mut e = period();
        for (min, kw) in [(0.0, 0.0), (10.0, 0.05), (20.0, -0.02), (30.0, 0.01)] {
            e.sample(at(min), kw);
        }
        let kwh = e.delivered_kwh(Mode::Charge).unwrap();
        assert!((0.0..0.02).contains(&kwh), "{kwh}");
    }

    #[test]
    fn a_ramp_between_readings_counts_as_a_line_and_nothing_past_the_end_counts() {
        let mut e = period();
        e.sample(at(0.0), 0.0);
        e.sample(at(10.0), 60.0);
        // The next reading is the next period's: 60 kW down to 0 kW at 40:00, so the line is
        // at 20 kW at the boundary (30:00).
        e.sample(at(40.0), 0.0);
        // 0→60 over 10 min: 5 kWh; 60→20 over the 20 min to 30:00: 13.33 kWh.
        let kwh = e.net_kwh().unwrap();
        assert!((kwh - (5.0 + 40.0 / 3.0)).abs() < 1e-9, "{kwh}");
    }

    #[test]
    fn readings_before_the_start_count_only_from_the_start() {
        let mut e = period();
        e.sample(at(-5.0), 30.0);
        e.sample(at(5.0), 30.0);
        assert!(close(e.net_kwh(), 15.0), "{:?}", e.net_kwh());
    }

    #[test]
    fn discharge_is_counted_out_of_the_battery_and_the_wrong_way_counts_nothing() {
        let mut e = period();
        e.sample(at(0.0), -30.0);
        assert!(close(e.net_kwh(), -15.0));
        assert!(close(e.delivered_kwh(Mode::Discharge), 15.0));
        assert!(close(e.delivered_kwh(Mode::Charge), 0.0));
        assert!(close(e.delivered_kwh(Mode::Idle), 15.0));
    }

    #[test]
    fn without_readings_or_a_trusted_clock_the_energy_is_unknown() {
        assert_eq!(period().net_kwh(), None);
        let mut e = period();
        e.sample(at(1.0), 10.0);
        e.spoil();
        e.sample(at(2.0), 10.0);
        assert_eq!(e.delivered_kwh(Mode::Charge), None);
        let mut e = period();
        e.sample(at(10.0), 10.0);
        e.sample(at(5.0), 10.0);
        assert_eq!(e.net_kwh(), None, "a clock that stepped back");
    }

    #[test]
    fn a_non_finite_reading_is_ignored() {
        let mut e = period();
        e.sample(at(0.0), 20.0);
        e.sample(at(10.0), f64::NAN);
        e.sample(at(20.0), f64::INFINITY);
        assert!(close(e.net_kwh(), 10.0));
    }
}
