//! The dashboard's JSON: the fleet at a glance (`GET /api/fleet`) and one device's day
//! (`GET /api/devices/{id}/day`). The views are built by pure functions of what the store
//! holds and `now`; the handlers only fetch.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use max300_protocol::message::{Fallback, LimitedBy, PeriodReason, ReportMsg, ReportStatus};
use max300_protocol::{Day, DeviceId, Mode};
use serde::Serialize;

use super::{ApiError, ApiState, DateQuery, parse_date};
use crate::store::{CommandDetail, CommandSummary, FleetRow, HistoryEntry};
use crate::{CommandState, PeriodStatus};

/// Every period is half an hour; the clock changes alter how many there are, not how long.
const PERIOD: SignedDuration = SignedDuration::from_mins(30);
const PERIOD_HOURS: f64 = 0.5;
/// How many of the day's reports the device view lists.
const RECENT_REPORTS: usize = 20;

/// When a device raises each alert.
#[derive(Clone, Debug)]
pub struct AlertRules {
    /// Devices' heartbeat interval, real seconds: three missed ones make a device offline.
    pub heartbeat_interval_s: u64,
    /// Real seconds without a word before `offline` is an alert.
    pub offline_alert_s: u64,
    /// The local time by which tomorrow's plan must be acknowledged.
    pub plan_due_at: Time,
}

/// Something an operator must look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Alert {
    /// Not heard from for longer than the threshold (or never).
    Offline,
    /// Tomorrow's plan is not acknowledged, and the due time has passed.
    PlanMissing,
    /// Today's or tomorrow's command was not acknowledged when its first period started.
    Late,
    /// Today's or tomorrow's command expired unacknowledged.
    Expired,
    /// The device runs its fallback (idle), not a plan.
    Fallback,
}

impl Alert {
    /// Every alert.
    pub const ALL: [Alert; 5] = [
        Alert::Offline,
        Alert::PlanMissing,
        Alert::Late,
        Alert::Expired,
        Alert::Fallback,
    ];

    /// The API and metric name.
    pub fn as_str(self) -> &'static str {
        match self {
            Alert::Offline => "offline",
            Alert::PlanMissing => "plan_missing",
            Alert::Late => "late",
            Alert::Expired => "expired",
            Alert::Fallback => "fallback",
        }
    }
}

/// A command as the fleet view shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CommandBadge {
    message_id: String,
    version: u32,
    state: CommandState,
    late: bool,
}

impl From<&CommandSummary> for CommandBadge {
    fn from(c: &CommandSummary) -> CommandBadge {
        CommandBadge {
            message_id: c.message_id.to_string(),
            version: c.version,
            state: c.state,
            late: c.late,
        }
    }
}

/// Periods executed as planned out of those due.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Conformance {
    as_planned: u32,
    due: u32,
    ratio: Option<f64>,
}

/// One device's line.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DeviceLine {
    device_id: String,
    online: bool,
    last_seen: Option<Timestamp>,
    heartbeat_age_s: Option<f64>,
    mode: Option<Mode>,
    rate_kw: Option<f64>,
    soc_pct: Option<f64>,
    fallback: Option<Fallback>,
    today: Option<CommandBadge>,
    tomorrow: Option<CommandBadge>,
    conformance: Conformance,
    alerts: Vec<Alert>,
}

/// How many devices raise each alert.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AlertCounts {
    offline: u32,
    plan_missing: u32,
    late: u32,
    expired: u32,
    fallback: u32,
}

impl AlertCounts {
    /// The count for one alert.
    pub fn get(&self, alert: Alert) -> u32 {
        match alert {
            Alert::Offline => self.offline,
            Alert::PlanMissing => self.plan_missing,
            Alert::Late => self.late,
            Alert::Expired => self.expired,
            Alert::Fallback => self.fallback,
        }
    }

    fn add(&mut self, alert: Alert) {
        let n = match alert {
            Alert::Offline => &mut self.offline,
            Alert::PlanMissing => &mut self.plan_missing,
            Alert::Late => &mut self.late,
            Alert::Expired => &mut self.expired,
            Alert::Fallback => &mut self.fallback,
        };
        *n += 1;
    }
}

/// The fleet's totals.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    devices: u32,
    online: u32,
    /// Devices with an alert or a period not run as planned.
    problems: u32,
    /// Devices per alert.
    pub alerts: AlertCounts,
}

/// `GET /api/fleet`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FleetView {
    now: Timestamp,
    timezone: String,
    today: Date,
    tomorrow: Date,
    offline_after_s: u64,
    plan_due_local: String,
    /// The totals.
    pub summary: Summary,
    /// Every device, problems first.
    pub devices: Vec<DeviceLine>,
    /// Real seconds since each device was last heard from (`None`: never).
    #[serde(skip)]
    pub ages: Vec<Option<f64>>,
}

/// The dates the fleet view is about, and the instant by which a period of today counts
/// as due: it has ended.
pub fn fleet_dates(now: Timestamp, tz: &TimeZone) -> Result<(Date, Date, Timestamp), ApiError> {
    let today = now.to_zoned_datetime(tz.clone()).date();
    let tomorrow = today
        .tomorrow()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let ended_by = now.checked_sub(PERIOD).unwrap_or(now);
    Ok((today, tomorrow, ended_by))
}

/// Builds the fleet view. `speed` converts clock time to the real seconds heartbeats are
/// sent in.
pub fn fleet_view(
    rows: Vec<FleetRow>,
    now: Timestamp,
    speed: f64,
    tz: &TimeZone,
    rules: &AlertRules,
) -> Result<FleetView, ApiError> {
    let (today, tomorrow, _) = fleet_dates(now, tz)?;
    let local_now = now.to_zoned_datetime(tz.clone()).time();
    let plan_due = local_now >= rules.plan_due_at;
    let online_window_s = 3.0 * rules.heartbeat_interval_s as f64;
    let mut summary = Summary {
        devices: 0,
        online: 0,
        problems: 0,
        alerts: AlertCounts::default(),
    };
    let mut lines: Vec<(DeviceLine, Option<f64>)> = Vec::with_capacity(rows.len());
    for row in rows {
        let age = row
            .device
            .last_seen
            .map(|seen| (now.duration_since(seen).as_secs_f64() / speed).max(0.0));
        let online = age.is_some_and(|a| a <= online_window_s);
        let mut alerts = Vec::new();
        if age.is_none_or(|a| a > rules.offline_alert_s as f64) {
            alerts.push(Alert::Offline);
        }
        let acknowledged = |c: &Option<CommandSummary>| {
            c.as_ref().is_some_and(|c| {
                matches!(
                    c.state,
                    CommandState::Acknowledged | CommandState::Completed
                )
            })
        };
        if plan_due && !acknowledged(&row.tomorrow) {
            alerts.push(Alert::PlanMissing);
        }
        let commands = [&row.today, &row.tomorrow];
        if commands.iter().any(|c| c.as_ref().is_some_and(|c| c.late)) {
            alerts.push(Alert::Late);
        }
        if commands
            .iter()
            .any(|c| c.as_ref().is_some_and(|c| c.state == CommandState::Expired))
        {
            alerts.push(Alert::Expired);
        }
        if row.device.fallback.is_some() {
            alerts.push(Alert::Fallback);
        }
        let conformance = Conformance {
            as_planned: row.as_planned,
            due: row.due,
            ratio: (row.due > 0).then(|| f64::from(row.as_planned) / f64::from(row.due)),
        };
        summary.devices += 1;
        summary.online += u32::from(online);
        if !alerts.is_empty() || row.as_planned < row.due {
            summary.problems += 1;
        }
        for a in &alerts {
            summary.alerts.add(*a);
        }
        lines.push((
            DeviceLine {
                device_id: row.device.device_id.to_string(),
                online,
                last_seen: row.device.last_seen,
                heartbeat_age_s: age.map(|a| (a * 10.0).round() / 10.0),
                mode: row.device.mode,
                rate_kw: row.device.rate_kw.map(|r| r.kw()),
                soc_pct: row.device.soc_pct,
                fallback: row.device.fallback,
                today: row.today.as_ref().map(CommandBadge::from),
                tomorrow: row.tomorrow.as_ref().map(CommandBadge::from),
                conformance,
                alerts,
            },
            age,
        ));
    }
    // Problems first: more alerts, then lower conformance; then by id (the store's order).
    lines.sort_by(|(a, _), (b, _)| {
        let ratio = |l: &DeviceLine| l.conformance.ratio.unwrap_or(1.0);
        b.alerts
            .len()
            .cmp(&a.alerts.len())
            .then(ratio(a).total_cmp(&ratio(b)))
    });
    let (devices, ages) = lines.into_iter().unzip();
    Ok(FleetView {
        now,
        timezone: tz.iana_name().unwrap_or("UTC").to_owned(),
        today,
        tomorrow,
        offline_after_s: rules.offline_alert_s,
        plan_due_local: rules.plan_due_at.strftime("%H:%M").to_string(),
        summary,
        devices,
        ages,
    })
}

/// One period of the device view.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DayPeriod {
    period: u32,
    start: Timestamp,
    end: Timestamp,
    local_start: String,
    local_end: String,
    utc_offset: String,
    mode: Mode,
    rate_kw: f64,
    /// Charge is positive, discharge negative.
    signed_kw: f64,
    status: DayStatus,
    applied_kw: Option<f64>,
    soc_pct: Option<f64>,
    planned_kwh: f64,
    delivered_kwh: Option<f64>,
    limited_by: Option<LimitedBy>,
    reason: Option<PeriodReason>,
    error: Option<String>,
    reported_at: Option<Timestamp>,
}

/// A period's status in the device view: its command's, or the device's own word on a
/// period no command governs, or `none` when there is neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DayStatus {
    /// Under the command.
    Command(PeriodStatus),
    /// Reported with no command.
    Reported(ReportStatus),
    /// Neither.
    None,
}

impl Serialize for DayStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            DayStatus::Command(status) => status.as_str(),
            DayStatus::Reported(status) => status.as_str(),
            DayStatus::None => "none",
        })
    }
}

/// The command behind the device view, with its timeline.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DayCommand {
    message_id: String,
    version: u32,
    state: CommandState,
    late: bool,
    sha256: String,
    acked_sha256: Option<String>,
    effective_period: Option<u32>,
    publishes: u32,
    history: Vec<HistoryEntry>,
    sends: Vec<Timestamp>,
    warning: Option<String>,
}

/// `GET /api/devices/{id}/day`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DayView {
    device_id: String,
    date: Date,
    timezone: String,
    period_count: u32,
    command: Option<DayCommand>,
    periods: Vec<DayPeriod>,
    reports: Vec<ReportMsg>,
}

fn signed(mode: Mode, kw: f64) -> f64 {
    match mode {
        Mode::Charge => kw,
        Mode::Discharge => -kw,
        Mode::Idle => 0.0,
    }
}

/// Builds one device's day: every period of the local date, planned and as reported.
pub fn day_view(
    device: &DeviceId,
    day: &Day,
    command: Option<CommandDetail>,
    mut reports: Vec<ReportMsg>,
) -> DayView {
    let local = |t: Timestamp| t.to_zoned_datetime(day.tz().clone());
    // Periods no command governs still have the device's word on them (skipped, and why).
    let reported: std::collections::HashMap<u32, &ReportMsg> =
        reports.iter().map(|r| (r.period, r)).collect();
    let periods = (1..=day.period_count())
        .map(|n| {
            let start = day.period_start(n);
            let end = start.checked_add(PERIOD).unwrap_or(start);
            let planned = command
                .as_ref()
                .and_then(|c| c.periods.iter().find(|p| p.period == n));
            let mode = planned.map_or(Mode::Idle, |p| p.mode);
            let rate = planned.map(|p| p.rate_kw.kw()).unwrap_or(0.0);
            let applied = planned.and_then(|p| p.applied_kw).map(|r| r.kw());
            let report = planned.is_none().then(|| reported.get(&n)).flatten();
            let zoned = local(start);
            DayPeriod {
                period: n,
                start,
                end,
                local_start: zoned.strftime("%H:%M").to_string(),
                local_end: local(end).strftime("%H:%M").to_string(),
                utc_offset: zoned.strftime("%:z").to_string(),
                mode,
                rate_kw: rate,
                signed_kw: signed(mode, rate),
                status: planned
                    .map(|p| DayStatus::Command(p.status))
                    .or(report.map(|r| DayStatus::Reported(r.status)))
                    .unwrap_or(DayStatus::None),
                applied_kw: applied,
                soc_pct: planned
                    .and_then(|p| p.soc_pct)
                    .or(report.and_then(|r| r.soc_pct)),
                planned_kwh: rate * PERIOD_HOURS,
                // What the unit says it delivered in the period (integrated over it), not
                // its rate times the period: a unit limited mid-period delivers less.
                delivered_kwh: reported.get(&n).and_then(|r| r.energy_kwh),
                limited_by: planned.and_then(|p| p.limited_by),
                reason: planned
                    .and_then(|p| p.reason)
                    .or(report.and_then(|r| r.reason)),
                error: planned.and_then(|p| p.error.clone()),
                reported_at: planned.and_then(|p| p.at).or(report.map(|r| r.at)),
            }
        })
        .collect();
    reports.reverse();
    reports.truncate(RECENT_REPORTS);
    DayView {
        device_id: device.to_string(),
        date: day.date(),
        timezone: day.tz_name().to_owned(),
        period_count: day.period_count(),
        command: command.map(|c| DayCommand {
            message_id: c.summary.message_id.to_string(),
            version: c.summary.version,
            state: c.summary.state,
            late: c.summary.late,
            sha256: c.sha256,
            acked_sha256: c.acked_sha256,
            effective_period: c.effective_period,
            publishes: c.publishes,
            history: c.history,
            sends: c.sends,
            warning: c.warning,
        }),
        periods,
        reports,
    }
}

pub(super) async fn fleet(State(state): State<Arc<ApiState>>) -> Result<Json<FleetView>, ApiError> {
    Ok(Json(state.fleet_view().await?))
}

pub(super) async fn day(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<DateQuery>,
) -> Result<Json<DayView>, ApiError> {
    let id = DeviceId::parse(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if state.store.device(&id).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "device {id} is not registered"
        )));
    }
    let date = match q.date.as_deref() {
        Some(text) => parse_date(text)?,
        None => fleet_dates(state.clock.now(), &state.timezone)?.0,
    };
    let day = Day::new(date, state.timezone.clone())
        .map_err(|e| ApiError::bad_request(format!("date: {e}")))?;
    // The latest version is the one the device should hold; older ones are in the timeline
    // of the command view.
    let latest = state.store.commands(Some(&id), Some(date)).await?;
    let command = match latest.first() {
        Some(c) => state.store.command(&c.message_id).await?,
        None => None,
    };
    let reports = state.store.reports(&id, day.start(), day.end()).await?;
    Ok(Json(day_view(&id, &day, command, reports)))
}
