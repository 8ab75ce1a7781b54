//! The DynamoDB command store: one table (`pk`/`sk`, two sharded GSIs), with every write a
//! conditional one, so several cloud instances can share it. The item layout, the access
//! pattern of each method and the cost per device are in `docs/aws-dynamodb.md`.
//!
//! Each command and control item carries a revision `rev`. A write of the lifecycle's unit is
//! conditioned on the revisions it was decided on (and counts them up), and the idempotency
//! items (an ack by `message_id`, a report by device and interval start) are put with
//! `attribute_not_exists` in the same transaction: a unit that lost a race is not written,
//! and the ledger loads and decides again. The rules themselves are all in the lifecycle.
//!
//! # Layout
//! - `table`: the store's URL, and the table with the template's schema.
//! - `request`: one call of each kind, batching, bounded concurrency, backoff; update
//!   expressions.
//! - `item`: how everything is laid out as items, and read back.

mod item;
mod request;
mod table;
mod write;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
use jiff::Timestamp;
use jiff::civil::Date;
use max300_protocol::error::Cause;
use max300_protocol::message::{AckMsg, HeartbeatMsg, ReportMsg};
use max300_protocol::{Day, DeviceId, MessageId, RateKw, Roster, Schedule};
use tracing::debug;

use self::item::{
    DEVICE_SK, Item, command_key, command_of, control_of, device_pk, device_record, get_n, get_s,
    history_of, message_pk, need, num, parse, s, sends_of, shard,
};
use self::request::{Change, backoff};
use self::table::StoreUrl;
use super::text::{decode_plan, instant};
use super::{
    AckContext, CommandLog, CommandStore, CommandSummary, DeviceRecord, Due, Fence,
    IngestionCounts, Insert, Interrupted, NewCommand, PlanFold, ReportContext, Unit, Written,
    rest_of,
};
use crate::CloudError;
use crate::lifecycle::feedback::AckTarget;
use crate::lifecycle::{Command, CommandState, Policy, Subject, stands_over};

/// Shards of each sparse GSI key: enough that no index partition takes more than a sixteenth
/// of a fleet-wide burst (10,000 acks or reports at one boundary), few enough that a listing
/// is 16 small queries.
const SHARDS: u32 = 16;
/// Requests one method keeps in flight (batches, shard queries, chunked transactions).
const CONCURRENCY: usize = 8;
/// Commands per insert transaction: each takes 3 items (command, message pointer, version
/// claim) of the 100 a transaction may hold, and a fence takes one more.
const INSERT_CHUNK: usize = 33;
/// Re-reads after a lost race before a method gives up with an error.
const ATTEMPTS: u32 = 25;

/// The DynamoDB implementation of [`CommandStore`], on one table.
#[derive(Clone, Debug)]
pub struct DynamoStore {
    client: Client,
    table: Arc<str>,
}

impl DynamoStore {
    /// Opens `dynamodb://TABLE[?endpoint=URL&region=REGION]`: credentials and region come
    /// from the standard AWS chain (env, profile, instance role; `AWS_ENDPOINT_URL` too), and
    /// the query overrides the endpoint and region. The table must exist (see
    /// [`DynamoStore::create_table`]).
    pub async fn open(url: &str) -> Result<DynamoStore, CloudError> {
        let target = StoreUrl::parse(url)?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = target.region {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(endpoint) = target.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        Ok(DynamoStore::from_client(
            Client::new(&config),
            &target.table,
        ))
    }

    /// A store on `table` through a client configured by the caller (tests, Lambda).
    pub fn from_client(client: Client, table: &str) -> DynamoStore {
        DynamoStore {
            client,
            table: Arc::from(table),
        }
    }

    fn err(&self, op: &str, cause: impl Into<Cause>) -> CloudError {
        CloudError::store_failed(format!("dynamodb {op} on table {}", self.table), cause)
    }

    /// `op` did not go through, for a reason of ours rather than an error of the SDK's.
    fn refused(&self, op: &str, why: impl std::fmt::Display) -> CloudError {
        CloudError::store(format!("dynamodb {op} on table {}: {why}", self.table))
    }

    async fn record_heartbeat(&self, hb: &HeartbeatMsg, at: Timestamp) -> Result<(), CloudError> {
        // Only attributes that are not index keys change, so the device's `gsi1` entry is
        // rewritten in place (one index write), never moved (two).
        let mut change = Change::default();
        change.when("attribute_exists(pk)".into());
        change.set("last_seen", s(instant(at)));
        change.set("mode", s(hb.mode.as_str()));
        change.set("rate_w", num(hb.rate_kw.watts()));
        match hb.soc_pct.filter(|p| p.is_finite()) {
            Some(p) => change.set("soc_pct", num(p)),
            None => change.remove("soc_pct"),
        }
        match hb.fallback {
            Some(f) => change.set("fallback", s(f.as_str())),
            None => change.remove("fallback"),
        }
        match &hb.active_message_id {
            Some(m) => change.set("active_message_id", s(m.as_str())),
            None => change.remove("active_message_id"),
        }
        change.set("outbox", num(hb.outbox));
        // An unknown device's heartbeat changes nothing, as a failed condition.
        self.update(change, &device_pk(hb.device_id.as_str()), DEVICE_SK)
            .await?;
        Ok(())
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> CloudError {
        CloudError::store(format!("dynamodb table {}: {what}", self.table))
    }

    fn command(&self, item: &Item) -> Result<Command, CloudError> {
        command_of(item).map_err(|e| self.corrupt(e))
    }

    /// Every version of a device's commands for dates `from..=to`, strongly consistent.
    async fn command_versions(
        &self,
        device: &str,
        from: Date,
        to: Date,
    ) -> Result<Vec<Command>, CloudError> {
        let items = self
            .query(
                None,
                "pk = :pk AND sk BETWEEN :lo AND :hi",
                &[
                    (":pk", s(device_pk(device))),
                    (":lo", s(format!("C#{from}#"))),
                    (":hi", s(format!("C#{to}#~"))),
                ],
                true,
            )
            .await?;
        items.iter().map(|i| self.command(i)).collect()
    }

    /// The versions of each (device, from, to) asked, one query each, a few at once.
    async fn versions_of(
        &self,
        keys: BTreeSet<(String, Date, Date)>,
    ) -> Result<HashMap<(String, Date, Date), Vec<Command>>, CloudError> {
        let keys: Vec<_> = keys.into_iter().collect();
        let found = self
            .concurrently(keys.clone(), |store, (device, from, to)| async move {
                store.command_versions(&device, from, to).await
            })
            .await?;
        Ok(keys.into_iter().zip(found).collect())
    }

    /// The message pointers (or control items) of these ids, by id.
    async fn pointers(&self, ids: &[&MessageId]) -> Result<HashMap<String, Item>, CloudError> {
        let keys = ids
            .iter()
            .map(|id| (message_pk(id.as_str()), "#".to_owned()))
            .collect();
        Ok(self
            .batch_get(keys)
            .await?
            .into_iter()
            .filter_map(|i| {
                Some((
                    get_s(&i, "message_id")
                        .or(get_s(&i, "pk")?.strip_prefix("M#"))?
                        .to_owned(),
                    i,
                ))
            })
            .collect())
    }
}

#[async_trait]
impl CommandStore for DynamoStore {
    async fn register_device(
        &self,
        device: &DeviceId,
        max_rate: Option<RateKw>,
        at: Timestamp,
    ) -> Result<(), CloudError> {
        let mut change = Change::default();
        let reg = change.n("registered_at");
        let at_v = change.v(s(instant(at)));
        change.set_raw(format!("{reg} = if_not_exists({reg}, {at_v})"));
        change.set("device_id", s(device.as_str()));
        change.set("gsi1pk", s(format!("DEV#{}", shard(device.as_str()))));
        change.set("gsi1sk", s(device.as_str()));
        if let Some(rate) = max_rate {
            change.set("max_rate_w", num(rate.watts()));
        }
        self.update(change, &device_pk(device.as_str()), DEVICE_SK)
            .await?
            .ok_or_else(|| self.refused("UpdateItem (register)", "conflicted"))?;
        Ok(())
    }

    async fn register_devices(
        &self,
        devices: &[DeviceId],
        at: Timestamp,
    ) -> Result<(), CloudError> {
        self.concurrently(devices.to_vec(), move |store, device| async move {
            store.register_device(&device, None, at).await
        })
        .await?;
        Ok(())
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, CloudError> {
        let mut devices: Vec<DeviceRecord> = self
            .shards("gsi1", "DEV".into(), None, None)
            .await?
            .iter()
            .map(|i| device_record(i).map_err(|e| self.corrupt(e)))
            .collect::<Result<_, _>>()?;
        devices.sort_by(|a, b| a.device_id.as_str().cmp(b.device_id.as_str()));
        Ok(devices)
    }

    async fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, CloudError> {
        self.get(&device_pk(device.as_str()), DEVICE_SK)
            .await?
            .map(|i| device_record(&i).map_err(|e| self.corrupt(e)))
            .transpose()
    }

    async fn record_heartbeats(
        &self,
        heartbeats: &[HeartbeatMsg],
        at: Timestamp,
    ) -> Result<(), CloudError> {
        // One update each: DynamoDB has no batched update.
        for hb in heartbeats {
            self.record_heartbeat(hb, at).await?;
        }
        Ok(())
    }

    async fn insert_commands(
        &self,
        commands: &[NewCommand],
        at: Timestamp,
        policy: &Policy,
        fence: Option<&Fence>,
    ) -> Result<Vec<Insert>, CloudError> {
        // Two commands for one device and date version one after the other: each round
        // holds at most one per device and date.
        let mut occurrences: HashMap<(String, Date), usize> = HashMap::new();
        let mut rounds: Vec<Vec<usize>> = Vec::new();
        for (i, cmd) in commands.iter().enumerate() {
            let k = (
                cmd.schedule.device_id().to_string(),
                cmd.schedule.day().date(),
            );
            let n = occurrences.entry(k).or_insert(0);
            if rounds.len() <= *n {
                rounds.push(Vec::new());
            }
            rounds[*n].push(i);
            *n += 1;
        }
        let commands = Arc::new(commands.to_vec());
        let mut out: Vec<Option<Insert>> = vec![None; commands.len()];
        for round in rounds {
            self.insert_round(&commands, round, at, policy, fence, &mut out)
                .await?;
        }
        out.into_iter()
            .map(|i| i.ok_or_else(|| CloudError::store("insert_commands lost a result")))
            .collect()
    }

    async fn load(&self, ids: &[MessageId]) -> Result<Vec<Option<Subject>>, CloudError> {
        let pointers = self.pointers(&ids.iter().collect::<Vec<_>>()).await?;
        let keys: Vec<(String, String)> = pointers
            .values()
            .filter(|p| get_s(p, "kind") == Some("command"))
            .map(command_key)
            .collect::<Result<_, _>>()
            .map_err(|e| self.corrupt(e))?;
        let commands: HashMap<String, Command> = self
            .batch_get(keys)
            .await?
            .iter()
            .map(|i| self.command(i).map(|c| (c.message_id.to_string(), c)))
            .collect::<Result<_, _>>()?;
        ids.iter()
            .map(|id| match pointers.get(id.as_str()) {
                Some(p) if get_s(p, "kind") == Some("control") => control_of(p)
                    .map(|c| Some(Subject::Control(c)))
                    .map_err(|e| self.corrupt(e)),
                Some(_) => Ok(commands.get(id.as_str()).cloned().map(Subject::Command)),
                None => Ok(None),
            })
            .collect()
    }

    async fn ack_contexts(&self, acks: &[AckMsg]) -> Result<Vec<AckContext>, CloudError> {
        let ids: Vec<&MessageId> = acks.iter().map(|a| &a.message_id).collect();
        let seen_keys = ids
            .iter()
            .map(|id| (message_pk(id.as_str()), "ACK".to_owned()))
            .collect();
        let (pointers, seen) = tokio::try_join!(self.pointers(&ids), self.batch_get(seen_keys))?;
        let seen: BTreeSet<&str> = seen
            .iter()
            .filter_map(|i| get_s(i, "pk")?.strip_prefix("M#"))
            .collect();
        let mut wanted = BTreeSet::new();
        for p in pointers
            .values()
            .filter(|p| get_s(p, "kind") == Some("command"))
        {
            let (device, date) = pointer_date(p).map_err(|e| self.corrupt(e))?;
            wanted.insert((device, date, date));
        }
        let versions = self.versions_of(wanted).await?;
        acks.iter()
            .map(|ack| {
                let id = ack.message_id.as_str();
                let target = match pointers.get(id) {
                    Some(p) if get_s(p, "kind") == Some("control") => {
                        AckTarget::Control(control_of(p).map_err(|e| self.corrupt(e))?)
                    }
                    Some(p) => {
                        let (device, date) = pointer_date(p).map_err(|e| self.corrupt(e))?;
                        let all = versions
                            .get(&(device, date, date))
                            .cloned()
                            .unwrap_or_default();
                        let (this, others): (Vec<_>, Vec<_>) =
                            all.into_iter().partition(|c| c.message_id.as_str() == id);
                        let command = this.into_iter().next().ok_or_else(|| {
                            self.corrupt(format!("{id}: pointer to a missing command"))
                        })?;
                        AckTarget::Command { command, others }
                    }
                    None => AckTarget::Unknown,
                };
                Ok(AckContext {
                    target,
                    seen: seen.contains(id),
                })
            })
            .collect()
    }

    async fn report_contexts(
        &self,
        reports: &[ReportMsg],
    ) -> Result<Vec<ReportContext>, CloudError> {
        let around = |r: &ReportMsg| {
            let d = r
                .interval_start
                .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                .date();
            (
                r.device_id.to_string(),
                d.yesterday().unwrap_or(d),
                d.tomorrow().unwrap_or(d),
            )
        };
        let wanted: BTreeSet<_> = reports.iter().map(around).collect();
        let seen_keys = reports
            .iter()
            .map(|r| {
                (
                    device_pk(r.device_id.as_str()),
                    format!("R#{}", instant(r.interval_start)),
                )
            })
            .collect();
        let (versions, seen) =
            tokio::try_join!(self.versions_of(wanted), self.batch_get(seen_keys))?;
        let seen: BTreeSet<(String, String)> = seen
            .iter()
            .filter_map(|i| Some((get_s(i, "pk")?.to_owned(), get_s(i, "sk")?.to_owned())))
            .collect();
        Ok(reports
            .iter()
            .map(|r| ReportContext {
                commands: versions.get(&around(r)).cloned().unwrap_or_default(),
                seen: seen.contains(&(
                    device_pk(r.device_id.as_str()),
                    format!("R#{}", instant(r.interval_start)),
                )),
            })
            .collect())
    }

    async fn due(&self, now: Timestamp, first: usize) -> Result<Vec<Due>, CloudError> {
        let mut items = self
            .shards(
                "gsi2",
                "DUE".into(),
                Some(("<=", s(instant(now)))),
                Some(first),
            )
            .await?;
        // Each shard's earliest: together, they hold the earliest of all.
        items.sort_by(|a, b| get_s(a, "gsi2sk").cmp(&get_s(b, "gsi2sk")));
        let (mut commands, mut controls): (Vec<&Item>, Vec<&Item>) = items
            .iter()
            .partition(|i| get_s(i, "kind") == Some("command"));
        commands.truncate(first);
        controls.truncate(first);
        let commands: Vec<Command> = commands
            .into_iter()
            .map(|i| self.command(i))
            .collect::<Result<_, _>>()?;
        let claims = commands
            .iter()
            .map(|c| {
                (
                    device_pk(c.device_id().as_str()),
                    format!("L#{}", c.schedule.day().date()),
                )
            })
            .collect();
        let newest = self.by_key(claims).await?;
        let mut out: Vec<Due> = commands
            .into_iter()
            .map(|command| {
                let claim = (
                    device_pk(command.device_id().as_str()),
                    format!("L#{}", command.schedule.day().date()),
                );
                let newest = newest
                    .get(&claim)
                    .and_then(|l| get_n(l, "version"))
                    .unwrap_or(command.version);
                Due::Command { command, newest }
            })
            .collect();
        for item in controls {
            out.push(Due::Control(control_of(item).map_err(|e| self.corrupt(e))?));
        }
        Ok(out)
    }

    async fn write(&self, units: Vec<Unit>) -> Result<Vec<Written>, CloudError> {
        // One device's units in order (a later one may be decided over an earlier one), the
        // devices side by side.
        let mut groups: Vec<Vec<(usize, Unit)>> = Vec::new();
        let mut group_of: HashMap<String, usize> = HashMap::new();
        for (i, unit) in units.into_iter().enumerate() {
            let device = unit.device().map(ToString::to_string).unwrap_or_default();
            let g = *group_of.entry(device).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push((i, unit));
        }
        let total = groups.iter().map(Vec::len).sum();
        let done = self
            .concurrently(groups, |store, group| async move {
                let mut out = Vec::with_capacity(group.len());
                for (i, unit) in group {
                    let written = store.write_unit(&unit).await?;
                    if written == Written::Conflict {
                        debug!(device_id = ?unit.device(), "a write lost a race; it is decided again");
                    }
                    out.push((i, written));
                }
                Ok(out)
            })
            .await?;
        let mut out = vec![Written::Conflict; total];
        for (i, w) in done.into_iter().flatten() {
            out[i] = w;
        }
        Ok(out)
    }

    async fn versions(
        &self,
        device: &DeviceId,
        from: Date,
        to: Date,
    ) -> Result<Vec<Command>, CloudError> {
        self.command_versions(device.as_str(), from, to).await
    }

    async fn on_date(&self, date: Date) -> Result<Vec<Command>, CloudError> {
        self.shards("gsi1", format!("DATE#{date}"), None, None)
            .await?
            .iter()
            .map(|i| self.command(i))
            .collect()
    }

    /// Reads five attributes of each of the date's commands, not whole items, and keeps per
    /// device only the version that stands as each page arrives: the whole items of 100,000
    /// commands were several hundred MB.
    async fn planned_from(
        &self,
        date: Date,
        from: Timestamp,
        fold: PlanFold,
    ) -> Result<Roster<f64>, CloudError> {
        // Device, version, zone and plan text of the version that stands, per device.
        type Standing = std::collections::BTreeMap<String, (u32, String, String)>;
        const FIELDS: &[&str] = &["device_id", "version", "state", "timezone", "plan"];
        let shards = self
            .concurrently((0..SHARDS).collect(), move |store, shard| async move {
                let pk = s(format!("DATE#{date}#{shard}"));
                let mut standing = Standing::new();
                store
                    .query_pages(
                        Some("gsi1"),
                        "gsi1pk = :pk",
                        &[(":pk", pk)],
                        false,
                        FIELDS,
                        |page| {
                            for item in page {
                                let corrupt = |e: String| store.corrupt(e);
                                let device = need(&item, "device_id").map_err(corrupt)?;
                                let version: u32 = get_n(&item, "version")
                                    .ok_or_else(|| corrupt("a command without version".into()))?;
                                let state: CommandState = parse(&item, "state").map_err(corrupt)?;
                                let held = standing.get(device).map(|(v, _, _)| *v);
                                if stands_over(state, version, held) {
                                    let tz = need(&item, "timezone").map_err(corrupt)?.to_owned();
                                    let plan = need(&item, "plan").map_err(corrupt)?.to_owned();
                                    standing.insert(device.to_owned(), (version, tz, plan));
                                }
                            }
                            Ok(true)
                        },
                    )
                    .await?;
                Ok(standing)
            })
            .await?;
        // A device's commands are all in its one shard.
        let mut out: Vec<(DeviceId, f64)> = Vec::new();
        for (device, (_, tz, plan)) in shards.into_iter().flatten() {
            let schedule = Day::named(date, &tz)
                .map_err(|e| e.to_string())
                .and_then(|day| {
                    let id = DeviceId::parse(&device).map_err(|e| e.to_string())?;
                    Schedule::new(id, day, decode_plan(&plan)?)
                        .ok_or_else(|| "the stored plan does not match its date".to_owned())
                })
                .map_err(|e| self.corrupt(format!("{device} on {date}: {e}")))?;
            if let Some(folded) = fold(schedule.device_id(), &rest_of(&schedule, from)) {
                out.push((schedule.device_id().clone(), folded));
            }
        }
        Ok(out.into_iter().collect())
    }

    async fn command_log(&self, id: &MessageId) -> Result<Option<CommandLog>, CloudError> {
        let Some(pointer) = self.get(&message_pk(id.as_str()), "#").await? else {
            return Ok(None);
        };
        if get_s(&pointer, "kind") != Some("command") {
            return Ok(None);
        }
        let (pk, sk) = command_key(&pointer).map_err(|e| self.corrupt(e))?;
        let Some(item) = self.get(&pk, &sk).await? else {
            return Err(self.corrupt(format!("{id}: pointer to a missing command {sk}")));
        };
        Ok(Some(CommandLog {
            command: self.command(&item)?,
            history: history_of(&item).map_err(|e| self.corrupt(e))?,
            sends: sends_of(&item).map_err(|e| self.corrupt(e))?,
            warning: get_s(&item, "warning").map(str::to_owned),
        }))
    }

    async fn reports(
        &self,
        device: &DeviceId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<ReportMsg>, CloudError> {
        let (lo, hi) = (format!("R#{}", instant(from)), format!("R#{}", instant(to)));
        let items = self
            .query(
                None,
                "pk = :pk AND sk BETWEEN :lo AND :hi",
                &[
                    (":pk", s(device_pk(device.as_str()))),
                    (":lo", s(lo)),
                    (":hi", s(hi.clone())),
                ],
                false,
            )
            .await?;
        items
            .iter()
            .filter(|i| get_s(i, "sk").is_some_and(|k| k < hi.as_str()))
            .map(|i| {
                let body =
                    get_s(i, "body").ok_or_else(|| self.corrupt("a report without a body"))?;
                serde_json::from_str(body).map_err(|e| self.corrupt(e))
            })
            .collect()
    }

    async fn commands(
        &self,
        device: Option<&DeviceId>,
        date: Option<Date>,
    ) -> Result<Vec<CommandSummary>, CloudError> {
        let items = match (device, date) {
            (Some(d), date) => {
                let prefix = match date {
                    Some(date) => format!("C#{date}#"),
                    None => "C#".into(),
                };
                self.query(
                    None,
                    "pk = :pk AND begins_with(sk, :p)",
                    &[(":pk", s(device_pk(d.as_str()))), (":p", s(prefix))],
                    false,
                )
                .await?
            }
            (None, Some(date)) => {
                self.shards("gsi1", format!("DATE#{date}"), None, None)
                    .await?
            }
            (None, None) => self.scan_commands().await?,
        };
        let mut rows: Vec<CommandSummary> = items
            .iter()
            .map(|i| self.command(i).map(|c| CommandSummary::of(&c)))
            .collect::<Result<_, _>>()?;
        rows.sort_by(|a, b| {
            b.schedule_date
                .cmp(&a.schedule_date)
                .then_with(|| a.device_id.as_str().cmp(b.device_id.as_str()))
                .then_with(|| b.version.cmp(&a.version))
        });
        Ok(rows)
    }

    async fn record_warnings(&self, warnings: &[(MessageId, String)]) -> Result<(), CloudError> {
        let ids: Vec<&MessageId> = warnings.iter().map(|(id, _)| id).collect();
        let pointers = self.pointers(&ids).await?;
        let mut work = Vec::new();
        for (id, warning) in warnings {
            if let Some(p) = pointers
                .get(id.as_str())
                .filter(|p| get_s(p, "kind") == Some("command"))
            {
                let (pk, sk) = command_key(p).map_err(|e| self.corrupt(e))?;
                work.push((pk, sk, warning.clone()));
            }
        }
        self.concurrently(work, |store, (pk, sk, warning)| async move {
            let mut change = Change::default();
            change.set("warning", s(warning));
            change.when("attribute_exists(pk)".into());
            store.update(change, &pk, &sk).await.map(|_| ())
        })
        .await?;
        Ok(())
    }

    async fn command_counts(&self) -> Result<Vec<(CommandState, u32)>, CloudError> {
        let keys = (0..SHARDS)
            .map(|n| (format!("COUNTS#{n}"), "#".to_owned()))
            .collect();
        let shards = self.batch_get(keys).await?;
        Ok(CommandState::ALL
            .into_iter()
            .filter_map(|st| {
                let total: i64 = shards
                    .iter()
                    .filter_map(|i| get_n::<i64>(i, &format!("n_{}", st.as_str())))
                    .sum();
                (total > 0).then(|| (st, u32::try_from(total).unwrap_or(u32::MAX)))
            })
            .collect())
    }

    async fn begin_ingestion(
        &self,
        date: Date,
        source: &str,
        audit_key: &str,
        at: Timestamp,
    ) -> Result<i64, CloudError> {
        // One atomic counter: ids are unique across instances and increase, as SQLite's do.
        let mut next = Change::default();
        next.add("n", num(1));
        let counter = self
            .update(next, "INGEST", "#NEXT")
            .await?
            .ok_or_else(|| self.refused("UpdateItem (ingestion id)", "conflicted"))?;
        let id: i64 = get_n(&counter, "n")
            .ok_or_else(|| self.corrupt("the ingestion counter has no number"))?;
        let item = Item::from([
            ("pk".into(), s(format!("I#{id}"))),
            ("sk".into(), s("#")),
            ("id".into(), num(id)),
            ("schedule_date".into(), s(date.to_string())),
            ("source".into(), s(source)),
            ("audit_key".into(), s(audit_key)),
            ("started_at".into(), s(instant(at))),
            ("gsi2pk".into(), s("INGEST#OPEN")),
            ("gsi2sk".into(), s(format!("{id:020}"))),
        ]);
        if !self.put_new(item).await? {
            return Err(self.refused("PutItem (ingestion)", format!("id {id} already used")));
        }
        Ok(id)
    }

    async fn finish_ingestion(
        &self,
        id: i64,
        outcome: Result<IngestionCounts, String>,
        at: Timestamp,
    ) -> Result<(), CloudError> {
        let pk = format!("I#{id}");
        let Some(run) = self.get(&pk, "#").await? else {
            return Ok(());
        };
        let mut change = Change::default();
        match &outcome {
            Ok(counts) => {
                change.set("accepted", num(counts.accepted));
                change.set("unchanged", num(counts.unchanged));
                change.set("rejected", num(counts.rejected));
            }
            Err(why) => change.set("error", s(why.clone())),
        }
        change.set("finished_at", s(instant(at)));
        change.remove("gsi2pk");
        change.remove("gsi2sk");
        change.when("attribute_exists(pk) AND attribute_not_exists(finished_at)".into());
        let date = need(&run, "schedule_date").map_err(|e| self.corrupt(e))?;
        let mut items = vec![change.tx(&self.table, &pk, "#")?];
        if outcome.is_ok() && get_s(&run, "source") == Some("fetch") {
            // A marker read with one consistent GetItem by `ingested`, not through an index.
            let marker = Put::builder()
                .table_name(&*self.table)
                .set_item(Some(Item::from([
                    ("pk".into(), s(format!("INGESTED#{date}"))),
                    ("sk".into(), s("fetch")),
                    ("id".into(), num(id)),
                    ("finished_at".into(), s(instant(at))),
                ])))
                .build()
                .map_err(|e| self.err("TransactWriteItems (finish ingestion)", e))?;
            items.push(TransactWriteItem::builder().put(marker).build());
        }
        for attempt in 0..ATTEMPTS {
            if self
                .transact("TransactWriteItems (finish ingestion)", items.clone())
                .await?
            {
                break;
            }
            if self
                .get(&pk, "#")
                .await?
                .is_some_and(|r| r.contains_key("finished_at"))
            {
                return Ok(());
            }
            if attempt + 1 == ATTEMPTS {
                return Err(
                    self.refused("TransactWriteItems (finish ingestion)", "kept conflicting")
                );
            }
            backoff(attempt).await;
        }
        if outcome.is_ok() {
            // The newest finished run of the date: an interrupted older one is overtaken.
            let mut last = Change::default();
            let n = last.n("last");
            let id_v = last.v(num(id));
            last.set_raw(format!("{n} = {id_v}"));
            last.when(format!("attribute_not_exists({n}) OR {n} < {id_v}"));
            self.update(last, &format!("RUNS#{date}"), "#").await?;
        }
        Ok(())
    }

    async fn interrupted_ingestions(&self) -> Result<Vec<Interrupted>, CloudError> {
        let items = self
            .query(
                Some("gsi2"),
                "gsi2pk = :pk",
                &[(":pk", s("INGEST#OPEN"))],
                false,
            )
            .await?;
        let dates = items
            .iter()
            .filter_map(|i| {
                Some((
                    format!("RUNS#{}", get_s(i, "schedule_date")?),
                    "#".to_owned(),
                ))
            })
            .collect();
        let last: HashMap<String, i64> = self
            .batch_get(dates)
            .await?
            .iter()
            .filter_map(|r| {
                Some((
                    get_s(r, "pk")?.trim_start_matches("RUNS#").to_owned(),
                    get_n(r, "last")?,
                ))
            })
            .collect();
        let mut runs: Vec<Interrupted> = items
            .iter()
            .map(|i| {
                let id: i64 = get_n(i, "id").ok_or("an ingestion without id")?;
                let date: String = need(i, "schedule_date")?.to_owned();
                Ok(Interrupted {
                    id,
                    schedule_date: parse(i, "schedule_date")?,
                    source: need(i, "source")?.to_owned(),
                    audit_key: need(i, "audit_key")?.to_owned(),
                    overtaken: last.get(&date).is_some_and(|l| *l > id),
                })
            })
            .collect::<Result<_, String>>()
            .map_err(|e| self.corrupt(e))?;
        runs.sort_by_key(|r| r.id);
        Ok(runs)
    }

    async fn ingested(&self, date: Date) -> Result<bool, CloudError> {
        Ok(self
            .get(&format!("INGESTED#{date}"), "fetch")
            .await?
            .is_some())
    }

    async fn lease(
        &self,
        name: &str,
        owner: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<Option<u64>, CloudError> {
        self.take_lease(name, owner, until, now).await
    }

    async fn release(&self, name: &str, owner: &str) -> Result<(), CloudError> {
        let mut change = Change::default();
        let (o, u) = (change.n("owner"), change.n("until"));
        let owner_v = change.v(s(owner));
        let free = change.v(s(""));
        change.set_raw(format!("{u} = {free}"));
        change.when(format!("{o} = {owner_v}"));
        self.update(change, &format!("LEASE#{name}"), "#").await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), CloudError> {
        // A read of a key that never exists: cheap, and it proves credentials and table.
        self.get("PING", "#").await.map(|_| ())
    }
}

impl DynamoStore {
    /// Every command item, by a filtered scan: only for a listing with neither device nor
    /// date, which reads the whole table.
    async fn scan_commands(&self) -> Result<Vec<Item>, CloudError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&*self.table)
                // Message-id pointers say `kind = command` too; only command items sit
                // under a `C#` sort key.
                .filter_expression("#k = :k AND begins_with(sk, :c)")
                .expression_attribute_names("#k", "kind")
                .expression_attribute_values(":k", s("command"))
                .expression_attribute_values(":c", s("C#"))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.err("Scan", e))?;
            out.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }
}

/// A command pointer's device and date.
fn pointer_date(pointer: &Item) -> Result<(String, Date), String> {
    let device = get_s(pointer, "device_id").ok_or("a message pointer without device_id")?;
    let csk = get_s(pointer, "csk").ok_or("a message pointer without csk")?;
    let date = csk
        .strip_prefix("C#")
        .and_then(|r| r.split('#').next())
        .ok_or_else(|| format!("a bad command key {csk}"))?
        .parse()
        .map_err(|e| format!("{csk}: {e}"))?;
    Ok((device.to_owned(), date))
}
