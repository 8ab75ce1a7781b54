//! What a device's ack or report does: which command it is about, whether it counts at all,
//! and the steps it makes. A message is applied once, by its natural key (an ack by
//! `message_id`, a report by device and `interval_start`); one that would make the store do
//! unbounded work, or grow without limit, is refused and changes nothing.

use jiff::{SignedDuration, Timestamp};
use max300_protocol::PERIOD_SECS;
use max300_protocol::message::{AckMsg, AckStatus, ReportMsg};

use super::command::{Command, Step};
use super::control::Control;
use super::policy::Policy;

/// What an ack names, as the store found it by its `message_id`.
#[derive(Clone, Debug, PartialEq)]
pub enum AckTarget {
    /// A command, with every other version of its device and date.
    Command {
        /// The command acked.
        command: Command,
        /// Its other versions.
        others: Vec<Command>,
    },
    /// A control message.
    Control(Control),
    /// Nothing the store knows.
    Unknown,
}

/// What to do with an ack.
#[derive(Clone, Debug, PartialEq)]
pub enum AckOutcome {
    /// Keep the ack (by its `message_id`) and write these, all at once.
    Apply {
        /// The command acked first, then the older versions it supersedes.
        commands: Vec<Step>,
        /// The control message acked.
        control: Option<Control>,
    },
    /// Already applied: nothing changes.
    Duplicate,
    /// Not about a command or control message of the acking device: nothing is kept.
    Unknown,
    /// Refused, with the reason: nothing changes.
    Invalid(String),
}

/// Decides an ack received at `at`; `seen` says whether one with its `message_id` is kept.
pub fn ack(target: &AckTarget, seen: bool, ack: &AckMsg, at: Timestamp) -> AckOutcome {
    match target {
        AckTarget::Command { command, others } if command.device_id() == &ack.device_id => {
            let this = match command.acked(ack, at) {
                Ok(step) => step,
                Err(why) => return AckOutcome::Invalid(why),
            };
            if seen {
                return AckOutcome::Duplicate;
            }
            let mut commands = vec![this];
            if let (AckStatus::Accepted, Some(effective)) = (ack.status, ack.effective_period) {
                commands.extend(
                    others
                        .iter()
                        .filter(|old| old.version < command.version)
                        .filter_map(|old| old.superseded_from(effective, at)),
                );
            }
            AckOutcome::Apply {
                commands,
                control: None,
            }
        }
        AckTarget::Control(control) if control.device_id == ack.device_id => {
            if seen {
                return AckOutcome::Duplicate;
            }
            AckOutcome::Apply {
                commands: Vec::new(),
                control: Some(control.acked(ack.status)),
            }
        }
        // Another device's command never takes its owner's ack.
        _ => AckOutcome::Unknown,
    }
}

/// What to do with a report.
#[derive(Clone, Debug, PartialEq)]
pub enum ReportOutcome {
    /// Keep the report, and write the step it makes of the command it names, if it names
    /// one of that day (otherwise it is kept for the record only).
    Apply(Option<Box<Step>>),
    /// Already applied: nothing changes.
    Duplicate,
    /// Refused, with the reason: nothing changes.
    Refused(String),
}

/// Decides a report received at `at`. `commands` are the reporting device's commands (every
/// version) for the dates around the report's period; `seen` says whether a report of that
/// period is kept already.
///
/// A report counts only for a period on the grid of a day the device has (or had) a command
/// for, that started within the retention window and not in the future: so each device can
/// keep at most one report per period of its commands' days.
pub fn report(
    commands: &[Command],
    seen: bool,
    report: &ReportMsg,
    at: Timestamp,
    policy: &Policy,
) -> ReportOutcome {
    let start = report.interval_start;
    let refuse = |why: String| ReportOutcome::Refused(why);
    if start < at - policy.retention {
        return refuse(format!(
            "interval_start: {start} is older than the retention window ({} days)",
            policy.retention.as_hours() / 24
        ));
    }
    // A device's clock may run a little ahead of ours, never a period.
    if start > at + SignedDuration::from_secs(PERIOD_SECS) {
        return refuse(format!("interval_start: {start} has not started yet"));
    }
    let ours: Vec<&Command> = commands
        .iter()
        .filter(|c| c.device_id() == &report.device_id)
        .collect();
    let Some(day) = ours
        .iter()
        .map(|c| c.schedule.day())
        .find(|d| d.period_at(start).is_some())
    else {
        return refuse(format!(
            "interval_start: {start} is not in a day {} has a command for",
            report.device_id
        ));
    };
    let period = match day.boundary(start) {
        Ok(b) if b < day.period_count() => b + 1,
        _ => {
            return refuse(format!(
                "interval_start: {start} is not a period start of {}",
                day.date()
            ));
        }
    };
    if report.period != period {
        return refuse(format!(
            "period: {} but interval_start {start} starts period {period} of {}",
            report.period,
            day.date()
        ));
    }
    if seen {
        return ReportOutcome::Duplicate;
    }
    let named = report.message_id.as_ref().and_then(|id| {
        ours.iter()
            .find(|c| &c.message_id == id && c.schedule.day().date() == day.date())
    });
    ReportOutcome::Apply(named.map(|c| Box::new(c.reported(period, report, at))))
}
