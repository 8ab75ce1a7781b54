//! The text forms both backends store: instants that sort as text, and a plan as one line of
//! signed watts.

use std::fmt::Write;

use jiff::Timestamp;
use max300_protocol::{Mode, RateKw, Setpoint};

/// An instant as fixed-width UTC text (millisecond precision), so that comparing the text
/// compares the instants.
pub fn instant(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A plan as stored: each period's signed watts (charge positive), comma-separated, so a
/// command is one row (one item) however many periods it has.
pub fn encode_plan(setpoints: &[Setpoint]) -> String {
    let mut out = String::with_capacity(setpoints.len() * 7);
    for (i, sp) in setpoints.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let w = i64::from(sp.rate().watts());
        let signed = match sp.mode() {
            Mode::Charge => w,
            Mode::Discharge => -w,
            Mode::Idle => 0,
        };
        // Into the one string: a plan is 46 to 50 numbers, each once its own allocation.
        let _ = write!(out, "{signed}");
    }
    out
}

/// Reads a stored plan.
pub fn decode_plan(plan: &str) -> Result<Vec<Setpoint>, String> {
    if plan.is_empty() {
        return Ok(Vec::new());
    }
    plan.split(',')
        .map(|w| {
            let w: i64 = w.parse().map_err(|e| format!("plan: {w:?}: {e}"))?;
            let mode = match w.signum() {
                1 => Mode::Charge,
                -1 => Mode::Discharge,
                _ => Mode::Idle,
            };
            let watts = u32::try_from(w.unsigned_abs()).map_err(|e| format!("plan: {w}: {e}"))?;
            Setpoint::new(mode, RateKw::from_watts(watts)).map_err(|e| format!("plan: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_round_trips_through_its_text() {
        let sps = vec![
            Setpoint::new(Mode::Charge, RateKw::from_watts(150_000)).unwrap(),
            Setpoint::IDLE,
            Setpoint::new(Mode::Discharge, RateKw::from_watts(1)).unwrap(),
        ];
        let text = encode_plan(&sps);
        assert_eq!(text, "150000,0,-1");
        assert_eq!(decode_plan(&text).unwrap(), sps);
        assert!(decode_plan("12,x").is_err());
    }

    #[test]
    fn instants_sort_as_text() {
        let a: Timestamp = "2026-11-30T09:59:59.999Z".parse().unwrap();
        let b: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        assert!(instant(a) < instant(b));
        assert_eq!(instant(b), "2026-11-30T10:00:00.000Z");
    }
}
