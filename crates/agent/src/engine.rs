//! The execution engine: which plans the device holds, what to do in each period, and when to
//! wake next. Pure: it takes `now` and returns decisions; the shell in `agent` carries them out.
//!
//! ```text
//!            persisted here          effective_period
//!                  │                       │
//!  ... ──┼─────────▼─────┼─────────────────▼──┼── ...   a newer version never takes over
//!   period p (old plan)   period p+1 (new plan)          in the middle of a period
//! ```

use std::collections::{BTreeMap, HashMap};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use max300_protocol::day::period_start_at;
use max300_protocol::message::{
    AckMsg, AckStatus, ControlMsg, Fallback, HeldPlan, PeriodReason, RejectReason, ReportMsg,
    ReportStatus, ScheduleMsg, V1,
};
use max300_protocol::{
    Day, DeviceId, MessageId, PERIOD_SECS, RateKw, Schedule, Setpoint, StoreId, TraceParent,
};

/// How far back missed periods are still reported unless set otherwise (`catch_up_h`): 48
/// hours. Periods before the cut-off get no report; the cloud marks them `unreported` when
/// their command turns `incomplete`, an hour after its end.
pub const DEFAULT_CATCH_UP: SignedDuration = SignedDuration::from_hours(48);

/// Plans older than this many days before the period just done are dropped from memory.
const KEEP_DAYS: i64 = 2;

/// How long a control message is remembered after it was received (clock time): for repeats,
/// and, when its plan has not arrived, as the tombstone that refuses that plan. A week is far
/// longer than the cloud resends a command, and keeps the list from growing without bound.
pub const CONTROL_KEEP: SignedDuration = SignedDuration::from_hours(7 * 24);

const PERIOD: SignedDuration = SignedDuration::from_secs(PERIOD_SECS);

/// A plan the device holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The command it came in.
    pub message_id: MessageId,
    /// Its version for its date.
    pub version: u32,
    /// Its sha256, as computed here.
    pub sha256: String,
    /// The first period it governs.
    pub effective_period: u32,
    /// The setpoints.
    pub schedule: Schedule,
    /// Cancelled by a control message: its remaining periods are skipped.
    pub cancelled: bool,
    /// The trace context it came with; its acks and reports continue that trace.
    pub traceparent: Option<TraceParent>,
}

/// What to do with a schedule message.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Persist the plan, then ack it accepted.
    Accept(Plan),
    /// Already held: ack it accepted again, with the same effective period.
    Repeat {
        /// As acked the first time.
        effective_period: u32,
        /// As acked the first time.
        sha256: String,
    },
    /// Ack it rejected.
    Reject {
        /// Why.
        reason: RejectReason,
        /// Details, for `invalid` and a few others.
        details: Option<String>,
    },
    /// Send no ack now because of the device's own passing state; the cloud resends.
    Withhold {
        /// Why, for the log.
        why: &'static str,
    },
}

impl Decision {
    /// What the ack of this decision says; `None` for [`Decision::Withhold`], which sends none.
    pub fn verdict(&self) -> Option<Verdict> {
        match self {
            Decision::Accept(plan) => Some(Verdict::Accepted {
                sha256: Some(plan.sha256.clone()),
                effective_period: Some(plan.effective_period),
            }),
            Decision::Repeat {
                effective_period,
                sha256,
            } => Some(Verdict::Accepted {
                sha256: Some(sha256.clone()),
                effective_period: Some(*effective_period),
            }),
            Decision::Reject { reason, details } => Some(Verdict::Rejected {
                reason: *reason,
                details: details.clone(),
            }),
            Decision::Withhold { .. } => None,
        }
    }
}

/// What an ack says about a schedule or control message, apart from who sends it and when.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Accepted; a schedule's ack also has its sha256 and the first period it governs.
    Accepted {
        /// The plan's sha256, as computed here.
        sha256: Option<String>,
        /// The first period the plan governs.
        effective_period: Option<u32>,
    },
    /// Rejected.
    Rejected {
        /// Why.
        reason: RejectReason,
        /// Details, for `invalid` and a few others.
        details: Option<String>,
    },
}

impl Verdict {
    /// Accepted, as a control message's ack says it (no sha256, no period).
    pub const ACCEPTED: Verdict = Verdict::Accepted {
        sha256: None,
        effective_period: None,
    };

    /// The ack of `message_id` that `device_id` sends at `now` from its store `store_id` as
    /// entry `seq`, with no trace context.
    pub fn ack(
        self,
        message_id: &MessageId,
        device_id: &DeviceId,
        (store_id, seq): (&StoreId, u64),
        now: Timestamp,
    ) -> AckMsg {
        let (status, reason, details, sha256, effective_period) = match self {
            Verdict::Accepted {
                sha256,
                effective_period,
            } => (AckStatus::Accepted, None, None, sha256, effective_period),
            Verdict::Rejected { reason, details } => {
                (AckStatus::Rejected, Some(reason), details, None, None)
            }
        };
        AckMsg {
            v: V1,
            store_id: store_id.clone(),
            seq,
            message_id: message_id.clone(),
            device_id: device_id.clone(),
            status,
            reason,
            details,
            sha256,
            effective_period,
            at: now,
            traceparent: None,
        }
    }
}

/// What to do with a control message.
#[derive(Clone, Debug, PartialEq)]
pub enum ControlDecision {
    /// Persist the cancel, go idle at once if it cancels the plan in force, then ack it
    /// accepted.
    Cancel {
        /// The plan to cancel.
        target: MessageId,
        /// Whether the device holds that plan; if not, the cancel is kept for it.
        held: bool,
    },
    /// Already handled: ack it accepted again.
    Repeat,
    /// Ack it rejected.
    Reject {
        /// Why.
        reason: RejectReason,
        /// Details.
        details: Option<String>,
    },
}

/// One period that has started and not yet been handled.
#[derive(Clone, Debug, PartialEq)]
pub struct PeriodDue {
    /// The period's start: the report's natural key.
    pub start: Timestamp,
    /// Its local date.
    pub date: Date,
    /// Its 1-based number within the date.
    pub period: u32,
    /// What to do about it.
    pub action: Action,
}

impl PeriodDue {
    /// The period's report as the agent starts it at `now`, with seq 0 (stamped when it is
    /// queued): a skip complete with its reason and what its plan said; a run with its plan
    /// and setpoint, `skipped` until the run says how it went.
    pub fn report(&self, device_id: &DeviceId, store_id: &StoreId, now: Timestamp) -> ReportMsg {
        let (message_id, planned, reason) = match &self.action {
            Action::Skip {
                reason,
                message_id,
                planned,
            } => (message_id.clone(), *planned, Some(*reason)),
            Action::Run {
                setpoint,
                message_id,
            } => (Some(message_id.clone()), *setpoint, None),
        };
        ReportMsg {
            v: V1,
            store_id: store_id.clone(),
            seq: 0,
            message_id,
            device_id: device_id.clone(),
            period: self.period,
            interval_start: self.start,
            mode: planned.mode(),
            rate_kw: planned.rate(),
            status: ReportStatus::Skipped,
            applied_kw: None,
            limited_by: None,
            reason,
            would_kw: None,
            soc_pct: None,
            energy_kwh: None,
            error: None,
            at: now,
            traceparent: None,
        }
    }
}

/// Run a period or report it skipped.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Apply the plan's setpoint now.
    Run {
        /// The planned setpoint.
        setpoint: Setpoint,
        /// The plan governing the period.
        message_id: MessageId,
    },
    /// Report the period skipped; if it is the current one, go idle.
    Skip {
        /// Why.
        reason: PeriodReason,
        /// The plan that governed the period, if any.
        message_id: Option<MessageId>,
        /// What that plan said (idle when there was none).
        planned: Setpoint,
    },
}

/// A control message handled: what it cancelled, and when it came.
#[derive(Clone, Debug, PartialEq)]
struct Control {
    target: MessageId,
    received: Timestamp,
}

/// The engine's state: plans by local date, cancellations, and what was done last.
#[derive(Debug)]
pub struct Engine {
    device_id: DeviceId,
    tz: TimeZone,
    tz_name: String,
    max_rate: RateKw,
    plans: BTreeMap<Date, Vec<Plan>>,
    /// Control messages by id, for [`CONTROL_KEEP`]. One whose target is not held is a
    /// tombstone: the cloud may publish a cancel before (or racing) the plan it cancels, and
    /// the cancel wins.
    controls: HashMap<MessageId, Control>,
    catch_up: SignedDuration,
    /// The agent found its clock unsynchronized since it last caught up with the current
    /// period: what it missed while running was missed for that reason.
    unsynced_seen: bool,
    last_done: Option<Timestamp>,
    last_instant: Option<Timestamp>,
    /// What the time source says (NTP status, where checked): false means unsynchronized.
    time_source_synced: bool,
}

impl Engine {
    /// An engine for one device, in the zone named `tz_name`, holding nothing.
    pub fn new(device_id: DeviceId, tz: TimeZone, tz_name: &str, max_rate: RateKw) -> Engine {
        Engine {
            device_id,
            tz,
            tz_name: tz_name.to_owned(),
            max_rate,
            plans: BTreeMap::new(),
            controls: HashMap::new(),
            catch_up: DEFAULT_CATCH_UP,
            unsynced_seen: false,
            last_done: None,
            last_instant: None,
            time_source_synced: true,
        }
    }

    /// How far back from the current period missed periods are still reported (the
    /// `catch_up_h` setting); earlier ones get no report.
    pub fn with_catch_up(mut self, catch_up: SignedDuration) -> Engine {
        self.catch_up = catch_up;
        self
    }

    /// Records whether the system's time sync says the clock is right.
    pub fn set_time_source(&mut self, synced: bool) {
        self.time_source_synced = synced;
        if !synced {
            self.note_unsynced();
        }
    }

    /// Restores what the store remembers: the last period handled and the latest instant
    /// the agent acted at.
    pub fn restore(&mut self, last_done: Option<Timestamp>, last_instant: Option<Timestamp>) {
        self.last_done = last_done;
        self.last_instant = last_instant;
    }

    /// The device it decides for.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// The zone of schedule dates.
    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    /// Whether the system's time sync said the clock is right, the last time it was asked.
    pub fn time_source_synced(&self) -> bool {
        self.time_source_synced
    }

    /// Whether the clock reads earlier than an instant the agent already acted at.
    pub fn clock_unsynced(&self, now: Timestamp) -> bool {
        !self.time_source_synced || self.last_instant.is_some_and(|last| now < last)
    }

    /// Records that the agent acted at `now` (the shell persists the same instant).
    pub fn acted(&mut self, now: Timestamp) {
        self.last_instant = Some(self.last_instant.map_or(now, |l| l.max(now)));
        // Caught up on a good clock: whatever is missed from here on has another cause.
        if !self.clock_unsynced(now)
            && let (Some(done), Ok(current)) = (self.last_done, period_start_at(now, &self.tz))
            && done >= current
        {
            self.unsynced_seen = false;
        }
    }

    /// Decides about a schedule message; changes nothing until [`Engine::hold`].
    pub fn on_schedule(&self, msg: &ScheduleMsg, now: Timestamp) -> Decision {
        let reject = |reason, details: Option<String>| Decision::Reject { reason, details };
        if msg.device_id != self.device_id {
            return reject(
                RejectReason::WrongDevice,
                Some(format!(
                    "device_id {} is not {}",
                    msg.device_id, self.device_id
                )),
            );
        }
        if let Some(held) = self.find(&msg.message_id) {
            // A repeat of the plan in force is accepted again; a repeat of one that a newer
            // version has replaced is an out-of-date command.
            let newest = self
                .plans
                .get(&held.schedule.day().date())
                .and_then(|v| v.last())
                .map_or(held.version, |p| p.version);
            if newest > held.version {
                return reject(
                    RejectReason::Superseded,
                    Some(format!(
                        "version {} is replaced by the held version {newest}",
                        held.version
                    )),
                );
            }
            return Decision::Repeat {
                effective_period: held.effective_period,
                sha256: held.sha256.clone(),
            };
        }
        // Before the device's own passing state: the refusal rests on what is on disk only.
        if let Some(control) = self.cancelled_by(&msg.message_id) {
            return reject(
                RejectReason::Cancelled,
                Some(format!(
                    "control message {control} cancelled it before it arrived"
                )),
            );
        }
        if self.clock_unsynced(now) {
            return Decision::Withhold {
                why: "clock_unsynced",
            };
        }
        if msg.timezone != self.tz_name {
            return reject(
                RejectReason::Invalid,
                Some(format!(
                    "timezone: {:?} is not the device's zone {:?}",
                    msg.timezone, self.tz_name
                )),
            );
        }
        let schedule = match msg.to_schedule() {
            Ok(s) => s,
            Err(e) => return reject(RejectReason::Invalid, Some(e.to_string())),
        };
        if let Some((i, iv)) = msg
            .intervals
            .iter()
            .enumerate()
            .find(|(_, iv)| iv.rate_kw > self.max_rate)
        {
            return reject(
                RejectReason::RateAboveMax,
                Some(format!(
                    "intervals[{i}].rate_kw: {} exceeds max_rate_kw {}",
                    iv.rate_kw, self.max_rate
                )),
            );
        }
        let day = schedule.day();
        if now >= day.end() {
            return reject(
                RejectReason::Past,
                Some(format!("{} ended at {}", day.date(), day.end())),
            );
        }
        if let Some(held) = self.plans.get(&day.date()).and_then(|v| v.last())
            && held.version >= msg.version
        {
            return reject(
                RejectReason::Superseded,
                Some(format!(
                    "version {} is not newer than the held version {}",
                    msg.version, held.version
                )),
            );
        }
        let Some(effective_period) = day.first_governed_at(now) else {
            return reject(
                RejectReason::Past,
                Some(format!("no period of {} is left to govern", day.date())),
            );
        };
        Decision::Accept(Plan {
            message_id: msg.message_id.clone(),
            version: msg.version,
            sha256: schedule.sha256(),
            effective_period,
            schedule,
            cancelled: false,
            traceparent: msg.traceparent.clone(),
        })
    }

    /// Holds a plan once it is on disk (also used when loading the store).
    pub fn hold(&mut self, plan: Plan) {
        let versions = self.plans.entry(plan.schedule.day().date()).or_default();
        versions.push(plan);
        versions.sort_by_key(|p| p.version);
    }

    /// Decides about a control message; changes nothing until [`Engine::cancel`].
    pub fn on_control(&self, msg: &ControlMsg) -> ControlDecision {
        if msg.device_id != self.device_id {
            return ControlDecision::Reject {
                reason: RejectReason::WrongDevice,
                details: Some(format!(
                    "device_id {} is not {}",
                    msg.device_id, self.device_id
                )),
            };
        }
        if self.controls.contains_key(&msg.message_id) {
            return ControlDecision::Repeat;
        }
        ControlDecision::Cancel {
            target: msg.target_message_id.clone(),
            held: self.find(&msg.target_message_id).is_some(),
        }
    }

    /// Applies a cancel once it is on disk (also used when loading the store): a held target
    /// is cancelled; one not held yet is refused when it comes. `control` is remembered for
    /// repeats until [`CONTROL_KEEP`] after `received`.
    pub fn cancel(&mut self, control: MessageId, target: &MessageId, received: Timestamp) {
        self.controls.insert(
            control,
            Control {
                target: target.clone(),
                received,
            },
        );
        for plan in self.plans.values_mut().flatten() {
            if &plan.message_id == target {
                plan.cancelled = true;
            }
        }
    }

    /// Notes that the agent, running, found its clock unsynchronized (it then handles no
    /// period): the periods it misses until the clock is right say `clock_unsynced`.
    pub fn note_unsynced(&mut self) {
        self.unsynced_seen = true;
    }

    /// Every period start `s` with `last_done < s <= now`, oldest first: the current one to
    /// run (or skip), the earlier ones missed. Nothing while the clock is unsynchronized, so
    /// no period is ever handled twice.
    ///
    /// `uptime` is how long (clock time) this process has run. A missed period that ended
    /// before it started was missed while the agent was down (`agent_down`); one that ended
    /// later, once the agent found its clock unsynchronized (see [`note_unsynced`]), was
    /// missed for that reason (`clock_unsynced`). A period left because its report could not
    /// be stored has no better name than `agent_down`.
    ///
    /// ```text
    ///          down            │ up, clock unsynchronized  │ synced again
    ///  ──┼──────┼──────┼───────┼─┼──────┼──────┼──────┼─────┼──▶
    ///    done   agent_down      clock_unsynced ...           current: run
    ///                          up_since = now − uptime
    /// ```
    ///
    /// [`note_unsynced`]: Engine::note_unsynced
    pub fn due(&self, now: Timestamp, uptime: SignedDuration) -> Vec<PeriodDue> {
        if self.clock_unsynced(now) {
            return Vec::new();
        }
        let Ok(current) = period_start_at(now, &self.tz) else {
            return Vec::new();
        };
        let first = match self.last_done {
            None => current,
            Some(done) => (done + PERIOD).max(current - self.catch_up),
        };
        let up_since = now.checked_sub(uptime).unwrap_or(Timestamp::MIN);
        let mut out = Vec::new();
        let mut start = first;
        while start <= current {
            let missed = if self.unsynced_seen && start + PERIOD > up_since {
                PeriodReason::ClockUnsynced
            } else {
                PeriodReason::AgentDown
            };
            if let Some(due) = self.period_due(start, start == current, missed) {
                out.push(due);
            }
            start += PERIOD;
        }
        out
    }

    /// What to do about the period starting at `start`; `missed` says why, if it is not the
    /// current one and a plan governs it.
    fn period_due(
        &self,
        start: Timestamp,
        is_current: bool,
        missed: PeriodReason,
    ) -> Option<PeriodDue> {
        let day = Day::containing(start, &self.tz).ok()?;
        let period = day.period_at(start)?;
        let plan = self.governing(&day, period);
        let planned = plan
            .and_then(|p| p.schedule.setpoint(period))
            .unwrap_or(Setpoint::IDLE);
        let message_id = plan.map(|p| p.message_id.clone());
        let action = match plan {
            Some(p) if p.cancelled => Action::Skip {
                reason: PeriodReason::Cancelled,
                message_id,
                planned,
            },
            Some(p) if is_current => Action::Run {
                setpoint: planned,
                message_id: p.message_id.clone(),
            },
            None if is_current => Action::Skip {
                reason: PeriodReason::NoSchedule,
                message_id: None,
                planned,
            },
            _ => Action::Skip {
                reason: missed,
                message_id,
                planned,
            },
        };
        Some(PeriodDue {
            start,
            date: day.date(),
            period,
            action,
        })
    }

    /// The control message that cancelled `plan` before the device held it, if any.
    fn cancelled_by(&self, plan: &MessageId) -> Option<&MessageId> {
        self.controls
            .iter()
            .filter(|(_, c)| &c.target == plan)
            .map(|(id, _)| id)
            .min()
    }

    /// Records that a period was handled (its report is on disk), and forgets what is too
    /// old to matter: plans, and control messages past [`CONTROL_KEEP`].
    pub fn mark_done(&mut self, start: Timestamp) {
        self.last_done = Some(self.last_done.map_or(start, |d| d.max(start)));
        self.controls.retain(|_, c| {
            c.received
                .checked_add(CONTROL_KEEP)
                .is_ok_and(|t| t > start)
        });
        let date = start.to_zoned_datetime(self.tz.clone()).date();
        if let Ok(oldest) = date.checked_sub(jiff::Span::new().days(KEEP_DAYS)) {
            self.plans.retain(|d, _| *d >= oldest);
        }
    }

    /// The start of the last period handled.
    pub fn last_done(&self) -> Option<Timestamp> {
        self.last_done
    }

    /// The next period boundary after `now`.
    pub fn next_wake(&self, now: Timestamp) -> Timestamp {
        match period_start_at(now, &self.tz) {
            Ok(start) => start + PERIOD,
            Err(_) => now + PERIOD,
        }
    }

    /// The plan governing the period at `now`, cancelled or not.
    fn governing_at(&self, now: Timestamp) -> Option<&Plan> {
        let day = Day::containing(now, &self.tz).ok()?;
        let period = day.period_at(now)?;
        self.governing(&day, period)
    }

    fn governing(&self, day: &Day, period: u32) -> Option<&Plan> {
        self.plans
            .get(&day.date())?
            .iter()
            .rev()
            .find(|p| p.effective_period <= period)
    }

    /// The trace context of a held plan.
    pub fn traceparent(&self, id: &MessageId) -> Option<&TraceParent> {
        self.find(id).and_then(|p| p.traceparent.as_ref())
    }

    fn find(&self, id: &MessageId) -> Option<&Plan> {
        self.plans.values().flatten().find(|p| &p.message_id == id)
    }

    /// What the plan says for the period at `now`; idle under any fallback.
    pub fn current(&self, now: Timestamp) -> Setpoint {
        if self.fallback(now).is_some() {
            return Setpoint::IDLE;
        }
        let Ok(day) = Day::containing(now, &self.tz) else {
            return Setpoint::IDLE;
        };
        day.period_at(now)
            .and_then(|p| self.governing(&day, p)?.schedule.setpoint(p))
            .unwrap_or(Setpoint::IDLE)
    }

    /// The plan in force at `now`, if the device follows one.
    pub fn active(&self, now: Timestamp) -> Option<&MessageId> {
        if self.clock_unsynced(now) {
            return None;
        }
        self.governing_at(now)
            .filter(|p| !p.cancelled)
            .map(|p| &p.message_id)
    }

    /// Why the device does not follow a plan at `now`; `None` when it does.
    pub fn fallback(&self, now: Timestamp) -> Option<Fallback> {
        if self.clock_unsynced(now) {
            return Some(Fallback::ClockUnsynced);
        }
        match self.governing_at(now) {
            None => Some(Fallback::NoSchedule),
            Some(p) if p.cancelled => Some(Fallback::Cancelled),
            Some(_) => None,
        }
    }

    /// The newest version held for each date from `now`'s date on: the `have` of a sync.
    pub fn held_plans(&self, now: Timestamp) -> Vec<HeldPlan> {
        let today = now.to_zoned_datetime(self.tz.clone()).date();
        self.plans
            .range(today..)
            .filter_map(|(date, versions)| {
                let p = versions.last()?;
                Some(HeldPlan {
                    schedule_date: *date,
                    version: p.version,
                    message_id: p.message_id.clone(),
                    sha256: p.sha256.clone(),
                })
            })
            .collect()
    }

    /// Whether a plan for today or tomorrow is missing (then the agent asks with `sync`).
    pub fn lacks_plan(&self, now: Timestamp) -> bool {
        let today = now.to_zoned_datetime(self.tz.clone()).date();
        let tomorrow = today.tomorrow().unwrap_or(today);
        !(self.plans.contains_key(&today) && self.plans.contains_key(&tomorrow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use max300_protocol::Mode;
    use max300_protocol::message::ControlAction;

    const TZ: &str = "Europe/London";
    /// The uptime of an agent that has just (re)started: every missed period was missed
    /// while it was down.
    const JUST_STARTED: SignedDuration = SignedDuration::ZERO;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn device() -> DeviceId {
        DeviceId::parse("max300-0001").unwrap()
    }

    fn engine() -> Engine {
        Engine::new(
            device(),
            TimeZone::get(TZ).unwrap(),
            TZ,
            RateKw::from_watts(150_000),
        )
    }

    fn charge(kw: u32) -> Setpoint {
        Setpoint::new(Mode::Charge, RateKw::from_watts(kw * 1000)).unwrap()
    }

    /// A plan for `date` charging at `kw` in every period.
    fn msg(date: &str, version: u32, kw: u32) -> ScheduleMsg {
        let day = Day::named(date.parse().unwrap(), TZ).unwrap();
        let n = day.period_count() as usize;
        let schedule = Schedule::new(device(), day, vec![charge(kw); n]).unwrap();
        let at = ts("2026-01-01T00:00:00Z");
        ScheduleMsg::new(&schedule, MessageId::generate(at), version, at)
    }

    #[test]
    fn every_decision_but_withhold_has_the_ack_the_contract_says() {
        let e = engine();
        let m = msg("2026-11-30", 1, 50);
        let store = StoreId::parse("s1").unwrap();
        let now = ts("2026-11-29T16:00:00Z");
        let verdict = e.on_schedule(&m, now).verdict().unwrap();
        let ack = verdict.ack(&m.message_id, &device(), (&store, 7), now);
        assert_eq!(
            (ack.status, ack.seq, ack.effective_period, ack.at),
            (AckStatus::Accepted, 7, Some(1), now)
        );
        assert_eq!(ack.sha256.as_deref(), Some(m.sha256.as_str()));
        let reject = Decision::Reject {
            reason: RejectReason::Past,
            details: Some("over".into()),
        };
        let ack = reject
            .verdict()
            .unwrap()
            .ack(&m.message_id, &device(), (&store, 8), now);
        assert_eq!(
            (ack.status, ack.reason, ack.details.as_deref(), ack.sha256),
            (
                AckStatus::Rejected,
                Some(RejectReason::Past),
                Some("over"),
                None
            )
        );
        let withheld = Decision::Withhold {
            why: "clock_unsynced",
        };
        assert_eq!(withheld.verdict(), None);
    }

    fn accept(e: &mut Engine, m: &ScheduleMsg, now: Timestamp) -> u32 {
        match e.on_schedule(m, now) {
            Decision::Accept(plan) => {
                let eff = plan.effective_period;
                e.hold(plan);
                eff
            }
            other => panic!("not accepted: {other:?}"),
        }
    }

    fn run_due(e: &mut Engine, now: Timestamp) -> Vec<PeriodDue> {
        run_due_up(e, now, JUST_STARTED)
    }

    fn reason(d: &PeriodDue) -> Option<PeriodReason> {
        match &d.action {
            Action::Skip { reason, .. } => Some(*reason),
            Action::Run { .. } => None,
        }
    }

    #[test]
    fn the_autumn_clock_change_runs_all_50_periods_once() {
        let mut e = engine();
        let m = msg("2026-10-25", 1, 10);
        assert_eq!(accept(&mut e, &m, ts("2026-10-24T15:00:00Z")), 1);
        run_due(&mut e, ts("2026-10-24T22:59:00Z"));
        let mut runs = Vec::new();
        let mut now = ts("2026-10-24T23:00:00Z");
        while now < ts("2026-10-26T00:00:00Z") {
            for d in run_due(&mut e, now) {
                if d.date == "2026-10-25".parse::<Date>().unwrap() {
                    assert!(matches!(d.action, Action::Run { .. }), "{d:?}");
                    runs.push(d.period);
                }
            }
            now = e.next_wake(now);
        }
        assert_eq!(runs, (1..=50).collect::<Vec<_>>());
    }

    #[test]
    fn the_spring_clock_change_has_46_periods() {
        let mut e = engine();
        let m = msg("2027-03-28", 1, 10);
        assert_eq!(m.intervals.len(), 46);
        assert_eq!(accept(&mut e, &m, ts("2027-03-27T15:00:00Z")), 1);
        let mut now = ts("2027-03-28T00:00:00Z");
        let mut runs = 0;
        while now < ts("2027-03-28T23:00:00Z") {
            runs += run_due(&mut e, now).len();
            now = e.next_wake(now);
        }
        assert_eq!(runs, 46);
    }

    #[test]
    fn a_newer_version_takes_effect_at_the_next_boundary() {
        let mut e = engine();
        let v1 = msg("2026-11-30", 1, 10);
        assert_eq!(accept(&mut e, &v1, ts("2026-11-29T16:00:00Z")), 1);
        let v2 = msg("2026-11-30", 2, 20);
        // 10:15 is in period 21 (10:00–10:30).
        let now = ts("2026-11-30T10:15:00Z");
        assert_eq!(accept(&mut e, &v2, now), 22);
        assert_eq!(e.current(now), charge(10));
        assert_eq!(e.current(ts("2026-11-30T10:30:00Z")), charge(20));
        assert_eq!(e.active(now), Some(&v1.message_id));
    }

    #[test]
    fn a_first_plan_for_today_starts_at_the_next_boundary() {
        let mut e = engine();
        let now = ts("2026-11-30T10:15:00Z");
        let due = run_due(&mut e, now);
        assert_eq!(due.len(), 1);
        assert_eq!(reason(&due[0]), Some(PeriodReason::NoSchedule));
        assert_eq!(e.fallback(now), Some(Fallback::NoSchedule));
        assert_eq!(accept(&mut e, &msg("2026-11-30", 1, 10), now), 22);
        assert_eq!(e.fallback(now), Some(Fallback::NoSchedule));
        let due = run_due(&mut e, ts("2026-11-30T10:30:00Z"));
        assert_eq!(due[0].period, 22);
        assert!(matches!(due[0].action, Action::Run { setpoint, .. } if setpoint == charge(10)));
    }

    #[test]
    fn rejects_past_superseded_wrong_device_too_fast_and_invalid_plans() {
        let mut e = engine();
        let now = ts("2026-11-30T10:15:00Z");
        let r = |d: Decision| match d {
            Decision::Reject { reason, .. } => reason,
            other => panic!("not rejected: {other:?}"),
        };
        assert_eq!(
            r(e.on_schedule(&msg("2026-11-29", 1, 10), now)),
            RejectReason::Past
        );
        accept(&mut e, &msg("2026-12-01", 3, 10), now);
        assert_eq!(
            r(e.on_schedule(&msg("2026-12-01", 2, 10), now)),
            RejectReason::Superseded
        );
        assert_eq!(
            r(e.on_schedule(&msg("2026-12-01", 3, 10), now)),
            RejectReason::Superseded
        );
        let mut other = msg("2026-12-02", 1, 10);
        other.device_id = DeviceId::parse("max300-0002").unwrap();
        assert_eq!(r(e.on_schedule(&other, now)), RejectReason::WrongDevice);
        assert_eq!(
            r(e.on_schedule(&msg("2026-12-02", 1, 151), now)),
            RejectReason::RateAboveMax
        );
        let mut bad = msg("2026-12-02", 1, 10);
        bad.intervals.pop();
        let Decision::Reject { reason, details } = e.on_schedule(&bad, now) else {
            panic!("accepted a short plan")
        };
        assert_eq!(reason, RejectReason::Invalid);
        assert!(details.unwrap().contains("48 periods"));
        let mut tz = msg("2026-12-02", 1, 10);
        tz.timezone = "UTC".into();
        assert_eq!(r(e.on_schedule(&tz, now)), RejectReason::Invalid);
    }

    #[test]
    fn a_plan_arriving_in_the_last_period_of_its_date_is_past() {
        let e = engine();
        let d = e.on_schedule(&msg("2026-11-30", 1, 10), ts("2026-11-30T23:45:00Z"));
        assert!(
            matches!(
                d,
                Decision::Reject {
                    reason: RejectReason::Past,
                    ..
                }
            ),
            "{d:?}"
        );
    }

    #[test]
    fn a_repeated_delivery_is_accepted_again_with_the_same_effective_period() {
        let mut e = engine();
        let m = msg("2026-11-30", 1, 10);
        let eff = accept(&mut e, &m, ts("2026-11-30T10:15:00Z"));
        let d = e.on_schedule(&m, ts("2026-11-30T12:00:00Z"));
        assert_eq!(
            d,
            Decision::Repeat {
                effective_period: eff,
                sha256: m.sha256.clone()
            }
        );
    }

    #[test]
    fn an_unsynchronized_time_source_idles_and_withholds_acks() {
        let mut e = engine();
        let m = msg("2026-11-30", 1, 10);
        accept(&mut e, &m, ts("2026-11-29T16:00:00Z"));
        e.set_time_source(false);
        let now = ts("2026-11-30T00:10:00Z");
        assert_eq!(e.fallback(now), Some(Fallback::ClockUnsynced));
        assert_eq!(e.current(now), Setpoint::IDLE);
        assert!(matches!(
            e.on_schedule(&msg("2026-11-30", 2, 20), now),
            Decision::Withhold { .. }
        ));
        e.set_time_source(true);
        assert_eq!(e.fallback(now), None);
    }

    #[test]
    fn a_late_copy_of_a_replaced_plan_is_rejected_as_superseded() {
        let mut e = engine();
        let v1 = msg("2026-11-30", 1, 10);
        let v2 = msg("2026-11-30", 2, 20);
        accept(&mut e, &v1, ts("2026-11-29T16:00:00Z"));
        accept(&mut e, &v2, ts("2026-11-29T17:00:00Z"));
        let d = e.on_schedule(&v1, ts("2026-11-30T12:00:00Z"));
        assert!(
            matches!(
                d,
                Decision::Reject {
                    reason: RejectReason::Superseded,
                    ..
                }
            ),
            "{d:?}"
        );
        assert!(matches!(
            e.on_schedule(&v2, ts("2026-11-30T12:00:00Z")),
            Decision::Repeat { .. }
        ));
    }

    #[test]
    fn catch_up_after_downtime_reports_agent_down_once_per_period() {
        let mut e = engine();
        let m = msg("2026-11-30", 1, 10);
        accept(&mut e, &m, ts("2026-11-29T16:00:00Z"));
        run_due(&mut e, ts("2026-11-30T00:00:00Z"));
        // Down from 00:10 to 02:10: periods 2, 3, 4 (01:30) were missed; 5 is current.
        let due = run_due(&mut e, ts("2026-11-30T02:10:00Z"));
        let summary: Vec<_> = due.iter().map(|d| (d.period, reason(d))).collect();
        assert_eq!(
            summary,
            vec![
                (2, Some(PeriodReason::AgentDown)),
                (3, Some(PeriodReason::AgentDown)),
                (4, Some(PeriodReason::AgentDown)),
                (5, None)
            ]
        );
        assert!(due[..3].iter().all(|d| matches!(
            &d.action,
            Action::Skip { message_id: Some(id), .. } if *id == m.message_id
        )));
        assert!(run_due(&mut e, ts("2026-11-30T02:20:00Z")).is_empty());
    }

    /// Runs the periods due at `now` for an agent that has been up for `uptime`.
    fn run_due_up(e: &mut Engine, now: Timestamp, uptime: SignedDuration) -> Vec<PeriodDue> {
        let due = e.due(now, uptime);
        for d in &due {
            e.mark_done(d.start);
        }
        e.acted(now);
        due
    }

    fn summary(due: &[PeriodDue]) -> Vec<(u32, Option<PeriodReason>)> {
        due.iter().map(|d| (d.period, reason(d))).collect()
    }

    #[test]
    fn periods_missed_while_up_with_an_unsynchronized_time_source_say_clock_unsynced() {
        let mut e = engine();
        let m = msg("2026-11-30", 1, 10);
        accept(&mut e, &m, ts("2026-11-29T16:00:00Z"));
        let hours = SignedDuration::from_hours;
        run_due_up(&mut e, ts("2026-11-30T10:00:00Z"), hours(10));
        // NTP is lost at 10:10 and back at 12:10: the agent ran all along.
        e.set_time_source(false);
        assert!(e.due(ts("2026-11-30T10:40:00Z"), hours(11)).is_empty());
        e.set_time_source(true);
        let due = run_due_up(&mut e, ts("2026-11-30T12:10:00Z"), hours(12));
        assert_eq!(
            summary(&due),
            vec![
                (22, Some(PeriodReason::ClockUnsynced)),
                (23, Some(PeriodReason::ClockUnsynced)),
                (24, Some(PeriodReason::ClockUnsynced)),
                (25, None)
            ]
        );
        assert!(due[..3].iter().all(|d| matches!(
            &d.action,
            Action::Skip { message_id: Some(id), .. } if *id == m.message_id
        )));
        // Caught up: a later outage of the process is agent_down again.
        let due = run_due_up(&mut e, ts("2026-11-30T13:10:00Z"), JUST_STARTED);
        assert_eq!(
            summary(&due),
            vec![(26, Some(PeriodReason::AgentDown)), (27, None)]
        );
    }

    #[test]
    fn periods_missed_while_down_stay_agent_down_and_those_while_up_unsynced_do_not() {
        let mut e = engine();
        accept(
            &mut e,
            &msg("2026-11-30", 1, 10),
            ts("2026-11-29T16:00:00Z"),
        );
        run_due_up(&mut e, ts("2026-11-30T10:00:00Z"), JUST_STARTED);
        // Down from 10:10; started again at 11:10 with its time source unsynchronized, which
        // came right at 12:10. Period 23 (11:00) would have run at 11:10 on a good clock.
        e.set_time_source(false);
        e.set_time_source(true);
        let due = run_due_up(
            &mut e,
            ts("2026-11-30T12:10:00Z"),
            SignedDuration::from_hours(1),
        );
        assert_eq!(
            summary(&due),
            vec![
                (22, Some(PeriodReason::AgentDown)),
                (23, Some(PeriodReason::ClockUnsynced)),
                (24, Some(PeriodReason::ClockUnsynced)),
                (25, None)
            ]
        );
    }

    #[test]
    fn periods_missed_while_the_clock_read_behind_say_clock_unsynced() {
        let mut e = engine();
        accept(
            &mut e,
            &msg("2026-11-30", 1, 10),
            ts("2026-11-29T16:00:00Z"),
        );
        let up = SignedDuration::from_hours(12);
        run_due_up(&mut e, ts("2026-11-30T10:00:00Z"), up);
        run_due_up(&mut e, ts("2026-11-30T10:30:00Z"), up);
        // The clock steps back to 09:00 and is set right at 12:10 (the shell notes what it saw).
        let back = ts("2026-11-30T09:00:00Z");
        assert!(e.clock_unsynced(back));
        e.note_unsynced();
        assert!(e.due(back, up).is_empty());
        let due = run_due_up(&mut e, ts("2026-11-30T12:10:00Z"), up);
        assert_eq!(
            summary(&due),
            vec![
                (23, Some(PeriodReason::ClockUnsynced)),
                (24, Some(PeriodReason::ClockUnsynced)),
                (25, None)
            ]
        );
    }

    #[test]
    fn catch_up_is_capped_at_48_hours() {
        let mut e = engine();
        e.restore(Some(ts("2026-11-01T00:00:00Z")), None);
        let due = e.due(ts("2026-11-30T00:00:00Z"), JUST_STARTED);
        assert_eq!(due.len(), 97);
        assert_eq!(due[0].start, ts("2026-11-28T00:00:00Z"));
        assert!(
            due.iter()
                .all(|d| reason(d) == Some(PeriodReason::AgentDown)
                    || reason(d) == Some(PeriodReason::NoSchedule))
        );
    }

    #[test]
    fn the_catch_up_cut_off_follows_the_setting() {
        let now = ts("2026-11-30T00:00:00Z");
        let down_since = ts("2026-11-01T00:00:00Z");
        // 29 days down: every missed period is reported once the cut-off is further back.
        for (hours, periods) in [(1, 3), (6, 13), (48, 97), (24 * 30, 29 * 48)] {
            let mut e = engine().with_catch_up(SignedDuration::from_hours(hours));
            e.restore(Some(down_since), None);
            let due = e.due(now, JUST_STARTED);
            assert_eq!(due.len(), periods, "catch_up {hours} h");
            assert_eq!(
                due[0].start,
                (now - SignedDuration::from_hours(hours)).max(down_since + PERIOD)
            );
            assert_eq!(due.last().unwrap().start, now);
        }
    }

    #[test]
    fn a_clock_going_backwards_falls_back_and_reports_nothing_twice() {
        let mut e = engine();
        accept(
            &mut e,
            &msg("2026-11-30", 1, 10),
            ts("2026-11-29T16:00:00Z"),
        );
        run_due(&mut e, ts("2026-11-30T10:00:00Z"));
        run_due(&mut e, ts("2026-11-30T10:30:00Z"));
        let back = ts("2026-11-30T09:00:00Z");
        assert!(e.due(back, JUST_STARTED).is_empty());
        assert_eq!(e.fallback(back), Some(Fallback::ClockUnsynced));
        assert_eq!(e.current(back), Setpoint::IDLE);
        assert!(matches!(
            e.on_schedule(&msg("2026-12-01", 1, 10), back),
            Decision::Withhold { .. }
        ));
        // Once the clock is past the last instant again, only new periods come due.
        assert!(e.due(ts("2026-11-30T10:45:00Z"), JUST_STARTED).is_empty());
        let due = e.due(ts("2026-11-30T11:00:00Z"), JUST_STARTED);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].period, 23);
    }

    #[test]
    fn a_cancel_goes_idle_and_skips_the_rest_of_the_plan() {
        let mut e = engine();
        let m = msg("2026-11-30", 1, 10);
        accept(&mut e, &m, ts("2026-11-29T16:00:00Z"));
        run_due(&mut e, ts("2026-11-30T10:00:00Z"));
        let now = ts("2026-11-30T10:10:00Z");
        let control = ControlMsg {
            v: V1,
            message_id: MessageId::parse("ctl-1").unwrap(),
            device_id: device(),
            action: ControlAction::Cancel,
            target_message_id: m.message_id.clone(),
            issued_at: now,
            traceparent: None,
        };
        assert_eq!(
            e.on_control(&control),
            ControlDecision::Cancel {
                target: m.message_id.clone(),
                held: true,
            }
        );
        e.cancel(control.message_id.clone(), &m.message_id, now);
        assert_eq!(e.on_control(&control), ControlDecision::Repeat);
        assert_eq!(e.current(now), Setpoint::IDLE);
        assert_eq!(e.fallback(now), Some(Fallback::Cancelled));
        // The current period keeps its report; the next ones are skipped as cancelled.
        assert!(e.due(now, JUST_STARTED).is_empty());
        let due = run_due(&mut e, ts("2026-11-30T10:30:00Z"));
        assert_eq!(reason(&due[0]), Some(PeriodReason::Cancelled));

        let mut foreign = control.clone();
        foreign.device_id = DeviceId::parse("max300-0002").unwrap();
        assert!(matches!(
            e.on_control(&foreign),
            ControlDecision::Reject {
                reason: RejectReason::WrongDevice,
                ..
            }
        ));
    }

    fn cancel_of(target: &MessageId, id: &str, at: Timestamp) -> ControlMsg {
        ControlMsg {
            v: V1,
            message_id: MessageId::parse(id).unwrap(),
            device_id: device(),
            action: ControlAction::Cancel,
            target_message_id: target.clone(),
            issued_at: at,
            traceparent: None,
        }
    }

    fn rejected(d: Decision) -> (RejectReason, String) {
        match d {
            Decision::Reject { reason, details } => (reason, details.unwrap_or_default()),
            other => panic!("not rejected: {other:?}"),
        }
    }

    #[test]
    fn a_cancel_that_overtakes_its_plan_is_kept_and_the_plan_refused_as_cancelled() {
        let mut e = engine();
        let m = msg("2026-11-30", 1, 10);
        let at = ts("2026-11-29T16:00:00Z");
        let control = cancel_of(&m.message_id, "ctl-1", at);
        assert_eq!(
            e.on_control(&control),
            ControlDecision::Cancel {
                target: m.message_id.clone(),
                held: false,
            }
        );
        e.cancel(control.message_id.clone(), &m.message_id, at);
        assert_eq!(e.on_control(&control), ControlDecision::Repeat);

        // The plan arrives after its cancel, and again: refused both times, naming the cancel.
        for now in [ts("2026-11-29T16:01:00Z"), ts("2026-11-30T09:00:00Z")] {
            let (reason, details) = rejected(e.on_schedule(&m, now));
            assert_eq!(reason, RejectReason::Cancelled);
            assert!(details.contains("ctl-1"), "{details}");
        }
        // It never governs a period: the unit has no plan.
        let due = run_due(&mut e, ts("2026-11-30T10:00:00Z"));
        assert_eq!(reason(&due[0]), Some(PeriodReason::NoSchedule));
        assert_eq!(e.current(ts("2026-11-30T10:00:00Z")), Setpoint::IDLE);
        // Another version of that date is a new command, and is accepted.
        accept(
            &mut e,
            &msg("2026-11-30", 2, 20),
            ts("2026-11-30T10:05:00Z"),
        );
    }

    #[test]
    fn a_cancel_kept_for_a_plan_that_never_came_is_forgotten_after_seven_days() {
        let mut e = engine();
        let later = msg("2026-12-20", 1, 10);
        let received = ts("2026-11-30T10:00:00Z");
        e.cancel(
            MessageId::parse("ctl-1").unwrap(),
            &later.message_id,
            received,
        );
        run_due(&mut e, ts("2026-12-07T09:30:00Z"));
        let (reason, _) = rejected(e.on_schedule(&later, ts("2026-12-07T09:40:00Z")));
        assert_eq!(reason, RejectReason::Cancelled);
        // Seven days after it was received, it is gone.
        run_due(&mut e, ts("2026-12-07T10:00:00Z"));
        accept(&mut e, &later, ts("2026-12-07T10:10:00Z"));
    }

    #[test]
    fn sync_lists_the_newest_version_of_each_date_from_today() {
        let mut e = engine();
        let now = ts("2026-11-30T10:15:00Z");
        assert!(e.lacks_plan(now));
        accept(&mut e, &msg("2026-11-30", 1, 10), now);
        accept(&mut e, &msg("2026-12-01", 1, 10), now);
        let v2 = msg("2026-12-01", 2, 20);
        accept(&mut e, &v2, now);
        assert!(!e.lacks_plan(now));
        let have = e.held_plans(now);
        assert_eq!(have.len(), 2);
        assert_eq!(have[1].message_id, v2.message_id);
        assert_eq!(have[1].version, 2);
    }
}
