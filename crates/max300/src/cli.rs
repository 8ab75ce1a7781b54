//! The command line (DESIGN §8). Flags are layered over the embedded default, the config
//! file and `MAX300_*` variables as the last, strongest layer of the service's config.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
#[cfg(feature = "agent")]
use max300_agent::AgentConfig;
#[cfg(feature = "cloud")]
use max300_cloud::{Cloud, CloudConfig};
use tokio_util::sync::CancellationToken;

use crate::clock::ClockArgs;
#[cfg(all(feature = "cloud", feature = "broker", feature = "sim"))]
use crate::up;
use crate::validate;
#[cfg(feature = "sim")]
use max300_sim::sample;

/// MAX300 fleet control: day-ahead battery plans from the provider to every unit.
#[derive(Parser, Debug)]
#[command(name = "max300", version, about)]
pub struct Cli {
    /// Log format: text or json. Default: text on a terminal, json otherwise.
    #[arg(long, global = true, env = "MAX300_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Send OpenTelemetry traces over OTLP/HTTP to this collector, e.g.
    /// http://localhost:4318 (spans go to {URL}/v1/traces). Default: no traces.
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    pub otlp_endpoint: Option<String>,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Everything on one machine: broker, cloud, sample provider and simulated units.
    #[cfg(all(feature = "cloud", feature = "broker", feature = "sim"))]
    Up(up::UpArgs),
    /// The cloud service.
    #[cfg(feature = "cloud")]
    Cloud(CloudArgs),
    /// The edge agent of one unit.
    #[cfg(feature = "agent")]
    Agent(AgentArgs),
    /// The sample schedule provider (GET /tomorrow[?date=D]).
    #[cfg(feature = "sim")]
    Provider(ProviderArgs),
    /// The embedded MQTT broker on its own (loopback only).
    #[cfg(feature = "broker")]
    Broker(BrokerArgs),
    /// A simulated battery served over Modbus TCP as a SunSpec map (models 1 and 124).
    #[cfg(feature = "sim")]
    BatterySim(BatterySimArgs),
    /// One ingestion run, in-process, with the cloud's settings.
    #[cfg(feature = "cloud")]
    Ingest(IngestArgs),
    /// Check a provider document offline and print every error with its place.
    Validate(validate::ValidateArgs),
    /// Simulated devices, one real MQTT connection each, that ack every schedule as an agent
    /// does, hold the plans and report every period at its boundary (after a jitter), with
    /// heartbeats and the agent's outbox and receipts, on the --clock-* clock. They drive no
    /// battery: this loads the cloud and the broker, it does not measure the agent. Prints
    /// "fleet: N connected" once all are subscribed, a "fleet: boundary …" line per period
    /// boundary, and serves until SIGTERM or ctrl-c, then disconnects each cleanly.
    #[cfg(feature = "fleet")]
    Fleet(FleetCommand),
    /// Benchmarks through the real components.
    #[cfg(feature = "sim")]
    Bench {
        /// What to measure.
        #[command(subcommand)]
        what: max300_sim::bench::Bench,
    },
    /// Development certificates: a CA, the broker's, the cloud's and each device's.
    #[cfg(feature = "cloud")]
    Certs {
        /// What to make.
        #[command(subcommand)]
        action: CertsAction,
    },
    /// The cloud service as an AWS Lambda function (packaged as `bootstrap`): scheduled
    /// ticks, the HTTP API behind API Gateway, and device feedback from IoT rules.
    #[cfg(feature = "aws")]
    Lambda(crate::lambda::LambdaArgs),
    /// Configuration helpers.
    Config {
        /// What to do.
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `max300 certs …`
#[cfg(feature = "cloud")]
#[derive(Subcommand, Debug)]
pub enum CertsAction {
    /// A CA (ca.pem, ca.key), the broker's certificate (broker.pem/.key, for localhost) and
    /// the cloud's (cloud.pem/.key, CN max300-cloud).
    Init {
        /// Where to write them.
        dir: std::path::PathBuf,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Names and addresses the broker's certificate is valid for (repeat the flag).
        #[arg(long = "broker-host", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])]
        broker_hosts: Vec<String>,
    },
    /// A device's key and certificate (ID.pem, ID.key; CN = O = ID), signed by the CA in --dir.
    Device {
        /// The device id.
        id: String,
        /// The folder of `certs init`.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Its last valid day instead (a past date makes an expired certificate, for tests).
        #[arg(long)]
        not_after: Option<jiff::civil::Date>,
    },
    /// A mosquitto config (mosquitto.conf, mosquitto.acl) for the certificates in DIR: mutual
    /// TLS on 127.0.0.1:PORT and per-device topics.
    Mosquitto {
        /// The folder of `certs init`.
        dir: std::path::PathBuf,
        /// The TLS port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
    },
}

/// `max300 config …`
#[derive(Subcommand, Debug)]
pub enum ConfigAction {
    /// Print the embedded default config of a service.
    PrintDefault {
        /// Which service.
        which: Service,
    },
}

/// A service with a config.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Service {
    /// The cloud service.
    #[cfg(feature = "cloud")]
    Cloud,
    /// The edge agent.
    #[cfg(feature = "agent")]
    Agent,
}

/// Flags every long-running service takes.
#[derive(Args, Debug, Clone, Default)]
pub struct ServiceArgs {
    /// A TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where data lives.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The broker: mqtt://host:port, or mqtts://host:port with --ca (and --cert/--key).
    #[arg(long)]
    pub mqtt: Option<String>,
    /// The CA that signed the broker's certificate (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for mutual TLS.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Plan time.
    #[command(flatten)]
    pub clock: ClockArgs,
}

/// `max300 cloud`
#[cfg(feature = "cloud")]
#[derive(Args, Debug, Clone, Default)]
pub struct CloudArgs {
    /// Config, data dir, broker, clock.
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The HTTP API's address.
    #[arg(long)]
    pub http: Option<String>,
    /// The provider's full endpoint, e.g. https://provider/tomorrow.
    #[arg(long)]
    pub provider: Option<String>,
    /// Bearer token for writes (prefer MAX300_API_TOKEN).
    #[arg(long)]
    pub api_token: Option<String>,
    /// The command store: sqlite://PATH or dynamodb://TABLE.
    #[arg(long)]
    pub store: Option<String>,
    /// The audit store: file://DIR or s3://BUCKET/PREFIX.
    #[arg(long)]
    pub audit: Option<String>,
    /// Share device feedback with other instances: subscribe as $share/GROUP/....
    #[arg(long)]
    pub shared_group: Option<String>,
    /// This instance's MQTT client id (and lease holder name).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Register devices on their first message.
    #[arg(long)]
    pub auto_register: bool,
    /// Create a missing DynamoDB table (store = dynamodb://TABLE) with the deployment
    /// template's schema. Buckets come from the template or the operator.
    #[arg(long)]
    pub create_resources: bool,
}

/// `max300 agent`
#[cfg(feature = "agent")]
#[derive(Args, Debug, Clone, Default)]
pub struct AgentArgs {
    /// Config, data dir, broker, clock.
    #[command(flatten)]
    pub service: ServiceArgs,
    /// This unit's id.
    #[arg(long)]
    pub device_id: Option<String>,
    /// The battery controller: sim, sunspec+tcp://host:port/unit, or dry-run:sunspec+tcp://…
    /// (read only; periods reported skipped with would_kw).
    #[arg(long)]
    pub battery: Option<String>,
    /// Serve the agent's Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// `max300 provider`
#[cfg(feature = "sim")]
#[derive(Args, Debug, Clone)]
pub struct ProviderArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8400")]
    pub http: std::net::SocketAddr,
    /// Serve plans for max300-0001 … max300-N.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Serve plans for these ids instead (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub device_ids: Vec<String>,
    /// Seed of the variety between devices and days.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The fleet's zone.
    #[arg(long, default_value = "Europe/London")]
    pub timezone: String,
    /// Plan time.
    #[command(flatten)]
    pub clock: ClockArgs,
}

/// `max300 broker`
#[cfg(feature = "broker")]
#[derive(Args, Debug, Clone)]
pub struct BrokerArgs {
    /// Where to listen: mqtt://127.0.0.1:PORT (loopback only).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt: String,
    /// How many clients at most.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
}

/// `max300 battery-sim`
#[cfg(feature = "sim")]
#[derive(Args, Debug, Clone)]
pub struct BatterySimArgs {
    /// Where to serve Modbus TCP (port 0: any free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:1502")]
    pub modbus: std::net::SocketAddr,
    /// Serve unit ids 1..=N, each its own battery.
    #[arg(long, default_value_t = 1)]
    pub units: u8,
    /// Where the SunSpec block starts: 40000, 0 or 50000.
    #[arg(long, default_value_t = 40000)]
    pub base: u16,
    /// Usable capacity, kWh.
    #[arg(long, default_value_t = 300.0)]
    pub capacity_kwh: f64,
    /// State of charge at start, percent.
    #[arg(long, default_value_t = 50.0)]
    pub initial_soc_pct: f64,
    /// The charge limit (WChaMax), kW.
    #[arg(long, default_value_t = 150.0)]
    pub max_charge_kw: f64,
    /// The discharge limit, kW.
    #[arg(long, default_value_t = 150.0)]
    pub max_discharge_kw: f64,
    /// How fast the power follows a new setpoint, kW per second of plan time (0: at once).
    #[arg(long, default_value_t = 5.0)]
    pub ramp_kw_per_s: f64,
    /// Round-trip efficiency, above 0 and at most 1.
    #[arg(long, default_value_t = 0.92)]
    pub round_trip_efficiency: f64,
    /// The reserve shown as MinRsvPct, percent.
    #[arg(long, default_value_t = 10.0)]
    pub soc_min_pct: f64,
    /// Append every register write (and every revert to idle) as one JSON line.
    #[arg(long)]
    pub write_log: Option<PathBuf>,
    /// Leave out model 103 (the inverter's measured power, W): the agent then has no measured
    /// power, as with controllers that do not serve one.
    #[arg(long)]
    pub no_meter: bool,
    /// Also serve models 704 (DER AC controls: WSetEna, WSetMod, WSet, WSetRvrtTms) and 713
    /// (DER storage capacity: SoC), for agents whose URL ends in `?control=704`.
    #[arg(long)]
    pub der_models: bool,
    /// Play a fault: none, silent (no answers), exception (0x04 to everything), stuck
    /// (writes acknowledged but not taken), no_power (writes taken and held, but the battery
    /// idles: the measured power is 0 and the state of charge stays).
    #[arg(long, default_value = "none")]
    pub fault: max300_sim::sunspec::Fault,
    /// Start the fault at this plan time (RFC 3339). Default: at once.
    #[arg(long)]
    pub fault_from: Option<jiff::Timestamp>,
    /// Plan time (state of charge); the revert timer runs on real seconds.
    #[command(flatten)]
    pub clock: ClockArgs,
}

/// `max300 fleet`
#[cfg(feature = "fleet")]
#[derive(Args, Debug, Clone)]
pub struct FleetCommand {
    /// The fleet's flags.
    #[command(flatten)]
    pub fleet: max300_sim::fleet::FleetArgs,
    /// Plan time, for the acks' `at` and effective period.
    #[command(flatten)]
    pub clock: ClockArgs,
}

/// `max300 ingest`
#[cfg(feature = "cloud")]
#[derive(Args, Debug, Clone)]
pub struct IngestArgs {
    /// The cloud's flags.
    #[command(flatten)]
    pub cloud: CloudArgs,
    /// The date to ingest.
    #[arg(long)]
    pub date: jiff::civil::Date,
}

impl Command {
    /// The log filter when RUST_LOG is not set.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            #[cfg(all(feature = "cloud", feature = "broker", feature = "sim"))]
            Command::Up(_) => "warn,rumqttd=off",
            Command::Validate(_) | Command::Config { .. } => "warn",
            #[cfg(feature = "fleet")]
            Command::Fleet(_) => "warn",
            #[cfg(feature = "sim")]
            Command::Bench { .. } => "warn,rumqttd=off",
            #[cfg(feature = "cloud")]
            Command::Certs { .. } => "warn",
            _ => "info",
        }
    }

    /// The OpenTelemetry `service.name` of the process.
    pub fn service_name(&self) -> &'static str {
        match self {
            #[cfg(feature = "cloud")]
            Command::Cloud(_) | Command::Ingest(_) => "max300-cloud",
            #[cfg(feature = "aws")]
            Command::Lambda(_) => "max300-cloud",
            #[cfg(feature = "agent")]
            Command::Agent(_) => "max300-agent",
            _ => "max300",
        }
    }

    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            #[cfg(all(feature = "cloud", feature = "broker", feature = "sim"))]
            Command::Up(args) => up::run(args).await,
            #[cfg(feature = "cloud")]
            Command::Cloud(args) => run_cloud(args).await,
            #[cfg(feature = "agent")]
            Command::Agent(args) => run_agent(args).await,
            #[cfg(feature = "sim")]
            Command::Provider(args) => run_provider(args).await,
            #[cfg(feature = "broker")]
            Command::Broker(args) => run_broker(args).await,
            #[cfg(feature = "sim")]
            Command::BatterySim(args) => run_battery_sim(args).await,
            #[cfg(feature = "cloud")]
            Command::Ingest(args) => run_ingest(args).await,
            Command::Validate(args) => validate::run(args),
            #[cfg(feature = "fleet")]
            Command::Fleet(args) => {
                let clock = args.clock.build()?;
                max300_sim::fleet::run(args.fleet, clock, shutdown_on_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            #[cfg(feature = "aws")]
            Command::Lambda(args) => crate::lambda::run(args).await,
            #[cfg(feature = "sim")]
            Command::Bench { what } => what.run().await,
            #[cfg(feature = "cloud")]
            Command::Certs { action } => {
                let written = match action {
                    CertsAction::Init {
                        dir,
                        days,
                        broker_hosts,
                    } => crate::certs::init(
                        &dir,
                        crate::certs::Validity {
                            days,
                            not_after: None,
                        },
                        &broker_hosts,
                    )?,
                    CertsAction::Device {
                        id,
                        dir,
                        days,
                        not_after,
                    } => {
                        crate::certs::device(&id, &dir, crate::certs::Validity { days, not_after })?
                    }
                    CertsAction::Mosquitto { dir, port } => crate::certs::mosquitto(&dir, port)?,
                };
                for path in written {
                    println!("wrote {}", path.display());
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Config {
                action: ConfigAction::PrintDefault { which },
            } => {
                print!(
                    "{}",
                    match which {
                        #[cfg(feature = "cloud")]
                        Service::Cloud => CloudConfig::DEFAULT_TOML,
                        #[cfg(feature = "agent")]
                        Service::Agent => AgentConfig::DEFAULT_TOML,
                    }
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Ctrl-C or SIGTERM cancels the token.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}

fn read_config_file(path: &Option<PathBuf>) -> anyhow::Result<Option<String>> {
    path.as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("--config {}", p.display())))
        .transpose()
}

/// The process's `MAX300_*` variables, the third layer of a config.
fn max300_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("MAX300_"))
        .collect()
}

/// The flags that were given, as `(key, value)` overrides: the last, strongest layer. A key
/// is the setting's name; an error about it names the flag (`--data-dir`).
/// The flags set, as config keys: the ones both services take, then `flags`.
fn flag_overrides<'a>(
    service: &ServiceArgs,
    flags: Vec<(&'a str, Option<String>)>,
) -> Vec<(&'a str, String)> {
    let common = [
        ("data_dir", path_flag(&service.data_dir)),
        ("mqtt", service.mqtt.clone()),
        ("ca", path_flag(&service.ca)),
        ("cert", path_flag(&service.cert)),
        ("key", path_flag(&service.key)),
    ];
    common
        .into_iter()
        .chain(flags)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}

fn path_flag(p: &Option<PathBuf>) -> Option<String> {
    p.as_ref().map(|p| p.display().to_string())
}

/// The cloud's config from its defaults, file, env and flags.
#[cfg(feature = "cloud")]
pub fn cloud_config(args: &CloudArgs) -> anyhow::Result<CloudConfig> {
    let file = read_config_file(&args.service.config)?;
    let flags = flag_overrides(
        &args.service,
        vec![
            ("http", args.http.clone()),
            ("provider", args.provider.clone()),
            ("api_token", args.api_token.clone()),
            ("store", args.store.clone()),
            ("audit", args.audit.clone()),
            ("shared_group", args.shared_group.clone()),
            ("client_id", args.client_id.clone()),
            (
                "auto_register",
                args.auto_register.then(|| "true".to_owned()),
            ),
            (
                "create_resources",
                args.create_resources.then(|| "true".to_owned()),
            ),
        ],
    );
    let config = CloudConfig::layered(file.as_deref(), &max300_env(), &flags)?;
    config.validate()?;
    Ok(config)
}

/// The agent's config from its defaults, file, env and flags.
#[cfg(feature = "agent")]
pub fn agent_config(args: &AgentArgs) -> anyhow::Result<AgentConfig> {
    let file = read_config_file(&args.service.config)?;
    let flags = flag_overrides(
        &args.service,
        vec![
            ("device_id", args.device_id.clone()),
            ("battery", args.battery.clone()),
            ("metrics", args.metrics.clone()),
        ],
    );
    Ok(AgentConfig::layered(
        AgentConfig::DEFAULT_TOML,
        file.as_deref(),
        &max300_env(),
        &flags,
    )?)
}

#[cfg(feature = "cloud")]
async fn run_cloud(args: CloudArgs) -> anyhow::Result<ExitCode> {
    let config = cloud_config(&args)?;
    let clock = args.service.clock.build()?;
    let shutdown = shutdown_on_signal();
    let cloud = Cloud::start(config, clock, shutdown.clone()).await?;
    println!("listening on http://{}", cloud.addr);
    shutdown.cancelled().await;
    cloud.wait().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "agent")]
async fn run_agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = agent_config(&args)?;
    let clock = args.service.clock.build()?;
    let shutdown = shutdown_on_signal();
    // The simulated battery comes with the simulator; the agent-only build has neither, and
    // its agent refuses `battery = "sim"` with a clear error.
    #[cfg(feature = "sim")]
    max300_sim::run_agent(config, clock, shutdown).await?;
    #[cfg(not(feature = "sim"))]
    max300_agent::run(config, clock, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "sim")]
async fn run_provider(args: ProviderArgs) -> anyhow::Result<ExitCode> {
    let clock = args.clock.build()?;
    let devices = if args.device_ids.is_empty() {
        sample::SampleProvider::numbered(args.devices)
    } else {
        args.device_ids.clone()
    };
    let provider = sample::SampleProvider {
        devices,
        seed: args.seed,
        timezone: max300_protocol::day::time_zone(&args.timezone).context("--timezone")?,
    };
    let shutdown = shutdown_on_signal();
    let (addr, served) = sample::serve(provider, clock, args.http, shutdown).await?;
    println!("listening on http://{addr}/tomorrow");
    let _ = served.await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "broker")]
async fn run_broker(args: BrokerArgs) -> anyhow::Result<ExitCode> {
    let url: max300_mqtt::BrokerUrl = args.mqtt.parse()?;
    if url.tls {
        anyhow::bail!("--mqtt: the embedded broker serves plain mqtt:// on loopback only");
    }
    let ip: std::net::IpAddr = match url.host.as_str() {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        host => host
            .parse()
            .with_context(|| format!("--mqtt: {host:?} is not an IP address"))?,
    };
    let addr = max300_mqtt::broker::start(
        std::net::SocketAddr::new(ip, url.port),
        args.max_connections,
    )?;
    println!("listening on mqtt://{addr}");
    shutdown_on_signal().cancelled().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "sim")]
async fn run_battery_sim(args: BatterySimArgs) -> anyhow::Result<ExitCode> {
    use max300_agent::SimConfig;
    use max300_agent::battery::sunspec::map::Meter;
    use max300_sim::sunspec::{SimServerConfig, SunSpecSim, serve};

    let clock = args.clock.build()?;
    let defaults = SimConfig::default();
    let config = SimServerConfig {
        units: args.units,
        base: args.base,
        sim: SimConfig {
            capacity_kwh: args.capacity_kwh,
            initial_soc_pct: args.initial_soc_pct,
            max_charge_kw: args.max_charge_kw,
            max_discharge_kw: args.max_discharge_kw,
            ramp_kw_per_s: args.ramp_kw_per_s,
            round_trip_efficiency: args.round_trip_efficiency,
            ..defaults
        },
        write_log: args.write_log.clone(),
        reserve_pct: args.soc_min_pct,
        meter: (!args.no_meter).then_some(Meter::Inverter),
        der_models: args.der_models,
    };
    let sim = std::sync::Arc::new(SunSpecSim::new(config, clock).context("battery-sim")?);
    sim.set_fault(args.fault, args.fault_from);
    let listener = tokio::net::TcpListener::bind(args.modbus)
        .await
        .with_context(|| format!("--modbus {}", args.modbus))?;
    let addr = listener.local_addr()?;
    tracing::info!(modbus = %addr, units = args.units, fault = %args.fault, "battery-sim serving");
    println!("listening on {addr}");
    serve(sim, listener, shutdown_on_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on a terminal (stages, then commands published); plain lines otherwise.
#[cfg(feature = "cloud")]
fn show_progress(
    mut stage: tokio::sync::watch::Receiver<max300_cloud::ingest::Stage>,
    date: jiff::civil::Date,
) -> tokio::task::JoinHandle<()> {
    use max300_cloud::ingest::Stage;
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let bar = indicatif::ProgressBar::new_spinner();
        if !terminal {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} commands ({elapsed})",
        )
        .map(|s| s.progress_chars("=> "));
        let mut last = None;
        loop {
            let now = *stage.borrow_and_update();
            let line = match now {
                Stage::Idle => None,
                Stage::Fetching => Some(format!("fetching {date}")),
                Stage::Normalizing => Some("normalizing".to_owned()),
                Stage::Committing => Some("committing".to_owned()),
                Stage::Publishing { done, total } => {
                    if let Ok(style) = &style {
                        bar.set_style(style.clone());
                    }
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                    Some("publishing".to_owned())
                }
                Stage::Done => {
                    bar.finish_and_clear();
                    return;
                }
            };
            if let Some(line) = line
                && last.as_ref() != Some(&line)
            {
                if !terminal {
                    eprintln!("{line}…");
                }
                bar.set_message(line.clone());
                last = Some(line);
            }
            if stage.changed().await.is_err() {
                return;
            }
        }
    })
}

#[cfg(feature = "cloud")]
async fn run_ingest(args: IngestArgs) -> anyhow::Result<ExitCode> {
    let mut cloud_args = args.cloud.clone();
    // An in-process run: the API is not needed, so take any free loopback port.
    cloud_args.http = Some("127.0.0.1:0".into());
    let mut config = cloud_config(&cloud_args)?;
    config.daily_fetch = false;
    if config.provider.is_none() {
        anyhow::bail!("--provider (or provider in the config) is needed to ingest");
    }
    let clock = args.cloud.service.clock.build()?;
    let shutdown = CancellationToken::new();
    let (ingestor, session) = Cloud::ingestion(config, clock, shutdown.clone()).await?;
    eprintln!("connecting to the broker…");
    tokio::time::timeout(std::time::Duration::from_secs(30), session.wait_connected())
        .await
        .context("the broker did not answer within 30 s")?;
    let progress = show_progress(ingestor.progress(), args.date);
    let report = ingestor
        .fetch(args.date, None, max300_cloud::Listing::Counts)
        .await;
    progress.abort();
    shutdown.cancel();
    let report = report?;
    println!(
        "{}: {} accepted, {} unchanged, {} rejected",
        report.schedule_date,
        report.accepted.len(),
        report.unchanged.len(),
        report.rejected.len()
    );
    for r in &report.rejected {
        for e in &r.errors {
            println!("  {}: {e}", r.device_id);
        }
    }
    for w in &report.warnings {
        println!("  warning: {}: {}", w.device_id, w.warning);
    }
    Ok(if report.rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
