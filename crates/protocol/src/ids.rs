//! Identifiers. Each is parsed once where it enters the system, so an invalid one can't exist.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::ProtocolError;

const ID_RULE: &str = "1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'";

fn check_id(what: &'static str, value: &str) -> Result<(), ProtocolError> {
    let ok = (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidId {
            what,
            value: value.chars().take(80).collect(),
            rule: ID_RULE,
        })
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses an id, refusing anything outside `[A-Za-z0-9_-]{1,64}`.
            pub fn parse(value: impl Into<String>) -> Result<Self, ProtocolError> {
                let value = value.into();
                check_id($what, &value)?;
                Ok(Self(value))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ProtocolError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ProtocolError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
    };
}

id_type!(
    /// A battery unit's id; also its MQTT client id and its topic segment.
    DeviceId,
    "device_id"
);
id_type!(
    /// The id of one command (a schedule or control message). ULIDs when we make them.
    MessageId,
    "message_id"
);
id_type!(
    /// The random id of one agent store; `seq` numbers are unique within it.
    StoreId,
    "store_id"
);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl MessageId {
    /// A new ULID: 48 bits of milliseconds from `now`, 80 random bits. Sorting by id sorts by
    /// creation time, which makes logs and listings easy to read.
    pub fn generate(now: Timestamp) -> Self {
        Self::ulid(now, fastrand::u128(..))
    }

    fn ulid(now: Timestamp, random: u128) -> Self {
        let millis = now.as_millisecond().max(0) as u128 & ((1u128 << 48) - 1);
        let value = (millis << 80) | (random & ((1u128 << 80) - 1));
        let text: String = (0..26)
            .map(|i| {
                let shift = 125 - 5 * i;
                CROCKFORD[((value >> shift) & 31) as usize] as char
            })
            .collect();
        Self(text)
    }
}

/// ULIDs for one instant that sort in the order they are made (ULID's monotonic rule: the
/// first's random part, plus one for each after it). An ingestion takes its commands' ids
/// from one of these, so a store's indexes on the id take them in order, at their end,
/// instead of scattered over every page of the index (at 10,000 commands, most of the pages
/// each batch writes).
#[derive(Debug)]
pub struct MessageIds {
    now: Timestamp,
    next: u128,
}

impl MessageIds {
    /// Ids made at `now`, from a random start with room for 2^79 after it.
    pub fn at(now: Timestamp) -> Self {
        MessageIds {
            now,
            next: fastrand::u128(..) & ((1u128 << 79) - 1),
        }
    }

    /// The next id: greater than every one made before it.
    pub fn make(&mut self) -> MessageId {
        let id = MessageId::ulid(self.now, self.next);
        // 2^79 ids from one instant would take longer than any store could keep them.
        self.next = (self.next + 1) & ((1u128 << 80) - 1);
        id
    }
}

impl StoreId {
    /// A new random store id (128 bits, lowercase hex).
    pub fn generate() -> Self {
        Self(format!("{:032x}", fastrand::u128(..)))
    }
}

/// Devices by id, each with a value, in id order: every id's text in one buffer and one small
/// entry a device, not a map of [`DeviceId`]s that each own an allocation. What an ingestion
/// holds of a registered fleet: at 100,000 units with their rate limits, a map was 4.6 MB,
/// and the list it was made from 6.3 MB more at the time; this is 2.9 MB. An id given twice
/// keeps its first value.
#[derive(Clone, Debug, PartialEq)]
pub struct Roster<V> {
    text: String,
    entries: Vec<Entry<V>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Entry<V> {
    start: usize,
    /// An id is at most 64 bytes.
    len: u8,
    value: V,
}

impl<V> Default for Roster<V> {
    fn default() -> Self {
        Roster {
            text: String::new(),
            entries: Vec::new(),
        }
    }
}

impl<V> Roster<V> {
    /// How many devices.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of device `id`.
    pub fn get(&self, id: &str) -> Option<&V> {
        self.entries
            .binary_search_by(|e| key(&self.text, e).cmp(id))
            .ok()
            .map(|i| &self.entries[i].value)
    }

    /// Whether device `id` is here.
    pub fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Each id and its value, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.entries.iter().map(|e| (key(&self.text, e), &e.value))
    }

    /// Each device and its value, in id order, the id made anew for each.
    pub fn devices(&self) -> impl Iterator<Item = (DeviceId, &V)> {
        self.iter().map(|(id, v)| (DeviceId(id.to_owned()), v))
    }

    /// The same devices, each with `f` of its value.
    pub fn map<W>(self, mut f: impl FnMut(V) -> W) -> Roster<W> {
        // A new vector, not the old one collected in place: that would keep the old
        // entries' room, which for a smaller value is room to spare.
        let mut entries = Vec::with_capacity(self.entries.len());
        entries.extend(self.entries.into_iter().map(|e| Entry {
            start: e.start,
            len: e.len,
            value: f(e.value),
        }));
        Roster {
            text: self.text,
            entries,
        }
    }
}

fn key<'a, V>(text: &'a str, e: &Entry<V>) -> &'a str {
    &text[e.start..e.start + usize::from(e.len)]
}

impl<V> FromIterator<(DeviceId, V)> for Roster<V> {
    fn from_iter<I: IntoIterator<Item = (DeviceId, V)>>(devices: I) -> Self {
        let mut text = String::new();
        let mut entries = Vec::new();
        for (id, value) in devices {
            entries.push(Entry {
                start: text.len(),
                // Never more than 64: a DeviceId is checked when it is made.
                len: u8::try_from(id.0.len()).unwrap_or(u8::MAX),
                value,
            });
            text.push_str(&id.0);
        }
        // A store that reads them in id order pays one pass here, and no sort's buffer.
        if !entries.is_sorted_by(|a, b| key(&text, a) <= key(&text, b)) {
            entries.sort_by(|a, b| key(&text, a).cmp(key(&text, b)));
        }
        entries.dedup_by(|later, first| key(&text, later) == key(&text, first));
        text.shrink_to_fit();
        entries.shrink_to_fit();
        Roster { text, entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_at_one_instant_sort_in_the_order_they_are_made() {
        let now: Timestamp = "2026-11-29T16:00:00Z".parse().unwrap();
        let mut made = MessageIds::at(now);
        let ids: Vec<MessageId> = (0..10_000).map(|_| made.make()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "not in order");
        // Each one a ULID of that instant, like those `generate` makes.
        let one = MessageId::generate(now);
        let prefix = &one.as_str()[..10];
        assert!(
            ids.iter()
                .all(|id| id.as_str().len() == 26 && &id.as_str()[..10] == prefix)
        );
        assert!(ids.iter().all(|id| MessageId::parse(id.as_str()).is_ok()));
        // Two generators at the same instant start apart.
        assert_ne!(MessageIds::at(now).make(), MessageIds::at(now).make());
    }

    #[test]
    fn a_roster_finds_each_device_by_its_id_and_keeps_them_in_id_order() {
        let id = |s: &str| DeviceId::parse(s).unwrap();
        let roster: Roster<u32> = [("d2", 2), ("d10", 10), ("d1", 1), ("d2", 20), ("x", 9)]
            .into_iter()
            .map(|(s, v)| (id(s), v))
            .collect();
        assert_eq!(roster.len(), 4, "d2 once");
        assert_eq!(roster.get("d2"), Some(&2), "the first value given");
        assert_eq!(roster.get("d10"), Some(&10));
        assert_eq!(roster.get("d3"), None);
        assert!(roster.contains("x") && !roster.contains("d"));
        let order: Vec<&str> = roster.iter().map(|(s, _)| s).collect();
        assert_eq!(order, ["d1", "d10", "d2", "x"]);
        let doubled = roster.map(|v| v * 2);
        assert_eq!(doubled.get("d10"), Some(&20));
        let devices: Vec<(DeviceId, u32)> = doubled.devices().map(|(d, v)| (d, *v)).collect();
        assert_eq!(devices[0], (id("d1"), 2));
        assert!(Roster::<u32>::default().get("d1").is_none());
    }

    #[test]
    fn accepts_device_ids_of_the_allowed_shape() {
        assert!(DeviceId::parse("max300-0001").is_ok());
        assert!(DeviceId::parse("A_b-9").is_ok());
        assert!(DeviceId::parse("x".repeat(64)).is_ok());
    }

    #[test]
    fn rejects_device_ids_outside_the_rule() {
        for bad in [
            "",
            "has space",
            "slash/topic",
            "plus+",
            "hash#",
            "é",
            &"x".repeat(65),
        ] {
            let err = DeviceId::parse(bad).unwrap_err();
            assert!(err.to_string().contains("device_id"), "{err}");
        }
    }

    #[test]
    fn message_ids_are_ulids_that_sort_by_time() {
        let a = MessageId::generate(Timestamp::from_second(1_700_000_000).unwrap());
        let b = MessageId::generate(Timestamp::from_second(1_700_000_001).unwrap());
        assert_eq!(a.as_str().len(), 26);
        assert!(a < b);
    }

    #[test]
    fn ids_deserialize_through_the_parser() {
        let err = serde_json::from_str::<DeviceId>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("not valid"));
    }
}
