//! The command store: devices, commands, their periods, acks and reports.
//!
//! [`CommandStore`] is the seam between the service and its database: SQLite here, DynamoDB
//! for AWS (feature `aws`). A backend does two things with commands: it loads what the
//! [`lifecycle`](crate::lifecycle) needs to decide an event (a [`Command`], an [`AckContext`],
//! the commands that are [`Due`]), and it writes what was decided as one atomic [`Unit`],
//! guarded by the revisions the decision read. It decides nothing: every rule of DESIGN §6 is
//! in the lifecycle, and [`Ledger`](crate::ledger::Ledger) runs the load, decide, write loop.
//! The read-side views that follow from what is stored (a command's detail, the fleet, what a
//! device should hold) are written once, here, over the same loads.
//!
//! # Layout
//! - `text`: the text forms both backends store (instants, plans).
//! - `sqlite`: [`SqliteStore`], one file, one transaction per write.
//! - `dynamodb` (feature `aws`): [`DynamoStore`], one table, conditional writes.

#[cfg(feature = "aws")]
mod dynamodb;
mod sqlite;
pub(crate) mod text;

#[cfg(feature = "aws")]
pub use dynamodb::DynamoStore;
pub use sqlite::SqliteStore;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use jiff::Timestamp;
use jiff::civil::Date;
use max300_protocol::message::{
    AckMsg, ControlMsg, Fallback, HeartbeatMsg, LimitedBy, PeriodReason, ReportMsg, ScheduleMsg,
};
use max300_protocol::{DeviceId, MessageId, Mode, RateKw, Roster, Schedule, Setpoint, TraceParent};
use serde::Serialize;

pub use crate::lifecycle::HistoryEntry;
use crate::lifecycle::feedback::AckTarget;
use crate::lifecycle::{Command, Control, Mark, Step, Subject, newest_per, standing, standing_per};
use crate::{CloudError, CommandState, PeriodStatus};

/// A registered device and what its last heartbeat said.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DeviceRecord {
    /// The device.
    pub device_id: DeviceId,
    /// Its own rate limit, if it has one.
    pub max_rate_kw: Option<RateKw>,
    /// When it was registered.
    pub registered_at: Timestamp,
    /// When anything was last heard from it.
    pub last_seen: Option<Timestamp>,
    /// Mode from the last heartbeat.
    pub mode: Option<Mode>,
    /// Rate from the last heartbeat.
    pub rate_kw: Option<RateKw>,
    /// State of charge from the last heartbeat.
    pub soc_pct: Option<f64>,
    /// Fallback from the last heartbeat.
    pub fallback: Option<Fallback>,
    /// The plan it says it follows.
    pub active_message_id: Option<String>,
    /// Its outbox depth.
    pub outbox: Option<u64>,
}

/// What [`CommandStore::planned_from`] makes of each device's remaining setpoints, if
/// anything: an ingestion, the SoC the unit should have at the end of the day.
pub type PlanFold = Arc<dyn Fn(&DeviceId, &[Setpoint]) -> Option<f64> + Send + Sync>;

/// A command to create: one device's schedule with the id it will carry.
#[derive(Clone, Debug)]
pub struct NewCommand {
    /// The id to give it.
    pub message_id: MessageId,
    /// The plan.
    pub schedule: Schedule,
    /// The trace context of its `command` span, sent with every publish of it.
    pub traceparent: Option<TraceParent>,
}

/// What happened to a [`NewCommand`].
#[derive(Clone, Debug, PartialEq)]
pub enum Insert {
    /// A new command, with the version it was given.
    Created {
        /// Its id.
        message_id: MessageId,
        /// Its version.
        version: u32,
    },
    /// The same content is already the latest version: nothing was created.
    Unchanged {
        /// The existing command.
        message_id: MessageId,
        /// Its version.
        version: u32,
    },
}

/// A command in a listing.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CommandSummary {
    /// Its id.
    pub message_id: MessageId,
    /// The device.
    pub device_id: DeviceId,
    /// The local date.
    pub schedule_date: Date,
    /// Its version.
    pub version: u32,
    /// Its state.
    pub state: CommandState,
    /// Not acknowledged when its first period started.
    pub late: bool,
}

/// One period of a command and how it went.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PeriodView {
    /// 1-based period.
    pub period: u32,
    /// Its start.
    pub start: Timestamp,
    /// Planned mode.
    pub mode: Mode,
    /// Planned rate.
    pub rate_kw: RateKw,
    /// Its status.
    pub status: PeriodStatus,
    /// What ran.
    pub applied_kw: Option<RateKw>,
    /// Why it differed.
    pub limited_by: Option<LimitedBy>,
    /// Why it was skipped or limited.
    pub reason: Option<PeriodReason>,
    /// Why it failed.
    pub error: Option<String>,
    /// State of charge reported with it.
    pub soc_pct: Option<f64>,
    /// When the device reported it.
    pub at: Option<Timestamp>,
}

/// A command with its history and periods.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CommandDetail {
    /// Id, device, date, version, state, late.
    #[serde(flatten)]
    pub summary: CommandSummary,
    /// The plan's sha256.
    pub sha256: String,
    /// The sha256 the device acked, if it did.
    pub acked_sha256: Option<String>,
    /// The first period the plan governs on the device.
    pub effective_period: Option<u32>,
    /// Times published.
    pub publishes: u32,
    /// State changes, oldest first.
    pub history: Vec<HistoryEntry>,
    /// Every publish, first and resends, oldest first.
    pub sends: Vec<Timestamp>,
    /// Why the plan may not run as written (feasibility), if anything.
    pub warning: Option<String>,
    /// Every period.
    pub periods: Vec<PeriodView>,
}

/// One device's line of the fleet view, as the store knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetRow {
    /// The device and its last heartbeat.
    pub device: DeviceRecord,
    /// The latest version of its command for today, if any.
    pub today: Option<CommandSummary>,
    /// The latest version of its command for tomorrow, if any.
    pub tomorrow: Option<CommandSummary>,
    /// Periods of today's command, from the one it governs from, that have ended.
    pub due: u32,
    /// Of those, the ones executed at the planned rate.
    pub as_planned: u32,
}

/// What the fleet view needs of a device's newest command for a date: not its plan.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetCommand {
    /// The command.
    pub summary: CommandSummary,
    /// The first period it governs on the device, from the accepted ack.
    pub effective_period: Option<u32>,
    /// Its local day.
    pub day: max300_protocol::Day,
    /// What is known of each period.
    pub marks: crate::lifecycle::Marks,
}

impl FleetCommand {
    /// The fleet view's part of a command.
    pub fn of(c: &Command) -> FleetCommand {
        FleetCommand {
            summary: CommandSummary::of(c),
            effective_period: c.effective_period,
            day: c.schedule.day().clone(),
            marks: c.marks.clone(),
        }
    }

    /// Its periods, from the one it governs from, that started by `ended_by` (that is, have
    /// ended by now), and how many of them ran as planned.
    fn conformance(&self, ended_by: Timestamp) -> (u32, u32) {
        let effective = self.effective_period.unwrap_or(1);
        self.marks
            .iter()
            .filter(|(p, _)| *p >= effective && self.day.period_start(*p) <= ended_by)
            .fold((0, 0), |(due, as_planned), (_, mark)| {
                let ran = matches!(
                    mark,
                    Mark::Reported {
                        as_planned: true,
                        ..
                    }
                );
                (due + 1, as_planned + u32::from(ran))
            })
    }
}

/// A command a device holds or should hold.
#[derive(Clone, Debug, PartialEq)]
pub struct CurrentCommand {
    /// Its id.
    pub message_id: MessageId,
    /// The local date.
    pub schedule_date: Date,
    /// Its version.
    pub version: u32,
    /// Its sha256.
    pub sha256: String,
}

/// What recording an ack or report did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// First time seen: applied.
    Applied,
    /// Seen before: nothing changed.
    Duplicate,
    /// About no command of ours. A report is kept (its day has a command of the device); an
    /// ack is not.
    UnknownCommand,
    /// Refused, with the reason: nothing changed (it is still receipted, so the device's
    /// outbox lets it go).
    Refused(String),
}

/// The counts of a finished ingestion run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestionCounts {
    /// New commands.
    pub accepted: u32,
    /// Unchanged schedules.
    pub unchanged: u32,
    /// Rejected schedules.
    pub rejected: u32,
}

/// An ingestion run that started but never finished or failed: the service stopped in the
/// middle.
#[derive(Clone, Debug, PartialEq)]
pub struct Interrupted {
    /// Its id.
    pub id: i64,
    /// The date it was for.
    pub schedule_date: Date,
    /// `fetch` or `post`.
    pub source: String,
    /// Where its raw document is.
    pub audit_key: String,
    /// A run for the same date that started later has finished: replaying this one would
    /// put an older document over a newer one.
    pub overtaken: bool,
}

/// What an operator's cancel did.
#[derive(Clone, Debug, PartialEq)]
pub enum Cancel {
    /// The command is now `cancelled`; the control message is to be delivered.
    Cancelled(ControlMsg),
    /// The command had already ended in this state.
    AlreadyEnded(CommandState),
    /// No such command.
    NotFound,
}

/// A lease held, as a write made under it carries it: the store refuses the write once the
/// lease has been taken by anyone since (its token moved on), so a holder that stalled past
/// its lease can never commit over the work of the next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The lease.
    pub name: String,
    /// Its holder.
    pub owner: String,
    /// The token the holder got with it.
    pub token: u64,
}

/// What an ack needs decided, as the store found it.
#[derive(Clone, Debug, PartialEq)]
pub struct AckContext {
    /// What its `message_id` names.
    pub target: AckTarget,
    /// Whether an ack of that `message_id` is kept already.
    pub seen: bool,
}

/// What a report needs decided, as the store found it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportContext {
    /// The device's commands (every version) for the local dates around the report's period:
    /// the day before, of and after it in UTC, which covers every zone.
    pub commands: Vec<Command>,
    /// Whether a report of that device and period is kept already.
    pub seen: bool,
}

/// A command or control message whose wake time has come.
#[derive(Clone, Debug, PartialEq)]
pub enum Due {
    /// A command, with the newest version of its device and date.
    Command {
        /// The command.
        command: Command,
        /// The newest version of its device and date.
        newest: u32,
    },
    /// A control message.
    Control(Control),
}

/// A control message to write.
#[derive(Clone, Debug, PartialEq)]
pub enum ControlWrite {
    /// A new one (the cancel that makes it); fails if its id exists.
    New(Control),
    /// A change, over the revision it was decided on.
    Update(Control),
}

/// A device message kept by its natural key (an ack by `message_id`, a report by device and
/// `interval_start`); the write fails if one with that key is kept already.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// An ack, received at `at`.
    Ack {
        /// The ack.
        ack: AckMsg,
        /// When it was received.
        at: Timestamp,
    },
    /// A report, received at `at`.
    Report {
        /// The report.
        report: ReportMsg,
        /// When it was received.
        at: Timestamp,
    },
}

/// What the lifecycle decided about one event, written all at once or not at all.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Unit {
    /// Commands to change, each over the revision its step was decided on.
    pub commands: Vec<Step>,
    /// A control message to make or change.
    pub control: Option<ControlWrite>,
    /// A device message to keep.
    pub record: Option<Record>,
}

impl Unit {
    /// How many of its writes are guarded (a revision, a natural key): each may find the unit
    /// overtaken and undo the ones before it.
    pub fn guards(&self) -> usize {
        self.commands.len()
            + usize::from(self.control.is_some())
            + usize::from(self.record.is_some())
    }

    /// The device every write of the unit is about (one unit is always one device's).
    pub fn device(&self) -> Option<&DeviceId> {
        self.commands
            .first()
            .map(|s| s.after.device_id())
            .or(match &self.control {
                Some(ControlWrite::New(c) | ControlWrite::Update(c)) => Some(&c.device_id),
                None => None,
            })
            .or(match &self.record {
                Some(Record::Ack { ack, .. }) => Some(&ack.device_id),
                Some(Record::Report { report, .. }) => Some(&report.device_id),
                None => None,
            })
    }
}

/// Whether a unit was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// All of it.
    Applied,
    /// None of it: something it was decided on changed (a revision moved, or a record with
    /// its key was kept first). Load again and decide again.
    Conflict,
}

/// A command with the rest of what is kept about it, for its detail.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandLog {
    /// The command.
    pub command: Command,
    /// State changes, oldest first.
    pub history: Vec<HistoryEntry>,
    /// Every publish, oldest first.
    pub sends: Vec<Timestamp>,
    /// The feasibility warning, if any.
    pub warning: Option<String>,
}

/// The store of devices, commands, periods, acks and reports.
#[async_trait]
pub trait CommandStore: Send + Sync + std::fmt::Debug {
    /// Registers a device if it is new; sets its own rate limit when one is given.
    async fn register_device(
        &self,
        device: &DeviceId,
        max_rate: Option<RateKw>,
        at: Timestamp,
    ) -> Result<(), CloudError>;

    /// Registers the devices that are new, in one transaction on SQLite (an ingestion's
    /// newcomers); known ones are left as they are. DynamoDB registers each atomically: a
    /// registration is idempotent, so a failed call is simply made again.
    async fn register_devices(&self, devices: &[DeviceId], at: Timestamp)
    -> Result<(), CloudError>;

    /// Every registered device.
    async fn devices(&self) -> Result<Vec<DeviceRecord>, CloudError>;

    /// One device.
    async fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, CloudError>;

    /// Records heartbeats (and that their devices were seen), all received at `at`; an
    /// unknown device's changes nothing.
    async fn record_heartbeats(
        &self,
        heartbeats: &[HeartbeatMsg],
        at: Timestamp,
    ) -> Result<(), CloudError>;

    /// Creates commands ([`Command::new`]), versioning per device and date by
    /// [`crate::lifecycle::next_version`]. SQLite creates them all in one transaction;
    /// DynamoDB in transactions of up to 33 commands, each with its version claim, so a
    /// failure can leave some created (a repeated call then finds them `Unchanged`). Under a
    /// `fence`, nothing is created once the lease has moved on ([`CloudError::Fenced`]).
    async fn insert_commands(
        &self,
        commands: &[NewCommand],
        at: Timestamp,
        policy: &crate::lifecycle::Policy,
        fence: Option<&Fence>,
    ) -> Result<Vec<Insert>, CloudError>;

    /// The commands and control messages these ids name, in order; `None` for unknown ids.
    async fn load(&self, ids: &[MessageId]) -> Result<Vec<Option<Subject>>, CloudError>;

    /// What each ack needs decided, in order.
    async fn ack_contexts(&self, acks: &[AckMsg]) -> Result<Vec<AckContext>, CloudError>;

    /// What each report needs decided, in order.
    async fn report_contexts(
        &self,
        reports: &[ReportMsg],
    ) -> Result<Vec<ReportContext>, CloudError>;

    /// The commands and control messages whose wake time is at or before `now`, earliest
    /// first: at most `first` of each kind.
    async fn due(&self, now: Timestamp, first: usize) -> Result<Vec<Due>, CloudError>;

    /// Writes each unit atomically over the revisions it was decided on, in order (a later
    /// unit may depend on an earlier one); says which were written.
    async fn write(&self, units: Vec<Unit>) -> Result<Vec<Written>, CloudError>;

    /// Every version of `device`'s commands for dates `from..=to`.
    async fn versions(
        &self,
        device: &DeviceId,
        from: Date,
        to: Date,
    ) -> Result<Vec<Command>, CloudError>;

    /// Every command (every version, every device) for `date`.
    async fn on_date(&self, date: Date) -> Result<Vec<Command>, CloudError>;

    /// A command with its history, sends and warning.
    async fn command_log(&self, id: &MessageId) -> Result<Option<CommandLog>, CloudError>;

    /// The reports a device sent for periods starting in `from..to`, oldest first; one per
    /// period, as first received.
    async fn reports(
        &self,
        device: &DeviceId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<ReportMsg>, CloudError>;

    /// How many devices have reported each period starting in `from..to`, oldest first;
    /// periods with no report are left out. Only registered devices' reports are kept (the
    /// feedback consumer drops the others), so the default asks [`CommandStore::reports`] of
    /// every registered device; a backend with an index by period counts in one query.
    async fn report_counts(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(Timestamp, u32)>, CloudError> {
        let mut counts = std::collections::BTreeMap::<Timestamp, u32>::new();
        for device in self.devices().await? {
            for report in self.reports(&device.device_id, from, to).await? {
                *counts.entry(report.interval_start).or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    /// Commands, newest first, filtered by device and date.
    async fn commands(
        &self,
        device: Option<&DeviceId>,
        date: Option<Date>,
    ) -> Result<Vec<CommandSummary>, CloudError>;

    /// Keeps a feasibility warning with each command.
    async fn record_warnings(&self, warnings: &[(MessageId, String)]) -> Result<(), CloudError>;

    /// How many commands are in each state (states with none are left out). DynamoDB keeps
    /// sharded counters, moved right after each write rather than inside it, so a crash
    /// between the two can leave a count one off.
    async fn command_counts(&self) -> Result<Vec<(CommandState, u32)>, CloudError>;

    /// Records the start of an ingestion run (its raw document is already in the audit store).
    async fn begin_ingestion(
        &self,
        date: Date,
        source: &str,
        audit_key: &str,
        at: Timestamp,
    ) -> Result<i64, CloudError>;

    /// Records the end of an ingestion run: finished with its counts, or failed with why.
    async fn finish_ingestion(
        &self,
        id: i64,
        outcome: Result<IngestionCounts, String>,
        at: Timestamp,
    ) -> Result<(), CloudError>;

    /// Runs that started and neither finished nor failed.
    async fn interrupted_ingestions(&self) -> Result<Vec<Interrupted>, CloudError>;

    /// Whether a fetch of `date` from the provider has finished (a POSTed document for one
    /// device does not stand in for the fleet's daily fetch).
    async fn ingested(&self, date: Date) -> Result<bool, CloudError>;

    /// Takes the lease `name` for `owner` until `until`, or renews it, when it is free, has
    /// expired by `now`, or is already `owner`'s; its fencing token, or `None` when another
    /// holds it. One conditional write: of several instances asking at once, exactly one gets
    /// it. The token counts up at every new holding (a renewal keeps it), so a [`Fence`]
    /// tells a stale holder from the current one. This is how several cloud instances share
    /// one store: one runs each date's ingestion, one sweeps at a time.
    async fn lease(
        &self,
        name: &str,
        owner: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<Option<u64>, CloudError>;

    /// Gives a lease back before it expires; nothing happens unless `owner` holds it.
    async fn release(&self, name: &str, owner: &str) -> Result<(), CloudError>;

    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), CloudError>;

    // What follows is read from the loads above, the same for every backend.

    /// One command in full: its periods as its marks say, with each reported period's
    /// details from the report.
    async fn command(&self, id: &MessageId) -> Result<Option<CommandDetail>, CloudError> {
        let Some(log) = self.command_log(id).await? else {
            return Ok(None);
        };
        let day = log.command.schedule.day();
        let reports = self
            .reports(log.command.device_id(), day.start(), day.end())
            .await?;
        Ok(Some(CommandDetail::new(log, &reports)))
    }

    /// The message to publish for a command.
    async fn schedule_message(&self, id: &MessageId) -> Result<Option<ScheduleMsg>, CloudError> {
        let loaded = self.load(std::slice::from_ref(id)).await?;
        Ok(match loaded.into_iter().next().flatten() {
            Some(Subject::Command(c)) => Some(c.message()),
            _ => None,
        })
    }

    /// The message to publish for a control message.
    async fn control_message(&self, id: &MessageId) -> Result<Option<ControlMsg>, CloudError> {
        let loaded = self.load(std::slice::from_ref(id)).await?;
        Ok(match loaded.into_iter().next().flatten() {
            Some(Subject::Control(c)) => Some(c.message()),
            _ => None,
        })
    }

    /// The trace context stored with a command, for feedback that comes without one.
    async fn command_traceparent(&self, id: &MessageId) -> Result<Option<TraceParent>, CloudError> {
        let loaded = self.load(std::slice::from_ref(id)).await?;
        Ok(match loaded.into_iter().next().flatten() {
            Some(Subject::Command(c)) => c.traceparent,
            _ => None,
        })
    }

    /// The version that stands for each date from `from` on, for one device: what it should
    /// hold.
    async fn current_commands(
        &self,
        device: &DeviceId,
        from: Date,
    ) -> Result<Vec<CurrentCommand>, CloudError> {
        let versions = self.versions(device, from, Date::MAX).await?;
        Ok(standing(&versions)
            .into_values()
            .map(|c| CurrentCommand {
                message_id: c.message_id.clone(),
                schedule_date: c.schedule.day().date(),
                version: c.version,
                sha256: c.sha256(),
            })
            .collect())
    }

    /// Every registered device, with its own rate limit if it has one: what an ingestion's
    /// normalizer reads of the fleet. This default reads the whole records (some 23 MB at
    /// 100,000 units); a store that reads two fields a row into the roster as they come holds
    /// little more than the roster (2.9 MB).
    async fn device_limits(&self) -> Result<Roster<Option<RateKw>>, CloudError> {
        Ok(self
            .devices()
            .await?
            .into_iter()
            .map(|d| (d.device_id, d.max_rate_kw))
            .collect())
    }

    /// The devices that have reported a state of charge, with the last one: where an
    /// ingestion's feasibility check starts each unit. None on a fleet's first evening.
    async fn device_socs(&self) -> Result<Roster<f64>, CloudError> {
        Ok(self
            .devices()
            .await?
            .into_iter()
            .filter_map(|d| Some((d.device_id, d.soc_pct?)))
            .collect())
    }

    /// What the standing command of each device plans for `date`, from the period that starts
    /// at or after `from` on (its setpoints in period order), folded by `fold` as it is read:
    /// the devices for which `fold` has a number, with it. This default loads every command
    /// of the date at once; a store that can read them one at a time holds one device's
    /// plan at a time (at 100,000 units the whole load was some 230 MB, and every device's
    /// setpoints, had they been kept, some 45 MB).
    async fn planned_from(
        &self,
        date: Date,
        from: Timestamp,
        fold: PlanFold,
    ) -> Result<Roster<f64>, CloudError> {
        let commands = self.on_date(date).await?;
        Ok(standing_per(&commands, |c| c.device_id().clone())
            .into_iter()
            .filter_map(|(device, c)| {
                let folded = fold(&device, &rest_of(&c.schedule, from))?;
                Some((device, folded))
            })
            .collect())
    }

    /// Each device's newest command for `date`, whatever its state, as the fleet view needs
    /// it, in device order.
    async fn newest_on_date(&self, date: Date) -> Result<Vec<FleetCommand>, CloudError> {
        let on = self.on_date(date).await?;
        Ok(newest_per(&on, |c| c.device_id().clone())
            .into_values()
            .map(FleetCommand::of)
            .collect())
    }

    /// Every device, in id order, with its newest commands for `today` and `tomorrow` and its
    /// conformance so far: the periods of today's command, from the one it governs from, that
    /// started before `ended_by` (that is, ended by now), and how many of them ran as
    /// planned.
    async fn fleet(
        &self,
        today: Date,
        tomorrow: Date,
        ended_by: Timestamp,
    ) -> Result<Vec<FleetRow>, CloudError> {
        let (devices, on_today, on_tomorrow) = tokio::try_join!(
            self.devices(),
            self.newest_on_date(today),
            self.newest_on_date(tomorrow)
        )?;
        let by_device = |commands: Vec<FleetCommand>| -> BTreeMap<DeviceId, FleetCommand> {
            commands
                .into_iter()
                .map(|c| (c.summary.device_id.clone(), c))
                .collect()
        };
        let (mut on_today, mut on_tomorrow) = (by_device(on_today), by_device(on_tomorrow));
        Ok(devices
            .into_iter()
            .map(|device| {
                let today = on_today.remove(&device.device_id);
                let (due, as_planned) = today.as_ref().map_or((0, 0), |c| c.conformance(ended_by));
                FleetRow {
                    today: today.map(|c| c.summary),
                    tomorrow: on_tomorrow.remove(&device.device_id).map(|c| c.summary),
                    due,
                    as_planned,
                    device,
                }
            })
            .collect())
    }
}

impl CommandSummary {
    /// The summary of a command.
    pub fn of(c: &Command) -> CommandSummary {
        CommandSummary {
            message_id: c.message_id.clone(),
            device_id: c.device_id().clone(),
            schedule_date: c.schedule.day().date(),
            version: c.version,
            state: c.state,
            late: c.late,
        }
    }
}

impl CommandDetail {
    /// A command's detail: every planned period with its status from the marks, and the
    /// details of each period reported for this command from its report.
    pub fn new(log: CommandLog, reports: &[ReportMsg]) -> CommandDetail {
        let c = &log.command;
        let by_start: BTreeMap<Timestamp, &ReportMsg> = reports
            .iter()
            .filter(|r| r.message_id.as_ref() == Some(&c.message_id))
            .map(|r| (r.interval_start, r))
            .collect();
        let periods = c
            .schedule
            .periods()
            .map(|p| {
                let mark = c.marks.get(p.period).unwrap_or(Mark::Pending);
                let mut view = PeriodView {
                    period: p.period,
                    start: p.start,
                    mode: p.setpoint.mode(),
                    rate_kw: p.setpoint.rate(),
                    status: mark.status(),
                    applied_kw: None,
                    limited_by: None,
                    reason: mark.reason(),
                    error: None,
                    soc_pct: None,
                    at: None,
                };
                if let (Mark::Reported { .. }, Some(r)) = (mark, by_start.get(&p.start)) {
                    view.applied_kw = r.applied_kw;
                    view.limited_by = r.limited_by;
                    view.reason = r.reason;
                    view.error = r.error.clone();
                    view.soc_pct = r.soc_pct;
                    view.at = Some(r.at);
                }
                view
            })
            .collect();
        CommandDetail {
            summary: CommandSummary::of(c),
            sha256: c.sha256(),
            acked_sha256: c.acked_sha256.clone(),
            effective_period: c.effective_period,
            publishes: c.publishes,
            history: log.history,
            sends: log.sends,
            warning: log.warning,
            periods,
        }
    }
}

/// A plan's setpoints from the period that starts at or after `from` on.
pub(crate) fn rest_of(schedule: &Schedule, from: Timestamp) -> Vec<Setpoint> {
    schedule
        .periods()
        .filter(|p| p.start >= from)
        .map(|p| p.setpoint)
        .collect()
}
