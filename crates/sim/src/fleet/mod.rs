//! `max300 fleet`: a fleet of simulated devices in one process, each with its own MQTT
//! session (client id = device id), that plays each unit's day as the agent would, without a
//! battery or a disk. It exists to load the cloud and the broker with real connections; it
//! says nothing about the agent's own timing.
//!
//! Each device is the agent's halves without the battery and the disk: a
//! [`max300_mqtt::Link`] (the session's rules: reconnect after its backoff, resubscribe,
//! PUBACK order, a clean DISCONNECT at shutdown; but no task of its own and no buffer between
//! packets, so that a connection costs a few KB), a [`Unit`] whose engine (the agent's
//! [`Engine`]) decides each ack and holds each accepted plan's setpoints, and an [`Outbox`]
//! that keeps every ack and report until the cloud's receipt names it, sending again what
//! has none after `--resend-after-s` (real time) and on every reconnect, at most 100 a
//! second, as the agent does.
//!
//! ```text
//!  batch 1: 500 sessions ──connect, subscribe──▶ all up? ──▶ batch 2 … ──▶ "fleet: N connected"
//!  each device: SCHEDULE ──▶ engine: ACK (QoS 1), plan held ──▶ outbox until receipted
//!  one tick task: plan time reaches a boundary ──watch──▶ every device
//!      each device, after its own jitter in [0, --jitter-ms): REPORT of the period that
//!      ended (executed as planned) ──▶ outbox until receipted
//!      the tick task, once every report of a boundary is receipted (or the next boundary
//!      comes): "fleet: boundary B reports N receipted N last receipt +S s resent K"
//!  each device, every --heartbeat-s (real time): HEARTBEAT (QoS 0)
//!  shutdown: every session sends DISCONNECT, then "fleet: N connections closed, …"
//! ```
//!
//! Plan time is the binary's clock (`--clock-*`): the tick task sleeps the real time the
//! clock says is left to the next boundary, so a scaled clock plays a day in minutes and
//! nothing sleeps per device except its own jitter, heartbeat and resend.

use max300_protocol::error::Chain;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use jiff::{SignedDuration, Timestamp};
use max300_agent::engine::Engine;
use max300_mqtt::{BrokerUrl, Delivery, Link, LinkConfig, LinkEvent, Qos};
use max300_protocol::clock::monotonic;
use max300_protocol::day::{period_start_at, time_zone};
use max300_protocol::{
    Channel, Clock, DEFAULT_TIMEZONE, DeviceId, Message, PERIOD_SECS, RateKw, StoreId, Topics,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

mod outbox;
mod tally;
mod unit;

pub use outbox::{Entry, Outbox};
pub use tally::{Tally, jitter};
pub use unit::Unit;

/// `max300 fleet` (plan time comes from the binary's `--clock-*` flags).
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// Fleet size: devices {prefix}0001 … {prefix}N, one MQTT connection each.
    #[arg(long)]
    pub devices: usize,
    /// The broker: mqtt://host:port.
    #[arg(long)]
    pub mqtt: String,
    /// What device ids start with (the sample provider's ids with the default).
    #[arg(long, default_value = "max300-")]
    pub prefix: String,
    /// The topic root, as the cloud's `topic_root`.
    #[arg(long, default_value = "max300")]
    pub topic_root: String,
    /// Connections opened at once; the next batch starts when all of these are subscribed.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// The devices' zone, as an agent's `timezone`: a schedule in another zone is rejected.
    #[arg(long, default_value = DEFAULT_TIMEZONE)]
    pub timezone: String,
    /// The devices' limit, as an agent's `max_rate_kw`: a schedule above it is rejected.
    #[arg(long, default_value_t = 150.0)]
    pub max_rate_kw: f64,
    /// Each device reports this long after a boundary at most (real ms): a delay drawn
    /// uniformly in [0, N) at each boundary, from the device's own seed.
    #[arg(long, default_value_t = 1000)]
    pub jitter_ms: u64,
    /// Heartbeat interval (real seconds), as an agent's `heartbeat_interval_s`.
    #[arg(long, default_value_t = 60)]
    pub heartbeat_s: u64,
    /// An ack or report with no receipt this long (real seconds) is sent again, as an
    /// agent's `resend_after_s`; at least 2.
    #[arg(long, default_value_t = 10)]
    pub resend_after_s: u64,
}

/// The most devices one process simulates; the open-file limit usually binds first.
const MAX_DEVICES: usize = 1_000_000;
/// Each device pings this often: 10,000 devices make about 170 pings a second.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// The largest packet a device takes or sends: its largest message is a 50-period schedule,
/// about 4 KB.
const MAX_PACKET: usize = 16 * 1024;
/// At most this many outbox entries go out per resend round, one round a second: the agent's
/// rate (AWS IoT Core allows 100 publishes a second per connection).
const RESEND_BATCH: usize = 100;
const RESEND_ROUND: Duration = Duration::from_secs(1);
/// How often the tick task looks for boundaries whose figures are complete.
const TALLY_EVERY: Duration = Duration::from_millis(100);
/// The tick task's longest sleep, so a clock that jumps is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);
const PERIOD: SignedDuration = SignedDuration::from_secs(PERIOD_SECS);

/// Device ids `{prefix}0001` … `{prefix}N`, as `SampleProvider::numbered` makes them.
pub fn device_ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// Runs the fleet until `shutdown`: prints "fleet: N connected" once every device is
/// subscribed, a "fleet: boundary …" line per period boundary, and "fleet: N connections
/// closed, …" once each device has sent DISCONNECT. Fails if a device's first connection
/// fails, after closing those already made.
pub async fn run(
    args: FleetArgs,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if args.devices == 0 || args.devices > MAX_DEVICES {
        anyhow::bail!(
            "--devices: {} is not within 1..={MAX_DEVICES}",
            args.devices
        );
    }
    if args.batch == 0 {
        anyhow::bail!("--batch: must be at least 1");
    }
    if args.heartbeat_s == 0 {
        anyhow::bail!("--heartbeat-s: must be at least 1");
    }
    if args.resend_after_s < 2 {
        anyhow::bail!(
            "--resend-after-s: {} is below the minimum of 2",
            args.resend_after_s
        );
    }
    let url: BrokerUrl = args.mqtt.parse().context("--mqtt")?;
    if url.tls {
        anyhow::bail!(
            "--mqtt {}: the fleet connects with plain mqtt:// only",
            args.mqtt
        );
    }
    crate::fds::ensure_room(args.devices, "--devices")?;
    let ids = device_ids(&args.prefix, args.devices)
        .into_iter()
        .map(DeviceId::parse)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--prefix {:?}", args.prefix))?;
    let shared = Arc::new(Shared {
        url,
        topics: Topics::new(args.topic_root.clone()),
        tz: time_zone(&args.timezone).context("--timezone")?,
        tz_name: args.timezone.clone(),
        max_rate: RateKw::try_from(args.max_rate_kw).context("--max-rate-kw")?,
        clock,
        jitter: Duration::from_millis(args.jitter_ms),
        heartbeat_every: Duration::from_secs(args.heartbeat_s),
        resend_after: Duration::from_secs(args.resend_after_s),
        tally: Mutex::new(Tally::new(ids.len())),
        acks: AtomicU64::new(0),
        reports: AtomicU64::new(0),
        resent: AtomicU64::new(0),
    });
    // Its own token, so a failed start closes the connections already made, cleanly.
    let stop = shutdown.child_token();
    let (ticks, _) = watch::channel(None);
    let ticker = tokio::spawn(tick(shared.clone(), ticks.clone(), stop.clone()));
    let mut tasks = JoinSet::new();
    let started = connect_all(&ids, args.batch, &shared, &ticks, &mut tasks, &stop).await;
    if started.is_ok() {
        println!("fleet: {} connected", ids.len());
        stop.cancelled().await;
    }
    stop.cancel();
    // A device's task ends with its session, once its DISCONNECT is written.
    while tasks.join_next().await.is_some() {}
    let _ = ticker.await;
    started?;
    println!(
        "fleet: {} connections closed, {} acks sent, {} reports sent, {} resent",
        ids.len(),
        shared.acks.load(Ordering::Relaxed),
        shared.reports.load(Ordering::Relaxed),
        shared.resent.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Starts the devices batch by batch; each batch must be subscribed before the next starts,
/// so the broker never has more than one batch of handshakes in hand. A failure names the
/// first device of its batch that could not connect.
async fn connect_all(
    ids: &[DeviceId],
    batch: usize,
    shared: &Arc<Shared>,
    ticks: &watch::Sender<Option<Timestamp>>,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    for (b, chunk) in ids.chunks(batch).enumerate() {
        let mut connecting = JoinSet::new();
        for (i, id) in chunk.iter().enumerate() {
            let mut config = LinkConfig::new(
                shared.url.clone(),
                id.as_str(),
                shared.topics.device_filters(id),
            );
            config.topics = shared.topics.clone();
            config.keep_alive = KEEP_ALIVE;
            config.max_packet_bytes = MAX_PACKET;
            connecting.spawn(async move { (i, Link::connect(config).await) });
        }
        let mut links: Vec<_> = chunk.iter().map(|_| None).collect();
        loop {
            let joined = tokio::select! {
                _ = stop.cancelled() => anyhow::bail!("stopped before every device connected"),
                joined = connecting.join_next() => joined,
            };
            let Some(joined) = joined else { break };
            let (i, link) = joined.context("a connection task failed")?;
            links[i] = Some(link);
        }
        // Each device starts as soon as its batch is up; a failed batch's devices that did
        // connect are started too, so that the stop closes their links cleanly.
        let mut failed = None;
        for (i, (id, link)) in chunk.iter().zip(links).enumerate() {
            match link {
                Some(Ok(link)) => {
                    // Boxed, or the future would hold the device twice (as its argument, and
                    // once moved into its body).
                    let device = Box::new(Device::new(id.clone(), b * batch + i + 1, link, shared));
                    tasks.spawn(device.serve(ticks.subscribe(), shared.clone(), stop.clone()));
                }
                Some(Err(e)) => {
                    failed.get_or_insert_with(|| anyhow::anyhow!("{id}: {e}"));
                }
                None => {}
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(())
}

/// The one timer of plan time: at each period boundary it tells every device (a watch of
/// the boundary), and it prints each boundary's figures once they are complete.
async fn tick(
    shared: Arc<Shared>,
    ticks: watch::Sender<Option<Timestamp>>,
    stop: CancellationToken,
) {
    let clock = shared.clock.clone();
    let mut next = next_boundary(clock.now(), &shared.tz);
    let mut tally_every = tokio::time::interval(TALLY_EVERY);
    tally_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sleep = clock.real_until(next).min(MAX_SLEEP);
        if sleep.is_zero() {
            let now = clock.now();
            // When the clock read the boundary, in real time: a late wake-up is not counted
            // against the fleet's receipts.
            let late = clock.real_duration(now.duration_since(next));
            let real_at = monotonic().checked_sub(late).unwrap_or_else(monotonic);
            let lines = {
                let mut tally = shared.tally();
                tally.begin(next, real_at);
                tally.finished(Some(next), false)
            };
            print_lines(&lines);
            ticks.send_replace(Some(next));
            next = next_boundary(now, &shared.tz);
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(sleep) => {}
            _ = tally_every.tick() => {
                let lines = shared.tally().finished(None, false);
                print_lines(&lines);
            }
        }
    }
    let lines = shared.tally().finished(None, true);
    print_lines(&lines);
}

fn print_lines(lines: &[String]) {
    for line in lines {
        println!("{line}");
    }
}

/// The first period boundary after `now`.
fn next_boundary(now: Timestamp, tz: &jiff::tz::TimeZone) -> Timestamp {
    match period_start_at(now, tz) {
        Ok(start) => start + PERIOD,
        Err(_) => now + PERIOD,
    }
}

/// What every device shares.
struct Shared {
    url: BrokerUrl,
    topics: Topics,
    tz: jiff::tz::TimeZone,
    tz_name: String,
    max_rate: RateKw,
    clock: Arc<dyn Clock>,
    jitter: Duration,
    heartbeat_every: Duration,
    resend_after: Duration,
    tally: Mutex<Tally>,
    acks: AtomicU64,
    reports: AtomicU64,
    resent: AtomicU64,
}

impl Shared {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        // Every update leaves the figures consistent: a panic elsewhere cannot poison them.
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One simulated device: its connection, its unit's day and its outbox.
struct Device {
    id: DeviceId,
    link: Link,
    unit: Unit,
    outbox: Outbox,
    /// This device's jitter, seeded by its number: runs compare.
    rng: fastrand::Rng,
    started: Instant,
    /// The boundary to report next, and when (after this device's jitter).
    report_at: Option<(Timestamp, Instant)>,
    heartbeat_at: Instant,
    /// When outbox entries come due for a resend; `None` while it is empty.
    resend_at: Option<Instant>,
    /// When the last resend round went out (real time).
    last_round: Option<Instant>,
}

impl Device {
    fn new(id: DeviceId, number: usize, link: Link, shared: &Shared) -> Device {
        let mut rng = fastrand::Rng::with_seed(number as u64);
        let engine = Engine::new(
            id.clone(),
            shared.tz.clone(),
            &shared.tz_name,
            shared.max_rate,
        );
        // Units start the day at different states of charge, 30 to 70 %.
        let soc_pct = 30.0 + (number % 41) as f32;
        let started = monotonic();
        Device {
            unit: Unit::new(engine, soc_pct),
            outbox: Outbox::new(StoreId::generate()),
            // Spread over the interval, so a fleet started at once does not beat in step.
            heartbeat_at: started + jitter(&mut rng, shared.heartbeat_every),
            rng,
            started,
            report_at: None,
            resend_at: None,
            last_round: None,
            id,
            link,
        }
    }

    /// Plays the unit's day and answers the cloud until `stop`, then closes its connection
    /// with a DISCONNECT. What it does at each wake is boxed: this future lives as long as the
    /// device, one per connection, and would otherwise hold room for the largest of them
    /// (about 3 KB) all day.
    async fn serve(
        mut self: Box<Self>,
        mut ticks: watch::Receiver<Option<Timestamp>>,
        shared: Arc<Shared>,
        stop: CancellationToken,
    ) {
        // As the agent does at its start: the current period is opened at once.
        Box::pin(self.on_boundary(None, &shared)).await;
        let mut ticking = true;
        loop {
            let wake = self.wake();
            tokio::select! {
                _ = stop.cancelled() => break,
                event = self.link.next() => match event {
                    LinkEvent::Message(delivery) => Box::pin(self.on_message(delivery, &shared)).await,
                    // As an agent flushes its outbox on every connect.
                    LinkEvent::Connected => Box::pin(self.resend(Duration::ZERO, &shared)).await,
                },
                changed = ticks.changed(), if ticking => match changed {
                    Ok(()) => {
                        let boundary = *ticks.borrow_and_update();
                        if let Some(boundary) = boundary {
                            // A boundary still waiting for its jitter goes out now.
                            if let Some((waiting, _)) = self.report_at.take() {
                                Box::pin(self.on_boundary(Some(waiting), &shared)).await;
                            }
                            let delay = jitter(&mut self.rng, shared.jitter);
                            self.report_at = Some((boundary, monotonic() + delay));
                        }
                    }
                    Err(_) => ticking = false,
                },
                _ = sleep_until(wake) => Box::pin(self.on_wake(&shared)).await,
            }
        }
        Box::pin(self.link.close()).await;
    }

    /// When the device next has something to do of its own accord.
    fn wake(&self) -> Option<Instant> {
        next_wake(
            self.report_at.map(|(_, at)| at),
            self.heartbeat_at,
            self.resend_at,
            self.link.is_connected(),
        )
    }

    async fn on_wake(&mut self, shared: &Shared) {
        let now = monotonic();
        if let Some((boundary, _)) = self.report_at.take_if(|(_, at)| *at <= now) {
            self.on_boundary(Some(boundary), shared).await;
        }
        if self.heartbeat_at <= now {
            self.heartbeat_at = now + shared.heartbeat_every;
            self.heartbeat(shared).await;
        }
        if self.resend_at.is_some_and(|at| at <= now) {
            self.resend(shared.resend_after, shared).await;
        }
    }

    /// Closes the period that ended and opens the current one, sending what is due; the
    /// reports count towards `boundary`'s figures.
    async fn on_boundary(&mut self, boundary: Option<Timestamp>, shared: &Shared) {
        let now = shared.clock.now();
        let uptime = shared
            .clock
            .clock_duration(monotonic().saturating_duration_since(self.started));
        let store_id = self.outbox.store_id().clone();
        let reports = self.unit.boundary(&store_id, now, uptime);
        if let Some(b) = boundary {
            shared.tally().reported(b, reports.len());
        }
        shared
            .reports
            .fetch_add(reports.len() as u64, Ordering::Relaxed);
        for mut report in reports {
            report.seq = self.outbox.next_seq();
            self.send(Channel::Report, &Message::Report(report), boundary, shared)
                .await;
        }
    }

    async fn on_message(&mut self, delivery: Box<Delivery>, shared: &Shared) {
        let now = shared.clock.now();
        let from = |outbox: &Outbox| (outbox.store_id().clone(), outbox.next_seq());
        match (&delivery.route, &delivery.message) {
            (Some((_, Channel::Schedule)), Ok(Message::Schedule(msg))) => {
                let (store_id, seq) = from(&self.outbox);
                if let Some(ack) = self.unit.on_schedule(msg, (&store_id, seq), now) {
                    shared.acks.fetch_add(1, Ordering::Relaxed);
                    self.send(Channel::Ack, &Message::Ack(ack), None, shared)
                        .await;
                }
            }
            (Some((_, Channel::Control)), Ok(Message::Control(msg))) => {
                let (store_id, seq) = from(&self.outbox);
                let ack = self.unit.on_control(msg, (&store_id, seq), now);
                shared.acks.fetch_add(1, Ordering::Relaxed);
                self.send(Channel::Ack, &Message::Ack(ack), None, shared)
                    .await;
            }
            (Some((_, Channel::Receipt)), Ok(Message::Receipt(receipt))) => {
                let removed = self.outbox.receipt(&receipt.store_id, &receipt.seqs);
                let at = monotonic();
                let mut tally = shared.tally();
                for boundary in removed.iter().filter_map(|e| e.boundary) {
                    tally.receipted(boundary, at);
                }
                drop(tally);
                self.resend_at = self.outbox.next_due(shared.resend_after);
            }
            (Some((_, channel)), Err(e)) => {
                warn!(device_id = %self.id, channel = channel.as_str(), error = %Chain(e), "message not decoded: dropped");
            }
            _ => {}
        }
        self.link.ack(&delivery).await;
    }

    /// Keeps a new ack or report in the outbox until it is receipted, and sends it.
    async fn send(
        &mut self,
        channel: Channel,
        message: &Message,
        boundary: Option<Timestamp>,
        shared: &Shared,
    ) {
        let seq = self.outbox.push(channel, message.encode(), boundary);
        if self.link.is_connected() {
            let topic = shared.topics.topic(&self.id, channel);
            match self.link.send(&topic, message, Qos::AtLeastOnce).await {
                Ok(()) => self.outbox.mark_sent(seq, monotonic()),
                Err(e) => {
                    debug!(device_id = %self.id, seq, error = %Chain(&e), "not sent: left to the resend");
                }
            }
        }
        self.resend_at = self.outbox.next_due(shared.resend_after);
    }

    /// Sends outbox entries not sent within `older_than`, at most one round of 100 a
    /// second, if connected; a failed publish leaves the rest to the next round.
    async fn resend(&mut self, older_than: Duration, shared: &Shared) {
        let now = monotonic();
        self.resend_at = self.outbox.next_due(shared.resend_after);
        if self.outbox.is_empty() || !self.link.is_connected() {
            return;
        }
        if let Some(last) = self.last_round
            && now.saturating_duration_since(last) < RESEND_ROUND
        {
            self.resend_at = Some(last + RESEND_ROUND);
            return;
        }
        self.last_round = Some(now);
        for entry in self.outbox.due(now, older_than, RESEND_BATCH) {
            let topic = shared.topics.topic(&self.id, entry.channel);
            if let Err(e) = self
                .link
                .publish(&topic, entry.payload.to_vec(), Qos::AtLeastOnce)
                .await
            {
                debug!(device_id = %self.id, seq = entry.seq, error = %Chain(&e), "not resent: next round");
                break;
            }
            if entry.was_sent() {
                shared.resent.fetch_add(1, Ordering::Relaxed);
                if let Some(b) = entry.boundary {
                    shared.tally().resent(b);
                }
            }
            self.outbox.mark_sent(entry.seq, monotonic());
        }
        self.resend_at = self.outbox.next_due(shared.resend_after);
        if let Some(at) = self.resend_at {
            // Never two rounds within a second.
            self.resend_at = Some(at.max(now + RESEND_ROUND));
        }
    }

    /// A heartbeat at QoS 0, as the agent sends it; none while disconnected.
    async fn heartbeat(&mut self, shared: &Shared) {
        if !self.link.is_connected() {
            return;
        }
        let uptime_s = monotonic()
            .saturating_duration_since(self.started)
            .as_secs();
        let msg = self
            .unit
            .heartbeat(shared.clock.now(), uptime_s, self.outbox.len());
        let topic = shared.topics.topic(&self.id, Channel::Heartbeat);
        if let Err(e) = self
            .link
            .send(&topic, &Message::Heartbeat(msg), Qos::AtMostOnce)
            .await
        {
            debug!(device_id = %self.id, error = %Chain(&e), "heartbeat not sent");
        }
    }
}

/// The first of a device's report, heartbeat and resend. A resend waits for a connection
/// (which flushes the outbox anyway): were it a wake while the broker is away, an entry
/// already due would wake the device again at once, for ever.
fn next_wake(
    report_at: Option<Instant>,
    heartbeat_at: Instant,
    resend_at: Option<Instant>,
    connected: bool,
) -> Option<Instant> {
    let resend_at = resend_at.filter(|_| connected);
    [report_at, Some(heartbeat_at), resend_at]
        .into_iter()
        .flatten()
        .min()
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;
    use max300_protocol::message::{AckStatus, RejectReason, ScheduleMsg};
    use max300_protocol::{Day, MessageId, Schedule, Setpoint};

    fn unit(device: &str) -> Unit {
        let tz = time_zone(DEFAULT_TIMEZONE).unwrap();
        let max = RateKw::try_from(150.0).unwrap();
        let engine = Engine::new(DeviceId::parse(device).unwrap(), tz, DEFAULT_TIMEZONE, max);
        Unit::new(engine, 50.0)
    }

    fn message(device: &str) -> ScheduleMsg {
        let day = Day::new(date(2026, 11, 30), time_zone(DEFAULT_TIMEZONE).unwrap()).unwrap();
        let schedule = Schedule::new(
            DeviceId::parse(device).unwrap(),
            day.clone(),
            vec![Setpoint::IDLE; day.period_count() as usize],
        )
        .unwrap();
        ScheduleMsg::new(&schedule, MessageId::generate(day.start()), 1, day.start())
    }

    #[test]
    fn a_device_waits_for_its_connection_to_resend_but_not_to_report() {
        let now = monotonic();
        let later = now + Duration::from_secs(60);
        let overdue = Some(now - Duration::from_secs(1));
        assert_eq!(next_wake(None, later, overdue, true), overdue);
        // Disconnected: an overdue resend would make every wake immediate while it lasts.
        assert_eq!(next_wake(None, later, overdue, false), Some(later));
        let report = Some(now + Duration::from_millis(300));
        assert_eq!(next_wake(report, later, overdue, false), report);
    }

    #[test]
    fn device_ids_match_the_sample_providers() {
        assert_eq!(
            device_ids("max300-", 2),
            vec!["max300-0001".to_owned(), "max300-0002".to_owned()]
        );
        assert_eq!(device_ids("x-", 12_345)[12_344], "x-12345");
    }

    #[test]
    fn the_ack_is_the_engines_verdict_from_this_store_and_seq() {
        let msg = message("max300-0001");
        let store = StoreId::generate();
        let now: Timestamp = "2026-11-29T16:00:00Z".parse().unwrap();
        let ack = unit("max300-0001")
            .on_schedule(&msg, (&store, 3), now)
            .unwrap();
        assert_eq!(
            (ack.status, ack.effective_period, ack.seq, &ack.store_id),
            (AckStatus::Accepted, Some(1), 3, &store)
        );
        assert_eq!(ack.sha256.as_deref(), Some(msg.sha256.as_str()));
        assert_eq!((&ack.message_id, ack.at), (&msg.message_id, now));
        let ack = unit("max300-0002")
            .on_schedule(&msg, (&store, 4), now)
            .unwrap();
        assert_eq!(
            (ack.status, ack.reason),
            (AckStatus::Rejected, Some(RejectReason::WrongDevice))
        );
    }

    #[test]
    fn a_repeated_schedule_is_accepted_again_from_the_held_plan() {
        let msg = message("max300-0001");
        let store = StoreId::generate();
        let mut u = unit("max300-0001");
        let now: Timestamp = "2026-11-29T16:00:00Z".parse().unwrap();
        u.on_schedule(&msg, (&store, 1), now).unwrap();
        let again = u
            .on_schedule(&msg, (&store, 2), now + SignedDuration::from_mins(5))
            .unwrap();
        assert_eq!(
            (again.status, again.effective_period, again.seq),
            (AckStatus::Accepted, Some(1), 2)
        );
    }

    #[test]
    fn the_next_boundary_is_the_end_of_the_current_period() {
        let tz = time_zone(DEFAULT_TIMEZONE).unwrap();
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(
            next_boundary(at("2026-11-30T00:10:00Z"), &tz),
            at("2026-11-30T00:30:00Z")
        );
        assert_eq!(
            next_boundary(at("2026-11-30T00:30:00Z"), &tz),
            at("2026-11-30T01:00:00Z")
        );
    }
}
