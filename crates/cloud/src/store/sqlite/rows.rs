//! Rows: how a command, a control message and the rest are read from and written to their
//! tables. Every write of the lifecycle's is over the revision it was decided on.

use jiff::Timestamp;
use jiff::civil::Date;
use max300_protocol::{Day, RateKw, Schedule, TraceParent};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::lifecycle::{Command, Control, Marks, Subject};
use crate::store::text::{decode_plan, instant};
use crate::store::{
    CommandSummary, ControlWrite, DeviceRecord, FleetCommand, Record, Unit, rest_of,
};

pub(super) fn conversion(e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

pub(super) fn ts(text: String) -> rusqlite::Result<Timestamp> {
    text.parse().map_err(conversion)
}

pub(super) fn opt_ts(text: Option<String>) -> rusqlite::Result<Option<Timestamp>> {
    text.map(ts).transpose()
}

pub(super) fn parsed<T: std::str::FromStr>(text: String) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(conversion)
}

/// Revisions are SQLite integers (i64); they count up from 0, so both ways are lossless.
pub(super) fn revision(stored: i64) -> u64 {
    u64::try_from(stored).unwrap_or(0)
}

pub(super) fn stored_rev(rev: u64) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

pub(super) fn rate(watts: Option<i64>) -> Option<RateKw> {
    watts
        .and_then(|w| u32::try_from(w).ok())
        .map(RateKw::from_watts)
}

pub(super) const COMMAND_COLUMNS: &str = "message_id, device_id, schedule_date, timezone, version, state, \
    late, governs_from, created_at, effective_period, acked_sha256, publishes, attempts, \
    last_sent_at, retry_at, plan, marks, traceparent, rev, sha256";

/// A command row (selected as [`COMMAND_COLUMNS`]) as the lifecycle sees it.
pub(super) fn command_row(r: &Row) -> rusqlite::Result<Command> {
    let day = Day::named(parsed(r.get(2)?)?, &r.get::<_, String>(3)?).map_err(conversion)?;
    let setpoints = decode_plan(&r.get::<_, String>(15)?).map_err(conversion)?;
    let periods = day.period_count();
    let schedule = Schedule::new(parsed(r.get(1)?)?, day, setpoints)
        .ok_or_else(|| conversion("stored plan does not match its date"))?
        .with_sha256(r.get(19)?);
    let marks = match r.get::<_, Option<String>>(16)? {
        Some(text) => Marks::parse(&text, periods).map_err(conversion)?,
        None => Marks::pending(periods),
    };
    Ok(Command {
        message_id: parsed(r.get(0)?)?,
        schedule,
        version: r.get(4)?,
        state: parsed(r.get(5)?)?,
        late: r.get(6)?,
        governs_from: ts(r.get(7)?)?,
        created_at: ts(r.get(8)?)?,
        effective_period: r.get(9)?,
        acked_sha256: r.get(10)?,
        publishes: r.get(11)?,
        attempts: r.get(12)?,
        last_sent_at: opt_ts(r.get(13)?)?,
        retry_at: opt_ts(r.get(14)?)?,
        marks,
        traceparent: r
            .get::<_, Option<String>>(17)?
            .and_then(|t| TraceParent::parse(&t).ok()),
        rev: revision(r.get(18)?),
    })
}

pub(super) const CONTROL_COLUMNS: &str = "message_id, device_id, target_message_id, state, created_at, \
    ends_at, publishes, attempts, last_sent_at, retry_at, rev";

pub(super) fn control_row(r: &Row) -> rusqlite::Result<Control> {
    Ok(Control {
        message_id: parsed(r.get(0)?)?,
        device_id: parsed(r.get(1)?)?,
        target: parsed(r.get(2)?)?,
        state: parsed(r.get(3)?)?,
        created_at: ts(r.get(4)?)?,
        ends_at: ts(r.get(5)?)?,
        publishes: r.get(6)?,
        attempts: r.get(7)?,
        last_sent_at: opt_ts(r.get(8)?)?,
        retry_at: opt_ts(r.get(9)?)?,
        rev: revision(r.get(10)?),
    })
}

pub(super) fn command_by_id(tx: &Connection, id: &str) -> rusqlite::Result<Option<Command>> {
    tx.prepare_cached(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE message_id = ?1"
    ))?
    .query_row([id], command_row)
    .optional()
}

pub(super) fn control_by_id(tx: &Connection, id: &str) -> rusqlite::Result<Option<Control>> {
    tx.prepare_cached(&format!(
        "SELECT {CONTROL_COLUMNS} FROM controls WHERE message_id = ?1"
    ))?
    .query_row([id], control_row)
    .optional()
}

pub(super) fn subject(tx: &Connection, id: &str) -> rusqlite::Result<Option<Subject>> {
    if let Some(c) = command_by_id(tx, id)? {
        return Ok(Some(Subject::Command(c)));
    }
    Ok(control_by_id(tx, id)?.map(Subject::Control))
}

pub(super) fn versions(
    tx: &Connection,
    device: &str,
    from: Date,
    to: Date,
) -> rusqlite::Result<Vec<Command>> {
    tx.prepare_cached(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands
         WHERE device_id = ?1 AND schedule_date BETWEEN ?2 AND ?3
         ORDER BY schedule_date, version"
    ))?
    .query_map(
        params![device, from.to_string(), to.to_string()],
        command_row,
    )?
    .collect()
}

/// Writes a command row's changeable columns from `c`, over revision `c.rev`.
pub(super) fn update_command(tx: &Connection, c: &Command) -> rusqlite::Result<bool> {
    let changed = tx
        .prepare_cached(
            "UPDATE commands SET state = ?2, late = ?3, effective_period = ?4, acked_sha256 = ?5,
                    publishes = ?6, attempts = ?7, last_sent_at = ?8, retry_at = ?9, marks = ?10,
                    wake_at = ?11, rev = rev + 1
             WHERE message_id = ?1 AND rev = ?12",
        )?
        .execute(params![
            c.message_id.as_str(),
            c.state.as_str(),
            c.late,
            c.effective_period,
            c.acked_sha256,
            c.publishes,
            c.attempts,
            c.last_sent_at.map(instant),
            c.retry_at.map(instant),
            c.marks.to_string(),
            c.wake_at().map(instant),
            stored_rev(c.rev),
        ])?;
    Ok(changed == 1)
}

pub(super) fn insert_control(tx: &Connection, c: &Control) -> rusqlite::Result<bool> {
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO controls (message_id, device_id, target_message_id, action,
                 state, created_at, ends_at, publishes, attempts, last_sent_at, retry_at, wake_at,
                 rev)
             VALUES (?1, ?2, ?3, 'cancel', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 0)",
        )?
        .execute(params![
            c.message_id.as_str(),
            c.device_id.as_str(),
            c.target.as_str(),
            c.state.as_str(),
            instant(c.created_at),
            instant(c.ends_at),
            c.publishes,
            c.attempts,
            c.last_sent_at.map(instant),
            c.retry_at.map(instant),
            c.wake_at().map(instant),
        ])?;
    Ok(inserted == 1)
}

pub(super) fn update_control(tx: &Connection, c: &Control) -> rusqlite::Result<bool> {
    let changed = tx
        .prepare_cached(
            "UPDATE controls SET state = ?2, publishes = ?3, attempts = ?4, last_sent_at = ?5,
                    retry_at = ?6, wake_at = ?7, rev = rev + 1
             WHERE message_id = ?1 AND rev = ?8",
        )?
        .execute(params![
            c.message_id.as_str(),
            c.state.as_str(),
            c.publishes,
            c.attempts,
            c.last_sent_at.map(instant),
            c.retry_at.map(instant),
            c.wake_at().map(instant),
            stored_rev(c.rev),
        ])?;
    Ok(changed == 1)
}

/// Keeps a device message by its natural key; false if one with that key is kept already.
pub(super) fn keep(tx: &Connection, record: &Record) -> rusqlite::Result<bool> {
    let (device, at) = match record {
        Record::Ack { ack, at } => {
            let body = serde_json::to_string(ack).map_err(conversion)?;
            let kept = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO acks (message_id, device_id, body, received_at)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    ack.message_id.as_str(),
                    ack.device_id.as_str(),
                    body,
                    instant(*at)
                ])?;
            if kept == 0 {
                return Ok(false);
            }
            (&ack.device_id, at)
        }
        Record::Report { report, at } => {
            let body = serde_json::to_string(report).map_err(conversion)?;
            let kept = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO reports (device_id, interval_start, message_id, body,
                                                    received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    report.device_id.as_str(),
                    instant(report.interval_start),
                    report.message_id.as_ref().map(|m| m.as_str()),
                    body,
                    instant(*at)
                ])?;
            if kept == 0 {
                return Ok(false);
            }
            (&report.device_id, at)
        }
    };
    // The device was heard from (never moving `last_seen` back).
    tx.prepare_cached(
        "UPDATE devices SET last_seen = ?2
         WHERE device_id = ?1 AND (last_seen IS NULL OR last_seen < ?2)",
    )?
    .execute(params![device.as_str(), instant(*at)])?;
    Ok(true)
}

/// Writes one unit; false (and the caller rolls it back) when a guard fails.
pub(super) fn write_unit(tx: &Connection, unit: &Unit) -> rusqlite::Result<bool> {
    if let Some(record) = &unit.record
        && !keep(tx, record)?
    {
        return Ok(false);
    }
    for step in &unit.commands {
        if !update_command(tx, &step.after)? {
            return Ok(false);
        }
        let id = step.after.message_id.as_str();
        for h in &step.entered {
            tx.prepare_cached("INSERT INTO history (message_id, state, at) VALUES (?1, ?2, ?3)")?
                .execute(params![id, h.state.as_str(), instant(h.at)])?;
        }
        if let Some(at) = step.sent {
            tx.prepare_cached("INSERT INTO sends (message_id, at) VALUES (?1, ?2)")?
                .execute(params![id, instant(at)])?;
        }
    }
    match &unit.control {
        Some(ControlWrite::New(c)) => insert_control(tx, c),
        Some(ControlWrite::Update(c)) => update_control(tx, c),
        None => Ok(true),
    }
}

/// The UTC dates around an instant: its local date is one of them in every zone.
pub(super) fn dates_around(t: Timestamp) -> (Date, Date) {
    let d = t.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
    (d.yesterday().unwrap_or(d), d.tomorrow().unwrap_or(d))
}

pub(super) fn device_row(row: &rusqlite::Row) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        device_id: parsed(row.get(0)?)?,
        max_rate_kw: rate(row.get(1)?),
        registered_at: ts(row.get(2)?)?,
        last_seen: opt_ts(row.get(3)?)?,
        mode: row.get::<_, Option<String>>(4)?.map(parsed).transpose()?,
        rate_kw: rate(row.get(5)?),
        soc_pct: row.get(6)?,
        fallback: row.get::<_, Option<String>>(7)?.map(parsed).transpose()?,
        active_message_id: row.get(8)?,
        outbox: row.get::<_, Option<i64>>(9)?.map(|n| n.max(0) as u64),
    })
}

/// A command's plan as stored, read without the rest of its row.
pub(super) struct StoredPlan {
    pub(super) device: String,
    pub(super) version: u32,
    pub(super) timezone: String,
    pub(super) plan: String,
}

impl StoredPlan {
    /// The device and its setpoints for `date` from the period that starts at or after `from`.
    pub(super) fn rest(
        self,
        date: Date,
        from: Timestamp,
    ) -> rusqlite::Result<(max300_protocol::DeviceId, Vec<max300_protocol::Setpoint>)> {
        let day = Day::named(date, &self.timezone).map_err(conversion)?;
        let setpoints = decode_plan(&self.plan).map_err(conversion)?;
        let schedule = Schedule::new(parsed(self.device)?, day, setpoints)
            .ok_or_else(|| conversion("stored plan does not match its date"))?;
        Ok((schedule.device_id().clone(), rest_of(&schedule, from)))
    }
}

pub(super) const DEVICE_COLUMNS: &str = "device_id, max_rate_w, registered_at, last_seen, mode, rate_w, \
                              soc_pct, fallback, active_message_id, outbox";

pub(super) fn summary_row(row: &rusqlite::Row) -> rusqlite::Result<CommandSummary> {
    Ok(CommandSummary {
        message_id: parsed(row.get(0)?)?,
        device_id: parsed(row.get(1)?)?,
        schedule_date: parsed(row.get(2)?)?,
        version: row.get(3)?,
        state: parsed(row.get(4)?)?,
        late: row.get(5)?,
    })
}

pub(super) const SUMMARY_COLUMNS: &str =
    "message_id, device_id, schedule_date, version, state, late";

/// What [`fleet_command_row`] reads: the summary, then what the fleet view's conformance
/// needs, and not the plan.
pub(super) const FLEET_COLUMNS: &str =
    "message_id, device_id, schedule_date, version, state, late, effective_period, marks, timezone";

/// A row selected as [`FLEET_COLUMNS`]; `days` keeps the day of each zone met, as every
/// command of a date shares it.
pub(super) fn fleet_command_row(
    r: &Row,
    days: &mut Vec<(String, Day)>,
) -> rusqlite::Result<FleetCommand> {
    let summary = summary_row(r)?;
    let zone: String = r.get(8)?;
    let day = match days.iter().find(|(z, _)| *z == zone) {
        Some((_, day)) => day.clone(),
        None => {
            let day = Day::named(summary.schedule_date, &zone).map_err(conversion)?;
            days.push((zone, day.clone()));
            day
        }
    };
    let periods = day.period_count();
    let marks = match r.get::<_, Option<String>>(7)? {
        Some(text) => Marks::parse(&text, periods).map_err(conversion)?,
        None => Marks::pending(periods),
    };
    Ok(FleetCommand {
        summary,
        effective_period: r.get(6)?,
        day,
        marks,
    })
}
