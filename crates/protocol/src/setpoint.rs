//! Mode and rate. Rates are never negative: the mode gives the direction.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ProtocolError;

/// What the battery does in a period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Take power from the grid.
    Charge,
    /// Give power to the grid.
    Discharge,
    /// Neither; the rate is 0.
    Idle,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 3] = [Mode::Charge, Mode::Discharge, Mode::Idle];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Charge => "charge",
            Mode::Discharge => "discharge",
            Mode::Idle => "idle",
        }
    }

    /// Parses a mode, ignoring case as the provider contract allows.
    pub fn parse_loose(text: &str) -> Option<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(text))
    }
}

/// The exact wire name, as stored.
impl std::str::FromStr for Mode {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| ProtocolError::unknown_name("mode", s))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A power rate, held in whole watts: finite and never negative by construction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RateKw(u32);

impl RateKw {
    /// Zero.
    pub const ZERO: RateKw = RateKw(0);

    /// From whole watts.
    pub const fn from_watts(watts: u32) -> Self {
        RateKw(watts)
    }

    /// Whole watts.
    pub const fn watts(self) -> u32 {
        self.0
    }

    /// Kilowatts.
    pub fn kw(self) -> f64 {
        f64::from(self.0) / 1000.0
    }

    /// The smaller of two rates.
    pub fn min(self, other: RateKw) -> RateKw {
        RateKw(self.0.min(other.0))
    }
}

impl TryFrom<f64> for RateKw {
    type Error = ProtocolError;

    /// Rounds to whole watts; refuses NaN, infinities, negatives and what does not fit.
    fn try_from(kw: f64) -> Result<Self, Self::Error> {
        if !kw.is_finite() {
            return Err(ProtocolError::InvalidRate(format!("{kw} is not finite")));
        }
        let watts = (kw * 1000.0).round();
        if kw < 0.0 {
            return Err(ProtocolError::InvalidRate(format!("{kw} is negative")));
        }
        if watts > f64::from(u32::MAX) {
            return Err(ProtocolError::InvalidRate(format!("{kw} does not fit")));
        }
        Ok(RateKw(watts as u32))
    }
}

impl fmt::Display for RateKw {
    /// Kilowatts without trailing zeros: `150`, `80.5`, `0.001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let frac = format!("{frac:03}");
            write!(f, "{whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

impl Serialize for RateKw {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.kw())
    }
}

impl<'de> Deserialize<'de> for RateKw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let kw = f64::deserialize(d)?;
        RateKw::try_from(kw).map_err(serde::de::Error::custom)
    }
}

/// Mode and rate together; `idle` always has rate 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Setpoint {
    mode: Mode,
    rate: RateKw,
}

impl Setpoint {
    /// Idle at 0 kW: the safe state.
    pub const IDLE: Setpoint = Setpoint {
        mode: Mode::Idle,
        rate: RateKw::ZERO,
    };

    /// A setpoint; `idle` with a non-zero rate is refused.
    pub fn new(mode: Mode, rate: RateKw) -> Result<Self, ProtocolError> {
        if mode == Mode::Idle && rate != RateKw::ZERO {
            return Err(ProtocolError::IdleWithRate(rate.to_string()));
        }
        Ok(Setpoint { mode, rate })
    }

    /// A setpoint where a zero rate in any mode counts as idle.
    pub fn normalized(mode: Mode, rate: RateKw) -> Self {
        if rate == RateKw::ZERO || mode == Mode::Idle {
            Setpoint::IDLE
        } else {
            Setpoint { mode, rate }
        }
    }

    /// The mode.
    pub fn mode(self) -> Mode {
        self.mode
    }

    /// The rate.
    pub fn rate(self) -> RateKw {
        self.rate
    }

    /// Signed power in kW as the grid sees the battery: charge positive, discharge negative.
    pub fn signed_kw(self) -> f64 {
        match self.mode {
            Mode::Charge => self.rate.kw(),
            Mode::Discharge => -self.rate.kw(),
            Mode::Idle => 0.0,
        }
    }
}

impl fmt::Display for Setpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} kW", self.mode, self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rates_to_whole_watts() {
        assert_eq!(RateKw::try_from(80.5).unwrap().watts(), 80_500);
        assert_eq!(RateKw::try_from(0.0004).unwrap().watts(), 0);
        assert_eq!(RateKw::try_from(1.2345).unwrap().watts(), 1_235);
    }

    #[test]
    fn refuses_non_finite_negative_and_oversized_rates() {
        assert!(RateKw::try_from(f64::NAN).is_err());
        assert!(RateKw::try_from(f64::INFINITY).is_err());
        assert!(RateKw::try_from(-1.0).is_err());
        assert!(RateKw::try_from(1e12).is_err());
    }

    #[test]
    fn displays_rates_without_trailing_zeros() {
        assert_eq!(RateKw::from_watts(150_000).to_string(), "150");
        assert_eq!(RateKw::from_watts(80_500).to_string(), "80.5");
        assert_eq!(RateKw::from_watts(1).to_string(), "0.001");
    }

    #[test]
    fn idle_with_a_rate_is_refused() {
        assert!(Setpoint::new(Mode::Idle, RateKw::from_watts(1)).is_err());
        assert!(Setpoint::new(Mode::Idle, RateKw::ZERO).is_ok());
    }

    #[test]
    fn parses_modes_ignoring_case() {
        assert_eq!(Mode::parse_loose("DisCharge"), Some(Mode::Discharge));
        assert_eq!(Mode::parse_loose("hold"), None);
    }

    #[test]
    fn a_stored_mode_is_read_back_exactly_or_refused_by_name() {
        for mode in Mode::ALL {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
        }
        let err = "Charge".parse::<Mode>().unwrap_err();
        assert_eq!(err.to_string(), r#"unknown mode "Charge""#);
    }
}
