//! Publishing to devices: commands, and receipts for what was handled.

use std::sync::Arc;

use max300_mqtt::{Qos, Session};
use max300_protocol::message::{ControlMsg, ReceiptMsg, ScheduleMsg, V1};
use max300_protocol::{Channel, Clock, DeviceId, Message, MessageId, StoreId, Topics};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::{CloudError, CommandStore};

/// Sends commands and receipts, and records what was sent.
#[derive(Clone, Debug)]
pub struct Publisher {
    session: Session,
    topics: Topics,
    store: Arc<dyn CommandStore>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// A publisher over an MQTT session.
    pub fn new(
        session: Session,
        topics: Topics,
        store: Arc<dyn CommandStore>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Publisher {
        Publisher {
            session,
            topics,
            store,
            clock,
            metrics,
        }
    }

    /// The MQTT session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Publishes committed commands, then marks them sent. The commit came first, so a crash
    /// in between leaves them `created`, and they are published again at start-up.
    pub async fn commands(&self, messages: Vec<ScheduleMsg>) -> Result<(), CloudError> {
        let mut sent = Vec::with_capacity(messages.len());
        for msg in messages {
            let topic = self.topics.topic(&msg.device_id, Channel::Schedule);
            let (device_id, message_id, version) =
                (msg.device_id.clone(), msg.message_id.clone(), msg.version);
            match self
                .session
                .send(topic, &Message::Schedule(msg), Qos::AtLeastOnce)
                .await
            {
                Ok(()) => {
                    info!(device_id = %device_id, message_id = %message_id, version, "command published");
                    self.metrics.published("command", Some(&message_id));
                    sent.push(message_id);
                }
                Err(e) => {
                    warn!(device_id = %device_id, message_id = %message_id, error = %e, "command not published");
                }
            }
        }
        self.store.mark_sent(&sent, self.clock.now()).await
    }

    /// Publishes stored commands and control messages by id (start-up outbox, resends,
    /// sync answers).
    pub async fn stored(&self, ids: &[MessageId]) -> Result<(), CloudError> {
        let mut messages = Vec::with_capacity(ids.len());
        let mut controls = Vec::new();
        for id in ids {
            if let Some(msg) = self.store.schedule_message(id).await? {
                messages.push(msg);
            } else if let Some(msg) = self.store.control_message(id).await? {
                controls.push(msg);
            }
        }
        self.commands(messages).await?;
        self.controls(controls).await
    }

    /// Publishes control messages, then marks them sent.
    pub async fn controls(&self, messages: Vec<ControlMsg>) -> Result<(), CloudError> {
        let mut sent = Vec::with_capacity(messages.len());
        for msg in messages {
            let topic = self.topics.topic(&msg.device_id, Channel::Control);
            let (device_id, message_id) = (msg.device_id.clone(), msg.message_id.clone());
            match self
                .session
                .send(topic, &Message::Control(msg), Qos::AtLeastOnce)
                .await
            {
                Ok(()) => {
                    info!(device_id = %device_id, message_id = %message_id, "control published");
                    self.metrics.published("control", None);
                    sent.push(message_id);
                }
                Err(e) => {
                    warn!(device_id = %device_id, message_id = %message_id, error = %e, "control not published");
                }
            }
        }
        self.store.mark_sent(&sent, self.clock.now()).await
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
        match self.session.send(topic, &msg, Qos::AtLeastOnce).await {
            Ok(()) => self.metrics.published("receipt", None),
            Err(e) => warn!(device_id = %device, error = %e, "receipt not published"),
        }
    }
}
