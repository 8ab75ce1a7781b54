//! `max300 up`: the whole system on one machine — embedded broker, cloud, sample provider and
//! simulated units — on a scaled clock, with a one-screen summary for `--days`.

use max300_protocol::error::Chain;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use jiff::civil::{Date, Time};
use jiff::{SignedDuration, Timestamp};
use max300_agent::AgentConfig;
use max300_cloud::store::CommandStore;
use max300_cloud::{Cloud, CloudConfig, CommandState, PeriodStatus};
use max300_protocol::clock::monotonic;
use max300_protocol::day::time_zone;
use max300_protocol::{Clock, DEFAULT_TIMEZONE, Day, ScaledClock, SystemClock};
use tokio::task::JoinSet;

use crate::cli::shutdown_on_signal;
use max300_mqtt::broker;
use max300_sim::sample;

/// `max300 up`
#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// How many simulated units.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Plan time runs this many times faster than real time.
    #[arg(long, alias = "clock-speed", default_value_t = 600.0)]
    pub speed: f64,
    /// The first simulated day. Default: tomorrow.
    #[arg(long)]
    pub date: Option<Date>,
    /// Play this many days, print a summary and exit (non-zero if any period was not
    /// executed). Without it, run until stopped.
    #[arg(long)]
    pub days: Option<u32>,
    /// Where data lives. Default: a temporary folder, removed at exit.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The HTTP API and dashboard.
    #[arg(long, default_value = "127.0.0.1:8300")]
    pub http: String,
    /// The embedded broker's address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub mqtt: SocketAddr,
    /// Seed of the sample provider.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Let the simulated units skip fsync (one disk stands in for N units' disks).
    #[arg(long)]
    pub no_fsync: bool,
    /// Drive the units over Modbus TCP: an in-process battery-sim serves one SunSpec unit
    /// per device on loopback (write log in the data dir), and each agent runs with
    /// `battery = sunspec+tcp://…/N`. At most 247 devices.
    #[arg(long)]
    pub modbus: bool,
}

/// An in-process `battery-sim` with one SunSpec unit per device, on a loopback port.
async fn start_battery_sim(
    devices: usize,
    data_dir: &std::path::Path,
    clock: Arc<dyn Clock>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use max300_agent::SimConfig;
    use max300_sim::sunspec::{SimServerConfig, SunSpecSim, serve};

    let units = u8::try_from(devices)
        .ok()
        .filter(|n| *n <= 247)
        .with_context(|| format!("--modbus: {devices} devices, but Modbus has 247 unit ids"))?;
    std::fs::create_dir_all(data_dir)?;
    let config = SimServerConfig {
        units,
        base: 40000,
        sim: SimConfig::default(),
        reserve_pct: 10.0,
        write_log: Some(data_dir.join("battery-sim.jsonl")),
        meter: Some(max300_agent::battery::sunspec::map::Meter::Inverter),
        der_models: false,
    };
    let sim = Arc::new(SunSpecSim::new(config, clock).context("battery-sim")?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(sim, listener, shutdown).await {
            tracing::error!(error = %Chain(&e), "battery-sim stopped");
        }
    });
    Ok(addr)
}

/// Real seconds between heartbeats of the simulated units.
const UP_HEARTBEAT_S: u64 = 10;

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    if !(args.speed.is_finite() && args.speed > 0.0) {
        anyhow::bail!("--speed: {} must be a positive number", args.speed);
    }
    if args.devices == 0 || args.devices > 9999 {
        anyhow::bail!("--devices: {} is not within 1..=9999", args.devices);
    }
    let started = monotonic();
    let tz = time_zone(DEFAULT_TIMEZONE)?;
    let real_start = SystemClock.now();
    let first = match args.date {
        Some(d) => d,
        None => real_start.to_zoned_datetime(tz.clone()).date().tomorrow()?,
    };
    // Start two hours before the first day, so the plan is fetched and delivered first.
    let clock_start = first
        .yesterday()?
        .to_datetime(Time::constant(22, 0, 0, 0))
        .to_zoned_datetime(tz.clone())?
        .timestamp();
    let clock: Arc<dyn Clock> = Arc::new(ScaledClock::new(clock_start, real_start, args.speed));

    let temp;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("max300-up-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let shutdown = shutdown_on_signal();

    let broker_addr = broker::start(args.mqtt, args.devices + 8)?;
    let mqtt = format!("mqtt://{broker_addr}");
    let provider = sample::SampleProvider {
        devices: sample::SampleProvider::numbered(args.devices),
        seed: args.seed,
        timezone: tz.clone(),
    };
    let (provider_addr, _) = sample::serve(
        provider,
        clock.clone(),
        "127.0.0.1:0".parse()?,
        shutdown.clone(),
    )
    .await?;

    let mut cloud_config = CloudConfig::load(None, &[])?;
    cloud_config.data_dir = data_dir.join("cloud");
    cloud_config.mqtt = mqtt.clone();
    cloud_config.http = args.http.clone();
    cloud_config.provider = Some(format!("http://{provider_addr}/tomorrow"));
    cloud_config.auto_register = true;
    // Plan time runs fast here: a heartbeat every 60 real seconds would be hours of plan
    // time, and the dashboard's live mode and SoC that stale.
    cloud_config.heartbeat_interval_s = UP_HEARTBEAT_S;
    let cloud = Cloud::start(cloud_config, clock.clone(), shutdown.clone()).await?;
    let store = cloud.store.clone();

    let modbus = if args.modbus {
        Some(start_battery_sim(args.devices, &data_dir, clock.clone(), shutdown.clone()).await?)
    } else {
        None
    };

    let mut agents = JoinSet::new();
    for (i, id) in sample::SampleProvider::numbered(args.devices)
        .into_iter()
        .enumerate()
    {
        let mut env = vec![
            ("MAX300_DEVICE_ID".to_owned(), id.clone()),
            (
                "MAX300_DATA_DIR".to_owned(),
                data_dir.join("agents").join(&id).display().to_string(),
            ),
            ("MAX300_MQTT".to_owned(), mqtt.clone()),
            ("MAX300_DURABLE".to_owned(), (!args.no_fsync).to_string()),
            (
                "MAX300_HEARTBEAT_INTERVAL_S".to_owned(),
                UP_HEARTBEAT_S.to_string(),
            ),
        ];
        if let Some(addr) = modbus {
            env.push((
                "MAX300_BATTERY".to_owned(),
                format!("sunspec+tcp://{addr}/{}", i + 1),
            ));
        }
        let config = AgentConfig::from_toml(AgentConfig::DEFAULT_TOML, None, &env)
            .with_context(|| format!("agent {id}"))?;
        let (clock, shutdown) = (clock.clone(), shutdown.clone());
        agents.spawn(async move {
            if let Err(e) = max300_sim::run_agent(config, clock, shutdown).await {
                tracing::error!(device_id = %id, error = %Chain(&e), "agent stopped");
            }
        });
    }
    println!(
        "max300 up: {} units, broker {mqtt}, plan time {} at {}×",
        args.devices,
        clock
            .now()
            .to_zoned_datetime(tz.clone())
            .strftime("%Y-%m-%d %H:%M %Z"),
        args.speed
    );
    if let Some(addr) = modbus {
        println!("batteries: battery-sim over Modbus TCP at {addr}");
    }
    println!("dashboard: http://{}/", cloud.addr);
    if args.data_dir.is_some() {
        println!("data: {}", data_dir.display());
    }
    // In a terminal, one line says what is going on, rewritten in place; piped, the
    // progress lines of `--days` (and the summary) say it instead.
    let live = std::io::stdout().is_terminal();
    if live {
        let (store, clock, shutdown, tz) =
            (store.clone(), clock.clone(), shutdown.clone(), tz.clone());
        let window = SignedDuration::from_secs_f64(3.0 * UP_HEARTBEAT_S as f64 * args.speed);
        let devices = args.devices;
        tokio::spawn(async move {
            let mut out = std::io::stdout();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let now = clock.now();
                if let Ok(status) = Status::read(&*store, now, &tz, window).await {
                    let _ = write!(out, "\r{}\x1b[K", status.line(now, &tz, devices));
                    let _ = out.flush();
                }
            }
            let _ = writeln!(out);
        });
    }

    let code = match args.days {
        None => {
            shutdown.cancelled().await;
            ExitCode::SUCCESS
        }
        Some(days) => {
            let days = days.max(1);
            let mut dates = vec![Day::new(first, tz.clone())?];
            for _ in 1..days {
                let next = dates.last().map(Day::next).transpose()?;
                dates.extend(next);
            }
            let last_end = dates.last().map(Day::end).unwrap_or(clock_start);
            let finished = play(
                &*store,
                &*clock,
                &dates,
                args.devices,
                last_end,
                &shutdown,
                !live,
            )
            .await?;
            let summary = summarize(&*store, &dates, args.devices).await?;
            let wall = started.elapsed().as_secs_f64();
            print!("{}", summary.render(&args, wall));
            if !finished {
                println!("stopped before the last day ended");
            }
            shutdown.cancel();
            if summary.all_executed && finished {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    };
    shutdown.cancel();
    while agents.join_next().await.is_some() {}
    cloud.wait().await;
    Ok(code)
}

/// Waits until every command of every day is complete, or the last day is well over.
async fn play(
    store: &dyn CommandStore,
    clock: &dyn Clock,
    days: &[Day],
    devices: usize,
    last_end: Timestamp,
    shutdown: &tokio_util::sync::CancellationToken,
    progress_lines: bool,
) -> anyhow::Result<bool> {
    let give_up = last_end + SignedDuration::from_hours(1);
    let mut shown = None;
    loop {
        let now = clock.now();
        let current = days.iter().find(|d| d.period_at(now).is_some());
        if let Some(day) = current.filter(|_| progress_lines) {
            let period = day.period_at(now).unwrap_or(0);
            if shown != Some((day.date(), period / 8)) {
                shown = Some((day.date(), period / 8));
                println!("  {} period {period:>2}/{}", day.date(), day.period_count());
            }
        }
        if now > last_end && all_complete(store, days, devices).await? {
            return Ok(true);
        }
        if now > give_up {
            return Ok(true);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

async fn all_complete(
    store: &dyn CommandStore,
    days: &[Day],
    devices: usize,
) -> anyhow::Result<bool> {
    for day in days {
        let commands = store.commands(None, Some(day.date())).await?;
        let done = commands
            .iter()
            .filter(|c| c.state == CommandState::Completed)
            .count();
        if done < devices {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What the live line of `up` shows: the units heard from lately, and today's and
/// tomorrow's commands with their periods so far.
#[derive(Debug, Default, PartialEq)]
struct Status {
    online: usize,
    commands: usize,
    acked: usize,
    executed: usize,
    failed: usize,
    skipped: usize,
}

impl Status {
    /// Reads it from the store at `now`; a unit is online when heard from within `window`.
    async fn read(
        store: &dyn CommandStore,
        now: Timestamp,
        tz: &jiff::tz::TimeZone,
        window: SignedDuration,
    ) -> anyhow::Result<Status> {
        let today = Day::containing(now, tz)?;
        let mut status = Status {
            online: store
                .devices()
                .await?
                .iter()
                .filter(|d| d.last_seen.is_some_and(|t| now.duration_since(t) <= window))
                .count(),
            ..Status::default()
        };
        for date in [today.date(), today.next()?.date()] {
            for c in store.on_date(date).await? {
                status.commands += 1;
                status.acked += usize::from(matches!(
                    c.state,
                    CommandState::Acknowledged | CommandState::Completed | CommandState::Incomplete
                ));
                for (_, mark) in c.marks.iter() {
                    match mark.status() {
                        PeriodStatus::Executed => status.executed += 1,
                        PeriodStatus::Failed => status.failed += 1,
                        PeriodStatus::Skipped => status.skipped += 1,
                        _ => {}
                    }
                }
            }
        }
        Ok(status)
    }

    fn line(&self, now: Timestamp, tz: &jiff::tz::TimeZone, devices: usize) -> String {
        format!(
            "plan time {} | units online {}/{devices} | commands acked {}/{} | periods executed {}, failed {}, skipped {}",
            now.to_zoned_datetime(tz.clone()).strftime("%Y-%m-%d %H:%M"),
            self.online,
            self.acked,
            self.commands,
            self.executed,
            self.failed,
            self.skipped
        )
    }
}

#[derive(Default)]
struct DayLine {
    date: String,
    periods: u32,
    commands: usize,
    completed: usize,
    late: usize,
    counts: [usize; 5],
}

struct Summary {
    lines: Vec<DayLine>,
    problems: Vec<String>,
    all_executed: bool,
}

async fn summarize(
    store: &dyn CommandStore,
    days: &[Day],
    devices: usize,
) -> anyhow::Result<Summary> {
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    let mut all_executed = true;
    for day in days {
        let mut line = DayLine {
            date: day.date().to_string(),
            periods: day.period_count(),
            ..DayLine::default()
        };
        let commands = store.commands(None, Some(day.date())).await?;
        line.commands = commands.len();
        if commands.len() < devices {
            all_executed = false;
            problems.push(format!(
                "{}: {} of {devices} units have no command",
                day.date(),
                devices - commands.len()
            ));
        }
        for c in &commands {
            line.completed += usize::from(c.state == CommandState::Completed);
            line.late += usize::from(c.late);
            let Some(detail) = store.command(&c.message_id).await? else {
                continue;
            };
            let mut not_executed = 0;
            for p in &detail.periods {
                let i = PeriodStatus::ALL
                    .iter()
                    .position(|s| *s == p.status)
                    .unwrap_or(0);
                line.counts[i] += 1;
                not_executed += usize::from(p.status != PeriodStatus::Executed);
            }
            if c.state != CommandState::Completed || not_executed > 0 {
                all_executed = false;
                problems.push(format!(
                    "{} {}: {} v{}, {not_executed} periods not executed",
                    day.date(),
                    c.device_id,
                    c.state,
                    c.version
                ));
            }
        }
        lines.push(line);
    }
    Ok(Summary {
        lines,
        problems,
        all_executed,
    })
}

impl Summary {
    fn render(&self, args: &UpArgs, wall_s: f64) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\nsummary: {} units at {}×", args.devices, args.speed);
        let _ = writeln!(
            out,
            "{:<12}{:>8}{:>10}{:>11}{:>6}{:>10}{:>8}{:>9}{:>9}",
            "date",
            "periods",
            "commands",
            "completed",
            "late",
            "executed",
            "failed",
            "skipped",
            "pending"
        );
        for l in &self.lines {
            let _ = writeln!(
                out,
                "{:<12}{:>8}{:>10}{:>11}{:>6}{:>10}{:>8}{:>9}{:>9}",
                l.date,
                l.periods,
                l.commands,
                l.completed,
                l.late,
                l.counts[1],
                l.counts[2],
                l.counts[3],
                l.counts[0] + l.counts[4]
            );
        }
        for p in self.problems.iter().take(10) {
            let _ = writeln!(out, "  ! {p}");
        }
        if self.problems.len() > 10 {
            let _ = writeln!(out, "  ! … and {} more", self.problems.len() - 10);
        }
        let _ = writeln!(
            out,
            "wall time {wall_s:.1} s, peak memory {}",
            peak_memory().unwrap_or_else(|| "unknown".into())
        );
        let _ = writeln!(
            out,
            "result: {}",
            if self.all_executed {
                "every period executed"
            } else {
                "NOT every period executed"
            }
        );
        out
    }
}

/// Peak resident memory of this process.
fn peak_memory() -> Option<String> {
    let kb = max300_sim::bench::peak_memory_kb()?;
    Some(format!("{:.1} MB", kb as f64 / 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_line_says_plan_time_units_commands_and_periods() {
        let status = Status {
            online: 18,
            commands: 40,
            acked: 39,
            executed: 500,
            failed: 2,
            skipped: 3,
        };
        let tz = time_zone(DEFAULT_TIMEZONE).unwrap();
        let now: Timestamp = "2026-11-30T12:05:00Z".parse().unwrap();
        assert_eq!(
            status.line(now, &tz, 20),
            "plan time 2026-11-30 12:05 | units online 18/20 | commands acked 39/40 | \
             periods executed 500, failed 2, skipped 3"
        );
    }
}
