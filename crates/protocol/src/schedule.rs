//! A normalized schedule: one setpoint for every period of one device's local date.

use std::sync::OnceLock;

use jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::{Day, DeviceId, Setpoint};

/// The plan for one device and one local date. It always has exactly one setpoint per period.
#[derive(Clone, Debug)]
pub struct Schedule {
    device_id: DeviceId,
    day: Day,
    setpoints: Vec<Setpoint>,
    /// Computed once, when first asked for: an ingestion asks for it to compare with what
    /// is held, then to put it in the message (about 10 µs each time).
    sha256: OnceLock<String>,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Schedule) -> bool {
        (&self.device_id, &self.day, &self.setpoints)
            == (&other.device_id, &other.day, &other.setpoints)
    }
}

/// One period of a schedule, as it goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Period {
    /// 1-based period number within the local date.
    pub period: u32,
    /// The period's start.
    pub start: jiff::Timestamp,
    /// What to do in it.
    pub setpoint: Setpoint,
}

impl Schedule {
    /// A schedule; `None` unless there is exactly one setpoint per period of `day`.
    pub fn new(device_id: DeviceId, day: Day, setpoints: Vec<Setpoint>) -> Option<Schedule> {
        (setpoints.len() == day.period_count() as usize).then_some(Schedule {
            device_id,
            day,
            setpoints,
            sha256: OnceLock::new(),
        })
    }

    /// The same schedule, with the sha256 that was computed from it when it was first made
    /// and kept beside it since (a store's row), so it is not computed again.
    pub fn with_sha256(self, sha256: String) -> Schedule {
        Schedule {
            sha256: OnceLock::from(sha256),
            ..self
        }
    }

    /// The device.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// The local date and its grid.
    pub fn day(&self) -> &Day {
        &self.day
    }

    /// The setpoints, period 1 first.
    pub fn setpoints(&self) -> &[Setpoint] {
        &self.setpoints
    }

    /// The setpoint of a 1-based period.
    pub fn setpoint(&self, period: u32) -> Option<Setpoint> {
        let index = usize::try_from(period).ok()?.checked_sub(1)?;
        self.setpoints.get(index).copied()
    }

    /// Every period with its start.
    pub fn periods(&self) -> impl Iterator<Item = Period> + '_ {
        self.setpoints.iter().enumerate().map(|(i, sp)| {
            let period = i as u32 + 1;
            Period {
                period,
                start: self.day.period_start(period),
                setpoint: *sp,
            }
        })
    }

    /// SHA-256 (lowercase hex) of `{period},{start},{mode},{rate_w}\n` for every period.
    /// The ack echoes it, so the cloud knows exactly which plan a device holds.
    pub fn sha256(&self) -> String {
        self.sha256.get_or_init(|| self.compute_sha256()).clone()
    }

    fn compute_sha256(&self) -> String {
        // The whole day's text, then one digest of it: 48 small updates cost more.
        let mut text = Vec::with_capacity(self.setpoints.len() * 40);
        for p in self.periods() {
            hash_line(&mut text, &p);
        }
        hex(&Sha256::digest(&text))
    }

    /// Energy moved over the whole day, in kWh: (charged, discharged).
    pub fn energy_kwh(&self) -> (f64, f64) {
        let hours = crate::PERIOD_SECS as f64 / 3600.0;
        self.setpoints
            .iter()
            .fold((0.0, 0.0), |(c, d), sp| match sp.mode() {
                crate::Mode::Charge => (c + sp.rate().kw() * hours, d),
                crate::Mode::Discharge => (c, d + sp.rate().kw() * hours),
                crate::Mode::Idle => (c, d),
            })
    }
}

/// `{period},{start},{mode},{rate_w}\n`, byte for byte as `writeln!` prints it, without the
/// formatting machinery: a day's 48 lines for each of thousands of units made `writeln!` a
/// quarter of an ingestion's normalizing. A start outside years 0–9999, or off the whole
/// second, is left to jiff's own printer.
fn hash_line(out: &mut Vec<u8>, p: &Period) {
    digits(out, u64::from(p.period), 1);
    out.push(b',');
    match utc_seconds(p.start) {
        Some(text) => out.extend_from_slice(&text),
        None => out.extend_from_slice(p.start.to_string().as_bytes()),
    }
    out.push(b',');
    out.extend_from_slice(p.setpoint.mode().as_str().as_bytes());
    out.push(b',');
    digits(out, u64::from(p.setpoint.rate().watts()), 1);
    out.push(b'\n');
}

/// `t` as jiff prints a timestamp, `2026-11-30T00:00:00Z`, without its printer: a schedule
/// message carries 48 of them and the hash another 48, for each of a fleet's units. `None`
/// outside years 0–9999 or off the whole second, which are left to jiff.
pub(crate) fn utc_seconds(t: Timestamp) -> Option<[u8; 20]> {
    let t = jiff::tz::Offset::UTC.to_datetime(t);
    if !(0..=9999).contains(&t.year()) || t.subsec_nanosecond() != 0 {
        return None;
    }
    let mut text = *b"0000-00-00T00:00:00Z";
    let fields = [
        (0..4, t.year() as u32),
        (5..7, t.month() as u32),
        (8..10, t.day() as u32),
        (11..13, t.hour() as u32),
        (14..16, t.minute() as u32),
        (17..19, t.second() as u32),
    ];
    for (place, mut n) in fields {
        for b in text[place].iter_mut().rev() {
            *b = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    Some(text)
}

/// `n` in decimal, zero-padded to at least `width` digits.
fn digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = i.min(buf.len() - width.min(buf.len()));
    // Byte by byte: these are a few digits, too short for a copy to pay.
    for b in &buf[start..] {
        out.push(*b);
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mode, RateKw};
    use jiff::civil::date;

    fn day() -> Day {
        Day::named(date(2026, 11, 30), "Europe/London").unwrap()
    }

    #[test]
    fn a_start_is_printed_as_jiff_prints_it() {
        // Every half hour over two years (both clock changes, a leap day), the first and last
        // instants the fast path takes, and the ones it leaves to jiff.
        let first: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut starts: Vec<Timestamp> = (0..2 * 366 * 48)
            .map(|i| first + jiff::SignedDuration::from_mins(30 * i))
            .collect();
        for text in [
            "0000-01-01T00:00:00Z",
            "9999-12-30T21:59:59Z",
            "2026-11-30T00:00:00.5Z",
            "-000001-06-01T00:00:00Z",
        ] {
            starts.push(text.parse().unwrap());
        }
        let mut taken = 0;
        for t in starts {
            let jiff = t.to_string();
            let json = serde_json::to_string(&crate::message::WireInterval {
                period: 1,
                start: t,
                mode: Mode::Idle,
                rate_kw: RateKw::ZERO,
            })
            .unwrap();
            assert!(json.contains(&format!(r#""start":"{jiff}""#)), "{json}");
            if let Some(text) = utc_seconds(t) {
                assert_eq!(std::str::from_utf8(&text).unwrap(), jiff);
                taken += 1;
            }
        }
        assert_eq!(
            taken,
            2 * 366 * 48 + 2,
            "the fast path takes every whole second"
        );
    }

    #[test]
    fn needs_one_setpoint_per_period() {
        let id = DeviceId::parse("d1").unwrap();
        assert!(Schedule::new(id.clone(), day(), vec![Setpoint::IDLE; 47]).is_none());
        assert!(Schedule::new(id, day(), vec![Setpoint::IDLE; 48]).is_some());
    }

    #[test]
    fn sha256_is_over_the_documented_lines() {
        let id = DeviceId::parse("d1").unwrap();
        let mut sps = vec![Setpoint::IDLE; 48];
        sps[0] = Setpoint::new(Mode::Charge, RateKw::from_watts(50_000)).unwrap();
        let s = Schedule::new(id, day(), sps).unwrap();
        let mut text = String::from("1,2026-11-30T00:00:00Z,charge,50000\n");
        for p in 2..=48u32 {
            let start = day().period_start(p);
            text.push_str(&format!("{p},{start},idle,0\n"));
        }
        assert_eq!(s.sha256(), hex(&Sha256::digest(text.as_bytes())));
        assert_eq!(s.sha256().len(), 64);
    }

    #[test]
    fn each_hashed_line_is_what_writeln_prints_on_every_kind_of_day() {
        // Clock changes, a zone off the hour, dates far from now, every mode and rate shape.
        let days = [
            ("2026-03-29", "Europe/London"),
            ("2026-10-25", "Europe/London"),
            ("2026-11-30", "Asia/Kathmandu"),
            ("2026-06-01", "America/St_Johns"),
            ("0001-01-01", "UTC"),
            ("9999-12-28", "UTC"),
        ];
        let rates = [0, 1, 9, 10, 999, 50_000, 150_000, u32::MAX];
        for (date, zone) in days {
            let day = Day::named(date.parse().unwrap(), zone).unwrap();
            for (i, watts) in rates.iter().enumerate() {
                let mode = [Mode::Charge, Mode::Discharge][i % 2];
                let setpoint = if *watts == 0 {
                    Setpoint::IDLE
                } else {
                    Setpoint::new(mode, RateKw::from_watts(*watts)).unwrap()
                };
                for period in 1..=day.period_count() {
                    let p = Period {
                        period,
                        start: day.period_start(period),
                        setpoint,
                    };
                    let mut line = Vec::new();
                    hash_line(&mut line, &p);
                    let expected = format!(
                        "{},{},{},{}\n",
                        p.period,
                        p.start,
                        p.setpoint.mode(),
                        p.setpoint.rate().watts()
                    );
                    assert_eq!(String::from_utf8(line).unwrap(), expected);
                }
            }
        }
        // Off the whole second and before year 0: jiff's own printer.
        for start in ["2026-11-30T00:00:00.5Z", "-000001-06-01T00:00:00Z"] {
            let p = Period {
                period: 7,
                start: start.parse().unwrap(),
                setpoint: Setpoint::IDLE,
            };
            let mut line = Vec::new();
            hash_line(&mut line, &p);
            assert_eq!(
                String::from_utf8(line).unwrap(),
                format!("7,{},idle,0\n", p.start)
            );
        }
    }
}
