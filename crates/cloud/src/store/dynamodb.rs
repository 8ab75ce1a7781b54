//! The DynamoDB command store: one table (`pk`/`sk`, two sharded GSIs), with every state
//! transition a conditional write, so several cloud instances can share it. The item layout,
//! the access pattern of each method and the cost per device are in `docs/aws-dynamodb.md`.
//!
//! Each command item carries a revision `rev`. A writer reads the item, decides with the
//! pure lifecycle rules, and writes back on the condition that `rev` is still what it read
//! (and bumps it): the item is the command's lock. A lost race re-reads and decides again,
//! and the idempotency items (an ack by message_id, a report by device and interval start)
//! are put with `attribute_not_exists` in the same transaction, so one message is applied
//! exactly once whichever instance gets it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, KeysAndAttributes, Projection, ProjectionType, Put, ReturnValue, ScalarAttributeType,
    TimeToLiveSpecification, TransactWriteItem, Update,
};
use jiff::Timestamp;
use jiff::civil::Date;
use max300_protocol::day::period_start_at;
use max300_protocol::message::{
    AckMsg, AckStatus, ControlAction, ControlMsg, HeartbeatMsg, ReportMsg, ReportStatus,
    ScheduleMsg, V1,
};
use max300_protocol::{Day, DeviceId, MessageId, RateKw, Schedule, Setpoint, TraceParent};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::sqlite::{decode_plan, encode_plan, plan_len, text};
use super::{
    Cancel, CommandDetail, CommandStore, CommandSummary, CurrentCommand, DeviceRecord, FleetRow,
    HistoryEntry, IngestionCounts, Insert, Interrupted, NewCommand, PeriodView, Recorded, Swept,
    Unacked,
};
use crate::{CloudError, CommandState, PeriodStatus};

type Item = HashMap<String, AttributeValue>;

/// Shards of each sparse GSI key: enough that no index partition takes more than a sixteenth
/// of a fleet-wide burst (10,000 acks or reports at one boundary), few enough that a listing
/// is 16 small queries.
const SHARDS: u32 = 16;
/// Requests one method keeps in flight (batches, shard queries, chunked transactions).
const CONCURRENCY: usize = 8;
/// Commands per insert transaction: each takes 3 items (command, message pointer, version
/// claim) of the 100 a transaction may hold.
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

    /// Creates the table (on-demand capacity) with the schema the deployment template also
    /// declares, unless it exists, waits until it is active, and turns on TTL on `ttl`.
    pub async fn create_table(&self) -> Result<(), CloudError> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| self.err("CreateTable", e))
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(|e| self.err("CreateTable", e))
        };
        let index = |name: &str| -> Result<GlobalSecondaryIndex, CloudError> {
            GlobalSecondaryIndex::builder()
                .index_name(name)
                .key_schema(key(&format!("{name}pk"), KeyType::Hash)?)
                .key_schema(key(&format!("{name}sk"), KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .map_err(|e| self.err("CreateTable", e))
        };
        let created = self
            .client
            .create_table()
            .table_name(&*self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr("pk")?)
            .attribute_definitions(attr("sk")?)
            .attribute_definitions(attr("gsi1pk")?)
            .attribute_definitions(attr("gsi1sk")?)
            .attribute_definitions(attr("gsi2pk")?)
            .attribute_definitions(attr("gsi2sk")?)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .global_secondary_indexes(index("gsi1")?)
            .global_secondary_indexes(index("gsi2")?)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) => {}
            Err(e) => return Err(self.err("CreateTable", DisplayErrorContext(e))),
        }
        self.client
            .wait_until_table_exists()
            .table_name(&*self.table)
            .wait(std::time::Duration::from_secs(300))
            .await
            .map_err(|e| self.err("DescribeTable (waiting for ACTIVE)", DisplayErrorContext(e)))?;
        let ttl = self
            .client
            .describe_time_to_live()
            .table_name(&*self.table)
            .send()
            .await
            .map_err(|e| self.err("DescribeTimeToLive", DisplayErrorContext(e)))?;
        let enabled = ttl
            .time_to_live_description()
            .and_then(|d| d.attribute_name())
            .is_some_and(|a| a == "ttl");
        if !enabled {
            let spec = TimeToLiveSpecification::builder()
                .attribute_name("ttl")
                .enabled(true)
                .build()
                .map_err(|e| self.err("UpdateTimeToLive", e))?;
            self.client
                .update_time_to_live()
                .table_name(&*self.table)
                .time_to_live_specification(spec)
                .send()
                .await
                .map_err(|e| self.err("UpdateTimeToLive", DisplayErrorContext(e)))?;
        }
        Ok(())
    }

    fn err(&self, op: &str, e: impl std::fmt::Display) -> CloudError {
        CloudError::Store(format!("dynamodb {op} on table {}: {e}", self.table))
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> CloudError {
        CloudError::Store(format!("dynamodb table {}: {what}", self.table))
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, CloudError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("GetItem", DisplayErrorContext(e)))?;
        Ok(out.item)
    }

    /// Puts an item that must not exist yet; false if it does.
    async fn put_new(&self, item: Item) -> Result<bool, CloudError> {
        let put = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err("PutItem", DisplayErrorContext(e))),
        }
    }

    /// Applies one guarded update; false when its condition failed (or it met a transaction
    /// on the same item), so the caller re-reads.
    async fn update(&self, change: Change, pk: &str, sk: &str) -> Result<Option<Item>, CloudError> {
        let (expr, names, values, cond) = change.parts();
        let out = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(pk, sk)))
            .update_expression(expr)
            .set_condition_expression(cond)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match out {
            Ok(out) => Ok(Some(out.attributes.unwrap_or_default())),
            Err(e)
                if e.as_service_error().is_some_and(|s| {
                    s.is_conditional_check_failed_exception()
                        || s.is_transaction_conflict_exception()
                }) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.err("UpdateItem", DisplayErrorContext(e))),
        }
    }

    /// Runs one transaction; false when it was cancelled (a condition failed or another
    /// transaction held one of its items), so the caller re-reads.
    async fn transact(&self, op: &str, items: Vec<TransactWriteItem>) -> Result<bool, CloudError> {
        let out = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_transaction_canceled_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err(op, DisplayErrorContext(e))),
        }
    }

    async fn query(
        &self,
        index: Option<&str>,
        cond: &str,
        values: &[(&str, AttributeValue)],
        consistent: bool,
    ) -> Result<Vec<Item>, CloudError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&*self.table)
                .key_condition_expression(cond)
                .set_exclusive_start_key(start.take());
            for (k, v) in values {
                q = q.expression_attribute_values(*k, v.clone());
            }
            q = match index {
                Some(i) => q.index_name(i),
                None => q.consistent_read(consistent),
            };
            let page = q
                .send()
                .await
                .map_err(|e| self.err("Query", DisplayErrorContext(e)))?;
            out.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    /// Every item of a sharded GSI key `{prefix}#{0..16}`, with an optional sort-key
    /// condition such as `gsi2sk > :r`.
    async fn shards(
        &self,
        index: &'static str,
        prefix: String,
        range: Option<(&'static str, AttributeValue)>,
    ) -> Result<Vec<Item>, CloudError> {
        let parts = self
            .concurrently((0..SHARDS).collect(), move |store, shard| {
                let prefix = prefix.clone();
                let range = range.clone();
                async move {
                    let pk = AttributeValue::S(format!("{prefix}#{shard}"));
                    let (cond, values) = match range {
                        Some((op, v)) => (
                            format!("{index}pk = :pk AND {index}sk {op} :r"),
                            vec![(":pk", pk), (":r", v)],
                        ),
                        None => (format!("{index}pk = :pk"), vec![(":pk", pk)]),
                    };
                    store.query(Some(index), &cond, &values, false).await
                }
            })
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// Strongly consistent reads of many keys, 100 a request; missing keys are left out.
    async fn batch_get(&self, keys: Vec<(String, String)>) -> Result<Vec<Item>, CloudError> {
        let unique: BTreeSet<(String, String)> = keys.into_iter().collect();
        let chunks: Vec<Vec<(String, String)>> = unique
            .into_iter()
            .collect::<Vec<_>>()
            .chunks(100)
            .map(<[_]>::to_vec)
            .collect();
        let parts = self
            .concurrently(chunks, |store, chunk| async move {
                let mut out = Vec::new();
                let mut keys: Vec<Item> = chunk.iter().map(|(p, s)| key(p, s)).collect();
                for attempt in 0..ATTEMPTS {
                    if keys.is_empty() {
                        return Ok(out);
                    }
                    let request = KeysAndAttributes::builder()
                        .set_keys(Some(std::mem::take(&mut keys)))
                        .consistent_read(true)
                        .build()
                        .map_err(|e| store.err("BatchGetItem", e))?;
                    let got = store
                        .client
                        .batch_get_item()
                        .request_items(&*store.table, request)
                        .send()
                        .await
                        .map_err(|e| store.err("BatchGetItem", DisplayErrorContext(e)))?;
                    if let Some(mut items) = got.responses {
                        out.extend(items.remove(&*store.table).unwrap_or_default());
                    }
                    if let Some(mut rest) = got.unprocessed_keys {
                        keys = rest
                            .remove(&*store.table)
                            .map(|k| k.keys)
                            .unwrap_or_default();
                    }
                    if !keys.is_empty() {
                        // Throttled: back off before asking for the rest.
                        backoff(attempt).await;
                    }
                }
                Err(store.err("BatchGetItem", "keys still unprocessed after retries"))
            })
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// Runs `f` over `items` with at most [`CONCURRENCY`] in flight; results in input order.
    async fn concurrently<T, R, F, Fut>(&self, items: Vec<T>, f: F) -> Result<Vec<R>, CloudError>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(DynamoStore, T) -> Fut,
        Fut: Future<Output = Result<R, CloudError>> + Send + 'static,
    {
        let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
        let mut set = JoinSet::new();
        for (i, item) in items.into_iter().enumerate() {
            if set.len() >= CONCURRENCY {
                join_one(&mut set, &mut out).await?;
            }
            let fut = f(self.clone(), item);
            set.spawn(async move { (i, fut.await) });
        }
        while !set.is_empty() {
            join_one(&mut set, &mut out).await?;
        }
        out.into_iter()
            .map(|r| r.ok_or_else(|| CloudError::Store("a store task lost its result".into())))
            .collect()
    }

    /// Moves the per-state command counters by the transitions a successful write made.
    /// They are updated after it, not in it: a counter item in every transition's
    /// transaction would make concurrent transactions conflict. A crash in between leaves a
    /// gauge one off; the command items stay right.
    async fn count(&self, moves: &[Move]) {
        let mut by_shard: BTreeMap<u32, BTreeMap<&'static str, i64>> = BTreeMap::new();
        for m in moves {
            let deltas = by_shard.entry(m.shard).or_default();
            if let Some(from) = m.from {
                *deltas.entry(from.as_str()).or_default() -= 1;
            }
            *deltas.entry(m.to.as_str()).or_default() += 1;
        }
        for (shard, deltas) in by_shard {
            let mut change = Change::default();
            for (state, delta) in deltas.into_iter().filter(|(_, d)| *d != 0) {
                change.add(&format!("n_{state}"), num(delta));
            }
            if change.add.is_empty() {
                continue;
            }
            if let Err(e) = self.update(change, &format!("COUNTS#{shard}"), "#").await {
                warn!(error = %e, shard, "command state counters not updated");
            }
        }
    }

    /// Notes that a device was heard from (never moving `last_seen` back).
    async fn touch(&self, device: &DeviceId, at: Timestamp) -> Result<(), CloudError> {
        let mut change = Change::default();
        let seen = change.n("last_seen");
        let at_v = change.v(s(text(at)));
        change.set_raw(format!("{seen} = {at_v}"));
        change.when(format!(
            "attribute_exists(pk) AND (attribute_not_exists({seen}) OR {seen} < {at_v})"
        ));
        self.update(change, &device_pk(device.as_str()), DEVICE_SK)
            .await
            .map(|_| ())
    }

    /// Every version of a device's commands for one date, strongly consistent.
    async fn versions(&self, device: &str, date: &str) -> Result<Vec<Row>, CloudError> {
        let items = self
            .query(
                None,
                "pk = :pk AND begins_with(sk, :p)",
                &[
                    (":pk", s(device_pk(device))),
                    (":p", s(format!("C#{date}#"))),
                ],
                true,
            )
            .await?;
        items.iter().map(|i| self.row(i)).collect()
    }

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
                .map_err(|e| self.err("Scan", DisplayErrorContext(e)))?;
            out.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    async fn record_acks_in_turn(
        &self,
        acks: &[AckMsg],
        at: Timestamp,
    ) -> Result<Vec<Recorded>, CloudError> {
        let mut out = Vec::with_capacity(acks.len());
        for ack in acks {
            out.push(self.apply_ack(ack, at).await?);
        }
        Ok(out)
    }

    fn row(&self, item: &Item) -> Result<Row, CloudError> {
        Row::parse(item).map_err(|e| self.corrupt(e))
    }

    /// The command a message id names, through its pointer item; `None` for unknown ids
    /// and for control messages.
    async fn command_row(&self, id: &MessageId) -> Result<Option<Row>, CloudError> {
        let Some(pointer) = self.get(&message_pk(id.as_str()), "#").await? else {
            return Ok(None);
        };
        if get_s(&pointer, "kind") != Some("command") {
            return Ok(None);
        }
        let (pk, sk) = command_key(&pointer).map_err(|e| self.corrupt(e))?;
        match self.get(&pk, &sk).await? {
            Some(item) => self.row(&item).map(Some),
            None => Err(self.corrupt(format!("{id}: pointer to a missing command {sk}"))),
        }
    }

    async fn apply_ack(&self, ack: &AckMsg, at: Timestamp) -> Result<Recorded, CloudError> {
        let id = ack.message_id.as_str();
        let device = ack.device_id.as_str();
        let pointer = self.get(&message_pk(id), "#").await?;
        if let Some(p) = &pointer
            && get_s(p, "device_id") != Some(device)
        {
            // Another device's command: never let it take the owner's ack slot.
            return Ok(Recorded::UnknownCommand);
        }
        let body = serde_json::to_string(ack).map_err(|e| self.corrupt(e))?;
        let ack_item = Item::from([
            ("pk".into(), s(message_pk(id))),
            ("sk".into(), s("ACK")),
            ("device_id".into(), s(device)),
            ("body".into(), s(body)),
            ("received_at".into(), s(text(at))),
        ]);
        let recorded = match &pointer {
            None => {
                if self.put_new(ack_item).await? {
                    Recorded::UnknownCommand
                } else {
                    Recorded::Duplicate
                }
            }
            Some(p) if get_s(p, "kind") == Some("control") => {
                self.ack_control(ack, ack_item).await?
            }
            Some(p) => self.ack_command(ack, ack_item, p, at).await?,
        };
        self.touch(&ack.device_id, at).await?;
        Ok(recorded)
    }

    async fn ack_control(&self, ack: &AckMsg, ack_item: Item) -> Result<Recorded, CloudError> {
        let pk = message_pk(ack.message_id.as_str());
        let mut change = Change::default();
        change.set(
            "state",
            s(match ack.status {
                AckStatus::Accepted => "acknowledged",
                AckStatus::Rejected => "rejected",
            }),
        );
        change.remove("gsi2pk");
        change.remove("gsi2sk");
        change.when("attribute_exists(pk)".into());
        let items = vec![
            put_new_tx(&self.table, ack_item)?,
            change.tx(&self.table, &pk, "#")?,
        ];
        for attempt in 0..ATTEMPTS {
            if self
                .transact("TransactWriteItems (control ack)", items.clone())
                .await?
            {
                return Ok(Recorded::Applied);
            }
            if self.get(&pk, "ACK").await?.is_some() {
                return Ok(Recorded::Duplicate);
            }
            backoff(attempt).await;
        }
        Err(self.err("TransactWriteItems (control ack)", "kept conflicting"))
    }

    async fn ack_command(
        &self,
        ack: &AckMsg,
        ack_item: Item,
        pointer: &Item,
        at: Timestamp,
    ) -> Result<Recorded, CloudError> {
        let id = ack.message_id.as_str();
        let (_, sk) = command_key(pointer).map_err(|e| self.corrupt(e))?;
        let date = sk
            .strip_prefix("C#")
            .and_then(|r| r.split('#').next())
            .ok_or_else(|| self.corrupt(format!("{id}: bad command key {sk}")))?
            .to_owned();
        for attempt in 0..ATTEMPTS {
            let rows = self.versions(ack.device_id.as_str(), &date).await?;
            let Some(row) = rows.iter().find(|r| r.message_id == id) else {
                return Err(self.corrupt(format!("{id}: pointer to a missing command {sk}")));
            };
            let mut items = vec![put_new_tx(&self.table, ack_item.clone())?];
            let mut moves = Vec::new();
            let mut states = Vec::new();
            if let Some(next) = row.state.after_ack(ack.status) {
                states.push(next);
            }
            let mut change = Change::guarded(row);
            let mut late = row.late;
            if ack.status == AckStatus::Accepted {
                // Judged by when the device acked (never later than we heard), so a cloud
                // outage does not flag an on-time ack.
                late |= ack.at.min(at) > row.governs_from;
                match ack.effective_period {
                    Some(p) => change.set("effective_period", num(p)),
                    None => change.remove("effective_period"),
                }
                match &ack.sha256 {
                    // The usual case, the plan's own hash, is kept as "=": 63 bytes fewer
                    // keep the item within one write unit.
                    Some(sha) if *sha == row.sha256 => change.set("acked_sha256", s("=")),
                    Some(sha) => change.set("acked_sha256", s(sha.clone())),
                    None => change.remove("acked_sha256"),
                }
                change.set("late", AttributeValue::Bool(late));
                let effective = ack.effective_period.unwrap_or(1);
                // Periods before the effective one never ran under this command: an older
                // version (if any) governed them. Marks never cover what the sweeper has
                // already called unreported.
                let mut skip_before = row.skip_before;
                if !row.unreported {
                    skip_before = effective;
                    change.set("skip_before", num(skip_before));
                    match (row.version > 1).then_some("superseded") {
                        Some(r) => change.set("skip_reason", s(r)),
                        None => change.remove("skip_reason"),
                    }
                }
                for old in rows.iter().filter(|r| r.version < row.version) {
                    let skip_from = old.skip_from.map_or(effective, |f| f.min(effective));
                    let moves_skip = !old.unreported && old.skip_from != Some(skip_from);
                    let supersede = !matches!(
                        old.state,
                        CommandState::Superseded | CommandState::Cancelled | CommandState::Rejected
                    );
                    if !moves_skip && !supersede {
                        continue;
                    }
                    let mut old_change = Change::guarded(old);
                    if moves_skip {
                        old_change.set("skip_from", num(skip_from));
                    }
                    if supersede {
                        old_change.states(old, &[CommandState::Superseded], old.late, at);
                        moves.push(Move::new(old, CommandState::Superseded));
                    }
                    items.push(old_change.tx(&self.table, &old.pk, &old.sk)?);
                }
                // Reports may have come before the ack: marking the early periods can leave
                // nothing pending.
                let state = states.last().copied().unwrap_or(row.state);
                if row.done(&row.reported, skip_before, row.skip_from) >= row.periods
                    && state.after_report(true) == Some(CommandState::Completed)
                {
                    states.push(CommandState::Completed);
                }
            }
            change.states(row, &states, late, at);
            if let Some(last) = states.last() {
                moves.push(Move::new(row, *last));
            }
            items.insert(1, change.tx(&self.table, &row.pk, &row.sk)?);
            if items.len() > 100 {
                return Err(self.err(
                    "TransactWriteItems (ack)",
                    format!("{id}: more than 98 older versions to supersede"),
                ));
            }
            if self.transact("TransactWriteItems (ack)", items).await? {
                self.count(&moves).await;
                return Ok(Recorded::Applied);
            }
            if self.get(&message_pk(id), "ACK").await?.is_some() {
                return Ok(Recorded::Duplicate);
            }
            debug!(message_id = %id, device_id = %ack.device_id, attempt, "ack lost a race; reading again");
            backoff(attempt).await;
        }
        Err(self.err(
            "TransactWriteItems (ack)",
            format!("{id}: kept conflicting"),
        ))
    }

    async fn mark_one_sent(
        self,
        id: MessageId,
        pointer: Item,
        at: Timestamp,
    ) -> Result<(), CloudError> {
        let kind = get_s(&pointer, "kind").unwrap_or_default().to_owned();
        let (pk, sk) = if kind == "command" {
            command_key(&pointer).map_err(|e| self.corrupt(e))?
        } else {
            (message_pk(id.as_str()), "#".to_owned())
        };
        let shard = get_s(&pointer, "device_id").map_or(0, shard);
        for attempt in 0..ATTEMPTS {
            // The first publish moves `created` to `sent`: try that first, it is the common
            // case; a resend only counts.
            let mut first = Change::default();
            let mut again = Change::default();
            for c in [&mut first, &mut again] {
                let p = c.n("publishes");
                let zero = c.v(num(0));
                let one = c.v(num(1));
                c.set_raw(format!("{p} = if_not_exists({p}, {zero}) + {one}"));
                c.set("last_sent_at", s(text(at)));
                if kind == "command" {
                    let sends = c.n("sends");
                    let at_list = c.v(AttributeValue::L(vec![s(text(at))]));
                    c.set_raw(format!("{sends} = list_append({sends}, {at_list})"));
                }
            }
            let state = first.n("state");
            let created = first.v(s("created"));
            first.when(format!("{state} = {created}"));
            first.set("state", s("sent"));
            let ends_at = get_s(&pointer, "ends_at").unwrap_or_default().to_owned();
            if kind == "command" {
                let h = first.n("history");
                let entry = first.v(AttributeValue::L(vec![s(history_entry(
                    CommandState::Sent,
                    at,
                ))]));
                first.set_raw(format!("{h} = list_append({h}, {entry})"));
                let rev = first.n("rev");
                let one = first.v(num(1));
                first.set_raw(format!("{rev} = {rev} + {one}"));
                first.set("gsi2pk", s(format!("OPEN#sent#{shard}")));
            } else {
                first.set("gsi2pk", s(format!("OPEN#sent#{shard}")));
                first.set("gsi2sk", s(ends_at.clone()));
            }
            if self.update(first, &pk, &sk).await?.is_some() {
                if kind == "command" {
                    self.count(&[Move {
                        shard,
                        from: Some(CommandState::Created),
                        to: CommandState::Sent,
                    }])
                    .await;
                }
                return Ok(());
            }
            again.when("attribute_exists(pk)".into());
            let state_name = again.n("state");
            let created = again.v(s("created"));
            again.when(format!("{state_name} <> {created}"));
            if self.update(again, &pk, &sk).await?.is_some() {
                return Ok(());
            }
            if self.get(&pk, &sk).await?.is_none() {
                return Ok(());
            }
            backoff(attempt).await;
        }
        Err(self.err("UpdateItem (mark sent)", format!("{id}: kept conflicting")))
    }

    async fn apply_report(
        &self,
        report: &ReportMsg,
        at: Timestamp,
    ) -> Result<Recorded, CloudError> {
        let device = report.device_id.as_str();
        let body = serde_json::to_string(report).map_err(|e| self.corrupt(e))?;
        let mut item = Item::from([
            ("pk".into(), s(device_pk(device))),
            ("sk".into(), s(format!("R#{}", text(report.interval_start)))),
            ("body".into(), s(body)),
            ("received_at".into(), s(text(at))),
        ]);
        if let Some(id) = &report.message_id {
            item.insert("message_id".into(), s(id.as_str()));
        }
        let Some(id) = &report.message_id else {
            let fresh = self.put_new(item).await?;
            return Ok(if fresh {
                Recorded::Applied
            } else {
                Recorded::Duplicate
            });
        };
        let pointer = self.get(&message_pk(id.as_str()), "#").await?;
        let ours = pointer.as_ref().filter(|p| {
            get_s(p, "kind") == Some("command") && get_s(p, "device_id") == Some(device)
        });
        let Some(pointer) = ours else {
            let fresh = self.put_new(item).await?;
            return Ok(if fresh {
                Recorded::UnknownCommand
            } else {
                Recorded::Duplicate
            });
        };
        let (pk, sk) = command_key(pointer).map_err(|e| self.corrupt(e))?;
        let report_sk = format!("R#{}", text(report.interval_start));
        for attempt in 0..ATTEMPTS {
            let Some(current) = self.get(&pk, &sk).await? else {
                return Err(self.corrupt(format!("{id}: pointer to a missing command {sk}")));
            };
            let row = self.row(&current)?;
            let day = row.day().map_err(|e| self.corrupt(e))?;
            // The period is the one of the command's day that starts then; a report for an
            // instant off its grid is kept but moves no period.
            let period = day
                .boundary(report.interval_start)
                .ok()
                .filter(|b| *b < day.period_count())
                .map(|b| b + 1);
            let mut change = Change::guarded(&row);
            let mut reported = row.reported.clone();
            if let Some(p) = period {
                reported.insert(p);
                change.set("reported", num(bits(&reported)));
                let planned = decode_plan(&row.plan)
                    .map_err(|e| self.corrupt(e))?
                    .get(p as usize - 1)
                    .map(|sp| sp.rate().watts());
                let as_planned = report.status == ReportStatus::Executed
                    && report.applied_kw.map(|r| r.watts()).is_some()
                    && report.applied_kw.map(|r| r.watts()) == planned;
                if as_planned {
                    let mut done = row.as_planned.clone();
                    done.insert(p);
                    change.set("as_planned", num(bits(&done)));
                }
            }
            let mut states = Vec::new();
            // A report implies the ack.
            if let Some(next) = row.state.after_report(false) {
                states.push(next);
            }
            let state = states.last().copied().unwrap_or(row.state);
            if row.done(&reported, row.skip_before, row.skip_from) >= row.periods
                && state.after_report(true) == Some(CommandState::Completed)
            {
                states.push(CommandState::Completed);
            }
            change.states(&row, &states, row.late, at);
            let items = vec![
                put_new_tx(&self.table, item.clone())?,
                change.tx(&self.table, &pk, &sk)?,
            ];
            if self.transact("TransactWriteItems (report)", items).await? {
                if let Some(last) = states.last() {
                    self.count(&[Move::new(&row, *last)]).await;
                }
                return Ok(Recorded::Applied);
            }
            if self.get(&device_pk(device), &report_sk).await?.is_some() {
                return Ok(Recorded::Duplicate);
            }
            debug!(message_id = %id, device_id = %device, attempt, "report lost a race; reading again");
            backoff(attempt).await;
        }
        Err(self.err(
            "TransactWriteItems (report)",
            format!("{id}: kept conflicting"),
        ))
    }

    /// Inserts the commands at `idx` (at most one per device and date), retrying those whose
    /// version claim lost a race with another writer.
    async fn insert_round(
        &self,
        commands: &Arc<Vec<NewCommand>>,
        idx: Vec<usize>,
        at: Timestamp,
        out: &mut [Option<Insert>],
    ) -> Result<(), CloudError> {
        let mut pending = idx;
        for attempt in 0..ATTEMPTS {
            if pending.is_empty() {
                return Ok(());
            }
            let keys = pending
                .iter()
                .map(|&i| {
                    let s = &commands[i].schedule;
                    (
                        device_pk(s.device_id().as_str()),
                        format!("L#{}", s.day().date()),
                    )
                })
                .collect();
            let latest: HashMap<(String, String), Item> = self
                .batch_get(keys)
                .await?
                .into_iter()
                .filter_map(|i| {
                    Some((
                        (get_s(&i, "pk")?.to_owned(), get_s(&i, "sk")?.to_owned()),
                        i,
                    ))
                })
                .collect();
            let mut writes: Vec<(usize, u32, Vec<TransactWriteItem>)> = Vec::new();
            for &i in &pending {
                let cmd = &commands[i];
                let sch = &cmd.schedule;
                let device = sch.device_id().as_str();
                let date = sch.day().date().to_string();
                let sha = sch.sha256();
                let claim = latest.get(&(device_pk(device), format!("L#{date}")));
                let version = match claim {
                    Some(l) if get_s(l, "sha256") == Some(sha.as_str()) => {
                        out[i] = Some(Insert::Unchanged {
                            message_id: get_s(l, "message_id")
                                .and_then(|m| MessageId::parse(m).ok())
                                .ok_or_else(|| {
                                    self.corrupt(format!("{device} {date}: bad latest item"))
                                })?,
                            version: get_n(l, "version").unwrap_or(1),
                        });
                        continue;
                    }
                    Some(l) => get_n::<u32>(l, "version").unwrap_or(0) + 1,
                    None => 1,
                };
                let items = self.new_command_items(cmd, version, claim, at)?;
                writes.push((i, version, items));
            }
            let chunks: Vec<Vec<(usize, u32, Vec<TransactWriteItem>)>> =
                chunked(writes, INSERT_CHUNK);
            let results = self
                .concurrently(chunks, |store, chunk| async move {
                    let items: Vec<TransactWriteItem> = chunk
                        .iter()
                        .flat_map(|(_, _, items)| items.clone())
                        .collect();
                    let ok = store.transact("TransactWriteItems (insert)", items).await?;
                    Ok((
                        ok,
                        chunk
                            .into_iter()
                            .map(|(i, v, _)| (i, v))
                            .collect::<Vec<_>>(),
                    ))
                })
                .await?;
            pending = Vec::new();
            let mut moves = Vec::new();
            for (ok, chunk) in results {
                for (i, version) in chunk {
                    if ok {
                        out[i] = Some(Insert::Created {
                            message_id: commands[i].message_id.clone(),
                            version,
                        });
                        moves.push(Move {
                            shard: shard(commands[i].schedule.device_id().as_str()),
                            from: None,
                            to: CommandState::Created,
                        });
                    } else {
                        pending.push(i);
                    }
                }
            }
            self.count(&moves).await;
            if !pending.is_empty() {
                backoff(attempt).await;
            }
        }
        Err(self.err(
            "TransactWriteItems (insert)",
            format!("{} commands kept conflicting", pending.len()),
        ))
    }

    /// The command item, its message pointer and its version claim, as transaction items.
    fn new_command_items(
        &self,
        cmd: &NewCommand,
        version: u32,
        claim: Option<&Item>,
        at: Timestamp,
    ) -> Result<Vec<TransactWriteItem>, CloudError> {
        let sch = &cmd.schedule;
        let device = sch.device_id().as_str();
        let date = sch.day().date().to_string();
        let id = cmd.message_id.as_str();
        let shard_no = shard(device);
        // It governs from the first period that starts after it was created.
        let next_boundary = period_start_at(at, sch.day().tz())
            .map_err(|e| self.corrupt(e))?
            .checked_add(jiff::SignedDuration::from_secs(
                max300_protocol::PERIOD_SECS,
            ))
            .map_err(|e| self.corrupt(e))?;
        let governs_from = sch.day().start().max(next_boundary);
        let ends_at = text(sch.day().end());
        let plan = encode_plan(sch.setpoints());
        let sk = format!("C#{date}#{version:05}");
        let mut command = Item::from([
            ("pk".into(), s(device_pk(device))),
            ("sk".into(), s(sk.clone())),
            ("kind".into(), s("command")),
            ("message_id".into(), s(id)),
            ("device_id".into(), s(device)),
            ("schedule_date".into(), s(date.clone())),
            ("timezone".into(), s(sch.day().tz_name())),
            ("version".into(), num(version)),
            ("sha256".into(), s(sch.sha256())),
            ("state".into(), s("created")),
            ("late".into(), AttributeValue::Bool(false)),
            ("governs_from".into(), s(text(governs_from))),
            ("ends_at".into(), s(ends_at.clone())),
            ("created_at".into(), s(text(at))),
            ("publishes".into(), num(0)),
            ("sends".into(), AttributeValue::L(Vec::new())),
            (
                "history".into(),
                AttributeValue::L(vec![s(history_entry(CommandState::Created, at))]),
            ),
            ("periods".into(), num(plan_len(&plan))),
            ("plan".into(), s(plan)),
            ("skip_before".into(), num(0)),
            ("rev".into(), num(0)),
            ("gsi1pk".into(), s(format!("DATE#{date}#{shard_no}"))),
            ("gsi1sk".into(), s(format!("{device}#{version:05}"))),
            ("gsi2pk".into(), s(format!("OPEN#created#{shard_no}"))),
            ("gsi2sk".into(), s(ends_at.clone())),
        ]);
        if let Some(tp) = &cmd.traceparent {
            command.insert("traceparent".into(), s(tp.as_str()));
        }
        let pointer = Item::from([
            ("pk".into(), s(message_pk(id))),
            ("sk".into(), s("#")),
            ("kind".into(), s("command")),
            ("device_id".into(), s(device)),
            ("csk".into(), s(sk)),
        ]);
        let latest = Item::from([
            ("pk".into(), s(device_pk(device))),
            ("sk".into(), s(format!("L#{date}"))),
            ("version".into(), num(version)),
            ("message_id".into(), s(id)),
            ("sha256".into(), s(sch.sha256())),
        ]);
        // The claim on the version: exactly one writer moves `latest` from what it read.
        let latest_put = match claim.and_then(|c| c.get("version")) {
            Some(old) => Put::builder()
                .table_name(&*self.table)
                .set_item(Some(latest))
                .condition_expression("#v = :old")
                .expression_attribute_names("#v", "version")
                .expression_attribute_values(":old", old.clone())
                .build(),
            None => Put::builder()
                .table_name(&*self.table)
                .set_item(Some(latest))
                .condition_expression("attribute_not_exists(pk)")
                .build(),
        }
        .map_err(|e| self.err("TransactWriteItems (insert)", e))?;
        Ok(vec![
            put_new_tx(&self.table, command)?,
            put_new_tx(&self.table, pointer)?,
            TransactWriteItem::builder().put(latest_put).build(),
        ])
    }

    async fn command_detail(&self, row: Row) -> Result<CommandDetail, CloudError> {
        let day = row.day().map_err(|e| self.corrupt(e))?;
        let reports = self
            .reports_between(&row.device_id, day.start(), day.end(), true)
            .await?;
        let mut periods: Vec<PeriodView> = decode_plan(&row.plan)
            .map_err(|e| self.corrupt(e))?
            .into_iter()
            .zip(1..)
            .map(|(sp, period)| {
                let (status, reason) = row.mark(period).unwrap_or((PeriodStatus::Pending, None));
                PeriodView {
                    period,
                    start: day.period_start(period),
                    mode: sp.mode().as_str().to_owned(),
                    rate_kw: sp.rate(),
                    status,
                    applied_kw: None,
                    limited_by: None,
                    reason,
                    error: None,
                    soc_pct: None,
                    at: None,
                }
            })
            .collect();
        for r in reports.into_iter().filter(|r| {
            r.message_id
                .as_ref()
                .is_some_and(|m| m.as_str() == row.message_id)
        }) {
            let Some(period) = day
                .boundary(r.interval_start)
                .ok()
                .filter(|b| *b < day.period_count())
                .map(|b| b + 1)
            else {
                continue;
            };
            if let Some(view) = periods.get_mut(period as usize - 1) {
                view.status = PeriodStatus::from(r.status);
                view.applied_kw = r.applied_kw;
                view.limited_by = r.limited_by.and_then(wire_name);
                view.reason = r.reason.and_then(wire_name);
                view.error = r.error.clone();
                view.soc_pct = r.soc_pct;
                view.at = Some(r.at);
            }
        }
        Ok(CommandDetail {
            summary: row.summary().map_err(|e| self.corrupt(e))?,
            sha256: row.sha256.clone(),
            acked_sha256: row.acked_sha256.clone(),
            effective_period: row.effective_period,
            publishes: row.publishes,
            history: row.history.clone(),
            sends: row.sends.clone(),
            warning: row.warning.clone(),
            periods,
        })
    }

    async fn reports_between(
        &self,
        device: &str,
        from: Timestamp,
        to: Timestamp,
        consistent: bool,
    ) -> Result<Vec<ReportMsg>, CloudError> {
        let (lo, hi) = (format!("R#{}", text(from)), format!("R#{}", text(to)));
        let items = self
            .query(
                None,
                "pk = :pk AND sk BETWEEN :lo AND :hi",
                &[
                    (":pk", s(device_pk(device))),
                    (":lo", s(lo)),
                    (":hi", s(hi.clone())),
                ],
                consistent,
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

    /// Every command of one date, through the date index.
    async fn on_date(&self, date: Date) -> Result<Vec<Row>, CloudError> {
        self.shards("gsi1", format!("DATE#{date}"), None)
            .await?
            .iter()
            .map(|i| self.row(i))
            .collect()
    }

    async fn all_devices(&self) -> Result<Vec<DeviceRecord>, CloudError> {
        let mut devices: Vec<DeviceRecord> = self
            .shards("gsi1", "DEV".into(), None)
            .await?
            .iter()
            .map(|i| device_record(i).map_err(|e| self.corrupt(e)))
            .collect::<Result<_, _>>()?;
        devices.sort_by(|a, b| a.device_id.as_str().cmp(b.device_id.as_str()));
        Ok(devices)
    }

    async fn sweep_one(
        &self,
        mut row: Row,
        now: Timestamp,
        decide: fn(&Row, Timestamp) -> Option<Sweep>,
    ) -> Result<Option<(Row, Option<CommandState>)>, CloudError> {
        for attempt in 0..ATTEMPTS {
            let Some(Sweep {
                state: next,
                late,
                unreported,
            }) = decide(&row, now)
            else {
                return Ok(None);
            };
            let mut change = Change::guarded(&row);
            if late != row.late {
                change.set("late", AttributeValue::Bool(late));
            }
            if unreported {
                change.set("unreported", AttributeValue::Bool(true));
            }
            let states: Vec<CommandState> = next.into_iter().collect();
            change.states(&row, &states, late, now);
            if let Some(item) = self.update(change, &row.pk, &row.sk).await? {
                if let Some(next) = next {
                    self.count(&[Move::new(&row, next)]).await;
                }
                return Ok(Some((self.row(&item)?, next)));
            }
            match self.get(&row.pk, &row.sk).await? {
                Some(item) => row = self.row(&item)?,
                None => return Ok(None),
            }
            backoff(attempt).await;
        }
        Err(self.err(
            "UpdateItem (sweep)",
            format!("{}: kept conflicting", row.message_id),
        ))
    }
}

async fn join_one<R>(
    set: &mut JoinSet<(usize, Result<R, CloudError>)>,
    out: &mut [Option<R>],
) -> Result<(), CloudError>
where
    R: Send + 'static,
{
    match set.join_next().await {
        Some(Ok((i, r))) => {
            out[i] = Some(r?);
            Ok(())
        }
        Some(Err(e)) => Err(CloudError::Store(format!("store task failed: {e}"))),
        None => Ok(()),
    }
}

/// A short, growing pause before retrying a lost race or a throttled batch, with jitter so
/// two instances that collided do not collide again.
async fn backoff(attempt: u32) {
    let base = 5u64 << attempt.min(6);
    let ms = base + fastrand::u64(0..=base);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

fn chunked<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut chunk = Vec::with_capacity(size);
    for item in items {
        chunk.push(item);
        if chunk.len() == size {
            out.push(std::mem::replace(&mut chunk, Vec::with_capacity(size)));
        }
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
    out
}

/// What `dynamodb://TABLE[?endpoint=URL&region=REGION]` names.
#[derive(Debug, PartialEq)]
struct StoreUrl {
    table: String,
    endpoint: Option<String>,
    region: Option<String>,
}

impl StoreUrl {
    fn parse(url: &str) -> Result<StoreUrl, CloudError> {
        let bad = |why: String| CloudError::Store(format!("store URL {url:?}: {why}"));
        let rest = url
            .strip_prefix("dynamodb://")
            .ok_or_else(|| bad("expected dynamodb://TABLE[?endpoint=URL&region=REGION]".into()))?;
        let (table, query) = rest.split_once('?').unwrap_or((rest, ""));
        let valid = (3..=255).contains(&table.len())
            && table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(bad(format!(
                "table name {table:?} must be 3-255 characters of A-Z a-z 0-9 _ - ."
            )));
        }
        let mut target = StoreUrl {
            table: table.to_owned(),
            endpoint: None,
            region: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", v)) if !v.is_empty() => target.endpoint = Some(v.to_owned()),
                Some(("region", v)) if !v.is_empty() => target.region = Some(v.to_owned()),
                _ => {
                    return Err(bad(format!(
                        "unknown or empty parameter {pair:?} (known: endpoint, region)"
                    )));
                }
            }
        }
        Ok(target)
    }
}

/// What the sweeper does to one command: its new state (none when only flagging `late`),
/// the `late` flag, and whether its pending periods turn `unreported`.
struct Sweep {
    state: Option<CommandState>,
    late: bool,
    unreported: bool,
}

/// A counted state change: one command of `shard` moved from `from` (none when created) to
/// `to`.
struct Move {
    shard: u32,
    from: Option<CommandState>,
    to: CommandState,
}

impl Move {
    fn new(row: &Row, to: CommandState) -> Move {
        Move {
            shard: shard(&row.device_id),
            from: Some(row.state),
            to,
        }
    }
}

/// One update expression with its condition, every attribute name behind a placeholder
/// (DynamoDB reserves hundreds of words, `state` and `version` among them).
#[derive(Clone, Debug, Default)]
struct Change {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    set: Vec<String>,
    add: Vec<String>,
    remove: Vec<String>,
    cond: Vec<String>,
}

impl Change {
    /// A change to a command that applies only if no one else changed it since `row` was
    /// read.
    fn guarded(row: &Row) -> Change {
        let mut c = Change::default();
        let rev = c.n("rev");
        let was = c.v(num(row.rev));
        let next = c.v(num(row.rev + 1));
        c.when(format!("{rev} = {was}"));
        c.set_raw(format!("{rev} = {next}"));
        c
    }

    fn n(&mut self, attr: &str) -> String {
        let alias = format!("#{}", attr.replace('_', ""));
        self.names.insert(alias.clone(), attr.to_owned());
        alias
    }

    fn v(&mut self, value: AttributeValue) -> String {
        let alias = format!(":v{}", self.values.len());
        self.values.insert(alias.clone(), value);
        alias
    }

    fn set(&mut self, attr: &str, value: AttributeValue) {
        let (n, v) = (self.n(attr), self.v(value));
        self.set.push(format!("{n} = {v}"));
    }

    fn set_raw(&mut self, expr: String) {
        self.set.push(expr);
    }

    fn add(&mut self, attr: &str, value: AttributeValue) {
        let (n, v) = (self.n(attr), self.v(value));
        self.add.push(format!("{n} {v}"));
    }

    fn remove(&mut self, attr: &str) {
        let n = self.n(attr);
        self.remove.push(n);
    }

    fn when(&mut self, cond: String) {
        self.cond.push(cond);
    }

    /// Appends the states to the history, sets the last one, and puts the command in the
    /// open-commands index under its new state (or takes it out once it has ended).
    fn states(&mut self, row: &Row, states: &[CommandState], late: bool, at: Timestamp) {
        let state = states.last().copied().unwrap_or(row.state);
        if !states.is_empty() {
            self.set("state", s(state.as_str()));
            let h = self.n("history");
            let entries = self.v(AttributeValue::L(
                states.iter().map(|st| s(history_entry(*st, at))).collect(),
            ));
            self.set_raw(format!("{h} = list_append({h}, {entries})"));
        }
        match open_key(state, late) {
            Some(k) => {
                self.set("gsi2pk", s(format!("OPEN#{k}#{}", shard(&row.device_id))));
                self.set("gsi2sk", s(text(row.ends_at)));
            }
            None => {
                self.remove("gsi2pk");
                self.remove("gsi2sk");
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn parts(
        self,
    ) -> (
        String,
        Option<HashMap<String, String>>,
        Option<HashMap<String, AttributeValue>>,
        Option<String>,
    ) {
        let mut expr = Vec::new();
        if !self.set.is_empty() {
            expr.push(format!("SET {}", self.set.join(", ")));
        }
        if !self.add.is_empty() {
            expr.push(format!("ADD {}", self.add.join(", ")));
        }
        if !self.remove.is_empty() {
            expr.push(format!("REMOVE {}", self.remove.join(", ")));
        }
        let cond = (!self.cond.is_empty()).then(|| self.cond.join(" AND "));
        (
            expr.join(" "),
            (!self.names.is_empty()).then_some(self.names),
            (!self.values.is_empty()).then_some(self.values),
            cond,
        )
    }

    fn tx(self, table: &str, pk: &str, sk: &str) -> Result<TransactWriteItem, CloudError> {
        let (expr, names, values, cond) = self.parts();
        let update = Update::builder()
            .table_name(table)
            .set_key(Some(key(pk, sk)))
            .update_expression(expr)
            .set_condition_expression(cond)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .build()
            .map_err(|e| CloudError::Store(format!("dynamodb table {table}: {e}")))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

fn put_new_tx(table: &str, item: Item) -> Result<TransactWriteItem, CloudError> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .map_err(|e| CloudError::Store(format!("dynamodb table {table}: {e}")))?;
    Ok(TransactWriteItem::builder().put(put).build())
}

/// Where an open command sits in `gsi2`: created, sent and acknowledged commands wait for
/// a publish, an ack or the sweeper; an expired one only until the sweeper flags it late.
fn open_key(state: CommandState, late: bool) -> Option<&'static str> {
    match state {
        CommandState::Created => Some("created"),
        CommandState::Sent => Some("sent"),
        CommandState::Acknowledged => Some("acknowledged"),
        CommandState::Expired if !late => Some("expired"),
        _ => None,
    }
}

const DEVICE_SK: &str = "#DEVICE";

fn device_pk(device: &str) -> String {
    format!("D#{device}")
}

fn message_pk(id: &str) -> String {
    format!("M#{id}")
}

fn key(pk: &str, sk: &str) -> Item {
    Item::from([("pk".into(), s(pk)), ("sk".into(), s(sk))])
}

fn command_key(pointer: &Item) -> Result<(String, String), String> {
    let device = get_s(pointer, "device_id").ok_or("a message pointer without device_id")?;
    let sk = get_s(pointer, "csk").ok_or("a message pointer without csk")?;
    Ok((device_pk(device), sk.to_owned()))
}

/// A device's shard of the sharded index keys: FNV-1a, stable across builds and processes.
fn shard(device: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in device.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % SHARDS
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn num(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn get_n<T: std::str::FromStr>(item: &Item, k: &str) -> Option<T> {
    item.get(k)?.as_n().ok()?.parse().ok()
}

fn get_bool(item: &Item, k: &str) -> bool {
    item.get(k)
        .and_then(|v| v.as_bool().ok())
        .copied()
        .unwrap_or(false)
}

/// A set of periods kept as a bit mask (bit p-1 for period p): 9 bytes for a whole day where
/// a number set takes about 100, which keeps a command item near 1 KB (one write unit).
/// Every writer of these holds the command's revision, so a read-modify-write is safe.
fn get_bits(item: &Item, k: &str) -> BTreeSet<u32> {
    let mask: u64 = get_n(item, k).unwrap_or(0);
    (1..=64).filter(|p| mask & (1u64 << (p - 1)) != 0).collect()
}

fn bits(periods: &BTreeSet<u32>) -> u64 {
    periods
        .iter()
        .filter(|p| (1..=64).contains(*p))
        .fold(0, |mask, p| mask | (1u64 << (p - 1)))
}

fn get_list(item: &Item, k: &str) -> Vec<String> {
    item.get(k)
        .and_then(|v| v.as_l().ok())
        .map(|l| l.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
        .unwrap_or_default()
}

fn need<'a>(item: &'a Item, k: &str) -> Result<&'a str, String> {
    get_s(item, k).ok_or_else(|| {
        format!(
            "item {}/{} lacks {k}",
            get_s(item, "pk").unwrap_or("?"),
            get_s(item, "sk").unwrap_or("?")
        )
    })
}

fn parse<T: std::str::FromStr>(item: &Item, k: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    need(item, k)?.parse().map_err(|e| format!("{k}: {e}"))
}

fn opt_ts(item: &Item, k: &str) -> Result<Option<Timestamp>, String> {
    get_s(item, k)
        .map(|t| t.parse().map_err(|e| format!("{k}: {e}")))
        .transpose()
}

fn history_entry(state: CommandState, at: Timestamp) -> String {
    format!("{} {}", state.as_str(), text(at))
}

/// A wire enum's name (`soc_max`, `superseded`).
fn wire_name(v: impl serde::Serialize) -> Option<String> {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
}

fn rate(item: &Item, k: &str) -> Option<RateKw> {
    get_n::<u32>(item, k).map(RateKw::from_watts)
}

fn device_record(item: &Item) -> Result<DeviceRecord, String> {
    Ok(DeviceRecord {
        device_id: parse(item, "device_id")?,
        max_rate_kw: rate(item, "max_rate_w"),
        registered_at: parse(item, "registered_at")?,
        last_seen: opt_ts(item, "last_seen")?,
        mode: get_s(item, "mode").map(str::to_owned),
        rate_kw: rate(item, "rate_w"),
        soc_pct: get_n(item, "soc_pct"),
        fallback: get_s(item, "fallback").map(str::to_owned),
        active_message_id: get_s(item, "active_message_id").map(str::to_owned),
        outbox: get_n(item, "outbox"),
    })
}

/// A command item, read.
#[derive(Clone, Debug)]
struct Row {
    pk: String,
    sk: String,
    message_id: String,
    device_id: String,
    schedule_date: String,
    timezone: String,
    version: u32,
    sha256: String,
    state: CommandState,
    late: bool,
    governs_from: Timestamp,
    ends_at: Timestamp,
    created_at: Timestamp,
    effective_period: Option<u32>,
    acked_sha256: Option<String>,
    publishes: u32,
    sends: Vec<Timestamp>,
    history: Vec<HistoryEntry>,
    plan: String,
    periods: u32,
    traceparent: Option<String>,
    warning: Option<String>,
    /// Periods before this one are `skipped` (with `skip_reason`) unless reported.
    skip_before: u32,
    skip_reason: Option<String>,
    /// Periods from this one on are `skipped` (`superseded`) unless reported.
    skip_from: Option<u32>,
    /// The sweeper ended it `incomplete`: periods with neither a report nor a mark are
    /// `unreported`.
    unreported: bool,
    /// Periods with a report for this command.
    reported: BTreeSet<u32>,
    /// Of those, the ones executed at the planned rate.
    as_planned: BTreeSet<u32>,
    rev: u64,
}

impl Row {
    fn parse(item: &Item) -> Result<Row, String> {
        let history = get_list(item, "history")
            .iter()
            .map(|h| {
                let (state, at) = h.split_once(' ').ok_or("a bad history entry")?;
                Ok(HistoryEntry {
                    state: state.parse()?,
                    at: at.parse().map_err(|e| format!("history: {e}"))?,
                })
            })
            .collect::<Result<_, String>>()?;
        let sends = get_list(item, "sends")
            .iter()
            .map(|t| t.parse().map_err(|e| format!("sends: {e}")))
            .collect::<Result<_, String>>()?;
        let plan = need(item, "plan").unwrap_or_default().to_owned();
        Ok(Row {
            pk: need(item, "pk")?.to_owned(),
            sk: need(item, "sk")?.to_owned(),
            message_id: need(item, "message_id")?.to_owned(),
            device_id: need(item, "device_id")?.to_owned(),
            schedule_date: need(item, "schedule_date")?.to_owned(),
            timezone: need(item, "timezone")?.to_owned(),
            version: get_n(item, "version").ok_or("a command without version")?,
            sha256: need(item, "sha256")?.to_owned(),
            state: parse(item, "state")?,
            late: get_bool(item, "late"),
            governs_from: parse(item, "governs_from")?,
            ends_at: parse(item, "ends_at")?,
            created_at: parse(item, "created_at")?,
            effective_period: get_n(item, "effective_period"),
            acked_sha256: get_s(item, "acked_sha256").map(|a| match a {
                "=" => need(item, "sha256").unwrap_or_default().to_owned(),
                other => other.to_owned(),
            }),
            publishes: get_n(item, "publishes").unwrap_or(0),
            sends,
            history,
            periods: plan_len(&plan),
            plan,
            traceparent: get_s(item, "traceparent").map(str::to_owned),
            warning: get_s(item, "warning").map(str::to_owned),
            skip_before: get_n(item, "skip_before").unwrap_or(0),
            skip_reason: get_s(item, "skip_reason").map(str::to_owned),
            skip_from: get_n(item, "skip_from"),
            unreported: get_bool(item, "unreported"),
            reported: get_bits(item, "reported"),
            as_planned: get_bits(item, "as_planned"),
            rev: get_n(item, "rev").unwrap_or(0),
        })
    }

    fn day(&self) -> Result<Day, String> {
        let date: Date = self.schedule_date.parse().map_err(|e| format!("{e}"))?;
        Day::named(date, &self.timezone).map_err(|e| e.to_string())
    }

    /// A period's status and reason when it has no report.
    fn mark(&self, p: u32) -> Option<(PeriodStatus, Option<String>)> {
        if p < self.skip_before {
            Some((PeriodStatus::Skipped, self.skip_reason.clone()))
        } else if self.skip_from.is_some_and(|f| p >= f) {
            Some((PeriodStatus::Skipped, Some("superseded".into())))
        } else if self.unreported {
            Some((PeriodStatus::Unreported, None))
        } else {
            None
        }
    }

    /// Periods that are done (reported or skipped) with the given reports and marks.
    fn done(&self, reported: &BTreeSet<u32>, skip_before: u32, skip_from: Option<u32>) -> u32 {
        (1..=self.periods)
            .filter(|p| {
                reported.contains(p) || *p < skip_before || skip_from.is_some_and(|f| *p >= f)
            })
            .count() as u32
    }

    fn summary(&self) -> Result<CommandSummary, String> {
        Ok(CommandSummary {
            message_id: MessageId::parse(self.message_id.clone()).map_err(|e| e.to_string())?,
            device_id: DeviceId::parse(self.device_id.clone()).map_err(|e| e.to_string())?,
            schedule_date: self.schedule_date.parse().map_err(|e| format!("{e}"))?,
            version: self.version,
            state: self.state,
            late: self.late,
        })
    }

    fn live(&self) -> bool {
        !matches!(
            self.state,
            CommandState::Rejected | CommandState::Cancelled | CommandState::Superseded
        )
    }
}

/// The latest version per device, of the rows that pass `keep`.
fn latest_per_device(rows: &[Row], keep: impl Fn(&Row) -> bool) -> BTreeMap<&str, &Row> {
    let mut latest: BTreeMap<&str, &Row> = BTreeMap::new();
    for row in rows.iter().filter(|r| keep(r)) {
        let slot = latest.entry(row.device_id.as_str()).or_insert(row);
        if row.version > slot.version {
            *slot = row;
        }
    }
    latest
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
        let at_v = change.v(s(text(at)));
        change.set_raw(format!("{reg} = if_not_exists({reg}, {at_v})"));
        change.set("device_id", s(device.as_str()));
        change.set("gsi1pk", s(format!("DEV#{}", shard(device.as_str()))));
        change.set("gsi1sk", s(device.as_str()));
        if let Some(rate) = max_rate {
            change.set("max_rate_w", num(rate.watts()));
        }
        self.update(change, &device_pk(device.as_str()), DEVICE_SK)
            .await?
            .ok_or_else(|| self.err("UpdateItem (register)", "conflicted"))?;
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
        self.all_devices().await
    }

    async fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, CloudError> {
        self.get(&device_pk(device.as_str()), DEVICE_SK)
            .await?
            .map(|i| device_record(&i).map_err(|e| self.corrupt(e)))
            .transpose()
    }

    async fn record_heartbeat(&self, hb: &HeartbeatMsg, at: Timestamp) -> Result<(), CloudError> {
        // Only attributes that are not index keys change, so the device's `gsi1` entry is
        // rewritten in place (one index write), never moved (two).
        let mut change = Change::default();
        change.when("attribute_exists(pk)".into());
        change.set("last_seen", s(text(at)));
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

    async fn insert_commands(
        &self,
        commands: &[NewCommand],
        at: Timestamp,
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
            self.insert_round(&commands, round, at, &mut out).await?;
        }
        out.into_iter()
            .map(|i| i.ok_or_else(|| CloudError::Store("insert_commands lost a result".into())))
            .collect()
    }

    async fn schedule_message(&self, id: &MessageId) -> Result<Option<ScheduleMsg>, CloudError> {
        let Some(row) = self.command_row(id).await? else {
            return Ok(None);
        };
        let day = row.day().map_err(|e| self.corrupt(e))?;
        let setpoints: Vec<Setpoint> = decode_plan(&row.plan).map_err(|e| self.corrupt(e))?;
        let device: DeviceId = row.device_id.parse().map_err(|e| self.corrupt(e))?;
        let schedule = Schedule::new(device, day, setpoints)
            .ok_or_else(|| self.corrupt(format!("{id}: stored periods do not match the date")))?;
        let mut msg = ScheduleMsg::new(&schedule, id.clone(), row.version, row.created_at);
        msg.traceparent = row.traceparent.and_then(|t| TraceParent::parse(&t).ok());
        Ok(Some(msg))
    }

    async fn command_traceparent(&self, id: &MessageId) -> Result<Option<TraceParent>, CloudError> {
        Ok(self
            .command_row(id)
            .await?
            .and_then(|r| r.traceparent)
            .and_then(|t| TraceParent::parse(&t).ok()))
    }

    async fn mark_sent(&self, ids: &[MessageId], at: Timestamp) -> Result<(), CloudError> {
        let keys = ids
            .iter()
            .map(|id| (message_pk(id.as_str()), "#".to_owned()))
            .collect();
        let pointers: HashMap<String, Item> = self
            .batch_get(keys)
            .await?
            .into_iter()
            .filter_map(|i| Some((get_s(&i, "pk")?.to_owned(), i)))
            .collect();
        let work: Vec<(MessageId, Item)> = ids
            .iter()
            .filter_map(|id| Some((id.clone(), pointers.get(&message_pk(id.as_str()))?.clone())))
            .collect();
        // Each publish is one atomic update, so they may run concurrently.
        self.concurrently(work, move |store, (id, pointer)| {
            store.mark_one_sent(id, pointer, at)
        })
        .await?;
        Ok(())
    }

    async fn record_ack(&self, ack: &AckMsg, at: Timestamp) -> Result<Recorded, CloudError> {
        self.apply_ack(ack, at).await
    }

    async fn record_acks(
        &self,
        acks: &[AckMsg],
        at: Timestamp,
    ) -> Result<Vec<Recorded>, CloudError> {
        // Each ack is applied atomically; acks of different devices and messages are
        // independent, so those run concurrently, and one device's acks in order.
        let mut groups: Vec<Vec<(usize, AckMsg)>> = Vec::new();
        let mut group_of: HashMap<&str, usize> = HashMap::new();
        for (i, ack) in acks.iter().enumerate() {
            let by_device = group_of.get(ack.device_id.as_str()).copied();
            let by_message = group_of.get(ack.message_id.as_str()).copied();
            let g = match (by_device, by_message) {
                (Some(a), Some(b)) if a != b => {
                    // Ties two groups together: fall back to one after the other.
                    return self.record_acks_in_turn(acks, at).await;
                }
                (Some(g), _) | (None, Some(g)) => g,
                (None, None) => {
                    groups.push(Vec::new());
                    groups.len() - 1
                }
            };
            group_of.insert(ack.device_id.as_str(), g);
            group_of.insert(ack.message_id.as_str(), g);
            groups[g].push((i, ack.clone()));
        }
        let done = self
            .concurrently(groups, move |store, group| async move {
                let mut out = Vec::with_capacity(group.len());
                for (i, ack) in group {
                    out.push((i, store.apply_ack(&ack, at).await?));
                }
                Ok(out)
            })
            .await?;
        let mut out = vec![Recorded::Duplicate; acks.len()];
        for (i, r) in done.into_iter().flatten() {
            out[i] = r;
        }
        Ok(out)
    }

    async fn record_report(
        &self,
        report: &ReportMsg,
        at: Timestamp,
    ) -> Result<Recorded, CloudError> {
        let recorded = self.apply_report(report, at).await?;
        self.touch(&report.device_id, at).await?;
        Ok(recorded)
    }

    async fn reports(
        &self,
        device: &DeviceId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<ReportMsg>, CloudError> {
        self.reports_between(device.as_str(), from, to, false).await
    }

    async fn command(&self, id: &MessageId) -> Result<Option<CommandDetail>, CloudError> {
        match self.command_row(id).await? {
            Some(row) => self.command_detail(row).await.map(Some),
            None => Ok(None),
        }
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
            (None, Some(date)) => self.shards("gsi1", format!("DATE#{date}"), None).await?,
            (None, None) => self.scan_commands().await?,
        };
        let mut rows: Vec<CommandSummary> = items
            .iter()
            .map(|i| self.row(i)?.summary().map_err(|e| self.corrupt(e)))
            .collect::<Result<_, _>>()?;
        rows.sort_by(|a, b| {
            b.schedule_date
                .cmp(&a.schedule_date)
                .then_with(|| a.device_id.as_str().cmp(b.device_id.as_str()))
                .then_with(|| b.version.cmp(&a.version))
        });
        Ok(rows)
    }

    async fn planned_from(
        &self,
        date: Date,
        from: Timestamp,
    ) -> Result<Vec<(DeviceId, Setpoint)>, CloudError> {
        let rows = self.on_date(date).await?;
        let mut out = Vec::new();
        for row in latest_per_device(&rows, Row::live).into_values() {
            let device: DeviceId = row.device_id.parse().map_err(|e| self.corrupt(e))?;
            let day = row.day().map_err(|e| self.corrupt(e))?;
            for (sp, period) in decode_plan(&row.plan)
                .map_err(|e| self.corrupt(e))?
                .into_iter()
                .zip(1..)
            {
                if day.period_start(period) >= from {
                    out.push((device.clone(), sp));
                }
            }
        }
        Ok(out)
    }

    async fn record_warnings(&self, warnings: &[(MessageId, String)]) -> Result<(), CloudError> {
        let keys = warnings
            .iter()
            .map(|(id, _)| (message_pk(id.as_str()), "#".to_owned()))
            .collect();
        let pointers: HashMap<String, Item> = self
            .batch_get(keys)
            .await?
            .into_iter()
            .filter(|p| get_s(p, "kind") == Some("command"))
            .filter_map(|i| Some((get_s(&i, "pk")?.to_owned(), i)))
            .collect();
        let mut work = Vec::new();
        for (id, warning) in warnings {
            if let Some(p) = pointers.get(&message_pk(id.as_str())) {
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

    async fn fleet(
        &self,
        today: Date,
        tomorrow: Date,
        ended_by: Timestamp,
    ) -> Result<Vec<FleetRow>, CloudError> {
        let (devices, today_rows, tomorrow_rows) = tokio::try_join!(
            self.all_devices(),
            self.on_date(today),
            self.on_date(tomorrow)
        )?;
        let latest_today = latest_per_device(&today_rows, |_| true);
        let latest_tomorrow = latest_per_device(&tomorrow_rows, |_| true);
        devices
            .into_iter()
            .map(|device| {
                let mut row = FleetRow {
                    device,
                    today: None,
                    tomorrow: None,
                    due: 0,
                    as_planned: 0,
                };
                let id = row.device.device_id.as_str();
                if let Some(c) = latest_tomorrow.get(id) {
                    row.tomorrow = Some(c.summary().map_err(|e| self.corrupt(e))?);
                }
                if let Some(c) = latest_today.get(id) {
                    row.today = Some(c.summary().map_err(|e| self.corrupt(e))?);
                    // Periods due: from the effective one to the last that started by
                    // `ended_by`; as planned: those executed at exactly the planned rate.
                    let day = c.day().map_err(|e| self.corrupt(e))?;
                    let effective = c.effective_period.unwrap_or(1);
                    let counted = |p: u32| p >= effective && day.period_start(p) <= ended_by;
                    row.due = (1..=c.periods).filter(|p| counted(*p)).count() as u32;
                    row.as_planned = c.as_planned.iter().filter(|p| counted(**p)).count() as u32;
                }
                Ok(row)
            })
            .collect()
    }

    async fn current_commands(
        &self,
        device: &DeviceId,
        from: Date,
    ) -> Result<Vec<CurrentCommand>, CloudError> {
        let items = self
            .query(
                None,
                "pk = :pk AND sk BETWEEN :lo AND :hi",
                &[
                    (":pk", s(device_pk(device.as_str()))),
                    (":lo", s(format!("C#{from}"))),
                    (":hi", s("C#~")),
                ],
                true,
            )
            .await?;
        let rows: Vec<Row> = items
            .iter()
            .map(|i| self.row(i))
            .collect::<Result<_, _>>()?;
        let mut latest: BTreeMap<&str, &Row> = BTreeMap::new();
        for row in rows.iter().filter(|r| r.live()) {
            let slot = latest.entry(row.schedule_date.as_str()).or_insert(row);
            if row.version > slot.version {
                *slot = row;
            }
        }
        latest
            .into_values()
            .map(|r| {
                Ok(CurrentCommand {
                    message_id: r.message_id.parse().map_err(|e| self.corrupt(e))?,
                    schedule_date: r.schedule_date.parse().map_err(|e| self.corrupt(e))?,
                    version: r.version,
                    sha256: r.sha256.clone(),
                })
            })
            .collect()
    }

    async fn unsent(&self) -> Result<Vec<MessageId>, CloudError> {
        let mut ids: Vec<MessageId> = self
            .shards("gsi2", "OPEN#created".into(), None)
            .await?
            .iter()
            .map(|i| {
                need(i, "message_id")
                    .or_else(|_| need(i, "pk").map(|pk| pk.trim_start_matches("M#")))
                    .map_err(|e| self.corrupt(e))?
                    .parse()
                    .map_err(|e| self.corrupt(e))
            })
            .collect::<Result<_, _>>()?;
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(ids)
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
            .ok_or_else(|| self.err("UpdateItem (ingestion id)", "conflicted"))?;
        let id: i64 = get_n(&counter, "n")
            .ok_or_else(|| self.corrupt("the ingestion counter has no number"))?;
        let item = Item::from([
            ("pk".into(), s(format!("I#{id}"))),
            ("sk".into(), s("#")),
            ("id".into(), num(id)),
            ("schedule_date".into(), s(date.to_string())),
            ("source".into(), s(source)),
            ("audit_key".into(), s(audit_key)),
            ("started_at".into(), s(text(at))),
            ("gsi2pk".into(), s("INGEST#OPEN")),
            ("gsi2sk".into(), s(format!("{id:020}"))),
        ]);
        if !self.put_new(item).await? {
            return Err(self.err("PutItem (ingestion)", format!("id {id} already used")));
        }
        Ok(id)
    }

    async fn finish_ingestion(
        &self,
        id: i64,
        counts: IngestionCounts,
        at: Timestamp,
    ) -> Result<(), CloudError> {
        let pk = format!("I#{id}");
        let Some(run) = self.get(&pk, "#").await? else {
            return Ok(());
        };
        let mut change = Change::default();
        change.set("accepted", num(counts.accepted));
        change.set("unchanged", num(counts.unchanged));
        change.set("rejected", num(counts.rejected));
        change.set("finished_at", s(text(at)));
        change.remove("gsi2pk");
        change.remove("gsi2sk");
        change.when("attribute_exists(pk)".into());
        let mut items = vec![change.tx(&self.table, &pk, "#")?];
        if get_s(&run, "source") == Some("fetch") {
            // A marker read with one consistent GetItem by `ingested`, not through an index.
            let date = need(&run, "schedule_date").map_err(|e| self.corrupt(e))?;
            let marker = Put::builder()
                .table_name(&*self.table)
                .set_item(Some(Item::from([
                    ("pk".into(), s(format!("INGESTED#{date}"))),
                    ("sk".into(), s("fetch")),
                    ("id".into(), num(id)),
                    ("finished_at".into(), s(text(at))),
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
                return Ok(());
            }
            backoff(attempt).await;
        }
        Err(self.err("TransactWriteItems (finish ingestion)", "kept conflicting"))
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
        let mut runs: Vec<Interrupted> = items
            .iter()
            .map(|i| {
                Ok(Interrupted {
                    id: get_n(i, "id").ok_or("an ingestion without id")?,
                    schedule_date: parse(i, "schedule_date")?,
                    source: need(i, "source")?.to_owned(),
                    audit_key: need(i, "audit_key")?.to_owned(),
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

    async fn awaiting_ack(&self, now: Timestamp) -> Result<Vec<Unacked>, CloudError> {
        // The sort key is the end of the command's date: `> now` is "not over".
        let items = self
            .shards("gsi2", "OPEN#sent".into(), Some((">", s(text(now)))))
            .await?;
        let sent: Vec<&Item> = items
            .iter()
            .filter(|i| get_s(i, "last_sent_at").is_some())
            .collect();
        let latest_keys = sent
            .iter()
            .filter(|i| get_s(i, "kind") == Some("command"))
            .filter_map(|i| {
                Some((
                    device_pk(get_s(i, "device_id")?),
                    format!("L#{}", get_s(i, "schedule_date")?),
                ))
            })
            .collect();
        let latest: HashMap<(String, String), u32> = self
            .batch_get(latest_keys)
            .await?
            .iter()
            .filter_map(|l| {
                Some((
                    (get_s(l, "pk")?.to_owned(), get_s(l, "sk")?.to_owned()),
                    get_n(l, "version")?,
                ))
            })
            .collect();
        let mut out = Vec::new();
        for item in sent {
            let id = need(item, "message_id")
                .or_else(|_| need(item, "pk").map(|pk| pk.trim_start_matches("M#")))
                .map_err(|e| self.corrupt(e))?;
            let device = need(item, "device_id").map_err(|e| self.corrupt(e))?;
            if get_s(item, "kind") == Some("command") {
                let date = need(item, "schedule_date").map_err(|e| self.corrupt(e))?;
                let version: u32 = get_n(item, "version").unwrap_or(0);
                let newest = latest
                    .get(&(device_pk(device), format!("L#{date}")))
                    .copied()
                    .unwrap_or(version);
                if newest > version {
                    continue;
                }
            }
            out.push(Unacked {
                message_id: id.parse().map_err(|e| self.corrupt(e))?,
                device_id: device.parse().map_err(|e| self.corrupt(e))?,
                publishes: get_n(item, "publishes").unwrap_or(0),
                last_sent_at: parse(item, "last_sent_at").map_err(|e| self.corrupt(e))?,
            });
        }
        out.sort_by(|a, b| a.message_id.as_str().cmp(b.message_id.as_str()));
        Ok(out)
    }

    async fn sweep(&self, now: Timestamp) -> Result<Vec<Swept>, CloudError> {
        let hour_ago = now - jiff::SignedDuration::from_hours(1);
        let (created, sent, expired, acked) = tokio::try_join!(
            self.shards("gsi2", "OPEN#created".into(), None),
            self.shards("gsi2", "OPEN#sent".into(), None),
            self.shards("gsi2", "OPEN#expired".into(), None),
            self.shards(
                "gsi2",
                "OPEN#acknowledged".into(),
                Some(("<=", s(text(hour_ago)))),
            ),
        )?;
        let commands = |items: Vec<Item>| -> Result<Vec<Row>, CloudError> {
            let mut rows: Vec<Row> = items
                .iter()
                .filter(|i| get_s(i, "kind") == Some("command"))
                .map(|i| self.row(i))
                .collect::<Result<_, _>>()?;
            rows.sort_by(|a, b| (a.created_at, &a.message_id).cmp(&(b.created_at, &b.message_id)));
            Ok(rows)
        };
        let mut unacked = commands([created, sent, expired].concat())?;
        let acked = commands(acked)?;
        let mut out = Vec::new();
        let swept = |row: &Row, state| -> Result<Swept, CloudError> {
            let summary = row.summary().map_err(|e| self.corrupt(e))?;
            Ok(Swept {
                message_id: summary.message_id,
                device_id: summary.device_id,
                state,
            })
        };
        // Not acknowledged when the first period it governs starts.
        fn late(row: &Row, now: Timestamp) -> Option<Sweep> {
            let waiting = matches!(
                row.state,
                CommandState::Created | CommandState::Sent | CommandState::Expired
            );
            (waiting && !row.late && row.governs_from <= now).then_some(Sweep {
                state: None,
                late: true,
                unreported: false,
            })
        }
        // No ack by the end of its last period.
        fn expire(row: &Row, now: Timestamp) -> Option<Sweep> {
            let waiting = matches!(row.state, CommandState::Created | CommandState::Sent);
            (waiting && row.ends_at <= now).then_some(Sweep {
                state: Some(CommandState::Expired),
                late: row.late,
                unreported: false,
            })
        }
        // Periods still unreported an hour after the end.
        fn incomplete(row: &Row, now: Timestamp) -> Option<Sweep> {
            let hour_ago = now - jiff::SignedDuration::from_hours(1);
            (row.state == CommandState::Acknowledged && row.ends_at <= hour_ago).then_some(Sweep {
                state: Some(CommandState::Incomplete),
                late: row.late,
                unreported: true,
            })
        }
        // Each phase runs over all its commands concurrently (a fleet whose broker was down
        // can have thousands to expire at once); the phases run in SQLite's order, and a
        // command flagged late carries its new revision into the next phase.
        let flagged = self
            .concurrently(unacked.clone(), move |store, row| async move {
                store.sweep_one(row, now, late).await
            })
            .await?;
        for (row, result) in unacked.iter_mut().zip(flagged) {
            if let Some((fresh, state)) = result {
                out.push(swept(&fresh, state)?);
                *row = fresh;
            }
        }
        let expired = self
            .concurrently(unacked, move |store, row| async move {
                store.sweep_one(row, now, expire).await
            })
            .await?;
        let ended = self
            .concurrently(acked, move |store, row| async move {
                store.sweep_one(row, now, incomplete).await
            })
            .await?;
        for (fresh, state) in expired.into_iter().chain(ended).flatten() {
            out.push(swept(&fresh, state)?);
        }
        Ok(out)
    }

    async fn cancel(
        &self,
        id: &MessageId,
        control_id: MessageId,
        at: Timestamp,
    ) -> Result<Cancel, CloudError> {
        let Some(mut row) = self.command_row(id).await? else {
            return Ok(Cancel::NotFound);
        };
        for attempt in 0..ATTEMPTS {
            if row.state.is_terminal() {
                return Ok(Cancel::AlreadyEnded(row.state));
            }
            let mut change = Change::guarded(&row);
            change.states(&row, &[CommandState::Cancelled], row.late, at);
            let shard_no = shard(&row.device_id);
            let control = Item::from([
                ("pk".into(), s(message_pk(control_id.as_str()))),
                ("sk".into(), s("#")),
                ("kind".into(), s("control")),
                ("message_id".into(), s(control_id.as_str())),
                ("device_id".into(), s(row.device_id.clone())),
                ("target_message_id".into(), s(id.as_str())),
                ("action".into(), s("cancel")),
                ("state".into(), s("created")),
                ("created_at".into(), s(text(at))),
                ("publishes".into(), num(0)),
                ("ends_at".into(), s(text(row.ends_at))),
                ("gsi2pk".into(), s(format!("OPEN#created#{shard_no}"))),
                ("gsi2sk".into(), s(text(row.ends_at))),
            ]);
            let items = vec![
                change.tx(&self.table, &row.pk, &row.sk)?,
                put_new_tx(&self.table, control)?,
            ];
            if self.transact("TransactWriteItems (cancel)", items).await? {
                self.count(&[Move::new(&row, CommandState::Cancelled)])
                    .await;
                return Ok(Cancel::Cancelled(ControlMsg {
                    v: V1,
                    message_id: control_id,
                    device_id: row.device_id.parse().map_err(|e| self.corrupt(e))?,
                    action: ControlAction::Cancel,
                    target_message_id: id.clone(),
                    issued_at: at,
                    traceparent: None,
                }));
            }
            backoff(attempt).await;
            match self.command_row(id).await? {
                Some(fresh) => row = fresh,
                None => return Ok(Cancel::NotFound),
            }
        }
        Err(self.err(
            "TransactWriteItems (cancel)",
            format!("{id}: kept conflicting"),
        ))
    }

    async fn control_message(&self, id: &MessageId) -> Result<Option<ControlMsg>, CloudError> {
        let Some(item) = self.get(&message_pk(id.as_str()), "#").await? else {
            return Ok(None);
        };
        if get_s(&item, "kind") != Some("control") {
            return Ok(None);
        }
        let parsed = (|| -> Result<ControlMsg, String> {
            Ok(ControlMsg {
                v: V1,
                message_id: id.clone(),
                device_id: parse(&item, "device_id")?,
                action: ControlAction::Cancel,
                target_message_id: parse(&item, "target_message_id")?,
                issued_at: parse(&item, "created_at")?,
                traceparent: None,
            })
        })();
        parsed.map(Some).map_err(|e| self.corrupt(e))
    }

    async fn lease(
        &self,
        name: &str,
        owner: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<bool, CloudError> {
        let mut change = Change::default();
        let (o, u) = (change.n("owner"), change.n("until"));
        let owner_v = change.v(s(owner));
        let until_v = change.v(s(text(until)));
        let now_v = change.v(s(text(now)));
        change.set_raw(format!("{o} = {owner_v}"));
        change.set_raw(format!("{u} = {until_v}"));
        // Expired leases disappear by themselves a day later.
        change.set("ttl", num(until.as_second() + 86_400));
        // Instants are fixed-width UTC text, so they compare as strings.
        change.when(format!(
            "(attribute_not_exists(pk) OR {o} = {owner_v} OR {u} <= {now_v})"
        ));
        Ok(self
            .update(change, &format!("LEASE#{name}"), "#")
            .await?
            .is_some())
    }

    async fn release(&self, name: &str, owner: &str) -> Result<(), CloudError> {
        let deleted = self
            .client
            .delete_item()
            .table_name(&*self.table)
            .set_key(Some(key(&format!("LEASE#{name}"), "#")))
            .condition_expression("#o = :o")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":o", s(owner))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(self.err("DeleteItem (release)", DisplayErrorContext(e))),
        }
    }

    async fn ping(&self) -> Result<(), CloudError> {
        // A read of a key that never exists: cheap, and it proves credentials and table.
        self.get("PING", "#").await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_store_url_names_the_table_and_may_override_endpoint_and_region() {
        assert_eq!(
            StoreUrl::parse("dynamodb://max300-commands").unwrap(),
            StoreUrl {
                table: "max300-commands".into(),
                endpoint: None,
                region: None,
            }
        );
        assert_eq!(
            StoreUrl::parse("dynamodb://t_1.x?endpoint=http://127.0.0.1:5000&region=eu-west-2")
                .unwrap(),
            StoreUrl {
                table: "t_1.x".into(),
                endpoint: Some("http://127.0.0.1:5000".into()),
                region: Some("eu-west-2".into()),
            }
        );
    }

    #[test]
    fn a_bad_store_url_says_what_is_wrong() {
        let message = |url: &str| StoreUrl::parse(url).unwrap_err().to_string();
        assert!(message("sqlite://x").contains("expected dynamodb://TABLE"));
        assert!(message("dynamodb://").contains("table name \"\""));
        assert!(message("dynamodb://a b c").contains("must be 3-255 characters"));
        assert!(message("dynamodb://tbl?endpoint=").contains("\"endpoint=\""));
        let unknown = message("dynamodb://tbl?profile=x");
        assert!(unknown.starts_with("store: "), "{unknown}");
        assert!(unknown.contains("unknown or empty parameter \"profile=x\""));
    }

    #[tokio::test]
    async fn opening_a_bad_url_fails_before_any_aws_call() {
        let err = DynamoStore::open("dynamodb://x").await.unwrap_err();
        assert!(err.to_string().contains("table name \"x\""), "{err}");
    }

    #[test]
    fn period_sets_round_trip_through_their_bit_mask() {
        let periods: BTreeSet<u32> = [1, 2, 10, 48, 50].into();
        let item = Item::from([("m".into(), num(bits(&periods)))]);
        assert_eq!(get_bits(&item, "m"), periods);
        assert_eq!(bits(&BTreeSet::new()), 0);
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        assert_eq!(shard("max300-0001"), shard("max300-0001"));
        let used: BTreeSet<u32> = (0..1000)
            .map(|i| shard(&format!("max300-{i:04}")))
            .collect();
        assert_eq!(
            used.len(),
            SHARDS as usize,
            "a thousand devices use every shard"
        );
        assert!(used.iter().all(|s| *s < SHARDS));
    }

    #[test]
    fn an_update_puts_every_name_behind_a_placeholder() {
        let mut c = Change::default();
        c.set("state", s("sent"));
        c.add("reported", AttributeValue::Ns(vec!["3".into()]));
        c.remove("gsi2pk");
        c.when("attribute_exists(pk)".into());
        let (expr, names, values, cond) = c.parts();
        assert_eq!(expr, "SET #state = :v0 ADD #reported :v1 REMOVE #gsi2pk");
        assert_eq!(names.unwrap()["#state"], "state");
        assert_eq!(values.unwrap().len(), 2);
        assert_eq!(cond.as_deref(), Some("attribute_exists(pk)"));
    }
}
