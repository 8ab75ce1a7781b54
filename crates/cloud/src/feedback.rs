//! The feedback consumer: acks, reports, heartbeats and sync from devices.
//!
//! Each message is checked (topic and payload agree, the device is known), applied to the
//! store once by its natural key, receipted, and only then PUBACKed. A message that can't be
//! used is logged, counted and PUBACKed, so it never holds up the ones behind it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::tz::TimeZone;
use max300_mqtt::{Event, Inbound};
use max300_protocol::message::{AckMsg, ReportMsg, SyncMsg};
use max300_protocol::{Clock, DeviceId, Message, day::Day};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::publish::Publisher;
use crate::store::Recorded;
use crate::{CloudError, CommandStore};

/// Counts of what arrived, for metrics and tests.
#[derive(Debug, Default)]
pub struct FeedbackStats {
    /// Acks applied.
    pub acks: AtomicU64,
    /// Reports applied.
    pub reports: AtomicU64,
    /// Heartbeats recorded.
    pub heartbeats: AtomicU64,
    /// Sync requests answered.
    pub syncs: AtomicU64,
    /// Acks and reports seen before.
    pub duplicates: AtomicU64,
    /// Messages that could not be decoded or did not fit their topic.
    pub invalid: AtomicU64,
    /// Messages from devices that are not registered.
    pub unknown_device: AtomicU64,
}

/// Handles device messages.
#[derive(Debug)]
pub struct Feedback {
    store: Arc<dyn CommandStore>,
    publisher: Publisher,
    clock: Arc<dyn Clock>,
    timezone: TimeZone,
    auto_register: bool,
    known: HashSet<DeviceId>,
    stats: Arc<FeedbackStats>,
}

impl Feedback {
    /// A consumer.
    pub fn new(
        store: Arc<dyn CommandStore>,
        publisher: Publisher,
        clock: Arc<dyn Clock>,
        timezone: TimeZone,
        auto_register: bool,
        stats: Arc<FeedbackStats>,
    ) -> Feedback {
        Feedback {
            store,
            publisher,
            clock,
            timezone,
            auto_register,
            known: HashSet::new(),
            stats,
        }
    }

    /// Consumes session events until shutdown.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(e) => e,
                    None => break,
                },
            };
            match event {
                Event::Connected => {
                    // Commands committed but never published (a crash between commit and
                    // publish) go out now.
                    match self.store.unsent().await {
                        Ok(ids) if !ids.is_empty() => {
                            info!(count = ids.len(), "publishing commands left unsent");
                            if let Err(e) = self.publisher.stored(&ids).await {
                                warn!(error = %e, "unsent commands not published");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "cannot list unsent commands"),
                    }
                }
                Event::Disconnected(_) => {}
                Event::Message(inbound) => {
                    if let Err(e) = self.handle(&inbound).await {
                        // A store failure. No receipt went out, so the device resends from its
                        // outbox; PUBACK anyway, so this message can't hold up the others.
                        warn!(topic = %inbound.topic, error = %e, "message not handled");
                    }
                    inbound.ack().await;
                }
            }
        }
    }

    async fn handle(&mut self, inbound: &Inbound) -> Result<(), CloudError> {
        let message = match &inbound.message {
            Ok(m) => m,
            Err(e) => {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                warn!(topic = %inbound.topic, error = %e, "undecodable message dropped");
                return Ok(());
            }
        };
        let Some((topic_device, channel)) = &inbound.route else {
            self.stats.invalid.fetch_add(1, Ordering::Relaxed);
            warn!(topic = %inbound.topic, "message on a foreign topic dropped");
            return Ok(());
        };
        if message.channel() != *channel || !channel.from_device() {
            self.stats.invalid.fetch_add(1, Ordering::Relaxed);
            warn!(device_id = %topic_device, topic = %inbound.topic, "message of the wrong type for its topic dropped");
            return Ok(());
        }
        if message.device_id() != topic_device {
            self.stats.invalid.fetch_add(1, Ordering::Relaxed);
            warn!(
                device_id = %topic_device,
                payload_device_id = %message.device_id(),
                "payload device_id differs from the topic's: dropped"
            );
            return Ok(());
        }
        if !self.admit(topic_device).await? {
            self.stats.unknown_device.fetch_add(1, Ordering::Relaxed);
            warn!(device_id = %topic_device, "message from an unregistered device dropped");
            return Ok(());
        }
        let now = self.clock.now();
        match message {
            Message::Ack(ack) => self.ack(ack, now).await,
            Message::Report(report) => self.report(report, now).await,
            Message::Heartbeat(hb) => {
                self.store.record_heartbeat(hb, now).await?;
                self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Message::Sync(sync) => self.sync(sync).await,
            _ => Ok(()),
        }
    }

    async fn admit(&mut self, device: &DeviceId) -> Result<bool, CloudError> {
        if self.known.contains(device) {
            return Ok(true);
        }
        if self.store.device(device).await?.is_some() {
            self.known.insert(device.clone());
            return Ok(true);
        }
        if self.auto_register {
            self.store
                .register_device(device, None, self.clock.now())
                .await?;
            info!(device_id = %device, "device registered on its first message");
            self.known.insert(device.clone());
            return Ok(true);
        }
        Ok(false)
    }

    async fn ack(&self, ack: &AckMsg, now: jiff::Timestamp) -> Result<(), CloudError> {
        let outcome = self.store.record_ack(ack, now).await?;
        self.count(outcome, &self.stats.acks);
        info!(
            device_id = %ack.device_id,
            message_id = %ack.message_id,
            status = ?ack.status,
            reason = ?ack.reason,
            effective_period = ?ack.effective_period,
            outcome = ?outcome,
            "ack"
        );
        self.publisher
            .receipt(&ack.device_id, ack.store_id.clone(), vec![ack.seq])
            .await;
        Ok(())
    }

    async fn report(&self, report: &ReportMsg, now: jiff::Timestamp) -> Result<(), CloudError> {
        let outcome = self.store.record_report(report, now).await?;
        self.count(outcome, &self.stats.reports);
        debug!(
            device_id = %report.device_id,
            message_id = ?report.message_id.as_ref().map(|m| m.as_str()),
            period = report.period,
            status = report.status.as_str(),
            outcome = ?outcome,
            "report"
        );
        self.publisher
            .receipt(&report.device_id, report.store_id.clone(), vec![report.seq])
            .await;
        Ok(())
    }

    fn count(&self, outcome: Recorded, applied: &AtomicU64) {
        match outcome {
            Recorded::Duplicate => self.stats.duplicates.fetch_add(1, Ordering::Relaxed),
            Recorded::Applied | Recorded::UnknownCommand => applied.fetch_add(1, Ordering::Relaxed),
        };
    }

    async fn sync(&self, sync: &SyncMsg) -> Result<(), CloudError> {
        let today = Day::containing(self.clock.now(), &self.timezone)?.date();
        let current = self.store.current_commands(&sync.device_id, today).await?;
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
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        if !lacking.is_empty() {
            info!(device_id = %sync.device_id, count = lacking.len(), "sync: sending what the device lacks");
            self.publisher.stored(&lacking).await?;
        }
        Ok(())
    }
}
