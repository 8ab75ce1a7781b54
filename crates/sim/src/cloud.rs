//! The cloud, played by one MQTT session, for the agent's tests and the agent benchmark: it
//! publishes what it is given (plans, controls, receipts, raw payloads) on device topics and
//! hands every message that arrives on them to its owner, in arrival order. With
//! [`Receipts::Every`] it also receipts every ack and report as the real cloud does, so an
//! agent's outbox drains instead of resending; with [`Receipts::Manual`] the owner sends them.
//!
//! ```text
//!  owner ──send / publish / receipt──▶ session ──▶ broker ──▶ agents
//!  owner ◀──inbox (bounded)── event task ◀── session ◀── broker ◀── acks, reports, …
//!                                  └──(Receipts::Every) receipt task ──▶ session
//! ```

use std::time::{Duration, Instant};

use jiff::Timestamp;
use max300_mqtt::{BrokerUrl, Event, Qos, Session, SessionConfig};
use max300_protocol::clock::monotonic;
use max300_protocol::message::{ReceiptMsg, V1};
use max300_protocol::{Channel, Clock, DeviceId, Message, StoreId, Topics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::SimError;

/// Messages the owner has not read yet; beyond this the event task waits, and the session
/// drops (and the devices resend) what does not fit its own channel.
const INBOX: usize = 16_384;
/// Receipts waiting to be published; one that finds it full is dropped, and its device sends
/// again.
const RECEIPTS: usize = 16_384;

/// Who receipts the acks and reports that arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipts {
    /// The fake cloud, each one as it arrives, as the real cloud does.
    Every,
    /// The owner, with [`FakeCloud::receipt`] (a test of the outbox and its resends).
    Manual,
}

/// One MQTT session subscribed to every device's channels.
#[derive(Debug)]
pub struct FakeCloud {
    session: Session,
    topics: Topics,
    inbox: mpsc::Receiver<Message>,
}

impl FakeCloud {
    /// Connects as `client_id` and waits, up to `within`, until it is subscribed. It runs
    /// until `shutdown`.
    pub async fn connect(
        url: BrokerUrl,
        client_id: &str,
        receipts: Receipts,
        within: Duration,
        shutdown: CancellationToken,
    ) -> Result<FakeCloud, SimError> {
        let topics = Topics::default();
        let mut config = SessionConfig::new(url.clone(), client_id, topics.cloud_filters());
        config.channel_capacity = 4096;
        let (session, mut events) = max300_mqtt::connect(config, shutdown)?;
        let (tx, inbox) = mpsc::channel(INBOX);
        let receipt_tx = (receipts == Receipts::Every).then(|| {
            // Receipts go out from a task of their own, as the cloud sends them: a consumer
            // that waited on its own publish could not PUBACK what it receives, and with its
            // window full the broker would hold back the PUBACKs it waits for.
            let (receipt_tx, mut receipt_rx) = mpsc::channel::<(String, Message)>(RECEIPTS);
            let session = session.clone();
            tokio::spawn(async move {
                while let Some((topic, msg)) = receipt_rx.recv().await {
                    let _ = session.send(topic, &msg, Qos::AtLeastOnce).await;
                }
            });
            receipt_tx
        });
        let receipt_topics = topics.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Event::Message(inbound) = event else {
                    continue;
                };
                if let Ok(msg) = &inbound.message {
                    if let Some(receipt_tx) = &receipt_tx
                        && let Some(receipt) = receipt_for(msg)
                    {
                        let topic = receipt_topics.topic(&receipt.device_id, Channel::Receipt);
                        let _ = receipt_tx.try_send((topic, Message::Receipt(receipt)));
                    }
                    if tx.send(msg.clone()).await.is_err() {
                        return;
                    }
                }
                inbound.ack().await;
            }
        });
        tokio::time::timeout(within, session.wait_connected())
            .await
            .map_err(|_| SimError::Timeout(format!("the broker at {url}")))?;
        Ok(FakeCloud {
            session,
            topics,
            inbox,
        })
    }

    /// Publishes `msg` on its channel of `device` (QoS 1).
    pub async fn send(&self, device: &DeviceId, msg: &Message) -> Result<(), SimError> {
        let topic = self.topics.topic(device, msg.channel());
        Ok(self.session.send(topic, msg, Qos::AtLeastOnce).await?)
    }

    /// Publishes a raw payload (one that may not even decode) on `channel` of `device`.
    pub async fn publish(
        &self,
        device: &DeviceId,
        channel: Channel,
        payload: Vec<u8>,
    ) -> Result<(), SimError> {
        let topic = self.topics.topic(device, channel);
        Ok(self
            .session
            .publish(topic, payload, Qos::AtLeastOnce)
            .await?)
    }

    /// Receipts `seqs` of `store_id` to `device`.
    pub async fn receipt(
        &self,
        device: &DeviceId,
        store_id: &StoreId,
        seqs: Vec<u64>,
    ) -> Result<(), SimError> {
        let msg = Message::Receipt(ReceiptMsg {
            v: V1,
            device_id: device.clone(),
            store_id: store_id.clone(),
            seqs,
        });
        self.send(device, &msg).await
    }

    /// The next message that arrives before `deadline`.
    pub async fn next_before(&mut self, deadline: Instant) -> Result<Message, SimError> {
        tokio::time::timeout_at(deadline.into(), self.inbox.recv())
            .await
            .map_err(|_| SimError::Timeout("the next message".into()))?
            .ok_or(SimError::Closed)
    }

    /// The first message `pick` takes, within `within`; the others are passed over.
    pub async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        pick: impl Fn(&Message) -> bool,
    ) -> Result<Message, SimError> {
        let deadline = monotonic() + within;
        loop {
            let msg = self.next_before(deadline).await.map_err(|e| match e {
                SimError::Timeout(_) => SimError::Timeout(what.to_owned()),
                other => other,
            })?;
            if pick(&msg) {
                return Ok(msg);
            }
        }
    }

    /// Passes over what arrives until `clock` reads `until`.
    pub async fn idle_until(
        &mut self,
        clock: &dyn Clock,
        until: Timestamp,
    ) -> Result<(), SimError> {
        loop {
            let left = clock.real_until(until);
            if left.is_zero() {
                return Ok(());
            }
            tokio::select! {
                msg = self.inbox.recv() => {
                    msg.ok_or(SimError::Closed)?;
                }
                _ = tokio::time::sleep(left) => {}
            }
        }
    }
}

/// The receipt the cloud sends for an ack or a report.
fn receipt_for(msg: &Message) -> Option<ReceiptMsg> {
    let (device_id, store_id, seq) = match msg {
        Message::Ack(a) => (&a.device_id, &a.store_id, a.seq),
        Message::Report(r) => (&r.device_id, &r.store_id, r.seq),
        _ => return None,
    };
    Some(ReceiptMsg {
        v: V1,
        device_id: device_id.clone(),
        store_id: store_id.clone(),
        seqs: vec![seq],
    })
}
