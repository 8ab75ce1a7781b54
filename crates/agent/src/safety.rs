//! The last check before a setpoint reaches the controller: the device's own limit, the
//! controller's live limits and the state-of-charge window with hysteresis. Pure.
//!
//! ```text
//!  soc ─────────────────────────────────────────────▶ 100 %
//!        min  min+h                    max−h  max
//!  discharge blocked at ≤ min, resumes above min+h
//!                            charge blocked at ≥ max, resumes below max−h
//! ```

use max300_protocol::message::LimitedBy;
use max300_protocol::{Mode, RateKw, Setpoint};

use crate::battery::BatteryStatus;

/// The state-of-charge window, percent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SocWindow {
    /// No discharging at or below this.
    pub min_pct: f64,
    /// No charging at or above this.
    pub max_pct: f64,
    /// How far inside the window a blocked direction resumes.
    pub hysteresis_pct: f64,
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
    window: SocWindow,
    max_rate: RateKw,
    charge_blocked: bool,
    discharge_blocked: bool,
}

impl Guard {
    /// Rules for a device limited to `max_rate` and kept inside `window`.
    pub fn new(window: SocWindow, max_rate: RateKw) -> Guard {
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
        if soc >= w.max_pct {
            self.charge_blocked = true;
        } else if soc < w.max_pct - w.hysteresis_pct {
            self.charge_blocked = false;
        }
        if soc <= w.min_pct {
            self.discharge_blocked = true;
        } else if soc > w.min_pct + w.hysteresis_pct {
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

    const WINDOW: SocWindow = SocWindow {
        min_pct: 10.0,
        max_pct: 90.0,
        hysteresis_pct: 2.0,
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
}
