//! The command lifecycle of DESIGN §6, as pure functions over states.
//!
//! ```text
//! created ──publish──▶ sent ──ack accepted──▶ acknowledged ──every period reported──▶ completed
//!    │                   └──ack rejected──▶ rejected
//!    ├──(created|sent) no ack by the end of its last period──▶ expired
//!    ├──(acknowledged) periods still unreported 1 h after the end──▶ incomplete
//!    ├──newer version acknowledged──▶ superseded
//!    └──operator cancel──▶ cancelled
//! ```
//! Late news still counts: a report implies the ack, so `expired` or `incomplete` can still
//! become `acknowledged` or `completed`.

use std::fmt;
use std::str::FromStr;

use max300_protocol::message::{AckStatus, ReportStatus};
use serde::{Deserialize, Serialize};

/// Where a command is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Committed, not yet published.
    Created,
    /// Published, no ack yet.
    Sent,
    /// The device holds it.
    Acknowledged,
    /// The device refused it.
    Rejected,
    /// Every period was reported.
    Completed,
    /// Never acked before its last period ended.
    Expired,
    /// Acked, but periods went unreported.
    Incomplete,
    /// A newer version took over.
    Superseded,
    /// An operator cancelled it.
    Cancelled,
}

impl CommandState {
    /// Every state, for listings and metrics.
    pub const ALL: [CommandState; 9] = [
        CommandState::Created,
        CommandState::Sent,
        CommandState::Acknowledged,
        CommandState::Rejected,
        CommandState::Completed,
        CommandState::Expired,
        CommandState::Incomplete,
        CommandState::Superseded,
        CommandState::Cancelled,
    ];

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Created => "created",
            CommandState::Sent => "sent",
            CommandState::Acknowledged => "acknowledged",
            CommandState::Rejected => "rejected",
            CommandState::Completed => "completed",
            CommandState::Expired => "expired",
            CommandState::Incomplete => "incomplete",
            CommandState::Superseded => "superseded",
            CommandState::Cancelled => "cancelled",
        }
    }

    /// Whether nothing more is expected of the command.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CommandState::Rejected
                | CommandState::Completed
                | CommandState::Superseded
                | CommandState::Cancelled
                | CommandState::Expired
                | CommandState::Incomplete
        )
    }

    /// The state after an ack, or `None` if the ack does not move it.
    pub fn after_ack(self, status: AckStatus) -> Option<CommandState> {
        use CommandState::*;
        match (self, status) {
            (Created | Sent | Expired, AckStatus::Accepted) => Some(Acknowledged),
            (Created | Sent | Expired, AckStatus::Rejected) => Some(Rejected),
            _ => None,
        }
    }

    /// The state after a report, given whether every period is now reported.
    pub fn after_report(self, all_reported: bool) -> Option<CommandState> {
        use CommandState::*;
        match self {
            Created | Sent | Expired | Acknowledged | Incomplete if all_reported => Some(Completed),
            // An incomplete command stays so until every period is in: going back to
            // `acknowledged` would only have the sweeper mark it incomplete again.
            Created | Sent | Expired => Some(Acknowledged),
            _ => None,
        }
    }
}

/// Whether an unacknowledged message is due to be published again.
///
/// The delay starts at `ack_timeout` and doubles with each publish, up to 15 minutes of clock
/// time, but is never shorter than `floor` (2 s of real time, in clock time), so a fast clock
/// cannot cause a resend storm.
pub fn resend_due(
    publishes: u32,
    last_sent: jiff::Timestamp,
    now: jiff::Timestamp,
    ack_timeout: jiff::SignedDuration,
    floor: jiff::SignedDuration,
) -> bool {
    let doublings = publishes.saturating_sub(1).min(16);
    let backoff = ack_timeout
        .checked_mul(1 << doublings)
        .unwrap_or(RESEND_MAX)
        .min(RESEND_MAX);
    now >= last_sent + backoff.max(floor)
}

/// The longest wait between two publishes of the same message.
pub const RESEND_MAX: jiff::SignedDuration = jiff::SignedDuration::from_mins(15);

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CommandState::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown command state {s:?}"))
    }
}

/// Where one period of a command is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeriodStatus {
    /// Not reported yet.
    Pending,
    /// Ran as allowed.
    Executed,
    /// The controller failed.
    Failed,
    /// Did not run under this command.
    Skipped,
    /// Never reported before the command turned incomplete.
    Unreported,
}

impl PeriodStatus {
    /// Every status.
    pub const ALL: [PeriodStatus; 5] = [
        PeriodStatus::Pending,
        PeriodStatus::Executed,
        PeriodStatus::Failed,
        PeriodStatus::Skipped,
        PeriodStatus::Unreported,
    ];

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            PeriodStatus::Pending => "pending",
            PeriodStatus::Executed => "executed",
            PeriodStatus::Failed => "failed",
            PeriodStatus::Skipped => "skipped",
            PeriodStatus::Unreported => "unreported",
        }
    }
}

impl From<ReportStatus> for PeriodStatus {
    fn from(s: ReportStatus) -> Self {
        match s {
            ReportStatus::Executed => PeriodStatus::Executed,
            ReportStatus::Failed => PeriodStatus::Failed,
            ReportStatus::Skipped => PeriodStatus::Skipped,
        }
    }
}

impl FromStr for PeriodStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PeriodStatus::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown period status {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandState::*;

    #[test]
    fn an_accepted_ack_moves_sent_and_expired_to_acknowledged() {
        assert_eq!(Sent.after_ack(AckStatus::Accepted), Some(Acknowledged));
        assert_eq!(Expired.after_ack(AckStatus::Accepted), Some(Acknowledged));
        assert_eq!(Created.after_ack(AckStatus::Rejected), Some(Rejected));
    }

    #[test]
    fn a_repeated_ack_changes_nothing() {
        assert_eq!(Acknowledged.after_ack(AckStatus::Accepted), None);
        assert_eq!(Completed.after_ack(AckStatus::Accepted), None);
        assert_eq!(Rejected.after_ack(AckStatus::Accepted), None);
    }

    #[test]
    fn a_report_implies_the_ack_and_the_last_one_completes() {
        assert_eq!(Sent.after_report(false), Some(Acknowledged));
        assert_eq!(Incomplete.after_report(true), Some(Completed));
        assert_eq!(Incomplete.after_report(false), None);
        assert_eq!(Expired.after_report(false), Some(Acknowledged));
        assert_eq!(Acknowledged.after_report(false), None);
        assert_eq!(Acknowledged.after_report(true), Some(Completed));
        assert_eq!(Superseded.after_report(true), None);
        assert_eq!(Cancelled.after_report(true), None);
    }

    #[test]
    fn resends_back_off_from_the_ack_timeout_to_fifteen_minutes() {
        use jiff::SignedDuration as D;
        let t0: jiff::Timestamp = "2026-11-30T00:00:00Z".parse().unwrap();
        let (timeout, floor) = (D::from_secs(60), D::from_secs(2));
        assert!(!resend_due(1, t0, t0 + D::from_secs(59), timeout, floor));
        assert!(resend_due(1, t0, t0 + D::from_secs(60), timeout, floor));
        assert!(!resend_due(3, t0, t0 + D::from_secs(239), timeout, floor));
        assert!(resend_due(3, t0, t0 + D::from_secs(240), timeout, floor));
        assert!(!resend_due(
            30,
            t0,
            t0 + D::from_mins(15) - D::from_secs(1),
            timeout,
            floor
        ));
        assert!(resend_due(30, t0, t0 + D::from_mins(15), timeout, floor));
    }

    #[test]
    fn a_fast_clock_never_resends_faster_than_the_real_time_floor() {
        use jiff::SignedDuration as D;
        let t0: jiff::Timestamp = "2026-11-30T00:00:00Z".parse().unwrap();
        // At 1200×, 2 s of real time is 40 minutes of clock time.
        let floor = D::from_mins(40);
        assert!(!resend_due(
            1,
            t0,
            t0 + D::from_mins(39),
            D::from_secs(60),
            floor
        ));
        assert!(resend_due(
            1,
            t0,
            t0 + D::from_mins(40),
            D::from_secs(60),
            floor
        ));
    }

    #[test]
    fn names_round_trip() {
        for s in CommandState::ALL {
            assert_eq!(s.as_str().parse::<CommandState>(), Ok(s));
        }
        for s in PeriodStatus::ALL {
            assert_eq!(s.as_str().parse::<PeriodStatus>(), Ok(s));
        }
    }
}
