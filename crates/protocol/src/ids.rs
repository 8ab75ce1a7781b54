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
        let millis = now.as_millisecond().max(0) as u128 & ((1u128 << 48) - 1);
        let random = fastrand::u128(..) & ((1u128 << 80) - 1);
        let value = (millis << 80) | random;
        let text: String = (0..26)
            .map(|i| {
                let shift = 125 - 5 * i;
                CROCKFORD[((value >> shift) & 31) as usize] as char
            })
            .collect();
        Self(text)
    }
}

impl StoreId {
    /// A new random store id (128 bits, lowercase hex).
    pub fn generate() -> Self {
        Self(format!("{:032x}", fastrand::u128(..)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
