//! W3C trace context on the wire: the optional `traceparent` field of schedule, control, ack
//! and report messages. It lets one command's ingestion, publish, ack and reports share one
//! trace across the broker. It is a hint, never a reason to refuse a message: a missing or
//! malformed value decodes as `None`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::ProtocolError;

/// A valid W3C `traceparent` (version `00`): `00-<trace id>-<parent id>-<flags>`, with a
/// 32-hex-digit trace id and a 16-hex-digit parent (span) id, neither all zeros, and two hex
/// digits of flags. Always lowercase, as the W3C format requires.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TraceParent(String);

const LEN: usize = 55;

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn decode_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = hex_value(pair[0])? << 4 | hex_value(pair[1])?;
    }
    Some(out)
}

impl TraceParent {
    /// Parses a `traceparent` value, refusing anything but a valid version-00 value.
    pub fn parse(value: &str) -> Result<TraceParent, ProtocolError> {
        let invalid = |why: &str| ProtocolError::InvalidTraceParent {
            value: value.chars().take(80).collect(),
            why: why.to_owned(),
        };
        let b = value.as_bytes();
        if b.len() != LEN {
            return Err(invalid("expected 55 characters"));
        }
        if &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return Err(invalid("expected 00-<32 hex>-<16 hex>-<2 hex>"));
        }
        let trace_id = decode_hex::<16>(&b[3..35]).ok_or_else(|| invalid("trace id"))?;
        let span_id = decode_hex::<8>(&b[36..52]).ok_or_else(|| invalid("parent id"))?;
        decode_hex::<1>(&b[53..55]).ok_or_else(|| invalid("flags"))?;
        if trace_id == [0; 16] {
            return Err(invalid("trace id is all zeros"));
        }
        if span_id == [0; 8] {
            return Err(invalid("parent id is all zeros"));
        }
        Ok(TraceParent(value.to_owned()))
    }

    /// Builds one from its parts; `None` when either id is all zeros (no valid context).
    pub fn from_parts(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Option<TraceParent> {
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let mut text = String::with_capacity(LEN);
        text.push_str("00-");
        for b in trace_id {
            text.push_str(&format!("{b:02x}"));
        }
        text.push('-');
        for b in span_id {
            text.push_str(&format!("{b:02x}"));
        }
        text.push_str(&format!("-{flags:02x}"));
        Some(TraceParent(text))
    }

    /// The 16-byte trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        // The text was checked when it was built.
        decode_hex(&self.0.as_bytes()[3..35]).unwrap_or_default()
    }

    /// The 8-byte id of the parent span.
    pub fn span_id(&self) -> [u8; 8] {
        decode_hex(&self.0.as_bytes()[36..52]).unwrap_or_default()
    }

    /// The trace flags (bit 0: sampled).
    pub fn flags(&self) -> u8 {
        decode_hex::<1>(&self.0.as_bytes()[53..55]).map_or(0, |f| f[0])
    }

    /// The trace id as 32 lowercase hex digits, as trace back ends show it.
    pub fn trace_id_hex(&self) -> &str {
        &self.0[3..35]
    }

    /// The value as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TraceParent {
    type Error = ProtocolError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        TraceParent::parse(&value)
    }
}

impl From<TraceParent> for String {
    fn from(t: TraceParent) -> String {
        t.0
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TraceParent {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse(s)
    }
}

/// Decodes an optional `traceparent` field leniently: anything that is not a valid value
/// (wrong shape, a number, an object, null) is `None`, so a bad trace context never gets a
/// message refused. Use with `#[serde(default, deserialize_with = "...")]`.
pub fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TraceParent>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any {
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Any::deserialize(d)? {
        Any::Text(s) => TraceParent::parse(&s).ok(),
        Any::Other(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_valid_traceparent_and_gives_back_its_parts() {
        let t = TraceParent::parse(GOOD).unwrap();
        assert_eq!(t.as_str(), GOOD);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.trace_id()[0], 0x4b);
        assert_eq!(t.span_id()[7], 0xb7);
        assert_eq!(t.flags(), 1);
        let rebuilt = TraceParent::from_parts(t.trace_id(), t.span_id(), t.flags()).unwrap();
        assert_eq!(rebuilt, t);
    }

    #[test]
    fn rejects_traceparents_of_the_wrong_shape() {
        for bad in [
            "",
            "00",
            // another version
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // all-zero trace id and parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // uppercase, non-hex, wrong separators, too long
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            let err = TraceParent::parse(bad).unwrap_err();
            assert!(err.to_string().contains("traceparent"), "{bad}: {err}");
        }
    }

    #[test]
    fn builds_nothing_from_all_zero_ids() {
        assert!(TraceParent::from_parts([0; 16], [1; 8], 1).is_none());
        assert!(TraceParent::from_parts([1; 16], [0; 8], 1).is_none());
        let t = TraceParent::from_parts([0xab; 16], [0x01; 8], 0).unwrap();
        assert_eq!(
            t.as_str(),
            "00-abababababababababababababababab-0101010101010101-00"
        );
    }

    #[test]
    fn lenient_decoding_turns_anything_invalid_into_none() {
        #[derive(Deserialize)]
        struct Holder {
            #[serde(default, deserialize_with = "lenient")]
            traceparent: Option<TraceParent>,
        }
        let decode =
            |json: &str| serde_json::from_str::<Holder>(json).map(|h| h.traceparent.is_some());
        for invalid in [
            "{}",
            r#"{"traceparent":null}"#,
            r#"{"traceparent":"garbage"}"#,
            r#"{"traceparent":42}"#,
            r#"{"traceparent":{"a":[1]}}"#,
        ] {
            assert!(!decode(invalid).unwrap(), "{invalid}");
        }
        assert!(decode(&format!(r#"{{"traceparent":"{GOOD}"}}"#)).unwrap());
    }
}
