//! Micro-benchmarks of the agent's store, on a real file in a temp dir: saving a plan with its
//! ack (the write that precedes the ack, fsynced when durable), reading the store back as a
//! restart does, and the setpoint of the current period as the engine answers it.
//!
//! `cargo bench -p max300-agent`; under `cargo test --benches` each runs once.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use jiff::Timestamp;
use jiff::civil::{Date, date};
use max300_agent::engine::{Decision, Engine};
use max300_agent::store::Store;
use max300_protocol::day::time_zone;
use max300_protocol::message::{AckMsg, AckStatus, ScheduleMsg, V1};
use max300_protocol::{
    DEFAULT_TIMEZONE, Day, DeviceId, Message, MessageId, Mode, RateKw, Schedule, Setpoint, StoreId,
};
use tempfile::TempDir;

/// A winter weekday of 48 periods, as in `max300 bench`.
const DATE: Date = date(2026, 11, 30);

fn device() -> DeviceId {
    DeviceId::parse("max300-0001").unwrap()
}

/// When the plan arrives: the eve of [`DATE`].
fn eve() -> Timestamp {
    "2026-11-29T16:00:00Z".parse().unwrap()
}

/// A plan for `date`: charge at night, discharge at the evening peak.
fn plan(date: Date, version: u32) -> ScheduleMsg {
    let day = Day::named(date, DEFAULT_TIMEZONE).unwrap();
    let setpoints = (1..=day.period_count())
        .map(|p| match p {
            3..=8 => Setpoint::new(Mode::Charge, RateKw::from_watts(25_000)).unwrap(),
            33..=38 => Setpoint::new(Mode::Discharge, RateKw::from_watts(22_500)).unwrap(),
            _ => Setpoint::IDLE,
        })
        .collect();
    let schedule = Schedule::new(device(), day, setpoints).unwrap();
    ScheduleMsg::new(&schedule, MessageId::generate(eve()), version, eve())
}

fn ack(msg: &ScheduleMsg) -> Message {
    Message::Ack(AckMsg {
        v: V1,
        // The store stamps its own id and seq.
        store_id: StoreId::parse("unset").unwrap(),
        seq: 0,
        message_id: msg.message_id.clone(),
        device_id: msg.device_id.clone(),
        status: AckStatus::Accepted,
        reason: None,
        details: None,
        sha256: Some(msg.sha256.clone()),
        effective_period: Some(1),
        at: eve(),
        traceparent: None,
    })
}

fn open(durable: bool) -> (Store, TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("max300-bench-")
        .tempdir()
        .unwrap();
    let store = Store::open(&dir.path().join("agent.sqlite"), durable).unwrap();
    (store, dir)
}

/// `Store::accept_plan`: the plan and its ack in one transaction, committed before the ack is
/// published. Each iteration is the next version of the plan, as a re-plan delivers it.
fn accept_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("agent_store/accept_plan");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    for (name, durable) in [("durable", true), ("unsynced", false)] {
        let (store, _dir) = open(durable);
        let mut version = 0;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    version += 1;
                    let msg = plan(DATE, version);
                    let ack = ack(&msg);
                    (msg, ack)
                },
                |(msg, ack)| {
                    store
                        .accept_plan(&msg, 1, ack, "max300/v1/ack".into(), eve(), true)
                        .unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// What the agent holds on an ordinary evening: today's and tomorrow's plans.
fn held() -> (Store, TempDir) {
    let (store, dir) = open(true);
    for date in [DATE, DATE.tomorrow().unwrap()] {
        let msg = plan(date, 1);
        store
            .accept_plan(&msg, 1, ack(&msg), "max300/v1/ack".into(), eve(), true)
            .unwrap();
    }
    (store, dir)
}

/// Reading the current period's setpoint: the store is read once at start-up (`load`), and
/// from then on the engine answers from the plans it holds.
fn current_setpoint(c: &mut Criterion) {
    let (store, _dir) = held();
    let mut group = c.benchmark_group("agent");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1));
    group.bench_function("store_load", |b| {
        b.iter(|| {
            let loaded = store.load().unwrap();
            assert_eq!(loaded.plans.len(), 2);
            loaded
        })
    });

    let tz = time_zone(DEFAULT_TIMEZONE).unwrap();
    let mut engine = Engine::new(device(), tz, DEFAULT_TIMEZONE, RateKw::from_watts(150_000));
    for stored in store.load().unwrap().plans {
        let Decision::Accept(plan) = engine.on_schedule(&stored.msg, eve()) else {
            panic!("a held plan is accepted");
        };
        engine.hold(plan);
    }
    // 16:10 on the day: the first discharge period.
    let now: Timestamp = "2026-11-30T16:10:00Z".parse().unwrap();
    assert_eq!(engine.current(now).mode(), Mode::Discharge);
    group.bench_function("engine_current_setpoint", |b| {
        b.iter(|| engine.current(black_box(now)))
    });
    group.finish();
}

criterion_group!(benches, accept_plan, current_setpoint);
criterion_main!(benches);
