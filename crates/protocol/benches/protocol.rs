//! Micro-benchmarks of the wire contract: normalizing a provider document (per schedule) and
//! encoding and decoding each MQTT message the fleet sends most.
//!
//! `cargo bench -p max300-protocol`; under `cargo test --benches` each runs once.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use jiff::Timestamp;
use jiff::civil::{Date, date};
use max300_protocol::day::time_zone;
use max300_protocol::document::normalize;
use max300_protocol::message::{
    AckMsg, AckStatus, HeartbeatMsg, ReportMsg, ReportStatus, ScheduleMsg, V1,
};
use max300_protocol::{
    DEFAULT_TIMEZONE, Day, DeviceId, Fleet, Message, MessageId, Mode, RateKw, Schedule, Setpoint,
    StoreId,
};
use serde_json::{Value, json};

/// A winter weekday of 48 periods, as in `max300 bench`.
const DATE: Date = date(2026, 11, 30);

fn at() -> Timestamp {
    "2026-11-29T16:00:00Z".parse().unwrap()
}

fn device(i: usize) -> String {
    format!("max300-{i:04}")
}

/// A provider document for `n` devices shaped like `max300 sample-provider`'s: night charge,
/// some midday solar, the evening peak discharge; even devices give periods by number, odd
/// ones spans by instant, so both forms of the contract are parsed.
fn document(n: usize) -> Vec<u8> {
    let day = Day::named(DATE, DEFAULT_TIMEZONE).unwrap();
    let schedules: Vec<Value> = (0..n)
        .map(|i| {
            let charge_kw = 20 + (i % 11) as u32;
            let solar_kw = if i % 3 == 0 { 0 } else { 2 + (i % 9) as u32 };
            let discharge_kw = f64::from(charge_kw * 3 + solar_kw) * 0.3;
            // (first period, periods, mode, kW)
            let blocks = [
                (3 + 2 * (i % 3) as u32, 6, "charge", f64::from(charge_kw)),
                (25, 2, "charge", f64::from(solar_kw)),
                (33, 6, "discharge", (discharge_kw * 10.0).round() / 10.0),
            ];
            let mut intervals = Vec::new();
            for (first, periods, mode, kw) in blocks {
                if kw == 0.0 {
                    continue;
                }
                if i % 2 == 0 {
                    for p in first..first + periods {
                        intervals.push(json!({"period": p, "mode": mode, "rate_kw": kw}));
                    }
                } else {
                    intervals.push(json!({
                        "start": day.period_start(first).to_string(),
                        "end": day.period_start(first + periods).to_string(),
                        "mode": mode,
                        "rate_kw": kw,
                    }));
                }
            }
            json!({"device_id": device(i), "intervals": intervals})
        })
        .collect();
    serde_json::to_vec(&json!({
        "schedule_date": DATE.to_string(),
        "timezone": DEFAULT_TIMEZONE,
        "generated_at": at().to_string(),
        "schedules": schedules,
    }))
    .unwrap()
}

/// The fleet as the cloud holds it: every device registered at the default limit.
fn fleet(n: usize) -> Fleet {
    let mut fleet = Fleet::new(time_zone(DEFAULT_TIMEZONE).unwrap());
    fleet.devices = (0..n)
        .map(|i| (DeviceId::parse(device(i)).unwrap(), fleet.default_max_rate))
        .collect();
    fleet
}

fn normalization(c: &mut Criterion) {
    let mut group = c.benchmark_group("normalize");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in [1, 1_000] {
        let input = document(n);
        let fleet = fleet(n);
        let check = normalize(&input, &fleet).unwrap();
        assert_eq!((check.schedules.len(), check.rejected.len()), (n, 0));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("devices", n), |b| {
            b.iter(|| normalize(black_box(&input), &fleet).unwrap())
        });
    }
    group.finish();
}

/// One device's plan as a schedule command: 48 periods, charge at night, discharge at 16:00.
fn schedule_msg() -> ScheduleMsg {
    let day = Day::named(DATE, DEFAULT_TIMEZONE).unwrap();
    let setpoints = (1..=day.period_count())
        .map(|p| match p {
            3..=8 => Setpoint::new(Mode::Charge, RateKw::from_watts(25_000)).unwrap(),
            33..=38 => Setpoint::new(Mode::Discharge, RateKw::from_watts(22_500)).unwrap(),
            _ => Setpoint::IDLE,
        })
        .collect();
    let schedule = Schedule::new(DeviceId::parse(device(1)).unwrap(), day, setpoints).unwrap();
    ScheduleMsg::new(&schedule, MessageId::generate(at()), 1, at())
}

fn messages() -> Vec<(&'static str, Message)> {
    let schedule = schedule_msg();
    let device = schedule.device_id.clone();
    let store_id = StoreId::parse("01JBENCHSTORE").unwrap();
    let start: Timestamp = "2026-11-30T16:00:00Z".parse().unwrap();
    let rate = RateKw::from_watts(22_500);
    let ack = AckMsg {
        v: V1,
        store_id: store_id.clone(),
        seq: 41,
        message_id: schedule.message_id.clone(),
        device_id: device.clone(),
        status: AckStatus::Accepted,
        reason: None,
        details: None,
        sha256: Some(schedule.sha256.clone()),
        effective_period: Some(1),
        at: at(),
        traceparent: None,
    };
    let report = ReportMsg {
        v: V1,
        store_id,
        seq: 42,
        message_id: Some(schedule.message_id.clone()),
        device_id: device.clone(),
        period: 33,
        interval_start: start,
        mode: Mode::Discharge,
        rate_kw: rate,
        status: ReportStatus::Executed,
        applied_kw: Some(rate),
        limited_by: None,
        reason: None,
        would_kw: None,
        soc_pct: Some(81.5),
        energy_kwh: Some(11.25),
        error: None,
        at: start,
        traceparent: None,
    };
    let heartbeat = HeartbeatMsg {
        v: V1,
        device_id: device,
        at: start,
        uptime_s: 86_400,
        agent_version: "0.1.0".into(),
        active_message_id: Some(schedule.message_id.clone()),
        mode: Mode::Discharge,
        rate_kw: rate,
        soc_pct: Some(81.5),
        fallback: None,
        outbox: 0,
    };
    vec![
        ("schedule", Message::Schedule(schedule)),
        ("ack", Message::Ack(ack)),
        ("report", Message::Report(report)),
        ("heartbeat", Message::Heartbeat(heartbeat)),
    ]
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("message");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (name, msg) in messages() {
        let payload = msg.encode();
        assert_eq!(Message::decode(&payload).unwrap(), msg);
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| black_box(&msg).encode())
        });
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| Message::decode(black_box(&payload)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, normalization, codec);
criterion_main!(benches);
