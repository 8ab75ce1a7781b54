//! Agents driving SunSpec controllers over Modbus TCP, as separate processes: `max300 broker`,
//! `cloud`, `battery-sim` and `agent`s on one scaled clock. The simulator's own write log is
//! the record: every period's registers must match the plan, with scale factors applied.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use max300_protocol::clock::monotonic;
use max300_protocol::{Clock, SystemClock};
use max300_sim::sunspec::{SimLogEntry, WriteOutcome, read_sim_log};
use serde_json::{Value, json};

use crate::{Proc, free_port};

const SPEED: f64 = 2000.0;
const DATE: &str = "2026-11-30";
/// Plan time starts an hour before the day, for delivery.
const CLOCK_START: &str = "2026-11-29T23:00:00Z";
/// The agents' revert timer, real seconds: re-asserted every second.
const REVERT_S: u64 = 2;

/// The day's plan: segments of (mode, kW, periods), 16 periods, played three times, shifted
/// by `shift` periods per unit so units differ. The state of charge stays inside 10–90 %.
pub fn plan(shift: usize) -> Vec<(&'static str, f64)> {
    let segments = [
        ("charge", 40.0, 4),
        ("idle", 0.0, 2),
        ("discharge", 50.0, 3),
        ("discharge", 37.5, 1),
        ("charge", 90.0, 2),
        ("idle", 0.0, 1),
        ("discharge", 80.25, 2),
        ("charge", 12.345, 1),
    ];
    let cycle: Vec<_> = segments
        .iter()
        .flat_map(|(m, kw, n)| std::iter::repeat_n((*m, *kw), *n))
        .collect();
    (0..48).map(|p| cycle[(p + shift) % cycle.len()]).collect()
}

/// The registers (StorCtl_Mod, OutWRte, InWRte) that run `mode` at `kw` on a 150 kW unit
/// whose rates are in 0.01 % of WChaMax: computed here, not with the agent's own code.
fn expected_registers(mode: &str, kw: f64) -> (u16, u16, u16) {
    let raw = (kw * 1000.0 / 150_000.0 * 10_000.0).round() as u16;
    match mode {
        "charge" => (1, 0, raw),
        "discharge" => (2, raw, 0),
        _ => (0, 0, 0),
    }
}

/// Everything a Modbus day needs, started as processes.
pub struct ModbusRig {
    /// Removed when the test passes, kept (and named) when it fails.
    tmp: Option<tempfile::TempDir>,
    pub speed: f64,
    pub dir: PathBuf,
    pub clock_args: Vec<String>,
    pub api: String,
    pub modbus: String,
    pub sim_log: PathBuf,
    pub broker: Proc,
    pub cloud: Proc,
    pub sim: Option<Proc>,
    pub agents: Vec<(String, Proc)>,
    pub http: reqwest::Client,
}

impl ModbusRig {
    /// Broker, cloud (no provider: plans are posted), `battery-sim --units N` with
    /// `sim_flags`, and one agent per unit (`unit-01`… on unit ids 1…).
    pub async fn start(units: usize, sim_flags: &[&str]) -> ModbusRig {
        ModbusRig::start_on(units, SPEED, Ok(sim_flags), "", "").await
    }

    /// As [`ModbusRig::start`], on `battery-sim` with these flags (`Ok`) or on another
    /// Modbus server at `host:port` (`Err`); `prefix` goes before the agents' battery URL
    /// (`dry-run:`) and `query` after it (`?control=704`).
    pub async fn start_on(
        units: usize,
        speed: f64,
        controller: Result<&[&str], String>,
        prefix: &str,
        query: &str,
    ) -> ModbusRig {
        let tmp = tempfile::Builder::new()
            .prefix("max300-modbus-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let anchor = SystemClock.now().to_string();
        let clock_args: Vec<String> = [
            "--clock-start",
            CLOCK_START,
            "--clock-anchor",
            &anchor,
            "--clock-speed",
            &speed.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        let mqtt = format!("mqtt://127.0.0.1:{}", free_port());
        let mut broker = Proc::start("broker", &strings(&["broker", "--mqtt", &mqtt]), &dir);
        broker.expect_line("listening on");

        let cloud_dir = dir.join("cloud").display().to_string();
        let mut args = strings(&[
            "cloud",
            "--mqtt",
            &mqtt,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            &cloud_dir,
        ]);
        args.extend(clock_args.iter().cloned());
        let mut cloud = Proc::start("cloud", &args, &dir);
        let api = cloud.expect_line("listening on");

        let sim_log = dir.join("battery-sim.jsonl");
        let (sim, modbus) = match controller {
            Ok(sim_flags) => {
                let units_flag = units.to_string();
                let sim_log_flag = sim_log.display().to_string();
                let mut args = strings(&[
                    "battery-sim",
                    "--modbus",
                    "127.0.0.1:0",
                    "--units",
                    &units_flag,
                    "--write-log",
                    &sim_log_flag,
                ]);
                args.extend(strings(sim_flags));
                args.extend(clock_args.iter().cloned());
                let mut sim = Proc::start("battery-sim", &args, &dir);
                let modbus = sim.expect_line("listening on");
                (Some(sim), modbus)
            }
            Err(addr) => (None, addr),
        };

        let http = reqwest::Client::new();
        let mut rig = ModbusRig {
            tmp: Some(tmp),
            speed,
            dir,
            clock_args,
            api,
            modbus,
            sim_log,
            broker,
            cloud,
            sim,
            agents: Vec::new(),
            http,
        };
        // The plans go in before the agents start: they fetch them with their first sync.
        rig.post_plans(units).await;
        for unit in 1..=units {
            rig.start_agent(unit, &mqtt, prefix, query);
        }
        rig
    }

    pub fn unit_id(unit: usize) -> String {
        format!("unit-{unit:02}")
    }

    fn start_agent(&mut self, unit: usize, mqtt: &str, prefix: &str, query: &str) {
        let id = Self::unit_id(unit);
        let data = self.dir.join(&id).display().to_string();
        let battery = format!("{prefix}sunspec+tcp://{}/{unit}{query}", self.modbus);
        let mut args: Vec<String> = [
            "agent",
            "--device-id",
            &id,
            "--mqtt",
            mqtt,
            "--data-dir",
            &data,
            "--battery",
            &battery,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.clock_args.iter().cloned());
        let env = vec![
            ("MAX300_HEARTBEAT_INTERVAL_S".to_owned(), "1".to_owned()),
            ("MAX300_REVERT_TIMEOUT_S".to_owned(), REVERT_S.to_string()),
            // The revert timer must be more than twice the settle wait; at 2000× the wait is
            // a tenth of a period (90 ms) anyway.
            ("MAX300_SAFETY_SETTLE_S".to_owned(), "0.5".to_owned()),
            // Many units on one disk.
            ("MAX300_DURABLE".to_owned(), "false".to_owned()),
        ];
        let agent = Proc::start_with_env(&id, &args, &env, &self.dir);
        self.agents.push((id, agent));
    }

    async fn post_plans(&self, units: usize) {
        let schedules: Vec<Value> = (1..=units)
            .map(|unit| {
                let intervals: Vec<Value> = plan(unit - 1)
                    .iter()
                    .enumerate()
                    .map(|(i, (mode, kw))| json!({"period": i + 1, "mode": mode, "rate_kw": kw}))
                    .collect();
                json!({"device_id": Self::unit_id(unit), "intervals": intervals})
            })
            .collect();
        // The next day charges at 10 kW throughout, so a unit is never idle by plan when a
        // test kills its agent at the end of the first day.
        let next_day: Vec<Value> = (1..=units)
            .map(|unit| {
                json!({"device_id": Self::unit_id(unit), "intervals": [{
                    "start": "2026-12-01T00:00:00Z", "end": "2026-12-02T00:00:00Z",
                    "mode": "charge", "rate_kw": 10
                }]})
            })
            .collect();
        for (date, schedules) in [(DATE, schedules), ("2026-12-01", next_day)] {
            let doc = json!({
                "schedule_date": date,
                "timezone": "Europe/London",
                "generated_at": "2026-11-29T15:45:00Z",
                "schedules": schedules,
            });
            let posted: Value = self
                .http
                .post(format!("{}/api/schedules", self.api))
                .body(doc.to_string())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(
                posted["accepted"].as_array().map(Vec::len),
                Some(units),
                "{posted}"
            );
        }
    }

    pub async fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.api);
        let response = self.http.get(&url).send().await.unwrap();
        assert!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    /// The day's reports of a unit, by period.
    pub async fn reports(&self, unit: usize) -> BTreeMap<u64, Value> {
        let id = Self::unit_id(unit);
        self.get(&format!("/api/devices/{id}/reports?date={DATE}"))
            .await
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["period"].as_u64().unwrap(), r.clone()))
            .collect()
    }

    /// Polls until `done` holds for every unit's reports, or panics after `limit`.
    pub async fn until_reports(
        &self,
        units: usize,
        limit: Duration,
        what: &str,
        done: impl Fn(&BTreeMap<u64, Value>) -> bool,
    ) {
        let deadline = monotonic() + limit;
        loop {
            let mut all = true;
            for unit in 1..=units {
                if !done(&self.reports(unit).await) {
                    all = false;
                    break;
                }
            }
            if all {
                return;
            }
            assert!(
                monotonic() < deadline,
                "{what}: not within {limit:?}; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> Vec<SimLogEntry> {
        read_sim_log(&self.sim_log).unwrap()
    }
}

impl Drop for ModbusRig {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(tmp) = self.tmp.take()
        {
            eprintln!("logs kept in {}", tmp.keep().display());
        }
    }
}

/// A period's start in plan time.
fn period_start(period: usize) -> Timestamp {
    let midnight: Timestamp = "2026-11-30T00:00:00Z".parse().unwrap();
    midnight
        .checked_add(SignedDuration::from_mins(30 * (period as i64 - 1)))
        .unwrap()
}

/// The period (1..=48) a plan instant falls in; 0 before the day, 49 after.
fn period_of(at: Timestamp) -> usize {
    let secs = at
        .duration_since(period_start(1))
        .as_secs()
        .clamp(-1, 48 * 1800);
    if secs < 0 {
        0
    } else {
        (secs / 1800) as usize + 1
    }
}

/// One unit's control registers, replayed from the simulator's log.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Registers {
    stor_ctl_mod: u16,
    out_w_rte: u16,
    in_w_rte: u16,
}

/// What the log says of one unit: its register state at the end of each period, the writes
/// that changed something per period, the re-asserts, and the reverts.
#[derive(Debug, Default)]
pub struct UnitRecord {
    at_end: BTreeMap<usize, (u16, u16, u16)>,
    /// Writes that changed a register, by period, with their plan time.
    changes: BTreeMap<usize, Vec<Timestamp>>,
    /// Writes of unchanged values (re-asserts).
    pub reasserts: usize,
    /// (real_ms) of every write and of every revert.
    write_ms: Vec<u64>,
    revert_ms: Vec<u64>,
}

pub fn replay(log: &[SimLogEntry], unit: u8) -> UnitRecord {
    let mut record = UnitRecord::default();
    let mut regs = Registers::default();
    let mut last_period = 0;
    for entry in log {
        match entry {
            SimLogEntry::Write {
                at,
                real_ms,
                unit: u,
                registers,
                changed,
                outcome,
                ..
            } if *u == unit => {
                let period = period_of(*at);
                for p in last_period..period {
                    record
                        .at_end
                        .insert(p, (regs.stor_ctl_mod, regs.out_w_rte, regs.in_w_rte));
                }
                last_period = last_period.max(period);
                if *outcome == WriteOutcome::Ok {
                    for (name, v) in registers {
                        match name.as_str() {
                            "StorCtl_Mod" => regs.stor_ctl_mod = *v,
                            "OutWRte" => regs.out_w_rte = *v,
                            "InWRte" => regs.in_w_rte = *v,
                            _ => {}
                        }
                    }
                }
                if *changed {
                    record.changes.entry(period).or_default().push(*at);
                } else {
                    record.reasserts += 1;
                }
                record.write_ms.push(*real_ms);
            }
            SimLogEntry::Revert {
                at,
                real_ms,
                unit: u,
            } if *u == unit => {
                let period = period_of(*at);
                for p in last_period..period {
                    record
                        .at_end
                        .insert(p, (regs.stor_ctl_mod, regs.out_w_rte, regs.in_w_rte));
                }
                last_period = last_period.max(period);
                regs = Registers::default();
                record.revert_ms.push(*real_ms);
            }
            _ => {}
        }
    }
    for p in last_period..=49 {
        record
            .at_end
            .insert(p, (regs.stor_ctl_mod, regs.out_w_rte, regs.in_w_rte));
    }
    record
}

/// Percentile `q` (0..=1) of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// The real seconds from each period's start to the first write that changed the unit's
/// registers in it, for every period whose plan differs from the one before.
pub fn lateness(record: &UnitRecord, speed: f64) -> Vec<f64> {
    record
        .changes
        .iter()
        .filter(|(p, _)| (1..=48).contains(*p))
        .filter_map(|(p, ats)| ats.first().map(|at| (p, at)))
        .map(|(p, at)| at.duration_since(period_start(*p)).as_secs_f64() / speed)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_drives_battery_sim_over_modbus_through_a_day_and_it_reverts_when_killed() {
    let mut rig = ModbusRig::start(1, &[]).await;
    // A 48-period day takes 43 s at 2000×; the last period is reported when it ends, as the
    // next day's plan (charging) takes over.
    rig.until_reports(1, Duration::from_secs(120), "period 48 reported", |r| {
        r.contains_key(&48)
    })
    .await;
    // Kill the agent mid-period (the next day's first): nobody re-asserts any more.
    rig.agents[0].1.child.kill().unwrap();
    rig.agents[0].1.child.wait().unwrap();

    let deadline = monotonic() + Duration::from_secs(REVERT_S + 10);
    let record = loop {
        let record = replay(&rig.log(), 1);
        if !record.revert_ms.is_empty() {
            break record;
        }
        assert!(
            monotonic() < deadline,
            "battery-sim never reverted to idle; logs in {}",
            rig.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Every period executed, and the registers matched the plan at the end of each.
    let reports = rig.reports(1).await;
    let plan = plan(0);
    for (i, (mode, kw)) in plan.iter().enumerate() {
        let period = i + 1;
        let report = &reports[&(period as u64)];
        assert_eq!(report["status"], "executed", "period {period}: {report}");
        assert_eq!(
            report["limited_by"],
            Value::Null,
            "period {period}: {report}"
        );
        assert_eq!(
            record.at_end[&period],
            expected_registers(mode, *kw),
            "period {period} ({mode} {kw} kW): registers at its end; logs in {}",
            rig.dir.display()
        );
    }
    // A write changed the registers in exactly the periods whose plan changed (period 1
    // changes from idle), once each, and in no other period.
    for (i, setpoint) in plan.iter().enumerate() {
        let period = i + 1;
        let before = if i == 0 { ("idle", 0.0) } else { plan[i - 1] };
        let changes = record.changes.get(&period).map_or(0, Vec::len);
        if *setpoint == before || (setpoint.0 == "idle" && before.0 == "idle") {
            assert_eq!(
                changes, 0,
                "period {period}: no change, no write: {record:?}"
            );
        } else {
            // The rates block, and the mode register when the mode changes.
            let mode_too = usize::from(setpoint.0 != before.0);
            assert_eq!(changes, 1 + mode_too, "period {period}: {record:?}");
        }
    }
    // The rest were re-asserts, about one per second (half the revert timer), and the timer
    // never ran out while the agent lived.
    let day_s = 48.0 * 1800.0 / SPEED;
    assert!(
        record.reasserts as f64 <= day_s + 10.0 && record.reasserts as f64 >= day_s / 2.0,
        "{} re-asserts in a {day_s} s day",
        record.reasserts
    );
    assert_eq!(record.revert_ms.len(), 1, "{record:?}");
    // It went idle by itself one revert timer after the last write it heard.
    let last_write = *record.write_ms.last().unwrap();
    let silence = record.revert_ms[0] - last_write;
    assert!(
        // The simulator notices within 50 ms; a loaded machine adds more.
        (REVERT_S * 1000..REVERT_S * 1000 + 1500).contains(&silence),
        "idle {silence} ms after the last write"
    );
    assert_eq!(record.at_end[&49], (0, 0, 0));

    let mut sim = rig.sim.take().unwrap();
    for p in [&mut rig.cloud, &mut sim, &mut rig.broker] {
        let status = p.stop();
        assert!(status.success(), "{} exited with {status}", p.name);
    }
}

/// Plays a fault from 02:00 and returns the rig once period 10 is reported.
async fn day_with_fault(fault: &str) -> ModbusRig {
    let rig = ModbusRig::start(
        1,
        &["--fault", fault, "--fault-from", "2026-11-30T02:00:00Z"],
    )
    .await;
    rig.until_reports(1, Duration::from_secs(90), "period 10 reported", |r| {
        r.contains_key(&10)
    })
    .await;
    rig
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_that_stops_answering_goes_idle_and_the_agent_reports_the_fault() {
    let rig = day_with_fault("silent").await;
    let reports = rig.reports(1).await;
    for period in 1..=4 {
        assert_eq!(
            reports[&period]["status"], "executed",
            "{}",
            reports[&period]
        );
    }
    // From 02:00 (period 5) nothing answers: each period fails, saying why.
    let failed: Vec<_> = reports
        .values()
        .filter(|r| r["period"].as_u64().unwrap() >= 6 && r["status"] == "failed")
        .collect();
    assert!(!failed.is_empty(), "{reports:?}");
    for r in &failed {
        let error = r["error"].as_str().unwrap();
        assert!(error.contains("no answer within 1000 ms"), "{r}");
    }
    // The heartbeat says controller_fault.
    let deadline = monotonic() + Duration::from_secs(20);
    loop {
        let devices = rig.get("/api/devices").await;
        if devices[0]["fallback"] == "controller_fault" {
            break;
        }
        assert!(monotonic() < deadline, "{devices}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the controller, hearing nothing, went idle by itself.
    let record = replay(&rig.log(), 1);
    assert_eq!(record.revert_ms.len(), 1, "{record:?}");
    assert_eq!(*record.at_end.last_key_value().unwrap().1, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setpoint_that_does_not_stick_is_reported_failed() {
    let rig = day_with_fault("stuck").await;
    let reports = rig.reports(1).await;
    for period in 1..=4 {
        assert_eq!(
            reports[&period]["status"], "executed",
            "{}",
            reports[&period]
        );
    }
    // Period 5 changes charge 40 kW to idle: the controller acknowledges and keeps charging.
    let r = &reports[&5];
    assert_eq!(r["status"], "failed", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("read back StorCtl_Mod = 1, but 0 was written"),
        "{r}"
    );
    // What it reports as applied is what the unit still runs: the 40 kW charge.
    let applied = r["applied_kw"].as_f64().unwrap();
    assert!((applied - 40.0).abs() < 1.0, "{r}");
    let log = rig.log();
    assert!(log.iter().any(|e| matches!(
        e,
        SimLogEntry::Write {
            outcome: WriteOutcome::Stuck,
            ..
        }
    )));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_reads_the_controller_never_writes_and_says_what_it_would_do() {
    let rig = ModbusRig::start_on(1, SPEED, Ok(&[]), "dry-run:", "").await;
    rig.until_reports(1, Duration::from_secs(90), "period 8 reported", |r| {
        r.contains_key(&8)
    })
    .await;
    let reports = rig.reports(1).await;
    let plan = plan(0);
    for period in 1..=8u64 {
        let r = &reports[&period];
        let (mode, kw) = plan[period as usize - 1];
        assert_eq!(r["status"], "skipped", "{r}");
        assert_eq!(r["reason"], "dry_run", "{r}");
        assert_eq!(r["mode"], mode, "{r}");
        assert_eq!(r["would_kw"].as_f64(), Some(kw), "{r}");
        assert_eq!(r["applied_kw"], Value::Null, "{r}");
        // Read from ChaState: the sim's unit, untouched, stays where it started.
        assert_eq!(r["soc_pct"].as_f64(), Some(50.0), "{r}");
    }
    let deadline = monotonic() + Duration::from_secs(20);
    loop {
        let devices = rig.get("/api/devices").await;
        if devices[0]["fallback"] == "dry_run" {
            break;
        }
        assert!(monotonic() < deadline, "{devices}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let writes = rig
        .log()
        .into_iter()
        .filter(|e| matches!(e, SimLogEntry::Write { .. }))
        .count();
    assert_eq!(writes, 0, "a dry run never writes");
}

/// Writes per period and boundary lateness with 20 agents on one `battery-sim --units 20`
/// for a simulated day. Run with `--ignored --nocapture` to see the figures (they are in
/// docs/performance.md).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: 20 agents for a simulated day (about a minute)"]
async fn twenty_agents_on_modbus_for_a_day() {
    let units = 20;
    let rig = ModbusRig::start(units, &[]).await;
    rig.until_reports(
        units,
        Duration::from_secs(180),
        "period 48 everywhere",
        |r| r.contains_key(&48),
    )
    .await;
    let log = rig.log();
    let mut late = Vec::new();
    let (mut changes, mut reasserts) = (0, 0);
    for unit in 1..=units {
        let reports = rig.reports(unit).await;
        let executed = reports
            .values()
            .filter(|r| r["status"] == "executed")
            .count();
        assert_eq!(executed, 48, "unit {unit}: {reports:?}");
        let record = replay(&log, unit as u8);
        assert!(
            record.revert_ms.is_empty(),
            "unit {unit} reverted: {record:?}"
        );
        late.extend(lateness(&record, rig.speed));
        changes += record
            .changes
            .iter()
            .filter(|(p, _)| (1..=48).contains(*p))
            .map(|(_, v)| v.len())
            .sum::<usize>();
        reasserts += record.reasserts;
    }
    late.sort_by(f64::total_cmp);
    let periods = (units * 48) as f64;
    println!(
        "units {units}, speed {SPEED}x: writes per unit-period {:.2} (changes {:.2}, re-asserts {:.2}); \
         boundary lateness over {} changed periods: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        (changes + reasserts) as f64 / periods,
        changes as f64 / periods,
        reasserts as f64 / periods,
        late.len(),
        percentile(&late, 0.5) * 1000.0,
        percentile(&late, 0.99) * 1000.0,
        late.last().copied().unwrap_or(f64::NAN) * 1000.0,
    );
}

/// A Python child process, killed when dropped.
struct Python(std::process::Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tests/pymodbus/sunspec_server.py` on a free port, once it says it listens.
fn start_pymodbus(dir: &std::path::Path) -> (Python, u16) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let check = Command::new("python3")
        .args(["-c", "import pymodbus; print(pymodbus.__version__)"])
        .output()
        .expect("python3 is needed for this test (.ci/run installs it)");
    assert!(
        check.status.success(),
        "pymodbus is needed: pip install 'pymodbus>=3.6,<4' ({})",
        String::from_utf8_lossy(&check.stderr)
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/pymodbus/sunspec_server.py");
    // The script cannot report a port-0 bind: reserve one, and try again if it was taken.
    for _ in 0..5 {
        let port = free_port();
        let log = std::fs::File::create(dir.join("pymodbus.log")).unwrap();
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("python3 starts");
        let stdout = child.stdout.take().unwrap();
        let server = Python(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with("listening on") => return (server, port),
            _ => continue,
        }
    }
    panic!(
        "the pymodbus server did not start; see {}/pymodbus.log",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs python3 with pymodbus (installed by .ci/run)"]
async fn the_agent_drives_a_third_party_pymodbus_sunspec_server() {
    use tokio_modbus::client::Reader;

    let logs = tempfile::tempdir().unwrap();
    let (_server, port) = start_pymodbus(logs.path());
    let addr = format!("127.0.0.1:{port}");
    // Slower than the other days, so each period's registers can be read while it runs.
    let rig = ModbusRig::start_on(1, 600.0, Err(addr.clone()), "", "").await;
    let mut ctx =
        tokio_modbus::client::tcp::connect_slave(addr.parse().unwrap(), tokio_modbus::Slave(1))
            .await
            .unwrap();
    let plan = plan(0);
    for period in 1..=8u64 {
        rig.until_reports(1, Duration::from_secs(60), "the next period", |r| {
            r.contains_key(&period)
        })
        .await;
        let report = &rig.reports(1).await[&period];
        assert_eq!(report["status"], "executed", "{report}");
        assert_eq!(report["soc_pct"], 61.5, "ChaState 615 × 10^-1: {report}");
        // Model 124 at 40070 (after SunS and the 68 registers of model 1).
        let block = ctx
            .read_holding_registers(40070, 26)
            .await
            .unwrap()
            .unwrap();
        // A period is reported when it ends: the next one runs now.
        let (mode, kw) = plan[period as usize];
        // WChaMax is 1000 × 10^2 W = 100 kW, so a kW is 1 % and 100 register steps.
        let raw = (kw * 100.0).round() as u16;
        let expected = match mode {
            "charge" => (1, 0, raw),
            "discharge" => (2, raw, 0),
            _ => (0, 0, 0),
        };
        assert_eq!(
            (block[5], block[12], block[13]),
            expected,
            "period {}: {mode} {kw} kW; StorCtl_Mod, OutWRte, InWRte",
            period + 1
        );
        assert_eq!(block[15], REVERT_S as u16, "InOutWRte_RvrtTms");
    }
}

/// `WSet` (int32, in `WSet_SF` = 1 steps of 10 W, positive discharging) for `mode` at `kw`:
/// computed here, not with the agent's own code.
fn expected_w_set(mode: &str, kw: f64) -> i32 {
    let steps = (kw * 1000.0 / 10.0).round() as i32;
    match mode {
        "charge" => -steps,
        "discharge" => steps,
        _ => 0,
    }
}

/// One unit's `WSet` at the end of each period from 1 to `last`, replayed from the
/// simulator's log (writes it took, and reverts to 0); read it once `last` has ended.
fn w_set_at_period_ends(log: &[SimLogEntry], unit: u8, last: usize) -> BTreeMap<usize, i32> {
    let mut words = [0u16; 2];
    let mut at_end = BTreeMap::new();
    let mut period = 1;
    let mut close_until = |at: Timestamp, words: [u16; 2], at_end: &mut BTreeMap<usize, i32>| {
        while period <= last && at >= period_start(period + 1) {
            at_end.insert(
                period,
                ((u32::from(words[0]) << 16) | u32::from(words[1])) as i32,
            );
            period += 1;
        }
    };
    for entry in log {
        match entry {
            SimLogEntry::Write {
                at,
                unit: u,
                registers,
                outcome: WriteOutcome::Ok,
                ..
            } if *u == unit => {
                close_until(*at, words, &mut at_end);
                if let Some(hi) = registers.get("WSet (high word)") {
                    words[0] = *hi;
                }
                if let Some(lo) = registers.get("WSet (low word)") {
                    words[1] = *lo;
                }
            }
            SimLogEntry::Revert { at, unit: u, .. } if *u == unit => {
                close_until(*at, words, &mut at_end);
                words = [0, 0];
            }
            _ => {}
        }
    }
    // The caller reads the log once `last` has ended: what the log ends with held to then.
    close_until(period_start(last + 1), words, &mut at_end);
    at_end
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_drives_model_704_with_signed_wset_and_its_scale_factor() {
    let rig = ModbusRig::start_on(1, SPEED, Ok(&["--der-models"]), "", "?control=704").await;
    rig.until_reports(1, Duration::from_secs(90), "period 12 reported", |r| {
        r.contains_key(&12)
    })
    .await;
    let reports = rig.reports(1).await;
    let plan = plan(0);
    // Period 12 may still run: its end is not in the log yet.
    let w_set = w_set_at_period_ends(&rig.log(), 1, 11);
    for period in 1..=11 {
        let (mode, kw) = plan[period - 1];
        let r = &reports[&(period as u64)];
        assert_eq!(r["status"], "executed", "period {period}: {r}");
        // The state of charge comes from model 713.
        let soc = r["soc_pct"].as_f64().unwrap();
        assert!((10.0..=90.0).contains(&soc), "period {period}: {r}");
        assert_eq!(
            w_set.get(&period).copied(),
            Some(expected_w_set(mode, kw)),
            "period {period} ({mode} {kw} kW): WSet at its end; logs in {}",
            rig.dir.display()
        );
    }
    // Every write went to model 704; model 124's control registers were never touched.
    let log = rig.log();
    let names: std::collections::BTreeSet<String> = log
        .iter()
        .filter_map(|e| match e {
            SimLogEntry::Write { registers, .. } => Some(registers.keys().cloned()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("WSet")),
        "written: {names:?}"
    );
    assert!(names.contains("WSetRvrtTms (low word)"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unit_that_takes_the_setpoint_but_delivers_no_power_is_reported_failed() {
    let rig = day_with_fault("no_power").await;
    let reports = rig.reports(1).await;
    let plan = plan(0);
    for period in 1..=4 {
        assert_eq!(
            reports[&period]["status"], "executed",
            "{}",
            reports[&period]
        );
    }
    // From 02:00 (period 5) the registers take every write but nothing flows: each period
    // that asks for power fails, reporting the power measured (0).
    let mut asked = 0;
    for period in 5..=10u64 {
        let (mode, kw) = plan[period as usize - 1];
        let r = &reports[&period];
        if mode == "idle" {
            continue;
        }
        asked += 1;
        assert_eq!(
            r["status"], "failed",
            "period {period} ({mode} {kw} kW): {r}"
        );
        assert_eq!(r["applied_kw"].as_f64(), Some(0.0), "period {period}: {r}");
        let error = r["error"].as_str().unwrap();
        let expected = if mode == "charge" { kw } else { -kw };
        assert!(
            error.contains("measured 0.0 kW")
                && error.contains(&format!("expected {expected:.1} kW")),
            "period {period}: {r}"
        );
    }
    assert!(asked > 0, "the plan asks for power after 02:00");
    // The simulator held the writes without delivering them.
    assert!(rig.log().iter().any(|e| matches!(
        e,
        SimLogEntry::Write {
            outcome: WriteOutcome::NoPower,
            ..
        }
    )));
}
