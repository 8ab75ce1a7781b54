//! The MQTT payloads of DESIGN §5. JSON, one message per publish, `"type"` and `"v": 1` in
//! every one; unknown fields are ignored and a missing required field is an error.

use std::sync::Arc;

use jiff::Timestamp;
use jiff::civil::Date;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::day::time_zone;
use crate::error::Chain;
use crate::{
    Day, DeviceId, MAX_PAYLOAD_BYTES, MessageId, Mode, ProtocolError, RateKw, Schedule, Setpoint,
    StoreId, TraceParent,
};

/// The protocol version, `"v": 1`. Any other value is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V1;

impl Serialize for V1 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(1)
    }
}

impl<'de> Deserialize<'de> for V1 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            1 => Ok(V1),
            v => Err(serde::de::Error::custom(format!(
                "unsupported protocol version v={v}"
            ))),
        }
    }
}

/// Every message of the contract.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// cloud → device: a plan.
    Schedule(ScheduleMsg),
    /// cloud → device: cancel a plan.
    Control(ControlMsg),
    /// cloud → device: these seqs were handled.
    Receipt(ReceiptMsg),
    /// device → cloud: a plan or control message was accepted or rejected.
    Ack(AckMsg),
    /// device → cloud: what happened in one period.
    Report(ReportMsg),
    /// device → cloud: liveness and current state.
    Heartbeat(HeartbeatMsg),
    /// device → cloud: the plans the device holds.
    Sync(SyncMsg),
}

/// One period of a schedule message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireInterval {
    /// 1-based period number.
    pub period: u32,
    /// The period's start (UTC).
    #[serde(serialize_with = "utc")]
    pub start: Timestamp,
    /// What to do.
    pub mode: Mode,
    /// At what rate.
    pub rate_kw: RateKw,
}

/// A timestamp as jiff serializes one, printed without jiff's printer where it can be (see
/// [`crate::schedule::utc_seconds`]): an ingestion encodes 48 of them for each unit.
fn utc<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    match crate::schedule::utc_seconds(*t) {
        Some(text) => {
            s.serialize_str(std::str::from_utf8(&text).map_err(serde::ser::Error::custom)?)
        }
        None => t.serialize(s),
    }
}

/// A normalized plan for one device and date.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleMsg {
    /// Always 1.
    pub v: V1,
    /// This command's id.
    pub message_id: MessageId,
    /// The target device.
    pub device_id: DeviceId,
    /// The local date.
    pub schedule_date: Date,
    /// The IANA zone of the date.
    pub timezone: String,
    /// 1 for the first plan of a device and date, +1 for each change.
    pub version: u32,
    /// When the cloud made the command.
    pub issued_at: Timestamp,
    /// See [`Schedule::sha256`].
    pub sha256: String,
    /// One entry per period.
    pub intervals: Vec<WireInterval>,
    /// W3C trace context, when tracing is on. Decoded leniently: an invalid value is `None`.
    #[serde(
        default,
        deserialize_with = "crate::trace::lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<TraceParent>,
}

/// What a control message asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    /// Go idle now; the rest of the target plan is skipped.
    Cancel,
}

/// An operator's instruction about a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlMsg {
    /// Always 1.
    pub v: V1,
    /// This command's id.
    pub message_id: MessageId,
    /// The target device.
    pub device_id: DeviceId,
    /// What to do.
    pub action: ControlAction,
    /// The schedule command it is about.
    pub target_message_id: MessageId,
    /// When the cloud made it.
    pub issued_at: Timestamp,
    /// W3C trace context, when tracing is on. Decoded leniently: an invalid value is `None`.
    #[serde(
        default,
        deserialize_with = "crate::trace::lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<TraceParent>,
}

/// The cloud handled these acks and reports; the device may drop them from its outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReceiptMsg {
    /// Always 1.
    pub v: V1,
    /// The device.
    pub device_id: DeviceId,
    /// The device store the seqs belong to.
    pub store_id: StoreId,
    /// The handled seqs.
    pub seqs: Vec<u64>,
}

/// Whether a device took a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// Persisted and in force from `effective_period`.
    Accepted,
    /// Refused; `reason` says why.
    Rejected,
}

/// Why a device refused a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// It broke a rule; `details` says which.
    Invalid,
    /// It was for another device.
    WrongDevice,
    /// The device holds a newer version.
    Superseded,
    /// A rate above the device's own limit.
    RateAboveMax,
    /// The whole date is over.
    Past,
    /// A cancel for it arrived first: the device keeps the cancel and refuses the plan
    /// (`details` names the control message).
    Cancelled,
}

/// A device's answer to a schedule or control message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AckMsg {
    /// Always 1.
    pub v: V1,
    /// The device store this message belongs to.
    pub store_id: StoreId,
    /// Its sequence number in that store.
    pub seq: u64,
    /// The command acked.
    pub message_id: MessageId,
    /// The device.
    pub device_id: DeviceId,
    /// Accepted or rejected.
    pub status: AckStatus,
    /// Why it was rejected.
    #[serde(default)]
    pub reason: Option<RejectReason>,
    /// Details of an `invalid` rejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
    /// The plan's sha256 as the device computed it.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The first period the plan governs on the device.
    #[serde(default)]
    pub effective_period: Option<u32>,
    /// When the device acked.
    pub at: Timestamp,
    /// W3C trace context, when tracing is on. Decoded leniently: an invalid value is `None`.
    #[serde(
        default,
        deserialize_with = "crate::trace::lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<TraceParent>,
}

/// How a period went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportStatus {
    /// The controller took and read back the allowed setpoint.
    Executed,
    /// The controller could not be driven, or read back wrong.
    Failed,
    /// No plan ran in this period.
    Skipped,
}

impl ReportStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportStatus::Executed => "executed",
            ReportStatus::Failed => "failed",
            ReportStatus::Skipped => "skipped",
        }
    }
}

/// Why the applied rate differs from the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitedBy {
    /// Full: no more charging.
    SocMax,
    /// Empty: no more discharging.
    SocMin,
    /// The device's configured limit.
    MaxRateKw,
    /// The controller's live limit.
    ControllerLimit,
}

/// Why a period was skipped or limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeriodReason {
    /// No plan for the period.
    NoSchedule,
    /// The agent was not running through the period.
    AgentDown,
    /// A newer version governs the period.
    Superseded,
    /// The plan was cancelled.
    Cancelled,
    /// The device clock is behind what it stored.
    ClockUnsynced,
    /// The agent runs without writing to the controller.
    DryRun,
}

/// What happened in one period on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportMsg {
    /// Always 1.
    pub v: V1,
    /// The device store this message belongs to.
    pub store_id: StoreId,
    /// Its sequence number in that store.
    pub seq: u64,
    /// The command that governed the period; null when none did.
    pub message_id: Option<MessageId>,
    /// The device.
    pub device_id: DeviceId,
    /// 1-based period of the local date.
    pub period: u32,
    /// The period's start; with `device_id`, the report's natural key.
    pub interval_start: Timestamp,
    /// Planned mode.
    pub mode: Mode,
    /// Planned rate.
    pub rate_kw: RateKw,
    /// How it went.
    pub status: ReportStatus,
    /// What ran.
    #[serde(default)]
    pub applied_kw: Option<RateKw>,
    /// Why `applied_kw` differs from the plan.
    #[serde(default)]
    pub limited_by: Option<LimitedBy>,
    /// Why it was skipped or limited.
    #[serde(default)]
    pub reason: Option<PeriodReason>,
    /// What a dry run would have applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_kw: Option<RateKw>,
    /// State of charge read back when the period was run (at its start), in percent.
    #[serde(default)]
    pub soc_pct: Option<f64>,
    /// Energy the unit delivered in the period, in kWh, in the period's direction (never
    /// negative): integrated from the measured power, or from the setpoint the controller
    /// ran where power is not measured. Null when unknown (the agent stopped during the
    /// period, its clock was not trusted, or the period was missed).
    #[serde(default)]
    pub energy_kwh: Option<f64>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// When the device reported: the period's end for a period it ran (the report is sent
    /// then, with the energy of the whole period), or when it found a missed one.
    pub at: Timestamp,
    /// W3C trace context, when tracing is on. Decoded leniently: an invalid value is `None`.
    #[serde(
        default,
        deserialize_with = "crate::trace::lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<TraceParent>,
}

/// Why a device is not following a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// No valid plan for the current period.
    NoSchedule,
    /// The clock reads earlier than the last stored instant.
    ClockUnsynced,
    /// The controller cannot be driven.
    ControllerFault,
    /// The plan was cancelled.
    Cancelled,
    /// Dry run: nothing is written.
    DryRun,
}

impl Fallback {
    /// Every fallback.
    pub const ALL: [Fallback; 5] = [
        Fallback::NoSchedule,
        Fallback::ClockUnsynced,
        Fallback::ControllerFault,
        Fallback::Cancelled,
        Fallback::DryRun,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NoSchedule => "no_schedule",
            Fallback::ClockUnsynced => "clock_unsynced",
            Fallback::ControllerFault => "controller_fault",
            Fallback::Cancelled => "cancelled",
            Fallback::DryRun => "dry_run",
        }
    }
}

/// The exact wire name, as stored.
impl std::str::FromStr for Fallback {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fallback::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| ProtocolError::unknown_name("fallback", s))
    }
}

/// A device's periodic sign of life.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatMsg {
    /// Always 1.
    pub v: V1,
    /// The device.
    pub device_id: DeviceId,
    /// When it was sent.
    pub at: Timestamp,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// The agent's version.
    pub agent_version: String,
    /// The plan in force.
    #[serde(default)]
    pub active_message_id: Option<MessageId>,
    /// The current mode.
    pub mode: Mode,
    /// The current rate.
    pub rate_kw: RateKw,
    /// State of charge, in percent.
    #[serde(default)]
    pub soc_pct: Option<f64>,
    /// Why the device is not following a plan; null when it is.
    #[serde(default)]
    pub fallback: Option<Fallback>,
    /// Acks and reports waiting for a receipt.
    #[serde(default)]
    pub outbox: u64,
}

/// A plan a device holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldPlan {
    /// The local date.
    pub schedule_date: Date,
    /// The version held.
    pub version: u32,
    /// The command it came in.
    pub message_id: MessageId,
    /// Its sha256.
    pub sha256: String,
}

/// Sent on every (re)connect: what the device holds, so the cloud can send what it lacks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncMsg {
    /// Always 1.
    pub v: V1,
    /// The device.
    pub device_id: DeviceId,
    /// The plans it holds for today and later.
    pub have: Vec<HeldPlan>,
}

impl Message {
    /// Decodes a payload, refusing anything over [`MAX_PAYLOAD_BYTES`].
    pub fn decode(payload: &[u8]) -> Result<Message, ProtocolError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(ProtocolError::Decode(format!(
                "payload of {} bytes exceeds {MAX_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        serde_json::from_slice(payload).map_err(|e| ProtocolError::Json(Arc::new(e)))
    }

    /// Encodes for publishing.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map key is a string and every float is
        // finite by construction.
        serde_json::to_vec(self).expect("messages always serialize")
    }

    /// The device the message is about.
    pub fn device_id(&self) -> &DeviceId {
        match self {
            Message::Schedule(m) => &m.device_id,
            Message::Control(m) => &m.device_id,
            Message::Receipt(m) => &m.device_id,
            Message::Ack(m) => &m.device_id,
            Message::Report(m) => &m.device_id,
            Message::Heartbeat(m) => &m.device_id,
            Message::Sync(m) => &m.device_id,
        }
    }

    /// The topic channel this message travels on.
    pub fn channel(&self) -> crate::Channel {
        use crate::Channel;
        match self {
            Message::Schedule(_) => Channel::Schedule,
            Message::Control(_) => Channel::Control,
            Message::Receipt(_) => Channel::Receipt,
            Message::Ack(_) => Channel::Ack,
            Message::Report(_) => Channel::Report,
            Message::Heartbeat(_) => Channel::Heartbeat,
            Message::Sync(_) => Channel::Sync,
        }
    }
}

impl ScheduleMsg {
    /// The message for a normalized schedule.
    pub fn new(
        schedule: &Schedule,
        message_id: MessageId,
        version: u32,
        issued_at: Timestamp,
    ) -> ScheduleMsg {
        ScheduleMsg {
            v: V1,
            message_id,
            device_id: schedule.device_id().clone(),
            schedule_date: schedule.day().date(),
            timezone: schedule.day().tz_name().to_owned(),
            version,
            issued_at,
            sha256: schedule.sha256(),
            intervals: schedule
                .periods()
                .map(|p| WireInterval {
                    period: p.period,
                    start: p.start,
                    mode: p.setpoint.mode(),
                    rate_kw: p.setpoint.rate(),
                })
                .collect(),
            traceparent: None,
        }
    }

    /// Rebuilds the schedule, checking every rule a device must: the zone, one interval per
    /// period in order on the date's grid, idle at 0 kW, and the sha256.
    pub fn to_schedule(&self) -> Result<Schedule, ProtocolError> {
        let tz = time_zone(&self.timezone).map_err(|e| ProtocolError::Plan(e.to_string()))?;
        let day = Day::new(self.schedule_date, tz)
            .map_err(|e| ProtocolError::Plan(Chain(&e).to_string()))?;
        if self.intervals.len() != day.period_count() as usize {
            return Err(ProtocolError::Plan(format!(
                "{} has {} periods, the message has {}",
                self.schedule_date,
                day.period_count(),
                self.intervals.len()
            )));
        }
        let mut setpoints = Vec::with_capacity(self.intervals.len());
        for (i, iv) in self.intervals.iter().enumerate() {
            let period = i as u32 + 1;
            if iv.period != period || iv.start != day.period_start(period) {
                return Err(ProtocolError::Plan(format!(
                    "intervals[{i}]: expected period {period} at {}, got period {} at {}",
                    day.period_start(period),
                    iv.period,
                    iv.start
                )));
            }
            setpoints.push(
                Setpoint::new(iv.mode, iv.rate_kw)
                    .map_err(|e| ProtocolError::Plan(format!("intervals[{i}]: {e}")))?,
            );
        }
        let schedule = Schedule::new(self.device_id.clone(), day, setpoints)
            .expect("the count was checked above");
        let sha = schedule.sha256();
        if sha != self.sha256 {
            return Err(ProtocolError::Plan(format!(
                "sha256 {} does not match the intervals ({sha})",
                self.sha256
            )));
        }
        Ok(schedule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fallback_reads_back_from_its_wire_name_and_serde_agrees() {
        for f in Fallback::ALL {
            assert_eq!(f.as_str().parse::<Fallback>().ok(), Some(f));
            assert_eq!(serde_json::to_value(f).unwrap(), f.as_str());
        }
        assert!("no schedule".parse::<Fallback>().is_err());
    }

    #[test]
    fn a_long_decimal_decodes_to_the_float_it_encodes_back_to() {
        // Found by the `message` fuzz target: without exact float parsing, a long decimal
        // decoded one bit away from what its own encoding decodes to.
        let bytes = include_bytes!("../../../fuzz/corpus/message/report-float-round-trip.json");
        let msg = Message::decode(bytes).unwrap();
        assert_eq!(Message::decode(&msg.encode()).unwrap(), msg);
    }

    fn report() -> ReportMsg {
        ReportMsg {
            v: V1,
            store_id: StoreId::parse("9f2c").unwrap(),
            seq: 18,
            message_id: Some(MessageId::parse("01JDX").unwrap()),
            device_id: DeviceId::parse("max300-0001").unwrap(),
            period: 1,
            interval_start: "2026-11-30T00:00:00Z".parse().unwrap(),
            mode: Mode::Charge,
            rate_kw: RateKw::from_watts(50_000),
            status: ReportStatus::Executed,
            applied_kw: Some(RateKw::from_watts(50_000)),
            limited_by: None,
            reason: None,
            would_kw: None,
            soc_pct: Some(41.5),
            energy_kwh: Some(25.0),
            error: None,
            at: "2026-11-30T00:00:01Z".parse().unwrap(),
            traceparent: None,
        }
    }

    #[test]
    fn decodes_the_design_examples() {
        let ack = r#"{"type":"ack","v":1,"store_id":"9f2c","seq":17,"message_id":"01JDX","device_id":"max300-0001",
            "status":"accepted","reason":null,"sha256":"ab","effective_period":1,"at":"2026-11-29T15:46:03Z"}"#;
        assert!(matches!(
            Message::decode(ack.as_bytes()),
            Ok(Message::Ack(_))
        ));
        let hb = r#"{"type":"heartbeat","v":1,"device_id":"max300-0001","at":"2026-11-29T15:46:03Z","uptime_s":3600,
            "agent_version":"0.1","active_message_id":"01JDX","mode":"charge","rate_kw":50.0,"soc_pct":41.5,"fallback":null,"outbox":0}"#;
        assert!(matches!(
            Message::decode(hb.as_bytes()),
            Ok(Message::Heartbeat(_))
        ));
        let sync = r#"{"type":"sync","v":1,"device_id":"max300-0001",
            "have":[{"schedule_date":"2026-11-30","version":1,"message_id":"01JDX","sha256":"ab"}]}"#;
        assert!(matches!(
            Message::decode(sync.as_bytes()),
            Ok(Message::Sync(_))
        ));
        let receipt = r#"{"type":"receipt","v":1,"device_id":"max300-0001","store_id":"9f2c","seqs":[17,18]}"#;
        assert!(matches!(
            Message::decode(receipt.as_bytes()),
            Ok(Message::Receipt(_))
        ));
    }

    #[test]
    fn a_plan_refused_for_a_cancel_held_before_it_says_cancelled() {
        let ack = r#"{"type":"ack","v":1,"store_id":"9f2c","seq":17,"message_id":"01JDX","device_id":"max300-0001",
            "status":"rejected","reason":"cancelled","details":"cancelled by control 01JDY before it arrived",
            "sha256":null,"effective_period":null,"at":"2026-11-29T15:46:03Z"}"#;
        let Ok(Message::Ack(decoded)) = Message::decode(ack.as_bytes()) else {
            panic!("not an ack")
        };
        assert_eq!(decoded.reason, Some(RejectReason::Cancelled));
        let text = String::from_utf8(Message::Ack(decoded.clone()).encode()).unwrap();
        assert!(text.contains(r#""reason":"cancelled""#), "{text}");
        assert_eq!(
            Message::decode(text.as_bytes()).unwrap(),
            Message::Ack(decoded)
        );
    }

    #[test]
    fn round_trips_a_report_and_ignores_unknown_fields() {
        let msg = Message::Report(report());
        let mut json: serde_json::Value = serde_json::from_slice(&msg.encode()).unwrap();
        json["future_field"] = serde_json::json!(true);
        let back = Message::decode(json.to_string().as_bytes()).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn refuses_missing_fields_other_versions_and_negative_rates() {
        let mut json = serde_json::to_value(Message::Report(report())).unwrap();
        json.as_object_mut().unwrap().remove("interval_start");
        let err = Message::decode(json.to_string().as_bytes()).unwrap_err();
        assert!(Chain(&err).to_string().contains("interval_start"), "{err}");

        let mut json = serde_json::to_value(Message::Report(report())).unwrap();
        json["v"] = serde_json::json!(2);
        let err = Message::decode(json.to_string().as_bytes()).unwrap_err();
        assert!(Chain(&err).to_string().contains("v=2"), "{err}");

        let mut json = serde_json::to_value(Message::Report(report())).unwrap();
        json["rate_kw"] = serde_json::json!(-5.0);
        assert!(Message::decode(json.to_string().as_bytes()).is_err());
    }

    #[test]
    fn a_bad_traceparent_never_gets_a_message_refused() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for (value, kept) in [
            (serde_json::json!(good), true),
            (serde_json::json!("00-not-a-trace-context"), false),
            (serde_json::json!(17), false),
            (serde_json::json!(null), false),
            (serde_json::json!({"nested": true}), false),
        ] {
            let mut json = serde_json::to_value(Message::Report(report())).unwrap();
            json["traceparent"] = value.clone();
            let Message::Report(back) = Message::decode(json.to_string().as_bytes()).unwrap()
            else {
                panic!("not a report")
            };
            assert_eq!(back.traceparent.is_some(), kept, "{value}");
        }
        for ack in [
            r#"{"type":"ack","v":1,"store_id":"9f2c","seq":17,"message_id":"01JDX","device_id":"d1",
                "status":"accepted","at":"2026-11-29T15:46:03Z","traceparent":"x"}"#,
            r#"{"type":"control","v":1,"message_id":"01JDY","device_id":"d1","action":"cancel",
                "target_message_id":"01JDX","issued_at":"2026-11-29T15:46:03Z","traceparent":[]}"#,
        ] {
            assert!(Message::decode(ack.as_bytes()).is_ok(), "{ack}");
        }
    }

    #[test]
    fn a_traceparent_is_sent_only_when_there_is_one() {
        let mut r = report();
        assert!(
            !String::from_utf8(Message::Report(r.clone()).encode())
                .unwrap()
                .contains("traceparent")
        );
        r.traceparent =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").ok();
        let msg = Message::Report(r);
        let text = String::from_utf8(msg.encode()).unwrap();
        assert!(text.contains(
            r#""traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01""#
        ));
        assert_eq!(Message::decode(text.as_bytes()).unwrap(), msg);
    }

    #[test]
    fn refuses_unknown_types_and_oversized_payloads() {
        let err = Message::decode(br#"{"type":"reboot","v":1}"#).unwrap_err();
        assert!(Chain(&err).to_string().contains("reboot"), "{err}");
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert!(
            Message::decode(&big)
                .unwrap_err()
                .to_string()
                .contains("exceeds")
        );
    }

    #[test]
    fn a_schedule_message_rebuilds_its_plan_and_checks_the_sha() {
        let day = Day::named("2026-10-25".parse().unwrap(), "Europe/London").unwrap();
        let sps = vec![Setpoint::new(Mode::Charge, RateKw::from_watts(10_000)).unwrap(); 50];
        let schedule = Schedule::new(DeviceId::parse("d1").unwrap(), day, sps).unwrap();
        let ts: Timestamp = "2026-10-24T15:00:00Z".parse().unwrap();
        let mut msg = ScheduleMsg::new(&schedule, MessageId::generate(ts), 1, ts);
        let decoded = Message::decode(&Message::Schedule(msg.clone()).encode()).unwrap();
        let Message::Schedule(decoded) = decoded else {
            panic!("not a schedule")
        };
        assert_eq!(decoded.to_schedule().unwrap(), schedule);

        msg.intervals[3].rate_kw = RateKw::from_watts(1);
        assert!(
            msg.to_schedule()
                .unwrap_err()
                .to_string()
                .contains("sha256")
        );
        msg.intervals.pop();
        assert!(
            msg.to_schedule()
                .unwrap_err()
                .to_string()
                .contains("50 periods")
        );
    }
}
