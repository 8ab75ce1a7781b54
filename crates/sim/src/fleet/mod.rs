//! `max300 fleet`: a fleet of simulated devices in one process, each with its own MQTT
//! session (client id = device id), that acks every schedule as the agent's engine decides
//! but holds nothing. It exists to load the cloud and the broker with real connections; it
//! says nothing about the agent.
//!
//! Each device is the agent's two halves without the battery and the disk: a
//! [`max300_mqtt::Session`] (reconnect after the session's protocol `Backoff`, resubscribe,
//! PUBACK order, a clean DISCONNECT at shutdown) and an [`Engine`] whose
//! [`Engine::on_schedule`] decides each ack, so the fleet answers exactly as an agent would
//! to a first delivery. It never
//! [holds](Engine::hold) a plan: a device's memory stays flat however many days it runs, and
//! a repeat or an older version is judged afresh instead of against a held plan.
//!
//! ```text
//!  batch 1: 500 sessions ──connect, subscribe──▶ all up? ──▶ batch 2 … ──▶ "fleet: N connected"
//!  each device: SCHEDULE ──▶ Engine::on_schedule ──▶ ACK (QoS 1), resent until receipted
//!  shutdown: every session sends DISCONNECT, then "fleet: N connections closed, M acks sent"
//! ```

use max300_protocol::error::Chain;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use jiff::Timestamp;
use max300_agent::engine::Engine;
use max300_mqtt::{BrokerUrl, Event, Inbound, Qos, Session, SessionConfig};
use max300_protocol::clock::monotonic;
use max300_protocol::day::time_zone;
use max300_protocol::message::{AckMsg, ScheduleMsg};
use max300_protocol::{
    Channel, Clock, DEFAULT_TIMEZONE, DeviceId, Message, RateKw, StoreId, Topics,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

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
}

/// The most devices one process simulates; the open-file limit usually binds first.
const MAX_DEVICES: usize = 1_000_000;
/// Each device pings this often: 10,000 devices make about 170 pings a second.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Events a device's session may queue for it: a schedule, a receipt or two at a time. One
/// that finds the queue full is dropped, and the cloud sends it again.
const EVENT_QUEUE: usize = 8;
/// How long an ack waits for the cloud's receipt before it is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(5);

/// Device ids `{prefix}0001` … `{prefix}N`, as `SampleProvider::numbered` makes them.
pub fn device_ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// Runs the fleet until `shutdown`: prints "fleet: N connected" once every device is
/// subscribed, and "fleet: N connections closed, M acks sent" once each has sent DISCONNECT.
/// Fails if a device's first connection fails, after closing those already made.
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
        acks: AtomicU64::new(0),
    });
    // Its own token, so a failed start closes the connections already made, cleanly.
    let stop = shutdown.child_token();
    let mut tasks = JoinSet::new();
    let started = connect_all(&ids, args.batch, &shared, &mut tasks, &stop).await;
    if started.is_ok() {
        println!("fleet: {} connected", ids.len());
        stop.cancelled().await;
    }
    stop.cancel();
    // A device's task ends with its session, once its DISCONNECT is written.
    while tasks.join_next().await.is_some() {}
    started?;
    println!(
        "fleet: {} connections closed, {} acks sent",
        ids.len(),
        shared.acks.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Starts the devices batch by batch; each batch must be subscribed before the next starts,
/// so the broker never has more than one batch of handshakes in hand.
async fn connect_all(
    ids: &[DeviceId],
    batch: usize,
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    for chunk in ids.chunks(batch) {
        let mut waiting = Vec::with_capacity(chunk.len());
        for id in chunk {
            let mut config = SessionConfig::new(
                shared.url.clone(),
                id.as_str(),
                shared.topics.device_filters(id),
            );
            config.topics = shared.topics.clone();
            config.keep_alive = KEEP_ALIVE;
            config.channel_capacity = EVENT_QUEUE;
            let (session, events) = max300_mqtt::connect(config, stop.clone())
                .with_context(|| format!("{id}: session"))?;
            let device = Device::new(id.clone(), session.clone(), shared);
            tasks.spawn(device.serve(events, shared.clone()));
            waiting.push((id, session));
        }
        for (id, session) in waiting {
            let outcome = tokio::select! {
                _ = stop.cancelled() => anyhow::bail!("stopped before every device connected"),
                outcome = session.first_connection() => outcome,
            };
            if let Err(reason) = outcome {
                anyhow::bail!("{id}: cannot connect to {}: {reason}", shared.url);
            }
        }
    }
    Ok(())
}

/// What every device shares.
struct Shared {
    url: BrokerUrl,
    topics: Topics,
    tz: jiff::tz::TimeZone,
    tz_name: String,
    max_rate: RateKw,
    clock: Arc<dyn Clock>,
    acks: AtomicU64,
}

/// One simulated device: its session, its engine and the acks the cloud has not receipted.
struct Device {
    id: DeviceId,
    session: Session,
    engine: Engine,
    ack_topic: String,
    store_id: StoreId,
    seq: u64,
    /// Acks not receipted yet, by seq, resent as the agent resends its outbox: a busy cloud
    /// drops what it cannot take and relies on the device sending again.
    unreceipted: Vec<(u64, Vec<u8>)>,
    /// When the unreceipted acks go again; `None` while there are none.
    resend_at: Option<std::time::Instant>,
}

impl Device {
    fn new(id: DeviceId, session: Session, shared: &Shared) -> Device {
        Device {
            engine: Engine::new(
                id.clone(),
                shared.tz.clone(),
                &shared.tz_name,
                shared.max_rate,
            ),
            ack_topic: shared.topics.topic(&id, Channel::Ack),
            store_id: StoreId::generate(),
            seq: 0,
            unreceipted: Vec::new(),
            resend_at: None,
            id,
            session,
        }
    }

    /// Answers schedules and takes receipts until its session has ended (after shutdown,
    /// once its DISCONNECT is written): what arrives until then is still taken, not dropped
    /// as if the device were busy.
    async fn serve(mut self, mut events: mpsc::Receiver<Event>, shared: Arc<Shared>) {
        loop {
            let resend_at = self.resend_at;
            let resend = async {
                match resend_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Message(inbound)) => self.on_message(*inbound, &shared).await,
                    // As an agent flushes its outbox on every connect.
                    Some(Event::Connected) => self.resend().await,
                    Some(Event::Disconnected(_)) => {}
                    None => return,
                },
                _ = resend => self.resend().await,
            }
        }
    }

    async fn on_message(&mut self, inbound: Inbound, shared: &Shared) {
        match (&inbound.route, &inbound.message) {
            (Some((_, Channel::Schedule)), Ok(Message::Schedule(msg))) => {
                let now = shared.clock.now();
                if let Some(ack) = answer(&self.engine, msg, (&self.store_id, self.seq + 1), now) {
                    self.seq += 1;
                    self.send(ack, shared).await;
                }
            }
            (Some((_, Channel::Receipt)), Ok(Message::Receipt(receipt))) => {
                self.unreceipted.retain(|(s, _)| !receipt.seqs.contains(s));
                if self.unreceipted.is_empty() {
                    self.resend_at = None;
                }
            }
            (Some((_, Channel::Schedule)), Err(e)) => {
                warn!(device_id = %self.id, error = %Chain(e), "schedule not decoded: not acked");
            }
            _ => {}
        }
        inbound.ack().await;
    }

    /// Sends a new ack and keeps it until it is receipted.
    async fn send(&mut self, ack: AckMsg, shared: &Shared) {
        let message_id = ack.message_id.clone();
        let payload = Message::Ack(ack).encode();
        self.unreceipted.push((self.seq, payload.clone()));
        self.resend_at
            .get_or_insert_with(|| monotonic() + RESEND_AFTER);
        match self
            .session
            .publish(self.ack_topic.clone(), payload, Qos::AtLeastOnce)
            .await
        {
            Ok(()) => {
                shared.acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(device_id = %self.id, message_id = %message_id, error = %Chain(&e), "ack not sent: resent later");
            }
        }
    }

    /// Sends every unreceipted ack again, if connected; a failed publish waits for the next
    /// round.
    async fn resend(&mut self) {
        if self.unreceipted.is_empty() {
            return;
        }
        self.resend_at = Some(monotonic() + RESEND_AFTER);
        if !self.session.is_connected() {
            return;
        }
        for (_, payload) in &self.unreceipted {
            let topic = self.ack_topic.clone();
            if let Err(e) = self
                .session
                .publish(topic, payload.clone(), Qos::AtLeastOnce)
                .await
            {
                warn!(device_id = %self.id, error = %Chain(&e), "ack not resent");
                return;
            }
        }
    }
}

/// The ack the device of `engine` sends for `msg` at `now` as entry `from` (store id, seq):
/// the engine's decision, continuing the schedule's trace. `None` if the engine withholds
/// it (never here: the fleet's clock is not checked).
pub fn answer(
    engine: &Engine,
    msg: &ScheduleMsg,
    from: (&StoreId, u64),
    now: Timestamp,
) -> Option<AckMsg> {
    let verdict = engine.on_schedule(msg, now).verdict()?;
    let mut ack = verdict.ack(&msg.message_id, engine.device_id(), from, now);
    ack.traceparent = msg.traceparent.clone();
    Some(ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;
    use max300_protocol::message::{AckStatus, RejectReason};
    use max300_protocol::{Day, MessageId, Schedule, Setpoint};

    fn engine(device: &str) -> Engine {
        let tz = time_zone(DEFAULT_TIMEZONE).unwrap();
        let max = RateKw::try_from(150.0).unwrap();
        Engine::new(DeviceId::parse(device).unwrap(), tz, DEFAULT_TIMEZONE, max)
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
        let ack = answer(&engine("max300-0001"), &msg, (&store, 3), now).unwrap();
        assert_eq!(
            (ack.status, ack.effective_period, ack.seq, &ack.store_id),
            (AckStatus::Accepted, Some(1), 3, &store)
        );
        assert_eq!(ack.sha256.as_deref(), Some(msg.sha256.as_str()));
        assert_eq!((&ack.message_id, ack.at), (&msg.message_id, now));
        let ack = answer(&engine("max300-0002"), &msg, (&store, 4), now).unwrap();
        assert_eq!(
            (ack.status, ack.reason),
            (AckStatus::Rejected, Some(RejectReason::WrongDevice))
        );
    }
}
