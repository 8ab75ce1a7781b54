//! Writing: a unit of the lifecycle's as one conditional write (or one transaction), an
//! ingestion's commands with their version claims under an optional fence, and the counters
//! and `last_seen` that follow a write.

use max300_protocol::error::Chain;
use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_dynamodb::types::{ConditionCheck, Put, TransactWriteItem};
use jiff::Timestamp;
use max300_protocol::{DeviceId, MessageId};
use tracing::warn;

use super::item::{
    DEVICE_SK, Item, command_change, command_item, command_sk, control_change, control_item,
    device_pk, get_n, get_s, key, message_pk, num, s, shard,
};
use super::request::{Change, backoff, chunked, put_new_tx};
use super::{ATTEMPTS, DynamoStore, INSERT_CHUNK};
use crate::CloudError;
use crate::lifecycle::{Command, CommandState, Policy, next_version};
use crate::store::text::instant;
use crate::store::{ControlWrite, Fence, Insert, NewCommand, Record, Unit, Written};

/// A counted state change: one command of `shard` moved from `from` (none when created) to
/// `to`.
pub(super) struct Move {
    shard: u32,
    from: Option<CommandState>,
    to: CommandState,
}

/// One write of a unit, before it is sent alone or in a transaction.
enum Op {
    Put(Item),
    Update(Change, String, String),
}

impl DynamoStore {
    /// Moves the per-state command counters by the transitions a successful write made.
    /// They are updated after it, not in it: a counter item in every transition's
    /// transaction would make concurrent transactions conflict. A crash in between leaves a
    /// gauge one off; the command items stay right.
    pub(super) async fn count(&self, moves: &[Move]) {
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
            if !change.adds() {
                continue;
            }
            if let Err(e) = self.update(change, &format!("COUNTS#{shard}"), "#").await {
                warn!(error = %Chain(&e), shard, "command state counters not updated");
            }
        }
    }

    /// Notes that a device was heard from (never moving `last_seen` back).
    async fn touch(&self, device: &DeviceId, at: Timestamp) -> Result<(), CloudError> {
        let mut change = Change::default();
        let seen = change.n("last_seen");
        let at_v = change.v(s(instant(at)));
        change.set_raw(format!("{seen} = {at_v}"));
        change.when(format!(
            "attribute_exists(pk) AND (attribute_not_exists({seen}) OR {seen} < {at_v})"
        ));
        self.update(change, &device_pk(device.as_str()), DEVICE_SK)
            .await
            .map(|_| ())
    }

    async fn record_op(&self, record: &Record) -> Result<Op, CloudError> {
        Ok(Op::Put(match record {
            Record::Ack { ack, at } => Item::from([
                ("pk".into(), s(message_pk(ack.message_id.as_str()))),
                ("sk".into(), s("ACK")),
                ("device_id".into(), s(ack.device_id.as_str())),
                (
                    "body".into(),
                    s(serde_json::to_string(ack).map_err(|e| self.corrupt(e))?),
                ),
                ("received_at".into(), s(instant(*at))),
            ]),
            Record::Report { report, at } => {
                let mut item = Item::from([
                    ("pk".into(), s(device_pk(report.device_id.as_str()))),
                    (
                        "sk".into(),
                        s(format!("R#{}", instant(report.interval_start))),
                    ),
                    (
                        "body".into(),
                        s(serde_json::to_string(report).map_err(|e| self.corrupt(e))?),
                    ),
                    ("received_at".into(), s(instant(*at))),
                ]);
                if let Some(id) = &report.message_id {
                    item.insert("message_id".into(), s(id.as_str()));
                }
                item
            }
        }))
    }

    /// Writes one unit: alone when it is one item, else as one transaction.
    pub(super) async fn write_unit(&self, unit: &Unit) -> Result<Written, CloudError> {
        let mut ops = Vec::new();
        if let Some(record) = &unit.record {
            ops.push(self.record_op(record).await?);
        }
        for step in &unit.commands {
            let c = &step.after;
            ops.push(Op::Update(
                command_change(step),
                device_pk(c.device_id().as_str()),
                command_sk(c.schedule.day().date(), c.version),
            ));
        }
        match &unit.control {
            Some(ControlWrite::New(c)) => ops.push(Op::Put(control_item(c))),
            Some(ControlWrite::Update(c)) => ops.push(Op::Update(
                control_change(c),
                message_pk(c.message_id.as_str()),
                "#".into(),
            )),
            None => {}
        }
        let written = match ops.len() {
            0 => true,
            1 => match ops.pop() {
                Some(Op::Put(item)) => self.put_new(item).await?,
                Some(Op::Update(change, pk, sk)) => self.update(change, &pk, &sk).await?.is_some(),
                None => true,
            },
            _ => {
                let items = ops
                    .into_iter()
                    .map(|op| match op {
                        Op::Put(item) => put_new_tx(&self.table, item),
                        Op::Update(change, pk, sk) => change.tx(&self.table, &pk, &sk),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.transact("TransactWriteItems (unit)", items).await?
            }
        };
        if !written {
            return Ok(Written::Conflict);
        }
        let moves: Vec<Move> = unit
            .commands
            .iter()
            .filter(|step| step.before != step.after.state)
            .map(|step| Move {
                shard: shard(step.after.device_id().as_str()),
                from: Some(step.before),
                to: step.after.state,
            })
            .collect();
        self.count(&moves).await;
        match &unit.record {
            Some(Record::Ack { ack, at }) => self.touch(&ack.device_id, *at).await?,
            Some(Record::Report { report, at }) => self.touch(&report.device_id, *at).await?,
            None => {}
        }
        Ok(Written::Applied)
    }

    /// Inserts the commands at `idx` (at most one per device and date), retrying those whose
    /// version claim lost a race with another writer.
    pub(super) async fn insert_round(
        &self,
        commands: &Arc<Vec<NewCommand>>,
        idx: Vec<usize>,
        at: Timestamp,
        policy: &Policy,
        fence: Option<&Fence>,
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
            let latest = self.by_key(keys).await?;
            let mut writes: Vec<(usize, u32, Vec<TransactWriteItem>)> = Vec::new();
            for &i in &pending {
                let new = &commands[i];
                let sch = &new.schedule;
                let device = sch.device_id().as_str();
                let date = sch.day().date().to_string();
                let claim = latest.get(&(device_pk(device), format!("L#{date}")));
                let held =
                    claim.and_then(|l| Some((get_n::<u32>(l, "version")?, get_s(l, "sha256")?)));
                let Some(version) = next_version(held, &sch.sha256()) else {
                    out[i] = Some(Insert::Unchanged {
                        message_id: claim
                            .and_then(|l| get_s(l, "message_id"))
                            .and_then(|m| MessageId::parse(m).ok())
                            .ok_or_else(|| {
                                self.corrupt(format!("{device} {date}: bad latest item"))
                            })?,
                        version: held.map_or(1, |(v, _)| v),
                    });
                    continue;
                };
                let command = Command::new(
                    new.message_id.clone(),
                    new.schedule.clone(),
                    version,
                    new.traceparent.clone(),
                    at,
                    policy,
                )?;
                writes.push((i, version, self.new_command_items(&command, claim)?));
            }
            let fence_check = fence.map(|f| self.fence_check(f)).transpose()?;
            let chunks = chunked(writes, INSERT_CHUNK);
            let results = self
                .concurrently(chunks, move |store, chunk| {
                    let fence_check = fence_check.clone();
                    async move {
                        let mut items: Vec<TransactWriteItem> = chunk
                            .iter()
                            .flat_map(|(_, _, items)| items.clone())
                            .collect();
                        items.extend(fence_check);
                        let ok = store.transact("TransactWriteItems (insert)", items).await?;
                        Ok((
                            ok,
                            chunk
                                .into_iter()
                                .map(|(i, v, _)| (i, v))
                                .collect::<Vec<_>>(),
                        ))
                    }
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
                if let Some(f) = fence
                    && !self.fence_holds(f).await?
                {
                    return Err(CloudError::Fenced(format!(
                        "lease {} is no longer {}'s (token {}): another holder took it since",
                        f.name, f.owner, f.token
                    )));
                }
                backoff(attempt).await;
            }
        }
        Err(self.refused(
            "TransactWriteItems (insert)",
            format!("{} commands kept conflicting", pending.len()),
        ))
    }

    /// The command item, its message pointer and its version claim, as transaction items.
    fn new_command_items(
        &self,
        command: &Command,
        claim: Option<&Item>,
    ) -> Result<Vec<TransactWriteItem>, CloudError> {
        let device = command.device_id().as_str();
        let date = command.schedule.day().date();
        let id = command.message_id.as_str();
        let pointer = Item::from([
            ("pk".into(), s(message_pk(id))),
            ("sk".into(), s("#")),
            ("kind".into(), s("command")),
            ("message_id".into(), s(id)),
            ("device_id".into(), s(device)),
            ("csk".into(), s(command_sk(date, command.version))),
        ]);
        let latest = Item::from([
            ("pk".into(), s(device_pk(device))),
            ("sk".into(), s(format!("L#{date}"))),
            ("version".into(), num(command.version)),
            ("message_id".into(), s(id)),
            ("sha256".into(), s(command.sha256())),
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
            put_new_tx(&self.table, command_item(command))?,
            put_new_tx(&self.table, pointer)?,
            TransactWriteItem::builder().put(latest_put).build(),
        ])
    }

    /// The transaction item that holds a write to its fence.
    fn fence_check(&self, fence: &Fence) -> Result<TransactWriteItem, CloudError> {
        let check = ConditionCheck::builder()
            .table_name(&*self.table)
            .set_key(Some(key(&format!("LEASE#{}", fence.name), "#")))
            .condition_expression("#o = :o AND #t = :t")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":o", s(fence.owner.clone()))
            .expression_attribute_values(":t", num(fence.token))
            .build()
            .map_err(|e| self.err("TransactWriteItems (fence)", e))?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    async fn fence_holds(&self, fence: &Fence) -> Result<bool, CloudError> {
        let lease = self.get(&format!("LEASE#{}", fence.name), "#").await?;
        Ok(lease.is_some_and(|l| {
            get_s(&l, "owner") == Some(fence.owner.as_str())
                && get_n::<u64>(&l, "token") == Some(fence.token)
        }))
    }

    /// Takes or renews a lease (see `CommandStore::lease`): read it, decide, and write it
    /// back on the condition that nobody changed it in between.
    pub(super) async fn take_lease(
        &self,
        name: &str,
        owner: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> Result<Option<u64>, CloudError> {
        let pk = format!("LEASE#{name}");
        for attempt in 0..ATTEMPTS {
            let held = self.get(&pk, "#").await?;
            let current = held.as_ref().map(|l| {
                (
                    get_s(l, "owner").unwrap_or_default().to_owned(),
                    get_s(l, "until").unwrap_or_default().to_owned(),
                    get_n::<u64>(l, "token").unwrap_or(0),
                )
            });
            let live = |u: &str| u > instant(now).as_str();
            let token = match &current {
                Some((o, u, _)) if o != owner && live(u) => return Ok(None),
                // A renewal keeps its token.
                Some((_, u, t)) if live(u) => *t,
                // A new holding takes a token no holding ever had: from a counter, so a
                // lease item that expired away never hands out an old one again.
                _ => {
                    let mut next = Change::default();
                    next.add("n", num(1));
                    let counter = self
                        .update(next, "LEASE", "#TOKENS")
                        .await?
                        .ok_or_else(|| self.refused("UpdateItem (lease token)", "conflicted"))?;
                    get_n(&counter, "n")
                        .ok_or_else(|| self.corrupt("the lease token counter has no number"))?
                }
            };
            let mut change = Change::default();
            let (o, u, t) = (change.n("owner"), change.n("until"), change.n("token"));
            let owner_v = change.v(s(owner));
            let until_v = change.v(s(instant(until)));
            let token_v = change.v(num(token));
            change.set_raw(format!("{o} = {owner_v}, {u} = {until_v}, {t} = {token_v}"));
            // Expired leases disappear by themselves a day later.
            change.set("ttl", num(until.as_second() + 86_400));
            match &current {
                None => change.when("attribute_not_exists(pk)".into()),
                Some((was_o, was_u, was_t)) => {
                    let (a, b, c) = (
                        change.v(s(was_o.clone())),
                        change.v(s(was_u.clone())),
                        change.v(num(*was_t)),
                    );
                    change.when(format!("{o} = {a} AND {u} = {b} AND {t} = {c}"));
                }
            }
            if self.update(change, &pk, "#").await?.is_some() {
                return Ok(Some(token));
            }
            backoff(attempt).await;
        }
        Err(self.refused("UpdateItem (lease)", format!("{name}: kept conflicting")))
    }
}
