//! `max300 bench …`: measurements anyone can repeat on their own machine, through the real
//! components. Each prints a table and one closing line with every figure. The binary's
//! `bench` command is [`Bench`] and a call of [`Bench::run`]; the benches that need another
//! process (`bench plot`, `bench ingest --fleet`, `bench agent`, `bench day`) start this
//! binary again
//! (`std::env::current_exe`) with another command.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use jiff::civil::{Date, Time};
use jiff::{SignedDuration, Timestamp};
use max300_cloud::store::{CommandStore, NewCommand};
use max300_cloud::{Cloud, CloudConfig, Listing, SqliteStore};
use max300_mqtt::broker;
use max300_protocol::clock::monotonic;
use max300_protocol::day::time_zone;
use max300_protocol::document::{Fleet, normalize};
use max300_protocol::message::{
    AckMsg, AckStatus, Fallback, HeartbeatMsg, ReportMsg, ReportStatus, V1,
};
use max300_protocol::{
    Clock, DEFAULT_TIMEZONE, DeviceId, ManualClock, MessageId, Mode, RateKw, Setpoint, StoreId,
};
use tokio_util::sync::CancellationToken;

use crate::sample::{SampleProvider, Shape};

pub mod agent;
pub mod cpu;
pub mod day;
pub mod plot;

/// What to measure.
#[derive(Subcommand, Debug, Clone)]
pub enum Bench {
    /// The dashboard's fleet page (HTML and JSON) and a device's day, for a fleet of N
    /// devices half-way through a day, over real HTTP from the real service.
    Dashboard(DashboardArgs),
    /// One ingestion of a provider document for N devices through the real path (HTTP
    /// fetch, audit, normalize, SQLite, MQTT publish): the time from fetch to every command
    /// `sent`, and peak memory. With --fleet, also the time to every command `acknowledged`
    /// by N simulated devices.
    Ingest(IngestArgs),
    /// `bench ingest` in a fresh process per fleet size (default 1,000, 10,000 and
    /// 100,000), the median of several runs each, drawn as an SVG of time and memory
    /// against N.
    Plot(plot::PlotArgs),
    /// One agent's memory over a simulated week (its own process), period boundary lateness
    /// for 1 and N agents, and schedule-to-ack time, through the real agent and broker.
    Agent(agent::AgentArgs),
    /// A fleet's evening and day on a scaled clock: the ingestion, then at each of the first
    /// boundaries of the day the time to every report recorded and receipted, the cloud's
    /// drops, CPU and peak memory, and the fleet's resends.
    Day(day::DayArgs),
}

/// `max300 bench ingest`
#[derive(Args, Debug, Clone)]
pub struct IngestArgs {
    /// Fleet size.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// An external broker (e.g. mosquitto) instead of the embedded one.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Start `max300 fleet` (a child process, one MQTT connection per device) on the same
    /// broker first, and also time the fetch to every command `acknowledged` in the store.
    #[arg(long)]
    pub fleet: bool,
    /// The document's shape: `rich` lists every period (about 1.2 KB a device, 12 MB at
    /// 10,000), `compact` only the busy ones (about 0.5 KB a device).
    #[arg(long, default_value = "rich", value_parser = ["rich", "compact"])]
    pub shape: String,
    /// Measure the evening ingestion of a fleet already at work, as from its second day on:
    /// first ingest today's plans and record a heartbeat with a state of charge from every
    /// unit, so the ingestion also checks each new plan against the rest of today's.
    #[arg(long)]
    pub with_today: bool,
    /// Register every unit before the ingestion, as a cloud knows its fleet from the first
    /// evening on; without it (or `--with-today`), the ingestion registers the units it meets.
    #[arg(long)]
    pub registered: bool,
}

/// `max300 bench dashboard`
#[derive(Args, Debug, Clone)]
pub struct DashboardArgs {
    /// Fleet size.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Requests per page, after one warm-up each.
    #[arg(long, default_value_t = 30)]
    pub requests: usize,
}

impl Bench {
    /// Runs the benchmark.
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Bench::Dashboard(args) => dashboard(args).await,
            Bench::Ingest(args) => ingest(args).await,
            Bench::Plot(args) => plot::plot(args).await,
            Bench::Agent(args) => agent::run(args).await,
            Bench::Day(args) => day::run(args).await,
        }
    }
}

/// The day the fleet is in: a winter weekday of 48 periods, fixed so runs compare.
const DATE: Date = jiff::civil::date(2026, 11, 30);

async fn dashboard(args: DashboardArgs) -> anyhow::Result<ExitCode> {
    if args.devices == 0 || args.devices > 100_000 {
        anyhow::bail!("--devices: {} is not within 1..=100000", args.devices);
    }
    if args.requests == 0 {
        anyhow::bail!("--requests: must be at least 1");
    }
    let tz = time_zone(DEFAULT_TIMEZONE)?;
    let now = DATE
        .to_datetime(Time::constant(12, 0, 0, 0))
        .to_zoned_datetime(tz.clone())?
        .timestamp();
    let dir = tempfile::Builder::new().prefix("max300-bench-").tempdir()?;
    let cloud_dir = dir.path().join("cloud");

    let started = monotonic();
    let ids = SampleProvider::numbered(args.devices);
    let filled = fill(&cloud_dir.join("cloud.sqlite"), &ids, now).await?;
    eprintln!(
        "filled a store with {} devices, {} commands and {} reports in {:.1} s",
        ids.len(),
        2 * ids.len(),
        filled,
        started.elapsed().as_secs_f64()
    );

    let shutdown = CancellationToken::new();
    let mqtt = broker::start("127.0.0.1:0".parse()?, 8)?;
    let mut config = CloudConfig::load(None, &[])?;
    config.data_dir = cloud_dir;
    config.mqtt = format!("mqtt://{mqtt}");
    config.http = "127.0.0.1:0".into();
    config.daily_fetch = false;
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(now));
    let cloud = Cloud::start(config, clock, shutdown.clone()).await?;
    let base = format!("http://{}", cloud.addr);
    let http = reqwest::Client::new();

    let pages = [
        ("fleet page (HTML)", "/".to_owned()),
        ("page script", "/assets/app.js".to_owned()),
        ("page style", "/assets/style.css".to_owned()),
        ("fleet JSON", "/api/fleet".to_owned()),
        (
            "device day JSON",
            format!("/api/devices/{}/day", ids[ids.len() / 2]),
        ),
        ("metrics", "/metrics".to_owned()),
    ];
    println!(
        "{} devices, {} requests each, one at a time",
        args.devices, args.requests
    );
    println!(
        "{:<20} {:>10} {:>9} {:>9} {:>9}",
        "page", "bytes", "p50 ms", "p95 ms", "max ms"
    );
    let mut closing = Vec::new();
    for (name, path) in &pages {
        let url = format!("{base}{path}");
        let (bytes, _) = get(&http, &url).await?;
        let mut times = Vec::with_capacity(args.requests);
        for _ in 0..args.requests {
            let (_, took) = get(&http, &url).await?;
            times.push(took.as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "{name:<20} {bytes:>10} {:>9.1} {:>9.1} {:>9.1}",
            pct(0.5),
            pct(0.95),
            pct(1.0)
        );
        closing.push(format!(
            "{path} p50 {:.1} ms p95 {:.1} ms",
            pct(0.5),
            pct(0.95)
        ));
    }
    println!(
        "bench dashboard: devices {}, {}",
        args.devices,
        closing.join(", ")
    );
    shutdown.cancel();
    cloud.wait().await;
    Ok(ExitCode::SUCCESS)
}

async fn ingest(args: IngestArgs) -> anyhow::Result<ExitCode> {
    if args.devices == 0 || args.devices > 1_000_000 {
        anyhow::bail!("--devices: {} is not within 1..=1000000", args.devices);
    }
    if args.fleet && args.with_today {
        anyhow::bail!(
            "--with-today and --fleet: not together (the fleet would ack today's plans too)"
        );
    }
    let tz = time_zone(DEFAULT_TIMEZONE)?;
    let eve = DATE
        .yesterday()?
        .to_datetime(Time::constant(16, 0, 0, 0))
        .to_zoned_datetime(tz.clone())?
        .timestamp();
    let dir = tempfile::Builder::new().prefix("max300-bench-").tempdir()?;
    let shutdown = CancellationToken::new();
    let provider = SampleProvider {
        devices: SampleProvider::numbered(args.devices),
        seed: 1,
        timezone: tz,
    };
    let shape = match args.shape.as_str() {
        "compact" => Shape::Compact,
        _ => Shape::Rich,
    };
    let today = DATE.yesterday()?;
    // Today's document only when asked for: its making leaves memory behind in this process.
    let dates: &[Date] = if args.with_today {
        &[DATE, today]
    } else {
        &[DATE]
    };
    let (provider_addr, size) =
        serve_documents(&provider, shape, eve, dir.path(), dates, shutdown.clone()).await?;
    let clients = if args.fleet { args.devices + 8 } else { 8 };
    let mqtt = match &args.mqtt {
        Some(url) => url.clone(),
        None => {
            // The embedded broker holds the broker's end of every fleet connection here.
            if args.fleet {
                crate::fds::ensure_room(args.devices, "--devices (embedded broker)")?;
            }
            format!("mqtt://{}", broker::start("127.0.0.1:0".parse()?, clients)?)
        }
    };

    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(eve));
    let cloud = start_cloud(dir.path(), &mqtt, provider_addr, clock, &shutdown).await?;
    let fleet = if args.fleet {
        Some(FleetChild::start(&mqtt, args.devices, eve).await?)
    } else {
        None
    };

    use max300_cloud::CommandState::{Acknowledged, Sent};
    // Today's commands, when the fleet is at work: not this ingestion's.
    let already = if args.with_today {
        at_work(&cloud, &provider, today, eve).await?;
        count(&cloud.store, &[Sent, Acknowledged]).await?
    } else {
        if args.registered {
            for chunk in provider.devices.chunks(1000) {
                let ids = chunk
                    .iter()
                    .map(|id| DeviceId::parse(id.as_str()))
                    .collect::<Result<Vec<_>, _>>()?;
                cloud.store.register_devices(&ids, eve).await?;
            }
        }
        0
    };
    // The bench's own list of the fleet's ids (3.8 MB at 100,000) is not the service's: the
    // documents are written, so give it back before the ingestion is measured.
    drop(provider);
    let before = peak_memory_kb().unwrap_or(0);
    // Linux: start the peak over from here, so it measures the ingestion, not the set-up.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let fleet_pid = fleet.as_ref().and_then(FleetChild::pid);
    let cpu0 = cpu::Sample::now(fleet_pid);
    let t0 = monotonic();
    let report = cloud.ingestor.fetch(DATE, None, Listing::Counts).await?;
    let took = t0.elapsed();
    let cpu_sent = cpu::Sample::now(fleet_pid);
    let peak = peak_memory_kb().unwrap_or(0);
    // With a fleet, the first acks land while the last commands are still being published.
    let sent = count(&cloud.store, &[Sent, Acknowledged]).await? - already;
    let acked = match fleet {
        Some(fleet) => {
            let waited = wait_acknowledged(&cloud.store, args.devices, t0).await;
            let cpu_acked = cpu::Sample::now(fleet_pid);
            let fleet_peak = fleet.peak_memory_kb().unwrap_or(0);
            let stopped = fleet.stop().await;
            let (n, took) = waited?;
            stopped?;
            Some((
                n,
                took,
                peak_memory_kb().unwrap_or(0),
                fleet_peak,
                cpu_acked,
            ))
        }
        None => None,
    };
    shutdown.cancel();
    cloud.wait().await;
    if report.accepted.len() != args.devices || sent != args.devices {
        anyhow::bail!(
            "{} of {} commands accepted, {sent} sent",
            report.accepted.len(),
            args.devices
        );
    }
    let mb = |kb: u64| kb as f64 / 1024.0;
    let acks = match acked {
        Some((n, took, peak, fleet_peak, cpu_acked)) => format!(
            ", acknowledged {n} of {}, fetch to all acknowledged {:.3} s \
             (peak memory {:.1} MB by then; the fleet process {:.1} MB, {:.1} KB a connection; \
             CPU from the fetch to all acknowledged: {})",
            args.devices,
            took.as_secs_f64(),
            mb(peak),
            mb(fleet_peak),
            fleet_peak as f64 / args.devices as f64,
            cpu_acked.spent_since(&cpu0, "the cloud", "the fleet"),
        ),
        None => String::new(),
    };
    println!(
        "bench ingest: devices {}, document {:.1} MB, broker {}, fetch to all sent {:.3} s \
         (CPU: {}){acks}, peak memory {:.1} MB during the ingestion ({:.1} MB before it){}",
        args.devices,
        size as f64 / 1e6,
        if args.mqtt.is_some() {
            mqtt.as_str()
        } else {
            "embedded"
        },
        took.as_secs_f64(),
        cpu_sent.spent_since(&cpu0, "the cloud", "the fleet"),
        mb(peak),
        mb(before),
        match (args.with_today, args.registered) {
            (true, _) => ", a fleet at work",
            (false, true) => ", the fleet registered",
            (false, false) => "",
        },
    );
    Ok(ExitCode::SUCCESS)
}

/// A fleet at work at `now`: `today`'s plans ingested, and a heartbeat with a state of charge
/// recorded for every unit.
async fn at_work(
    cloud: &Cloud,
    provider: &SampleProvider,
    today: Date,
    now: Timestamp,
) -> anyhow::Result<()> {
    let report = cloud.ingestor.fetch(today, None, Listing::Every).await?;
    anyhow::ensure!(
        report.accepted.len() == provider.devices.len(),
        "today: {} of {} plans accepted",
        report.accepted.len(),
        provider.devices.len()
    );
    let accepted = report
        .accepted
        .listed()
        .context("today's commands were not listed")?;
    for chunk in accepted.chunks(1000) {
        let heartbeats: Vec<HeartbeatMsg> = chunk
            .iter()
            .map(|c| HeartbeatMsg {
                v: V1,
                device_id: c.device_id.clone(),
                at: now,
                uptime_s: 3600,
                agent_version: "bench".into(),
                active_message_id: Some(c.message_id.clone()),
                mode: Mode::Idle,
                rate_kw: RateKw::ZERO,
                soc_pct: Some(50.0),
                fallback: None,
                outbox: 0,
            })
            .collect();
        cloud.store.record_heartbeats(&heartbeats, now).await?;
    }
    Ok(())
}

/// Writes the sample document for [`DATE`] to a file in `dir`, a device at a time, and
/// serves it from there in chunks until `shutdown`: the benches measure the service, and
/// their own process holds no copy of the document (136 MB at 100,000 devices, rich).
/// Returns the address and the document's size.
pub(crate) async fn serve_document(
    provider: &SampleProvider,
    shape: Shape,
    generated_at: Timestamp,
    dir: &std::path::Path,
    shutdown: CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, u64)> {
    serve_documents(provider, shape, generated_at, dir, &[DATE], shutdown).await
}

/// [`serve_document`] for each of `dates` (the first is served when no `?date=` names one).
/// Returns the address and the size of the first date's document.
pub(crate) async fn serve_documents(
    provider: &SampleProvider,
    shape: Shape,
    generated_at: Timestamp,
    dir: &std::path::Path,
    dates: &[Date],
    shutdown: CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, u64)> {
    let mut paths = BTreeMap::new();
    for date in dates {
        let path = dir.join(format!("{date}.json"));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        provider.write_document(&mut file, *date, generated_at, shape)?;
        std::io::Write::flush(&mut file)?;
        paths.insert(date.to_string(), path);
    }
    let first = dates.first().context("no date to serve")?.to_string();
    let size = std::fs::metadata(&paths[&first])?.len();
    let paths = Arc::new(paths);
    let app = axum::Router::new().route(
        "/tomorrow",
        axum::routing::get(
            move |query: axum::extract::Query<BTreeMap<String, String>>| {
                let path = query
                    .get("date")
                    .and_then(|d| paths.get(d))
                    .unwrap_or(&paths[&first])
                    .clone();
                async move {
                    let file = tokio::fs::File::open(&path)
                        .await
                        .map_err(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR)?;
                    let chunks = futures_util::stream::unfold(file, |mut file| async move {
                        let mut buf = vec![0; 64 * 1024];
                        match tokio::io::AsyncReadExt::read(&mut file, &mut buf).await {
                            Ok(0) => None,
                            Ok(n) => {
                                buf.truncate(n);
                                Some((Ok::<_, std::io::Error>(buf), file))
                            }
                            Err(e) => Some((Err(e), file)),
                        }
                    });
                    Ok::<_, axum::http::StatusCode>((
                        [("content-type", "application/json")],
                        axum::body::Body::from_stream(chunks),
                    ))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((addr, size))
}

/// The real cloud as the ingestion benches run it: data in `dir`, the broker at `mqtt`, the
/// provider at `provider`, devices registered as they are named, no daily fetch (the bench
/// asks for the one it measures). Returns once connected to the broker.
pub(crate) async fn start_cloud(
    dir: &std::path::Path,
    mqtt: &str,
    provider: std::net::SocketAddr,
    clock: Arc<dyn Clock>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Cloud> {
    let mut config = CloudConfig::load(None, &[])?;
    config.data_dir = dir.join("cloud");
    config.mqtt = mqtt.to_owned();
    config.http = "127.0.0.1:0".into();
    config.daily_fetch = false;
    config.auto_register = true;
    config.provider = Some(format!("http://{provider}/tomorrow"));
    config.max_document_mib = 4096;
    let cloud = Cloud::start(config, clock, shutdown.clone()).await?;
    tokio::time::timeout(Duration::from_secs(30), cloud.session.wait_connected())
        .await
        .with_context(|| format!("the broker at {mqtt} did not answer within 30 s"))?;
    Ok(cloud)
}

/// Commands in any of `states`.
async fn count(
    store: &Arc<dyn CommandStore>,
    states: &[max300_cloud::CommandState],
) -> anyhow::Result<usize> {
    Ok(store
        .command_counts()
        .await?
        .into_iter()
        .filter(|(s, _)| states.contains(s))
        .map(|(_, n)| n as usize)
        .sum())
}

/// Polls the store until `devices` commands are acknowledged; returns how many were and
/// when (from `t0`). One grouped count every 10 ms costs the store little next to the acks.
async fn wait_acknowledged(
    store: &Arc<dyn CommandStore>,
    devices: usize,
    t0: std::time::Instant,
) -> anyhow::Result<(usize, Duration)> {
    use max300_cloud::CommandState::{Acknowledged, Rejected};
    // Generous: SQLite with synchronous=FULL commits a few hundred acks a second.
    let limit = Duration::from_secs(60) + Duration::from_millis(20 * devices as u64);
    loop {
        let acked = count(store, &[Acknowledged]).await?;
        if acked >= devices {
            return Ok((acked, t0.elapsed()));
        }
        let rejected = count(store, &[Rejected]).await?;
        if rejected > 0 {
            anyhow::bail!("{rejected} commands rejected by the fleet ({acked} acknowledged)");
        }
        if t0.elapsed() > limit {
            anyhow::bail!(
                "{acked} of {devices} commands acknowledged after {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `max300 fleet` as a child process: this binary again, so the fleet's sockets and tasks
/// count against its own process, not the one measured.
struct FleetChild {
    child: tokio::process::Child,
}

impl FleetChild {
    /// Starts the fleet and waits for its "fleet: N connected" line.
    async fn start(mqtt: &str, devices: usize, plan_time: Timestamp) -> anyhow::Result<Self> {
        let clock = ["--clock-start".to_owned(), plan_time.to_string()];
        // Its later lines are not wanted: dropping the receiver leaves them drained.
        let (fleet, _lines) = FleetChild::start_with(mqtt, devices, &clock).await?;
        Ok(fleet)
    }

    /// Starts the fleet with `extra` flags (its clock, its jitter) and waits for its
    /// "fleet: N connected" line; its later stdout lines come on the receiver. The pipe is
    /// drained to the end whether they are read or not, so the child never blocks on it.
    async fn start_with(
        mqtt: &str,
        devices: usize,
        extra: &[String],
    ) -> anyhow::Result<(Self, tokio::sync::mpsc::Receiver<String>)> {
        use tokio::io::AsyncBufReadExt;
        let exe = std::env::current_exe().context("the path of this binary")?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["fleet", "--devices", &devices.to_string(), "--mqtt", mqtt])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} fleet", exe.display()))?;
        let stdout = child.stdout.take().context("max300 fleet: no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = format!("fleet: {devices} connected");
        let limit = Duration::from_secs(60) + Duration::from_millis(10 * devices as u64);
        let connected = tokio::time::timeout(limit, async {
            while let Some(line) = lines.next_line().await? {
                if line == ready {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await;
        match connected {
            Ok(Ok(true)) => {}
            Ok(_) => {
                let status = child.wait().await.context("max300 fleet")?;
                anyhow::bail!(
                    "max300 fleet ended ({status}) before its {devices} devices connected \
                     (its error is above)"
                );
            }
            Err(_) => anyhow::bail!(
                "max300 fleet: its {devices} devices did not all connect within {} s",
                limit.as_secs()
            ),
        }
        // A line per boundary: a small queue is plenty for a reader that polls.
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.try_send(line);
            }
        });
        Ok((FleetChild { child }, rx))
    }

    /// The fleet process's id, while it runs.
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The fleet process's peak resident memory in KiB (Linux: VmHWM).
    fn peak_memory_kb(&self) -> Option<u64> {
        let pid = self.child.id()?;
        vm_hwm_kb(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }

    /// SIGTERM, so every device sends DISCONNECT, then waits for it to exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            kill(Pid::from_raw(pid), Signal::SIGTERM).context("max300 fleet: SIGTERM")?;
        }
        let limit = Duration::from_secs(30);
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => anyhow::bail!("max300 fleet exited with {status}"),
            Ok(Err(e)) => Err(e).context("max300 fleet"),
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!("max300 fleet did not stop within 30 s of SIGTERM: killed")
            }
        }
    }
}

/// Peak resident memory of this process in KiB (Linux: VmHWM).
pub fn peak_memory_kb() -> Option<u64> {
    vm_hwm_kb(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// VmHWM in KiB from the text of a `/proc/PID/status`.
fn vm_hwm_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<(usize, Duration)> {
    let t0 = monotonic();
    let response = http.get(url).send().await.context(url.to_owned())?;
    let status = response.status();
    let body = response.bytes().await.context(url.to_owned())?;
    let took = t0.elapsed();
    if !status.is_success() {
        anyhow::bail!("GET {url}: {status}");
    }
    Ok((body.len(), took))
}

/// A store as the service would hold it at noon: every device with today's and tomorrow's
/// commands acknowledged, the morning's periods reported (a few failed), and heartbeats (a
/// few devices silent and in fallback, so the page has problems to sort first). Returns the
/// number of reports.
async fn fill(path: &std::path::Path, ids: &[String], now: Timestamp) -> anyhow::Result<usize> {
    let store = SqliteStore::open_unsynced(path)?;
    let ledger = max300_cloud::Ledger::new(
        std::sync::Arc::new(store.clone()),
        max300_cloud::Policy::default(),
    );
    let tz = time_zone(DEFAULT_TIMEZONE)?;
    let default_max_rate = RateKw::try_from(150.0)?;
    let mut registered = Vec::with_capacity(ids.len());
    for id in ids {
        let device = DeviceId::parse(id.clone())?;
        store.register_device(&device, None, now).await?;
        registered.push((device, default_max_rate));
    }
    let devices = registered.into_iter().collect();
    let fleet = Fleet {
        timezone: tz.clone(),
        default_max_rate,
        devices,
        max_document_bytes: usize::MAX,
    };
    let provider = SampleProvider {
        devices: ids.to_vec(),
        seed: 1,
        timezone: tz.clone(),
    };
    let store_id = StoreId::parse("bench")?;
    let mut reports = 0;
    for (date, reported) in [(DATE, true), (DATE.tomorrow()?, false)] {
        let document = serde_json::to_vec(&provider.document(date, now)?)?;
        let normalized = normalize(&document, &fleet)?;
        let commands: Vec<NewCommand> = normalized
            .schedules
            .into_iter()
            .map(|s| NewCommand {
                message_id: MessageId::generate(now),
                schedule: s.schedule,
                traceparent: None,
            })
            .collect();
        ledger.insert_commands(&commands, now, None).await?;
        let sent: Vec<MessageId> = commands.iter().map(|c| c.message_id.clone()).collect();
        let loaded = ledger.publishable(&sent, now).await?;
        ledger.published(loaded, now).await?;
        for (i, c) in commands.iter().enumerate() {
            let device = c.schedule.device_id().clone();
            let ack = AckMsg {
                v: V1,
                store_id: store_id.clone(),
                seq: 0,
                message_id: c.message_id.clone(),
                device_id: device.clone(),
                status: AckStatus::Accepted,
                reason: None,
                details: None,
                sha256: Some(c.schedule.sha256()),
                effective_period: Some(1),
                at: now,
                traceparent: None,
            };
            ledger.record_ack(&ack, now).await?;
            if !reported {
                continue;
            }
            let day = c.schedule.day();
            for period in 1..=day.period_count() {
                let start = day.period_start(period);
                if start.checked_add(SignedDuration::from_mins(30))? > now {
                    break;
                }
                let planned = c.schedule.setpoint(period).unwrap_or(Setpoint::IDLE);
                let failed = i % 50 == 7 && period == 20;
                let report = ReportMsg {
                    v: V1,
                    store_id: store_id.clone(),
                    seq: u64::from(period),
                    message_id: Some(c.message_id.clone()),
                    device_id: device.clone(),
                    period,
                    interval_start: start,
                    mode: planned.mode(),
                    rate_kw: planned.rate(),
                    status: if failed {
                        ReportStatus::Failed
                    } else {
                        ReportStatus::Executed
                    },
                    applied_kw: (!failed).then(|| planned.rate()),
                    limited_by: None,
                    reason: None,
                    would_kw: None,
                    soc_pct: Some(50.0),
                    energy_kwh: None,
                    error: failed.then(|| "controller did not answer".to_owned()),
                    at: start,
                    traceparent: None,
                };
                ledger.record_report(&report, start).await?;
                reports += 1;
            }
            let silent = i % 100 == 3;
            let seen = if silent {
                now.checked_sub(SignedDuration::from_hours(2))?
            } else {
                now.checked_sub(SignedDuration::from_secs(30))?
            };
            let heartbeat = HeartbeatMsg {
                v: V1,
                device_id: device,
                at: seen,
                uptime_s: 3600,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                active_message_id: Some(c.message_id.clone()),
                mode: Setpoint::IDLE.mode(),
                rate_kw: RateKw::ZERO,
                soc_pct: Some(50.0),
                fallback: silent.then_some(Fallback::NoSchedule),
                outbox: 0,
            };
            store.record_heartbeats(&[heartbeat], seen).await?;
        }
    }
    Ok(reports)
}
