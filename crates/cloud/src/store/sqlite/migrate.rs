//! Bringing a store file made by an older version up to date, on open: columns added since,
//! plans moved from one row per period into the plan text, and period results into the marks.

use rusqlite::{Connection, Transaction, params};

use super::rows::{COMMAND_COLUMNS, CONTROL_COLUMNS, command_row, control_row};
use crate::lifecycle::{Command, Control, Mark};
use crate::store::text::instant;

/// The store's layout as this version leaves it, kept in SQLite's `user_version`; a store
/// made before it was kept has 0. A change to the layout adds its step to
/// `bring_up_to_date` and raises it.
const VERSION: i32 = 1;

/// Columns added since the first release, then the moves: one row per planned period
/// (`periods`) into the plan text and result rows (`results`), and result rows into the
/// period marks. Each is safe to run again (a crash part-way, or two processes opening an
/// old file at once), but they read whole tables, so they run only on a store not yet
/// marked with [`VERSION`], and mark it after.
pub(super) fn run(conn: &mut Connection) -> rusqlite::Result<()> {
    let at: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if at >= VERSION {
        return Ok(());
    }
    bring_up_to_date(conn)?;
    conn.pragma_update(None, "user_version", VERSION)
}

fn bring_up_to_date(conn: &mut Connection) -> rusqlite::Result<()> {
    for (table, column, decl) in [
        ("commands", "plan", "TEXT NOT NULL DEFAULT ''"),
        ("commands", "traceparent", "TEXT"),
        ("commands", "marks", "TEXT"),
        ("commands", "attempts", "INTEGER NOT NULL DEFAULT 0"),
        ("commands", "retry_at", "TEXT"),
        ("commands", "wake_at", "TEXT"),
        ("commands", "rev", "INTEGER NOT NULL DEFAULT 0"),
        ("controls", "ends_at", "TEXT"),
        ("controls", "attempts", "INTEGER NOT NULL DEFAULT 0"),
        ("controls", "retry_at", "TEXT"),
        ("controls", "wake_at", "TEXT"),
        ("controls", "rev", "INTEGER NOT NULL DEFAULT 0"),
        ("ingestions", "error", "TEXT"),
        ("leases", "token", "INTEGER NOT NULL DEFAULT 0"),
    ] {
        add_column(conn, table, column, decl)?;
    }
    if has_table(conn, "periods")? {
        let tx = conn.transaction()?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS results (
                 message_id TEXT NOT NULL, period INTEGER NOT NULL, status TEXT NOT NULL,
                 applied_w INTEGER, limited_by TEXT, reason TEXT, error TEXT, soc_pct REAL,
                 at TEXT, PRIMARY KEY (message_id, period)) WITHOUT ROWID;
             UPDATE commands SET plan = coalesce((
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
    reports_by_interval(conn)?;
    marks_from_results(conn)?;
    controls_wake(conn)
}

/// Reports were keyed device first, so a boundary's reports went into as many places in the
/// table as there are units, each a page to read and write; keyed by their interval first
/// they are appended together, and a smaller index finds a device's.
fn reports_by_interval(conn: &mut Connection) -> rusqlite::Result<()> {
    let sql: String = conn
        .prepare_cached("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'reports'")?
        .query_row([], |r| r.get(0))?;
    let sql: String = sql.chars().filter(|c| !c.is_whitespace()).collect();
    if !sql.contains("PRIMARYKEY(device_id,interval_start)") {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute_batch(
        "CREATE TABLE reports_new (
             device_id TEXT NOT NULL, interval_start TEXT NOT NULL, message_id TEXT,
             body TEXT NOT NULL, received_at TEXT NOT NULL,
             PRIMARY KEY (interval_start, device_id)) WITHOUT ROWID;
         INSERT INTO reports_new (device_id, interval_start, message_id, body, received_at)
             SELECT device_id, interval_start, message_id, body, received_at FROM reports;
         DROP TABLE reports;
         ALTER TABLE reports_new RENAME TO reports;",
    )?;
    tx.commit()
}

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
    )?
    .query_row([name], |r| r.get(0))
}

fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> rusqlite::Result<()> {
    let has: bool = conn
        .prepare(&format!(
            "SELECT count(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"
        ))?
        .query_row([column], |r| r.get(0))?;
    if has {
        return Ok(());
    }
    match conn.execute(
        &format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"),
        [],
    ) {
        // Another process opening the same file added it first.
        Err(e) if e.to_string().contains("duplicate column") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Commands without marks (made before marks existed) get them from their result rows,
/// and a wake time from the lifecycle; then the result rows go.
fn marks_from_results(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let results = has_table(&tx, "results")?;
    let old: Vec<Command> = tx
        .prepare(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE marks IS NULL"
        ))?
        .query_map([], command_row)?
        .collect::<rusqlite::Result<_>>()?;
    for mut c in old {
        if results {
            let rows: Vec<(u32, String, Option<i64>, Option<String>)> = tx
                .prepare_cached(
                    "SELECT period, status, applied_w, reason FROM results
                     WHERE message_id = ?1",
                )?
                .query_map([c.message_id.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            for (period, status, applied_w, reason) in rows {
                let planned = c
                    .schedule
                    .setpoint(period)
                    .map(|sp| i64::from(sp.rate().watts()));
                let reported = |status| Mark::Reported {
                    status,
                    as_planned: false,
                };
                use max300_protocol::message::ReportStatus;
                let mark = match (status.as_str(), reason.as_deref()) {
                    ("executed", _) => Mark::Reported {
                        status: ReportStatus::Executed,
                        as_planned: applied_w.is_some() && applied_w == planned,
                    },
                    ("failed", _) => reported(ReportStatus::Failed),
                    ("unreported", _) => Mark::Unreported,
                    // Marked by the cloud, not reported: no report is kept for them.
                    ("skipped", Some("superseded")) if !has_report(&tx, &c, period)? => {
                        Mark::Superseded
                    }
                    ("skipped", None) if !has_report(&tx, &c, period)? => Mark::NotGoverned,
                    ("skipped", _) => reported(ReportStatus::Skipped),
                    _ => Mark::Pending,
                };
                c.marks.set(period, mark);
            }
        }
        // Waiting commands go out again at once, with the backoff their publishes earned.
        c.attempts = c.publishes;
        c.retry_at = c
            .state
            .awaits_ack()
            .then_some(c.last_sent_at.unwrap_or(c.created_at));
        tx.prepare_cached(
            "UPDATE commands SET marks = ?2, attempts = ?3, retry_at = ?4, wake_at = ?5
             WHERE message_id = ?1",
        )?
        .execute(params![
            c.message_id.as_str(),
            c.marks.to_string(),
            c.attempts,
            c.retry_at.map(instant),
            c.wake_at().map(instant)
        ])?;
    }
    if results {
        tx.execute_batch("DROP TABLE results")?;
    }
    tx.commit()
}

fn has_report(tx: &Transaction, c: &Command, period: u32) -> rusqlite::Result<bool> {
    tx.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM reports
                        WHERE device_id = ?1 AND interval_start = ?2 AND message_id = ?3)",
    )?
    .query_row(
        params![
            c.device_id().as_str(),
            instant(c.schedule.day().period_start(period)),
            c.message_id.as_str()
        ],
        |r| r.get(0),
    )
}

/// Controls made before they had a wake time get their target's date end, and a retry
/// at once if they still wait for an ack.
fn controls_wake(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch(
        "UPDATE controls SET
             ends_at = (SELECT ends_at FROM commands WHERE message_id = target_message_id),
             attempts = publishes
         WHERE ends_at IS NULL",
    )?;
    let old: Vec<Control> = tx
        .prepare(&format!(
            "SELECT {CONTROL_COLUMNS} FROM controls
             WHERE wake_at IS NULL AND retry_at IS NULL AND ends_at IS NOT NULL"
        ))?
        .query_map([], control_row)?
        .collect::<rusqlite::Result<_>>()?;
    for mut c in old {
        c.retry_at = c
            .state
            .awaits_ack()
            .then_some(c.last_sent_at.unwrap_or(c.created_at));
        tx.prepare_cached("UPDATE controls SET retry_at = ?2, wake_at = ?3 WHERE message_id = ?1")?
            .execute(params![
                c.message_id.as_str(),
                c.retry_at.map(instant),
                c.wake_at().map(instant)
            ])?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::CommandStore;
    use crate::lifecycle::Subject;
    use crate::store::{Due, SqliteStore};
    use jiff::Timestamp;
    use max300_protocol::{Day, MessageId, RateKw};

    /// The two tables as a store made before plans moved into `commands.plan`, with the
    /// report bodies such a store also kept.
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
            PRIMARY KEY (message_id, period)) WITHOUT ROWID;
        CREATE TABLE reports (
            device_id TEXT NOT NULL, interval_start TEXT NOT NULL, message_id TEXT,
            body TEXT NOT NULL, received_at TEXT NOT NULL,
            PRIMARY KEY (device_id, interval_start)) WITHOUT ROWID;";

    fn report_body(id: &MessageId, day: &Day, period: u32, status: &str, kw: u32) -> String {
        serde_json::json!({"type":"report","v":1,"store_id":"s1","seq":period,
            "message_id":id.as_str(),"device_id":"d1","period":period,
            "interval_start":day.period_start(period),"mode":"charge","rate_kw":kw,
            "status":status,"applied_kw":kw,"at":day.period_start(period)})
        .to_string()
    }

    /// Reports kept device first are kept interval first on open, every one of them still
    /// found by its device and counted by its period.
    #[tokio::test]
    async fn an_older_store_keeps_its_reports_by_interval_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.sqlite");
        let day = Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap();
        let id = MessageId::generate("2026-11-29T16:00:00Z".parse().unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE reports (
                     device_id TEXT NOT NULL, interval_start TEXT NOT NULL, message_id TEXT,
                     body TEXT NOT NULL, received_at TEXT NOT NULL,
                     PRIMARY KEY (device_id, interval_start)) WITHOUT ROWID;
                 CREATE INDEX reports_by_start ON reports (interval_start);",
            )
            .unwrap();
            for p in 1..=3 {
                conn.execute(
                    "INSERT INTO reports VALUES ('d1', ?1, ?2, ?3, '2026-11-30T02:00:00.000Z')",
                    params![
                        instant(day.period_start(p)),
                        id.as_str(),
                        report_body(&id, &day, p, "executed", 40)
                    ],
                )
                .unwrap();
            }
        }
        let (from, to) = (day.start(), day.end());
        for _ in 0..2 {
            let store = SqliteStore::open(&path).unwrap();
            let kept = store
                .reports(&"d1".parse().unwrap(), from, to)
                .await
                .unwrap();
            let periods: Vec<u32> = kept.iter().map(|r| r.period).collect();
            assert_eq!(periods, [1, 2, 3]);
            let counts = store.report_counts(from, to).await.unwrap();
            assert_eq!(counts.len(), 3);
            assert!(counts.iter().all(|(_, n)| *n == 1), "{counts:?}");
            let sql: String = Connection::open(&path)
                .unwrap()
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'reports'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(
                sql.contains("PRIMARY KEY (interval_start, device_id)"),
                "{sql}"
            );
        }
    }

    #[tokio::test]
    async fn an_older_store_moves_its_plans_and_results_into_marks_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.sqlite");
        let eve: Timestamp = "2026-11-29T16:00:00Z".parse().unwrap();
        let (acked, sent) = (MessageId::generate(eve), MessageId::generate(eve));
        let day = Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap();
        // Both plans: charge 40 kW in periods 1 and 2, idle after; kept with their sha256.
        let charge = max300_protocol::Setpoint::new(
            max300_protocol::Mode::Charge,
            RateKw::from_watts(40_000),
        )
        .unwrap();
        let mut setpoints = vec![max300_protocol::Setpoint::IDLE; 48];
        setpoints[..2].fill(charge);
        let sha = max300_protocol::Schedule::new("d1".parse().unwrap(), day.clone(), setpoints)
            .unwrap()
            .sha256();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(OLD).unwrap();
            for (id, device, state) in [(&acked, "d1", "acknowledged"), (&sent, "d2", "sent")] {
                conn.execute(
                    "INSERT INTO commands (message_id, device_id, schedule_date, timezone, version,
                                           sha256, state, governs_from, ends_at, created_at,
                                           publishes, last_sent_at)
                     VALUES (?1, ?2, '2026-11-30', 'Europe/London', 1, ?4, ?3,
                             '2026-11-30T00:00:00.000Z', '2026-12-01T00:00:00.000Z',
                             '2026-11-29T16:00:00.000Z', 2, '2026-11-29T16:01:00.000Z')",
                    params![id.as_str(), device, state, sha],
                )
                .unwrap();
                for p in 1..=day.period_count() {
                    let (mode, status) = match (id == &acked, p) {
                        (true, 1) => ("charge", "executed"),
                        (true, 2) => ("charge", "failed"),
                        (true, 3) => ("idle", "skipped"),
                        (_, 1 | 2) => ("charge", "pending"),
                        _ => ("idle", "pending"),
                    };
                    let rate = if mode == "idle" { 0 } else { 40_000 };
                    conn.execute(
                        "INSERT INTO periods (message_id, period, start, mode, rate_w, status,
                                              applied_w)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![
                            id.as_str(),
                            p,
                            instant(day.period_start(p)),
                            mode,
                            rate,
                            status,
                            (status != "pending").then_some(rate)
                        ],
                    )
                    .unwrap();
                }
            }
            for (p, status, kw) in [(1, "executed", 40), (2, "failed", 40)] {
                conn.execute(
                    "INSERT INTO reports VALUES ('d1', ?1, ?2, ?3, '2026-11-30T00:00:00.000Z')",
                    params![
                        instant(day.period_start(p)),
                        acked.as_str(),
                        report_body(&acked, &day, p, status, kw)
                    ],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        let detail = store.command(&acked).await.unwrap().unwrap();
        assert_eq!(detail.periods.len(), 48);
        let p = &detail.periods;
        let status = |i: usize| (p[i].mode.as_str(), p[i].status, p[i].applied_kw);
        let kw40 = Some(RateKw::from_watts(40_000));
        use crate::PeriodStatus;
        assert_eq!(status(0), ("charge", PeriodStatus::Executed, kw40));
        assert_eq!(status(1), ("charge", PeriodStatus::Failed, kw40));
        // A skipped period with no report behind it was the cloud's mark.
        assert_eq!(status(2), ("idle", PeriodStatus::Skipped, None));
        assert_eq!(status(3), ("idle", PeriodStatus::Pending, None));
        assert_eq!(p[47].start, day.period_start(48));
        let Some(Some(Subject::Command(c))) = store
            .load(std::slice::from_ref(&acked))
            .await
            .unwrap()
            .pop()
        else {
            panic!("the command loads");
        };
        assert_eq!(
            c.marks.get(1),
            Some(Mark::Reported {
                status: max300_protocol::message::ReportStatus::Executed,
                as_planned: true
            })
        );
        // A command still waiting for its ack goes out again at the next sweep.
        let due = store
            .due(eve + jiff::SignedDuration::from_mins(2), 100)
            .await
            .unwrap();
        assert!(
            matches!(&due[..], [Due::Command { command, .. }] if command.message_id == sent),
            "{due:?}"
        );
        let msg = store.schedule_message(&acked).await.unwrap().unwrap();
        assert_eq!(msg.to_schedule().unwrap().setpoints().len(), 48);
        // Opening it again finds nothing left to move.
        drop(store);
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.command(&acked).await.unwrap().unwrap(), detail);
    }

    /// The moves read every command and control. Run at every open, they read a store's whole
    /// history into the writer's cache before it served anything: at 100,000 units, a day of
    /// commands made each `max300 ingest` 68 MB at its peak, not 34, and each start slower
    /// with every day kept. Once a store is up to date, opening it reads none of them.
    #[tokio::test]
    async fn a_store_up_to_date_is_not_read_through_again_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.sqlite");
        drop(SqliteStore::open(&path).unwrap());
        let eve: Timestamp = "2026-11-29T16:00:00Z".parse().unwrap();
        let id = MessageId::generate(eve);
        let conn = Connection::open(&path).unwrap();
        // A row without marks, which only the move from result rows would touch: left as it
        // is, it shows the move did not read the table again.
        conn.execute(
            "INSERT INTO commands (message_id, device_id, schedule_date, timezone, version,
                                   sha256, state, governs_from, ends_at, created_at, plan)
             VALUES (?1, 'd1', '2026-11-30', 'Europe/London', 1, 'x', 'sent',
                     '2026-11-30T00:00:00.000Z', '2026-12-01T00:00:00.000Z',
                     '2026-11-29T16:00:00.000Z', ?2)",
            [id.as_str(), &vec!["0"; 48].join(",")],
        )
        .unwrap();
        drop(SqliteStore::open(&path).unwrap());
        let marks: Option<String> = conn
            .query_row(
                "SELECT marks FROM commands WHERE message_id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(marks, None, "the commands were read through again on open");
    }
}
