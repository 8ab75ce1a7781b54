//! The agent's contract with the cloud, end to end.

use std::collections::BTreeSet;

use jiff::SignedDuration;
use max300_protocol::message::{
    AckStatus, ControlAction, ControlMsg, Fallback, HeartbeatMsg, PeriodReason, RejectReason,
    ReportMsg, ReportStatus, V1,
};
use max300_protocol::{
    Channel, Clock, Day, DeviceId, Message, MessageId, Mode, PERIOD_SECS, RateKw,
};

use crate::helpers::*;

fn report(m: &Message) -> Option<ReportMsg> {
    match m {
        Message::Report(r) => Some(r.clone()),
        _ => None,
    }
}

fn heartbeat(m: &Message) -> Option<HeartbeatMsg> {
    match m {
        Message::Heartbeat(h) => Some(h.clone()),
        _ => None,
    }
}

/// Reports seen so far, one per seq (resends dropped), keyed by interval start.
fn distinct_reports(seen: &[Message]) -> Vec<ReportMsg> {
    let mut seqs = BTreeSet::new();
    seen.iter()
        .filter_map(report)
        .filter(|r| seqs.insert(r.seq))
        .collect()
}

/// Charge 50 kW, except discharge 30 kW in odd periods: every boundary is a write.
fn alternating(p: u32) -> max300_protocol::Setpoint {
    if p % 2 == 1 {
        setpoint(Mode::Discharge, 30.0)
    } else {
        setpoint(Mode::Charge, 50.0)
    }
}

fn assert_no_period_reported_twice(seen: &[Message]) {
    let reports = distinct_reports(seen);
    let starts: BTreeSet<_> = reports.iter().map(|r| r.interval_start).collect();
    assert_eq!(
        starts.len(),
        reports.len(),
        "a period was reported twice: {reports:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_a_plan_and_reports_each_period_executed() {
    // 600×: one period is 3 s of real time; the first boundary is 2.5 s away. Each report
    // goes out when its period ends.
    let mut app = TestApp::start("2026-11-30T10:05:00Z", 600.0).await;
    app.next("sync", |m| matches!(m, Message::Sync(_)).then_some(()))
        .await;
    let first = app.next("the first report", report).await;
    assert_eq!((first.period, first.status), (21, ReportStatus::Skipped));
    assert_eq!(first.reason, Some(PeriodReason::NoSchedule));
    assert_eq!(first.message_id, None);
    assert!(first.at >= ts("2026-11-30T10:30:00Z"), "{first:?}");
    // Idle, with no plan: nothing moved.
    assert_eq!(first.energy_kwh, Some(0.0));

    let plan_of = alternating;
    let today = plan(&device(), "2026-11-30", 1, plan_of);
    let tomorrow = plan(&device(), "2026-12-01", 1, plan_of);
    let day = Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap();
    let period_at_send = day.period_at(app.clock.now()).unwrap();
    app.send(Message::Schedule(today.clone())).await;
    app.send(Message::Schedule(tomorrow.clone())).await;

    let ack = app
        .next("today's ack", ack_of(today.message_id.clone()))
        .await;
    assert_eq!(ack.status, AckStatus::Accepted);
    assert_eq!(ack.sha256.as_deref(), Some(today.sha256.as_str()));
    let effective = ack.effective_period.unwrap();
    assert!(
        (period_at_send + 1..=period_at_send + 2).contains(&effective),
        "{effective} after period {period_at_send}"
    );
    let ack = app
        .next("tomorrow's ack", ack_of(tomorrow.message_id.clone()))
        .await;
    assert_eq!(
        (ack.status, ack.effective_period),
        (AckStatus::Accepted, Some(1))
    );

    for expected in effective..effective + 2 {
        let r = app
            .next("an executed report", |m| {
                report(m).filter(|r| r.period >= expected)
            })
            .await;
        assert_eq!(r.period, expected);
        assert_eq!(r.status, ReportStatus::Executed, "{r:?}");
        assert_eq!(r.message_id.as_ref(), Some(&today.message_id));
        let planned = plan_of(expected);
        assert_eq!((r.mode, r.rate_kw), (planned.mode(), planned.rate()));
        assert_eq!(r.applied_kw, Some(planned.rate()));
        assert_eq!(r.limited_by, None);
        // What the unit delivered over the period, known once it is over: the battery's own
        // log agrees, and a unit that follows its plan delivers about what was planned.
        let end = r.interval_start + SignedDuration::from_secs(PERIOD_SECS);
        assert!(r.at >= end, "reported at {} before the period ended", r.at);
        let energy = r.energy_kwh.expect("the energy delivered");
        let logged = app.logged_kwh(r.interval_start, end).abs();
        assert!(
            (energy - logged).abs() < 0.25,
            "reported {energy} kWh, the battery's log says {logged} kWh: {r:?}"
        );
        let plan_kwh = planned.rate().kw() * 0.5;
        assert!(
            (energy - plan_kwh).abs() < 0.05 * plan_kwh,
            "{energy} kWh for {plan_kwh} planned"
        );
        assert!(r.soc_pct.is_some());
    }
    let hb = app
        .next("a heartbeat following the plan", |m| {
            heartbeat(m).filter(|h| h.active_message_id.is_some())
        })
        .await;
    assert_eq!(hb.fallback, None);
    assert_eq!(hb.active_message_id, Some(today.message_id.clone()));
    assert_no_period_reported_twice(&app.seen);
    app.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreceipted_entries_are_resent_and_a_receipt_clears_the_outbox() {
    // 60×: the first report (period 21, run at start-up) goes out at the boundary 1 s away;
    // the next one is 30 s of real time later, so no new report interferes.
    let mut app = TestApp::start("2026-11-30T10:29:00Z", 60.0).await;
    let first = app.next("the first report", report).await;
    let hb = app.next("a heartbeat", heartbeat).await;
    assert_eq!(hb.fallback, Some(Fallback::NoSchedule));
    // No receipt: resent after resend_after_s (2 s), same store and seq.
    let again = app
        .next("the report again", |m| {
            report(m).filter(|r| r.seq == first.seq)
        })
        .await;
    assert_eq!(again.interval_start, first.interval_start);
    app.next("a heartbeat with a full outbox", |m| {
        heartbeat(m).filter(|h| h.outbox >= 1)
    })
    .await;

    app.receipt(&first.store_id, vec![first.seq]).await;
    app.next("a heartbeat with an empty outbox", |m| {
        heartbeat(m).filter(|h| h.outbox == 0)
    })
    .await;
    app.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_and_other_devices_plans_do_not_stop_the_agent() {
    let mut app = TestApp::start("2026-11-30T10:05:00Z", 60.0).await;
    app.next("sync", |m| matches!(m, Message::Sync(_)).then_some(()))
        .await;
    app.publish(Channel::Schedule, b"not json at all".to_vec())
        .await;
    app.publish(Channel::Schedule, br#"{"type":"schedule","v":1}"#.to_vec())
        .await;
    let other = DeviceId::parse("max300-0002").unwrap();
    let foreign = plan(&other, "2026-12-01", 1, |_| setpoint(Mode::Charge, 10.0));
    app.send(Message::Schedule(foreign.clone())).await;
    let too_fast = plan(&device(), "2026-12-01", 1, |_| {
        setpoint(Mode::Charge, 151.0)
    });
    app.send(Message::Schedule(too_fast.clone())).await;
    let good = plan(&device(), "2026-12-01", 1, |_| setpoint(Mode::Charge, 10.0));
    app.send(Message::Schedule(good.clone())).await;

    let a = app
        .next("the foreign plan's ack", ack_of(foreign.message_id.clone()))
        .await;
    assert_eq!(
        (a.status, a.reason),
        (AckStatus::Rejected, Some(RejectReason::WrongDevice))
    );
    let a = app
        .next(
            "the too-fast plan's ack",
            ack_of(too_fast.message_id.clone()),
        )
        .await;
    assert_eq!(
        (a.status, a.reason),
        (AckStatus::Rejected, Some(RejectReason::RateAboveMax))
    );
    let a = app
        .next("the good plan's ack", ack_of(good.message_id.clone()))
        .await;
    assert_eq!(
        (a.status, a.effective_period),
        (AckStatus::Accepted, Some(1))
    );

    // A repeated delivery is accepted again with the same effective period.
    app.send(Message::Schedule(good.clone())).await;
    let again = app
        .next("the repeat's ack", ack_of(good.message_id.clone()))
        .await;
    assert_eq!(
        (again.status, again.effective_period),
        (AckStatus::Accepted, Some(1))
    );
    assert_ne!(again.seq, a.seq);

    // A cancel for a plan it does not hold is kept (that plan would be refused), and one
    // for a plan it holds cancels it: both are accepted.
    let control = |id: &str, target: &MessageId| ControlMsg {
        v: V1,
        message_id: MessageId::parse(id).unwrap(),
        device_id: device(),
        action: ControlAction::Cancel,
        target_message_id: target.clone(),
        issued_at: ts("2026-11-30T10:06:00Z"),
        traceparent: None,
    };
    app.send(Message::Control(control("ctl-1", &foreign.message_id)))
        .await;
    let a = app
        .next(
            "the early cancel's ack",
            ack_of(MessageId::parse("ctl-1").unwrap()),
        )
        .await;
    assert_eq!((a.status, a.reason), (AckStatus::Accepted, None));
    app.send(Message::Control(control("ctl-2", &good.message_id)))
        .await;
    let a = app
        .next(
            "the cancel's ack",
            ack_of(MessageId::parse("ctl-2").unwrap()),
        )
        .await;
    assert_eq!(a.status, AckStatus::Accepted);
    app.next("a heartbeat", heartbeat).await;
    app.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_overtakes_its_plan_wins_and_the_unit_never_runs_that_plan() {
    // 600×: a period is 3 s of real time.
    let mut app = TestApp::start("2026-11-30T10:05:00Z", 600.0).await;
    app.next("sync", |m| matches!(m, Message::Sync(_)).then_some(()))
        .await;
    let today = plan(&device(), "2026-11-30", 1, |_| setpoint(Mode::Charge, 50.0));
    // The cloud's cancel is published before the plan it cancels reaches the unit.
    let cancel = ControlMsg {
        v: V1,
        message_id: MessageId::parse("ctl-early").unwrap(),
        device_id: device(),
        action: ControlAction::Cancel,
        target_message_id: today.message_id.clone(),
        issued_at: ts("2026-11-30T10:05:00Z"),
        traceparent: None,
    };
    app.send(Message::Control(cancel.clone())).await;
    let a = app
        .next("the cancel's ack", ack_of(cancel.message_id.clone()))
        .await;
    assert_eq!((a.status, a.reason), (AckStatus::Accepted, None));

    app.send(Message::Schedule(today.clone())).await;
    let a = app
        .next("the plan's ack", ack_of(today.message_id.clone()))
        .await;
    assert_eq!(
        (a.status, a.reason),
        (AckStatus::Rejected, Some(RejectReason::Cancelled))
    );
    assert!(
        a.details.as_deref().unwrap_or("").contains("ctl-early"),
        "{a:?}"
    );
    assert_eq!((a.sha256, a.effective_period), (None, None));

    // The cancel is on disk: after a restart, the plan delivered again is refused again.
    app.restart_agent("2026-11-30T11:05:00Z", 600.0).await;
    app.next("sync", |m| matches!(m, Message::Sync(_)).then_some(()))
        .await;
    app.send(Message::Schedule(today.clone())).await;
    // Not the first ack, which the outbox sends again until a receipt names it.
    let again = app
        .next("the plan's ack after the restart", |m| {
            ack_of(today.message_id.clone())(m).filter(|x| x.seq != a.seq)
        })
        .await;
    assert_eq!(
        (again.status, again.reason),
        (AckStatus::Rejected, Some(RejectReason::Cancelled))
    );
    assert_ne!(again.seq, a.seq);

    // The unit never runs it: periods go by with no plan, idle.
    let r = app
        .next("a report after the restart", |m| {
            report(m).filter(|r| r.interval_start >= ts("2026-11-30T11:00:00Z"))
        })
        .await;
    assert_eq!(
        (r.status, r.reason, r.message_id),
        (ReportStatus::Skipped, Some(PeriodReason::NoSchedule), None)
    );
    let hb = app.next("a heartbeat", heartbeat).await;
    assert_eq!(
        (hb.mode, hb.fallback),
        (Mode::Idle, Some(Fallback::NoSchedule))
    );
    assert_eq!(hb.active_message_id, None);
    app.stop_agent().await;
    let writes = app.write_log();
    assert!(!writes.is_empty());
    assert!(
        writes.iter().all(|w| w.mode == Mode::Idle),
        "the battery ran something: {writes:#?}"
    );
    assert!(
        distinct_reports(&app.seen)
            .iter()
            .all(|r| r.message_id.is_none() && r.status == ReportStatus::Skipped)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reports_missed_periods_once_and_a_clock_behind_falls_back() {
    let mut app = TestApp::start("2026-11-30T10:05:00Z", 60.0).await;
    let today = plan(&device(), "2026-11-30", 1, |_| setpoint(Mode::Charge, 20.0));
    app.next("sync", |m| matches!(m, Message::Sync(_)).then_some(()))
        .await;
    app.send(Message::Schedule(today.clone())).await;
    let ack = app.next("the ack", ack_of(today.message_id.clone())).await;
    assert_eq!(ack.effective_period, Some(22));

    // Down from 10:05 to 12:25: period 21's report was still open (it goes out at start-up,
    // its energy unknown); 10:30, 11:00 and 11:30 were missed; 12:00 runs at once and is
    // reported when it ends, at 12:30. Reports made before the session is up go out with
    // the flush after it connects, so they may arrive after later ones.
    app.restart_agent("2026-11-30T12:25:00Z", 60.0).await;
    let mut after = Vec::new();
    for period in 21..=25 {
        let seen = distinct_reports(&app.seen)
            .into_iter()
            .find(|r| r.period == period);
        let r = match seen {
            Some(r) => r,
            None => {
                app.next("a report after the restart", |m| {
                    report(m).filter(|r| r.period == period)
                })
                .await
            }
        };
        after.push(r);
    }
    let left_open = after.remove(0);
    assert_eq!(
        (left_open.status, left_open.reason, left_open.energy_kwh),
        (ReportStatus::Skipped, Some(PeriodReason::NoSchedule), None)
    );
    assert!(left_open.at >= ts("2026-11-30T12:25:00Z"), "{left_open:?}");
    let current = after.pop().unwrap();
    assert_eq!(current.status, ReportStatus::Executed);
    assert!(current.at >= ts("2026-11-30T12:30:00Z"), "{current:?}");
    // It charged only from 12:25: the unit was idle while the agent was down.
    let energy = current.energy_kwh.expect("the energy delivered");
    let logged = app.logged_kwh(ts("2026-11-30T12:00:00Z"), ts("2026-11-30T12:30:00Z"));
    assert!(
        (energy - logged).abs() < 0.25 && energy < 5.0,
        "reported {energy} kWh, the battery's log says {logged} kWh"
    );
    for r in &after {
        assert_eq!(
            (r.status, r.reason, r.energy_kwh),
            (ReportStatus::Skipped, Some(PeriodReason::AgentDown), None)
        );
        assert_eq!(r.message_id.as_ref(), Some(&today.message_id));
    }
    assert_eq!(current.store_id, ack.store_id);
    assert!(current.seq > ack.seq);

    // A restart within a period that was already run runs that period's plan at once; its
    // report, still open, goes out at start-up with the energy unknown, and only once.
    app.restart_agent("2026-11-30T12:40:00Z", 60.0).await;
    let r = app
        .next("the report left open", |m| {
            report(m).filter(|r| r.period == 26)
        })
        .await;
    assert_eq!((r.status, r.energy_kwh), (ReportStatus::Executed, None));
    let hb = app
        .next("a heartbeat running the plan", |m| {
            heartbeat(m).filter(|h| h.mode == Mode::Charge)
        })
        .await;
    assert_eq!(hb.rate_kw, RateKw::from_watts(20_000));
    assert_eq!(hb.fallback, None);

    // A clock behind the last stored instant: idle, clock_unsynced, nothing reported.
    app.restart_agent("2026-11-30T11:00:00Z", 60.0).await;
    app.next("an unsynced heartbeat", |m| {
        heartbeat(m).filter(|h| h.fallback == Some(Fallback::ClockUnsynced))
    })
    .await;
    let hb = app.next("another heartbeat", heartbeat).await;
    assert_eq!(hb.fallback, Some(Fallback::ClockUnsynced));
    assert_eq!(hb.mode, Mode::Idle);
    assert_no_period_reported_twice(&app.seen);
    app.stop_agent().await;
}

#[tokio::test]
async fn start_up_failures_are_returned_with_clear_messages() {
    use std::sync::Arc;

    use max300_protocol::SystemClock;
    use tokio_util::sync::CancellationToken;

    let file = tempfile::NamedTempFile::new().unwrap();
    let base = format!(
        "device_id = \"{DEVICE}\"\ndata_dir = {:?}\n",
        file.path().join("sub").display().to_string()
    );
    let config = max300_agent::AgentConfig::from_toml(
        max300_agent::AgentConfig::DEFAULT_TOML,
        Some(&base),
        &[],
    )
    .unwrap();
    let clock = Arc::new(SystemClock);
    let err = max300_sim::run_agent(config.clone(), clock.clone(), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("data directory"), "{err}");

    let mut bad_url = config.clone();
    bad_url.mqtt = "http://127.0.0.1:1883".into();
    let err = max300_sim::run_agent(bad_url, clock.clone(), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("mqtt:"), "{err}");

    // The agent on its own has no simulated battery (that is max300-sim's): it says so
    // rather than start without a controller.
    let err = max300_agent::run(config, clock, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("battery = \"sim\": this build has no simulated battery"),
        "{err}"
    );
}

/// Polls `ready` every 10 ms until it holds; `false` if `deadline` passes first.
async fn poll_until(deadline: std::time::Instant, mut ready: impl FnMut() -> bool) -> bool {
    loop {
        if ready() {
            return true;
        }
        if max300_protocol::clock::monotonic() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slow_to_commit_does_not_hold_up_the_next_periods_setpoint() {
    // 600×: a period is 3 s of real time. A slow SD card is played by holding the store's
    // write lock across a boundary: the report of the period that ended cannot be committed
    // until it is released, but the unit must run the new period's setpoint on time. Every
    // boundary changes the setpoint, so the write is in the battery's log.
    let plan_of = alternating;
    let mut app = TestApp::start("2026-11-30T10:05:00Z", 600.0).await;
    follow(&mut app, plan_of).await;
    // Everything receipted, so the outbox is empty and no resend writes while the lock is held; the
    // next period is open in the store.
    let first = app
        .next("an executed report", |m| {
            report(m).filter(|r| r.status == ReportStatus::Executed)
        })
        .await;
    let seqs: BTreeSet<u64> = app
        .seen
        .iter()
        .filter_map(|m| match m {
            Message::Ack(a) => Some(a.seq),
            Message::Report(r) => Some(r.seq),
            _ => None,
        })
        .collect();
    app.receipt(&first.store_id, seqs.into_iter().collect())
        .await;
    let db = rusqlite::Connection::open(app.dir.path().join("agent.sqlite")).unwrap();
    let count = |sql: &str| db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    let settled = poll_until(max300_protocol::clock::monotonic() + WAIT, || {
        count("SELECT count(*) FROM outbox") == 0
            && count("SELECT count(*) FROM reports WHERE open = 1") == 1
    })
    .await;
    assert!(settled, "the outbox never emptied after the receipts");

    let period = SignedDuration::from_secs(PERIOD_SECS);
    let running = first.interval_start + period;
    let boundary = running + period;
    let next = plan_of(first.period + 2);
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert!(
        app.clock.now() < boundary,
        "the lock was taken after the boundary it is meant to span"
    );
    // Well within the agent's busy timeout (5 s), so its commit waits rather than fails.
    let deadline = max300_protocol::clock::monotonic()
        + app.clock.real_until(boundary)
        + std::time::Duration::from_secs(3);
    let applied = poll_until(deadline, || {
        app.write_log()
            .iter()
            .any(|w| !w.revert && !w.start && w.at >= boundary && w.setpoint() == Some(next))
    })
    .await;
    db.execute_batch("ROLLBACK").unwrap();
    assert!(
        applied,
        "the setpoint of the period from {boundary} was not written while the store was slow \
         to commit; battery log: {:#?}",
        app.write_log()
    );

    // Nothing is lost once the store commits again: the period that ended is reported, and
    // the next one runs and is reported as executed.
    let closed = app
        .next("the report of the period that ended", |m| {
            report(m).filter(|r| r.interval_start == running)
        })
        .await;
    assert_eq!(closed.status, ReportStatus::Executed, "{closed:?}");
    assert!(closed.energy_kwh.is_some(), "{closed:?}");
    let after = app
        .next("the report of the period after", |m| {
            report(m).filter(|r| r.interval_start == boundary)
        })
        .await;
    assert_eq!(after.status, ReportStatus::Executed, "{after:?}");
    assert_eq!(after.applied_kw, Some(next.rate()));
    assert_no_period_reported_twice(&app.seen);
    app.stop_agent().await;
}
