//! The one error type of the protocol crate. Every variant says where and what.

use thiserror::Error;

/// What can go wrong while parsing or checking anything defined by the wire contract.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ProtocolError {
    /// An identifier does not have the allowed shape.
    #[error("{what} {value:?} is not valid: expected {rule}")]
    InvalidId {
        /// Which kind of id.
        what: &'static str,
        /// The offending text (truncated).
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A rate that is not finite, negative or too large to hold.
    #[error("rate_kw {0}")]
    InvalidRate(String),
    /// A non-zero rate for `idle`.
    #[error("idle takes rate_kw 0, got {0}")]
    IdleWithRate(String),
    /// A time zone that is not in the bundled tz database.
    #[error("unknown time zone {0:?}")]
    UnknownTimeZone(String),
    /// A date whose grid cannot be built (out of range or uneven day length).
    #[error("date {0}: {1}")]
    InvalidDate(String, String),
    /// The provider document as a whole is rejected.
    #[error("document rejected: {0}")]
    Document(String),
    /// An MQTT payload that cannot be decoded.
    #[error("undecodable message: {0}")]
    Decode(String),
    /// A `traceparent` that is not a valid W3C version-00 value.
    #[error("traceparent {value:?} is not valid: {why}")]
    InvalidTraceParent {
        /// The offending text (truncated).
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A name that is not one of an enum's wire names (read back from storage).
    #[error("unknown {what} {value:?}")]
    UnknownName {
        /// Which enum.
        what: &'static str,
        /// The offending text (truncated).
        value: String,
    },
    /// A schedule message whose plan breaks the rules (count, grid, sha256).
    #[error("invalid plan: {0}")]
    Plan(String),
}

impl ProtocolError {
    /// `text` is not one of `what`'s wire names.
    pub fn unknown_name(what: &'static str, text: &str) -> ProtocolError {
        ProtocolError::UnknownName {
            what,
            value: text.chars().take(80).collect(),
        }
    }
}
