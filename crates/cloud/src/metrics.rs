//! The service's Prometheus metrics, all named `max300_*`.
//!
//! Counters move as things happen; the gauges that describe the fleet (commands by state,
//! alerts, heartbeat age) are set from the store when `/metrics` is scraped, so they can never
//! drift from what the API shows. One registry per service instance, not a global one: tests
//! run several services in one process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use max300_protocol::MessageId;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label pairs. Values are short, bounded vocabularies (states, outcomes, field names).
pub type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// What happened to an inbound device message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied for the first time.
    Applied,
    /// Seen before; nothing changed.
    Duplicate,
    /// Stored, but it names no command of ours.
    UnknownCommand,
    /// Undecodable, or at odds with its topic.
    Invalid,
    /// Decoded, but refused by the lifecycle (an ack's effective period outside its plan, a
    /// report off its device's days): it changed nothing.
    Refused,
    /// From a device that is not registered.
    UnknownDevice,
    /// Over its device's message rate.
    Throttled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::UnknownCommand => "unknown_command",
            Outcome::Invalid => "invalid",
            Outcome::Refused => "refused",
            Outcome::UnknownDevice => "unknown_device",
            Outcome::Throttled => "throttled",
        }
    }
}

/// Counter totals, for metrics that are pushed rather than scraped (Lambda's EMF lines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Commands flagged late.
    pub late: u64,
    /// Commands expired.
    pub expired: u64,
    /// Ingestion runs that failed.
    pub ingestion_failed: u64,
    /// Ingestion runs that succeeded.
    pub ingestion_succeeded: u64,
    /// Messages published again.
    pub resends: u64,
    /// Messages published.
    pub published: u64,
    /// Device messages refused (undecodable, foreign, refused, unknown device, throttled).
    pub feedback_rejected: u64,
}

impl Totals {
    /// The CloudWatch names and counts of what happened between `before` and `self`.
    pub fn since(&self, before: &Totals) -> [(&'static str, u64); 7] {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        [
            ("CommandsLate", d(self.late, before.late)),
            ("CommandsExpired", d(self.expired, before.expired)),
            (
                "IngestionFailed",
                d(self.ingestion_failed, before.ingestion_failed),
            ),
            (
                "IngestionSucceeded",
                d(self.ingestion_succeeded, before.ingestion_succeeded),
            ),
            ("Resends", d(self.resends, before.resends)),
            ("Published", d(self.published, before.published)),
            (
                "FeedbackRejected",
                d(self.feedback_rejected, before.feedback_rejected),
            ),
        ]
    }
}

/// Commands whose first publish this process has seen but whose ack it has not; bounded so
/// that a fleet that never answers can't grow it without end.
const MAX_PENDING_ACKS: usize = 1_000_000;

/// When this process first published each command it has not seen acked yet: what an ack's
/// latency is observed from.
///
/// By a 32-bit hash of the message id, not the id, to the milliseconds since `since` (the
/// histogram's first bucket is 10 ms): 9 bytes a command with the table's control byte,
/// rather than 17 for 64-bit keys and nanoseconds (2.2 MB at a 100,000-unit evening) or about
/// 130 for ids and `Instant`s. At 100,000 commands about one pair of ids shares a key: they mix
/// up one latency sample. 32 bits of milliseconds last 49 days: past that the clock starts
/// over from an empty table, so a command whose ack is pending across that moment goes
/// unobserved, never observed wrong.
#[derive(Debug)]
struct AckClock {
    since: Instant,
    pending: HashMap<u32, u32>,
}

impl AckClock {
    fn new(now: Instant) -> AckClock {
        AckClock {
            since: now,
            pending: HashMap::new(),
        }
    }

    fn key(id: &MessageId) -> u32 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        // Fixed, so the same id always maps to the same key.
        BuildHasherDefault::<DefaultHasher>::default().hash_one(id.as_str()) as u32
    }

    /// Milliseconds since `since`, starting over (and forgetting every pending command) once
    /// they no longer fit.
    fn ms(&mut self, now: Instant) -> u32 {
        let ms = now.saturating_duration_since(self.since).as_millis();
        u32::try_from(ms).unwrap_or_else(|_| {
            self.since = now;
            self.pending = HashMap::new();
            0
        })
    }

    /// A command published at `now`; only its first publish counts.
    fn published(&mut self, id: &MessageId, now: Instant) {
        let at = self.ms(now);
        if self.pending.len() >= MAX_PENDING_ACKS {
            self.pending.clear();
        }
        self.pending.entry(AckClock::key(id)).or_insert(at);
    }

    /// Its ack applied at `now`: how long since its first publish, when this clock saw it.
    fn acked(&mut self, id: &MessageId, now: Instant) -> Option<Duration> {
        let at = self.ms(now);
        let sent = self.pending.remove(&AckClock::key(id))?;
        Some(Duration::from_millis(u64::from(at.saturating_sub(sent))))
    }
}

/// Every metric of one service instance.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    inbound: Family<Labels, Counter>,
    mqtt_dropped: Counter,
    ingestions: Family<Labels, Counter>,
    rejections: Family<Labels, Counter>,
    publishes: Family<Labels, Counter>,
    resends: Counter,
    ack_latency: Histogram,
    period_results: Family<Labels, Counter>,
    late: Counter,
    expired: Counter,
    /// Scrape-time gauges.
    pub(crate) commands: Family<Labels, Gauge>,
    pub(crate) alerts: Family<Labels, Gauge>,
    pub(crate) devices: Family<Labels, Gauge>,
    pub(crate) heartbeat_age: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Only in a process that consumes acks (see [`Metrics::time_acks`]).
    acks: Mutex<Option<AckClock>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            inbound: Family::default(),
            mqtt_dropped: Counter::default(),
            ingestions: Family::default(),
            rejections: Family::default(),
            publishes: Family::default(),
            resends: Counter::default(),
            // Real seconds from the first publish to the ack: 10 ms .. ~80 s, then +Inf.
            ack_latency: Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
            period_results: Family::default(),
            late: Counter::default(),
            expired: Counter::default(),
            commands: Family::default(),
            alerts: Family::default(),
            devices: Family::default(),
            heartbeat_age: Family::default(),
            acks: Mutex::new(None),
        };
        registry.register(
            "max300_inbound_messages",
            "Device messages by type and outcome",
            m.inbound.clone(),
        );
        registry.register(
            "max300_mqtt_dropped",
            "Inbound MQTT messages dropped because the service could not keep up",
            m.mqtt_dropped.clone(),
        );
        registry.register(
            "max300_ingestion_runs",
            "Ingestion runs by source and outcome",
            m.ingestions.clone(),
        );
        registry.register(
            "max300_ingestion_rejections",
            "Device schedules refused at ingestion, by the field at fault",
            m.rejections.clone(),
        );
        registry.register(
            "max300_publishes",
            "Messages published to devices, by kind (resends included)",
            m.publishes.clone(),
        );
        registry.register(
            "max300_resends",
            "Commands and control messages published again for want of an ack",
            m.resends.clone(),
        );
        registry.register(
            "max300_ack_latency_seconds",
            "Real seconds from a command's first publish (by this process) to its ack",
            m.ack_latency.clone(),
        );
        registry.register(
            "max300_period_results",
            "Period reports applied, by status",
            m.period_results.clone(),
        );
        registry.register(
            "max300_commands_late",
            "Commands flagged late: not acknowledged when their first period started",
            m.late.clone(),
        );
        registry.register(
            "max300_commands_expired",
            "Commands that expired: never acknowledged before their last period ended",
            m.expired.clone(),
        );
        registry.register("max300_commands", "Commands by state", m.commands.clone());
        registry.register(
            "max300_alerts",
            "Devices with each kind of alert (see the dashboard)",
            m.alerts.clone(),
        );
        registry.register(
            "max300_devices",
            "Registered devices by connectivity (online, offline, never_seen)",
            m.devices.clone(),
        );
        registry.register(
            "max300_heartbeat_age_seconds",
            "Real seconds since devices were last heard from (stat = max, median)",
            m.heartbeat_age.clone(),
        );
        // Every series an operator would alert on exists from the start, at zero: a rate()
        // over a series that appears late misses its first increase.
        for kind in ["ack", "report", "heartbeat", "sync"] {
            for outcome in [
                Outcome::Applied,
                Outcome::Duplicate,
                Outcome::Invalid,
                Outcome::Refused,
                Outcome::UnknownDevice,
                Outcome::Throttled,
            ] {
                let _ = m
                    .inbound
                    .get_or_create(&labels(&[("type", kind), ("outcome", outcome.as_str())]));
            }
        }
        for source in ["fetch", "post"] {
            for outcome in ["ok", "failed"] {
                let _ = m
                    .ingestions
                    .get_or_create(&labels(&[("source", source), ("outcome", outcome)]));
            }
        }
        let _ = m
            .rejections
            .get_or_create(&labels(&[("reason", "document")]));
        for kind in ["command", "control", "receipt"] {
            let _ = m.publishes.get_or_create(&labels(&[("kind", kind)]));
        }
        for status in ["executed", "failed", "skipped"] {
            let _ = m
                .period_results
                .get_or_create(&labels(&[("status", status)]));
        }
        Metrics { registry, ..m }
    }

    /// An inbound message of `kind` (ack, report, heartbeat, sync, unknown).
    pub fn inbound(&self, kind: &str, outcome: Outcome) {
        self.inbound
            .get_or_create(&labels(&[("type", kind), ("outcome", outcome.as_str())]))
            .inc();
    }

    /// An ingestion run ended: `outcome` is `ok` or `failed`.
    pub fn ingestion(&self, source: &str, outcome: &str) {
        self.ingestions
            .get_or_create(&labels(&[("source", source), ("outcome", outcome)]))
            .inc();
    }

    /// A device schedule refused; `reason` is the field at fault.
    pub fn rejection(&self, reason: &str) {
        self.rejections
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// A message published to a device; a command's first publish starts its ack clock.
    pub fn published(&self, kind: &str, command: Option<&MessageId>) {
        self.publishes
            .get_or_create(&labels(&[("kind", kind)]))
            .inc();
        if let (Some(id), Some(clock)) = (command, self.ack_clock().as_mut()) {
            clock.published(id, max300_protocol::clock::monotonic());
        }
    }

    /// Starts timing acks from the first publish of each command: for a process that will
    /// see them (the feedback consumer asks for it). Elsewhere (`max300 ingest`) nothing
    /// would read the clock.
    pub fn time_acks(&self) {
        self.ack_clock()
            .get_or_insert_with(|| AckClock::new(max300_protocol::clock::monotonic()));
    }

    /// `n` messages published again.
    pub fn resent(&self, n: u64) {
        self.resends.inc_by(n);
    }

    /// An ack applied: observes its latency, when this process published the command.
    pub fn acked(&self, id: &MessageId) {
        let took = self
            .ack_clock()
            .as_mut()
            .and_then(|clock| clock.acked(id, max300_protocol::clock::monotonic()));
        if let Some(took) = took {
            self.ack_latency.observe(took.as_secs_f64());
        }
    }

    fn ack_clock(&self) -> std::sync::MutexGuard<'_, Option<AckClock>> {
        self.acks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A period report applied.
    pub fn period_result(&self, status: &str) {
        self.period_results
            .get_or_create(&labels(&[("status", status)]))
            .inc();
    }

    /// A command flagged late by the clock.
    pub fn late(&self) {
        self.late.inc();
    }

    /// A command expired by the clock.
    pub fn expired(&self) {
        self.expired.inc();
    }

    /// The counts a CloudWatch Embedded Metric Format line reports, as totals so far.
    pub fn totals(&self) -> Totals {
        let ingestions = |outcome: &str| -> u64 {
            ["fetch", "post"]
                .iter()
                .map(|source| {
                    self.ingestions
                        .get_or_create(&labels(&[("source", source), ("outcome", outcome)]))
                        .get()
                })
                .sum()
        };
        let rejected = ["ack", "report", "heartbeat", "sync", "other", "unknown"]
            .iter()
            .flat_map(|kind| {
                [
                    Outcome::Invalid,
                    Outcome::Refused,
                    Outcome::UnknownDevice,
                    Outcome::Throttled,
                ]
                .map(|o| (*kind, o.as_str()))
            })
            .map(|(kind, outcome)| {
                self.inbound
                    .get_or_create(&labels(&[("type", kind), ("outcome", outcome)]))
                    .get()
            })
            .sum();
        Totals {
            late: self.late.get(),
            expired: self.expired.get(),
            ingestion_failed: ingestions("failed"),
            ingestion_succeeded: ingestions("ok"),
            resends: self.resends.get(),
            published: ["command", "control", "receipt"]
                .iter()
                .map(|kind| {
                    self.publishes
                        .get_or_create(&labels(&[("kind", kind)]))
                        .get()
                })
                .sum(),
            feedback_rejected: rejected,
        }
    }

    /// Brings the dropped-message counter up to the session's count.
    pub fn set_mqtt_dropped(&self, total: u64) {
        let seen = self.mqtt_dropped.get();
        if total > seen {
            self.mqtt_dropped.inc_by(total - seen);
        }
    }

    /// Sets one scrape-time gauge.
    pub(crate) fn set(family: &Family<Labels, Gauge>, pairs: &[(&'static str, &str)], value: i64) {
        family.get_or_create(&labels(pairs)).set(value);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_the_ack_histogram() {
        let m = Metrics::new();
        m.time_acks();
        m.inbound("ack", Outcome::Applied);
        m.inbound("ack", Outcome::Applied);
        let id = MessageId::parse("01J00000000000000000000000").unwrap();
        m.published("command", Some(&id));
        m.acked(&id);
        m.acked(&id);
        let text = m.render();
        assert!(
            text.contains(r#"max300_inbound_messages_total{type="ack",outcome="applied"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("max300_ack_latency_seconds_count 1"),
            "{text}"
        );
        // Acked at once: in the first bucket, not lost to a wrong unit.
        assert!(
            text.contains(r#"max300_ack_latency_seconds_bucket{le="0.01"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"max300_publishes_total{kind="command"} 1"#),
            "{text}"
        );
    }

    /// A process that consumes no acks (`max300 ingest`) keeps no clock for them: at
    /// 100,000 units that clock is 1.2 MB that nothing would read.
    #[test]
    fn only_a_process_that_consumes_acks_keeps_their_clock() {
        let m = Metrics::new();
        let id = MessageId::parse("01J00000000000000000000000").unwrap();
        m.published("command", Some(&id));
        assert!(m.ack_clock().is_none());
        m.time_acks();
        m.published("command", Some(&id));
        assert_eq!(m.ack_clock().as_ref().map(|c| c.pending.len()), Some(1));
    }

    /// An ack's latency counts from the command's first publish, in milliseconds; past 49
    /// days the clock starts over, and a command pending across it goes unobserved rather
    /// than observed wrong.
    #[test]
    fn the_ack_clock_counts_from_the_first_publish_and_starts_over_when_full() {
        let id = |n: u32| MessageId::parse(format!("01J{n:023}")).unwrap();
        let t0 = max300_protocol::clock::monotonic();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut clock = AckClock::new(t0);
        clock.published(&id(1), at(1_000));
        clock.published(&id(1), at(9_000));
        assert_eq!(
            clock.acked(&id(1), at(1_250)),
            Some(Duration::from_millis(250))
        );
        assert_eq!(clock.acked(&id(1), at(1_300)), None, "observed once");
        assert_eq!(clock.acked(&id(2), at(1_300)), None, "never published here");

        clock.published(&id(3), at(2_000));
        let past = u64::from(u32::MAX) + 5_000;
        clock.published(&id(4), at(past));
        assert_eq!(
            clock.acked(&id(3), at(past + 10)),
            None,
            "pending across the start-over"
        );
        assert_eq!(
            clock.acked(&id(4), at(past + 10)),
            Some(Duration::from_millis(10))
        );
    }
}
