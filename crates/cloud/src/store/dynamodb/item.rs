//! The item codec: how devices, commands, control messages and the rest are laid out as
//! items of the one table, and read back. `docs/aws-dynamodb.md` describes the layout and
//! every access pattern.
//!
//! A command is one item under its device (`D#{device}` / `C#{date}#{version}`), with its
//! plan and period marks as short strings, so it stays near one write unit; a control
//! message is one item under its id (`M#{id}` / `#`). Both sit in the due index (`gsi2`,
//! `DUE#{shard}` by wake time) while the clock has something to do to them.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use jiff::Timestamp;
use jiff::civil::Date;
use max300_protocol::{Day, RateKw, Schedule, TraceParent};

use super::SHARDS;
use super::request::Change;
use crate::lifecycle::{Command, Control, HistoryEntry, Marks, Step};
use crate::store::DeviceRecord;
use crate::store::text::{decode_plan, encode_plan, instant};

/// One item.
pub(super) type Item = HashMap<String, AttributeValue>;

/// The sort key of a device's own item.
pub(super) const DEVICE_SK: &str = "#DEVICE";

pub(super) fn device_pk(device: &str) -> String {
    format!("D#{device}")
}

pub(super) fn message_pk(id: &str) -> String {
    format!("M#{id}")
}

pub(super) fn command_sk(date: Date, version: u32) -> String {
    format!("C#{date}#{version:05}")
}

pub(super) fn key(pk: &str, sk: &str) -> Item {
    Item::from([("pk".into(), s(pk)), ("sk".into(), s(sk))])
}

/// Where a message pointer says its command is.
pub(super) fn command_key(pointer: &Item) -> Result<(String, String), String> {
    let device = get_s(pointer, "device_id").ok_or("a message pointer without device_id")?;
    let sk = get_s(pointer, "csk").ok_or("a message pointer without csk")?;
    Ok((device_pk(device), sk.to_owned()))
}

/// A device's shard of the sharded index keys: FNV-1a, stable across builds and processes.
pub(super) fn shard(device: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in device.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % SHARDS
}

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(super) fn num(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(super) fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}

pub(super) fn get_n<T: std::str::FromStr>(item: &Item, k: &str) -> Option<T> {
    item.get(k)?.as_n().ok()?.parse().ok()
}

fn get_bool(item: &Item, k: &str) -> bool {
    item.get(k)
        .and_then(|v| v.as_bool().ok())
        .copied()
        .unwrap_or(false)
}

fn get_list(item: &Item, k: &str) -> Vec<String> {
    item.get(k)
        .and_then(|v| v.as_l().ok())
        .map(|l| l.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
        .unwrap_or_default()
}

pub(super) fn need<'a>(item: &'a Item, k: &str) -> Result<&'a str, String> {
    get_s(item, k).ok_or_else(|| {
        format!(
            "item {}/{} lacks {k}",
            get_s(item, "pk").unwrap_or("?"),
            get_s(item, "sk").unwrap_or("?")
        )
    })
}

pub(super) fn parse<T: std::str::FromStr>(item: &Item, k: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    need(item, k)?.parse().map_err(|e| format!("{k}: {e}"))
}

fn opt_parse<T: std::str::FromStr>(item: &Item, k: &str) -> Result<Option<T>, String>
where
    T::Err: std::fmt::Display,
{
    get_s(item, k)
        .map(|t| t.parse().map_err(|e| format!("{k}: {e}")))
        .transpose()
}

fn rate(item: &Item, k: &str) -> Option<RateKw> {
    get_n::<u32>(item, k).map(RateKw::from_watts)
}

pub(super) fn device_record(item: &Item) -> Result<DeviceRecord, String> {
    Ok(DeviceRecord {
        device_id: parse(item, "device_id")?,
        max_rate_kw: rate(item, "max_rate_w"),
        registered_at: parse(item, "registered_at")?,
        last_seen: opt_parse(item, "last_seen")?,
        mode: opt_parse(item, "mode")?,
        rate_kw: rate(item, "rate_w"),
        soc_pct: get_n(item, "soc_pct"),
        fallback: opt_parse(item, "fallback")?,
        active_message_id: get_s(item, "active_message_id").map(str::to_owned),
        outbox: get_n(item, "outbox"),
    })
}

fn history_entry(h: &HistoryEntry) -> AttributeValue {
    s(format!("{} {}", h.state.as_str(), instant(h.at)))
}

/// A command's state changes, oldest first.
pub(super) fn history_of(item: &Item) -> Result<Vec<HistoryEntry>, String> {
    get_list(item, "history")
        .iter()
        .map(|h| {
            let (state, at) = h.split_once(' ').ok_or("a bad history entry")?;
            Ok(HistoryEntry {
                state: state.parse()?,
                at: at.parse().map_err(|e| format!("history: {e}"))?,
            })
        })
        .collect()
}

/// A command's publishes, oldest first.
pub(super) fn sends_of(item: &Item) -> Result<Vec<Timestamp>, String> {
    get_list(item, "sends")
        .iter()
        .map(|t| t.parse().map_err(|e| format!("sends: {e}")))
        .collect()
}

/// The due-index attributes of an item that wakes at `wake` (none: out of the index).
fn due(c: &mut Change, device: &str, wake: Option<Timestamp>) {
    match wake {
        Some(at) => {
            c.set("gsi2pk", s(format!("DUE#{}", shard(device))));
            c.set("gsi2sk", s(instant(at)));
        }
        None => {
            c.remove("gsi2pk");
            c.remove("gsi2sk");
        }
    }
}

fn due_attrs(item: &mut Item, device: &str, wake: Option<Timestamp>) {
    if let Some(at) = wake {
        item.insert("gsi2pk".into(), s(format!("DUE#{}", shard(device))));
        item.insert("gsi2sk".into(), s(instant(at)));
    }
}

/// A new command's item.
pub(super) fn command_item(c: &Command) -> Item {
    let day = c.schedule.day();
    let device = c.device_id().as_str();
    let date = day.date();
    let mut item = Item::from([
        ("pk".into(), s(device_pk(device))),
        ("sk".into(), s(command_sk(date, c.version))),
        ("kind".into(), s("command")),
        ("message_id".into(), s(c.message_id.as_str())),
        ("device_id".into(), s(device)),
        ("schedule_date".into(), s(date.to_string())),
        ("timezone".into(), s(day.tz_name())),
        ("version".into(), num(c.version)),
        ("sha256".into(), s(c.sha256())),
        ("state".into(), s(c.state.as_str())),
        ("late".into(), AttributeValue::Bool(c.late)),
        ("governs_from".into(), s(instant(c.governs_from))),
        ("ends_at".into(), s(instant(day.end()))),
        ("created_at".into(), s(instant(c.created_at))),
        ("publishes".into(), num(c.publishes)),
        ("attempts".into(), num(c.attempts)),
        ("sends".into(), AttributeValue::L(Vec::new())),
        (
            "history".into(),
            AttributeValue::L(vec![history_entry(&HistoryEntry {
                state: c.state,
                at: c.created_at,
            })]),
        ),
        ("plan".into(), s(encode_plan(c.schedule.setpoints()))),
        ("marks".into(), s(c.marks.to_string())),
        ("rev".into(), num(c.rev)),
        ("gsi1pk".into(), s(format!("DATE#{date}#{}", shard(device)))),
        ("gsi1sk".into(), s(format!("{device}#{:05}", c.version))),
    ]);
    if let Some(at) = c.retry_at {
        item.insert("retry_at".into(), s(instant(at)));
    }
    if let Some(tp) = &c.traceparent {
        item.insert("traceparent".into(), s(tp.as_str()));
    }
    due_attrs(&mut item, device, c.wake_at());
    item
}

/// The change a step makes to its command's item, over the revision it was decided on.
pub(super) fn command_change(step: &Step) -> Change {
    let a = &step.after;
    let mut c = Change::guarded(a.rev);
    c.set("state", s(a.state.as_str()));
    c.set("late", AttributeValue::Bool(a.late));
    match a.effective_period {
        Some(p) => c.set("effective_period", num(p)),
        None => c.remove("effective_period"),
    }
    match &a.acked_sha256 {
        // The usual case, the plan's own hash, is kept as "=": 63 bytes fewer keep the item
        // within one write unit.
        Some(sha) if *sha == a.sha256() => c.set("acked_sha256", s("=")),
        Some(sha) => c.set("acked_sha256", s(sha.clone())),
        None => c.remove("acked_sha256"),
    }
    c.set("publishes", num(a.publishes));
    c.set("attempts", num(a.attempts));
    match a.last_sent_at {
        Some(at) => c.set("last_sent_at", s(instant(at))),
        None => c.remove("last_sent_at"),
    }
    match a.retry_at {
        Some(at) => c.set("retry_at", s(instant(at))),
        None => c.remove("retry_at"),
    }
    c.set("marks", s(a.marks.to_string()));
    if !step.entered.is_empty() {
        let h = c.n("history");
        let entries = c.v(AttributeValue::L(
            step.entered.iter().map(history_entry).collect(),
        ));
        c.set_raw(format!("{h} = list_append({h}, {entries})"));
    }
    if let Some(at) = step.sent {
        let sends = c.n("sends");
        let at = c.v(AttributeValue::L(vec![s(instant(at))]));
        c.set_raw(format!("{sends} = list_append({sends}, {at})"));
    }
    due(&mut c, a.device_id().as_str(), a.wake_at());
    c
}

/// A command item, read.
pub(super) fn command_of(item: &Item) -> Result<Command, String> {
    let date: Date = parse(item, "schedule_date")?;
    let day = Day::named(date, need(item, "timezone")?).map_err(|e| e.to_string())?;
    let periods = day.period_count();
    let setpoints = decode_plan(need(item, "plan")?)?;
    let mut schedule = Schedule::new(parse(item, "device_id")?, day, setpoints)
        .ok_or("the stored plan does not match its date")?;
    if let Some(sha) = get_s(item, "sha256") {
        schedule = schedule.with_sha256(sha.to_owned());
    }
    let marks = match get_s(item, "marks") {
        Some(text) => Marks::parse(text, periods)?,
        None => Marks::pending(periods),
    };
    let acked_sha256 = match get_s(item, "acked_sha256") {
        Some("=") => Some(schedule.sha256()),
        other => other.map(str::to_owned),
    };
    Ok(Command {
        message_id: parse(item, "message_id")?,
        version: get_n(item, "version").ok_or("a command without version")?,
        state: parse(item, "state")?,
        late: get_bool(item, "late"),
        governs_from: parse(item, "governs_from")?,
        created_at: parse(item, "created_at")?,
        effective_period: get_n(item, "effective_period"),
        acked_sha256,
        publishes: get_n(item, "publishes").unwrap_or(0),
        attempts: get_n(item, "attempts").unwrap_or(0),
        last_sent_at: opt_parse(item, "last_sent_at")?,
        retry_at: opt_parse(item, "retry_at")?,
        marks,
        traceparent: get_s(item, "traceparent").and_then(|t| TraceParent::parse(t).ok()),
        rev: get_n(item, "rev").unwrap_or(0),
        schedule,
    })
}

/// A new control message's item (its id's own item: it needs no pointer).
pub(super) fn control_item(c: &Control) -> Item {
    let mut item = Item::from([
        ("pk".into(), s(message_pk(c.message_id.as_str()))),
        ("sk".into(), s("#")),
        ("kind".into(), s("control")),
        ("message_id".into(), s(c.message_id.as_str())),
        ("device_id".into(), s(c.device_id.as_str())),
        ("target_message_id".into(), s(c.target.as_str())),
        ("action".into(), s("cancel")),
        ("state".into(), s(c.state.as_str())),
        ("created_at".into(), s(instant(c.created_at))),
        ("ends_at".into(), s(instant(c.ends_at))),
        ("publishes".into(), num(c.publishes)),
        ("attempts".into(), num(c.attempts)),
        ("rev".into(), num(c.rev)),
    ]);
    if let Some(at) = c.retry_at {
        item.insert("retry_at".into(), s(instant(at)));
    }
    due_attrs(&mut item, c.device_id.as_str(), c.wake_at());
    item
}

/// The change to a control message's item, over the revision it was decided on.
pub(super) fn control_change(c: &Control) -> Change {
    let mut ch = Change::guarded(c.rev);
    ch.set("state", s(c.state.as_str()));
    ch.set("publishes", num(c.publishes));
    ch.set("attempts", num(c.attempts));
    match c.last_sent_at {
        Some(at) => ch.set("last_sent_at", s(instant(at))),
        None => ch.remove("last_sent_at"),
    }
    match c.retry_at {
        Some(at) => ch.set("retry_at", s(instant(at))),
        None => ch.remove("retry_at"),
    }
    due(&mut ch, c.device_id.as_str(), c.wake_at());
    ch
}

/// A control message's item, read.
pub(super) fn control_of(item: &Item) -> Result<Control, String> {
    Ok(Control {
        message_id: parse(item, "message_id")?,
        device_id: parse(item, "device_id")?,
        target: parse(item, "target_message_id")?,
        state: parse(item, "state")?,
        created_at: parse(item, "created_at")?,
        ends_at: parse(item, "ends_at")?,
        publishes: get_n(item, "publishes").unwrap_or(0),
        attempts: get_n(item, "attempts").unwrap_or(0),
        last_sent_at: opt_parse(item, "last_sent_at")?,
        retry_at: opt_parse(item, "retry_at")?,
        rev: get_n(item, "rev").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use max300_protocol::{DeviceId, MessageId, Setpoint};

    use super::*;
    use crate::lifecycle::Policy;

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
    fn a_command_reads_back_as_it_was_written() {
        let day = Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap();
        let schedule = Schedule::new(
            DeviceId::parse("d1").unwrap(),
            day,
            vec![Setpoint::IDLE; 48],
        )
        .unwrap();
        let at: Timestamp = "2026-11-29T16:00:00Z".parse().unwrap();
        let c = Command::new(
            MessageId::generate(at),
            schedule,
            3,
            None,
            at,
            &Policy::default(),
        )
        .unwrap();
        let item = command_item(&c);
        assert_eq!(command_of(&item).unwrap(), c);
        assert_eq!(
            get_s(&item, "gsi2pk"),
            Some(&*format!("DUE#{}", shard("d1")))
        );
        // One write unit: a day's command stays under 1 KB.
        let size: usize = item
            .iter()
            .map(|(k, v)| k.len() + v.as_s().map_or(8, String::len))
            .sum();
        assert!(size < 1024, "{size} bytes");
    }
}
