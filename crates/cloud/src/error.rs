//! The one error type of the cloud crate.
//!
//! A variant's message says what failed where; the error it wraps is its `source`, and
//! [`max300_protocol::error::Chain`] writes both for a log line or an API answer.

use max300_protocol::error::Cause;
use thiserror::Error;

/// What can go wrong in the cloud service.
#[derive(Debug, Error)]
pub enum CloudError {
    /// The configuration is invalid; the message names the setting.
    #[error("config: {what}")]
    Config {
        /// The setting, and what is wrong with it.
        what: String,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
    /// The configuration's layers cannot be read into settings.
    #[error("config")]
    Settings(#[source] max300_config::ConfigError),
    /// The command store failed.
    #[error("store: {what}")]
    Store {
        /// What failed.
        what: String,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
    /// The audit store failed.
    #[error("audit store: {what}")]
    Audit {
        /// What failed.
        what: String,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
    /// The schedule provider could not be reached or answered badly.
    #[error("provider: {what}")]
    Provider {
        /// What failed.
        what: String,
        /// Whether the same request may succeed later: a network failure, a 5xx or a 429.
        transient: bool,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
    /// A document was rejected whole.
    #[error(transparent)]
    Document(#[from] max300_protocol::ProtocolError),
    /// A write under a lease that another holder has taken since: refused, nothing written.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Another ingestion for the same service is running.
    #[error("an ingestion run is already in progress")]
    Busy,
    /// A message could not be published (the IoT data plane refused or was unreachable).
    #[error("publish: {what}")]
    Publish {
        /// The topic.
        what: String,
        /// The SDK's error.
        #[source]
        cause: Cause,
    },
    /// A Lambda event of no known shape, or broken.
    #[error("lambda event: {what}")]
    Event {
        /// What is wrong with it.
        what: String,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
    /// MQTT failed.
    #[error(transparent)]
    Mqtt(#[from] max300_mqtt::MqttError),
    /// A listener or file could not be opened.
    #[error("{what}")]
    Io {
        /// What could not be opened.
        what: String,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
}

impl CloudError {
    /// A setting is wrong: `what` names it and says why.
    pub fn config(what: impl Into<String>) -> CloudError {
        CloudError::Config {
            what: what.into(),
            cause: None,
        }
    }

    /// A setting cannot be used: `what` names it, `cause` says why.
    pub fn config_because(what: impl Into<String>, cause: impl Into<Cause>) -> CloudError {
        CloudError::Config {
            what: what.into(),
            cause: Some(cause.into()),
        }
    }

    /// The command store broke a rule of its own (no error underneath).
    pub fn store(what: impl Into<String>) -> CloudError {
        CloudError::Store {
            what: what.into(),
            cause: None,
        }
    }

    /// The command store failed doing `what`, because of `cause`.
    pub fn store_failed(what: impl Into<String>, cause: impl Into<Cause>) -> CloudError {
        CloudError::Store {
            what: what.into(),
            cause: Some(cause.into()),
        }
    }

    /// The audit store failed doing `what`, because of `cause`.
    pub fn audit_failed(what: impl Into<String>, cause: impl Into<Cause>) -> CloudError {
        CloudError::Audit {
            what: what.into(),
            cause: Some(cause.into()),
        }
    }

    /// A Lambda event that is not what it should be.
    pub fn event(what: impl Into<String>) -> CloudError {
        CloudError::Event {
            what: what.into(),
            cause: None,
        }
    }

    /// Whether the same operation, tried again unchanged, may succeed: today a provider
    /// fetch that failed on the network, with a 5xx or with a 429.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CloudError::Provider {
                transient: true,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use max300_protocol::error::Chain;

    #[test]
    fn a_store_error_keeps_its_cause_and_says_both_in_a_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let e = CloudError::store_failed("cannot open /data/cloud.db", io);
        assert_eq!(e.to_string(), "store: cannot open /data/cloud.db");
        assert_eq!(
            Chain(&e).to_string(),
            "store: cannot open /data/cloud.db: permission denied"
        );
        let io = std::error::Error::source(&e)
            .and_then(|c| c.downcast_ref::<std::io::Error>())
            .expect("the io::Error is the source");
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn only_a_transient_provider_failure_is_worth_retrying() {
        let provider = |transient| CloudError::Provider {
            what: "GET /tomorrow answered 503".into(),
            transient,
            cause: None,
        };
        assert!(provider(true).is_retryable());
        assert!(!provider(false).is_retryable());
        assert!(!CloudError::store("a message lost its outcome").is_retryable());
        assert!(!CloudError::Busy.is_retryable());
    }
}
