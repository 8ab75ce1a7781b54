//! `max300 fleet`: a fleet of simulated devices in one process, each with its own MQTT
//! connection (client id = device id), that acks every schedule the way an agent does but
//! keeps nothing. It exists to load the cloud and the broker with real connections; it says
//! nothing about the agent.
//!
//! It drives rumqttc itself rather than through `max300_mqtt::Session`: a session costs a
//! task, two queues and an in-flight window of 100 per connection, and at 10,000 devices
//! those add up. Here each device is one task owning one small event loop.
//!
//! ```text
//!  batch 1: 500 tasks ──connect, subscribe──▶ all SUBACKed? ──▶ batch 2 … ──▶ "fleet: N connected"
//!  each task: SCHEDULE ──▶ check as an agent would ──▶ ACK (QoS 1) on its ack topic
//!  SIGTERM / ctrl-c: every task sends DISCONNECT, flushes it, then drops its socket
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use jiff::Timestamp;
use max300_mqtt::BrokerUrl;
use max300_protocol::message::{AckMsg, AckStatus, RejectReason, ScheduleMsg, V1};
use max300_protocol::{Channel, Clock, DeviceId, MAX_PAYLOAD_BYTES, Message, StoreId, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::clock::ClockArgs;

/// `max300 fleet`
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
    /// Plan time, for the acks' `at` and effective period.
    #[command(flatten)]
    pub clock: ClockArgs,
}

/// The most devices one process simulates; the open-file limit usually binds first.
const MAX_DEVICES: usize = 1_000_000;
/// Each device pings this often: 10,000 devices make about 170 pings a second.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// A device has at most a couple of acks outstanding, so its queues stay tiny.
const INFLIGHT: u16 = 4;
const REQUEST_QUEUE: usize = 8;
/// Largest ack sent: a few hundred bytes, with a wide margin.
const MAX_OUTGOING_BYTES: usize = 16 * 1024;
/// How long a device may take to flush its DISCONNECT before its socket is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an ack waits for the cloud's receipt before it is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Device ids `{prefix}0001` … `{prefix}N`, as `SampleProvider::numbered` makes them.
pub fn device_ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// Runs the fleet until SIGTERM or ctrl-c.
pub async fn run(args: FleetArgs) -> anyhow::Result<ExitCode> {
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
    max300_sim::fds::ensure_room(args.devices, "--devices")?;
    let ids = device_ids(&args.prefix, args.devices)
        .into_iter()
        .map(DeviceId::parse)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--prefix {:?}", args.prefix))?;
    let clock = args.clock.build()?;
    let signal = crate::cli::shutdown_on_signal();
    // Its own token, so a failed start closes the connections already made, cleanly.
    let shutdown = signal.child_token();
    let shared = Arc::new(Shared {
        url,
        topics: Topics::new(args.topic_root.clone()),
        clock,
        acks: AtomicU64::new(0),
    });

    let mut tasks = JoinSet::new();
    let started = connect_all(&ids, args.batch, &shared, &mut tasks, &shutdown).await;
    if let Err(e) = started {
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        return Err(e);
    }
    println!("fleet: {} connected", ids.len());
    shutdown.cancelled().await;
    while tasks.join_next().await.is_some() {}
    println!(
        "fleet: {} connections closed, {} acks sent",
        ids.len(),
        shared.acks.load(Ordering::Relaxed)
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts the devices batch by batch; each batch must be subscribed before the next starts,
/// so the broker never has more than one batch of handshakes in hand.
async fn connect_all(
    ids: &[DeviceId],
    batch: usize,
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    for chunk in ids.chunks(batch) {
        let mut waiting = Vec::with_capacity(chunk.len());
        for id in chunk {
            let (up, up_rx) = oneshot::channel();
            tasks.spawn(device(id.clone(), shared.clone(), up, shutdown.clone()));
            waiting.push((id, up_rx));
        }
        for (id, up) in waiting {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => anyhow::bail!("stopped before every device connected"),
                outcome = up => outcome,
            };
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    anyhow::bail!("{id}: cannot connect to {}: {reason}", shared.url)
                }
                Err(_) => anyhow::bail!("{id}: its task ended before it connected"),
            }
        }
    }
    Ok(())
}

/// What every device task shares.
struct Shared {
    url: BrokerUrl,
    topics: Topics,
    clock: Arc<dyn Clock>,
    acks: AtomicU64,
}

/// One device: connect, subscribe as an agent does, ack each schedule, and on shutdown send
/// DISCONNECT. A failure before the first SUBACK is reported on `up` and ends the task; later
/// ones reconnect with backoff, as an agent would.
async fn device(
    id: DeviceId,
    shared: Arc<Shared>,
    up: oneshot::Sender<Result<(), String>>,
    shutdown: CancellationToken,
) {
    let mut options = MqttOptions::new(id.as_str(), &shared.url.host, shared.url.port);
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_inflight(INFLIGHT)
        .set_max_packet_size(MAX_PAYLOAD_BYTES + 1024, MAX_OUTGOING_BYTES);
    let (client, mut events) = AsyncClient::new(options, REQUEST_QUEUE);
    let store_id = StoreId::generate();
    let mut seq = 0u64;
    let mut up = Some(up);
    let mut connected = false;
    let mut backoff = BACKOFF_MIN;
    // Acks the cloud has not receipted yet, resent as the agent resends its outbox: a busy
    // cloud drops what it cannot take and relies on the device sending again.
    let mut unreceipted: Vec<(u64, Vec<u8>)> = Vec::new();
    let ack_topic = shared.topics.topic(&id, Channel::Ack);
    loop {
        let resend = async {
            if unreceipted.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(RESEND_AFTER).await;
        };
        let polled = tokio::select! {
            _ = shutdown.cancelled() => break,
            polled = events.poll() => polled,
            _ = resend, if connected => {
                for (_, payload) in &unreceipted {
                    let _ = client.try_publish(ack_topic.clone(), QoS::AtLeastOnce, false, payload.clone());
                }
                continue;
            }
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff = BACKOFF_MIN;
                let filters = shared
                    .topics
                    .device_filters(&id)
                    .into_iter()
                    .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(filters) {
                    warn!(device_id = %id, error = %e, "subscribe not queued");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(up) = up.take() {
                    let _ = up.send(Ok(()));
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let to = match shared.topics.parse(&publish.topic) {
                    Some((to, Channel::Schedule)) => to,
                    Some((_, Channel::Receipt)) => {
                        if let Ok(Message::Receipt(r)) = Message::decode(&publish.payload) {
                            unreceipted.retain(|(s, _)| !r.seqs.contains(s));
                        }
                        continue;
                    }
                    _ => continue,
                };
                let msg = match Message::decode(&publish.payload) {
                    Ok(Message::Schedule(msg)) => msg,
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(device_id = %id, error = %e, "schedule not decoded: not acked");
                        continue;
                    }
                };
                seq += 1;
                let ack = answer(&msg, &to, &store_id, seq, shared.clock.now());
                let payload = Message::Ack(ack).encode();
                unreceipted.push((seq, payload.clone()));
                // Never awaited: the queue only drains while this task polls, so a wait here
                // could never end. A full queue drops the ack until the next resend.
                match client.try_publish(ack_topic.clone(), QoS::AtLeastOnce, false, payload) {
                    Ok(()) => {
                        shared.acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        warn!(device_id = %id, message_id = %msg.message_id, error = %e, "ack dropped")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected = false;
                if let Some(up) = up.take() {
                    let _ = up.send(Err(e.to_string()));
                    return;
                }
                warn!(device_id = %id, error = %e, "mqtt disconnected");
                let pause = backoff.mul_f64(0.5 + fastrand::f64());
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    if connected {
        close(&id, &client, &mut events).await;
    }
}

/// Sends DISCONNECT and waits until it is written, so the broker sees a clean close rather
/// than a dropped socket (no will, no "connection reset" in its log).
async fn close(id: &DeviceId, client: &AsyncClient, events: &mut rumqttc::EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let flushed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    if flushed.is_err() {
        debug!(device_id = %id, "disconnect not flushed in time: socket dropped");
    }
}

/// The ack an agent would send for `msg` at `now`, arrived on `to`'s schedule topic: the same
/// checks as the agent's engine (device, plan and sha256, a date not over) and the same
/// effective period (1 before the day, else the next period), without holding the plan.
pub fn answer(
    msg: &ScheduleMsg,
    to: &DeviceId,
    store_id: &StoreId,
    seq: u64,
    now: Timestamp,
) -> AckMsg {
    let checked = if msg.device_id != *to {
        Err((
            RejectReason::WrongDevice,
            format!("addressed to {}, arrived for {to}", msg.device_id),
        ))
    } else {
        match msg.to_schedule() {
            Err(e) => Err((RejectReason::Invalid, e.to_string())),
            Ok(schedule) => {
                let day = schedule.day();
                match day.first_governed_at(now) {
                    Some(effective) => Ok((schedule.sha256(), effective)),
                    None => Err((
                        RejectReason::Past,
                        format!("no period of {} is left to govern", day.date()),
                    )),
                }
            }
        }
    };
    let (status, reason, details, sha256, effective_period) = match checked {
        Ok((sha, effective)) => (AckStatus::Accepted, None, None, Some(sha), Some(effective)),
        Err((reason, details)) => (AckStatus::Rejected, Some(reason), Some(details), None, None),
    };
    AckMsg {
        v: V1,
        store_id: store_id.clone(),
        seq,
        message_id: msg.message_id.clone(),
        device_id: to.clone(),
        status,
        reason,
        details,
        sha256,
        effective_period,
        at: now,
        traceparent: msg.traceparent.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;
    use max300_protocol::day::time_zone;
    use max300_protocol::{Day, MessageId, Schedule, Setpoint};

    fn message(device: &str) -> ScheduleMsg {
        let day = Day::new(date(2026, 11, 30), time_zone("Europe/London").unwrap()).unwrap();
        let schedule = Schedule::new(
            DeviceId::parse(device).unwrap(),
            day.clone(),
            vec![Setpoint::IDLE; day.period_count() as usize],
        )
        .unwrap();
        ScheduleMsg::new(&schedule, MessageId::generate(day.start()), 1, day.start())
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
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
    fn accepts_a_plan_for_tomorrow_from_period_1_with_its_sha256() {
        let msg = message("max300-0001");
        let to = DeviceId::parse("max300-0001").unwrap();
        let ack = answer(
            &msg,
            &to,
            &StoreId::generate(),
            3,
            at("2026-11-29T16:00:00Z"),
        );
        assert_eq!(ack.status, AckStatus::Accepted);
        assert_eq!(ack.sha256.as_deref(), Some(msg.sha256.as_str()));
        assert_eq!(ack.effective_period, Some(1));
        assert_eq!((ack.seq, &ack.message_id), (3, &msg.message_id));
    }

    #[test]
    fn a_plan_for_today_governs_from_the_next_period() {
        let msg = message("max300-0001");
        let to = DeviceId::parse("max300-0001").unwrap();
        let ack = answer(
            &msg,
            &to,
            &StoreId::generate(),
            1,
            at("2026-11-30T10:10:00Z"),
        );
        assert_eq!(ack.effective_period, Some(22));
    }

    #[test]
    fn rejects_a_plan_for_another_device_or_a_day_that_is_over() {
        let msg = message("max300-0001");
        let other = DeviceId::parse("max300-0002").unwrap();
        let ack = answer(
            &msg,
            &other,
            &StoreId::generate(),
            1,
            at("2026-11-29T16:00:00Z"),
        );
        assert_eq!(ack.reason, Some(RejectReason::WrongDevice));
        let to = DeviceId::parse("max300-0001").unwrap();
        let ack = answer(
            &msg,
            &to,
            &StoreId::generate(),
            1,
            at("2026-12-01T00:00:00Z"),
        );
        assert_eq!(
            (ack.status, ack.reason),
            (AckStatus::Rejected, Some(RejectReason::Past))
        );
    }

    #[test]
    fn rejects_a_plan_whose_sha256_does_not_match() {
        let mut msg = message("max300-0001");
        msg.sha256 = "0".repeat(64);
        let to = DeviceId::parse("max300-0001").unwrap();
        let ack = answer(
            &msg,
            &to,
            &StoreId::generate(),
            1,
            at("2026-11-29T16:00:00Z"),
        );
        assert_eq!(ack.reason, Some(RejectReason::Invalid));
        assert!(ack.details.unwrap_or_default().contains("sha256"));
    }
}
