//! `max300 bench agent`: what one edge agent costs and how punctual it is, through the real
//! agent (its SQLite store, the simulated battery), the embedded broker, and the
//! [`FakeCloud`], one MQTT session sending plans and receipting acks and reports.
//!
//! Three measurements, each on the component that answers it most directly:
//!
//! ```text
//!  memory    `max300 agent` as a child process (its RSS is one agent's, nothing else's),
//!            durable store, a scaled clock; /proc/<pid>/status sampled every 500 ms
//!            while it plays --days of plans at --speed.
//!  lateness  the simulated battery's write log: each line carries the plan instant `at` at
//!            which the controller took the setpoint, so (at - period start) / speed is the
//!            real time from the boundary to the apply. 1 agent: the child above. N agents:
//!            in one process as `up` runs them, durable = false.
//!  ack       a second child (durable, speed 1): schedule published -> ack received at the
//!            cloud session, so two broker hops, the decode, the checks and the fsync.
//! ```

use max300_protocol::error::Chain;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use jiff::civil::Date;
use jiff::{SignedDuration, Timestamp};
use max300_agent::AgentConfig;
use max300_agent::SimConfig;
use max300_agent::battery::sunspec::map::Meter;
use max300_mqtt::broker;
use max300_protocol::clock::monotonic;
use max300_protocol::day::time_zone;
use max300_protocol::message::{AckStatus, HeartbeatMsg, ScheduleMsg, V1};
use max300_protocol::{
    Clock, DEFAULT_TIMEZONE, Day, DeviceId, Message, MessageId, Mode, RateKw, ScaledClock,
    Schedule, Setpoint, SystemClock,
};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::battery::{WriteLogEntry, read_write_log};
use crate::cloud::{FakeCloud, Receipts};
use crate::sunspec::{SimServerConfig, SunSpecSim};

/// `max300 bench agent`
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Agents in one process for the fleet lateness run.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Days of plans the single agent plays (48 periods each).
    #[arg(long, default_value_t = 7)]
    pub days: u32,
    /// Plan time speed of the single agent's run (20000: a week in about 30 s).
    #[arg(long, default_value_t = 20_000.0)]
    pub speed: f64,
    /// Plan time speed of the fleet run: slow enough that every agent finishes one boundary's
    /// work (apply, report, commit) well before the next.
    #[arg(long, default_value_t = 600.0)]
    pub fleet_speed: f64,
    /// Period boundaries measured in the fleet run, once every agent holds its plan.
    #[arg(long, default_value_t = 10)]
    pub fleet_periods: u32,
    /// Schedules sent one after another to the durable agent, timing each to its ack.
    #[arg(long, default_value_t = 100)]
    pub schedules: usize,
    /// The binary whose `agent` runs in its own process for the memory and ack figures,
    /// e.g. the agent-only `--profile pi` build. Default: this binary. An agent-only build
    /// has no simulated battery, so with this flag its unit is a battery-sim that the bench
    /// serves on loopback (`--battery sunspec+tcp://…`), as a Pi drives its controller.
    #[arg(long)]
    pub agent_binary: Option<std::path::PathBuf>,
}

/// The first day played: a winter week (48 periods a day, no clock change), fixed so runs
/// compare.
const FIRST: Date = jiff::civil::date(2026, 11, 30);
/// Real time the single agent gets to start and take its first plan before plan time reaches
/// the first day.
const LEAD: Duration = Duration::from_secs(5);
/// How long any one thing the bench waits for may take before it gives up.
const PATIENCE: Duration = Duration::from_secs(60);
/// Real time between two samples of the child's memory.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
const PERIOD: SignedDuration = SignedDuration::from_mins(30);

/// Runs the three measurements and prints the table and the closing line.
pub async fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    check(&args)?;
    let dir = tempfile::Builder::new()
        .prefix("max300-bench-agent-")
        .tempdir()?;
    let exe = match &args.agent_binary {
        Some(path) if !path.is_file() => {
            anyhow::bail!("--agent-binary: {} is not a file", path.display())
        }
        Some(path) => path.clone(),
        None => std::env::current_exe().context("cannot find this binary to run the agent")?,
    };
    let addr = broker::start("127.0.0.1:0".parse()?, args.agents + 16)?;
    let mqtt = format!("mqtt://{addr}");
    let shutdown = CancellationToken::new();
    let result = measure(&args, dir.path(), &exe, &mqtt, &shutdown).await;
    shutdown.cancel();
    let figures = result?;
    print!("{}", figures.render(&args));
    Ok(ExitCode::SUCCESS)
}

fn check(args: &AgentArgs) -> anyhow::Result<()> {
    if !(1..=5000).contains(&args.agents) {
        anyhow::bail!("--agents: {} is not within 1..=5000", args.agents);
    }
    if !(1..=31).contains(&args.days) {
        anyhow::bail!("--days: {} is not within 1..=31", args.days);
    }
    for (flag, speed) in [("--speed", args.speed), ("--fleet-speed", args.fleet_speed)] {
        // Above 100000 a period lasts under 18 ms of real time, about what one boundary's
        // work takes: the bench would measure the backlog, not the agent.
        if !(speed.is_finite() && speed > 0.0 && speed <= 100_000.0) {
            anyhow::bail!("{flag}: {speed} is not a number above 0 and at most 100000");
        }
    }
    if !(1..=48).contains(&args.fleet_periods) {
        anyhow::bail!(
            "--fleet-periods: {} is not within 1..=48",
            args.fleet_periods
        );
    }
    if !(1..=10_000).contains(&args.schedules) {
        anyhow::bail!("--schedules: {} is not within 1..=10000", args.schedules);
    }
    Ok(())
}

struct Figures {
    rss_start_kb: u64,
    rss_max_kb: u64,
    rss_last_kb: u64,
    rss_peak_kb: u64,
    samples: usize,
    single: Lateness,
    fleet: Lateness,
    acks: Vec<f64>,
    /// The cloud session's publish to itself through the broker: the part of `acks` that is
    /// not the agent's.
    echo: Vec<f64>,
}

async fn measure(
    args: &AgentArgs,
    dir: &Path,
    exe: &Path,
    mqtt: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Figures> {
    let url = mqtt.parse().with_context(|| format!("broker {mqtt}"))?;
    let mut cloud = FakeCloud::connect(
        url,
        "bench-cloud",
        Receipts::Every,
        PATIENCE,
        shutdown.child_token(),
    )
    .await?;
    let tz = time_zone(DEFAULT_TIMEZONE)?;
    let mut days = vec![Day::new(FIRST, tz.clone())?];
    while days.len() < args.days as usize {
        let next = days.last().map(Day::next).transpose()?;
        days.extend(next);
    }

    eprintln!(
        "1/3 one agent process, {} days at {}x",
        args.days, args.speed
    );
    let week = week(args, &days, dir, exe, mqtt, &mut cloud).await?;
    eprintln!("2/3 {} schedules to a durable agent", args.schedules);
    let echo = echo(args, &mut cloud).await?;
    let acks = acks(args, dir, exe, mqtt, &mut cloud).await?;
    eprintln!(
        "3/3 {} agents in one process at {}x",
        args.agents, args.fleet_speed
    );
    let fleet = fleet(args, dir, mqtt, &mut cloud, shutdown).await?;
    Ok(Figures {
        acks,
        echo,
        fleet,
        ..week
    })
}

// ---- 1. one agent process over the days ----

async fn week(
    args: &AgentArgs,
    days: &[Day],
    dir: &Path,
    exe: &Path,
    mqtt: &str,
    cloud: &mut FakeCloud,
) -> anyhow::Result<Figures> {
    let device = DeviceId::parse("bench-week")?;
    let data = dir.join("week");
    // Both processes read plan time off the same anchor, so the bench knows the agent's now.
    let anchor = SystemClock.now() + LEAD;
    let clock = ScaledClock::new(days[0].start(), anchor, args.speed);
    let mut child = Child::start(
        exe,
        &device,
        &data,
        mqtt,
        (days[0].start(), anchor, args.speed),
        args.agent_binary.is_some(),
    )
    .await?;
    let pid = child.pid;
    cloud
        .wait_for("the agent's first message", PATIENCE, |m| {
            m.device_id() == &device
        })
        .await
        .with_context(|| child.log_hint())?;
    let rss_start_kb = memory(pid, "VmRSS:").with_context(|| child.log_hint())?;

    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_memory(pid, stop_sampling.clone()));

    let mut planned = Vec::new();
    for (i, day) in days.iter().enumerate() {
        // As the cloud does: tomorrow's plan at 16:00 today (the first one at once).
        let send_at = day.start() - SignedDuration::from_hours(8);
        cloud.idle_until(&clock, send_at).await?;
        let msg = plan(&device, day, 1)?;
        cloud.send(&device, &Message::Schedule(msg.clone())).await?;
        let mid = msg.message_id.clone();
        let acked = cloud
            .wait_for(
                "an ack of the day's plan",
                PATIENCE,
                |m| matches!(m, Message::Ack(a) if a.message_id == mid),
            )
            .await
            .with_context(|| format!("day {} ({})", i + 1, day.date()))
            .with_context(|| child.log_hint())?;
        let from = match &acked {
            Message::Ack(a) if a.status == AckStatus::Accepted => a.effective_period.unwrap_or(1),
            other => anyhow::bail!(
                "day {} ({}): plan not accepted: {other:?}",
                i + 1,
                day.date()
            ),
        };
        for period in from..=day.period_count() {
            planned.push((day.period_start(period), setpoint_of(period)?));
        }
    }
    let end = days.last().map(Day::end).unwrap_or(clock.now());
    // One period more: the last period is reported at the boundary after it.
    cloud.idle_until(&clock, end + PERIOD).await?;
    let rss_last_kb = memory(pid, "VmRSS:").with_context(|| child.log_hint())?;
    let rss_peak_kb = memory(pid, "VmHWM:").with_context(|| child.log_hint())?;
    stop_sampling.cancel();
    let samples = sampler.await.context("the memory sampler stopped")?;
    child.stop().await;

    let log = read_write_log(data.join("battery-writes.jsonl"))?;
    let single = Lateness::of(&[log], &planned, args.speed);
    Ok(Figures {
        rss_start_kb,
        rss_max_kb: samples.iter().copied().max().unwrap_or(rss_last_kb),
        rss_last_kb,
        rss_peak_kb,
        samples: samples.len(),
        single,
        fleet: Lateness::default(),
        acks: Vec::new(),
        echo: Vec::new(),
    })
}

/// Samples the child's resident memory until stopped or until it exits.
async fn sample_memory(pid: u32, stop: CancellationToken) -> Vec<u64> {
    let mut samples = Vec::new();
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return samples,
            _ = every.tick() => match memory(pid, "VmRSS:") {
                Ok(kb) => samples.push(kb),
                Err(_) => return samples,
            },
        }
    }
}

/// One field of /proc/<pid>/status, in KiB.
fn memory(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .with_context(|| format!("{path}: cannot read (has the agent exited?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .with_context(|| format!("{path}: no {field} line"))
}

// ---- 2. schedule -> ack ----

/// The broker's share of an ack's time: a message from the cloud session to itself, one
/// publish and one delivery (an ack is two of each).
async fn echo(args: &AgentArgs, cloud: &mut FakeCloud) -> anyhow::Result<Vec<f64>> {
    let device = DeviceId::parse("bench-echo")?;
    let mut took = Vec::new();
    for i in 0..args.schedules.min(20) as u64 {
        let heartbeat = Message::Heartbeat(HeartbeatMsg {
            v: V1,
            device_id: device.clone(),
            at: SystemClock.now(),
            uptime_s: i,
            agent_version: "bench".into(),
            active_message_id: None,
            mode: Mode::Idle,
            rate_kw: RateKw::ZERO,
            soc_pct: None,
            fallback: None,
            outbox: 0,
        });
        let t0 = monotonic();
        cloud.send(&device, &heartbeat).await?;
        cloud
            .wait_for(
                "the cloud's own heartbeat",
                PATIENCE,
                |m| matches!(m, Message::Heartbeat(h) if h.device_id == device && h.uptime_s == i),
            )
            .await?;
        took.push(monotonic().saturating_duration_since(t0).as_secs_f64() * 1000.0);
    }
    Ok(took)
}

async fn acks(
    args: &AgentArgs,
    dir: &Path,
    exe: &Path,
    mqtt: &str,
    cloud: &mut FakeCloud,
) -> anyhow::Result<Vec<f64>> {
    let device = DeviceId::parse("bench-acks")?;
    let tz = time_zone(DEFAULT_TIMEZONE)?;
    let day = Day::new(FIRST, tz)?;
    // Noon the day before, on a clock that runs at real speed: every version is accepted
    // for a whole day ahead, and no boundary work interleaves with the acks.
    let anchor = SystemClock.now();
    let start = day.start() - SignedDuration::from_hours(12);
    let mut child = Child::start(
        exe,
        &device,
        &dir.join("acks"),
        mqtt,
        (start, anchor, 1.0),
        args.agent_binary.is_some(),
    )
    .await?;
    cloud
        .wait_for("the agent's first message", PATIENCE, |m| {
            m.device_id() == &device
        })
        .await
        .with_context(|| child.log_hint())?;
    let mut took = Vec::with_capacity(args.schedules);
    for version in 1..=args.schedules {
        let msg = plan(&device, &day, u32::try_from(version)?)?;
        let mid = msg.message_id.clone();
        let t0 = monotonic();
        cloud.send(&device, &Message::Schedule(msg)).await?;
        let ack = cloud
            .wait_for(
                "an ack",
                PATIENCE,
                |m| matches!(m, Message::Ack(a) if a.message_id == mid),
            )
            .await
            .with_context(|| format!("schedule version {version}"))
            .with_context(|| child.log_hint())?;
        took.push(monotonic().saturating_duration_since(t0).as_secs_f64() * 1000.0);
        if let Message::Ack(a) = &ack
            && a.status != AckStatus::Accepted
        {
            anyhow::bail!("schedule version {version} not accepted: {a:?}");
        }
    }
    child.stop().await;
    Ok(took)
}

// ---- 3. N agents in one process ----

async fn fleet(
    args: &AgentArgs,
    dir: &Path,
    mqtt: &str,
    cloud: &mut FakeCloud,
    shutdown: &CancellationToken,
) -> anyhow::Result<Lateness> {
    let tz = time_zone(DEFAULT_TIMEZONE)?;
    let days = [
        Day::new(FIRST, tz.clone())?,
        Day::new(FIRST.tomorrow()?, tz)?,
    ];
    let clock: Arc<dyn Clock> = Arc::new(ScaledClock::new(
        days[0].start(),
        SystemClock.now(),
        args.fleet_speed,
    ));
    let agents = shutdown.child_token();
    let mut set = JoinSet::new();
    let mut ids = Vec::with_capacity(args.agents);
    for i in 1..=args.agents {
        let id = DeviceId::parse(format!("bench-{i:04}"))?;
        let env = vec![
            ("MAX300_DEVICE_ID".to_owned(), id.to_string()),
            (
                "MAX300_DATA_DIR".to_owned(),
                data_dir(dir, &id).display().to_string(),
            ),
            ("MAX300_MQTT".to_owned(), mqtt.to_owned()),
            // One disk stands in for N units' disks: N fsyncs a boundary would measure the
            // disk's queue, not the agents. The single agent above runs durable.
            ("MAX300_DURABLE".to_owned(), "false".to_owned()),
            ("MAX300_CLOCK_SYNC".to_owned(), "assume".to_owned()),
        ];
        let config = AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, None, &env)
            .with_context(|| format!("agent {id}"))?;
        let (clock, stop, name) = (clock.clone(), agents.clone(), id.clone());
        set.spawn(async move {
            if let Err(e) = crate::run_agent(config, clock, stop).await {
                tracing::error!(device_id = %name, error = %Chain(&e), "agent stopped");
            }
        });
        ids.push(id);
    }
    let result = play_fleet(args, &days, &ids, dir, &*clock, cloud).await;
    agents.cancel();
    while set.join_next().await.is_some() {}
    result
}

async fn play_fleet(
    args: &AgentArgs,
    days: &[Day],
    ids: &[DeviceId],
    dir: &Path,
    clock: &dyn Clock,
    cloud: &mut FakeCloud,
) -> anyhow::Result<Lateness> {
    let mut waiting: std::collections::HashSet<&DeviceId> = ids.iter().collect();
    let deadline = monotonic() + PATIENCE * 3;
    while !waiting.is_empty() {
        let seen = cloud
            .next_before(deadline)
            .await
            .with_context(|| format!("{} agents never connected", waiting.len()))?;
        waiting.remove(seen.device_id());
    }
    let mut pending = std::collections::HashSet::new();
    for id in ids {
        for day in days {
            let msg = plan(id, day, 1)?;
            pending.insert(msg.message_id.clone());
            cloud.send(id, &Message::Schedule(msg)).await?;
        }
    }
    let deadline = monotonic() + PATIENCE * 3;
    while !pending.is_empty() {
        let seen = cloud
            .next_before(deadline)
            .await
            .with_context(|| format!("{} plans never acknowledged", pending.len()))?;
        if let Message::Ack(a) = seen {
            pending.remove(&a.message_id);
        }
    }
    let ready = clock.now();
    let mut measured = Vec::new();
    for day in days {
        for period in 1..=day.period_count() {
            let start = day.period_start(period);
            if start > ready && measured.len() < args.fleet_periods as usize {
                measured.push((start, setpoint_of(period)?));
            }
        }
    }
    if measured.len() < args.fleet_periods as usize {
        anyhow::bail!(
            "the agents took until {ready} to hold their plans: too late to measure {} \
             boundaries; lower --fleet-speed",
            args.fleet_periods
        );
    }
    let last = measured.last().map_or(ready, |(start, _)| *start);
    cloud.idle_until(clock, last + PERIOD).await?;
    let mut logs = Vec::with_capacity(ids.len());
    for id in ids {
        logs.push(read_write_log(
            data_dir(dir, id).join("battery-writes.jsonl"),
        )?);
    }
    Ok(Lateness::of(&logs, &measured, args.fleet_speed))
}

fn data_dir(dir: &Path, id: &DeviceId) -> PathBuf {
    dir.join("fleet").join(id.as_str())
}

// ---- plans and lateness ----

/// Charge and discharge in turn at 20 kW: every period differs from the one before, so every
/// boundary is a write the log records, and the state of charge stays near where it started
/// (the safety window never clamps).
fn setpoint_of(period: u32) -> anyhow::Result<Setpoint> {
    let mode = if period % 2 == 1 {
        Mode::Charge
    } else {
        Mode::Discharge
    };
    Ok(Setpoint::new(mode, RateKw::try_from(20.0)?)?)
}

fn plan(device: &DeviceId, day: &Day, version: u32) -> anyhow::Result<ScheduleMsg> {
    let setpoints = (1..=day.period_count())
        .map(setpoint_of)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let schedule = Schedule::new(device.clone(), day.clone(), setpoints)
        .context("a plan of the day's period count")?;
    let at = day.start() - SignedDuration::from_hours(8);
    Ok(ScheduleMsg::new(
        &schedule,
        MessageId::generate(at),
        version,
        at,
    ))
}

/// Real milliseconds from each planned boundary to the write that applied it.
#[derive(Default)]
struct Lateness {
    ms: Vec<f64>,
    /// Planned boundaries with no write of their setpoint within the period.
    missed: usize,
}

impl Lateness {
    /// For every agent's log and every `(period start, setpoint)`, the first write of that
    /// setpoint at or after the start and within the period (a re-assert that lands first
    /// also puts the new setpoint in effect, so it counts as the apply).
    fn of(logs: &[Vec<WriteLogEntry>], planned: &[(Timestamp, Setpoint)], speed: f64) -> Self {
        let mut out = Lateness::default();
        for log in logs {
            for (start, setpoint) in planned {
                let end = *start + PERIOD;
                let first = log.iter().find(|e| {
                    !e.revert
                        && !e.start
                        && e.at >= *start
                        && e.at < end
                        && e.setpoint() == Some(*setpoint)
                });
                match first {
                    Some(e) => out
                        .ms
                        .push(e.at.duration_since(*start).as_secs_f64() / speed * 1000.0),
                    None => out.missed += 1,
                }
            }
        }
        out.ms.sort_by(f64::total_cmp);
        out
    }

    fn pct(&self, q: f64) -> f64 {
        pct(&self.ms, q)
    }
}

/// The `q` quantile (nearest rank) of sorted values; NaN when there are none.
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Figures {
    fn render(&self, args: &AgentArgs) -> String {
        use std::fmt::Write as _;
        let mb = |kb: u64| kb as f64 / 1024.0;
        let mut acks = self.acks.clone();
        acks.sort_by(f64::total_cmp);
        let mut echo = self.echo.clone();
        echo.sort_by(f64::total_cmp);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<46} {:>6} {:>9} {:>9} {:>9}",
            "measure", "n", "p50", "p99", "max"
        );
        let _ = writeln!(
            out,
            "{:<46} {:>6} {:>9.1} {:>9.1} {:>9.1}   (after start, last, max of {} samples; VmHWM {:.1})",
            format!("agent RSS, own process, {} days (MB)", args.days),
            "",
            mb(self.rss_start_kb),
            mb(self.rss_last_kb),
            mb(self.rss_max_kb),
            self.samples,
            mb(self.rss_peak_kb)
        );
        for (name, l) in [
            (
                "boundary lateness, 1 agent, durable (ms)".to_owned(),
                &self.single,
            ),
            (
                format!(
                    "boundary lateness, {} agents, not durable (ms)",
                    args.agents
                ),
                &self.fleet,
            ),
        ] {
            let _ = writeln!(
                out,
                "{name:<46} {:>6} {:>9.3} {:>9.3} {:>9.3}",
                l.ms.len(),
                l.pct(0.5),
                l.pct(0.99),
                l.pct(1.0)
            );
            if l.missed > 0 {
                let _ = writeln!(out, "  ! {} planned boundaries had no write", l.missed);
            }
        }
        let _ = writeln!(
            out,
            "{:<46} {:>6} {:>9.2} {:>9.2} {:>9.2}",
            "schedule -> ack, durable, 2 broker hops (ms)",
            acks.len(),
            pct(&acks, 0.5),
            pct(&acks, 0.99),
            pct(&acks, 1.0)
        );
        let _ = writeln!(
            out,
            "{:<46} {:>6} {:>9.2} {:>9.2} {:>9.2}",
            "  of which broker, cloud to itself (ms)",
            echo.len(),
            pct(&echo, 0.5),
            pct(&echo, 0.99),
            pct(&echo, 1.0)
        );
        let _ = writeln!(
            out,
            "bench agent: rss after start {:.1} MB, {}-day max {:.1} MB, last {:.1} MB; \
             lateness 1 agent p50 {:.3} ms p99 {:.3} ms; {} agents p50 {:.3} ms p99 {:.3} ms; \
             schedule to ack p50 {:.2} ms p99 {:.2} ms (broker alone p50 {:.2} ms); \
             missed boundaries {}",
            mb(self.rss_start_kb),
            args.days,
            mb(self.rss_max_kb),
            mb(self.rss_last_kb),
            self.single.pct(0.5),
            self.single.pct(0.99),
            args.agents,
            self.fleet.pct(0.5),
            self.fleet.pct(0.99),
            pct(&acks, 0.5),
            pct(&acks, 0.99),
            pct(&echo, 0.5),
            self.single.missed + self.fleet.missed,
        );
        out
    }
}

// ---- the processes and the cloud's session ----

/// `max300 agent` run as a child process; killed when dropped.
struct Child {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
    /// Stops the battery-sim serving its unit, if it has one.
    _battery: Option<DropGuard>,
}

impl Child {
    /// Starts a durable agent whose plan time reads `start` at the real instant `anchor` and
    /// runs `speed` times faster than real time; with `modbus`, on a battery-sim served here.
    async fn start(
        exe: &Path,
        device: &DeviceId,
        data: &Path,
        mqtt: &str,
        (start, anchor, speed): (Timestamp, Timestamp, f64),
        modbus: bool,
    ) -> anyhow::Result<Child> {
        std::fs::create_dir_all(data).with_context(|| format!("{}", data.display()))?;
        let log = data.with_extension("log");
        let stderr = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let (battery, guard) = if modbus {
            let clock = Arc::new(ScaledClock::new(start, anchor, speed));
            let (url, guard) = serve_battery(data, clock).await?;
            (vec!["--battery".to_owned(), url], Some(guard))
        } else {
            (Vec::new(), None)
        };
        let child = tokio::process::Command::new(exe)
            .arg("agent")
            .args(battery)
            .args(["--device-id", device.as_str()])
            .arg("--data-dir")
            .arg(data)
            .args(["--mqtt", mqtt])
            .args(["--clock-speed", &speed.to_string()])
            .args(["--clock-start", &start.to_string()])
            .args(["--clock-anchor", &anchor.to_string()])
            .env("MAX300_DURABLE", "true")
            // A scaled clock is not the system's: NTP says nothing about it.
            .env("MAX300_CLOCK_SYNC", "assume")
            .env("MAX300_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} agent", exe.display()))?;
        let pid = child
            .id()
            .context("the agent process exited as it started")?;
        Ok(Child {
            child,
            pid,
            log,
            _battery: guard,
        })
    }

    fn log_hint(&self) -> String {
        format!("the agent's log is {}", self.log.display())
    }

    /// SIGKILL: everything measured is already read, and the write log loses no line to it.
    async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// One battery-sim unit on a loopback port, for an agent binary without a simulated battery
/// (the Pi's agent-only build). Its write log is where the agent's own simulated battery keeps
/// one (`DATA/battery-writes.jsonl`), so lateness is read the same way. Served until the guard
/// drops.
async fn serve_battery(data: &Path, clock: Arc<dyn Clock>) -> anyhow::Result<(String, DropGuard)> {
    let config = SimServerConfig {
        units: 1,
        base: 40000,
        sim: SimConfig {
            write_log: Some(data.join("battery-writes.jsonl")),
            ..SimConfig::default()
        },
        reserve_pct: 10.0,
        write_log: None,
        meter: Some(Meter::Inverter),
        der_models: false,
    };
    let sim = Arc::new(SunSpecSim::new(config, clock)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(crate::sunspec::serve(sim, listener, stop.clone()));
    Ok((format!("sunspec+tcp://{addr}/1"), stop.drop_guard()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
        assert!(pct(&[], 0.5).is_nan());
    }

    #[test]
    fn lateness_is_the_first_write_of_the_planned_setpoint_in_real_time() {
        let start: Timestamp = "2026-11-30T00:30:00Z".parse().unwrap();
        let charge = setpoint_of(1).unwrap();
        let discharge = setpoint_of(2).unwrap();
        let line = |secs: i64, sp: Setpoint, revert: bool| WriteLogEntry {
            at: start + SignedDuration::from_secs(secs),
            mode: sp.mode(),
            rate_kw: sp.rate().kw(),
            real_ms: None,
            revert,
            start: false,
        };
        let log = vec![
            line(-5, charge, false),
            line(20, discharge, false),
            line(40, discharge, false),
        ];
        let l = Lateness::of(
            &[log],
            &[(start, discharge), (start + PERIOD, charge)],
            1000.0,
        );
        // 20 s of plan time at 1000x is 20 ms real; the next period had no write.
        assert_eq!(l.ms, vec![20.0]);
        assert_eq!(l.missed, 1);
    }
}
