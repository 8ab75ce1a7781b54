//! The period grid of one local date: period 1 starts at local midnight, every period is
//! 30 minutes, and the day has as many as it has half-hours (46, 48 or 50 in Europe/London).

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use crate::{PERIOD_SECS, ProtocolError};

/// One local date in one time zone, with its period grid worked out.
#[derive(Clone, Debug)]
pub struct Day {
    date: Date,
    tz: TimeZone,
    start: Timestamp,
    periods: u32,
}

impl PartialEq for Day {
    fn eq(&self, other: &Self) -> bool {
        self.date == other.date && self.start == other.start && self.periods == other.periods
    }
}

/// Why an instant is not a boundary of a day's grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffGrid {
    /// Before local midnight or after the next one.
    Outside,
    /// Inside the day but not on a half-hour boundary.
    NotOnBoundary,
}

impl Day {
    /// The grid of `date` in `tz`.
    pub fn new(date: Date, tz: TimeZone) -> Result<Day, ProtocolError> {
        let bad = |e| ProtocolError::out_of_range(date, e);
        let start = date.to_zoned_datetime(tz.clone()).map_err(bad)?.timestamp();
        let end = date
            .tomorrow()
            .map_err(bad)?
            .to_zoned_datetime(tz.clone())
            .map_err(bad)?
            .timestamp();
        let secs = end.as_second() - start.as_second();
        if secs <= 0 || secs % PERIOD_SECS != 0 || start.subsec_nanosecond() != 0 {
            return Err(ProtocolError::InvalidDate(
                date.to_string(),
                format!("a day of {secs} s is not a whole number of half-hours"),
            ));
        }
        Ok(Day {
            date,
            tz,
            start,
            periods: (secs / PERIOD_SECS) as u32,
        })
    }

    /// The grid of `date` in the zone named `tz_name`.
    pub fn named(date: Date, tz_name: &str) -> Result<Day, ProtocolError> {
        Day::new(date, time_zone(tz_name)?)
    }

    /// The local day that contains `instant`.
    pub fn containing(instant: Timestamp, tz: &TimeZone) -> Result<Day, ProtocolError> {
        Day::new(instant.to_zoned_datetime(tz.clone()).date(), tz.clone())
    }

    /// The local date.
    pub fn date(&self) -> Date {
        self.date
    }

    /// The zone.
    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    /// The zone's IANA name, as it goes on the wire.
    pub fn tz_name(&self) -> &str {
        self.tz.iana_name().unwrap_or("UTC")
    }

    /// Local midnight, as an instant.
    pub fn start(&self) -> Timestamp {
        self.start
    }

    /// The next local midnight, as an instant.
    pub fn end(&self) -> Timestamp {
        self.period_start(self.periods + 1)
    }

    /// How many periods the day has.
    pub fn period_count(&self) -> u32 {
        self.periods
    }

    /// The start of period `period` (1-based). `period_count() + 1` gives the day's end.
    pub fn period_start(&self, period: u32) -> Timestamp {
        let offset = i64::from(period.saturating_sub(1)) * PERIOD_SECS;
        self.start + SignedDuration::from_secs(offset)
    }

    /// The period (1-based) that contains `instant`, if the instant is within the day.
    pub fn period_at(&self, instant: Timestamp) -> Option<u32> {
        let secs = instant.duration_since(self.start).as_secs();
        if instant < self.start || secs >= i64::from(self.periods) * PERIOD_SECS {
            return None;
        }
        Some((secs / PERIOD_SECS) as u32 + 1)
    }

    /// The first period a plan received at `now` governs: never mid-period, so 1 before the
    /// day and the next period during it; `None` once no period is left.
    pub fn first_governed_at(&self, now: Timestamp) -> Option<u32> {
        let first = if now < self.start {
            1
        } else {
            self.period_at(now).unwrap_or(self.periods) + 1
        };
        (first <= self.periods).then_some(first)
    }

    /// Which boundary `instant` is: 0 for the day's start, `period_count()` for its end.
    pub fn boundary(&self, instant: Timestamp) -> Result<u32, OffGrid> {
        if instant < self.start {
            return Err(OffGrid::Outside);
        }
        let span = instant.duration_since(self.start);
        let secs = span.as_secs();
        if secs > i64::from(self.periods) * PERIOD_SECS {
            return Err(OffGrid::Outside);
        }
        if secs % PERIOD_SECS != 0 || span.subsec_nanos() != 0 {
            return Err(OffGrid::NotOnBoundary);
        }
        Ok((secs / PERIOD_SECS) as u32)
    }

    /// The following local day.
    pub fn next(&self) -> Result<Day, ProtocolError> {
        let date = self
            .date
            .tomorrow()
            .map_err(|e| ProtocolError::out_of_range(self.date, e))?;
        Day::new(date, self.tz.clone())
    }
}

/// Looks a zone up in the bundled tz database.
pub fn time_zone(name: &str) -> Result<TimeZone, ProtocolError> {
    TimeZone::get(name).map_err(|_| ProtocolError::UnknownTimeZone(name.chars().take(80).collect()))
}

/// The start of the period that contains `instant`, in `tz`'s grid.
pub fn period_start_at(instant: Timestamp, tz: &TimeZone) -> Result<Timestamp, ProtocolError> {
    let day = Day::containing(instant, tz)?;
    let period = day.period_at(instant).unwrap_or(day.period_count());
    Ok(day.period_start(period))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn london(d: Date) -> Day {
        Day::named(d, "Europe/London").unwrap()
    }

    #[test]
    fn a_plan_governs_from_period_1_before_its_day_and_never_mid_period() {
        let day = london(date(2026, 11, 30));
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(day.first_governed_at(at("2026-11-29T16:00:00Z")), Some(1));
        assert_eq!(day.first_governed_at(at("2026-11-30T00:00:00Z")), Some(2));
        assert_eq!(day.first_governed_at(at("2026-11-30T10:10:00Z")), Some(22));
        assert_eq!(day.first_governed_at(at("2026-11-30T23:40:00Z")), None);
        assert_eq!(day.first_governed_at(at("2026-12-02T00:00:00Z")), None);
    }

    #[test]
    fn an_ordinary_day_has_48_periods() {
        let day = london(date(2026, 11, 30));
        assert_eq!(day.period_count(), 48);
        assert_eq!(day.start().to_string(), "2026-11-30T00:00:00Z");
        assert_eq!(day.end().to_string(), "2026-12-01T00:00:00Z");
    }

    #[test]
    fn the_autumn_clock_change_has_50_periods_from_bst_midnight() {
        let day = london(date(2026, 10, 25));
        assert_eq!(day.period_count(), 50);
        assert_eq!(day.start().to_string(), "2026-10-24T23:00:00Z");
    }

    #[test]
    fn the_spring_clock_change_has_46_periods() {
        assert_eq!(london(date(2027, 3, 28)).period_count(), 46);
    }

    #[test]
    fn finds_the_period_of_an_instant() {
        let day = london(date(2026, 11, 30));
        let t: Timestamp = "2026-11-30T00:29:59Z".parse().unwrap();
        assert_eq!(day.period_at(t), Some(1));
        let t: Timestamp = "2026-11-30T23:30:00Z".parse().unwrap();
        assert_eq!(day.period_at(t), Some(48));
        assert_eq!(day.period_at(day.end()), None);
    }

    #[test]
    fn knows_its_boundaries() {
        let day = london(date(2026, 11, 30));
        assert_eq!(day.boundary(day.end()), Ok(48));
        let off: Timestamp = "2026-11-30T00:15:00Z".parse().unwrap();
        assert_eq!(day.boundary(off), Err(OffGrid::NotOnBoundary));
        let before: Timestamp = "2026-11-29T23:30:00Z".parse().unwrap();
        assert_eq!(day.boundary(before), Err(OffGrid::Outside));
    }

    #[test]
    fn refuses_unknown_zones() {
        assert!(Day::named(date(2026, 11, 30), "Mars/Olympus").is_err());
    }
}
