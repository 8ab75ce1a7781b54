//! The names of the lifecycle: a command's state and a period's status, as the API shows them.

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

    /// Whether the command still stands: not refused, replaced or cancelled. Sync answers,
    /// the fleet view and feasibility only ever look at live commands.
    pub fn is_live(self) -> bool {
        !matches!(
            self,
            CommandState::Rejected | CommandState::Superseded | CommandState::Cancelled
        )
    }

    /// Whether the command is still waiting for its device's ack (and so is resent).
    pub fn awaits_ack(self) -> bool {
        matches!(self, CommandState::Created | CommandState::Sent)
    }

    /// The state after an ack, or `None` if the ack does not move it.
    pub(super) fn after_ack(self, status: AckStatus) -> Option<CommandState> {
        use CommandState::*;
        match (self, status) {
            (Created | Sent | Expired, AckStatus::Accepted) => Some(Acknowledged),
            (Created | Sent | Expired, AckStatus::Rejected) => Some(Rejected),
            _ => None,
        }
    }

    /// The state after a report, given whether every period is now reported.
    pub(super) fn after_report(self, all_reported: bool) -> Option<CommandState> {
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
    fn names_round_trip() {
        for s in CommandState::ALL {
            assert_eq!(s.as_str().parse::<CommandState>(), Ok(s));
        }
        for s in PeriodStatus::ALL {
            assert_eq!(s.as_str().parse::<PeriodStatus>(), Ok(s));
        }
    }
}
