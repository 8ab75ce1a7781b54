//! The `CommandStore` contract. Each rule is a function over any store; the tests run every
//! rule against SQLite and, with the `aws` feature, against DynamoDB on moto's server.

use std::sync::Arc;

use jiff::Timestamp;
use max300_cloud::lifecycle::Subject;
use max300_cloud::store::{
    Cancel, CommandStore, Due, IngestionCounts, Insert, NewCommand, PlanFold, Recorded,
};
use max300_cloud::{CommandState, Ledger, PeriodStatus, Policy, SqliteStore};
use max300_protocol::message::{AckMsg, AckStatus, Fallback, ReportMsg, ReportStatus, V1};
use max300_protocol::{DeviceId, MessageId, Mode, RateKw, Setpoint, StoreId, TraceParent};

use crate::{day, eve, schedule};

fn ledger(store: Arc<dyn CommandStore>) -> Ledger {
    Ledger::new(store, Policy::default())
}

fn sqlite() -> (tempfile::TempDir, Arc<dyn CommandStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("cloud.sqlite")).unwrap();
    (dir, Arc::new(store))
}

/// A DynamoDB store on its own moto server, with the table created as in production.
#[cfg(feature = "aws")]
async fn dynamodb() -> (crate::moto::Moto, Arc<dyn CommandStore>) {
    let moto = crate::moto::Moto::start();
    let store = max300_cloud::store::DynamoStore::from_client(moto.dynamodb(), "max300");
    store.create_table().await.unwrap();
    (moto, Arc::new(store))
}

async fn create(l: &Ledger, device: &str, kw: u32) -> (MessageId, Insert) {
    let id = MessageId::generate(eve());
    let insert = l
        .insert_commands(
            &[NewCommand {
                message_id: id.clone(),
                schedule: schedule(device, kw),
                traceparent: None,
            }],
            eve(),
            None,
        )
        .await
        .unwrap()
        .remove(0);
    (id, insert)
}

/// Publishes (as far as the store knows) what these ids name.
async fn mark_sent(l: &Ledger, ids: &[MessageId], at: Timestamp) {
    let loaded = l.publishable(ids, at).await.unwrap();
    assert_eq!(loaded.len(), ids.len(), "all publishable");
    l.published(loaded, at).await.unwrap();
}

/// Commands never published.
async fn unsent(store: &dyn CommandStore) -> Vec<MessageId> {
    let mut ids: Vec<MessageId> = store
        .commands(None, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.state == CommandState::Created)
        .map(|c| c.message_id)
        .collect();
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    ids
}

fn ack(id: &MessageId, device: &str, seq: u64, effective: u32) -> AckMsg {
    AckMsg {
        v: V1,
        store_id: StoreId::parse("s1").unwrap(),
        seq,
        message_id: id.clone(),
        device_id: DeviceId::parse(device).unwrap(),
        status: AckStatus::Accepted,
        reason: None,
        details: None,
        sha256: Some("abc".into()),
        effective_period: Some(effective),
        at: eve(),
        traceparent: None,
    }
}

fn report(id: Option<&MessageId>, device: &str, period: u32) -> ReportMsg {
    ReportMsg {
        v: V1,
        store_id: StoreId::parse("s1").unwrap(),
        seq: 100 + u64::from(period),
        message_id: id.cloned(),
        device_id: DeviceId::parse(device).unwrap(),
        period,
        interval_start: day().period_start(period),
        mode: Mode::Idle,
        rate_kw: RateKw::ZERO,
        status: ReportStatus::Executed,
        applied_kw: Some(RateKw::ZERO),
        limited_by: None,
        reason: None,
        would_kw: None,
        soc_pct: Some(50.0),
        energy_kwh: Some(0.0),
        error: None,
        at: day().period_start(period),
        traceparent: None,
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn create_traced(l: &Ledger, device: &str) -> MessageId {
    let id = MessageId::generate(eve());
    l.insert_commands(
        &[NewCommand {
            message_id: id.clone(),
            schedule: schedule(device, 10),
            traceparent: TraceParent::parse(TRACEPARENT).ok(),
        }],
        eve(),
        None,
    )
    .await
    .unwrap();
    id
}

async fn keeps_each_commands_trace_context(l: &Ledger) {
    let store = &**l.store();
    let traced = create_traced(l, "d1").await;
    let (untraced, _) = create(l, "d2", 10).await;
    let tp = TraceParent::parse(TRACEPARENT).unwrap();
    assert_eq!(
        store.command_traceparent(&traced).await.unwrap(),
        Some(tp.clone())
    );
    assert_eq!(
        store
            .schedule_message(&traced)
            .await
            .unwrap()
            .unwrap()
            .traceparent,
        Some(tp)
    );
    assert_eq!(store.command_traceparent(&untraced).await.unwrap(), None);
    assert_eq!(
        store
            .schedule_message(&untraced)
            .await
            .unwrap()
            .unwrap()
            .traceparent,
        None
    );
    let unknown = MessageId::parse("nope").unwrap();
    assert_eq!(store.command_traceparent(&unknown).await.unwrap(), None);
}

async fn state(store: &dyn CommandStore, id: &MessageId) -> CommandState {
    store.command(id).await.unwrap().unwrap().summary.state
}

async fn versions_by_content(l: &Ledger) {
    let (_, first) = create(l, "d1", 10).await;
    assert!(matches!(first, Insert::Created { version: 1, .. }));
    let (_, same) = create(l, "d1", 10).await;
    assert!(
        matches!(same, Insert::Unchanged { version: 1, .. }),
        "{same:?}"
    );
    let (_, changed) = create(l, "d1", 20).await;
    assert!(
        matches!(changed, Insert::Created { version: 2, .. }),
        "{changed:?}"
    );
    let (_, other) = create(l, "d2", 20).await;
    assert!(matches!(other, Insert::Created { version: 1, .. }));
}

async fn lists_commands_by_device_by_date_or_all(l: &Ledger) {
    let store = &**l.store();
    let (a1, _) = create(l, "d1", 10).await;
    let (a2, _) = create(l, "d1", 20).await;
    let (b1, _) = create(l, "d2", 10).await;
    let ids = |list: Vec<max300_cloud::store::CommandSummary>| {
        let mut ids: Vec<MessageId> = list.into_iter().map(|c| c.message_id).collect();
        ids.sort_by(|x, y| x.as_str().cmp(y.as_str()));
        ids
    };
    let mut all = vec![a1.clone(), a2.clone(), b1];
    all.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    // Every command once, and nothing that is not a command.
    assert_eq!(ids(store.commands(None, None).await.unwrap()), all);
    let date = crate::day().date();
    assert_eq!(ids(store.commands(None, Some(date)).await.unwrap()), all);
    let d1 = DeviceId::parse("d1").unwrap();
    let mut mine = vec![a1, a2];
    mine.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    assert_eq!(ids(store.commands(Some(&d1), None).await.unwrap()), mine);
    let other_day = date.tomorrow().unwrap();
    assert_eq!(store.commands(None, Some(other_day)).await.unwrap(), []);
}

async fn rebuilds_the_published_message(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    let msg = store.schedule_message(&id).await.unwrap().unwrap();
    assert_eq!(msg.to_schedule().unwrap(), schedule("d1", 10));
    assert_eq!(msg.version, 1);
}

async fn walks_the_lifecycle_and_applies_each_message_once(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    assert_eq!(state(store, &id).await, CommandState::Created);
    assert_eq!(unsent(store).await, vec![id.clone()]);
    mark_sent(l, std::slice::from_ref(&id), eve()).await;
    assert_eq!(state(store, &id).await, CommandState::Sent);
    assert!(unsent(store).await.is_empty());

    let a = ack(&id, "d1", 1, 1);
    assert_eq!(l.record_ack(&a, eve()).await.unwrap(), Recorded::Applied);
    assert_eq!(l.record_ack(&a, eve()).await.unwrap(), Recorded::Duplicate);
    assert_eq!(state(store, &id).await, CommandState::Acknowledged);

    for p in 1..=48 {
        let r = report(Some(&id), "d1", p);
        assert_eq!(
            l.record_report(&r, day().end()).await.unwrap(),
            Recorded::Applied
        );
        assert_eq!(
            l.record_report(&r, day().end()).await.unwrap(),
            Recorded::Duplicate
        );
    }
    let detail = store.command(&id).await.unwrap().unwrap();
    assert_eq!(detail.summary.state, CommandState::Completed);
    assert!(
        detail
            .periods
            .iter()
            .all(|p| p.status == PeriodStatus::Executed)
    );
    let states: Vec<_> = detail.history.iter().map(|h| h.state).collect();
    assert_eq!(
        states,
        [
            CommandState::Created,
            CommandState::Sent,
            CommandState::Acknowledged,
            CommandState::Completed
        ]
    );
}

async fn a_report_implies_the_ack(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    mark_sent(l, std::slice::from_ref(&id), eve()).await;
    l.record_report(&report(Some(&id), "d1", 1), day().end())
        .await
        .unwrap();
    assert_eq!(state(store, &id).await, CommandState::Acknowledged);
}

/// Item 7: a device cannot grow the store without limit. An ack about no command of ours is
/// not kept; a report is kept only for a period of a day the device has a command for.
async fn messages_about_unknown_commands_grow_nothing(l: &Ledger) {
    let store = &**l.store();
    let stranger = MessageId::generate(eve());
    let a = ack(&stranger, "d9", 1, 1);
    for _ in 0..2 {
        assert_eq!(
            l.record_ack(&a, eve()).await.unwrap(),
            Recorded::UnknownCommand
        );
    }
    let r = report(None, "d9", 1);
    let refused = l.record_report(&r, day().end()).await.unwrap();
    assert!(
        matches!(&refused, Recorded::Refused(why) if why.contains("not in a day d9 has a command for")),
        "{refused:?}"
    );
    let d9 = DeviceId::parse("d9").unwrap();
    assert!(
        store
            .reports(&d9, day().start(), day().end())
            .await
            .unwrap()
            .is_empty()
    );
    // Once d9 has a command for the day, its reports of that day are kept (once), even one
    // naming no command, or another.
    create(l, "d9", 10).await;
    assert_eq!(
        l.record_report(&r, day().end()).await.unwrap(),
        Recorded::Applied
    );
    assert_eq!(
        l.record_report(&r, day().end()).await.unwrap(),
        Recorded::Duplicate
    );
    let named = report(Some(&stranger), "d9", 2);
    assert_eq!(
        l.record_report(&named, day().end()).await.unwrap(),
        Recorded::UnknownCommand
    );
    // Off its grid, long ago or not yet started: refused.
    let mut off = report(None, "d9", 3);
    off.interval_start += jiff::SignedDuration::from_secs(1);
    let mut early = report(None, "d9", 40);
    early.at = day().start();
    for (r, at) in [
        (off, day().end()),
        (
            report(None, "d9", 4),
            day().end() + jiff::SignedDuration::from_hours(24 * 401),
        ),
        (early, day().start()),
    ] {
        let outcome = l.record_report(&r, at).await.unwrap();
        assert!(matches!(outcome, Recorded::Refused(_)), "{outcome:?}");
    }
    assert_eq!(
        store
            .reports(&d9, day().start(), day().end())
            .await
            .unwrap()
            .len(),
        2
    );
}

/// Item 4: an ack cannot make the store do unbounded work. An effective period outside the
/// plan (or none, when accepted) is refused: nothing changes, and a valid ack still applies.
async fn a_hostile_ack_changes_nothing(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    mark_sent(l, std::slice::from_ref(&id), eve()).await;
    let before = store.command(&id).await.unwrap().unwrap();
    for effective in [u32::MAX, 0, 100] {
        let outcome = l
            .record_ack(&ack(&id, "d1", 1, effective), eve())
            .await
            .unwrap();
        assert!(
            matches!(&outcome, Recorded::Refused(why) if why.starts_with("effective_period")),
            "{effective}: {outcome:?}"
        );
        assert_eq!(store.command(&id).await.unwrap().unwrap(), before);
    }
    let mut none = ack(&id, "d1", 1, 1);
    none.effective_period = None;
    assert!(matches!(
        l.record_ack(&none, eve()).await.unwrap(),
        Recorded::Refused(_)
    ));
    assert_eq!(
        l.record_ack(&ack(&id, "d1", 1, 1), eve()).await.unwrap(),
        Recorded::Applied,
        "the refusals kept nothing that makes the real ack a duplicate"
    );
}

async fn a_newer_version_supersedes_from_its_effective_period(l: &Ledger) {
    let store = &**l.store();
    let (v1, _) = create(l, "d1", 10).await;
    l.record_ack(&ack(&v1, "d1", 1, 1), eve()).await.unwrap();
    for p in 1..=9 {
        l.record_report(&report(Some(&v1), "d1", p), day().end())
            .await
            .unwrap();
    }
    let (v2, _) = create(l, "d1", 20).await;
    l.record_ack(&ack(&v2, "d1", 2, 10), eve()).await.unwrap();
    let old = store.command(&v1).await.unwrap().unwrap();
    let new = store.command(&v2).await.unwrap().unwrap();
    assert_eq!(old.summary.state, CommandState::Superseded);
    assert_eq!(new.summary.state, CommandState::Acknowledged);
    assert_eq!(new.effective_period, Some(10));
    for p in &old.periods {
        let want = if p.period < 10 {
            PeriodStatus::Executed
        } else {
            PeriodStatus::Skipped
        };
        assert_eq!(p.status, want, "v1 period {}", p.period);
    }
    for p in &new.periods {
        let want = if p.period < 10 {
            PeriodStatus::Skipped
        } else {
            PeriodStatus::Pending
        };
        assert_eq!(p.status, want, "v2 period {}", p.period);
    }
    let current = store
        .current_commands(&DeviceId::parse("d1").unwrap(), day().date())
        .await
        .unwrap();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].message_id, v2);
}

async fn registers_devices_and_records_heartbeats(l: &Ledger) {
    let store = &**l.store();
    let d = DeviceId::parse("d1").unwrap();
    store.register_device(&d, None, eve()).await.unwrap();
    store
        .register_device(&d, Some(RateKw::from_watts(90_000)), eve())
        .await
        .unwrap();
    store.register_device(&d, None, eve()).await.unwrap();
    let rec = store.device(&d).await.unwrap().unwrap();
    assert_eq!(
        rec.max_rate_kw,
        Some(RateKw::from_watts(90_000)),
        "a later plain registration keeps the limit"
    );
    let hb: max300_protocol::message::HeartbeatMsg = serde_json::from_str(
        r#"{"type":"heartbeat","v":1,"device_id":"d1","at":"2026-11-29T16:00:00Z","uptime_s":5,
            "agent_version":"t","mode":"charge","rate_kw":12.5,"soc_pct":40.0,"fallback":"no_schedule","outbox":3}"#,
    )
    .unwrap();
    let seen: Timestamp = "2026-11-29T16:00:01Z".parse().unwrap();
    store.record_heartbeats(&[hb], seen).await.unwrap();
    let rec = store.device(&d).await.unwrap().unwrap();
    assert_eq!(rec.last_seen, Some(seen));
    assert_eq!(rec.rate_kw, Some(RateKw::from_watts(12_500)));
    assert_eq!(rec.fallback, Some(Fallback::NoSchedule));
    assert_eq!(store.devices().await.unwrap().len(), 1);
    // What an ingestion reads of the fleet; a device never heard from has no SoC.
    store
        .register_device(&DeviceId::parse("d0").unwrap(), None, eve())
        .await
        .unwrap();
    let limits = store.device_limits().await.unwrap();
    let limits: Vec<(DeviceId, Option<RateKw>)> = limits.devices().map(|(d, r)| (d, *r)).collect();
    assert_eq!(
        limits,
        [
            (DeviceId::parse("d0").unwrap(), None),
            (d.clone(), Some(RateKw::from_watts(90_000))),
        ]
    );
    let socs = store.device_socs().await.unwrap();
    let socs: Vec<(DeviceId, f64)> = socs.devices().map(|(d, s)| (d, *s)).collect();
    assert_eq!(socs, [(d, 40.0)], "only a device heard from has a SoC");
}

async fn reports_before_the_ack_still_complete_the_command(l: &Ledger) {
    let store = &**l.store();
    let (v1, _) = create(l, "d1", 10).await;
    l.record_ack(&ack(&v1, "d1", 1, 1), eve()).await.unwrap();
    let (v2, _) = create(l, "d1", 20).await;
    for p in 5..=48 {
        l.record_report(&report(Some(&v2), "d1", p), day().end())
            .await
            .unwrap();
    }
    assert_eq!(state(store, &v2).await, CommandState::Acknowledged);
    l.record_ack(&ack(&v2, "d1", 2, 5), eve()).await.unwrap();
    assert_eq!(state(store, &v2).await, CommandState::Completed);
}

async fn another_devices_ack_cannot_take_the_owners_place(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    mark_sent(l, std::slice::from_ref(&id), eve()).await;
    let spoof = ack(&id, "d2", 1, 1);
    assert_eq!(
        l.record_ack(&spoof, eve()).await.unwrap(),
        Recorded::UnknownCommand
    );
    assert_eq!(state(store, &id).await, CommandState::Sent);
    assert_eq!(
        l.record_ack(&ack(&id, "d1", 1, 1), eve()).await.unwrap(),
        Recorded::Applied
    );
    assert_eq!(state(store, &id).await, CommandState::Acknowledged);
}

async fn sync_offers_the_last_live_version(l: &Ledger) {
    let store = &**l.store();
    let (v1, _) = create(l, "d1", 10).await;
    let (v2, _) = create(l, "d1", 20).await;
    let mut rejected = ack(&v2, "d1", 1, 1);
    rejected.status = AckStatus::Rejected;
    l.record_ack(&rejected, eve()).await.unwrap();
    let current = store
        .current_commands(&DeviceId::parse("d1").unwrap(), day().date())
        .await
        .unwrap();
    assert_eq!(
        current.iter().map(|c| &c.message_id).collect::<Vec<_>>(),
        [&v1]
    );
}

async fn the_clock_flags_late_and_ends_what_was_never_acked(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    mark_sent(l, std::slice::from_ref(&id), eve()).await;
    assert!(l.sweep(eve()).await.unwrap().swept.is_empty());
    let swept = l.sweep(day().start()).await.unwrap().swept;
    assert_eq!(swept.len(), 1);
    assert!(swept[0].late);
    assert_eq!(swept[0].state, None, "late is a flag, not a state");
    let detail = store.command(&id).await.unwrap().unwrap();
    assert!(detail.summary.late);
    assert_eq!(detail.summary.state, CommandState::Sent);
    let swept = l.sweep(day().end()).await.unwrap().swept;
    assert_eq!(swept[0].state, Some(CommandState::Expired));
    assert!(
        l.sweep(day().end()).await.unwrap().swept.is_empty(),
        "each change once"
    );
    // Late news still counts: a report moves it on.
    l.record_report(&report(Some(&id), "d1", 1), day().end())
        .await
        .unwrap();
    assert_eq!(state(store, &id).await, CommandState::Acknowledged);
}

async fn periods_left_unreported_end_incomplete(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    l.record_ack(&ack(&id, "d1", 1, 1), eve()).await.unwrap();
    for p in 1..=40 {
        l.record_report(&report(Some(&id), "d1", p), day().end())
            .await
            .unwrap();
    }
    let after_end = day().end() + jiff::SignedDuration::from_mins(59);
    assert!(l.sweep(after_end).await.unwrap().swept.is_empty());
    let hour_after = day().end() + jiff::SignedDuration::from_hours(1);
    let swept = l.sweep(hour_after).await.unwrap().swept;
    assert_eq!(swept[0].state, Some(CommandState::Incomplete));
    let detail = store.command(&id).await.unwrap().unwrap();
    assert_eq!(
        detail
            .periods
            .iter()
            .filter(|p| p.status == PeriodStatus::Unreported)
            .count(),
        8
    );
    // One late report does not flip it back; the last one completes it.
    l.record_report(&report(Some(&id), "d1", 41), hour_after)
        .await
        .unwrap();
    assert!(l.sweep(hour_after).await.unwrap().swept.is_empty());
    assert_eq!(state(store, &id).await, CommandState::Incomplete);
    for p in 42..=48 {
        l.record_report(&report(Some(&id), "d1", p), hour_after)
            .await
            .unwrap();
    }
    assert_eq!(state(store, &id).await, CommandState::Completed);
}

async fn what_is_due_comes_earliest_first_as_many_as_asked(l: &Ledger) {
    let store = &**l.store();
    let p = *l.policy();
    // Sent a second apart: each waits for its ack until a second after the one before.
    let mut ids = Vec::new();
    for (i, device) in ["d1", "d2", "d3"].into_iter().enumerate() {
        let (id, _) = create(l, device, 10).await;
        let sent = eve() + jiff::SignedDuration::from_secs(i as i64);
        mark_sent(l, std::slice::from_ref(&id), sent).await;
        ids.push(id);
    }
    let all_due = eve() + jiff::SignedDuration::from_secs(2) + p.resend_delay(1);
    let due = |first| async move {
        let due = store.due(all_due, first).await.unwrap();
        let ids: Vec<MessageId> = due
            .into_iter()
            .map(|d| match d {
                Due::Command { command, .. } => command.message_id,
                other => panic!("{other:?}"),
            })
            .collect();
        ids
    };
    assert_eq!(due(10).await, ids);
    assert_eq!(due(2).await, ids[..2]);
}

/// What a sweep at `at` publishes again.
async fn resent_at(l: &Ledger, at: Timestamp) -> Vec<MessageId> {
    let resend = l.sweep(at).await.unwrap().resend;
    resend.iter().map(|s| s.message_id().clone()).collect()
}

async fn resends_back_off_and_stop_at_an_ack_or_a_newer_version(l: &Ledger) {
    let store = &**l.store();
    let p = *l.policy();
    let (v1, _) = create(l, "d1", 10).await;
    // Never published (the ingestion's publish failed): tried again, as a sent one would be.
    let first = eve() + p.resend_delay(1);
    assert!(
        resent_at(l, first - jiff::SignedDuration::from_secs(1))
            .await
            .is_empty()
    );
    assert_eq!(resent_at(l, first).await, std::slice::from_ref(&v1));
    // That try failed too: the next one backs off further.
    let second = first + p.resend_delay(2);
    assert!(
        resent_at(l, second - jiff::SignedDuration::from_secs(1))
            .await
            .is_empty()
    );
    assert_eq!(resent_at(l, second).await, std::slice::from_ref(&v1));
    assert_eq!(state(store, &v1).await, CommandState::Created);
    mark_sent(l, std::slice::from_ref(&v1), second).await;
    assert_eq!(state(store, &v1).await, CommandState::Sent);
    let detail = store.command(&v1).await.unwrap().unwrap();
    assert_eq!((detail.publishes, detail.sends.len()), (1, 1));
    // A newer version takes over: the older one is not sent again.
    let (v2, _) = create(l, "d1", 20).await;
    mark_sent(l, std::slice::from_ref(&v2), second).await;
    let later = second + p.resend_delay(3);
    assert_eq!(resent_at(l, later).await, std::slice::from_ref(&v2));
    l.record_ack(&ack(&v2, "d1", 1, 1), later).await.unwrap();
    assert!(
        resent_at(l, later + jiff::SignedDuration::from_hours(1))
            .await
            .is_empty()
    );
}

async fn a_cancel_ends_the_command_and_is_delivered_like_one(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    l.record_ack(&ack(&id, "d1", 1, 1), eve()).await.unwrap();
    let control_id = MessageId::generate(eve());
    let Cancel::Cancelled(msg) = l.cancel(&id, control_id.clone(), eve()).await.unwrap() else {
        panic!("expected a cancel");
    };
    assert_eq!(msg.target_message_id, id);
    assert_eq!(state(store, &id).await, CommandState::Cancelled);
    assert_eq!(store.control_message(&control_id).await.unwrap(), Some(msg));
    // The cancelled command is never published again.
    assert!(
        l.publishable(std::slice::from_ref(&id), eve())
            .await
            .unwrap()
            .is_empty()
    );
    mark_sent(l, std::slice::from_ref(&control_id), eve()).await;
    let retry = eve() + l.policy().resend_delay(1);
    assert_eq!(resent_at(l, retry).await, std::slice::from_ref(&control_id));
    let control_ack = ack(&control_id, "d1", 2, 1);
    assert_eq!(
        l.record_ack(&control_ack, eve()).await.unwrap(),
        Recorded::Applied
    );
    let Some(Some(Subject::Control(control))) = store
        .load(std::slice::from_ref(&control_id))
        .await
        .unwrap()
        .pop()
    else {
        panic!("the control is kept");
    };
    assert_eq!(control.state, CommandState::Acknowledged);
    assert!(
        resent_at(l, retry + jiff::SignedDuration::from_hours(1))
            .await
            .is_empty()
    );
    assert_eq!(
        l.cancel(&id, MessageId::generate(eve()), eve())
            .await
            .unwrap(),
        Cancel::AlreadyEnded(CommandState::Cancelled)
    );
    assert_eq!(
        l.cancel(
            &MessageId::generate(eve()),
            MessageId::generate(eve()),
            eve()
        )
        .await
        .unwrap(),
        Cancel::NotFound
    );
}

async fn an_unfinished_ingestion_is_listed_for_replay(l: &Ledger) {
    let store = &**l.store();
    let date = day().date();
    let id = store
        .begin_ingestion(date, "fetch", "raw/k.json", eve())
        .await
        .unwrap();
    assert!(!store.ingested(date).await.unwrap());
    let open = store.interrupted_ingestions().await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!((open[0].id, open[0].audit_key.as_str()), (id, "raw/k.json"));
    assert!(!open[0].overtaken);
    store
        .finish_ingestion(id, Ok(IngestionCounts::default()), eve())
        .await
        .unwrap();
    assert!(store.interrupted_ingestions().await.unwrap().is_empty());
    assert!(store.ingested(date).await.unwrap());
    let posted = store
        .begin_ingestion(date.tomorrow().unwrap(), "post", "raw/p.json", eve())
        .await
        .unwrap();
    store
        .finish_ingestion(posted, Ok(IngestionCounts::default()), eve())
        .await
        .unwrap();
    assert!(
        !store.ingested(date.tomorrow().unwrap()).await.unwrap(),
        "a POST is not the daily fetch"
    );
}

/// Item 2: a run that failed is closed, not replayed; one left open by a crash is marked
/// overtaken once a later run of its date finished.
async fn a_failed_run_is_closed_and_an_overtaken_one_says_so(l: &Ledger) {
    let store = &**l.store();
    let date = day().date().tomorrow().unwrap();
    let failed = store
        .begin_ingestion(date, "fetch", "raw/a.json", eve())
        .await
        .unwrap();
    store
        .finish_ingestion(failed, Err("audit store: disk full".into()), eve())
        .await
        .unwrap();
    assert!(store.interrupted_ingestions().await.unwrap().is_empty());
    assert!(
        !store.ingested(date).await.unwrap(),
        "a failed fetch is not one"
    );
    let crashed = store
        .begin_ingestion(date, "fetch", "raw/b.json", eve())
        .await
        .unwrap();
    let later = store
        .begin_ingestion(date, "post", "raw/c.json", eve())
        .await
        .unwrap();
    let open = store.interrupted_ingestions().await.unwrap();
    assert_eq!(
        open.iter().map(|r| (r.id, r.overtaken)).collect::<Vec<_>>(),
        [(crashed, false), (later, false)]
    );
    store
        .finish_ingestion(later, Ok(IngestionCounts::default()), eve())
        .await
        .unwrap();
    let open = store.interrupted_ingestions().await.unwrap();
    assert_eq!(
        open.iter().map(|r| (r.id, r.overtaken)).collect::<Vec<_>>(),
        [(crashed, true)]
    );
}

async fn lists_a_devices_reports_for_a_day_once_each(l: &Ledger) {
    let store = &**l.store();
    create(l, "d1", 10).await;
    create(l, "d2", 10).await;
    let stranger = MessageId::generate(eve());
    for p in [3, 1, 2, 2] {
        l.record_report(&report(Some(&stranger), "d1", p), day().end())
            .await
            .unwrap();
    }
    l.record_report(&report(None, "d2", 1), day().end())
        .await
        .unwrap();
    let d1 = DeviceId::parse("d1").unwrap();
    let listed = store
        .reports(&d1, day().start(), day().end())
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|r| r.period).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let none = store
        .reports(&d1, day().end(), day().next().unwrap().end())
        .await
        .unwrap();
    assert!(none.is_empty());
    // Per period: d1 reported 1, 2 and 3 (2 twice, kept once), d2 only 1. Only registered
    // devices report (the feedback consumer drops the rest), so both are.
    let d2 = DeviceId::parse("d2").unwrap();
    store
        .register_devices(&[d1.clone(), d2], day().end())
        .await
        .unwrap();
    let counts = store
        .report_counts(day().period_start(2), day().end())
        .await
        .unwrap();
    assert_eq!(
        counts,
        [(day().period_start(2), 1), (day().period_start(3), 1)]
    );
    let first = store
        .report_counts(day().start(), day().period_start(2))
        .await
        .unwrap();
    assert_eq!(first, [(day().start(), 2)]);
}

async fn the_fleet_rows_count_conformance_and_states(l: &Ledger) {
    let store = &**l.store();
    let date = day().date();
    let tomorrow = date.tomorrow().unwrap();
    for d in ["d1", "d2"] {
        store
            .register_device(&DeviceId::parse(d).unwrap(), None, eve())
            .await
            .unwrap();
    }
    let (v1, _) = create(l, "d1", 10).await;
    let (v2, _) = create(l, "d1", 20).await;
    mark_sent(l, &[v1.clone(), v2.clone()], eve()).await;
    l.record_ack(&ack(&v2, "d1", 1, 1), eve()).await.unwrap();
    // Period 1 plans 20 kW and ran at 0 (not as planned); period 2 plans idle and ran idle.
    for period in [1, 2] {
        l.record_report(&report(Some(&v2), "d1", period), day().end())
            .await
            .unwrap();
    }
    let ended_by = day().period_start(3);
    let rows = store.fleet(date, tomorrow, ended_by).await.unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.device.device_id.as_str()).collect();
    assert_eq!(ids, ["d1", "d2"]);
    let d1 = &rows[0];
    let today = d1.today.as_ref().unwrap();
    assert_eq!((today.message_id.clone(), today.version), (v2.clone(), 2));
    assert_eq!(today.state, CommandState::Acknowledged);
    assert_eq!(d1.tomorrow, None);
    assert_eq!((d1.due, d1.as_planned), (3, 1), "periods 1-3 have started");
    assert_eq!((rows[1].today.clone(), rows[1].due), (None, 0));

    let mut counts = store.command_counts().await.unwrap();
    counts.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(
        counts,
        [
            (CommandState::Acknowledged, 1),
            (CommandState::Superseded, 1)
        ]
    );
}

async fn keeps_every_send_and_a_warning_with_the_command(l: &Ledger) {
    let store = &**l.store();
    let (id, _) = create(l, "d1", 10).await;
    let later: Timestamp = "2026-11-29T16:05:00Z".parse().unwrap();
    mark_sent(l, std::slice::from_ref(&id), eve()).await;
    mark_sent(l, std::slice::from_ref(&id), later).await;
    store
        .record_warnings(&[(id.clone(), "too full".into())])
        .await
        .unwrap();
    let detail = store.command(&id).await.unwrap().unwrap();
    assert_eq!(detail.sends, [eve(), later]);
    assert_eq!(detail.publishes, 2);
    assert_eq!(detail.warning.as_deref(), Some("too full"));

    // What is planned from a period on, for the fleet's feasibility estimate: each device's
    // newest live version, by device. d2's newest is cancelled, so its older one stands; d3
    // has none live.
    create(l, "d2", 20).await;
    let (d2_v2, _) = create(l, "d2", 30).await;
    let (d3, _) = create(l, "d3", 50).await;
    for id in [&d2_v2, &d3] {
        let cancelled = l.cancel(id, MessageId::generate(eve()), eve()).await;
        assert!(
            matches!(cancelled, Ok(Cancel::Cancelled(_))),
            "{cancelled:?}"
        );
    }
    let planned = planned_from(store, day().period_start(1)).await;
    let ids: Vec<&str> = planned.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(ids, ["d1", "d2"]);
    assert_eq!(planned[0].1.len(), 48);
    assert_eq!(planned[0].1[0].rate(), RateKw::from_watts(10_000));
    assert_eq!(planned[1].1[0].rate(), RateKw::from_watts(20_000));
    let rest = planned_from(store, day().period_start(2)).await;
    assert_eq!(rest[0].1.len(), 47);
    assert!(rest[0].1.iter().all(|sp| sp.rate() == RateKw::ZERO));
    let after = planned_from(store, day().end()).await;
    assert!(after.iter().all(|(_, rest)| rest.is_empty()), "{after:?}");
    // What the fold makes of each device is kept; a device it has nothing for is left out.
    let fold: PlanFold =
        Arc::new(|device, rest| (device.as_str() == "d2").then_some(rest.len() as f64));
    let folded = store
        .planned_from(day().date(), day().period_start(2), fold)
        .await
        .unwrap();
    assert_eq!(folded.len(), 1);
    assert_eq!(folded.get("d2"), Some(&47.0));
}

/// Every device's remaining setpoints, as [`CommandStore::planned_from`] hands them to its
/// fold, by device (a store folds them in the order it reads them).
async fn planned_from(store: &dyn CommandStore, from: Timestamp) -> Vec<(DeviceId, Vec<Setpoint>)> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    let fold: PlanFold = Arc::new(move |device, rest| {
        keep.lock().unwrap().push((device.clone(), rest.to_vec()));
        Some(0.0)
    });
    let folded = store.planned_from(day().date(), from, fold).await.unwrap();
    let mut seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(folded.len(), seen.len(), "one number a device");
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    seen
}

async fn a_batch_of_acks_is_applied_as_each_would_be_alone(l: &Ledger) {
    let store = &**l.store();
    let (first, _) = create(l, "d1", 10).await;
    let (second, _) = create(l, "d2", 20).await;
    let (theirs, _) = create(l, "d3", 30).await;
    let unknown = MessageId::generate(eve());
    let outcomes = l
        .record_acks(
            &[
                ack(&first, "d1", 1, 1),
                ack(&first, "d1", 1, 1),
                ack(&unknown, "d1", 2, 1),
                // d2 may not ack d3's command.
                ack(&theirs, "d2", 1, 1),
                ack(&second, "d2", 2, 5),
            ],
            eve(),
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            Recorded::Applied,
            Recorded::Duplicate,
            Recorded::UnknownCommand,
            Recorded::UnknownCommand,
            Recorded::Applied,
        ]
    );
    assert_eq!(state(store, &first).await, CommandState::Acknowledged);
    assert_eq!(state(store, &second).await, CommandState::Acknowledged);
    assert_eq!(state(store, &theirs).await, CommandState::Created);
    let detail = store.command(&second).await.unwrap().unwrap();
    assert_eq!(detail.effective_period, Some(5));
    // Periods before the effective one never ran under this command.
    assert_eq!(detail.periods[3].status, PeriodStatus::Skipped);
    assert_eq!(detail.periods[4].status, PeriodStatus::Pending);
    assert_eq!(l.record_acks(&[], eve()).await.unwrap(), []);
}

/// A unit decided over a revision that has moved on is a conflict: nothing of it is written,
/// not even the writes before its failed guard (here the ack kept before the command's
/// update), and the units around it in the same call are written.
async fn a_unit_that_lost_its_race_leaves_nothing_and_the_rest_are_written(l: &Ledger) {
    use max300_cloud::lifecycle::feedback::{AckOutcome, ack as decide};
    use max300_cloud::store::{Record, Unit, Written};
    let store = &**l.store();
    let mut ids = Vec::new();
    for device in ["d1", "d2", "d3"] {
        ids.push(create(l, device, 10).await.0);
    }
    mark_sent(l, &ids, eve()).await;
    let acks: Vec<AckMsg> = ["d1", "d2", "d3"]
        .iter()
        .zip(&ids)
        .map(|(device, id)| ack(id, device, 1, 1))
        .collect();
    let contexts = store.ack_contexts(&acks).await.unwrap();
    let mut units: Vec<Unit> = acks
        .iter()
        .zip(contexts)
        .map(|(a, ctx)| match decide(&ctx.target, ctx.seen, a, eve()) {
            AckOutcome::Apply { commands, .. } => Unit {
                commands,
                control: None,
                record: Some(Record::Ack {
                    ack: a.clone(),
                    at: eve(),
                }),
            },
            _ => panic!("each ack applies"),
        })
        .collect();
    // Another writer moved d2's command on after its ack was decided.
    units[1].commands[0].after.rev += 1;
    let written = store.write(units).await.unwrap();
    assert_eq!(
        written,
        [Written::Applied, Written::Conflict, Written::Applied]
    );
    assert_eq!(state(store, &ids[0]).await, CommandState::Acknowledged);
    assert_eq!(state(store, &ids[1]).await, CommandState::Sent);
    assert_eq!(state(store, &ids[2]).await, CommandState::Acknowledged);
    let kept: Vec<bool> = store
        .ack_contexts(&acks)
        .await
        .unwrap()
        .iter()
        .map(|c| c.seen)
        .collect();
    assert_eq!(kept, [true, false, true], "the lost unit's ack is not kept");
    // Decided again over what is stored, it applies.
    assert_eq!(
        l.record_ack(&acks[1], eve()).await.unwrap(),
        Recorded::Applied
    );
    assert_eq!(state(store, &ids[1]).await, CommandState::Acknowledged);
}

async fn a_lease_has_one_holder_until_it_expires_or_is_released(l: &Ledger) {
    let store = &**l.store();
    let t0 = eve();
    let later = |s: i64| t0 + jiff::SignedDuration::from_secs(s);
    let name = "ingest:2026-11-30";
    let first = store.lease(name, "a", later(60), t0).await.unwrap();
    assert!(first.is_some());
    // Held: another instance is refused, the holder renews (with the same token).
    assert_eq!(
        store.lease(name, "b", later(90), later(10)).await.unwrap(),
        None
    );
    assert_eq!(
        store.lease(name, "a", later(120), later(10)).await.unwrap(),
        first
    );
    assert_eq!(
        store
            .lease(name, "b", later(150), later(119))
            .await
            .unwrap(),
        None
    );
    // Other names are independent.
    assert!(
        store
            .lease("sweeper", "b", later(60), t0)
            .await
            .unwrap()
            .is_some()
    );
    // Expired: the next one takes it, with a newer token, and the old holder can't take it
    // back.
    let second = store
        .lease(name, "b", later(300), later(120))
        .await
        .unwrap();
    assert!(second > first, "{second:?} after {first:?}");
    assert_eq!(
        store
            .lease(name, "a", later(300), later(121))
            .await
            .unwrap(),
        None
    );
    // Only the holder releases it.
    store.release(name, "a").await.unwrap();
    assert_eq!(
        store
            .lease(name, "c", later(300), later(122))
            .await
            .unwrap(),
        None
    );
    store.release(name, "b").await.unwrap();
    let third = store
        .lease(name, "c", later(300), later(122))
        .await
        .unwrap();
    assert!(third > second, "{third:?} after {second:?}");
}

/// Item 2: two instances never commit an older document after a newer one. A holder that
/// stalled past its lease keeps a stale token, and its commit is refused whole.
async fn a_commit_under_a_lease_that_moved_on_is_refused(l: &Ledger) {
    let store = &**l.store();
    let t0 = eve();
    let name = "ingest:2026-11-30".to_owned();
    let later = |s: i64| t0 + jiff::SignedDuration::from_secs(s);
    let fence = |owner: &str, token| max300_cloud::store::Fence {
        name: name.clone(),
        owner: owner.into(),
        token,
    };
    let x = store
        .lease(&name, "x", later(120), t0)
        .await
        .unwrap()
        .unwrap();
    // x stalls; its lease expires and y takes the date, commits B and lets it go.
    let y = store
        .lease(&name, "y", later(300), later(121))
        .await
        .unwrap()
        .unwrap();
    let b = NewCommand {
        message_id: MessageId::generate(t0),
        schedule: schedule("d1", 20),
        traceparent: None,
    };
    l.insert_commands(&[b], later(122), Some(&fence("y", y)))
        .await
        .unwrap();
    store.release(&name, "y").await.unwrap();
    // x wakes up with document A.
    let a = NewCommand {
        message_id: MessageId::generate(t0),
        schedule: schedule("d1", 10),
        traceparent: None,
    };
    let refused = l
        .insert_commands(&[a], later(130), Some(&fence("x", x)))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, max300_cloud::CloudError::Fenced(_)),
        "{refused}"
    );
    let current = store
        .current_commands(&DeviceId::parse("d1").unwrap(), day().date())
        .await
        .unwrap();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].version, 1, "B stands, and only B");
    // Taking the lease again gives x a new token, and a commit under it goes through.
    let again = store
        .lease(&name, "x", later(400), later(301))
        .await
        .unwrap()
        .unwrap();
    assert!(again > y);
}

/// Runs every rule against the store that `$store` makes (evaluated inside each async test; the
/// first element of its pair is kept alive to the end of the test), in a module `$module`,
/// with any further items of that backend's own.
macro_rules! contract {
    ($module:ident, $store:expr $(, { $($extra:item)* })?) => {
        contract!(@rules $module, $store, [$($($extra)*)?], [
            versions_by_content,
            lists_commands_by_device_by_date_or_all,
            rebuilds_the_published_message,
            walks_the_lifecycle_and_applies_each_message_once,
            a_report_implies_the_ack,
            messages_about_unknown_commands_grow_nothing,
            a_hostile_ack_changes_nothing,
            a_newer_version_supersedes_from_its_effective_period,
            registers_devices_and_records_heartbeats,
            reports_before_the_ack_still_complete_the_command,
            another_devices_ack_cannot_take_the_owners_place,
            sync_offers_the_last_live_version,
            the_clock_flags_late_and_ends_what_was_never_acked,
            periods_left_unreported_end_incomplete,
            resends_back_off_and_stop_at_an_ack_or_a_newer_version,
            what_is_due_comes_earliest_first_as_many_as_asked,
            a_cancel_ends_the_command_and_is_delivered_like_one,
            an_unfinished_ingestion_is_listed_for_replay,
            a_failed_run_is_closed_and_an_overtaken_one_says_so,
            lists_a_devices_reports_for_a_day_once_each,
            the_fleet_rows_count_conformance_and_states,
            keeps_every_send_and_a_warning_with_the_command,
            keeps_each_commands_trace_context,
            a_batch_of_acks_is_applied_as_each_would_be_alone,
            a_unit_that_lost_its_race_leaves_nothing_and_the_rest_are_written,
            a_lease_has_one_holder_until_it_expires_or_is_released,
            a_commit_under_a_lease_that_moved_on_is_refused,
        ]);
    };
    (@rules $module:ident, $store:expr, [$($extra:item)*], [$($rule:ident),* $(,)?]) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[tokio::test]
                async fn $rule() {
                    let (_keep, store) = $store;
                    super::$rule(&Ledger::new(store, Policy::default())).await;
                }
            )*
            $($extra)*
        }
    };
}

contract!(sqlite, super::sqlite());

#[cfg(feature = "aws")]
contract!(dynamodb, super::dynamodb().await, {
    /// Two cloud instances (two clients) get the same ack at once: one applies it.
    #[tokio::test]
    async fn two_instances_racing_on_one_ack_apply_it_once() {
        let (moto, a) = super::dynamodb().await;
        let a = super::ledger(a);
        let b = super::ledger(super::second_client(&moto));
        let (id, _) = super::create(&a, "d1", 10).await;
        mark_sent(&a, std::slice::from_ref(&id), super::eve()).await;
        let sha256 = a.store().command(&id).await.unwrap().unwrap().sha256;
        let mut ack = super::ack(&id, "d1", 1, 1);
        ack.sha256 = Some(sha256.clone());
        let (x, y) = tokio::join!(
            a.record_ack(&ack, super::eve()),
            b.record_ack(&ack, super::eve())
        );
        let mut outcomes = [x.unwrap(), y.unwrap()];
        outcomes.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(outcomes, [Recorded::Applied, Recorded::Duplicate]);
        let detail = b.store().command(&id).await.unwrap().unwrap();
        assert_eq!(detail.summary.state, CommandState::Acknowledged);
        assert_eq!(detail.acked_sha256, Some(sha256));
        let acked = detail
            .history
            .iter()
            .filter(|h| h.state == CommandState::Acknowledged)
            .count();
        assert_eq!(acked, 1, "{:?}", detail.history);
    }

    /// Both instances get every report of a day, interleaved: each is applied once, the
    /// command completes once, and the counts see one completed command.
    #[tokio::test]
    async fn two_instances_racing_on_every_report_apply_each_once() {
        let (moto, a) = super::dynamodb().await;
        let a = super::ledger(a);
        let b = super::ledger(super::second_client(&moto));
        let (id, _) = super::create(&a, "d1", 10).await;
        a.record_ack(&super::ack(&id, "d1", 1, 1), super::eve())
            .await
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for p in 1..=48 {
            for l in [a.clone(), b.clone()] {
                let r = super::report(Some(&id), "d1", p);
                tasks.spawn(async move { l.record_report(&r, super::day().end()).await.unwrap() });
            }
        }
        let outcomes = tasks.join_all().await;
        let applied = outcomes.iter().filter(|r| **r == Recorded::Applied).count();
        let duplicate = outcomes
            .iter()
            .filter(|r| **r == Recorded::Duplicate)
            .count();
        assert_eq!((applied, duplicate), (48, 48));
        let detail = a.store().command(&id).await.unwrap().unwrap();
        assert_eq!(detail.summary.state, CommandState::Completed);
        assert!(
            detail
                .periods
                .iter()
                .all(|p| p.status == PeriodStatus::Executed)
        );
        let completed = detail
            .history
            .iter()
            .filter(|h| h.state == CommandState::Completed)
            .count();
        assert_eq!(completed, 1, "{:?}", detail.history);
        assert_eq!(
            b.store().command_counts().await.unwrap(),
            [(CommandState::Completed, 1)]
        );
    }

    /// Two instances ask for the same free lease at once: exactly one gets it.
    #[tokio::test]
    async fn two_instances_racing_on_one_lease_give_it_to_one() {
        let (moto, a) = super::dynamodb().await;
        let a = super::ledger(a);
        let b = super::ledger(super::second_client(&moto));
        let until = super::eve() + jiff::SignedDuration::from_secs(60);
        let (x, y) = tokio::join!(
            a.store().lease("sweeper", "a", until, super::eve()),
            b.store().lease("sweeper", "b", until, super::eve())
        );
        assert!(
            x.unwrap().is_some() ^ y.unwrap().is_some(),
            "exactly one holder"
        );
    }

    /// Late news never moves a command back: an ack that arrives after every period was
    /// reported, raced by a sweep an hour after the end, leaves it completed.
    #[tokio::test]
    async fn a_late_ack_racing_a_sweep_leaves_a_completed_command_completed() {
        let (moto, a) = super::dynamodb().await;
        let a = super::ledger(a);
        let b = super::ledger(super::second_client(&moto));
        let (id, _) = super::create(&a, "d1", 10).await;
        mark_sent(&a, std::slice::from_ref(&id), super::eve()).await;
        for p in 1..=48 {
            a.record_report(&super::report(Some(&id), "d1", p), super::day().end())
                .await
                .unwrap();
        }
        assert_eq!(
            super::state(&**a.store(), &id).await,
            CommandState::Completed
        );
        let hour_after = super::day().end() + jiff::SignedDuration::from_hours(1);
        let late_ack = super::ack(&id, "d1", 1, 1);
        let (acked, swept) = tokio::join!(b.record_ack(&late_ack, hour_after), a.sweep(hour_after));
        assert_eq!(acked.unwrap(), Recorded::Applied);
        assert!(swept.unwrap().swept.is_empty());
        let detail = b.store().command(&id).await.unwrap().unwrap();
        assert_eq!(detail.summary.state, CommandState::Completed);
        assert_eq!(
            detail.history.last().map(|h| h.state),
            Some(CommandState::Completed)
        );
        assert_eq!(
            b.cancel(&id, MessageId::generate(super::eve()), hour_after)
                .await
                .unwrap(),
            Cancel::AlreadyEnded(CommandState::Completed)
        );
    }

    /// A missing table is a clear error that names the way to create it; with
    /// `create_resources` it is created, with the template's schema.
    #[tokio::test]
    async fn a_missing_table_names_the_flag_and_the_flag_creates_it() {
        let moto = crate::moto::Moto::start();
        let store = max300_cloud::store::DynamoStore::from_client(moto.dynamodb(), "absent");
        let err = store.ensure_table(false).await.unwrap_err().to_string();
        assert!(
            err.contains("absent") && err.contains("--create-resources"),
            "{err}"
        );
        store.ensure_table(true).await.unwrap();
        store.ensure_table(false).await.unwrap();
        let l = super::ledger(Arc::new(store));
        let (id, _) = super::create(&l, "d1", 10).await;
        assert_eq!(super::state(&**l.store(), &id).await, CommandState::Created);
    }

    /// The table `create_table` makes is the one the deployment template declares, and
    /// making it again changes nothing.
    #[tokio::test]
    async fn the_table_has_the_fixed_schema_and_creating_it_again_is_harmless() {
        use aws_sdk_dynamodb::types::{BillingMode, KeyType, ProjectionType};
        let (moto, store) = super::dynamodb().await;
        let (id, _) = super::create(&super::ledger(store.clone()), "d1", 10).await;
        let again = max300_cloud::store::DynamoStore::from_client(moto.dynamodb(), "max300");
        again.create_table().await.unwrap();
        assert_eq!(super::state(&*store, &id).await, CommandState::Created);
        let client = moto.dynamodb();
        let table = client
            .describe_table()
            .table_name("max300")
            .send()
            .await
            .unwrap();
        let table = table.table().unwrap();
        let keys = |schema: &[aws_sdk_dynamodb::types::KeySchemaElement]| {
            schema
                .iter()
                .map(|k| (k.attribute_name().to_owned(), k.key_type().clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(table.key_schema()),
            [("pk".into(), KeyType::Hash), ("sk".into(), KeyType::Range)]
        );
        let mut indexes: Vec<_> = table
            .global_secondary_indexes()
            .iter()
            .map(|g| {
                (
                    g.index_name().unwrap().to_owned(),
                    keys(g.key_schema()),
                    g.projection().and_then(|p| p.projection_type()).cloned(),
                )
            })
            .collect();
        indexes.sort_by(|a, b| a.0.cmp(&b.0));
        let want = |n: &str| {
            (
                n.to_owned(),
                vec![
                    (format!("{n}pk"), KeyType::Hash),
                    (format!("{n}sk"), KeyType::Range),
                ],
                Some(ProjectionType::All),
            )
        };
        assert_eq!(indexes, [want("gsi1"), want("gsi2")]);
        assert_eq!(
            table
                .billing_mode_summary()
                .and_then(|b| b.billing_mode())
                .cloned(),
            Some(BillingMode::PayPerRequest)
        );
        let ttl = client
            .describe_time_to_live()
            .table_name("max300")
            .send()
            .await
            .unwrap();
        assert_eq!(
            ttl.time_to_live_description()
                .and_then(|t| t.attribute_name()),
            Some("ttl")
        );
    }

    /// An evening's ingestion: more commands than one transaction or one batch read holds.
    /// 150, not 10,000: moto copies the whole table for each transaction and keeps the
    /// copies (measured: at 1,000 items a transaction takes 2.6 s and 100 MB more), so a
    /// fleet-sized batch is for real DynamoDB, not this test.
    #[tokio::test]
    async fn inserts_more_commands_than_one_transaction_holds() {
        let (_moto, store) = super::dynamodb().await;
        let n = 150;
        let batch: Vec<NewCommand> = (0..n)
            .map(|i| NewCommand {
                message_id: MessageId::parse(format!("m{i:05}")).unwrap(),
                schedule: crate::schedule(&format!("max300-{i:05}"), 10),
                traceparent: None,
            })
            .collect();
        let l = super::ledger(store.clone());
        let inserted = l.insert_commands(&batch, super::eve(), None).await.unwrap();
        assert!(
            inserted
                .iter()
                .all(|i| matches!(i, Insert::Created { version: 1, .. }))
        );
        assert_eq!(super::unsent(&*store).await.len(), n);
        assert_eq!(
            store.command_counts().await.unwrap(),
            [(CommandState::Created, n as u32)]
        );
        let again = l
            .insert_commands(&batch[..100], super::eve(), None)
            .await
            .unwrap();
        assert!(
            again
                .iter()
                .all(|i| matches!(i, Insert::Unchanged { version: 1, .. }))
        );
        // One device twice in a call: versioned one after the other, as in one transaction.
        let twice: Vec<NewCommand> = [20, 30]
            .into_iter()
            .map(|kw| NewCommand {
                message_id: MessageId::generate(super::eve()),
                schedule: crate::schedule("max300-00000", kw),
                traceparent: None,
            })
            .collect();
        let versions: Vec<_> = l
            .insert_commands(&twice, super::eve(), None)
            .await
            .unwrap()
            .into_iter()
            .map(|i| match i {
                Insert::Created { version, .. } => version,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(versions, [2, 3]);
    }
});

/// A second store on the same table through its own client: another cloud instance.
#[cfg(feature = "aws")]
fn second_client(moto: &crate::moto::Moto) -> Arc<dyn CommandStore> {
    Arc::new(max300_cloud::store::DynamoStore::from_client(
        moto.dynamodb(),
        "max300",
    ))
}

#[tokio::test]
async fn a_store_file_from_before_trace_contexts_still_opens_and_gains_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.sqlite");
    let old = {
        let store = SqliteStore::open(&path).unwrap();
        create(&ledger(Arc::new(store)), "d1", 10).await.0
    };
    // The previous version's file: the commands table without the column, and no layout
    // version (those came later still).
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("ALTER TABLE commands DROP COLUMN traceparent; PRAGMA user_version = 0;")
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let msg = store.schedule_message(&old).await.unwrap().unwrap();
    assert_eq!(msg.traceparent, None);
    assert_eq!(unsent(&store).await, vec![old]);
    let traced = create_traced(&ledger(Arc::new(store.clone())), "d2").await;
    assert_eq!(
        store.command_traceparent(&traced).await.unwrap(),
        TraceParent::parse(TRACEPARENT).ok()
    );
    // Opening it again finds the column there.
    drop(store);
    SqliteStore::open(&path).unwrap();
}

#[tokio::test]
async fn commands_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.sqlite");
    let id = {
        let store = SqliteStore::open(&path).unwrap();
        create(&ledger(Arc::new(store)), "d1", 10).await.0
    };
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(unsent(&store).await, vec![id]);
}
