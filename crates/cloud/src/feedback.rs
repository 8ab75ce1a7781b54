//! The feedback consumer: acks, reports, heartbeats and sync from devices.
//!
//! Each message is checked (topic and payload agree, the device is known), applied to the
//! store once by its natural key, receipted, and only then PUBACKed. A message that can't be
//! used is logged, counted and PUBACKed, so it never holds up the ones behind it.

use max300_protocol::error::Chain;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use jiff::tz::TimeZone;
use max300_mqtt::trace;
use max300_mqtt::{Event, Inbound};
use max300_protocol::message::{AckMsg, HeartbeatMsg, ReportMsg, SyncMsg};
use max300_protocol::{
    Channel, Clock, DeviceId, Message, MessageId, ProtocolError, Roster, Topics, TraceParent,
    day::Day,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info, info_span, warn};

use crate::CloudError;
use crate::ledger::Ledger;
use crate::metrics::{Metrics, Outcome};
use crate::publish::Publisher;
use crate::store::Recorded;

/// A per-device token bucket on inbound messages (real time), so one flooding device is
/// throttled and counted while the others go on. Pure: the caller passes the instant.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    buckets: HashMap<DeviceId, (f64, Instant)>,
}

impl RateLimit {
    /// `per_second` sustained, up to `burst` at once (an outbox replay is up to 100 a second).
    pub fn new(per_second: f64, burst: f64) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// Whether `device` may send one more message at `now`.
    pub fn allow(&mut self, device: &DeviceId, now: Instant) -> bool {
        // Topic ids come from anyone who can publish: keep the map from growing without end.
        if self.buckets.len() > 100_000 {
            self.buckets.clear();
        }
        let (tokens, at) = self
            .buckets
            .entry(device.clone())
            .or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the consumer asks to be published. It is handed to a task of its own, so the
/// consumer never waits on a publish: while it waited, it could not PUBACK what it received,
/// and the broker would stop sending (and acknowledging) until it did.
#[derive(Debug)]
enum Outbound {
    Receipt(DeviceId, max300_protocol::StoreId, u64),
    Stored(Vec<max300_protocol::MessageId>),
}

/// One device message as received: from an MQTT session, or from an IoT rule's event.
#[derive(Clone, Copy, Debug)]
struct Received<'a> {
    topic: &'a str,
    route: Option<&'a (DeviceId, Channel)>,
    message: Result<&'a Message, &'a ProtocolError>,
}

impl<'a> From<&'a Inbound> for Received<'a> {
    fn from(inbound: &'a Inbound) -> Received<'a> {
        Received {
            topic: &inbound.topic,
            route: inbound.route.as_ref(),
            message: inbound.message.as_ref(),
        }
    }
}

/// A message delivered without a session (an IoT rule's event), decoded as the session would.
#[derive(Debug)]
pub struct Delivered {
    topic: String,
    route: Option<(DeviceId, Channel)>,
    message: Result<Message, ProtocolError>,
}

impl Delivered {
    /// Decodes `payload`, received on `topic`.
    pub fn new(topics: &Topics, topic: String, payload: &[u8]) -> Delivered {
        Delivered {
            route: topics.parse(&topic),
            message: Message::decode(payload),
            topic,
        }
    }
}

impl<'a> From<&'a Delivered> for Received<'a> {
    fn from(d: &'a Delivered) -> Received<'a> {
        Received {
            topic: &d.topic,
            route: d.route.as_ref(),
            message: d.message.as_ref(),
        }
    }
}

/// Receipts and answers published at once for messages delivered without a session.
const DELIVERED_AT_ONCE: usize = 16;

/// The most queued device messages handled (and their acks and reports committed) together.
/// At a boundary of 10,000 units, 1,024 handled 10,000 reports in about 2 s where 256 took
/// 11 s (queue overflows, then the units' resends); 4,096 was no faster (`bench day`).
const FEEDBACK_BATCH: usize = 1024;

/// Room for a burst of receipts (a boundary of a large fleet) before they are dropped; a
/// dropped receipt only means the device sends again.
const OUTBOUND_CAPACITY: usize = 20_000;

/// How long a device found unregistered is refused without asking the store again (real
/// time). Its messages are not receipted, so its outbox keeps them: a device that an
/// ingestion or an operator registers meanwhile is heard from at most this much later, and
/// loses nothing.
const STRANGER_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// A device message applied with the rest of its batch, with its span.
enum Batched {
    Ack(AckMsg, Span),
    Report(ReportMsg, Span),
    Heartbeat(HeartbeatMsg),
}

/// Handles device messages.
#[derive(Debug)]
pub struct Feedback {
    ledger: Ledger,
    publisher: Publisher,
    outbound: mpsc::Sender<Outbound>,
    outbound_rx: Option<mpsc::Receiver<Outbound>>,
    clock: Arc<dyn Clock>,
    timezone: TimeZone,
    auto_register: bool,
    /// The devices registered when the first message came: their ids only, in one buffer
    /// (2.9 MB at 100,000 units, where a set of `DeviceId`s was some 6.5 MB, and the records
    /// read to fill it some 23 MB more at the first message of a boundary's burst).
    registered: Option<Roster<()>>,
    /// Devices found registered since.
    known: HashSet<DeviceId>,
    /// Devices found unregistered, refused until the instant given.
    strangers: HashMap<DeviceId, Instant>,
    metrics: Arc<Metrics>,
    limit: RateLimit,
    throttled: u64,
}

impl Feedback {
    /// A consumer.
    pub fn new(
        ledger: Ledger,
        publisher: Publisher,
        clock: Arc<dyn Clock>,
        timezone: TimeZone,
        auto_register: bool,
        metrics: Arc<Metrics>,
    ) -> Feedback {
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_CAPACITY);
        metrics.time_acks();
        Feedback {
            ledger,
            publisher,
            outbound,
            outbound_rx: Some(outbound_rx),
            clock,
            timezone,
            auto_register,
            registered: None,
            known: HashSet::new(),
            strangers: HashMap::new(),
            metrics,
            limit: RateLimit::new(200.0, 1000.0),
            throttled: 0,
        }
    }

    /// Consumes session events until shutdown.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let sender = self.outbound_rx.take().map(|mut rx| {
            let publisher = self.publisher.clone();
            // At shutdown what is still queued is dropped: devices resend what has no receipt.
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let out = tokio::select! {
                        _ = stop.cancelled() => break,
                        out = rx.recv() => match out {
                            Some(out) => out,
                            None => break,
                        },
                    };
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = deliver(&publisher, out) => {}
                    }
                }
            })
        });
        self.consume(&mut events, &shutdown).await;
        // Dropping the sender ends the publishing task once it has sent what is queued.
        drop(self);
        if let Some(task) = sender {
            let _ = task.await;
        }
    }

    async fn consume(&mut self, events: &mut mpsc::Receiver<Event>, shutdown: &CancellationToken) {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(e) => e,
                    None => break,
                },
            };
            match event {
                // Commands left unpublished go out with the sweeper's next round, and each
                // device sends `sync` on its own reconnect: nothing to do here.
                Event::Connected => {}
                Event::Disconnected(_) => {}
                Event::Message(inbound) => {
                    // Whatever else is already queued is handled with it, so its acks are
                    // committed together: one fsync for a burst, not one each.
                    let mut batch = vec![*inbound];
                    while batch.len() < FEEDBACK_BATCH {
                        match events.try_recv() {
                            Ok(Event::Message(more)) => batch.push(*more),
                            // Connection events mean nothing to a batch.
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    self.handle_batch(batch).await;
                }
            }
        }
    }

    /// Handles messages delivered without a session (a Lambda function's IoT-rule events),
    /// then publishes their receipts and answers before returning: a function may be frozen
    /// as soon as it returns, so nothing is left queued. Says, in order, which were handled
    /// (applied or refused for good); the others met a store failure and are worth a retry.
    pub async fn handle_delivered(&mut self, batch: &[Delivered]) -> Vec<bool> {
        let handled = self.apply(batch.iter().map(Received::from).collect()).await;
        if let Some(rx) = self.outbound_rx.as_mut() {
            // Each is an HTTPS request of its own: a batch's receipts go out a few at a time,
            // not one after another.
            let mut sending = tokio::task::JoinSet::new();
            while let Ok(out) = rx.try_recv() {
                if sending.len() >= DELIVERED_AT_ONCE {
                    sending.join_next().await;
                }
                let publisher = self.publisher.clone();
                sending.spawn(async move { deliver(&publisher, out).await });
            }
            sending.join_all().await;
        }
        handled
    }

    /// Handles queued messages in order, then PUBACKs them.
    async fn handle_batch(&mut self, batch: Vec<Inbound>) {
        self.apply(batch.iter().map(Received::from).collect()).await;
        for inbound in batch {
            inbound.ack().await;
        }
    }

    /// Handles messages in order, deferring acks, reports and heartbeats to one store call
    /// each. Says, in order, which were handled; a store failure leaves the rest to the
    /// devices' resends.
    async fn apply(&mut self, batch: Vec<Received<'_>>) -> Vec<bool> {
        let mut handled = vec![true; batch.len()];
        let mut acks = Vec::new();
        let mut reports = Vec::new();
        let mut heartbeats = Vec::new();
        for (i, received) in batch.into_iter().enumerate() {
            match self.handle(received).await {
                Ok(Some(Batched::Ack(ack, span))) => acks.push((i, ack, span)),
                Ok(Some(Batched::Report(report, span))) => reports.push((i, report, span)),
                Ok(Some(Batched::Heartbeat(hb))) => heartbeats.push((i, hb)),
                Ok(None) => {}
                // A store failure. No receipt went out, so the device resends from its
                // outbox; PUBACK anyway, so this message can't hold up the others.
                Err(e) => {
                    handled[i] = false;
                    warn!(topic = %received.topic, error = %Chain(&e), "message not handled");
                }
            }
        }
        let now = self.clock.now();
        if !heartbeats.is_empty() {
            // One commit for a batch's heartbeats: each was a commit of its own, 170 a second
            // at 10,000 units, some in the middle of a boundary's burst.
            let (at, msgs): (Vec<usize>, Vec<HeartbeatMsg>) = heartbeats.into_iter().unzip();
            match self.ledger.store().record_heartbeats(&msgs, now).await {
                Ok(()) => msgs
                    .iter()
                    .for_each(|_| self.metrics.inbound("heartbeat", Outcome::Applied)),
                Err(e) => {
                    at.iter().for_each(|i| handled[*i] = false);
                    warn!(count = msgs.len(), error = %Chain(&e), "heartbeats not recorded");
                }
            }
        }
        if !acks.is_empty() {
            let msgs: Vec<AckMsg> = acks.iter().map(|(_, ack, _)| ack.clone()).collect();
            match self.ledger.record_acks(&msgs, now).await {
                Ok(outcomes) => {
                    for ((_, ack, span), outcome) in acks.iter().zip(outcomes) {
                        let _entered = span.enter();
                        self.acked(ack, outcome);
                    }
                }
                Err(e) => {
                    acks.iter().for_each(|(i, _, _)| handled[*i] = false);
                    warn!(count = acks.len(), error = %Chain(&e), "acks not recorded: the devices will resend")
                }
            }
        }
        if !reports.is_empty() {
            let msgs: Vec<ReportMsg> = reports.iter().map(|(_, r, _)| r.clone()).collect();
            match self.ledger.record_reports(&msgs, now).await {
                Ok(outcomes) => {
                    for ((_, report, span), outcome) in reports.iter().zip(outcomes) {
                        let _entered = span.enter();
                        self.reported(report, outcome);
                    }
                }
                Err(e) => {
                    reports.iter().for_each(|(i, _, _)| handled[*i] = false);
                    warn!(count = reports.len(), error = %Chain(&e), "reports not recorded: the devices will resend")
                }
            }
        }
        handled
    }

    /// Checks one message and applies it, except an ack or a report, which is returned (with
    /// its span) to be recorded with the rest of its batch.
    async fn handle(&mut self, inbound: Received<'_>) -> Result<Option<Batched>, CloudError> {
        let kind = inbound.message.map_or("unknown", kind);
        if let Some((device, _)) = inbound.route
            && !self
                .limit
                .allow(device, max300_protocol::clock::monotonic())
        {
            self.metrics.inbound(kind, Outcome::Throttled);
            // Counted, not logged one by one: a flood must not flood the log too.
            if self.throttled.is_multiple_of(1000) {
                warn!(device_id = %device, "device over its message rate: throttled");
            }
            self.throttled += 1;
            return Ok(None);
        }
        let message = match inbound.message {
            Ok(m) => m,
            Err(e) => {
                self.metrics.inbound(kind, Outcome::Invalid);
                warn!(topic = %inbound.topic, error = %Chain(e), "undecodable message dropped");
                return Ok(None);
            }
        };
        let Some((topic_device, channel)) = inbound.route else {
            self.metrics.inbound(kind, Outcome::Invalid);
            warn!(topic = %inbound.topic, "message on a foreign topic dropped");
            return Ok(None);
        };
        if message.channel() != *channel || !channel.from_device() {
            self.metrics.inbound(kind, Outcome::Invalid);
            warn!(device_id = %topic_device, topic = %inbound.topic, "message of the wrong type for its topic dropped");
            return Ok(None);
        }
        if message.device_id() != topic_device {
            self.metrics.inbound(kind, Outcome::Invalid);
            warn!(
                device_id = %topic_device,
                payload_device_id = %message.device_id(),
                "payload device_id differs from the topic's: dropped"
            );
            return Ok(None);
        }
        if !self.admit(topic_device).await? {
            // Not receipted: the device may be registered any moment (by the ingestion that
            // names it), and its outbox keeps what it sent until then. The refusal is cheap
            // (no store lookup while the miss is cached), counted, and logged once per window.
            self.metrics.inbound(kind, Outcome::UnknownDevice);
            return Ok(None);
        }
        match message {
            Message::Ack(ack) => {
                let span = info_span!(parent: None, "ack", device_id = %ack.device_id, message_id = %ack.message_id, status = ?ack.status);
                self.continue_trace(&span, ack.traceparent.as_ref(), Some(&ack.message_id))
                    .await;
                Ok(Some(Batched::Ack(ack.clone(), span)))
            }
            Message::Report(report) => {
                let span = info_span!(
                    parent: None,
                    "report",
                    device_id = %report.device_id,
                    message_id = report.message_id.as_ref().map(MessageId::as_str),
                    period = report.period,
                    status = report.status.as_str(),
                );
                self.continue_trace(
                    &span,
                    report.traceparent.as_ref(),
                    report.message_id.as_ref(),
                )
                .await;
                Ok(Some(Batched::Report(report.clone(), span)))
            }
            Message::Heartbeat(hb) => Ok(Some(Batched::Heartbeat(hb.clone()))),
            Message::Sync(sync) => self.sync(sync).await.map(|()| None),
            _ => Ok(None),
        }
    }

    /// Makes `span` a child of the message's trace context, or else of the one stored with
    /// its command (one lookup by key, and only when spans are exported at all).
    async fn continue_trace(
        &self,
        span: &Span,
        carried: Option<&TraceParent>,
        command: Option<&MessageId>,
    ) {
        let traced = trace::set_parent(span, carried);
        if let (true, None, Some(id)) = (traced, carried, command) {
            match self.ledger.store().command_traceparent(id).await {
                Ok(stored) => {
                    trace::set_parent(span, stored.as_ref());
                }
                Err(e) => debug!(message_id = %id, error = %Chain(&e), "no stored trace context"),
            }
        }
    }

    async fn admit(&mut self, device: &DeviceId) -> Result<bool, CloudError> {
        let store = self.ledger.store().clone();
        if self.registered.is_none() {
            // Once, the whole fleet in one query: asked one by one, the first message of each
            // of 10,000 devices would be a store round trip each, in the middle of a burst.
            self.registered = Some(store.device_limits().await?.map(|_| ()));
        }
        if self.known.contains(device)
            || self
                .registered
                .as_ref()
                .is_some_and(|r| r.contains(device.as_str()))
        {
            return Ok(true);
        }
        let now = max300_protocol::clock::monotonic();
        if self.strangers.get(device).is_some_and(|until| now < *until) {
            // Refused without a store round trip: a stranger can't load the store.
            return Ok(false);
        }
        if store.device(device).await?.is_some() {
            self.known.insert(device.clone());
            self.strangers.remove(device);
            return Ok(true);
        }
        if self.auto_register {
            store
                .register_device(device, None, self.clock.now())
                .await?;
            info!(device_id = %device, "device registered on its first message");
            self.known.insert(device.clone());
            return Ok(true);
        }
        // Topic ids come from anyone who can publish: keep the map from growing without end.
        if self.strangers.len() > 100_000 {
            self.strangers.clear();
        }
        self.strangers.insert(device.clone(), now + STRANGER_TTL);
        warn!(device_id = %device, not_asked_again_for_s = STRANGER_TTL.as_secs(), "messages from an unregistered device dropped, not receipted: its outbox keeps them");
        Ok(false)
    }

    /// What follows a recorded ack: its metrics, its log line and its receipt.
    fn acked(&self, ack: &AckMsg, outcome: Recorded) {
        self.metrics.inbound("ack", recorded(&outcome));
        match &outcome {
            Recorded::Applied => self.metrics.acked(&ack.message_id),
            Recorded::Refused(why) => {
                warn!(device_id = %ack.device_id, message_id = %ack.message_id, reason = %why, "ack refused: nothing changed")
            }
            Recorded::UnknownCommand => {
                warn!(device_id = %ack.device_id, message_id = %ack.message_id, "ack of no command of this device: not kept")
            }
            Recorded::Duplicate => {}
        }
        info!(
            device_id = %ack.device_id,
            message_id = %ack.message_id,
            status = ?ack.status,
            reason = ?ack.reason,
            effective_period = ?ack.effective_period,
            outcome = ?outcome,
            "ack"
        );
        self.receipt(&ack.device_id, &ack.store_id, ack.seq);
    }

    /// What follows a recorded report: its metrics, its log line and its receipt.
    fn reported(&self, report: &ReportMsg, outcome: Recorded) {
        self.metrics.inbound("report", recorded(&outcome));
        match &outcome {
            Recorded::Applied | Recorded::UnknownCommand => {
                self.metrics.period_result(report.status.as_str())
            }
            // Info, not warn: a unit without a plan for the day reports each period it idles
            // through, and those are refused as a matter of course (and counted).
            Recorded::Refused(why) => {
                info!(device_id = %report.device_id, period = report.period, interval_start = %report.interval_start, reason = %why, "report refused: nothing kept")
            }
            Recorded::Duplicate => {}
        }
        debug!(
            device_id = %report.device_id,
            message_id = report.message_id.as_ref().map(MessageId::as_str),
            period = report.period,
            status = report.status.as_str(),
            outcome = ?outcome,
            "report"
        );
        self.receipt(&report.device_id, &report.store_id, report.seq);
    }

    fn receipt(&self, device: &DeviceId, store_id: &max300_protocol::StoreId, seq: u64) {
        self.send(Outbound::Receipt(device.clone(), store_id.clone(), seq));
    }

    async fn sync(&self, sync: &SyncMsg) -> Result<(), CloudError> {
        let today = Day::containing(self.clock.now(), &self.timezone)?.date();
        let current = self
            .ledger
            .store()
            .current_commands(&sync.device_id, today)
            .await?;
        let lacking: Vec<_> = current
            .into_iter()
            .filter(|c| {
                !sync.have.iter().any(|h| {
                    h.schedule_date == c.schedule_date
                        && h.version >= c.version
                        && (h.version > c.version || h.sha256 == c.sha256)
                })
            })
            .map(|c| c.message_id)
            .collect();
        self.metrics.inbound("sync", Outcome::Applied);
        if !lacking.is_empty() {
            info!(device_id = %sync.device_id, count = lacking.len(), "sync: sending what the device lacks");
            self.send(Outbound::Stored(lacking));
        }
        Ok(())
    }

    fn send(&self, out: Outbound) {
        if let Err(e) = self.outbound.try_send(out) {
            // The device sends again (no receipt) or syncs again; nothing is lost.
            warn!(error = %Chain(&e), "outbound queue full: dropped");
        }
    }
}

async fn deliver(publisher: &Publisher, out: Outbound) {
    match out {
        Outbound::Receipt(device, store_id, seq) => {
            publisher.receipt(&device, store_id, vec![seq]).await;
        }
        Outbound::Stored(ids) => {
            if let Err(e) = publisher.publish(&ids).await {
                warn!(error = %Chain(&e), "commands not published");
            }
        }
    }
}

fn kind(message: &Message) -> &'static str {
    match message {
        Message::Ack(_) => "ack",
        Message::Report(_) => "report",
        Message::Heartbeat(_) => "heartbeat",
        Message::Sync(_) => "sync",
        // Cloud-to-device types arriving here are invalid; name them as a group.
        _ => "other",
    }
}

fn recorded(outcome: &Recorded) -> Outcome {
    match outcome {
        Recorded::Applied => Outcome::Applied,
        Recorded::Duplicate => Outcome::Duplicate,
        Recorded::UnknownCommand => Outcome::UnknownCommand,
        Recorded::Refused(_) => Outcome::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_device_over_its_rate_is_throttled_and_the_others_are_not() {
        let mut limit = RateLimit::new(10.0, 5.0);
        let (a, b) = (DeviceId::parse("a").unwrap(), DeviceId::parse("b").unwrap());
        let t0 = max300_protocol::clock::monotonic();
        let allowed = (0..20).filter(|_| limit.allow(&a, t0)).count();
        assert_eq!(allowed, 5, "the burst");
        assert!(limit.allow(&b, t0), "another device has its own bucket");
        assert!(!limit.allow(&a, t0 + Duration::from_millis(50)));
        assert!(
            limit.allow(&a, t0 + Duration::from_millis(150)),
            "refilled at 10 a second"
        );
    }
}
