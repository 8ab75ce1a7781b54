//! The agent's SQLite store: held plans, one report per period, the outbox of acks and reports
//! awaiting a receipt, and the store's id and sequence. Every operation is one transaction, so
//! an ack or report is in the outbox exactly when the state it describes is on disk. The
//! current period's report is recorded when the period is run, but stays open (out of the
//! outbox, with no seq) until the period ends and what it delivered is known. A plan is
//! kept as the message it came in, so its `traceparent` (if any) is kept with it; plans stored
//! before trace contexts existed simply have none.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use max300_protocol::clock::monotonic;
use max300_protocol::error::Cause;
use max300_protocol::message::ScheduleMsg;
use max300_protocol::{Message, MessageId, StoreId};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::AgentError;
use crate::engine::CONTROL_KEEP;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS plans (
    message_id TEXT PRIMARY KEY,
    schedule_date TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    effective_period INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    body TEXT NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0,
    UNIQUE (schedule_date, version)
);
CREATE TABLE IF NOT EXISTS controls (
    message_id TEXT PRIMARY KEY,
    target_message_id TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    interval_start INTEGER NOT NULL UNIQUE,
    seq INTEGER NOT NULL,
    message_id TEXT,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    open INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    last_sent INTEGER
);
";

/// An ack or report ready to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    /// Its seq in this store.
    pub seq: u64,
    /// Where it goes.
    pub topic: String,
    /// The encoded message.
    pub payload: Vec<u8>,
}

/// A plan as stored.
#[derive(Clone, Debug)]
pub struct StoredPlan {
    /// The message it came in, as received.
    pub msg: ScheduleMsg,
    /// The first period it governs.
    pub effective_period: u32,
    /// Whether a control message cancelled it.
    pub cancelled: bool,
}

/// A control message as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredControl {
    /// The control message's id.
    pub control: MessageId,
    /// The plan it cancels; the device may not hold it (then the plan is refused if it comes).
    pub target: MessageId,
    /// When it was received (clock time).
    pub received: Timestamp,
}

/// Everything the engine needs back after a restart.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Every plan held, oldest version first.
    pub plans: Vec<StoredPlan>,
    /// Control messages handled, for repeats and as tombstones of plans not held.
    pub controls: Vec<StoredControl>,
    /// The start of the last period reported.
    pub last_done: Option<Timestamp>,
    /// The latest clock instant the agent acted at.
    pub last_instant: Option<Timestamp>,
}

/// The store. Calls block for one short transaction; async code runs them on the blocking pool.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    path: String,
    store_id: StoreId,
    /// `outbox.last_sent` is milliseconds of real time since this instant; it means nothing
    /// across restarts, so opening the store clears it and everything is sent again.
    opened: Instant,
}

/// An internal failure, mapped to [`AgentError::Store`] once at the boundary.
enum Fail {
    Sql(rusqlite::Error),
    /// Stored data that cannot be read back, or a call that breaks the store's rules.
    Data {
        what: String,
        cause: Option<Cause>,
    },
}

impl Fail {
    fn data(what: impl Into<String>) -> Fail {
        Fail::Data {
            what: what.into(),
            cause: None,
        }
    }

    fn unreadable(what: impl Into<String>, cause: impl Into<Cause>) -> Fail {
        Fail::Data {
            what: what.into(),
            cause: Some(cause.into()),
        }
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

impl Store {
    /// Opens (or creates) the store at `path`. `durable` chooses `synchronous=FULL` over `OFF`.
    pub fn open(path: &Path, durable: bool) -> Result<Store, AgentError> {
        let shown = path.display().to_string();
        let fail = |e: Fail| fail(&shown, e);
        let conn = Connection::open(path).map_err(|e| fail(e.into()))?;
        let sync = if durable { "FULL" } else { "OFF" };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000;"
        ))
        .map_err(|e| fail(e.into()))?;
        conn.execute_batch(SCHEMA).map_err(|e| fail(e.into()))?;
        migrate(&conn).map_err(|e| fail(e.into()))?;
        let store_id = (|| -> Result<StoreId, Fail> {
            let existing: Option<String> = conn
                .query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            match existing {
                Some(id) => StoreId::parse(id).map_err(|e| Fail::unreadable("store_id", e)),
                None => {
                    let id = StoreId::generate();
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('store_id', ?1), ('next_seq', 1)",
                        params![id.as_str()],
                    )?;
                    Ok(id)
                }
            }
        })()
        .map_err(fail)?;
        conn.execute("UPDATE outbox SET last_sent = NULL", [])
            .map_err(|e| fail(e.into()))?;
        Ok(Store {
            conn: Mutex::new(conn),
            path: shown,
            store_id,
            opened: monotonic(),
        })
    }

    /// This store's random id; seqs are unique within it.
    pub fn store_id(&self) -> &StoreId {
        &self.store_id
    }

    /// The store file, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, Fail>) -> Result<T, AgentError> {
        // A panic while holding the lock cannot leave a half-done transaction behind: SQLite
        // rolls back a transaction that was not committed.
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).map_err(|e| fail(&self.path, e))
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(
            monotonic()
                .saturating_duration_since(self.opened)
                .as_millis(),
        )
        .unwrap_or(i64::MAX)
    }

    /// Everything held, for the engine after a (re)start.
    pub fn load(&self) -> Result<Loaded, AgentError> {
        self.with(|conn| {
            let mut loaded = Loaded::default();
            let mut stmt = conn.prepare(
                "SELECT body, effective_period, cancelled FROM plans ORDER BY schedule_date, version",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?, r.get::<_, bool>(2)?))
            })?;
            for row in rows {
                let (body, effective_period, cancelled) = row?;
                let msg: ScheduleMsg =
                    serde_json::from_str(&body).map_err(|e| Fail::unreadable("plan", e))?;
                loaded.plans.push(StoredPlan {
                    msg,
                    effective_period,
                    cancelled,
                });
            }
            let mut stmt = conn.prepare(
                "SELECT message_id, target_message_id, received_at FROM controls ORDER BY received_at",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
            })?;
            for row in rows {
                let (control, target, received) = row?;
                let parse = |s: String| MessageId::parse(s).map_err(|e| Fail::unreadable("control", e));
                loaded.controls.push(StoredControl {
                    control: parse(control)?,
                    target: parse(target)?,
                    received: Timestamp::from_millisecond(received)
                        .map_err(|e| Fail::unreadable("control received_at", e))?,
                });
            }
            let last_done: Option<i64> =
                conn.query_row("SELECT MAX(interval_start) FROM reports", [], |r| r.get(0))?;
            loaded.last_done = last_done.and_then(|s| Timestamp::from_second(s).ok());
            let last_instant: Option<i64> = conn
                .query_row("SELECT value FROM meta WHERE key = 'last_instant'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            loaded.last_instant = last_instant.and_then(|ms| Timestamp::from_millisecond(ms).ok());
            Ok(loaded)
        })
    }

    /// Persists an accepted plan and its ack (stamped with the next seq) in one transaction.
    pub fn accept_plan(
        &self,
        msg: &ScheduleMsg,
        effective_period: u32,
        ack: Message,
        topic: String,
        now: Timestamp,
        sent: bool,
    ) -> Result<Outgoing, AgentError> {
        let body = serde_json::to_string(msg)
            .map_err(|e| fail(&self.path, Fail::unreadable("plan", e)))?;
        let last_sent = sent.then(|| self.now_ms());
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO plans (message_id, schedule_date, version, sha256, effective_period,
                                    received_at, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    msg.message_id.as_str(),
                    msg.schedule_date.to_string(),
                    msg.version,
                    msg.sha256,
                    effective_period,
                    now.as_millisecond(),
                    body
                ],
            )?;
            touch(&tx, now)?;
            let out = push(&tx, &self.store_id, ack, topic, last_sent)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Marks `target` cancelled (if held), remembers the control message, forgets those
    /// received more than [`CONTROL_KEEP`] before `now`, and queues the ack.
    pub fn cancel_plan(
        &self,
        control: &MessageId,
        target: &MessageId,
        ack: Message,
        topic: String,
        now: Timestamp,
        sent: bool,
    ) -> Result<Outgoing, AgentError> {
        let last_sent = sent.then(|| self.now_ms());
        let forget_before = now.checked_sub(CONTROL_KEEP).unwrap_or(Timestamp::MIN);
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE plans SET cancelled = 1 WHERE message_id = ?1",
                params![target.as_str()],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO controls (message_id, target_message_id, received_at)
                 VALUES (?1, ?2, ?3)",
                params![control.as_str(), target.as_str(), now.as_millisecond()],
            )?;
            // Pruned as new ones come, so the table holds at most a week of control messages.
            tx.execute(
                "DELETE FROM controls WHERE received_at < ?1",
                params![forget_before.as_millisecond()],
            )?;
            touch(&tx, now)?;
            let out = push(&tx, &self.store_id, ack, topic, last_sent)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Queues an ack that changes no state (a rejection, or a repeat).
    pub fn enqueue(
        &self,
        message: Message,
        topic: String,
        sent: bool,
    ) -> Result<Outgoing, AgentError> {
        let last_sent = sent.then(|| self.now_ms());
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = push(&tx, &self.store_id, message, topic, last_sent)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Records one period's report and queues it. `None` when the period was already
    /// reported: each period gets exactly one report.
    pub fn record_period(
        &self,
        report: Message,
        topic: String,
        now: Timestamp,
        sent: bool,
    ) -> Result<Option<Outgoing>, AgentError> {
        let Message::Report(r) = &report else {
            return Err(fail(&self.path, Fail::data("record_period takes a report")));
        };
        let (start, message_id, status) = (
            r.interval_start.as_second(),
            r.message_id.as_ref().map(|m| m.as_str().to_owned()),
            r.status.as_str(),
        );
        let last_sent = sent.then(|| self.now_ms());
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if reported(&tx, start)? {
                return Ok(None);
            }
            touch(&tx, now)?;
            let out = push(&tx, &self.store_id, report, topic, last_sent)?;
            tx.execute(
                "INSERT INTO reports (interval_start, seq, message_id, status, body)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    start,
                    out.seq as i64,
                    message_id,
                    status,
                    String::from_utf8_lossy(&out.payload)
                ],
            )?;
            tx.commit()?;
            Ok(Some(out))
        })
    }

    /// Records the current period's result and its report, left open: the report waits in
    /// the store (not the outbox) until [`Store::close_period`] fills in what the period
    /// delivered. `false` when the period was already reported: each period gets one report.
    pub fn open_period(&self, report: Message, now: Timestamp) -> Result<bool, AgentError> {
        let Message::Report(r) = &report else {
            return Err(fail(&self.path, Fail::data("open_period takes a report")));
        };
        let (start, message_id, status) = (
            r.interval_start.as_second(),
            r.message_id.as_ref().map(|m| m.as_str().to_owned()),
            r.status.as_str(),
        );
        let body = report.encode();
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if reported(&tx, start)? {
                return Ok(false);
            }
            touch(&tx, now)?;
            // seq 0 until it is closed: seqs are given in the order entries enter the outbox.
            tx.execute(
                "INSERT INTO reports (interval_start, seq, message_id, status, body, open)
                 VALUES (?1, 0, ?2, ?3, ?4, 1)",
                params![start, message_id, status, String::from_utf8_lossy(&body)],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Finalizes the open report of the period starting at `start` with `energy_kwh` and
    /// `at`, and queues it. `None` when that period has no open report.
    pub fn close_period(
        &self,
        start: Timestamp,
        energy_kwh: Option<f64>,
        at: Timestamp,
        topic: String,
        sent: bool,
    ) -> Result<Option<Outgoing>, AgentError> {
        let last_sent = sent.then(|| self.now_ms());
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = close(
                &tx,
                &self.store_id,
                start.as_second(),
                energy_kwh,
                at,
                topic,
                last_sent,
            )?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Finalizes every open report (left by a crash or a stop) with `energy_kwh` unknown, and
    /// queues them, oldest first.
    pub fn close_open_periods(
        &self,
        at: Timestamp,
        topic: String,
        sent: bool,
    ) -> Result<Vec<Outgoing>, AgentError> {
        let last_sent = sent.then(|| self.now_ms());
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let starts: Vec<i64> = {
                let mut stmt = tx.prepare(
                    "SELECT interval_start FROM reports WHERE open = 1 ORDER BY interval_start",
                )?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut outs = Vec::with_capacity(starts.len());
            for start in starts {
                outs.extend(close(
                    &tx,
                    &self.store_id,
                    start,
                    None,
                    at,
                    topic.clone(),
                    last_sent,
                )?);
            }
            tx.commit()?;
            Ok(outs)
        })
    }

    /// Drops the receipted seqs from the outbox, if the receipt is for this store. Returns how
    /// many entries went.
    pub fn receipt(&self, store_id: &StoreId, seqs: &[u64]) -> Result<usize, AgentError> {
        if store_id != &self.store_id {
            return Ok(0);
        }
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut removed = 0;
            {
                let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
                for seq in seqs {
                    removed += stmt.execute(params![*seq as i64])?;
                }
            }
            tx.commit()?;
            Ok(removed)
        })
    }

    /// Up to `limit` outbox entries, oldest first, not sent within `older_than` (real time).
    pub fn due_for_resend(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<Outgoing>, AgentError> {
        let cutoff = self.now_ms() - i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, topic, payload FROM outbox
                 WHERE last_sent IS NULL OR last_sent <= ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cutoff, limit as i64], |r| {
                Ok(Outgoing {
                    seq: r.get::<_, i64>(0)? as u64,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Notes that these entries were just published.
    pub fn mark_sent(&self, seqs: &[u64]) -> Result<(), AgentError> {
        let now = self.now_ms();
        self.with(|conn| {
            let tx = conn.transaction()?;
            {
                let mut stmt =
                    tx.prepare_cached("UPDATE outbox SET last_sent = ?1 WHERE seq = ?2")?;
                for seq in seqs {
                    stmt.execute(params![now, *seq as i64])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// How many acks and reports wait for a receipt.
    pub fn outbox_len(&self) -> Result<u64, AgentError> {
        self.with(|conn| {
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
            Ok(n as u64)
        })
    }
}

fn fail(path: &str, e: Fail) -> AgentError {
    let (what, cause) = match e {
        Fail::Sql(e) => ("sqlite".to_owned(), Some(Cause::from(e))),
        Fail::Data { what, cause } => (what, cause),
    };
    AgentError::Store {
        path: path.to_owned(),
        what,
        cause,
    }
}

/// Brings a store made by an earlier version up to this schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_open: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('reports') WHERE name = 'open')",
        [],
        |r| r.get(0),
    )?;
    if !has_open {
        // Every report of an earlier version went out when it was made: none is open.
        conn.execute(
            "ALTER TABLE reports ADD COLUMN open INTEGER NOT NULL DEFAULT 0",
            [],
        )?;
    }
    Ok(())
}

/// Whether the period starting at `start` (seconds) has its report, open or not.
fn reported(tx: &rusqlite::Transaction<'_>, start: i64) -> Result<bool, Fail> {
    Ok(tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM reports WHERE interval_start = ?1)",
        params![start],
        |r| r.get(0),
    )?)
}

/// Fills in an open report's `energy_kwh` and `at`, queues it, and marks it closed.
fn close(
    tx: &rusqlite::Transaction<'_>,
    store_id: &StoreId,
    start: i64,
    energy_kwh: Option<f64>,
    at: Timestamp,
    topic: String,
    last_sent: Option<i64>,
) -> Result<Option<Outgoing>, Fail> {
    let body: Option<String> = tx
        .query_row(
            "SELECT body FROM reports WHERE interval_start = ?1 AND open = 1",
            params![start],
            |r| r.get(0),
        )
        .optional()?;
    let Some(body) = body else {
        return Ok(None);
    };
    let mut report = match Message::decode(body.as_bytes()) {
        Ok(Message::Report(r)) => r,
        Ok(other) => {
            return Err(Fail::data(format!(
                "open report at {start} is a {:?}",
                other.channel()
            )));
        }
        Err(e) => return Err(Fail::unreadable(format!("open report at {start}"), e)),
    };
    report.energy_kwh = energy_kwh;
    report.at = at;
    touch(tx, at)?;
    let out = push(tx, store_id, Message::Report(report), topic, last_sent)?;
    tx.execute(
        "UPDATE reports SET seq = ?1, body = ?2, open = 0 WHERE interval_start = ?3",
        params![out.seq as i64, String::from_utf8_lossy(&out.payload), start],
    )?;
    Ok(Some(out))
}

/// Moves `last_instant` forward to `now` (never back): the clock_unsynced reference.
fn touch(tx: &rusqlite::Transaction<'_>, now: Timestamp) -> Result<(), Fail> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('last_instant', ?1)
         ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
        params![now.as_millisecond()],
    )?;
    Ok(())
}

/// Stamps `message` with this store's id and the next seq, and puts it in the outbox.
fn push(
    tx: &rusqlite::Transaction<'_>,
    store_id: &StoreId,
    mut message: Message,
    topic: String,
    last_sent: Option<i64>,
) -> Result<Outgoing, Fail> {
    let seq: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
        r.get(0)
    })?;
    let useq = seq as u64;
    match &mut message {
        Message::Ack(m) => {
            m.store_id = store_id.clone();
            m.seq = useq;
        }
        Message::Report(m) => {
            m.store_id = store_id.clone();
            m.seq = useq;
        }
        other => {
            return Err(Fail::data(format!(
                "only acks and reports go in the outbox, not {:?}",
                other.channel()
            )));
        }
    }
    let payload = message.encode();
    tx.execute(
        "INSERT INTO outbox (seq, topic, payload, last_sent) VALUES (?1, ?2, ?3, ?4)",
        params![seq, topic, payload, last_sent],
    )?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'next_seq'",
        params![seq + 1],
    )?;
    Ok(Outgoing {
        seq: useq,
        topic,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;
    use max300_protocol::message::{AckMsg, AckStatus, ReportMsg, ReportStatus, V1};
    use max300_protocol::{Day, DeviceId, Mode, RateKw, Schedule, Setpoint};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn device() -> DeviceId {
        DeviceId::parse("d1").unwrap()
    }

    fn plan_msg(version: u32) -> ScheduleMsg {
        let day = Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap();
        let sps = vec![Setpoint::new(Mode::Charge, RateKw::from_watts(5_000)).unwrap(); 48];
        let s = Schedule::new(device(), day, sps).unwrap();
        let at = ts("2026-11-29T16:00:00Z");
        ScheduleMsg::new(&s, MessageId::generate(at), version, at)
    }

    fn ack(msg: &ScheduleMsg) -> Message {
        Message::Ack(AckMsg {
            v: V1,
            store_id: StoreId::parse("unset").unwrap(),
            seq: 0,
            message_id: msg.message_id.clone(),
            device_id: device(),
            status: AckStatus::Accepted,
            reason: None,
            details: None,
            sha256: Some(msg.sha256.clone()),
            effective_period: Some(1),
            at: ts("2026-11-29T16:00:01Z"),
            traceparent: None,
        })
    }

    fn report(start: &str) -> Message {
        Message::Report(ReportMsg {
            v: V1,
            store_id: StoreId::parse("unset").unwrap(),
            seq: 0,
            message_id: None,
            device_id: device(),
            period: 1,
            interval_start: ts(start),
            mode: Mode::Idle,
            rate_kw: RateKw::ZERO,
            status: ReportStatus::Skipped,
            applied_kw: None,
            limited_by: None,
            reason: None,
            would_kw: None,
            soc_pct: None,
            energy_kwh: None,
            error: None,
            at: ts(start),
            traceparent: None,
        })
    }

    #[test]
    fn a_plan_and_its_ack_survive_a_reopen_with_the_same_store_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sqlite");
        let msg = plan_msg(1);
        let (id, out) = {
            let store = Store::open(&path, true).unwrap();
            let out = store
                .accept_plan(
                    &msg,
                    1,
                    ack(&msg),
                    "t/ack".into(),
                    ts("2026-11-29T16:00:01Z"),
                    true,
                )
                .unwrap();
            (store.store_id().clone(), out)
        };
        assert_eq!(out.seq, 1);
        let Message::Ack(sent) = Message::decode(&out.payload).unwrap() else {
            panic!()
        };
        assert_eq!((sent.store_id.clone(), sent.seq), (id.clone(), 1));

        let store = Store::open(&path, true).unwrap();
        assert_eq!(store.store_id(), &id);
        let loaded = store.load().unwrap();
        assert_eq!(loaded.plans.len(), 1);
        assert_eq!(loaded.plans[0].msg, msg);
        assert_eq!(loaded.last_instant, Some(ts("2026-11-29T16:00:01Z")));
        // Reopening forgets when things were sent, so the outbox goes out again at once.
        assert_eq!(
            store
                .due_for_resend(Duration::from_secs(3600), 100)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_plans_trace_context_is_kept_with_it_and_old_plans_have_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sqlite");
        let mut traced = plan_msg(1);
        traced.traceparent = max300_protocol::TraceParent::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .ok();
        let old = plan_msg(2);
        let now = ts("2026-11-29T16:00:01Z");
        {
            let store = Store::open(&path, true).unwrap();
            for msg in [&traced, &old] {
                store
                    .accept_plan(msg, 1, ack(msg), "t".into(), now, true)
                    .unwrap();
            }
            // A plan stored by a version that knew no trace context: no field in its body.
            let conn = store.conn.lock().unwrap();
            let body: String = conn
                .query_row(
                    "SELECT body FROM plans WHERE message_id = ?1",
                    [old.message_id.as_str()],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(!body.contains("traceparent"), "{body}");
        }
        let loaded = Store::open(&path, true).unwrap().load().unwrap();
        assert_eq!(loaded.plans[0].msg.traceparent, traced.traceparent);
        assert!(loaded.plans[0].msg.traceparent.is_some());
        assert_eq!(loaded.plans[1].msg.traceparent, None);
    }

    #[test]
    fn a_period_is_never_reported_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.sqlite"), false).unwrap();
        let now = ts("2026-11-30T00:00:01Z");
        let first = store.record_period(report("2026-11-30T00:00:00Z"), "t".into(), now, true);
        assert_eq!(first.unwrap().unwrap().seq, 1);
        let again = store.record_period(report("2026-11-30T00:00:00Z"), "t".into(), now, true);
        assert_eq!(again.unwrap(), None);
        assert_eq!(store.outbox_len().unwrap(), 1);
        assert_eq!(
            store.load().unwrap().last_done,
            Some(ts("2026-11-30T00:00:00Z"))
        );
    }

    fn decoded(out: &Outgoing) -> ReportMsg {
        match Message::decode(&out.payload).unwrap() {
            Message::Report(r) => r,
            other => panic!("not a report: {other:?}"),
        }
    }

    #[test]
    fn an_open_report_goes_out_only_when_closed_with_what_the_period_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.sqlite"), false).unwrap();
        let start = "2026-11-30T00:00:00Z";
        assert!(
            store
                .open_period(report(start), ts("2026-11-30T00:00:01Z"))
                .unwrap()
        );
        // The period counts as handled (never run twice), but nothing is sent yet.
        assert_eq!(store.load().unwrap().last_done, Some(ts(start)));
        assert_eq!(store.outbox_len().unwrap(), 0);
        assert!(
            !store
                .open_period(report(start), ts("2026-11-30T00:00:02Z"))
                .unwrap()
        );
        let again = store.record_period(report(start), "t".into(), ts(start), true);
        assert_eq!(again.unwrap(), None);

        let end = ts("2026-11-30T00:30:00Z");
        let out = store
            .close_period(ts(start), Some(12.5), end, "t/report".into(), true)
            .unwrap()
            .unwrap();
        assert_eq!((out.seq, out.topic.as_str()), (1, "t/report"));
        let r = decoded(&out);
        assert_eq!((r.energy_kwh, r.at, r.seq), (Some(12.5), end, 1));
        assert_eq!(r.store_id, *store.store_id());
        assert_eq!(store.outbox_len().unwrap(), 1);
        assert_eq!(store.load().unwrap().last_instant, Some(end));
        // Closed once: never again, and never reported twice.
        assert_eq!(
            store
                .close_period(ts(start), Some(1.0), end, "t".into(), true)
                .unwrap(),
            None
        );
        assert!(
            store
                .close_open_periods(end, "t".into(), true)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.outbox_len().unwrap(), 1);
    }

    #[test]
    fn an_open_report_left_by_a_crash_goes_out_at_start_up_with_unknown_energy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let start = "2026-11-30T00:00:00Z";
        {
            let store = Store::open(&path, true).unwrap();
            store
                .record_period(report("2026-11-29T23:30:00Z"), "t".into(), ts(start), true)
                .unwrap();
            let mut run = report(start);
            if let Message::Report(r) = &mut run {
                r.energy_kwh = Some(3.0);
            }
            assert!(store.open_period(run, ts("2026-11-30T00:00:01Z")).unwrap());
        }
        let store = Store::open(&path, true).unwrap();
        assert_eq!(store.load().unwrap().last_done, Some(ts(start)));
        let up = ts("2026-11-30T00:10:00Z");
        let closed = store.close_open_periods(up, "t".into(), false).unwrap();
        assert_eq!(closed.len(), 1);
        let r = decoded(&closed[0]);
        assert_eq!(
            (r.interval_start, r.energy_kwh, r.at),
            (ts(start), None, up)
        );
        assert_eq!(r.seq, 2);
        // Queued unsent, so the flush after connecting sends it; and only once.
        assert_eq!(
            store
                .due_for_resend(Duration::from_secs(60), 100)
                .unwrap()
                .len(),
            2
        );
        assert!(
            store
                .close_open_periods(up, "t".into(), false)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store
                .close_period(ts(start), None, up, "t".into(), false)
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_store_made_before_open_reports_existed_opens_and_keeps_its_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value);
                 INSERT INTO meta VALUES ('store_id', 'old-store'), ('next_seq', 8);
                 CREATE TABLE reports (interval_start INTEGER NOT NULL UNIQUE, seq INTEGER NOT NULL,
                     message_id TEXT, status TEXT NOT NULL, body TEXT NOT NULL);
                 INSERT INTO reports VALUES (1795995000, 7, NULL, 'skipped', '{}');",
            )
            .unwrap();
        }
        let store = Store::open(&path, true).unwrap();
        assert_eq!(store.store_id().as_str(), "old-store");
        assert_eq!(
            store.load().unwrap().last_done,
            Some(ts("2026-11-29T23:30:00Z"))
        );
        let now = ts("2026-11-30T00:00:01Z");
        assert!(
            store
                .close_open_periods(now, "t".into(), true)
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .open_period(report("2026-11-30T00:00:00Z"), now)
                .unwrap()
        );
        let out = store
            .close_period(ts("2026-11-30T00:00:00Z"), Some(1.0), now, "t".into(), true)
            .unwrap()
            .unwrap();
        assert_eq!(out.seq, 8);
    }

    #[test]
    fn a_receipt_clears_only_its_own_stores_seqs_and_seqs_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.sqlite"), false).unwrap();
        let now = ts("2026-11-30T00:00:01Z");
        store
            .record_period(report("2026-11-30T00:00:00Z"), "t".into(), now, true)
            .unwrap();
        store
            .record_period(report("2026-11-30T00:30:00Z"), "t".into(), now, true)
            .unwrap();
        let other = StoreId::parse("someone-else").unwrap();
        assert_eq!(store.receipt(&other, &[1, 2]).unwrap(), 0);
        assert_eq!(
            store
                .receipt(&store.store_id().clone(), &[1, 2, 99])
                .unwrap(),
            2
        );
        assert_eq!(store.outbox_len().unwrap(), 0);
        let next = store.record_period(report("2026-11-30T01:00:00Z"), "t".into(), now, true);
        assert_eq!(next.unwrap().unwrap().seq, 3);
    }

    #[test]
    fn unsent_entries_are_due_at_once_and_sent_ones_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.sqlite"), false).unwrap();
        let now = ts("2026-11-30T00:00:01Z");
        store
            .record_period(report("2026-11-30T00:00:00Z"), "t".into(), now, false)
            .unwrap();
        store
            .record_period(report("2026-11-30T00:30:00Z"), "t".into(), now, true)
            .unwrap();
        let due = store.due_for_resend(Duration::from_secs(10), 100).unwrap();
        assert_eq!(due.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![1]);
        store.mark_sent(&[1]).unwrap();
        assert!(
            store
                .due_for_resend(Duration::from_secs(10), 100)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.due_for_resend(Duration::ZERO, 1).unwrap().len(), 1);
    }

    #[test]
    fn a_cancel_is_remembered_with_its_control_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let store = Store::open(&path, true).unwrap();
        let msg = plan_msg(1);
        let now = ts("2026-11-29T16:00:01Z");
        store
            .accept_plan(&msg, 1, ack(&msg), "t".into(), now, true)
            .unwrap();
        let control = MessageId::parse("ctl").unwrap();
        store
            .cancel_plan(&control, &msg.message_id, ack(&msg), "t".into(), now, true)
            .unwrap();
        let loaded = Store::open(&path, true).unwrap().load().unwrap();
        assert!(loaded.plans[0].cancelled);
        assert_eq!(
            loaded.controls,
            vec![StoredControl {
                control,
                target: msg.message_id.clone(),
                received: now
            }]
        );
    }

    #[test]
    fn a_cancel_for_a_plan_not_held_survives_a_reopen_and_is_dropped_after_a_week() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let msg = plan_msg(1);
        let first = ts("2026-11-29T16:00:01Z");
        {
            let store = Store::open(&path, true).unwrap();
            let control = MessageId::parse("ctl-1").unwrap();
            store
                .cancel_plan(
                    &control,
                    &msg.message_id,
                    ack(&msg),
                    "t".into(),
                    first,
                    true,
                )
                .unwrap();
        }
        let store = Store::open(&path, true).unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.plans.is_empty());
        assert_eq!(
            loaded.controls,
            vec![StoredControl {
                control: MessageId::parse("ctl-1").unwrap(),
                target: msg.message_id.clone(),
                received: first
            }]
        );
        // A week and a minute later another cancel comes: the old one goes.
        let later = first + SignedDuration::from_hours(7 * 24) + SignedDuration::from_mins(1);
        let other = MessageId::parse("plan-2").unwrap();
        store
            .cancel_plan(
                &MessageId::parse("ctl-2").unwrap(),
                &other,
                ack(&msg),
                "t".into(),
                later,
                true,
            )
            .unwrap();
        let controls = store.load().unwrap().controls;
        assert_eq!(
            controls
                .iter()
                .map(|c| c.control.as_str())
                .collect::<Vec<_>>(),
            vec!["ctl-2"]
        );
    }

    #[test]
    fn a_store_in_a_missing_directory_fails_with_its_path() {
        let err = Store::open(Path::new("/nonexistent/dir/agent.sqlite"), true).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/dir/agent.sqlite"),
            "{err}"
        );
    }
}
