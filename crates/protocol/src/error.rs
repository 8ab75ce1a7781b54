//! The one error type of the protocol crate. Every variant says where and what.
//!
//! Every crate's error keeps the error it wraps as its `source`, and its own message says
//! only what failed where; [`Chain`] writes the two together for a log line or an answer.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use thiserror::Error;

/// An underlying error kept as a cause.
pub type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// Writes an error and its causes as one line, `what: why: deeper why`, the way `anyhow`'s
/// `{:#}` does. For log fields (`error = %Chain(&e)`) and error answers.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// What can go wrong while parsing or checking anything defined by the wire contract.
#[derive(Debug, Error, Clone)]
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
    /// A date that jiff cannot place in its time zone (out of range).
    #[error("date {date}")]
    DateOutOfRange {
        /// The date.
        date: String,
        /// Why jiff cannot place it.
        #[source]
        cause: Arc<jiff::Error>,
    },
    /// The provider document as a whole is rejected.
    #[error("document rejected: {0}")]
    Document(String),
    /// An MQTT payload that cannot be decoded.
    #[error("undecodable message: {0}")]
    Decode(String),
    /// An MQTT payload that is not the JSON of any message.
    #[error("undecodable message")]
    Json(#[source] Arc<serde_json::Error>),
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
    /// `date` has no grid: jiff cannot place it.
    pub fn out_of_range(date: impl fmt::Display, cause: jiff::Error) -> ProtocolError {
        ProtocolError::DateOutOfRange {
            date: date.to_string(),
            cause: Arc::new(cause),
        }
    }

    /// `text` is not one of `what`'s wire names.
    pub fn unknown_name(what: &'static str, text: &str) -> ProtocolError {
        ProtocolError::UnknownName {
            what,
            value: text.chars().take(80).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_says_what_failed_and_every_cause_under_it() {
        let json = serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        let e = ProtocolError::Json(Arc::new(json));
        assert_eq!(e.to_string(), "undecodable message");
        assert_eq!(
            Chain(&e).to_string(),
            "undecodable message: EOF while parsing an object at line 1 column 1"
        );
        assert!(e.source().is_some(), "the serde_json error is kept");
    }
}
