//! Plan feasibility: would a unit following this plan run into its state-of-charge limits?
//!
//! An estimate, not a verdict: it starts from the unit's last reported SoC, plays what is
//! left of the day's plan, then the new plan, period by period, and names the first period
//! where the unit would have to stop (the agent's SoC window stops charge at `soc_max` and
//! discharge at `soc_min`). The plan is accepted either way; the warning tells the operator
//! (and the provider) that part of it will not run as written.

use max300_protocol::{Mode, Setpoint};
use serde::Serialize;

/// Half an hour, in hours.
const PERIOD_HOURS: f64 = max300_protocol::PERIOD_SECS as f64 / 3600.0;

/// What the estimate assumes of a unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pack {
    /// Usable capacity, kWh.
    pub capacity_kwh: f64,
    /// The agent's lower SoC limit, percent.
    pub soc_min_pct: f64,
    /// The agent's upper SoC limit, percent.
    pub soc_max_pct: f64,
    /// Round-trip efficiency (0..=1]; half the loss on the way in, half on the way out.
    pub round_trip_efficiency: f64,
}

/// Which limit a plan runs into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// Charging would go past `soc_max`.
    SocMax,
    /// Discharging would go below `soc_min`.
    SocMin,
}

/// A plan that would not run as written.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Infeasible {
    /// The limit.
    pub limit: Limit,
    /// The first period of the new plan that the limit cuts short.
    pub period: u32,
    /// How many of its periods the limits would cut short in all.
    pub periods_cut: u32,
    /// The estimated SoC at the start of the new plan, percent.
    pub start_soc_pct: f64,
}

impl Infeasible {
    /// One line for people.
    pub fn message(&self) -> String {
        let (what, limit) = match self.limit {
            Limit::SocMax => ("charge", "soc_max"),
            Limit::SocMin => ("discharge", "soc_min"),
        };
        format!(
            "from an estimated {:.0} % at the start, {what} would reach {limit} in period {}; \
             {} period(s) would be cut short",
            self.start_soc_pct, self.period, self.periods_cut
        )
    }
}

impl Pack {
    /// SoC after running `setpoint` for one period from `soc`, stopped at the limits as the
    /// agent would; and whether a limit cut it short.
    fn step(&self, soc: f64, setpoint: Setpoint) -> (f64, Option<Limit>) {
        let half_loss = self.round_trip_efficiency.sqrt();
        let kwh = setpoint.rate().kw() * PERIOD_HOURS;
        let pct = |kwh: f64| kwh / self.capacity_kwh * 100.0;
        match setpoint.mode() {
            Mode::Charge => {
                let next = soc + pct(kwh * half_loss);
                if next > self.soc_max_pct {
                    (soc.max(self.soc_max_pct), Some(Limit::SocMax))
                } else {
                    (next, None)
                }
            }
            Mode::Discharge => {
                let next = soc - pct(kwh / half_loss);
                if next < self.soc_min_pct {
                    (soc.min(self.soc_min_pct), Some(Limit::SocMin))
                } else {
                    (next, None)
                }
            }
            Mode::Idle => (soc, None),
        }
    }

    /// The SoC after `setpoints` have run from `soc_pct`, each stopped at the limits.
    pub fn play(&self, soc_pct: f64, setpoints: &[Setpoint]) -> f64 {
        setpoints
            .iter()
            .fold(soc_pct, |soc, sp| self.step(soc, *sp).0)
    }

    /// Plays `plan` from `soc_pct` (for a later day, where [`Pack::play`] leaves the rest of
    /// the current plan); `None` when the plan runs as written.
    pub fn check(
        &self,
        soc_pct: f64,
        plan: impl IntoIterator<Item = (u32, Setpoint)>,
    ) -> Option<Infeasible> {
        let mut soc = soc_pct;
        let mut first: Option<(Limit, u32)> = None;
        let mut periods_cut = 0;
        for (period, setpoint) in plan {
            let (next, cut) = self.step(soc, setpoint);
            soc = next;
            if let Some(limit) = cut {
                periods_cut += 1;
                first.get_or_insert((limit, period));
            }
        }
        first.map(|(limit, period)| Infeasible {
            limit,
            period,
            periods_cut,
            start_soc_pct: (soc_pct * 10.0).round() / 10.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use max300_protocol::RateKw;
    use proptest::prelude::*;

    const PACK: Pack = Pack {
        capacity_kwh: 300.0,
        soc_min_pct: 10.0,
        soc_max_pct: 90.0,
        round_trip_efficiency: 1.0,
    };

    fn sp(mode: Mode, kw: u32) -> Setpoint {
        Setpoint::normalized(mode, RateKw::from_watts(kw * 1000))
    }

    fn numbered(plan: &[Setpoint]) -> Vec<(u32, Setpoint)> {
        (1..).zip(plan.iter().copied()).collect()
    }

    #[test]
    fn a_plan_within_the_window_is_feasible() {
        // 6 × 0.5 h × 50 kW = 150 kWh = 50 %: 30 % → 80 %.
        let plan = [sp(Mode::Charge, 50); 6];
        assert_eq!(PACK.check(30.0, numbered(&plan)), None);
    }

    #[test]
    fn charge_past_soc_max_names_the_first_period_cut() {
        // 30 % + 5 × 10 % = 80 %, the sixth period would reach 90 %, the seventh 100 %.
        let plan = [sp(Mode::Charge, 60); 8];
        let bad = PACK.check(30.0, numbered(&plan)).unwrap();
        assert_eq!(
            (bad.limit, bad.period, bad.periods_cut),
            (Limit::SocMax, 7, 2)
        );
        assert!(bad.message().contains("period 7"), "{}", bad.message());
    }

    #[test]
    fn the_rest_of_today_counts_before_the_new_plan() {
        // This evening's discharge takes 50 % → 20 %; tomorrow's first discharge reaches
        // soc_min (10 %), its second would go below.
        let evening = [sp(Mode::Discharge, 60); 3];
        let plan = [
            sp(Mode::Idle, 0),
            sp(Mode::Discharge, 60),
            sp(Mode::Discharge, 60),
        ];
        let bad = PACK
            .check(PACK.play(50.0, &evening), numbered(&plan))
            .unwrap();
        assert_eq!(
            (bad.limit, bad.period, bad.start_soc_pct),
            (Limit::SocMin, 3, 20.0)
        );
        assert_eq!(
            PACK.check(50.0, numbered(&plan)),
            None,
            "without the evening"
        );
    }

    #[test]
    fn losses_make_a_tight_plan_infeasible() {
        let lossy = Pack {
            round_trip_efficiency: 0.81,
            ..PACK
        };
        // Discharging 80 % of stored energy costs 80 / 0.9 = 88.9 % with losses.
        let plan = [sp(Mode::Discharge, 60); 8];
        assert_eq!(PACK.check(90.0, numbered(&plan)), None);
        assert!(lossy.check(90.0, numbered(&plan)).is_some());
    }

    proptest! {
        #[test]
        fn the_estimate_never_leaves_the_window(
            start in 10.0f64..=90.0,
            plan in proptest::collection::vec((0u8..3, 0u32..300), 46..=50),
        ) {
            let plan: Vec<Setpoint> = plan
                .into_iter()
                .map(|(m, kw)| sp([Mode::Charge, Mode::Discharge, Mode::Idle][usize::from(m)], kw))
                .collect();
            if let Some(bad) = PACK.check(start, numbered(&plan)) {
                prop_assert!(bad.periods_cut >= 1);
                prop_assert!(bad.period >= 1 && bad.period as usize <= plan.len());
            }
            let mut soc = start;
            for s in &plan {
                soc = PACK.step(soc, *s).0;
                prop_assert!((10.0 - 1e-9..=90.0 + 1e-9).contains(&soc), "{soc}");
            }
        }
    }
}
