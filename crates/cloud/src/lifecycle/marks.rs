//! What is known of each planned period of a command, kept with the command itself as one
//! short string, so that a transition reads and writes one row (one item), never one per
//! period.

use std::fmt;
use std::ops::RangeInclusive;

use max300_protocol::message::{PeriodReason, ReportStatus};

use super::PeriodStatus;

/// What is known of one planned period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Nothing yet.
    Pending,
    /// The device reported it; `as_planned` when it executed at exactly the planned rate.
    Reported {
        /// What the device said.
        status: ReportStatus,
        /// Executed at the planned rate.
        as_planned: bool,
    },
    /// Skipped without a report: a newer version governed it.
    Superseded,
    /// Skipped without a report: the first version was acknowledged from a later period, so
    /// no plan of this command governed it.
    NotGoverned,
    /// Still unreported when the command turned `incomplete`.
    Unreported,
}

impl Mark {
    fn code(self) -> char {
        match self {
            Mark::Pending => '.',
            Mark::Reported {
                status: ReportStatus::Executed,
                as_planned: true,
            } => 'E',
            Mark::Reported {
                status: ReportStatus::Executed,
                as_planned: false,
            } => 'e',
            Mark::Reported {
                status: ReportStatus::Failed,
                ..
            } => 'f',
            Mark::Reported {
                status: ReportStatus::Skipped,
                ..
            } => 'k',
            Mark::Superseded => 's',
            Mark::NotGoverned => '-',
            Mark::Unreported => 'u',
        }
    }

    fn from_code(code: char) -> Option<Mark> {
        let reported = |status, as_planned| Mark::Reported { status, as_planned };
        Some(match code {
            '.' => Mark::Pending,
            'E' => reported(ReportStatus::Executed, true),
            'e' => reported(ReportStatus::Executed, false),
            'f' => reported(ReportStatus::Failed, false),
            'k' => reported(ReportStatus::Skipped, false),
            's' => Mark::Superseded,
            '-' => Mark::NotGoverned,
            'u' => Mark::Unreported,
            _ => return None,
        })
    }

    /// The period's status as the API shows it.
    pub fn status(self) -> PeriodStatus {
        match self {
            Mark::Pending => PeriodStatus::Pending,
            Mark::Reported { status, .. } => status.into(),
            Mark::Superseded | Mark::NotGoverned => PeriodStatus::Skipped,
            Mark::Unreported => PeriodStatus::Unreported,
        }
    }

    /// Why a period marked without a report was skipped.
    pub fn reason(self) -> Option<PeriodReason> {
        (self == Mark::Superseded).then_some(PeriodReason::Superseded)
    }

    /// Whether the period needs nothing more for its command to complete.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            Mark::Reported { .. } | Mark::Superseded | Mark::NotGoverned
        )
    }
}

/// The marks of a command's periods, period 1 first: exactly one per planned period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marks(Vec<Mark>);

impl Marks {
    /// `periods` periods, none reported yet.
    pub fn pending(periods: u32) -> Marks {
        Marks(vec![Mark::Pending; periods as usize])
    }

    /// Reads the stored form, which must have one mark per period.
    pub fn parse(text: &str, periods: u32) -> Result<Marks, String> {
        let marks = text
            .chars()
            .map(|c| Mark::from_code(c).ok_or_else(|| format!("period marks: unknown mark {c:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        if marks.len() != periods as usize {
            return Err(format!(
                "period marks: {} for a plan of {periods} periods",
                marks.len()
            ));
        }
        Ok(Marks(marks))
    }

    /// The mark of `period` (1-based), if the plan has it.
    pub fn get(&self, period: u32) -> Option<Mark> {
        let i = usize::try_from(period.checked_sub(1)?).ok()?;
        self.0.get(i).copied()
    }

    /// Every period with its mark.
    pub fn iter(&self) -> impl Iterator<Item = (u32, Mark)> + '_ {
        (1..).zip(self.0.iter().copied())
    }

    /// Whether every period is settled.
    pub fn all_settled(&self) -> bool {
        self.0.iter().all(|m| m.is_settled())
    }

    /// Marks the pending periods of `periods` (those the plan has); others keep their mark.
    pub(super) fn fill_pending(&mut self, periods: RangeInclusive<u32>, mark: Mark) {
        for p in periods {
            if let Some(slot) = p
                .checked_sub(1)
                .and_then(|i| self.0.get_mut(i as usize))
                .filter(|m| **m == Mark::Pending)
            {
                *slot = mark;
            }
        }
    }

    /// Sets the mark of one period the plan has. Events set marks through the lifecycle;
    /// this is also for a store bringing older records up to date.
    pub fn set(&mut self, period: u32, mark: Mark) {
        if let Some(slot) = period
            .checked_sub(1)
            .and_then(|i| self.0.get_mut(i as usize))
        {
            *slot = mark;
        }
    }
}

impl fmt::Display for Marks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|m| write!(f, "{}", m.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_through_their_text() {
        let mut marks = Marks::pending(8);
        marks.set(
            1,
            Mark::Reported {
                status: ReportStatus::Executed,
                as_planned: true,
            },
        );
        marks.set(
            2,
            Mark::Reported {
                status: ReportStatus::Executed,
                as_planned: false,
            },
        );
        marks.set(
            3,
            Mark::Reported {
                status: ReportStatus::Failed,
                as_planned: false,
            },
        );
        marks.set(
            4,
            Mark::Reported {
                status: ReportStatus::Skipped,
                as_planned: false,
            },
        );
        marks.set(5, Mark::Superseded);
        marks.set(6, Mark::NotGoverned);
        marks.set(7, Mark::Unreported);
        let text = marks.to_string();
        assert_eq!(text, "Eefks-u.");
        assert_eq!(Marks::parse(&text, 8).unwrap(), marks);
    }

    #[test]
    fn stored_marks_that_do_not_fit_the_plan_are_an_error() {
        assert!(
            Marks::parse("...", 4)
                .unwrap_err()
                .contains("3 for a plan of 4")
        );
        assert!(
            Marks::parse("..x", 3)
                .unwrap_err()
                .contains("unknown mark 'x'")
        );
    }

    #[test]
    fn filling_pending_periods_keeps_what_is_known_and_ignores_periods_outside_the_plan() {
        let mut marks = Marks::pending(4);
        marks.set(2, Mark::Unreported);
        marks.fill_pending(0..=9, Mark::Superseded);
        assert_eq!(marks.to_string(), "sus".to_owned() + "s");
        assert_eq!(marks.get(5), None);
        assert_eq!(marks.get(0), None);
    }
}
