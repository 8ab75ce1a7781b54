//! `max300 bench day`: a fleet's evening and the first boundaries of its day, on a scaled
//! clock. The bench process holds the real cloud (and the embedded broker, unless `--mqtt`
//! names another); `max300 fleet` runs as a child on the same clock, one MQTT connection a
//! device, reporting at every boundary after its jitter.
//!
//! ```text
//!  23:00 (plan time)  fleet connected ─▶ ingestion of tomorrow's document ─▶ every ack recorded
//!  each measured boundary b (reports of the period that ended at b):
//!      store: reports recorded for that period, polled every 20 ms ──▶ b → last recorded
//!      fleet: "fleet: boundary b … last receipt +S s resent K"      ──▶ b → last receipt
//!      cloud session: messages dropped ("application busy") while b was the latest boundary
//!      this process: CPU time (user + sys) in the same window, and its peak memory
//! ```
//!
//! The first measured boundary is the end of the first period that every plan governs: if
//! the ingestion ends after midnight (a large fleet on a fast clock), the periods before it
//! have no plan, and the measurement starts where they do.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use jiff::civil::Time;
use jiff::{SignedDuration, Timestamp};
use max300_cloud::store::CommandStore;
use max300_cloud::{Cloud, Listing};
use max300_mqtt::broker;
use max300_protocol::clock::monotonic;
use max300_protocol::day::{period_start_at, time_zone};
use max300_protocol::{Clock, DEFAULT_TIMEZONE, PERIOD_SECS, ScaledClock, SystemClock};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{DATE, FleetChild, cpu, peak_memory_kb};
use crate::sample::{SampleProvider, Shape};

/// `max300 bench day`
#[derive(Args, Debug, Clone)]
pub struct DayArgs {
    /// Fleet size.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// An external broker (e.g. mosquitto) instead of the embedded one.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Plan time runs this many times faster than real time, for the cloud and the fleet:
    /// at 120 a period lasts 15 s.
    #[arg(long, default_value_t = 120.0)]
    pub speed: f64,
    /// Boundaries measured (each one period apart).
    #[arg(long, default_value_t = 6)]
    pub boundaries: u32,
    /// The fleet's report jitter (`max300 fleet --jitter-ms`).
    #[arg(long, default_value_t = 1000)]
    pub jitter_ms: u64,
    /// Operators watching while the day runs: the fleet page's JSON and `/metrics` fetched
    /// every 2 s (real time), as the open dashboard and a Prometheus scraper would.
    #[arg(long)]
    pub watch: bool,
}

const PERIOD: SignedDuration = SignedDuration::from_secs(PERIOD_SECS);
/// How often the store is asked how many reports it holds per period: a grouped count over
/// an index, cheap next to the reports themselves.
const POLL: Duration = Duration::from_millis(20);

/// One measured boundary's figures.
#[derive(Debug, Default)]
struct Row {
    /// When plan time reached the boundary, in real time.
    real_at: Option<Instant>,
    recorded: u32,
    /// Boundary to the last report recorded (once all N are).
    to_recorded: Option<Duration>,
    /// From the fleet's line: reports, receipted, boundary to the last receipt, resent.
    fleet: Option<FleetLine>,
    dropped: u64,
    cpu: Duration,
    peak_kb: u64,
}

/// The figures of a `fleet: boundary …` line.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetLine {
    /// The boundary.
    pub boundary: Timestamp,
    /// Reports the fleet sent for it.
    pub reports: u64,
    /// Of those, receipted.
    pub receipted: u64,
    /// Real time from the boundary to the last receipt.
    pub last_receipt: Option<Duration>,
    /// Reports sent again.
    pub resent: u64,
}

impl FleetLine {
    /// Reads `fleet: boundary B reports N receipted N last receipt +1.234 s resent K`.
    pub fn parse(line: &str) -> Option<FleetLine> {
        let rest = line.strip_prefix("fleet: boundary ")?;
        let words: Vec<&str> = rest.split_whitespace().collect();
        let [
            boundary,
            "reports",
            reports,
            "receipted",
            receipted,
            "last",
            "receipt",
            last,
            tail @ ..,
        ] = words.as_slice()
        else {
            return None;
        };
        let (last_receipt, tail) = match (*last, tail) {
            ("none", tail) => (None, tail),
            (secs, ["s", tail @ ..]) => (
                Some(Duration::from_secs_f64(
                    secs.strip_prefix('+')?.parse().ok()?,
                )),
                tail,
            ),
            _ => return None,
        };
        let ["resent", resent] = tail else {
            return None;
        };
        Some(FleetLine {
            boundary: boundary.parse().ok()?,
            reports: reports.parse().ok()?,
            receipted: receipted.parse().ok()?,
            last_receipt,
            resent: resent.parse().ok()?,
        })
    }
}

/// Runs the bench.
pub async fn run(args: DayArgs) -> anyhow::Result<ExitCode> {
    if args.devices == 0 || args.devices > 1_000_000 {
        anyhow::bail!("--devices: {} is not within 1..=1000000", args.devices);
    }
    if !(args.speed.is_finite() && args.speed >= 1.0) {
        anyhow::bail!("--speed: {} must be a number of at least 1", args.speed);
    }
    if args.boundaries == 0 {
        anyhow::bail!("--boundaries: must be at least 1");
    }
    let tz = time_zone(DEFAULT_TIMEZONE)?;
    let midnight = max300_protocol::Day::new(DATE, tz.clone())?.start();
    // The evening: an hour before the day, so a small fleet's ingestion is done well before
    // midnight (half a minute at 120x); a large one may run past it (see the module doc).
    let start = DATE
        .yesterday()?
        .to_datetime(Time::constant(23, 0, 0, 0))
        .to_zoned_datetime(tz.clone())?
        .timestamp();
    let anchor = SystemClock.now();
    let clock: Arc<dyn Clock> = Arc::new(ScaledClock::new(start, anchor, args.speed));

    let dir = tempfile::Builder::new().prefix("max300-bench-").tempdir()?;
    let shutdown = CancellationToken::new();
    let provider = SampleProvider {
        devices: SampleProvider::numbered(args.devices),
        seed: 1,
        timezone: tz.clone(),
    };
    let (provider_addr, _) =
        super::serve_document(&provider, Shape::Rich, start, dir.path(), shutdown.clone()).await?;
    let mqtt = match &args.mqtt {
        Some(url) => url.clone(),
        None => {
            // The embedded broker holds the broker's end of every fleet connection here.
            crate::fds::ensure_room(args.devices, "--devices (embedded broker)")?;
            format!(
                "mqtt://{}",
                broker::start("127.0.0.1:0".parse()?, args.devices + 8)?
            )
        }
    };
    let clock_args = vec![
        "--clock-speed".to_owned(),
        args.speed.to_string(),
        "--clock-start".to_owned(),
        start.to_string(),
        "--clock-anchor".to_owned(),
        anchor.to_string(),
        "--jitter-ms".to_owned(),
        args.jitter_ms.to_string(),
    ];
    let (fleet, mut lines) = FleetChild::start_with(&mqtt, args.devices, &clock_args).await?;
    eprintln!(
        "bench day: {} devices connected at {} (plan time)",
        args.devices,
        clock.now()
    );

    let cloud =
        super::start_cloud(dir.path(), &mqtt, provider_addr, clock.clone(), &shutdown).await?;

    let watching = args.watch.then(|| watch(cloud.addr, shutdown.clone()));
    let t0 = monotonic();
    let ingested_at = clock.now();
    let report = cloud.ingestor.fetch(DATE, None, Listing::Counts).await?;
    if report.accepted.len() != args.devices {
        anyhow::bail!(
            "{} of {} commands accepted",
            report.accepted.len(),
            args.devices
        );
    }
    let acked = wait_acknowledged(&cloud.store, args.devices).await?;
    let acked_at = clock.now();
    eprintln!(
        "bench day: ingestion at {ingested_at} (plan time), every command acknowledged {:.3} s later, at {acked_at}",
        acked.duration_since(t0).as_secs_f64()
    );
    // The first period every plan governs, and the boundary that ends it.
    let first_governed = period_start_at(acked_at, &tz)?.max(midnight - PERIOD) + PERIOD;
    let boundaries: Vec<Timestamp> = (1..=i64::from(args.boundaries))
        .map(|k| first_governed + PERIOD * k as i32)
        .collect();

    let rows = measure(&cloud, &clock, &boundaries, args.devices, &mut lines).await;
    let fleet_peak = fleet.peak_memory_kb().unwrap_or(0);
    let stopped = fleet.stop().await;
    shutdown.cancel();
    let watched = match watching {
        Some(watching) => Some(watching.await??),
        None => None,
    };
    cloud.wait().await;
    let rows = rows?;
    stopped?;
    print_rows(&args, &mqtt, &boundaries, &rows, fleet_peak, watched);
    let complete = rows.iter().all(|r| {
        r.recorded as usize == args.devices
            && r.fleet.as_ref().is_some_and(|f| f.receipted == f.reports)
    });
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Fetches the fleet page's JSON and `/metrics` every 2 s until `stop`; returns how many
/// fetches there were and the slowest. A failed fetch fails the bench: what operators see
/// must keep working under a fleet's load.
fn watch(
    api: std::net::SocketAddr,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<(u32, Duration)>> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let pages = [
            format!("http://{api}/api/fleet"),
            format!("http://{api}/metrics"),
        ];
        let (mut polls, mut slowest) = (0, Duration::ZERO);
        let mut every = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok((polls, slowest)),
                _ = every.tick() => {}
            }
            for page in &pages {
                let (_, took) = super::get(&http, page).await?;
                polls += 1;
                slowest = slowest.max(took);
            }
        }
    })
}

/// Waits until every command is acknowledged; returns when (real time).
async fn wait_acknowledged(
    store: &Arc<dyn CommandStore>,
    devices: usize,
) -> anyhow::Result<Instant> {
    use max300_cloud::CommandState::Acknowledged;
    let limit = Duration::from_secs(60) + Duration::from_millis(20 * devices as u64);
    let t0 = monotonic();
    loop {
        let acked: u32 = store
            .command_counts()
            .await?
            .into_iter()
            .filter(|(s, _)| *s == Acknowledged)
            .map(|(_, n)| n)
            .sum();
        if acked as usize >= devices {
            return Ok(monotonic());
        }
        if t0.elapsed() > limit {
            anyhow::bail!(
                "{acked} of {devices} commands acknowledged after {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Follows the boundaries: polls the store for each one's reports, reads the fleet's lines,
/// and samples the cloud session's drops, this process's CPU time and peak memory per
/// boundary. Returns once every boundary has its fleet line and all its reports, or two
/// periods after the last boundary.
async fn measure(
    cloud: &Cloud,
    clock: &Arc<dyn Clock>,
    boundaries: &[Timestamp],
    devices: usize,
    lines: &mut mpsc::Receiver<String>,
) -> anyhow::Result<Vec<Row>> {
    let mut rows: BTreeMap<Timestamp, Row> =
        boundaries.iter().map(|b| (*b, Row::default())).collect();
    let last = boundaries[boundaries.len() - 1];
    let give_up = last + PERIOD * 2;
    // Each boundary's window of drops and CPU runs until the next one begins.
    let mut window: Option<(Timestamp, u64, Duration)> = None;
    let mut next = 0;
    loop {
        let now = clock.now();
        if next < boundaries.len() && now >= boundaries[next] {
            let b = boundaries[next];
            let late = clock.real_duration(now.duration_since(b));
            let (dropped, cpu) = (cloud.session.dropped(), cpu::this_process());
            if let Some((prev, d0, c0)) = window.replace((b, dropped, cpu))
                && let Some(row) = rows.get_mut(&prev)
            {
                row.dropped = dropped - d0;
                row.cpu = cpu.saturating_sub(c0);
                row.peak_kb = peak_memory_kb().unwrap_or(0);
            }
            if let Some(row) = rows.get_mut(&b) {
                row.real_at = Some(monotonic().checked_sub(late).unwrap_or_else(monotonic));
            }
            next += 1;
        }
        while let Ok(line) = lines.try_recv() {
            if let Some(f) = FleetLine::parse(&line)
                && let Some(row) = rows.get_mut(&f.boundary)
            {
                row.fleet = Some(f);
            }
        }
        // Only the periods still short of a full count: a count over every period so far,
        // 50 times a second, would load the store it measures.
        let open = boundaries[..next]
            .iter()
            .find(|b| rows.get(b).is_some_and(|r| (r.recorded as usize) < devices));
        if let Some(&from) = open {
            let counts = cloud
                .store
                .report_counts(from - PERIOD, boundaries[next - 1])
                .await?;
            for (start, n) in counts {
                if let Some(row) = rows.get_mut(&(start + PERIOD))
                    && row.recorded != n
                {
                    row.recorded = n;
                    if n as usize >= devices
                        && let Some(at) = row.real_at
                    {
                        row.to_recorded = Some(monotonic().saturating_duration_since(at));
                    }
                }
            }
        }
        let done = next == boundaries.len()
            && rows
                .values()
                .all(|r| r.recorded as usize >= devices && r.fleet.is_some());
        if done || now >= give_up {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    if let Some((prev, d0, c0)) = window
        && let Some(row) = rows.get_mut(&prev)
    {
        row.dropped = cloud.session.dropped() - d0;
        row.cpu = cpu::this_process().saturating_sub(c0);
        row.peak_kb = peak_memory_kb().unwrap_or(0);
    }
    Ok(rows.into_values().collect())
}

fn print_rows(
    args: &DayArgs,
    mqtt: &str,
    boundaries: &[Timestamp],
    rows: &[Row],
    fleet_kb: u64,
    watched: Option<(u32, Duration)>,
) {
    let secs = |d: Option<Duration>| {
        d.map_or_else(|| "-".to_owned(), |d| format!("{:.3}", d.as_secs_f64()))
    };
    let broker = if args.mqtt.is_some() {
        mqtt
    } else {
        "embedded"
    };
    println!(
        "{} devices, broker {broker}, speed {} (a period is {:.1} s), jitter up to {} ms",
        args.devices,
        args.speed,
        PERIOD_SECS as f64 / args.speed,
        args.jitter_ms
    );
    println!(
        "{:<22} {:>10} {:>13} {:>12} {:>10} {:>8} {:>8} {:>8} {:>9}",
        "boundary",
        "recorded",
        "to recorded s",
        "to receipt s",
        "receipted",
        "dropped",
        "resent",
        "cpu s",
        "peak MB"
    );
    let mut closing = Vec::new();
    let mb = |kb: u64| kb as f64 / 1024.0;
    for (b, row) in boundaries.iter().zip(rows) {
        let (receipted, resent, to_receipt) = match &row.fleet {
            Some(f) => (
                format!("{}/{}", f.receipted, f.reports),
                f.resent.to_string(),
                f.last_receipt,
            ),
            None => ("-".to_owned(), "-".to_owned(), None),
        };
        println!(
            "{:<22} {:>10} {:>13} {:>12} {:>10} {:>8} {:>8} {:>8.2} {:>9.1}",
            b.to_string(),
            format!("{}/{}", row.recorded, args.devices),
            secs(row.to_recorded),
            secs(to_receipt),
            receipted,
            row.dropped,
            resent,
            row.cpu.as_secs_f64(),
            mb(row.peak_kb)
        );
        closing.push(format!(
            "{} recorded {} of {} in {} s, receipted {} in {} s, dropped {}, resent {}, cpu {:.2} s",
            b.strftime("%H:%M"),
            row.recorded,
            args.devices,
            secs(row.to_recorded),
            receipted,
            secs(to_receipt),
            row.dropped,
            resent,
            row.cpu.as_secs_f64()
        ));
    }
    let cpu: f64 = rows.iter().map(|r| r.cpu.as_secs_f64()).sum();
    let real = boundaries.len() as f64 * PERIOD_SECS as f64 / args.speed;
    let watched = watched.map_or_else(String::new, |(fetches, slowest)| {
        format!(
            "; watched: {fetches} fetches of the fleet page and /metrics, the slowest {:.0} ms",
            slowest.as_secs_f64() * 1000.0
        )
    });
    println!(
        "bench day: devices {}, broker {broker}, speed {}, boundaries {}: {}; cloud cpu {:.2} s in {:.0} s ({:.0} % of one core), cloud peak memory {:.1} MB, fleet process {:.1} MB ({:.1} KB a connection){watched}",
        args.devices,
        args.speed,
        boundaries.len(),
        closing.join("; "),
        cpu,
        real,
        cpu / real * 100.0,
        mb(peak_memory_kb().unwrap_or(0)),
        mb(fleet_kb),
        fleet_kb as f64 / args.devices as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_boundary_line_is_read_back() {
        let line = "fleet: boundary 2026-11-30T00:30:00Z reports 1000 receipted 998 last receipt +1.234 s resent 3";
        let f = FleetLine::parse(line).unwrap();
        assert_eq!(
            f.boundary,
            "2026-11-30T00:30:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!((f.reports, f.receipted, f.resent), (1000, 998, 3));
        assert_eq!(f.last_receipt, Some(Duration::from_millis(1234)));
        let none =
            "fleet: boundary 2026-11-30T00:30:00Z reports 1 receipted 0 last receipt none resent 0";
        assert_eq!(FleetLine::parse(none).unwrap().last_receipt, None);
        assert_eq!(FleetLine::parse("fleet: 3 connected"), None);
    }
}
