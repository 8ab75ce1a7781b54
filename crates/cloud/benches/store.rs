//! Micro-benchmarks of the SQLite command store, on real files in a temp dir: the commands of
//! one ingestion for 1,000 devices (durable, and `open_unsynced` for contrast), an ack, a
//! period report, a fleet's acks in one batch, and the reads behind the fleet page and a command's page.
//!
//! `cargo bench -p max300-cloud`; under `cargo test --benches` each runs once.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use jiff::civil::{Date, date};
use jiff::{SignedDuration, Timestamp, ToSpan};
use std::sync::Arc;

use max300_cloud::store::{CommandStore, Insert, NewCommand, Recorded};
use max300_cloud::{Ledger, Policy, SqliteStore};
use max300_protocol::message::{AckMsg, AckStatus, ReportMsg, ReportStatus, V1};
use max300_protocol::{
    DEFAULT_TIMEZONE, Day, DeviceId, MessageId, Mode, RateKw, Schedule, Setpoint, StoreId,
};
use tempfile::TempDir;
use tokio::runtime::Runtime;

const DEVICES: usize = 1_000;
/// A winter weekday of 48 periods, as in `max300 bench`.
const DATE: Date = date(2026, 11, 30);

/// The eve of [`DATE`], when the daily ingestion runs.
fn eve() -> Timestamp {
    "2026-11-29T16:00:00Z".parse().unwrap()
}

fn noon() -> Timestamp {
    "2026-11-30T12:00:00Z".parse().unwrap()
}

/// Records a publish of each.
async fn mark_sent(ledger: &Ledger, ids: &[MessageId]) {
    let loaded = ledger.publishable(ids, eve()).await.unwrap();
    ledger.published(loaded, eve()).await.unwrap();
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A store in its own temp dir with [`DEVICES`] registered devices.
struct Fixture {
    store: Ledger,
    devices: Vec<DeviceId>,
    _dir: TempDir,
}

impl Fixture {
    fn new(rt: &Runtime, durable: bool) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("max300-bench-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("cloud.sqlite");
        let store = if durable {
            SqliteStore::open(&path).unwrap()
        } else {
            SqliteStore::open_unsynced(&path).unwrap()
        };
        let devices: Vec<DeviceId> = (1..=DEVICES)
            .map(|i| DeviceId::parse(format!("max300-{i:04}")).unwrap())
            .collect();
        rt.block_on(store.register_devices(&devices, eve()))
            .unwrap();
        Fixture {
            store: Ledger::new(Arc::new(store), Policy::default()),
            devices,
            _dir: dir,
        }
    }

    /// One command for each device on `date`, as one evening's ingestion makes them.
    fn commands(&self, date: Date) -> Vec<NewCommand> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| command(d, date, i))
            .collect()
    }

    /// Creates and publishes one command (the state an ack finds it in).
    fn sent_command(&self, rt: &Runtime, device: usize, date: Date) -> NewCommand {
        let command = command(&self.devices[device], date, device);
        rt.block_on(async {
            let inserted = self
                .store
                .insert_commands(std::slice::from_ref(&command), eve(), None)
                .await;
            assert!(matches!(inserted.unwrap()[..], [Insert::Created { .. }]));
            mark_sent(&self.store, std::slice::from_ref(&command.message_id)).await;
        });
        command
    }
}

/// One device's plan for `date`: charge at night, discharge at the evening peak; the rates
/// vary by device.
fn command(device: &DeviceId, date: Date, i: usize) -> NewCommand {
    let day = Day::named(date, DEFAULT_TIMEZONE).unwrap();
    let charge = RateKw::from_watts(20_000 + 1_000 * (i % 11) as u32);
    let setpoints = (1..=day.period_count())
        .map(|p| match p {
            3..=8 => Setpoint::new(Mode::Charge, charge).unwrap(),
            33..=38 => Setpoint::new(Mode::Discharge, charge).unwrap(),
            _ => Setpoint::IDLE,
        })
        .collect();
    NewCommand {
        message_id: MessageId::generate(eve()),
        schedule: Schedule::new(device.clone(), day, setpoints).unwrap(),
        traceparent: None,
    }
}

fn ack(command: &NewCommand) -> AckMsg {
    AckMsg {
        v: V1,
        store_id: StoreId::parse("bench").unwrap(),
        seq: 0,
        message_id: command.message_id.clone(),
        device_id: command.schedule.device_id().clone(),
        status: AckStatus::Accepted,
        reason: None,
        details: None,
        sha256: Some(command.schedule.sha256()),
        effective_period: Some(1),
        at: eve(),
        traceparent: None,
    }
}

fn report(command: &NewCommand, period: u32) -> ReportMsg {
    let day = command.schedule.day();
    let planned = command.schedule.setpoint(period).unwrap();
    let start = day.period_start(period);
    ReportMsg {
        v: V1,
        store_id: StoreId::parse("bench").unwrap(),
        seq: u64::from(period),
        message_id: Some(command.message_id.clone()),
        device_id: command.schedule.device_id().clone(),
        period,
        interval_start: start,
        mode: planned.mode(),
        rate_kw: planned.rate(),
        status: ReportStatus::Executed,
        applied_kw: Some(planned.rate()),
        limited_by: None,
        reason: None,
        would_kw: None,
        soc_pct: Some(50.0),
        energy_kwh: Some(planned.rate().kw() / 2.0),
        error: None,
        at: start.checked_add(SignedDuration::from_mins(30)).unwrap(),
        traceparent: None,
    }
}

/// A group whose every iteration is a whole fleet's worth: few, long samples.
fn fleet_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(DEVICES as u64));
    group
}

/// The commands of one ingestion: one transaction for the whole fleet, each iteration for the
/// next date so every command is created (version 1), as each evening's run does.
fn insert(c: &mut Criterion) {
    let rt = runtime();
    let mut group = fleet_group(c, "cloud_store/insert_commands_1000");
    for (name, durable) in [("durable", true), ("unsynced", false)] {
        let fixture = Fixture::new(&rt, durable);
        let mut days = 0;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let date = DATE.checked_add(days.days()).unwrap();
                    days += 1;
                    fixture.commands(date)
                },
                |commands| {
                    let inserted =
                        rt.block_on(fixture.store.insert_commands(&commands, eve(), None));
                    assert_eq!(inserted.unwrap().len(), DEVICES);
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// An ack and a period report, each its own durable transaction, as feedback applies them.
fn feedback(c: &mut Criterion) {
    let rt = runtime();
    let fixture = Fixture::new(&rt, true);
    let mut group = c.benchmark_group("cloud_store");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));

    // Each ack needs a published command of its own: device by device, then the next date.
    let mut next = 0;
    group.bench_function("record_ack/durable", |b| {
        b.iter_batched(
            || {
                let date = DATE.checked_add(((next / DEVICES) as i64).days()).unwrap();
                let command = fixture.sent_command(&rt, next % DEVICES, date);
                next += 1;
                ack(&command)
            },
            |ack| {
                let recorded = rt.block_on(fixture.store.record_ack(&ack, eve()));
                assert_eq!(recorded.unwrap(), Recorded::Applied);
            },
            BatchSize::SmallInput,
        )
    });

    // Each report is for the next period of an acked command; a new command every 48.
    let mut current: Option<(NewCommand, u32)> = None;
    group.bench_function("record_report/durable", |b| {
        b.iter_batched(
            || {
                let (command, period) = match current.take() {
                    Some((command, period)) if period < 48 => (command, period + 1),
                    _ => {
                        let date = DATE.checked_add(((next / DEVICES) as i64).days()).unwrap();
                        let command = fixture.sent_command(&rt, next % DEVICES, date);
                        next += 1;
                        rt.block_on(fixture.store.record_ack(&ack(&command), eve()))
                            .unwrap();
                        (command, 1)
                    }
                };
                let msg = report(&command, period);
                current = Some((command, period));
                msg
            },
            |report| {
                let at = report.at;
                let recorded = rt.block_on(fixture.store.record_report(&report, at));
                assert_eq!(recorded.unwrap(), Recorded::Applied);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();

    // The evening's burst: a whole fleet's acks in one call, as the feedback consumer batches
    // them, so the figure is the store's work an ack, not an fsync's.
    let mut group = fleet_group(c, "cloud_store/record_acks_1000");
    // Unsynced too: without the fsync, what is left is the CPU an ack costs.
    let unsynced = Fixture::new(&rt, false);
    for (name, fixture) in [("durable", &fixture), ("unsynced", &unsynced)] {
        let mut days = 0;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let date = DATE.checked_add((1_000 + days).days()).unwrap();
                    days += 1;
                    let commands = fixture.commands(date);
                    rt.block_on(async {
                        fixture
                            .store
                            .insert_commands(&commands, eve(), None)
                            .await
                            .unwrap();
                        let ids: Vec<MessageId> =
                            commands.iter().map(|c| c.message_id.clone()).collect();
                        mark_sent(&fixture.store, &ids).await;
                    });
                    commands.iter().map(ack).collect::<Vec<_>>()
                },
                |acks| {
                    let recorded = rt
                        .block_on(fixture.store.record_acks(&acks, eve()))
                        .unwrap();
                    assert!(recorded.iter().all(|r| *r == Recorded::Applied));
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// A store as the service holds it at noon: today's and tomorrow's commands for every device
/// acked, and the morning's 24 periods reported. Filled unsynced (it is set-up, not measured),
/// then reopened the way the service opens it.
fn reads(c: &mut Criterion) {
    let rt = runtime();
    let fixture = Fixture::new(&rt, false);
    let tomorrow = DATE.tomorrow().unwrap();
    let mut today = Vec::with_capacity(DEVICES);
    rt.block_on(async {
        for date in [DATE, tomorrow] {
            let commands = fixture.commands(date);
            fixture
                .store
                .insert_commands(&commands, eve(), None)
                .await
                .unwrap();
            let ids: Vec<MessageId> = commands.iter().map(|c| c.message_id.clone()).collect();
            mark_sent(&fixture.store, &ids).await;
            for command in &commands {
                fixture
                    .store
                    .record_ack(&ack(command), eve())
                    .await
                    .unwrap();
            }
            if date == DATE {
                today = commands;
            }
        }
        for command in &today {
            for period in 1..=24 {
                let report = report(command, period);
                fixture
                    .store
                    .record_report(&report, report.at)
                    .await
                    .unwrap();
            }
        }
    });
    let store = SqliteStore::open(&fixture._dir.path().join("cloud.sqlite")).unwrap();
    let detail_id = today[DEVICES / 2].message_id.clone();

    let mut group = c.benchmark_group("cloud_store");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(DEVICES as u64));
    group.bench_function("fleet_1000", |b| {
        b.iter(|| {
            let rows = rt.block_on(store.fleet(DATE, tomorrow, noon())).unwrap();
            assert_eq!(rows.len(), DEVICES);
            black_box(rows)
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("command_detail", |b| {
        b.iter(|| {
            let detail = rt.block_on(store.command(black_box(&detail_id))).unwrap();
            assert_eq!(detail.unwrap().periods.len(), 48);
        })
    });
    group.finish();
}

criterion_group!(benches, insert, feedback, reads);
criterion_main!(benches);
