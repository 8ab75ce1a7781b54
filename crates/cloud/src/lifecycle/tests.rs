//! The state machine as a table: every transition of DESIGN §6, and the failure modes of
//! issue 14 that live in it, each a row.

use jiff::{SignedDuration, Timestamp};
use max300_protocol::message::{AckMsg, AckStatus, ReportMsg, ReportStatus, V1};
use max300_protocol::{Day, DeviceId, MessageId, Mode, RateKw, Schedule, Setpoint, StoreId};

use super::feedback::{self, AckOutcome, AckTarget, ReportOutcome};
use super::*;
use CommandState::*;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn day() -> Day {
    Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap()
}

/// The evening before.
fn eve() -> Timestamp {
    ts("2026-11-29T16:00:00Z")
}

fn command(version: u32, state: CommandState) -> Command {
    let mut setpoints = vec![Setpoint::IDLE; 48];
    setpoints[0] = Setpoint::new(Mode::Charge, RateKw::from_watts(10_000)).unwrap();
    let schedule = Schedule::new(DeviceId::parse("d1").unwrap(), day(), setpoints).unwrap();
    let id = MessageId::parse(format!("m-v{version}")).unwrap();
    let mut c = Command::new(id, schedule, version, None, eve(), &Policy::default()).unwrap();
    c.state = state;
    c
}

fn ack(c: &Command, status: AckStatus, effective: Option<u32>) -> AckMsg {
    AckMsg {
        v: V1,
        store_id: StoreId::parse("s1").unwrap(),
        seq: 1,
        message_id: c.message_id.clone(),
        device_id: c.device_id().clone(),
        status,
        reason: None,
        details: None,
        sha256: Some(c.sha256()),
        effective_period: effective,
        at: eve(),
        traceparent: None,
    }
}

fn report(c: &Command, period: u32) -> ReportMsg {
    ReportMsg {
        v: V1,
        store_id: StoreId::parse("s1").unwrap(),
        seq: 100 + u64::from(period),
        message_id: Some(c.message_id.clone()),
        device_id: c.device_id().clone(),
        period,
        interval_start: day().period_start(period),
        mode: Mode::Idle,
        rate_kw: RateKw::ZERO,
        status: ReportStatus::Executed,
        applied_kw: Some(RateKw::ZERO),
        limited_by: None,
        reason: None,
        would_kw: None,
        soc_pct: None,
        energy_kwh: None,
        error: None,
        at: day().period_start(period),
        traceparent: None,
    }
}

/// Applies an accepted or rejected ack to a lone command; the state after it.
fn acked(c: &Command, status: AckStatus, effective: Option<u32>) -> CommandState {
    let target = AckTarget::Command {
        command: c.clone(),
        others: Vec::new(),
    };
    match feedback::ack(&target, false, &ack(c, status, effective), eve()) {
        AckOutcome::Apply { commands, .. } => commands[0].after.state,
        other => panic!("{other:?}"),
    }
}

/// Reports every period of `c` but the last `left`; the state after them.
fn reported_all_but(c: &Command, left: u32) -> CommandState {
    let mut c = c.clone();
    for p in 1..=48 - left {
        let at = day().end();
        match feedback::report(
            std::slice::from_ref(&c),
            false,
            &report(&c, p),
            at,
            &Policy::default(),
        ) {
            ReportOutcome::Apply(Some(step)) => c = step.after.clone(),
            other => panic!("period {p}: {other:?}"),
        }
    }
    c.state
}

fn ticked(c: &Command, now: Timestamp) -> CommandState {
    c.tick(now, c.version, &Policy::default())
        .map_or(c.state, |t| t.step.after.state)
}

fn hour_after() -> Timestamp {
    day().end() + SignedDuration::from_hours(1)
}

#[test]
fn every_transition_of_design_section_6() {
    type Event = fn(&Command) -> CommandState;
    let table: Vec<(&str, CommandState, Event, CommandState)> = vec![
        (
            "publish",
            Created,
            |c| c.published(eve(), &Policy::default()).after.state,
            Sent,
        ),
        (
            "a resend keeps it sent",
            Sent,
            |c| c.published(eve(), &Policy::default()).after.state,
            Sent,
        ),
        (
            "ack accepted",
            Sent,
            |c| acked(c, AckStatus::Accepted, Some(1)),
            Acknowledged,
        ),
        (
            "an ack before the publish was recorded",
            Created,
            |c| acked(c, AckStatus::Accepted, Some(1)),
            Acknowledged,
        ),
        (
            "ack rejected",
            Sent,
            |c| acked(c, AckStatus::Rejected, None),
            Rejected,
        ),
        (
            "every period reported",
            Acknowledged,
            |c| reported_all_but(c, 0),
            Completed,
        ),
        (
            "a report implies the ack",
            Sent,
            |c| reported_all_but(c, 47),
            Acknowledged,
        ),
        (
            "created, no ack by the end",
            Created,
            |c| ticked(c, day().end()),
            Expired,
        ),
        (
            "sent, no ack by the end",
            Sent,
            |c| ticked(c, day().end()),
            Expired,
        ),
        (
            "acknowledged, not yet an hour after the end",
            Acknowledged,
            |c| ticked(c, hour_after() - SignedDuration::from_secs(1)),
            Acknowledged,
        ),
        (
            "acknowledged, unreported an hour after the end",
            Acknowledged,
            |c| ticked(c, hour_after()),
            Incomplete,
        ),
        (
            "late news: expired, then acked",
            Expired,
            |c| acked(c, AckStatus::Accepted, Some(1)),
            Acknowledged,
        ),
        (
            "late news: expired, then a report",
            Expired,
            |c| reported_all_but(c, 47),
            Acknowledged,
        ),
        (
            "late news: incomplete, then every report",
            Incomplete,
            |c| reported_all_but(c, 0),
            Completed,
        ),
        (
            "late news: incomplete stays so until the last report",
            Incomplete,
            |c| reported_all_but(c, 1),
            Incomplete,
        ),
        (
            "cancel created",
            Created,
            |c| c.cancel(eve()).unwrap().after.state,
            Cancelled,
        ),
        (
            "cancel sent",
            Sent,
            |c| c.cancel(eve()).unwrap().after.state,
            Cancelled,
        ),
        (
            "cancel acknowledged",
            Acknowledged,
            |c| c.cancel(eve()).unwrap().after.state,
            Cancelled,
        ),
        (
            "a completed command is not cancelled",
            Completed,
            |c| c.cancel(eve()).unwrap_err(),
            Completed,
        ),
        (
            "an expired command is not cancelled",
            Expired,
            |c| c.cancel(eve()).unwrap_err(),
            Expired,
        ),
        (
            "a repeated ack moves nothing",
            Acknowledged,
            |c| acked(c, AckStatus::Accepted, Some(1)),
            Acknowledged,
        ),
        (
            "a cancelled command ignores a late ack",
            Cancelled,
            |c| acked(c, AckStatus::Accepted, Some(1)),
            Cancelled,
        ),
        (
            "a cancelled command ignores a late report",
            Cancelled,
            |c| reported_all_but(c, 0),
            Cancelled,
        ),
        (
            "a superseded command ignores the clock",
            Superseded,
            |c| ticked(c, hour_after()),
            Superseded,
        ),
    ];
    for (name, from, event, want) in table {
        assert_eq!(event(&command(1, from)), want, "{name}: from {from}");
    }
}

#[test]
fn a_newer_version_acknowledged_supersedes_the_older_from_its_effective_period() {
    let v1 = command(1, Acknowledged);
    let v2 = command(2, Sent);
    let target = AckTarget::Command {
        command: v2.clone(),
        others: vec![v1.clone()],
    };
    let AckOutcome::Apply { commands, .. } = feedback::ack(
        &target,
        false,
        &ack(&v2, AckStatus::Accepted, Some(10)),
        eve(),
    ) else {
        panic!("not applied")
    };
    let (new, old) = (&commands[0].after, &commands[1].after);
    assert_eq!((new.state, old.state), (Acknowledged, Superseded));
    assert!(
        old.marks
            .iter()
            .all(|(p, m)| (p >= 10) == (m == Mark::Superseded))
    );
    assert!(
        new.marks
            .iter()
            .all(|(p, m)| (p < 10) == (m == Mark::Superseded))
    );
    // A rejected newer version supersedes nothing.
    let rejected = feedback::ack(&target, false, &ack(&v2, AckStatus::Rejected, None), eve());
    let AckOutcome::Apply { commands, .. } = rejected else {
        panic!("not applied")
    };
    assert_eq!(commands.len(), 1);
}

#[test]
fn the_clock_flags_a_command_late_when_its_first_period_starts_unacknowledged() {
    let c = command(1, Sent);
    assert!(c.tick(eve(), 1, &Policy::default()).is_none_or(|t| !t.late));
    let t = c.tick(day().start(), 1, &Policy::default()).unwrap();
    assert!(t.late && t.step.after.late);
    assert_eq!(t.state, None, "late is a flag, not a state");
    // An ack after its first period started is late too, by when the device acked.
    let mut late_ack = ack(&c, AckStatus::Accepted, Some(2));
    late_ack.at = day().period_start(2);
    let target = AckTarget::Command {
        command: c,
        others: vec![],
    };
    let AckOutcome::Apply { commands, .. } =
        feedback::ack(&target, false, &late_ack, day().period_start(2))
    else {
        panic!()
    };
    assert!(commands[0].after.late);
}

/// Item 1: a `created` command (or control) is retried, with the same backoff as a `sent`
/// one, so a publish that failed is never the last word.
#[test]
fn a_created_command_or_control_is_published_again_with_backoff() {
    let p = Policy::default();
    let c = command(1, Created);
    assert_eq!(c.wake_at(), Some(eve() + p.resend_delay(1)));
    let first = c.tick(eve() + p.resend_delay(1), 1, &p).unwrap();
    assert!(first.resend);
    assert_eq!(
        first.step.after.state, Created,
        "still created until a publish is recorded"
    );
    // The publish failed: the next try backs off further.
    let again_at = first.step.after.retry_at.unwrap();
    assert_eq!(again_at - (eve() + p.resend_delay(1)), p.resend_delay(2));
    assert!(first.step.after.tick(again_at, 1, &p).unwrap().resend);

    let control = Control::cancel(
        &command(1, Acknowledged),
        MessageId::parse("k1").unwrap(),
        eve(),
        &p,
    );
    assert_eq!(control.wake_at(), Some(eve() + p.resend_delay(1)));
    let (after, resend) = control.tick(eve() + p.resend_delay(1), &p).unwrap();
    assert!(resend);
    assert_eq!(after.state, Created);
    // Once its target's date is over, it is given up.
    let (gone, resend) = after.tick(day().end(), &p).unwrap();
    assert!(!resend);
    assert_eq!(gone.wake_at(), None);
}

#[test]
fn resends_stop_at_an_ack_a_newer_version_or_a_cancel() {
    let p = Policy::default();
    let sent = command(1, Created).published(eve(), &p).after;
    let due = sent.retry_at.unwrap();
    assert!(sent.tick(due, 1, &p).unwrap().resend);
    let newer = sent.tick(due, 2, &p).unwrap();
    assert!(!newer.resend);
    assert_eq!(newer.step.after.retry_at, None);
    let acked = sent
        .acked(&ack(&sent, AckStatus::Accepted, Some(1)), eve())
        .unwrap();
    assert_eq!(acked.after.retry_at, None);
    let cancelled = sent.cancel(eve()).unwrap().after;
    assert_eq!(cancelled.wake_at(), None);
    assert!(!cancelled.publishable(eve()));
}

/// Item 4: an ack cannot make the store do unbounded work: its effective period must be one
/// of the plan's, and present when accepted. Anything else changes nothing.
#[test]
fn an_ack_with_an_effective_period_outside_the_plan_is_refused() {
    let c = command(1, Sent);
    let target = AckTarget::Command {
        command: c.clone(),
        others: vec![],
    };
    for effective in [Some(4_294_967_295), Some(0), Some(100), Some(49), None] {
        let outcome = feedback::ack(
            &target,
            false,
            &ack(&c, AckStatus::Accepted, effective),
            eve(),
        );
        assert!(
            matches!(&outcome, AckOutcome::Invalid(why) if why.starts_with("effective_period")),
            "{effective:?}: {outcome:?}"
        );
    }
    assert!(matches!(
        feedback::ack(
            &target,
            false,
            &ack(&c, AckStatus::Accepted, Some(48)),
            eve()
        ),
        AckOutcome::Apply { .. }
    ));
}

#[test]
fn another_devices_ack_is_unknown_and_a_seen_one_a_duplicate() {
    let c = command(1, Sent);
    let target = AckTarget::Command {
        command: c.clone(),
        others: vec![],
    };
    let mut spoof = ack(&c, AckStatus::Accepted, Some(1));
    spoof.device_id = DeviceId::parse("d2").unwrap();
    assert_eq!(
        feedback::ack(&target, false, &spoof, eve()),
        AckOutcome::Unknown
    );
    assert_eq!(
        feedback::ack(&target, true, &ack(&c, AckStatus::Accepted, Some(1)), eve()),
        AckOutcome::Duplicate
    );
    assert_eq!(
        feedback::ack(&AckTarget::Unknown, false, &spoof, eve()),
        AckOutcome::Unknown
    );
}

/// Item 7: a report counts only for a period on the grid of a day the device has a command
/// for, within the retention window, and not in the future.
#[test]
fn reports_off_the_grid_of_the_devices_days_are_refused() {
    let p = Policy::default();
    let c = command(1, Acknowledged);
    let now = day().end();
    let refused = |r: &ReportMsg, now: Timestamp| match feedback::report(
        std::slice::from_ref(&c),
        false,
        r,
        now,
        &p,
    ) {
        ReportOutcome::Refused(why) => why,
        other => panic!("{other:?}"),
    };
    let mut off_grid = report(&c, 3);
    off_grid.interval_start += SignedDuration::from_mins(7);
    assert!(refused(&off_grid, now).contains("not a period start"));
    let mut other_day = report(&c, 3);
    other_day.interval_start = day().period_start(3) + SignedDuration::from_hours(24 * 30);
    assert!(
        refused(&other_day, other_day.interval_start).contains("not in a day d1 has a command for")
    );
    assert!(
        refused(&report(&c, 3), now + SignedDuration::from_hours(24 * 401)).contains("retention")
    );
    assert!(refused(&report(&c, 40), day().start()).contains("not started yet"));
    let mut mismatch = report(&c, 3);
    mismatch.period = 4;
    assert!(refused(&mismatch, now).contains("period: 4"));
    // A report with no plan behind it, in a day that has one, is kept for the record.
    let mut no_plan = report(&c, 3);
    no_plan.message_id = None;
    assert_eq!(
        feedback::report(std::slice::from_ref(&c), false, &no_plan, now, &p),
        ReportOutcome::Apply(None)
    );
    assert_eq!(
        feedback::report(std::slice::from_ref(&c), true, &no_plan, now, &p),
        ReportOutcome::Duplicate
    );
}

#[test]
fn reports_before_the_ack_complete_the_command_once_the_ack_marks_the_early_periods() {
    let v2 = command(2, Sent);
    let mut c = v2.clone();
    for period in 5..=48 {
        let ReportOutcome::Apply(Some(step)) = feedback::report(
            &[c.clone()],
            false,
            &report(&c, period),
            day().end(),
            &Policy::default(),
        ) else {
            panic!()
        };
        c = step.after;
    }
    assert_eq!(c.state, Acknowledged);
    let target = AckTarget::Command {
        command: c.clone(),
        others: vec![],
    };
    let AckOutcome::Apply { commands, .. } = feedback::ack(
        &target,
        false,
        &ack(&c, AckStatus::Accepted, Some(5)),
        day().end(),
    ) else {
        panic!()
    };
    let states: Vec<_> = commands[0].entered.iter().map(|h| h.state).collect();
    assert_eq!(states, [Completed]);
}

#[test]
fn an_incomplete_command_marks_its_pending_periods_unreported() {
    let mut c = command(1, Acknowledged);
    c.marks.set(
        1,
        Mark::Reported {
            status: ReportStatus::Executed,
            as_planned: true,
        },
    );
    let t = c
        .tick(day().end() + INCOMPLETE_AFTER, 1, &Policy::default())
        .unwrap();
    assert_eq!(t.state, Some(Incomplete));
    let unreported = t
        .step
        .after
        .marks
        .iter()
        .filter(|(_, m)| *m == Mark::Unreported)
        .count();
    assert_eq!(unreported, 47);
    assert_eq!(t.step.after.wake_at(), None);
}

#[test]
fn every_wake_is_answered_by_a_change_so_no_command_stays_due() {
    let p = Policy::default();
    for state in CommandState::ALL {
        for late in [false, true] {
            let mut c = command(1, state);
            c.late = late;
            if let Some(at) = c.wake_at() {
                assert!(
                    c.tick(at, 1, &p).is_some(),
                    "{state} (late {late}) wakes at {at} and nothing changes"
                );
            }
        }
    }
}

#[test]
fn versions_follow_content() {
    assert_eq!(next_version(None, "a"), Some(1));
    assert_eq!(next_version(Some((3, "a")), "a"), None);
    assert_eq!(next_version(Some((3, "a")), "b"), Some(4));
}
