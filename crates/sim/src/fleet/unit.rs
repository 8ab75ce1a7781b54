//! A simulated unit's day, without a battery or a disk: the plans it holds (the agent's
//! [`Engine`], which keeps each plan's setpoints, not its message), the period it is running,
//! and a state of charge that follows what it ran. Pure: every call takes `now`.
//!
//! ```text
//!  boundary b ──▶ close the period that ended at b: its report (executed as planned, the
//!                 energy of the whole period) ──▶ outbox
//!              ──▶ engine.due: a missed period is reported skipped at once; the current one
//!                 is opened, and its report waits for the next boundary, as the agent's does
//! ```

use jiff::{SignedDuration, Timestamp};
use max300_agent::engine::{Action, ControlDecision, Decision, Engine, PeriodDue, Verdict};
use max300_protocol::message::{
    AckMsg, ControlMsg, HeartbeatMsg, ReportMsg, ReportStatus, ScheduleMsg, V1,
};
use max300_protocol::{Mode, PERIOD_SECS, StoreId};

/// One period of plan time.
const PERIOD: SignedDuration = SignedDuration::from_secs(PERIOD_SECS);
/// The unit's capacity, for its state of charge: a MAX300 stores 300 kWh.
const CAPACITY_KWH: f64 = 300.0;

/// One simulated unit's plans and current period.
#[derive(Debug)]
pub struct Unit {
    engine: Engine,
    open: Option<Open>,
    /// State of charge, in percent; moves with each period's energy, within 0..=100.
    soc_pct: f32,
}

/// The period being run: its report goes out at the boundary that ends it.
#[derive(Debug)]
struct Open {
    due: PeriodDue,
    /// When it was opened: its start, or later for the period current at the unit's start.
    from: Timestamp,
    /// The state of charge when it was run, as the agent reads it back.
    soc_pct: f32,
}

impl Unit {
    /// A unit deciding with `engine`, at `soc_pct` state of charge.
    pub fn new(engine: Engine, soc_pct: f32) -> Unit {
        Unit {
            engine,
            open: None,
            soc_pct: soc_pct.clamp(0.0, 100.0),
        }
    }

    /// The ack of a schedule, as entry `from` of the store (the engine's verdict, continuing
    /// the schedule's trace); an accepted plan is held from now on. `None` if the engine
    /// withholds the ack.
    pub fn on_schedule(
        &mut self,
        msg: &ScheduleMsg,
        from: (&StoreId, u64),
        now: Timestamp,
    ) -> Option<AckMsg> {
        let decision = self.engine.on_schedule(msg, now);
        let mut ack = decision
            .verdict()?
            .ack(&msg.message_id, self.engine.device_id(), from, now);
        ack.traceparent = msg.traceparent.clone();
        if let Decision::Accept(plan) = decision {
            self.engine.hold(plan);
            self.engine.acted(now);
        }
        Some(ack)
    }

    /// The ack of a control message; a cancel is applied as the agent applies it (the
    /// remaining periods of its plan are skipped).
    pub fn on_control(
        &mut self,
        msg: &ControlMsg,
        from: (&StoreId, u64),
        now: Timestamp,
    ) -> AckMsg {
        let verdict = match self.engine.on_control(msg) {
            ControlDecision::Cancel { target, .. } => {
                self.engine.cancel(msg.message_id.clone(), &target, now);
                self.engine.acted(now);
                Verdict::ACCEPTED
            }
            ControlDecision::Repeat => Verdict::ACCEPTED,
            ControlDecision::Reject { reason, details } => Verdict::Rejected { reason, details },
        };
        let mut ack = verdict.ack(&msg.message_id, self.engine.device_id(), from, now);
        ack.traceparent = msg.traceparent.clone();
        ack
    }

    /// What the unit reports at a boundary reached at `now`, having run for `uptime` (clock
    /// time), oldest first, with seq 0 (the outbox stamps it): the period that just ended,
    /// executed as planned (or skipped, as the agent skips it), then any period missed.
    pub fn boundary(
        &mut self,
        store_id: &StoreId,
        now: Timestamp,
        uptime: SignedDuration,
    ) -> Vec<ReportMsg> {
        let mut reports = Vec::new();
        if self.engine.clock_unsynced(now) {
            return reports;
        }
        if let Some(open) = self.open.take_if(|o| o.due.start + PERIOD <= now) {
            reports.push(self.close(open, store_id, now));
        }
        let due = self.engine.due(now, uptime);
        let count = due.len();
        for (i, period) in due.into_iter().enumerate() {
            self.engine.mark_done(period.start);
            if i + 1 == count {
                self.open = Some(Open {
                    from: now.max(period.start),
                    soc_pct: self.soc_pct,
                    due: period,
                });
            } else {
                reports.push(period.report(self.engine.device_id(), store_id, now));
            }
        }
        self.engine.acted(now);
        reports
    }

    /// The report of a period that ended by `now`: a run is executed as planned, with the
    /// energy of the part of the period the unit ran; a skip is the agent's skip, idle.
    fn close(&mut self, open: Open, store_id: &StoreId, now: Timestamp) -> ReportMsg {
        let mut report = open.due.report(self.engine.device_id(), store_id, now);
        let end = open.due.start + PERIOD;
        let hours = end.duration_since(open.from).as_secs_f64().max(0.0) / 3600.0;
        let mut kwh = 0.0;
        if let Action::Run { setpoint, .. } = &open.due.action {
            kwh = setpoint.rate().kw() * hours;
            report.status = ReportStatus::Executed;
            report.applied_kw = Some(setpoint.rate());
            report.soc_pct = Some(f64::from(open.soc_pct));
            let change = (kwh / CAPACITY_KWH * 100.0) as f32;
            self.soc_pct = match setpoint.mode() {
                Mode::Charge => self.soc_pct + change,
                Mode::Discharge => self.soc_pct - change,
                Mode::Idle => self.soc_pct,
            }
            .clamp(0.0, 100.0);
        }
        report.energy_kwh = Some((kwh * 1000.0).round() / 1000.0);
        report
    }

    /// The heartbeat at `now`: the plan in force and what the unit runs, or why it follows
    /// none.
    pub fn heartbeat(&self, now: Timestamp, uptime_s: u64, outbox: usize) -> HeartbeatMsg {
        let running = self.engine.current(now);
        HeartbeatMsg {
            v: V1,
            device_id: self.engine.device_id().clone(),
            at: now,
            uptime_s,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            active_message_id: self.engine.active(now).cloned(),
            mode: running.mode(),
            rate_kw: running.rate(),
            soc_pct: Some(f64::from(self.soc_pct)),
            fallback: self.engine.fallback(now),
            outbox: outbox as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;
    use max300_protocol::day::time_zone;
    use max300_protocol::message::{AckStatus, Fallback, PeriodReason};
    use max300_protocol::{DEFAULT_TIMEZONE, Day, DeviceId, MessageId, RateKw, Schedule, Setpoint};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn unit() -> Unit {
        let tz = time_zone(DEFAULT_TIMEZONE).unwrap();
        let max = RateKw::try_from(150.0).unwrap();
        let id = DeviceId::parse("max300-0001").unwrap();
        Unit::new(Engine::new(id, tz, DEFAULT_TIMEZONE, max), 50.0)
    }

    /// 2026-11-30: period 1 charges 60 kW, period 2 discharges 30 kW, the rest idle.
    fn plan() -> ScheduleMsg {
        let day = Day::new(date(2026, 11, 30), time_zone(DEFAULT_TIMEZONE).unwrap()).unwrap();
        let mut setpoints = vec![Setpoint::IDLE; day.period_count() as usize];
        setpoints[0] = Setpoint::new(Mode::Charge, RateKw::try_from(60.0).unwrap()).unwrap();
        setpoints[1] = Setpoint::new(Mode::Discharge, RateKw::try_from(30.0).unwrap()).unwrap();
        let schedule = Schedule::new(
            DeviceId::parse("max300-0001").unwrap(),
            day.clone(),
            setpoints,
        )
        .unwrap();
        ScheduleMsg::new(&schedule, MessageId::generate(day.start()), 1, day.start())
    }

    const UP: SignedDuration = SignedDuration::from_hours(24);

    #[test]
    fn an_accepted_plan_is_held_and_each_period_is_reported_at_the_boundary_that_ends_it() {
        let mut u = unit();
        let store = StoreId::parse("s").unwrap();
        let msg = plan();
        let ack = u
            .on_schedule(&msg, (&store, 1), ts("2026-11-29T16:00:00Z"))
            .unwrap();
        assert_eq!((ack.status, ack.seq), (AckStatus::Accepted, 1));
        // The unit starts at 23:50: the current period opens, nothing to report yet.
        assert!(
            u.boundary(&store, ts("2026-11-29T23:50:00Z"), UP)
                .is_empty()
        );
        // Midnight: 23:30 ran with no plan (skipped, no_schedule; idle, no energy).
        let r = u.boundary(&store, ts("2026-11-30T00:00:00Z"), UP);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (
                r[0].status,
                r[0].reason,
                r[0].message_id.as_ref(),
                r[0].energy_kwh
            ),
            (
                ReportStatus::Skipped,
                Some(PeriodReason::NoSchedule),
                None,
                Some(0.0)
            )
        );
        assert_eq!(r[0].interval_start, ts("2026-11-29T23:30:00Z"));
        // 00:30: period 1 executed as planned, 60 kW for half an hour.
        let r = u.boundary(&store, ts("2026-11-30T00:30:00Z"), UP);
        assert_eq!(r.len(), 1);
        let p1 = &r[0];
        assert_eq!(
            (p1.period, p1.status, p1.mode),
            (1, ReportStatus::Executed, Mode::Charge)
        );
        assert_eq!(
            (p1.rate_kw.kw(), p1.applied_kw.map(|r| r.kw())),
            (60.0, Some(60.0))
        );
        assert_eq!((p1.energy_kwh, p1.soc_pct), (Some(30.0), Some(50.0)));
        assert_eq!(p1.message_id.as_ref(), Some(&msg.message_id));
        assert_eq!(p1.at, ts("2026-11-30T00:30:00Z"));
        // 01:00: period 2 discharged from the SoC that period 1 left (+10 %).
        let r = u.boundary(&store, ts("2026-11-30T01:00:00Z"), UP);
        assert_eq!(
            (r[0].period, r[0].mode, r[0].soc_pct),
            (2, Mode::Discharge, Some(60.0))
        );
        let hb = u.heartbeat(ts("2026-11-30T01:10:00Z"), 60, 0);
        assert_eq!(hb.active_message_id.as_ref(), Some(&msg.message_id));
        assert_eq!((hb.fallback, hb.soc_pct), (None, Some(55.0)));
    }

    #[test]
    fn periods_missed_between_two_boundaries_are_reported_skipped_once() {
        let mut u = unit();
        let store = StoreId::parse("s").unwrap();
        u.on_schedule(&plan(), (&store, 1), ts("2026-11-29T16:00:00Z"));
        u.boundary(&store, ts("2026-11-30T00:00:00Z"), UP);
        // The next boundary seen is 01:30: period 1 closes, periods 2 and 3 were missed.
        let r = u.boundary(&store, ts("2026-11-30T01:30:00Z"), UP);
        let summary: Vec<_> = r.iter().map(|r| (r.period, r.status, r.reason)).collect();
        assert_eq!(
            summary,
            [
                (1, ReportStatus::Executed, None),
                (2, ReportStatus::Skipped, Some(PeriodReason::AgentDown)),
                (3, ReportStatus::Skipped, Some(PeriodReason::AgentDown)),
            ]
        );
        assert!(
            u.boundary(&store, ts("2026-11-30T01:31:00Z"), UP)
                .is_empty()
        );
    }

    #[test]
    fn without_a_plan_the_unit_idles_and_says_why() {
        let mut u = unit();
        let store = StoreId::parse("s").unwrap();
        u.boundary(&store, ts("2026-11-30T10:00:00Z"), UP);
        let r = u.boundary(&store, ts("2026-11-30T10:30:00Z"), UP);
        assert_eq!(
            (r[0].status, r[0].reason),
            (ReportStatus::Skipped, Some(PeriodReason::NoSchedule))
        );
        let hb = u.heartbeat(ts("2026-11-30T10:31:00Z"), 1, 2);
        assert_eq!(
            (hb.fallback, hb.outbox, hb.active_message_id),
            (Some(Fallback::NoSchedule), 2, None)
        );
    }
}
