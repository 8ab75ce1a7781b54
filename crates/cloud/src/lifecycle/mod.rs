//! The command lifecycle of DESIGN §6, decided in one place.
//!
//! ```text
//! created ──publish──▶ sent ──ack accepted──▶ acknowledged ──every period reported──▶ completed
//!    │                   └──ack rejected──▶ rejected
//!    ├──(created|sent) no ack by the end of its last period──▶ expired
//!    ├──(acknowledged) periods still unreported 1 h after the end──▶ incomplete
//!    ├──newer version acknowledged──▶ superseded
//!    └──operator cancel──▶ cancelled
//! ```
//!
//! A store loads a [`Command`] (or a [`Control`]); an event goes in with the instant it
//! happened at; a [`Step`] comes out: the command after the event, the states it entered and
//! the publish it records. The store writes the step back atomically, over the revision it
//! read, and decides nothing itself: no rule of this module is written in SQL or in a
//! DynamoDB expression. Like rumqttc's `MqttState`, it does no I/O and reads no clock.
//!
//! Late news still counts: a report implies the ack, so `expired` or `incomplete` can still
//! become `acknowledged` or `completed`. Each period of a command carries a [`Mark`]:
//! pending until a report, or skipped because another version governed it, or unreported
//! once the command turned incomplete.
//!
//! # Layout
//! - `state`: [`CommandState`] and [`PeriodStatus`], the names the API shows.
//! - `policy`: [`Policy`], the resend backoff and the report retention window.
//! - `marks`: [`Marks`], what is known of each period, stored with the command.
//! - `command`: [`Command`] and the events of one command: published, tick, cancel.
//! - `control`: [`Control`], the cancel message and its own small life.
//! - `feedback`: what an ack or a report does, across the versions of a device's date.

mod command;
mod control;
pub mod feedback;
mod marks;
mod policy;
mod state;
#[cfg(test)]
mod tests;

pub use command::{Command, HistoryEntry, Step, Tick};
pub use control::Control;
pub use marks::{Mark, Marks};
pub use policy::{INCOMPLETE_AFTER, Policy, RESEND_MAX};
pub use state::{CommandState, PeriodStatus};

/// A command or a control message: what a message id names.
#[derive(Clone, Debug, PartialEq)]
pub enum Subject {
    /// A schedule command.
    Command(Command),
    /// A control message.
    Control(Control),
}

impl Subject {
    /// Its message id.
    pub fn message_id(&self) -> &max300_protocol::MessageId {
        match self {
            Subject::Command(c) => &c.message_id,
            Subject::Control(c) => &c.message_id,
        }
    }

    /// Its device.
    pub fn device_id(&self) -> &max300_protocol::DeviceId {
        match self {
            Subject::Command(c) => c.device_id(),
            Subject::Control(c) => &c.device_id,
        }
    }

    /// Whether it may be published at `now`.
    pub fn publishable(&self, now: jiff::Timestamp) -> bool {
        match self {
            Subject::Command(c) => c.publishable(now),
            Subject::Control(c) => c.publishable(now),
        }
    }
}

/// The version a new schedule for a device and date gets, given the latest version held
/// for them and its sha256: `None` when the content is the same (nothing new is made).
pub fn next_version(latest: Option<(u32, &str)>, sha256: &str) -> Option<u32> {
    match latest {
        Some((_, held)) if held == sha256 => None,
        Some((version, _)) => Some(version + 1),
        None => Some(1),
    }
}

/// The version that stands for each date: the newest live one, among `commands` of one
/// device. Sync answers and feasibility read it.
pub fn standing<'a>(
    commands: impl IntoIterator<Item = &'a Command>,
) -> std::collections::BTreeMap<jiff::civil::Date, &'a Command> {
    standing_per(commands, |c| c.schedule.day().date())
}

/// The version that stands per key (a date of one device, a device on one date): see
/// [`stands_over`].
pub fn standing_per<'a, K: Ord>(
    commands: impl IntoIterator<Item = &'a Command>,
    key: impl Fn(&Command) -> K,
) -> std::collections::BTreeMap<K, &'a Command> {
    best_per(commands, key, |c, held| {
        stands_over(c.state, c.version, held)
    })
}

/// Whether a version in `state` stands over `held`, the version standing so far for the same
/// device and date: the newest live one stands. Stores that read versions one at a time ask
/// this of each.
pub fn stands_over(state: CommandState, version: u32, held: Option<u32>) -> bool {
    state.is_live() && is_newer(version, held)
}

/// Whether `version` is newer than `held`, the newest version met so far for the same device
/// and date, whatever their states. Stores that read versions one at a time ask this of each.
pub fn is_newer(version: u32, held: Option<u32>) -> bool {
    held.is_none_or(|held| version > held)
}

/// The newest version per key, whatever its state.
pub fn newest_per<'a, K: Ord>(
    commands: impl IntoIterator<Item = &'a Command>,
    key: impl Fn(&Command) -> K,
) -> std::collections::BTreeMap<K, &'a Command> {
    best_per(commands, key, |c, held| is_newer(c.version, held))
}

/// Per key, the last command that `wins` over the version held for its key so far.
fn best_per<'a, K: Ord>(
    commands: impl IntoIterator<Item = &'a Command>,
    key: impl Fn(&Command) -> K,
    wins: impl Fn(&Command, Option<u32>) -> bool,
) -> std::collections::BTreeMap<K, &'a Command> {
    let mut out: std::collections::BTreeMap<K, &Command> = std::collections::BTreeMap::new();
    for c in commands {
        let k = key(c);
        if wins(c, out.get(&k).map(|held| held.version)) {
            out.insert(k, c);
        }
    }
    out
}
