//! The crate's one error type: what can stop the agent from starting or keep it from working.

use max300_protocol::error::Cause;
use thiserror::Error;

use crate::battery::BatteryError;

/// Everything that can go wrong in the agent. Start-up failures surface from [`crate::run`];
/// failures while running are logged and retried, never fatal.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The configuration is missing a value or has one out of range.
    #[error("config: {0}")]
    Config(String),
    /// The configuration's layers cannot be read into settings.
    #[error("config")]
    Settings(#[source] max300_config::ConfigError),
    /// The plan store cannot be opened, read or written.
    #[error("store {path}: {what}")]
    Store {
        /// The store file (or directory).
        path: String,
        /// What failed.
        what: String,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
    /// The MQTT session cannot be started.
    #[error(transparent)]
    Mqtt(#[from] max300_mqtt::MqttError),
    /// A listener could not be opened.
    #[error("{what}")]
    Io {
        /// What could not be opened.
        what: String,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
    /// The battery controller cannot be driven.
    #[error("battery: {0}")]
    Battery(#[from] BatteryError),
}

impl AgentError {
    /// The store at `path` failed doing `what`, because of `cause`.
    pub(crate) fn store(
        path: impl std::fmt::Display,
        what: impl Into<String>,
        cause: impl Into<Cause>,
    ) -> AgentError {
        AgentError::Store {
            path: path.to_string(),
            what: what.into(),
            cause: Some(cause.into()),
        }
    }
}
