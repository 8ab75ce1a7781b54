//! One command and what each event does to it.

use jiff::{SignedDuration, Timestamp};
use max300_protocol::day::period_start_at;
use max300_protocol::message::{AckMsg, AckStatus, ReportMsg, ReportStatus, ScheduleMsg};
use max300_protocol::{DeviceId, MessageId, PERIOD_SECS, ProtocolError, Schedule, TraceParent};
use serde::Serialize;

use super::CommandState;
use super::marks::{Mark, Marks};
use super::policy::{INCOMPLETE_AFTER, Policy};

/// One state change of a command.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistoryEntry {
    /// The new state.
    pub state: CommandState,
    /// When.
    pub at: Timestamp,
}

/// A command as the lifecycle sees it: everything an event reads or changes. A store loads
/// it, and writes back the [`Step`] an event makes of it.
///
/// Invariant: `marks` has one mark per period of the schedule's day.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// Its id.
    pub message_id: MessageId,
    /// The plan: device, local date and one setpoint per period.
    pub schedule: Schedule,
    /// Its version for its device and date.
    pub version: u32,
    /// Where it is.
    pub state: CommandState,
    /// Not acknowledged when the first period it governs started.
    pub late: bool,
    /// The start of the first period it governs: the first that started after it was made.
    pub governs_from: Timestamp,
    /// When it was made.
    pub created_at: Timestamp,
    /// The first period it governs on the device, from the accepted ack.
    pub effective_period: Option<u32>,
    /// The sha256 the device acked.
    pub acked_sha256: Option<String>,
    /// Times published.
    pub publishes: u32,
    /// Times a publish was tried (published or not), the first by whoever made it: what the
    /// resend backoff counts.
    pub attempts: u32,
    /// When it was last published.
    pub last_sent_at: Option<Timestamp>,
    /// When to try publishing again, while it waits for an ack.
    pub retry_at: Option<Timestamp>,
    /// What is known of each period.
    pub marks: Marks,
    /// The trace context of its `command` span, sent with every publish of it.
    pub traceparent: Option<TraceParent>,
    /// The store's revision of it: a step is written only over the revision it was decided on.
    pub rev: u64,
}

/// What one event did to one command: the command after it, and what to add to its record.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Its state before the event.
    pub before: CommandState,
    /// The command after the event. Its `rev` is still the one the event was decided on,
    /// which the store checks before it writes (and then counts up).
    pub after: Command,
    /// The states it entered, in order.
    pub entered: Vec<HistoryEntry>,
    /// A publish to add to its sends.
    pub sent: Option<Timestamp>,
}

impl Step {
    fn of(command: &Command) -> Step {
        Step {
            before: command.state,
            after: command.clone(),
            entered: Vec::new(),
            sent: None,
        }
    }

    fn enter(&mut self, state: CommandState, at: Timestamp) {
        self.after.state = state;
        if !state.awaits_ack() {
            // Resending stops at any ack, and once the command has ended.
            self.after.retry_at = None;
        }
        self.entered.push(HistoryEntry { state, at });
    }

    /// Completes the command once every period is settled.
    fn complete_if_settled(&mut self, at: Timestamp) {
        if self.after.marks.all_settled()
            && self.after.state.after_report(true) == Some(CommandState::Completed)
        {
            self.enter(CommandState::Completed, at);
        }
    }
}

/// What the clock did to a command at a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Tick {
    /// The command after the sweep.
    pub step: Step,
    /// It was flagged `late` now.
    pub late: bool,
    /// The state the clock moved it to, if any (`expired` or `incomplete`).
    pub state: Option<CommandState>,
    /// It is to be published again now.
    pub resend: bool,
}

impl Command {
    /// A new command, `created`: it governs from the first period that starts after `at`,
    /// and is published again if no publish of it is recorded by its first retry time.
    pub fn new(
        message_id: MessageId,
        schedule: Schedule,
        version: u32,
        traceparent: Option<TraceParent>,
        at: Timestamp,
        policy: &Policy,
    ) -> Result<Command, ProtocolError> {
        let day = schedule.day();
        let next_boundary = period_start_at(at, day.tz())?
            .checked_add(SignedDuration::from_secs(PERIOD_SECS))
            .map_err(|e| ProtocolError::out_of_range(day.date(), e))?;
        let marks = Marks::pending(day.period_count());
        Ok(Command {
            governs_from: day.start().max(next_boundary),
            message_id,
            version,
            state: CommandState::Created,
            late: false,
            created_at: at,
            effective_period: None,
            acked_sha256: None,
            publishes: 0,
            // Whoever makes it publishes it at once: that is its first try.
            attempts: 1,
            last_sent_at: None,
            retry_at: Some(at + policy.resend_delay(1)),
            marks,
            traceparent,
            rev: 0,
            schedule,
        })
    }

    /// The device.
    pub fn device_id(&self) -> &DeviceId {
        self.schedule.device_id()
    }

    /// The end of its date.
    pub fn ends_at(&self) -> Timestamp {
        self.schedule.day().end()
    }

    /// The plan's sha256 (DESIGN §5).
    pub fn sha256(&self) -> String {
        self.schedule.sha256()
    }

    /// When the clock next has something to do to it, if ever: flag it `late`, expire it,
    /// end it `incomplete`, or publish it again. Stores index commands by this instant, so
    /// a sweep reads only the commands that are due.
    pub fn wake_at(&self) -> Option<Timestamp> {
        let unflagged = (!self.late).then_some(self.governs_from);
        match self.state {
            CommandState::Created | CommandState::Sent => [self.retry_at, unflagged]
                .into_iter()
                .flatten()
                .chain([self.ends_at()])
                .min(),
            CommandState::Expired => unflagged,
            CommandState::Acknowledged => Some(self.ends_at() + INCOMPLETE_AFTER),
            _ => None,
        }
    }

    /// Whether it may be published at `now`: it still stands and its date is not over. A
    /// cancelled, superseded or rejected command is never sent again.
    pub fn publishable(&self, now: Timestamp) -> bool {
        self.state.is_live() && now < self.ends_at()
    }

    /// The message that carries it.
    pub fn message(&self) -> ScheduleMsg {
        let mut msg = ScheduleMsg::new(
            &self.schedule,
            self.message_id.clone(),
            self.version,
            self.created_at,
        );
        msg.traceparent = self.traceparent.clone();
        msg
    }

    /// A publish of it went out at `at`.
    pub fn published(&self, at: Timestamp, policy: &Policy) -> Step {
        let mut step = Step::of(self);
        let c = &mut step.after;
        c.publishes += 1;
        c.attempts = c.attempts.max(c.publishes);
        c.last_sent_at = Some(at);
        if c.state.awaits_ack() {
            c.retry_at = Some(at + policy.resend_delay(c.attempts));
        }
        step.sent = Some(at);
        if self.state == CommandState::Created {
            step.enter(CommandState::Sent, at);
        }
        step
    }

    /// The clock reached `now`; `newest` is the newest version of its device and date.
    /// `None` when nothing changes.
    pub fn tick(&self, now: Timestamp, newest: u32, policy: &Policy) -> Option<Tick> {
        let mut step = Step::of(self);
        let mut late = false;
        let mut state = None;
        let waiting = matches!(
            self.state,
            CommandState::Created | CommandState::Sent | CommandState::Expired
        );
        if waiting && !self.late && self.governs_from <= now {
            step.after.late = true;
            late = true;
        }
        if self.state.awaits_ack() && self.ends_at() <= now {
            step.enter(CommandState::Expired, now);
            state = Some(CommandState::Expired);
        } else if self.state == CommandState::Acknowledged
            && self.ends_at() + INCOMPLETE_AFTER <= now
        {
            let periods = self.schedule.day().period_count();
            step.after.marks.fill_pending(1..=periods, Mark::Unreported);
            step.enter(CommandState::Incomplete, now);
            state = Some(CommandState::Incomplete);
        }
        let mut resend = false;
        if step.after.state.awaits_ack() && step.after.retry_at.is_some_and(|at| at <= now) {
            if newest > self.version {
                // A newer version takes over: this one is not sent again.
                step.after.retry_at = None;
            } else {
                step.after.attempts += 1;
                step.after.retry_at = Some(now + policy.resend_delay(step.after.attempts));
                resend = true;
            }
        }
        (step.after != *self).then_some(Tick {
            step,
            late,
            state,
            resend,
        })
    }

    /// An operator's cancel, or the state it had already ended in.
    pub fn cancel(&self, at: Timestamp) -> Result<Step, CommandState> {
        if self.state.is_terminal() {
            return Err(self.state);
        }
        let mut step = Step::of(self);
        step.enter(CommandState::Cancelled, at);
        Ok(step)
    }

    /// Its own part of an ack from its device: refused (with the reason) when the ack's
    /// effective period is not one of the plan's.
    pub(super) fn acked(&self, ack: &AckMsg, at: Timestamp) -> Result<Step, String> {
        let periods = self.schedule.day().period_count();
        let date = self.schedule.day().date();
        let effective = match (ack.status, ack.effective_period) {
            (_, Some(p)) if !(1..=periods).contains(&p) => {
                return Err(format!(
                    "effective_period: {p} is not a period of {date} (1 to {periods})"
                ));
            }
            (AckStatus::Accepted, None) => {
                return Err("effective_period: missing from an accepted ack".into());
            }
            (_, p) => p,
        };
        let mut step = Step::of(self);
        if let Some(next) = self.state.after_ack(ack.status) {
            step.enter(next, at);
        }
        if let (AckStatus::Accepted, Some(effective)) = (ack.status, effective) {
            let c = &mut step.after;
            // Judged by when the device acked (never later than we heard), so a cloud
            // outage does not flag an on-time ack.
            c.late |= ack.at.min(at) > self.governs_from;
            c.effective_period = Some(effective);
            c.acked_sha256 = ack.sha256.clone();
            c.retry_at = None;
            // Periods before the effective one never ran under this command: an older
            // version governed them, or (for the first version) nothing did.
            let mark = if self.version > 1 {
                Mark::Superseded
            } else {
                Mark::NotGoverned
            };
            c.marks.fill_pending(1..=effective.saturating_sub(1), mark);
            // Reports may have come before the ack: marking the early periods can leave
            // nothing pending.
            step.complete_if_settled(at);
        }
        Ok(step)
    }

    /// A newer version was acknowledged from period `effective`: from there on this one's
    /// pending periods are skipped, and it is superseded unless it already ended so.
    pub(super) fn superseded_from(&self, effective: u32, at: Timestamp) -> Option<Step> {
        let mut step = Step::of(self);
        let periods = self.schedule.day().period_count();
        step.after
            .marks
            .fill_pending(effective.max(1)..=periods, Mark::Superseded);
        if !matches!(
            self.state,
            CommandState::Superseded | CommandState::Cancelled | CommandState::Rejected
        ) {
            step.enter(CommandState::Superseded, at);
        }
        (step.after != *self).then_some(step)
    }

    /// A report of one of its periods: it implies the ack, and the last one completes it.
    pub(super) fn reported(&self, period: u32, report: &ReportMsg, at: Timestamp) -> Step {
        let planned = self.schedule.setpoint(period).map(|sp| sp.rate().watts());
        let as_planned = report.status == ReportStatus::Executed
            && report.applied_kw.map(|r| r.watts()).is_some()
            && report.applied_kw.map(|r| r.watts()) == planned;
        let mut step = Step::of(self);
        step.after.marks.set(
            period,
            Mark::Reported {
                status: report.status,
                as_planned,
            },
        );
        if let Some(next) = self.state.after_report(false) {
            step.enter(next, at);
        }
        step.complete_if_settled(at);
        step
    }
}
