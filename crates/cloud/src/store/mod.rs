//! The command store: devices, commands, their periods, acks and reports.
//!
//! [`CommandStore`] is the seam between the service and its database: SQLite here, DynamoDB
//! for AWS (feature `aws`). Its methods speak the domain (`record_ack`, `record_report`), so
//! either backend can make each one atomic in its own way.

#[cfg(feature = "aws")]
mod dynamodb;
mod sqlite;

#[cfg(feature = "aws")]
pub use dynamodb::DynamoStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use jiff::Timestamp;
use jiff::civil::Date;
use max300_protocol::message::{AckMsg, ControlMsg, HeartbeatMsg, ReportMsg, ScheduleMsg};
use max300_protocol::{DeviceId, MessageId, RateKw, Schedule, Setpoint, TraceParent};
use serde::Serialize;

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
    pub mode: Option<String>,
    /// Rate from the last heartbeat.
    pub rate_kw: Option<RateKw>,
    /// State of charge from the last heartbeat.
    pub soc_pct: Option<f64>,
    /// Fallback from the last heartbeat.
    pub fallback: Option<String>,
    /// The plan it says it follows.
    pub active_message_id: Option<String>,
    /// Its outbox depth.
    pub outbox: Option<u64>,
}

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

/// One state change of a command.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistoryEntry {
    /// The new state.
    pub state: CommandState,
    /// When.
    pub at: Timestamp,
}

/// One period of a command and how it went.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PeriodView {
    /// 1-based period.
    pub period: u32,
    /// Its start.
    pub start: Timestamp,
    /// Planned mode.
    pub mode: String,
    /// Planned rate.
    pub rate_kw: RateKw,
    /// Its status.
    pub status: PeriodStatus,
    /// What ran.
    pub applied_kw: Option<RateKw>,
    /// Why it differed.
    pub limited_by: Option<String>,
    /// Why it was skipped or limited.
    pub reason: Option<String>,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// First time seen: applied.
    Applied,
    /// Seen before: nothing changed.
    Duplicate,
    /// Stored, but no command of ours matches it.
    UnknownCommand,
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

/// An ingestion run that started but never finished (the service stopped in the middle).
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
}

/// A command or control message published and not yet acknowledged.
#[derive(Clone, Debug, PartialEq)]
pub struct Unacked {
    /// Its id.
    pub message_id: MessageId,
    /// The device.
    pub device_id: DeviceId,
    /// Times published so far.
    pub publishes: u32,
    /// When it was last published.
    pub last_sent_at: Timestamp,
}

/// A clock-driven state change made by [`CommandStore::sweep`].
#[derive(Clone, Debug, PartialEq)]
pub struct Swept {
    /// The command.
    pub message_id: MessageId,
    /// The device.
    pub device_id: DeviceId,
    /// Its new state, or `None` when only the `late` flag was set.
    pub state: Option<CommandState>,
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

    /// Records a heartbeat (and that the device was seen).
    async fn record_heartbeat(&self, hb: &HeartbeatMsg, at: Timestamp) -> Result<(), CloudError>;

    /// Creates commands, versioning per device and date: the same content as the latest
    /// version creates nothing; changed content is version + 1. SQLite creates them all in one
    /// transaction; DynamoDB in transactions of up to 33 commands, each command with its
    /// version claim, so a failure can leave some created (a repeated call then finds them
    /// `Unchanged`).
    async fn insert_commands(
        &self,
        commands: &[NewCommand],
        at: Timestamp,
    ) -> Result<Vec<Insert>, CloudError>;

    /// The message to publish for a command.
    async fn schedule_message(&self, id: &MessageId) -> Result<Option<ScheduleMsg>, CloudError>;

    /// The trace context stored with a command, for feedback that comes without one.
    async fn command_traceparent(&self, id: &MessageId) -> Result<Option<TraceParent>, CloudError>;

    /// Marks commands published; `created` becomes `sent`.
    async fn mark_sent(&self, ids: &[MessageId], at: Timestamp) -> Result<(), CloudError>;

    /// Applies an ack once, by its message_id.
    async fn record_ack(&self, ack: &AckMsg, at: Timestamp) -> Result<Recorded, CloudError>;

    /// Applies several acks: the outcomes, in order, are those of [`CommandStore::record_ack`]
    /// applied to each in turn. SQLite applies the batch in one transaction (if it fails, none
    /// is applied); DynamoDB, whose transactions hold at most 100 items, applies each ack
    /// atomically in order, so a failure can leave the earlier ones applied. Either is safe:
    /// each ack is idempotent, and a device sends again whatever got no receipt.
    async fn record_acks(
        &self,
        acks: &[AckMsg],
        at: Timestamp,
    ) -> Result<Vec<Recorded>, CloudError>;

    /// Applies a report once, by (device_id, interval_start).
    async fn record_report(
        &self,
        report: &ReportMsg,
        at: Timestamp,
    ) -> Result<Recorded, CloudError>;

    /// The reports a device sent for periods starting in `from..to`, oldest first; one per
    /// period, as first received.
    async fn reports(
        &self,
        device: &DeviceId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<ReportMsg>, CloudError>;

    /// One command in full.
    async fn command(&self, id: &MessageId) -> Result<Option<CommandDetail>, CloudError>;

    /// Commands, newest first, filtered by device and date.
    async fn commands(
        &self,
        device: Option<&DeviceId>,
        date: Option<Date>,
    ) -> Result<Vec<CommandSummary>, CloudError>;

    /// What the latest live command of each device plans for `date`, from the period that
    /// starts at or after `from` on, in device and period order.
    async fn planned_from(
        &self,
        date: Date,
        from: Timestamp,
    ) -> Result<Vec<(DeviceId, Setpoint)>, CloudError>;

    /// Keeps a feasibility warning with each command.
    async fn record_warnings(&self, warnings: &[(MessageId, String)]) -> Result<(), CloudError>;

    /// How many commands are in each state (states with none are left out). DynamoDB keeps
    /// sharded counters, moved right after each transition rather than inside it, so a crash
    /// between the two can leave a count one off.
    async fn command_counts(&self) -> Result<Vec<(CommandState, u32)>, CloudError>;

    /// Every device, in id order, with its latest commands for `today` and `tomorrow` and its
    /// conformance so far: the periods of today's command that started before `ended_by`
    /// (that is, ended by now), and how many of them ran as planned. A few queries for the
    /// whole fleet, not one per device.
    async fn fleet(
        &self,
        today: Date,
        tomorrow: Date,
        ended_by: Timestamp,
    ) -> Result<Vec<FleetRow>, CloudError>;

    /// The latest live version per date, from `from` on, for one device.
    async fn current_commands(
        &self,
        device: &DeviceId,
        from: Date,
    ) -> Result<Vec<CurrentCommand>, CloudError>;

    /// Commands still `created`: committed but never published (e.g. after a crash).
    async fn unsent(&self) -> Result<Vec<MessageId>, CloudError>;

    /// Records the start of an ingestion run (its raw document is already in the audit store).
    async fn begin_ingestion(
        &self,
        date: Date,
        source: &str,
        audit_key: &str,
        at: Timestamp,
    ) -> Result<i64, CloudError>;

    /// Records the end of an ingestion run.
    async fn finish_ingestion(
        &self,
        id: i64,
        counts: IngestionCounts,
        at: Timestamp,
    ) -> Result<(), CloudError>;

    /// Runs that started and never finished.
    async fn interrupted_ingestions(&self) -> Result<Vec<Interrupted>, CloudError>;

    /// Whether a fetch of `date` from the provider has finished (a POSTed document for one
    /// device does not stand in for the fleet's daily fetch).
    async fn ingested(&self, date: Date) -> Result<bool, CloudError>;

    /// Commands and control messages published, not acknowledged, and still worth sending:
    /// no newer version exists and their date is not over.
    async fn awaiting_ack(&self, now: Timestamp) -> Result<Vec<Unacked>, CloudError>;

    /// Applies the clock-driven transitions of DESIGN §6 at `now`: `late`, `expired`, and
    /// `incomplete` (with its pending periods `unreported`).
    async fn sweep(&self, now: Timestamp) -> Result<Vec<Swept>, CloudError>;

    /// An operator's cancel: the command becomes `cancelled` and a control message with id
    /// `control_id` is created for delivery.
    async fn cancel(
        &self,
        id: &MessageId,
        control_id: MessageId,
        at: Timestamp,
    ) -> Result<Cancel, CloudError>;

    /// The message to publish for a control message.
    async fn control_message(&self, id: &MessageId) -> Result<Option<ControlMsg>, CloudError>;

    /// Takes the lease `name` for `owner` until `until`, or renews it, when it is free, has
    /// expired by `now`, or is already `owner`'s. One conditional write: of several instances
    /// asking at once, exactly one gets it. This is how several cloud instances share one
    /// store: one runs the daily ingestion of a date, one sweeps at a time.
    async fn lease(
        &self,
        name: &str,
        owner: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<bool, CloudError>;

    /// Gives a lease back before it expires; nothing happens unless `owner` holds it.
    async fn release(&self, name: &str, owner: &str) -> Result<(), CloudError>;

    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), CloudError>;
}
