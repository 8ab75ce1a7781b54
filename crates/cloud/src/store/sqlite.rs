//! The SQLite command store: one file, WAL, `synchronous=FULL`. Every method is one
//! transaction, run on the blocking pool so the async tasks never wait on disk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jiff::Timestamp;
use jiff::civil::Date;
use max300_protocol::day::period_start_at;
use max300_protocol::message::{
    AckMsg, AckStatus, ControlAction, ControlMsg, HeartbeatMsg, ReportMsg, ScheduleMsg, V1,
};
use max300_protocol::{Day, DeviceId, MessageId, Mode, RateKw, Schedule, Setpoint, TraceParent};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{
    Cancel, CommandDetail, CommandStore, CommandSummary, CurrentCommand, DeviceRecord, FleetRow,
    HistoryEntry, IngestionCounts, Insert, Interrupted, NewCommand, PeriodView, Recorded, Swept,
    Unacked,
};
use crate::{CloudError, CommandState, PeriodStatus};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    max_rate_w INTEGER,
    registered_at TEXT NOT NULL,
    last_seen TEXT,
    mode TEXT,
    rate_w INTEGER,
    soc_pct REAL,
    fallback TEXT,
    active_message_id TEXT,
    outbox INTEGER
);
CREATE TABLE IF NOT EXISTS commands (
    message_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    schedule_date TEXT NOT NULL,
    timezone TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    late INTEGER NOT NULL DEFAULT 0,
    governs_from TEXT NOT NULL,
    ends_at TEXT NOT NULL,
    effective_period INTEGER,
    acked_sha256 TEXT,
    created_at TEXT NOT NULL,
    publishes INTEGER NOT NULL DEFAULT 0,
    last_sent_at TEXT,
    plan TEXT NOT NULL DEFAULT '',
    UNIQUE (device_id, schedule_date, version)
);
CREATE INDEX IF NOT EXISTS commands_by_state ON commands (state);
CREATE TABLE IF NOT EXISTS history (
    message_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_command ON history (message_id);
CREATE TABLE IF NOT EXISTS sends (
    message_id TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_by_command ON sends (message_id);
CREATE TABLE IF NOT EXISTS warnings (
    message_id TEXT PRIMARY KEY,
    warning TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commands_by_date ON commands (schedule_date, device_id);
CREATE TABLE IF NOT EXISTS results (
    message_id TEXT NOT NULL,
    period INTEGER NOT NULL,
    status TEXT NOT NULL,
    applied_w INTEGER,
    limited_by TEXT,
    reason TEXT,
    error TEXT,
    soc_pct REAL,
    at TEXT,
    PRIMARY KEY (message_id, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS acks (
    message_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    body TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    device_id TEXT NOT NULL,
    interval_start TEXT NOT NULL,
    message_id TEXT,
    body TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (device_id, interval_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ingestions (
    id INTEGER PRIMARY KEY,
    schedule_date TEXT NOT NULL,
    source TEXT NOT NULL,
    audit_key TEXT NOT NULL,
    started_at TEXT NOT NULL,
    accepted INTEGER,
    unchanged INTEGER,
    rejected INTEGER,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS controls (
    message_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    target_message_id TEXT NOT NULL,
    action TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    publishes INTEGER NOT NULL DEFAULT 0,
    last_sent_at TEXT
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until TEXT NOT NULL
);
"#;

/// The SQLite implementation of [`CommandStore`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, CloudError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CloudError::Store(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path)
            .map_err(|e| CloudError::Store(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|_| conn.pragma_update(None, "synchronous", "FULL"))
            .and_then(|_| conn.busy_timeout(std::time::Duration::from_secs(5)))
            .map(|_| conn.set_prepared_statement_cache_capacity(64))
            .and_then(|_| conn.execute_batch(SCHEMA))
            .and_then(|_| add_missing_columns(&mut conn))
            .map_err(|e| CloudError::Store(format!("{}: {e}", path.display())))?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Opens the store without waiting for the disk on each commit (`synchronous=OFF`), for
    /// benchmarks and simulations that fill a store fast. A crash of the machine may lose
    /// the last transactions: never for a store that devices rely on.
    pub fn open_unsynced(path: &Path) -> Result<SqliteStore, CloudError> {
        let store = SqliteStore::open(path)?;
        store
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pragma_update(None, "synchronous", "OFF")
            .map_err(|e| CloudError::Store(format!("{}: {e}", path.display())))?;
        Ok(store)
    }

    async fn run<T, F>(&self, f: F) -> Result<T, CloudError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| CloudError::Store(format!("store task failed: {e}")))?
        .map_err(|e| CloudError::Store(e.to_string()))
    }
}

/// Columns added after the first release: a store file made by an older version gets them
/// on open, empty; and a store that kept one row per planned period (`periods`) moves the
/// plan into `commands.plan` and keeps only the periods that have a result.
fn add_missing_columns(conn: &mut Connection) -> rusqlite::Result<()> {
    let old_periods: bool = conn
        .prepare_cached(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'periods'",
        )?
        .query_row([], |r| r.get(0))?;
    if old_periods {
        let tx = conn.transaction()?;
        let has_plan: bool = tx
            .prepare_cached(
                "SELECT count(*) > 0 FROM pragma_table_info('commands') WHERE name = 'plan'",
            )?
            .query_row([], |r| r.get(0))?;
        if !has_plan {
            tx.prepare_cached("ALTER TABLE commands ADD COLUMN plan TEXT NOT NULL DEFAULT ''")?
                .execute([])?;
        }
        tx.execute_batch(
            "UPDATE commands SET plan = coalesce((
                 SELECT group_concat(CASE mode WHEN 'charge' THEN rate_w
                                               WHEN 'discharge' THEN -rate_w ELSE 0 END,
                                     ',' ORDER BY period)
                 FROM periods WHERE periods.message_id = commands.message_id), '');
             INSERT OR IGNORE INTO results
                 SELECT message_id, period, status, applied_w, limited_by, reason, error,
                        soc_pct, at
                 FROM periods WHERE status != 'pending';
             DROP TABLE periods;",
        )?;
        tx.commit()?;
    }
    let has_traceparent: bool = conn
        .prepare_cached(
            "SELECT count(*) > 0 FROM pragma_table_info('commands') WHERE name = 'traceparent'",
        )?
        .query_row([], |r| r.get(0))?;
    if !has_traceparent {
        match conn
            .prepare_cached("ALTER TABLE commands ADD COLUMN traceparent TEXT")?
            .execute([])
        {
            // Another process opening the same file added it first.
            Err(e) if e.to_string().contains("duplicate column") => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

fn conversion(e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

/// Instants are stored as fixed-width UTC text (millisecond precision), so that comparing
/// the text compares the instants.
pub(super) fn text(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn ts(text: String) -> rusqlite::Result<Timestamp> {
    text.parse().map_err(conversion)
}

fn opt_ts(text: Option<String>) -> rusqlite::Result<Option<Timestamp>> {
    text.map(ts).transpose()
}

fn parsed<T: std::str::FromStr>(text: String) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(conversion)
}

fn rate(watts: Option<i64>) -> Option<RateKw> {
    watts
        .and_then(|w| u32::try_from(w).ok())
        .map(RateKw::from_watts)
}

/// A plan as stored in `commands.plan`: each period's signed watts (charge positive),
/// comma-separated, so a command is one row however many periods it has.
pub(super) fn encode_plan(setpoints: &[Setpoint]) -> String {
    let mut out = String::with_capacity(setpoints.len() * 7);
    for (i, sp) in setpoints.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let w = i64::from(sp.rate().watts());
        let signed = match sp.mode() {
            Mode::Charge => w,
            Mode::Discharge => -w,
            Mode::Idle => 0,
        };
        out.push_str(&signed.to_string());
    }
    out
}

pub(super) fn decode_plan(plan: &str) -> rusqlite::Result<Vec<Setpoint>> {
    if plan.is_empty() {
        return Ok(Vec::new());
    }
    plan.split(',')
        .map(|w| {
            let w: i64 = w.parse().map_err(conversion)?;
            let mode = match w.signum() {
                1 => Mode::Charge,
                -1 => Mode::Discharge,
                _ => Mode::Idle,
            };
            let watts = u32::try_from(w.unsigned_abs()).map_err(conversion)?;
            Setpoint::new(mode, RateKw::from_watts(watts)).map_err(conversion)
        })
        .collect()
}

/// How many periods a stored plan has, without decoding it.
pub(super) fn plan_len(plan: &str) -> u32 {
    if plan.is_empty() {
        0
    } else {
        u32::try_from(plan.bytes().filter(|b| *b == b',').count() + 1).unwrap_or(u32::MAX)
    }
}

fn command_day(date: &str, tz: &str) -> rusqlite::Result<Day> {
    Day::named(parsed(date.to_owned())?, tz).map_err(conversion)
}

/// The days of the commands one query reads, built once per zone.
#[derive(Default)]
struct Days(HashMap<(String, String), Day>);

impl Days {
    fn get(&mut self, date: &str, tz: &str) -> rusqlite::Result<&Day> {
        let key = (date.to_owned(), tz.to_owned());
        if !self.0.contains_key(&key) {
            let day = command_day(date, tz)?;
            self.0.insert(key.clone(), day);
        }
        self.0
            .get(&key)
            .ok_or_else(|| conversion("day cache lost an entry"))
    }
}

/// Marks every period of `id` in `periods` that has no result yet.
fn mark_unresulted(
    tx: &Transaction,
    id: &str,
    periods: std::ops::RangeInclusive<u32>,
    status: &str,
    reason: Option<&str>,
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO results (message_id, period, status, reason) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for period in periods {
        insert.execute(params![id, period, status, reason])?;
    }
    Ok(())
}

fn set_state(
    tx: &Transaction,
    id: &str,
    state: CommandState,
    at: Timestamp,
) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE commands SET state = ?2 WHERE message_id = ?1")?
        .execute(params![id, state.as_str()])?;
    tx.prepare_cached("INSERT INTO history (message_id, state, at) VALUES (?1, ?2, ?3)")?
        .execute(params![id, state.as_str(), text(at)])?;
    Ok(())
}

/// Applies one ack inside `tx` (the caller commits): see [`CommandStore::record_ack`].
fn apply_ack(tx: &Transaction, ack: &AckMsg, at: Timestamp) -> rusqlite::Result<Recorded> {
    let id = ack.message_id.as_str();
    let device = ack.device_id.as_str();
    let owner: Option<String> = tx
        .query_row(
            "SELECT device_id FROM commands WHERE message_id = ?1
             UNION ALL SELECT device_id FROM controls WHERE message_id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    if owner.as_deref().is_some_and(|o| o != device) {
        // Another device's command: never let it take the owner's ack slot.
        return Ok(Recorded::UnknownCommand);
    }
    let body = serde_json::to_string(&ack).map_err(conversion)?;
    let fresh = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO acks (message_id, device_id, body, received_at)
         VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![id, device, body, text(at)])?;
    touch_device(tx, device, at)?;
    if fresh == 0 {
        return Ok(Recorded::Duplicate);
    }
    let row: Option<(String, String, u32, String)> = tx
        .query_row(
            "SELECT state, schedule_date, version, governs_from FROM commands
             WHERE message_id = ?1 AND device_id = ?2",
            params![id, device],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((state, date, version, governs_from)) = row else {
        let control = tx
            .prepare_cached(
                "UPDATE controls SET state = ?3 WHERE message_id = ?1 AND device_id = ?2",
            )?
            .execute(params![
                id,
                device,
                match ack.status {
                    AckStatus::Accepted => "acknowledged",
                    AckStatus::Rejected => "rejected",
                }
            ])?;
        return Ok(if control > 0 {
            Recorded::Applied
        } else {
            Recorded::UnknownCommand
        });
    };
    let state: CommandState = parsed(state)?;
    if let Some(next) = state.after_ack(ack.status) {
        set_state(tx, id, next, at)?;
    }
    if ack.status == AckStatus::Accepted {
        // Judged by when the device acked (never later than we heard), so a cloud
        // outage does not flag an on-time ack.
        let late = ack.at.min(at) > ts(governs_from)?;
        tx.prepare_cached(
            "UPDATE commands SET effective_period = ?2, acked_sha256 = ?3,
                    late = late OR ?4
             WHERE message_id = ?1",
        )?
        .execute(params![id, ack.effective_period, ack.sha256, late])?;
        let effective = ack.effective_period.unwrap_or(1);
        // Periods before the effective one never ran under this command: an older
        // version (if any) governed them.
        let reason = (version > 1).then_some("superseded");
        mark_unresulted(tx, id, 1..=effective.saturating_sub(1), "skipped", reason)?;
        let older: Vec<(String, String, String)> = tx
            .prepare(
                "SELECT message_id, state, plan FROM commands
                 WHERE device_id = ?1 AND schedule_date = ?2 AND version < ?3",
            )?
            .query_map(params![device, date, version], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (old, old_state, old_plan) in older {
            mark_unresulted(
                tx,
                &old,
                effective..=plan_len(&old_plan),
                "skipped",
                Some("superseded"),
            )?;
            let old_state: CommandState = parsed(old_state)?;
            if !matches!(
                old_state,
                CommandState::Superseded | CommandState::Cancelled | CommandState::Rejected
            ) {
                set_state(tx, &old, CommandState::Superseded, at)?;
            }
        }
        // Reports may have come before the ack: marking the early periods can leave
        // nothing pending.
        complete_if_done(tx, id, at)?;
    }
    Ok(Recorded::Applied)
}

/// Moves a command to `completed` once no period is left pending.
fn complete_if_done(tx: &Transaction, id: &str, at: Timestamp) -> rusqlite::Result<()> {
    let (state, plan, done): (String, String, u32) = tx
        .prepare_cached(
            "SELECT state, plan, (SELECT count(*) FROM results
                              WHERE message_id = ?1 AND status NOT IN ('pending', 'unreported'))
         FROM commands WHERE message_id = ?1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let state: CommandState = parsed(state)?;
    if done >= plan_len(&plan)
        && let Some(CommandState::Completed) = state.after_report(true)
    {
        set_state(tx, id, CommandState::Completed, at)?;
    }
    Ok(())
}

fn touch_device(tx: &Transaction, device: &str, at: Timestamp) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE devices SET last_seen = ?2 WHERE device_id = ?1 AND (last_seen IS NULL OR last_seen < ?2)")?.execute(params![device, text(at)],
    )?;
    Ok(())
}

fn device_row(row: &rusqlite::Row) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        device_id: parsed(row.get(0)?)?,
        max_rate_kw: rate(row.get(1)?),
        registered_at: ts(row.get(2)?)?,
        last_seen: opt_ts(row.get(3)?)?,
        mode: row.get(4)?,
        rate_kw: rate(row.get(5)?),
        soc_pct: row.get(6)?,
        fallback: row.get(7)?,
        active_message_id: row.get(8)?,
        outbox: row.get::<_, Option<i64>>(9)?.map(|n| n.max(0) as u64),
    })
}

const DEVICE_COLUMNS: &str = "device_id, max_rate_w, registered_at, last_seen, mode, rate_w, \
                              soc_pct, fallback, active_message_id, outbox";

fn summary_row(row: &rusqlite::Row) -> rusqlite::Result<CommandSummary> {
    Ok(CommandSummary {
        message_id: parsed(row.get(0)?)?,
        device_id: parsed(row.get(1)?)?,
        schedule_date: parsed(row.get(2)?)?,
        version: row.get(3)?,
        state: parsed(row.get(4)?)?,
        late: row.get(5)?,
    })
}

const SUMMARY_COLUMNS: &str = "message_id, device_id, schedule_date, version, state, late";

#[async_trait]
impl CommandStore for SqliteStore {
    async fn register_device(
        &self,
        device: &DeviceId,
        max_rate: Option<RateKw>,
        at: Timestamp,
    ) -> Result<(), CloudError> {
        let device = device.to_string();
        self.run(move |c| {
            c.prepare_cached(
                "INSERT INTO devices (device_id, max_rate_w, registered_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device_id) DO UPDATE SET max_rate_w = coalesce(?2, max_rate_w)",
            )?
            .execute(params![device, max_rate.map(|r| r.watts()), text(at)])?;
            Ok(())
        })
        .await
    }

    async fn register_devices(
        &self,
        devices: &[DeviceId],
        at: Timestamp,
    ) -> Result<(), CloudError> {
        let devices = devices.to_vec();
        self.run(move |c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO devices (device_id, registered_at) VALUES (?1, ?2)
                     ON CONFLICT (device_id) DO NOTHING",
                )?;
                for d in &devices {
                    insert.execute(params![d.as_str(), text(at)])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, CloudError> {
        self.run(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY device_id"
            ))?;
            stmt.query_map([], device_row)?.collect()
        })
        .await
    }

    async fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, CloudError> {
        let device = device.to_string();
        self.run(move |c| {
            c.query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?1"),
                [device],
                device_row,
            )
            .optional()
        })
        .await
    }

    async fn record_heartbeat(&self, hb: &HeartbeatMsg, at: Timestamp) -> Result<(), CloudError> {
        let hb = hb.clone();
        self.run(move |c| {
            c.prepare_cached(
                "UPDATE devices SET last_seen = ?2, mode = ?3, rate_w = ?4, soc_pct = ?5,
                        fallback = ?6, active_message_id = ?7, outbox = ?8
                 WHERE device_id = ?1",
            )?
            .execute(params![
                hb.device_id.as_str(),
                text(at),
                hb.mode.as_str(),
                hb.rate_kw.watts(),
                hb.soc_pct,
                hb.fallback.map(|f| f.as_str()),
                hb.active_message_id.as_ref().map(|m| m.as_str()),
                i64::try_from(hb.outbox).unwrap_or(i64::MAX),
            ])?;
            Ok(())
        })
        .await
    }

    async fn insert_commands(
        &self,
        commands: &[NewCommand],
        at: Timestamp,
    ) -> Result<Vec<Insert>, CloudError> {
        let commands = commands.to_vec();
        self.run(move |c| {
            let tx = c.transaction()?;
            let mut out = Vec::with_capacity(commands.len());
            for cmd in &commands {
                let s = &cmd.schedule;
                let device = s.device_id().as_str();
                let date = s.day().date().to_string();
                let sha = s.sha256();
                let latest: Option<(String, u32, String)> = tx
                    .query_row(
                        "SELECT message_id, version, sha256 FROM commands
                         WHERE device_id = ?1 AND schedule_date = ?2
                         ORDER BY version DESC LIMIT 1",
                        params![device, date],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                let version = match latest {
                    Some((id, version, old_sha)) if old_sha == sha => {
                        out.push(Insert::Unchanged {
                            message_id: parsed(id)?,
                            version,
                        });
                        continue;
                    }
                    Some((_, version, _)) => version + 1,
                    None => 1,
                };
                // It governs from the first period that starts after it was created.
                let next_boundary = period_start_at(at, s.day().tz())
                    .map_err(conversion)?
                    .checked_add(jiff::SignedDuration::from_secs(
                        max300_protocol::PERIOD_SECS,
                    ))
                    .map_err(conversion)?;
                let governs_from = s.day().start().max(next_boundary);
                let id = cmd.message_id.as_str();
                tx.prepare_cached(
                    "INSERT INTO commands (message_id, device_id, schedule_date, timezone, version,
                                           sha256, state, governs_from, ends_at, created_at,
                                           traceparent, plan)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'created', ?7, ?8, ?9, ?10, ?11)",
                )?
                .execute(params![
                    id,
                    device,
                    date,
                    s.day().tz_name(),
                    version,
                    sha,
                    text(governs_from),
                    text(s.day().end()),
                    text(at),
                    cmd.traceparent.as_ref().map(|t| t.as_str()),
                    encode_plan(s.setpoints())
                ])?;
                tx.prepare_cached(
                    "INSERT INTO history (message_id, state, at) VALUES (?1, 'created', ?2)",
                )?
                .execute(params![id, text(at)])?;
                out.push(Insert::Created {
                    message_id: cmd.message_id.clone(),
                    version,
                });
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn schedule_message(&self, id: &MessageId) -> Result<Option<ScheduleMsg>, CloudError> {
        let id = id.clone();
        self.run(move |c| {
            type Row = (String, String, String, u32, String, Option<String>, String);
            let row: Option<Row> = c
                .query_row(
                    "SELECT device_id, schedule_date, timezone, version, created_at, traceparent,
                            plan
                     FROM commands WHERE message_id = ?1",
                    [id.as_str()],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ))
                    },
                )
                .optional()?;
            let Some((device, date, tz, version, created, traceparent, plan)) = row else {
                return Ok(None);
            };
            let day = command_day(&date, &tz)?;
            let setpoints = decode_plan(&plan)?;
            let schedule = Schedule::new(parsed(device)?, day, setpoints)
                .ok_or_else(|| conversion("stored periods do not match the date"))?;
            let mut msg = ScheduleMsg::new(&schedule, id, version, ts(created)?);
            msg.traceparent = traceparent.and_then(|t| TraceParent::parse(&t).ok());
            Ok(Some(msg))
        })
        .await
    }

    async fn command_traceparent(&self, id: &MessageId) -> Result<Option<TraceParent>, CloudError> {
        let id = id.clone();
        self.run(move |c| {
            let text: Option<Option<String>> = c
                .query_row(
                    "SELECT traceparent FROM commands WHERE message_id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(text.flatten().and_then(|t| TraceParent::parse(&t).ok()))
        })
        .await
    }

    async fn mark_sent(&self, ids: &[MessageId], at: Timestamp) -> Result<(), CloudError> {
        let ids = ids.to_vec();
        self.run(move |c| {
            let tx = c.transaction()?;
            for id in &ids {
                tx.prepare_cached("UPDATE commands SET publishes = publishes + 1, last_sent_at = ?2
                     WHERE message_id = ?1")?.execute(params![id.as_str(), text(at)],
                )?;
                tx.prepare_cached("INSERT INTO sends (message_id, at) VALUES (?1, ?2)")?.execute(params![id.as_str(), text(at)],
                )?;
                tx.prepare_cached("UPDATE controls SET publishes = publishes + 1, last_sent_at = ?2,
                            state = CASE state WHEN 'created' THEN 'sent' ELSE state END
                     WHERE message_id = ?1")?.execute(params![id.as_str(), text(at)],
                )?;
                let moved = tx.prepare_cached("UPDATE commands SET state = 'sent' WHERE message_id = ?1 AND state = 'created'")?.execute([id.as_str()],
                )?;
                if moved > 0 {
                    tx.prepare_cached("INSERT INTO history (message_id, state, at) VALUES (?1, 'sent', ?2)")?.execute(params![id.as_str(), text(at)],
                    )?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn record_ack(&self, ack: &AckMsg, at: Timestamp) -> Result<Recorded, CloudError> {
        let ack = ack.clone();
        self.run(move |c| {
            let tx = c.transaction()?;
            let recorded = apply_ack(&tx, &ack, at)?;
            tx.commit()?;
            Ok(recorded)
        })
        .await
    }

    async fn record_acks(
        &self,
        acks: &[AckMsg],
        at: Timestamp,
    ) -> Result<Vec<Recorded>, CloudError> {
        let acks = acks.to_vec();
        self.run(move |c| {
            // One commit (one fsync) for the batch: at a fleet's evening, acks arrive by the
            // thousand a second.
            let tx = c.transaction()?;
            let recorded = acks
                .iter()
                .map(|ack| apply_ack(&tx, ack, at))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(recorded)
        })
        .await
    }

    async fn record_report(
        &self,
        report: &ReportMsg,
        at: Timestamp,
    ) -> Result<Recorded, CloudError> {
        let report = report.clone();
        self.run(move |c| {
            let tx = c.transaction()?;
            let device = report.device_id.as_str();
            let start = text(report.interval_start);
            let body = serde_json::to_string(&report).map_err(conversion)?;
            let fresh = tx.prepare_cached("INSERT OR IGNORE INTO reports (device_id, interval_start, message_id, body, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![
                    device,
                    start,
                    report.message_id.as_ref().map(|m| m.as_str()),
                    body,
                    text(at)
                ],
            )?;
            touch_device(&tx, device, at)?;
            if fresh == 0 {
                tx.commit()?;
                return Ok(Recorded::Duplicate);
            }
            let Some(id) = report.message_id.as_ref().map(|m| m.as_str()) else {
                tx.commit()?;
                return Ok(Recorded::Applied);
            };
            let command: Option<(String, String, String)> = tx
                .query_row(
                    "SELECT state, schedule_date, timezone FROM commands
                     WHERE message_id = ?1 AND device_id = ?2",
                    params![id, device],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((state, date, tz)) = command else {
                tx.commit()?;
                return Ok(Recorded::UnknownCommand);
            };
            let status = PeriodStatus::from(report.status);
            // The period is the one of the command's day that starts then; a report for an
            // instant off its grid is kept (in `reports`) but moves no period.
            let day = command_day(&date, &tz)?;
            let period = day
                .boundary(report.interval_start)
                .ok()
                .filter(|b| *b < day.period_count())
                .map(|b| b + 1);
            tx.prepare_cached("INSERT INTO results (message_id, period, status, applied_w, limited_by, reason,
                                      error, soc_pct, at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 WHERE ?2 IS NOT NULL
                 ON CONFLICT (message_id, period) DO UPDATE SET
                     status = excluded.status, applied_w = excluded.applied_w,
                     limited_by = excluded.limited_by, reason = excluded.reason,
                     error = excluded.error, soc_pct = excluded.soc_pct, at = excluded.at")?.execute(params![
                    id,
                    period,
                    status.as_str(),
                    report.applied_kw.map(|r| r.watts()),
                    report
                        .limited_by
                        .map(|l| serde_json::to_value(l).ok().and_then(|v| v.as_str().map(str::to_owned))),
                    report
                        .reason
                        .map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_owned))),
                    report.error,
                    report.soc_pct,
                    text(report.at)
                ],
            )?;
            let state: CommandState = parsed(state)?;
            if let Some(next) = state.after_report(false) {
                // A report implies the ack.
                set_state(&tx, id, next, at)?;
            }
            complete_if_done(&tx, id, at)?;
            tx.commit()?;
            Ok(Recorded::Applied)
        })
        .await
    }

    async fn reports(
        &self,
        device: &DeviceId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<ReportMsg>, CloudError> {
        let device = device.to_string();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT body FROM reports
                 WHERE device_id = ?1 AND interval_start >= ?2 AND interval_start < ?3
                 ORDER BY interval_start",
            )?;
            stmt.query_map(params![device, text(from), text(to)], |r| {
                let body: String = r.get(0)?;
                serde_json::from_str(&body).map_err(conversion)
            })?
            .collect()
        })
        .await
    }

    async fn command(&self, id: &MessageId) -> Result<Option<CommandDetail>, CloudError> {
        let id = id.clone();
        self.run(move |c| {
            let head = c
                .query_row(
                    &format!(
                        "SELECT {SUMMARY_COLUMNS}, sha256, acked_sha256, effective_period, publishes,
                                timezone, plan
                         FROM commands WHERE message_id = ?1"
                    ),
                    [id.as_str()],
                    |r| {
                        Ok((
                            summary_row(r)?,
                            r.get::<_, String>(6)?,
                            r.get::<_, Option<String>>(7)?,
                            r.get::<_, Option<u32>>(8)?,
                            r.get::<_, u32>(9)?,
                            r.get::<_, String>(10)?,
                            r.get::<_, String>(11)?,
                        ))
                    },
                )
                .optional()?;
            let Some((summary, sha256, acked_sha256, effective_period, publishes, tz, plan)) = head
            else {
                return Ok(None);
            };
            let day = Day::new(summary.schedule_date, max300_protocol::day::time_zone(&tz).map_err(conversion)?)
                .map_err(conversion)?;
            let history = c
                .prepare_cached(
                    "SELECT state, at FROM history WHERE message_id = ?1 ORDER BY rowid",
                )?
                .query_map([id.as_str()], |r| {
                    Ok(HistoryEntry {
                        state: parsed(r.get(0)?)?,
                        at: ts(r.get(1)?)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let sends = c
                .prepare_cached("SELECT at FROM sends WHERE message_id = ?1 ORDER BY rowid")?
                .query_map([id.as_str()], |r| ts(r.get(0)?))?
                .collect::<rusqlite::Result<_>>()?;
            let warning = c
                .prepare_cached("SELECT warning FROM warnings WHERE message_id = ?1")?
                .query_row([id.as_str()], |r| r.get(0))
                .optional()?;
            // Every planned period, with its result where there is one.
            let mut periods: Vec<PeriodView> = decode_plan(&plan)?
                .into_iter()
                .zip(1..)
                .map(|(sp, period)| PeriodView {
                    period,
                    start: day.period_start(period),
                    mode: sp.mode().as_str().to_owned(),
                    rate_kw: sp.rate(),
                    status: PeriodStatus::Pending,
                    applied_kw: None,
                    limited_by: None,
                    reason: None,
                    error: None,
                    soc_pct: None,
                    at: None,
                })
                .collect();
            let mut results = c.prepare_cached(
                "SELECT period, status, applied_w, limited_by, reason, error, soc_pct, at
                 FROM results WHERE message_id = ?1",
            )?;
            let mut rows = results.query([id.as_str()])?;
            while let Some(r) = rows.next()? {
                let period: u32 = r.get(0)?;
                if let Some(view) = periods.get_mut(period.saturating_sub(1) as usize) {
                    view.status = parsed(r.get(1)?)?;
                    view.applied_kw = rate(r.get(2)?);
                    view.limited_by = r.get(3)?;
                    view.reason = r.get(4)?;
                    view.error = r.get(5)?;
                    view.soc_pct = r.get(6)?;
                    view.at = opt_ts(r.get(7)?)?;
                }
            }
            Ok(Some(CommandDetail {
                summary,
                sha256,
                acked_sha256,
                effective_period,
                publishes,
                history,
                sends,
                warning,
                periods,
            }))
        })
        .await
    }

    async fn commands(
        &self,
        device: Option<&DeviceId>,
        date: Option<Date>,
    ) -> Result<Vec<CommandSummary>, CloudError> {
        let device = device.map(|d| d.to_string());
        let date = date.map(|d| d.to_string());
        self.run(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM commands
                 WHERE (?1 IS NULL OR device_id = ?1) AND (?2 IS NULL OR schedule_date = ?2)
                 ORDER BY schedule_date DESC, device_id, version DESC"
            ))?;
            stmt.query_map(params![device, date], summary_row)?
                .collect()
        })
        .await
    }

    async fn planned_from(
        &self,
        date: Date,
        from: Timestamp,
    ) -> Result<Vec<(DeviceId, Setpoint)>, CloudError> {
        let date = date.to_string();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.device_id, c.timezone, c.plan
                 FROM commands AS c
                 WHERE c.schedule_date = ?1
                   AND c.state NOT IN ('rejected', 'cancelled', 'superseded')
                   AND c.version = (SELECT max(version) FROM commands
                                    WHERE device_id = c.device_id AND schedule_date = c.schedule_date
                                      AND state NOT IN ('rejected', 'cancelled', 'superseded'))
                 ORDER BY c.device_id",
            )?;
            let mut rows = stmt.query([&date])?;
            let mut days = Days::default();
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let device: DeviceId = parsed(r.get(0)?)?;
                let day = days.get(&date, &r.get::<_, String>(1)?)?;
                for (sp, period) in decode_plan(&r.get::<_, String>(2)?)?.into_iter().zip(1..) {
                    if day.period_start(period) >= from {
                        out.push((device.clone(), sp));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_warnings(&self, warnings: &[(MessageId, String)]) -> Result<(), CloudError> {
        let warnings = warnings.to_vec();
        self.run(move |c| {
            let tx = c.transaction()?;
            for (id, warning) in &warnings {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO warnings (message_id, warning) VALUES (?1, ?2)",
                )?
                .execute(params![id.as_str(), warning])?;
            }
            tx.commit()
        })
        .await
    }

    async fn command_counts(&self) -> Result<Vec<(CommandState, u32)>, CloudError> {
        self.run(|c| {
            c.prepare_cached("SELECT state, count(*) FROM commands GROUP BY state")?
                .query_map([], |r| Ok((parsed(r.get(0)?)?, r.get(1)?)))?
                .collect()
        })
        .await
    }

    async fn fleet(
        &self,
        today: Date,
        tomorrow: Date,
        ended_by: Timestamp,
    ) -> Result<Vec<FleetRow>, CloudError> {
        let (today, tomorrow) = (today.to_string(), tomorrow.to_string());
        self.run(move |c| {
            let mut rows: Vec<FleetRow> = c
                .prepare_cached(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY device_id"
                ))?
                .query_map([], |r| {
                    Ok(FleetRow {
                        device: device_row(r)?,
                        today: None,
                        tomorrow: None,
                        due: 0,
                        as_planned: 0,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let index: HashMap<String, usize> = rows
                .iter()
                .enumerate()
                .map(|(i, r)| (r.device.device_id.to_string(), i))
                .collect();
            let mut latest = c.prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM commands AS c
                 WHERE schedule_date IN (?1, ?2)
                   AND version = (SELECT max(version) FROM commands
                                  WHERE device_id = c.device_id AND schedule_date = c.schedule_date)"
            ))?;
            for summary in latest.query_map(params![today, tomorrow], summary_row)? {
                let summary = summary?;
                if let Some(&i) = index.get(summary.device_id.as_str()) {
                    if summary.schedule_date.to_string() == today {
                        rows[i].today = Some(summary);
                    } else {
                        rows[i].tomorrow = Some(summary);
                    }
                }
            }
            // Periods due: from the effective one to the last that started by `ended_by`;
            // as planned: those executed at exactly the planned rate.
            let mut counts = c.prepare_cached(
                "SELECT c.device_id, c.timezone, c.plan, coalesce(c.effective_period, 1),
                        (SELECT group_concat(r.period || ':' || r.applied_w)
                         FROM results AS r
                         WHERE r.message_id = c.message_id AND r.status = 'executed')
                 FROM commands AS c
                 WHERE c.schedule_date = ?1
                   AND c.version = (SELECT max(version) FROM commands
                                    WHERE device_id = c.device_id AND schedule_date = c.schedule_date)",
            )?;
            let mut tallies = counts.query([&today])?;
            let mut days = Days::default();
            while let Some(r) = tallies.next()? {
                let device: String = r.get(0)?;
                let Some(&i) = index.get(&device) else {
                    continue;
                };
                let day = days.get(&today, &r.get::<_, String>(1)?)?;
                let plan = decode_plan(&r.get::<_, String>(2)?)?;
                let effective: u32 = r.get(3)?;
                let counted = |p: u32| p >= effective && day.period_start(p) <= ended_by;
                rows[i].due = (1..=plan.len() as u32).filter(|p| counted(*p)).count() as u32;
                let executed: Option<String> = r.get(4)?;
                rows[i].as_planned = executed
                    .iter()
                    .flat_map(|e| e.split(','))
                    .filter_map(|e| {
                        let (p, w) = e.split_once(':')?;
                        Some((p.parse::<u32>().ok()?, w.parse::<u32>().ok()?))
                    })
                    .filter(|(p, w)| {
                        counted(*p)
                            && plan
                                .get(*p as usize - 1)
                                .is_some_and(|sp| sp.rate().watts() == *w)
                    })
                    .count() as u32;
            }
            Ok(rows)
        })
        .await
    }

    async fn current_commands(
        &self,
        device: &DeviceId,
        from: Date,
    ) -> Result<Vec<CurrentCommand>, CloudError> {
        let device = device.to_string();
        let from = from.to_string();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT message_id, schedule_date, version, sha256 FROM commands AS c
                 WHERE device_id = ?1 AND schedule_date >= ?2
                   AND state NOT IN ('rejected', 'cancelled', 'superseded')
                   AND version = (SELECT max(version) FROM commands
                                  WHERE device_id = c.device_id AND schedule_date = c.schedule_date
                                    AND state NOT IN ('rejected', 'cancelled', 'superseded'))
                 ORDER BY schedule_date",
            )?;
            stmt.query_map(params![device, from], |r| {
                Ok(CurrentCommand {
                    message_id: parsed(r.get(0)?)?,
                    schedule_date: parsed(r.get(1)?)?,
                    version: r.get(2)?,
                    sha256: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn unsent(&self) -> Result<Vec<MessageId>, CloudError> {
        self.run(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT message_id FROM commands WHERE state = 'created'
                 UNION ALL SELECT message_id FROM controls WHERE state = 'created'
                 ORDER BY message_id",
            )?;
            stmt.query_map([], |r| parsed(r.get(0)?))?.collect()
        })
        .await
    }

    async fn begin_ingestion(
        &self,
        date: Date,
        source: &str,
        audit_key: &str,
        at: Timestamp,
    ) -> Result<i64, CloudError> {
        let (source, audit_key) = (source.to_owned(), audit_key.to_owned());
        self.run(move |c| {
            c.prepare_cached(
                "INSERT INTO ingestions (schedule_date, source, audit_key, started_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![date.to_string(), source, audit_key, text(at)])?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn finish_ingestion(
        &self,
        id: i64,
        counts: IngestionCounts,
        at: Timestamp,
    ) -> Result<(), CloudError> {
        self.run(move |c| {
            c.prepare_cached("UPDATE ingestions SET accepted = ?2, unchanged = ?3, rejected = ?4, finished_at = ?5
                 WHERE id = ?1")?.execute(params![id, counts.accepted, counts.unchanged, counts.rejected, text(at)],
            )?;
            Ok(())
        })
        .await
    }

    async fn interrupted_ingestions(&self) -> Result<Vec<Interrupted>, CloudError> {
        self.run(|c| {
            let mut stmt = c.prepare(
                "SELECT id, schedule_date, source, audit_key FROM ingestions
                 WHERE finished_at IS NULL ORDER BY id",
            )?;
            stmt.query_map([], |r| {
                Ok(Interrupted {
                    id: r.get(0)?,
                    schedule_date: parsed(r.get(1)?)?,
                    source: r.get(2)?,
                    audit_key: r.get(3)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn ingested(&self, date: Date) -> Result<bool, CloudError> {
        let date = date.to_string();
        self.run(move |c| {
            c.prepare_cached(
                "SELECT count(*) > 0 FROM ingestions
                 WHERE schedule_date = ?1 AND source = 'fetch' AND finished_at IS NOT NULL",
            )?
            .query_row([date], |r| r.get(0))
        })
        .await
    }

    async fn awaiting_ack(&self, now: Timestamp) -> Result<Vec<Unacked>, CloudError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT message_id, device_id, publishes, last_sent_at FROM commands AS c
                 WHERE state = 'sent' AND ends_at > ?1 AND last_sent_at IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM commands AS n
                                   WHERE n.device_id = c.device_id
                                     AND n.schedule_date = c.schedule_date
                                     AND n.version > c.version)
                 UNION ALL
                 SELECT k.message_id, k.device_id, k.publishes, k.last_sent_at
                 FROM controls AS k JOIN commands AS t ON t.message_id = k.target_message_id
                 WHERE k.state = 'sent' AND t.ends_at > ?1 AND k.last_sent_at IS NOT NULL",
            )?;
            stmt.query_map([text(now)], |r| {
                Ok(Unacked {
                    message_id: parsed(r.get(0)?)?,
                    device_id: parsed(r.get(1)?)?,
                    publishes: r.get(2)?,
                    last_sent_at: ts(r.get(3)?)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn sweep(&self, now: Timestamp) -> Result<Vec<Swept>, CloudError> {
        self.run(move |c| {
            let tx = c.transaction()?;
            let now_text = text(now);
            let mut out = Vec::new();
            let select = |tx: &Transaction,
                          sql: &str,
                          at: &str|
             -> rusqlite::Result<Vec<(String, String)>> {
                tx.prepare(sql)?
                    .query_map([at], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            };
            // Not acknowledged when the first period it governs starts.
            for (id, device) in select(
                &tx,
                "SELECT message_id, device_id FROM commands
                 WHERE late = 0 AND state IN ('created', 'sent', 'expired') AND governs_from <= ?1",
                &now_text,
            )? {
                tx.prepare_cached("UPDATE commands SET late = 1 WHERE message_id = ?1")?
                    .execute([&id])?;
                out.push((id, device, None));
            }
            // No ack by the end of its last period.
            for (id, device) in select(
                &tx,
                "SELECT message_id, device_id FROM commands
                 WHERE state IN ('created', 'sent') AND ends_at <= ?1",
                &now_text,
            )? {
                set_state(&tx, &id, CommandState::Expired, now)?;
                out.push((id, device, Some(CommandState::Expired)));
            }
            // Periods still unreported an hour after the end.
            let hour_ago = text(now - jiff::SignedDuration::from_hours(1));
            for (id, device) in select(
                &tx,
                "SELECT message_id, device_id FROM commands
                 WHERE state = 'acknowledged' AND ends_at <= ?1",
                &hour_ago,
            )? {
                let plan: String = tx
                    .prepare_cached("SELECT plan FROM commands WHERE message_id = ?1")?
                    .query_row([&id], |r| r.get(0))?;
                mark_unresulted(&tx, &id, 1..=plan_len(&plan), "unreported", None)?;
                set_state(&tx, &id, CommandState::Incomplete, now)?;
                out.push((id, device, Some(CommandState::Incomplete)));
            }
            tx.commit()?;
            out.into_iter()
                .map(|(id, device, state)| {
                    Ok(Swept {
                        message_id: parsed(id)?,
                        device_id: parsed(device)?,
                        state,
                    })
                })
                .collect()
        })
        .await
    }

    async fn cancel(
        &self,
        id: &MessageId,
        control_id: MessageId,
        at: Timestamp,
    ) -> Result<Cancel, CloudError> {
        let id = id.clone();
        self.run(move |c| {
            let tx = c.transaction()?;
            let row: Option<(String, String)> = tx
                .query_row(
                    "SELECT device_id, state FROM commands WHERE message_id = ?1",
                    [id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((device, state)) = row else {
                return Ok(Cancel::NotFound);
            };
            let state: CommandState = parsed(state)?;
            if state.is_terminal() {
                return Ok(Cancel::AlreadyEnded(state));
            }
            set_state(&tx, id.as_str(), CommandState::Cancelled, at)?;
            tx.prepare_cached("INSERT INTO controls (message_id, device_id, target_message_id, action, state, created_at)
                 VALUES (?1, ?2, ?3, 'cancel', 'created', ?4)")?.execute(params![control_id.as_str(), device, id.as_str(), text(at)],
            )?;
            tx.commit()?;
            Ok(Cancel::Cancelled(ControlMsg {
                v: V1,
                message_id: control_id,
                device_id: parsed(device)?,
                action: ControlAction::Cancel,
                target_message_id: id,
                issued_at: at,
                traceparent: None,
            }))
        })
        .await
    }

    async fn control_message(&self, id: &MessageId) -> Result<Option<ControlMsg>, CloudError> {
        let id = id.clone();
        self.run(move |c| {
            c.prepare_cached("SELECT device_id, target_message_id, created_at FROM controls WHERE message_id = ?1")?.query_row([id.as_str()],
                |r| {
                    Ok(ControlMsg {
                        v: V1,
                        message_id: id.clone(),
                        device_id: parsed(r.get(0)?)?,
                        action: ControlAction::Cancel,
                        target_message_id: parsed(r.get(1)?)?,
                        issued_at: ts(r.get(2)?)?,
                        traceparent: None,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn lease(
        &self,
        name: &str,
        owner: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<bool, CloudError> {
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.run(move |c| {
            // Instants are stored as fixed-width UTC text, so they compare as text.
            let changed = c
                .prepare_cached(
                    "INSERT INTO leases (name, owner, until) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until
                     WHERE leases.owner = excluded.owner OR leases.until <= ?4",
                )?
                .execute(params![name, owner, text(until), text(now)])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn release(&self, name: &str, owner: &str) -> Result<(), CloudError> {
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.run(move |c| {
            c.prepare_cached("DELETE FROM leases WHERE name = ?1 AND owner = ?2")?
                .execute(params![name, owner])?;
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> Result<(), CloudError> {
        self.run(|c| c.prepare_cached("SELECT 1")?.query_row([], |_| Ok(())))
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The two tables as a store made before plans moved into `commands.plan`.
    const OLD: &str = "
        CREATE TABLE commands (
            message_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, schedule_date TEXT NOT NULL,
            timezone TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL,
            state TEXT NOT NULL, late INTEGER NOT NULL DEFAULT 0, governs_from TEXT NOT NULL,
            ends_at TEXT NOT NULL, effective_period INTEGER, acked_sha256 TEXT,
            created_at TEXT NOT NULL, publishes INTEGER NOT NULL DEFAULT 0, last_sent_at TEXT,
            UNIQUE (device_id, schedule_date, version));
        CREATE TABLE periods (
            message_id TEXT NOT NULL, period INTEGER NOT NULL, start TEXT NOT NULL,
            mode TEXT NOT NULL, rate_w INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
            applied_w INTEGER, limited_by TEXT, reason TEXT, error TEXT, soc_pct REAL, at TEXT,
            PRIMARY KEY (message_id, period)) WITHOUT ROWID;";

    #[tokio::test]
    async fn a_store_with_one_row_per_planned_period_moves_its_plans_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.sqlite");
        let id = MessageId::generate("2026-11-29T16:00:00Z".parse().unwrap());
        let day = Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(OLD).unwrap();
            conn.execute(
                "INSERT INTO commands (message_id, device_id, schedule_date, timezone, version,
                                       sha256, state, governs_from, ends_at, created_at)
                 VALUES (?1, 'd1', '2026-11-30', 'Europe/London', 1, 'x', 'acknowledged',
                         '2026-11-30T00:00:00.000Z', '2026-12-01T00:00:00.000Z',
                         '2026-11-29T16:00:00.000Z')",
                [id.as_str()],
            )
            .unwrap();
            for p in 1..=day.period_count() {
                let (mode, status) = match p {
                    1 => ("charge", "executed"),
                    2 => ("discharge", "failed"),
                    _ => ("idle", "pending"),
                };
                let rate = if mode == "idle" { 0 } else { 40_000 };
                conn.execute("INSERT INTO periods (message_id, period, start, mode, rate_w, status, applied_w)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)", params![
                        id.as_str(),
                        p,
                        text(day.period_start(p)),
                        mode,
                        rate,
                        status,
                        (status != "pending").then_some(rate)
                    ],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        let detail = store.command(&id).await.unwrap().unwrap();
        assert_eq!(detail.periods.len(), 48);
        let p = &detail.periods;
        assert_eq!(
            (p[0].mode.as_str(), p[0].status, p[0].applied_kw),
            (
                "charge",
                PeriodStatus::Executed,
                Some(RateKw::from_watts(40_000))
            )
        );
        assert_eq!(
            (p[1].mode.as_str(), p[1].rate_kw, p[1].status),
            (
                "discharge",
                RateKw::from_watts(40_000),
                PeriodStatus::Failed
            )
        );
        assert_eq!(
            (p[2].mode.as_str(), p[2].status),
            ("idle", PeriodStatus::Pending)
        );
        assert_eq!(p[47].start, day.period_start(48));
        let msg = store.schedule_message(&id).await.unwrap().unwrap();
        assert_eq!(msg.to_schedule().unwrap().setpoints().len(), 48);
        // Opening it again finds nothing left to move.
        drop(store);
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.command(&id).await.unwrap().unwrap(), detail);
    }

    #[test]
    fn a_plan_round_trips_through_its_text() {
        let sps = vec![
            Setpoint::new(Mode::Charge, RateKw::from_watts(150_000)).unwrap(),
            Setpoint::IDLE,
            Setpoint::new(Mode::Discharge, RateKw::from_watts(1)).unwrap(),
        ];
        let text = encode_plan(&sps);
        assert_eq!(text, "150000,0,-1");
        assert_eq!(decode_plan(&text).unwrap(), sps);
        assert_eq!(plan_len(&text), 3);
        assert_eq!(plan_len(""), 0);
        assert!(decode_plan("12,x").is_err());
    }
}
