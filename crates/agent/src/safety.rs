//! The last check before a setpoint reaches the controller: the device's own limit, the
//! controller's live limits and the state-of-charge window with hysteresis. Pure.
//!
//! ```text
//!  soc ─────────────────────────────────────────────▶ 100 %
//!        min  min+h                    max−h  max
//!  discharge blocked at ≤ min, resumes above min+h
//!                            charge blocked at ≥ max, resumes below max−h
//! ```

use std::time::Duration;

use max300_protocol::message::LimitedBy;
use max300_protocol::{Mode, RateKw, Setpoint};

use serde::{Deserialize, Serialize};

use crate::battery::BatteryStatus;

/// The `[safety]` table: the limits the agent keeps whatever the controller, per device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SafetyConfig {
    /// No discharging at or below this state of charge, percent.
    pub soc_min_pct: f64,
    /// No charging at or above this state of charge, percent.
    pub soc_max_pct: f64,
    /// How far inside the window a blocked direction resumes, percent.
    pub hysteresis_pct: f64,
    /// How far the measured power may be from the setpoint, kW, once it settled.
    pub power_tolerance_kw: f64,
    /// How long the measured power may take to reach a new setpoint (the controller's ramp
    /// time), real seconds; the period's report waits at most this long.
    pub settle_s: f64,
}

impl Default for SafetyConfig {
    fn default() -> Self {
        SafetyConfig {
            soc_min_pct: 10.0,
            soc_max_pct: 90.0,
            hysteresis_pct: 2.0,
            power_tolerance_kw: 3.0,
            settle_s: 5.0,
        }
    }
}

impl SafetyConfig {
    /// Checks the ranges; the message starts with the field name.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("soc_min_pct", self.soc_min_pct),
            ("soc_max_pct", self.soc_max_pct),
        ] {
            if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                return Err(format!("{name}: {v} must be from 0 to 100"));
            }
        }
        if self.soc_min_pct >= self.soc_max_pct {
            return Err(format!(
                "soc_min_pct: {} must be below soc_max_pct {}",
                self.soc_min_pct, self.soc_max_pct
            ));
        }
        // A hysteresis as wide as the window would block both directions at once.
        if !(self.hysteresis_pct.is_finite()
            && self.hysteresis_pct >= 0.0
            && self.hysteresis_pct < self.soc_max_pct - self.soc_min_pct)
        {
            return Err(format!(
                "hysteresis_pct: {} must be at least 0 and below the window's width ({})",
                self.hysteresis_pct,
                self.soc_max_pct - self.soc_min_pct
            ));
        }
        if !(self.power_tolerance_kw.is_finite() && self.power_tolerance_kw > 0.0) {
            return Err(format!(
                "power_tolerance_kw: {} must be above 0",
                self.power_tolerance_kw
            ));
        }
        // Beyond a minute the report of a 30-minute period would say little about its start.
        if !(self.settle_s.is_finite() && (0.0..=60.0).contains(&self.settle_s)) {
            return Err(format!("settle_s: {} must be from 0 to 60", self.settle_s));
        }
        Ok(())
    }

    /// How long the measured power may take to settle.
    pub fn settle(&self) -> Duration {
        Duration::from_secs_f64(self.settle_s)
    }

    /// Whether `measured_kw` (charge positive) delivers `setpoint`, within the tolerance.
    pub fn delivers(&self, setpoint: Setpoint, measured_kw: f64) -> bool {
        (measured_kw - setpoint.signed_kw()).abs() <= self.power_tolerance_kw
    }
}

/// What may be applied, and why it differs from the plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clamped {
    /// The setpoint to write.
    pub setpoint: Setpoint,
    /// Why it is below the planned one; `None` when it is the planned one.
    pub limited_by: Option<LimitedBy>,
}

/// The safety rules with their hysteresis memory: which direction is blocked now.
#[derive(Clone, Debug)]
pub struct Guard {
    window: SafetyConfig,
    max_rate: RateKw,
    charge_blocked: bool,
    discharge_blocked: bool,
}

impl Guard {
    /// Rules for a device limited to `max_rate` and kept inside `window`'s SoC window.
    pub fn new(window: SafetyConfig, max_rate: RateKw) -> Guard {
        Guard {
            window,
            max_rate,
            charge_blocked: false,
            discharge_blocked: false,
        }
    }

    /// Clamps `planned` against `status`, updating the hysteresis state from its SoC.
    pub fn clamp(&mut self, planned: Setpoint, status: &BatteryStatus) -> Clamped {
        let soc = status.soc_pct;
        let w = self.window;
        if soc >= w.soc_max_pct {
            self.charge_blocked = true;
        } else if soc < w.soc_max_pct - w.hysteresis_pct {
            self.charge_blocked = false;
        }
        if soc <= w.soc_min_pct {
            self.discharge_blocked = true;
        } else if soc > w.soc_min_pct + w.hysteresis_pct {
            self.discharge_blocked = false;
        }
        let (blocked, soc_reason, live) = match planned.mode() {
            Mode::Idle => {
                return Clamped {
                    setpoint: Setpoint::IDLE,
                    limited_by: None,
                };
            }
            Mode::Charge => (self.charge_blocked, LimitedBy::SocMax, status.max_charge),
            Mode::Discharge => (
                self.discharge_blocked,
                LimitedBy::SocMin,
                status.max_discharge,
            ),
        };
        if blocked {
            return Clamped {
                setpoint: Setpoint::IDLE,
                limited_by: Some(soc_reason),
            };
        }
        let mut rate = planned.rate();
        let mut limited_by = None;
        if rate > self.max_rate {
            rate = self.max_rate;
            limited_by = Some(LimitedBy::MaxRateKw);
        }
        if rate > live {
            rate = live;
            limited_by = Some(LimitedBy::ControllerLimit);
        }
        Clamped {
            setpoint: Setpoint::normalized(planned.mode(), rate),
            limited_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: SafetyConfig = SafetyConfig {
        soc_min_pct: 10.0,
        soc_max_pct: 90.0,
        hysteresis_pct: 2.0,
        power_tolerance_kw: 3.0,
        settle_s: 5.0,
    };

    fn sp(mode: Mode, kw: u32) -> Setpoint {
        Setpoint::new(mode, RateKw::from_watts(kw * 1000)).unwrap()
    }

    fn status(soc_pct: f64, live_kw: u32) -> BatteryStatus {
        BatteryStatus {
            setpoint: Setpoint::IDLE,
            soc_pct,
            max_charge: RateKw::from_watts(live_kw * 1000),
            max_discharge: RateKw::from_watts(live_kw * 1000),
            measured_kw: None,
        }
    }

    fn guard() -> Guard {
        Guard::new(WINDOW, RateKw::from_watts(100_000))
    }

    #[test]
    fn passes_a_setpoint_inside_every_limit_unchanged() {
        let c = guard().clamp(sp(Mode::Charge, 50), &status(50.0, 150));
        assert_eq!(
            c,
            Clamped {
                setpoint: sp(Mode::Charge, 50),
                limited_by: None
            }
        );
    }

    #[test]
    fn clamps_to_the_device_limit_then_the_controller_limit() {
        let c = guard().clamp(sp(Mode::Charge, 120), &status(50.0, 150));
        assert_eq!(c.setpoint, sp(Mode::Charge, 100));
        assert_eq!(c.limited_by, Some(LimitedBy::MaxRateKw));
        let c = guard().clamp(sp(Mode::Discharge, 120), &status(50.0, 80));
        assert_eq!(c.setpoint, sp(Mode::Discharge, 80));
        assert_eq!(c.limited_by, Some(LimitedBy::ControllerLimit));
    }

    #[test]
    fn no_charging_at_soc_max_until_below_max_minus_hysteresis() {
        let mut g = guard();
        let charge = sp(Mode::Charge, 50);
        let c = g.clamp(charge, &status(90.0, 150));
        assert_eq!(
            (c.setpoint, c.limited_by),
            (Setpoint::IDLE, Some(LimitedBy::SocMax))
        );
        assert_eq!(g.clamp(charge, &status(89.0, 150)).setpoint, Setpoint::IDLE);
        assert_eq!(g.clamp(charge, &status(88.0, 150)).setpoint, Setpoint::IDLE);
        assert_eq!(g.clamp(charge, &status(87.9, 150)).setpoint, charge);
        // Discharging is never blocked by a full battery.
        let d = sp(Mode::Discharge, 10);
        assert_eq!(g.clamp(d, &status(95.0, 150)).setpoint, d);
    }

    #[test]
    fn no_discharging_at_soc_min_until_above_min_plus_hysteresis() {
        let mut g = guard();
        let d = sp(Mode::Discharge, 50);
        let c = g.clamp(d, &status(10.0, 150));
        assert_eq!(
            (c.setpoint, c.limited_by),
            (Setpoint::IDLE, Some(LimitedBy::SocMin))
        );
        assert_eq!(g.clamp(d, &status(11.5, 150)).setpoint, Setpoint::IDLE);
        assert_eq!(g.clamp(d, &status(12.1, 150)).setpoint, d);
    }

    #[test]
    fn a_zero_live_limit_gives_idle_with_controller_limit() {
        let c = guard().clamp(sp(Mode::Charge, 50), &status(50.0, 0));
        assert_eq!(
            (c.setpoint, c.limited_by),
            (Setpoint::IDLE, Some(LimitedBy::ControllerLimit))
        );
    }

    #[test]
    fn every_safety_limit_is_checked_by_name() {
        assert_eq!(SafetyConfig::default().validate(), Ok(()));
        let cases = [
            (
                SafetyConfig {
                    soc_min_pct: 95.0,
                    ..WINDOW
                },
                "soc_min_pct: 95 must be below soc_max_pct 90",
            ),
            (
                SafetyConfig {
                    soc_max_pct: 101.0,
                    ..WINDOW
                },
                "soc_max_pct: 101 must be from 0 to 100",
            ),
            (
                SafetyConfig {
                    hysteresis_pct: 80.0,
                    ..WINDOW
                },
                "hysteresis_pct: 80",
            ),
            (
                SafetyConfig {
                    power_tolerance_kw: 0.0,
                    ..WINDOW
                },
                "power_tolerance_kw: 0 must be above 0",
            ),
            (
                SafetyConfig {
                    settle_s: f64::NAN,
                    ..WINDOW
                },
                "settle_s: NaN",
            ),
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err();
            assert!(err.starts_with(expected), "{err}");
        }
    }

    #[test]
    fn measured_power_delivers_a_setpoint_within_the_tolerance_and_direction() {
        let c = SafetyConfig::default();
        assert!(c.delivers(sp(Mode::Charge, 50), 48.0));
        assert!(!c.delivers(sp(Mode::Charge, 50), 46.0));
        // The right size in the wrong direction is not delivery.
        assert!(!c.delivers(sp(Mode::Discharge, 50), 50.0));
        assert!(c.delivers(sp(Mode::Discharge, 50), -51.0));
        assert!(c.delivers(Setpoint::IDLE, 0.4));
    }
}
