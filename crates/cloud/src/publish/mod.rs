//! Publishing to devices: commands, and receipts for what was handled.
//!
//! [`Transport`] is the seam between what is published and how: a long-running service holds
//! an MQTT session; a Lambda function has no long-lived connection and publishes through the
//! AWS IoT data-plane HTTPS API ([`IotDataPlane`]).

#[cfg(feature = "aws")]
mod iot;

#[cfg(feature = "aws")]
pub use iot::IotDataPlane;

use max300_protocol::error::Chain;
use std::sync::Arc;

use async_trait::async_trait;
use max300_mqtt::trace;
use max300_mqtt::{Qos, Session};
use max300_protocol::message::{ControlMsg, ReceiptMsg, ScheduleMsg, V1};
use max300_protocol::{Channel, Clock, DeviceId, Message, MessageId, StoreId, Topics};
use tracing::{Instrument, info, info_span, warn};

use crate::CloudError;
use crate::ledger::Ledger;
use crate::lifecycle::Subject;
use crate::metrics::Metrics;

/// How messages reach devices. Every publish is at least once (QoS 1): devices apply each
/// message once by its id.
#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Publishes `message` on `topic`; `Ok` once the broker has taken it.
    async fn publish(&self, topic: String, message: &Message) -> Result<(), CloudError>;

    /// Whether publishing can work now, for readiness.
    fn is_connected(&self) -> bool;

    /// Inbound messages dropped for want of room (only a session receives).
    fn dropped(&self) -> u64 {
        0
    }

    /// Why the last subscription failed (a filter refused, no SUBACK in time), until one
    /// succeeds; only a session subscribes.
    fn subscription_error(&self) -> Option<String> {
        None
    }
}

#[async_trait]
impl Transport for Session {
    async fn publish(&self, topic: String, message: &Message) -> Result<(), CloudError> {
        Ok(self.send(topic, message, Qos::AtLeastOnce).await?)
    }

    fn is_connected(&self) -> bool {
        Session::is_connected(self)
    }

    fn dropped(&self) -> u64 {
        Session::dropped(self)
    }

    fn subscription_error(&self) -> Option<String> {
        Session::subscription_error(self)
    }
}

/// Commands and control messages that went out, not yet recorded.
#[derive(Debug)]
pub struct Sent {
    subjects: Vec<Subject>,
    at: jiff::Timestamp,
}

/// Sends commands and receipts, and records what was sent.
#[derive(Clone, Debug)]
pub struct Publisher {
    transport: Arc<dyn Transport>,
    topics: Topics,
    ledger: Ledger,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// A publisher over `transport`.
    pub fn new(
        transport: Arc<dyn Transport>,
        topics: Topics,
        ledger: Ledger,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Publisher {
        Publisher {
            transport,
            topics,
            ledger,
            clock,
            metrics,
        }
    }

    /// How it publishes.
    pub fn transport(&self) -> &dyn Transport {
        &*self.transport
    }

    /// Publishes the stored commands and control messages these ids name (an ingestion's,
    /// sync answers), then records the publishes. Each is read again first, so one cancelled,
    /// superseded or rejected since is never sent. The commit came before, so a crash before
    /// the publish leaves them `created`, and the sweeper publishes them.
    pub async fn publish(&self, ids: &[MessageId]) -> Result<(), CloudError> {
        let sent = self.send(ids).await?;
        self.record(sent).await
    }

    /// [`Publisher::publish`] without the record: what went out, for [`Publisher::record`].
    /// An ingestion records one batch's publishes while the next batch goes out.
    pub async fn send(&self, ids: &[MessageId]) -> Result<Sent, CloudError> {
        let subjects = self.ledger.publishable(ids, self.clock.now()).await?;
        Ok(self.send_loaded(subjects).await)
    }

    /// Records publishes that went out (a crash before leaves them as they were, and the
    /// sweeper publishes them again).
    pub async fn record(&self, sent: Sent) -> Result<(), CloudError> {
        self.ledger.published(sent.subjects, sent.at).await
    }

    /// Publishes what was just read and found publishable (the sweeper's resends), then
    /// records the publishes.
    pub async fn publish_loaded(&self, subjects: Vec<Subject>) -> Result<(), CloudError> {
        let sent = self.send_loaded(subjects).await;
        self.record(sent).await
    }

    async fn send_loaded(&self, subjects: Vec<Subject>) -> Sent {
        let mut sent = Vec::with_capacity(subjects.len());
        for subject in subjects {
            if let Subject::Command(c) = &subject
                && self.ledger.cancelled_here(&c.message_id)
            {
                info!(device_id = %c.device_id(), message_id = %c.message_id, "cancelled while its batch went out: not published");
                continue;
            }
            let published = match &subject {
                Subject::Command(c) => self.command(c.message()).await,
                Subject::Control(c) => self.control(c.message()).await,
            };
            if published {
                sent.push(subject);
            }
        }
        Sent {
            subjects: sent,
            at: self.clock.now(),
        }
    }

    async fn command(&self, mut msg: ScheduleMsg) -> bool {
        let topic = self.topics.topic(&msg.device_id, Channel::Schedule);
        let (device_id, message_id, version) =
            (msg.device_id.clone(), msg.message_id.clone(), msg.version);
        // A child of the command's span (its stored context), on every publish and resend;
        // the device continues the trace from this span.
        let span = info_span!(parent: None, "publish", device_id = %device_id, message_id = %message_id, version);
        trace::set_parent(&span, msg.traceparent.as_ref());
        msg.traceparent = trace::of(&span).or(msg.traceparent);
        match self
            .transport
            .publish(topic, &Message::Schedule(msg))
            .instrument(span)
            .await
        {
            Ok(()) => {
                info!(device_id = %device_id, message_id = %message_id, version, "command published");
                self.metrics.published("command", Some(&message_id));
                true
            }
            Err(e) => {
                warn!(device_id = %device_id, message_id = %message_id, error = %Chain(&e), "command not published: tried again later");
                false
            }
        }
    }

    async fn control(&self, mut msg: ControlMsg) -> bool {
        let topic = self.topics.topic(&msg.device_id, Channel::Control);
        let (device_id, message_id) = (msg.device_id.clone(), msg.message_id.clone());
        let span = info_span!(parent: None, "publish", device_id = %device_id, message_id = %message_id, target_message_id = %msg.target_message_id);
        trace::set_parent(&span, msg.traceparent.as_ref());
        msg.traceparent = trace::of(&span).or(msg.traceparent);
        match self
            .transport
            .publish(topic, &Message::Control(msg))
            .instrument(span)
            .await
        {
            Ok(()) => {
                info!(device_id = %device_id, message_id = %message_id, "control published");
                self.metrics.published("control", None);
                true
            }
            Err(e) => {
                warn!(device_id = %device_id, message_id = %message_id, error = %Chain(&e), "control not published: tried again later");
                false
            }
        }
    }

    /// Tells a device which of its seqs were handled.
    pub async fn receipt(&self, device: &DeviceId, store_id: StoreId, seqs: Vec<u64>) {
        let msg = Message::Receipt(ReceiptMsg {
            v: V1,
            device_id: device.clone(),
            store_id,
            seqs,
        });
        let topic = self.topics.topic(device, Channel::Receipt);
        match self.transport.publish(topic, &msg).await {
            Ok(()) => self.metrics.published("receipt", None),
            Err(e) => warn!(device_id = %device, error = %Chain(&e), "receipt not published"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use jiff::Timestamp;
    use max300_protocol::{Day, ManualClock, Schedule, Setpoint};
    use tokio::sync::Notify;

    use super::*;
    use crate::store::{Cancel, NewCommand};
    use crate::{Policy, SqliteStore};

    /// A broker that takes the first publish only once it is let go, and records them all.
    #[derive(Debug, Default)]
    struct Gated {
        open: Notify,
        waiting: Notify,
        topics: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Transport for Gated {
        async fn publish(&self, topic: String, _: &Message) -> Result<(), CloudError> {
            let first = self.topics.lock().unwrap().is_empty();
            if first {
                self.waiting.notify_one();
                self.open.notified().await;
            }
            self.topics.lock().unwrap().push(topic);
            Ok(())
        }

        fn is_connected(&self) -> bool {
            true
        }
    }

    /// Item 5: a cancel made while an ingestion's batch goes out is never published, though
    /// the batch was read (and found publishable) before it.
    #[tokio::test]
    async fn a_command_cancelled_while_its_batch_goes_out_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("cloud.sqlite")).unwrap());
        let eve: Timestamp = "2026-11-29T16:00:00Z".parse().unwrap();
        let clock = Arc::new(ManualClock::new(eve));
        let ledger = Ledger::new(store, Policy::default());
        let day = Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap();
        let commands: Vec<NewCommand> = ["d1", "d2", "d3"]
            .into_iter()
            .map(|d| NewCommand {
                message_id: MessageId::generate(eve),
                schedule: Schedule::new(
                    DeviceId::parse(d).unwrap(),
                    day.clone(),
                    vec![Setpoint::IDLE; 48],
                )
                .unwrap(),
                traceparent: None,
            })
            .collect();
        ledger.insert_commands(&commands, eve, None).await.unwrap();
        let ids: Vec<MessageId> = commands.iter().map(|c| c.message_id.clone()).collect();
        let broker = Arc::new(Gated::default());
        let publisher = Publisher::new(
            broker.clone(),
            Topics::new("max300"),
            ledger.clone(),
            clock,
            Arc::new(Metrics::new()),
        );
        let going = tokio::spawn({
            let (publisher, ids) = (publisher.clone(), ids.clone());
            async move { publisher.publish(&ids).await }
        });
        broker.waiting.notified().await;
        let cancelled = ledger
            .cancel(&ids[2], MessageId::generate(eve), eve)
            .await
            .unwrap();
        assert!(matches!(cancelled, Cancel::Cancelled(_)));
        broker.open.notify_one();
        going.await.unwrap().unwrap();
        assert_eq!(
            *broker.topics.lock().unwrap(),
            ["max300/d1/schedule", "max300/d2/schedule"]
        );
        let detail = ledger.store().command(&ids[2]).await.unwrap().unwrap();
        assert_eq!(detail.publishes, 0, "d3's plan never went out");
    }
}
