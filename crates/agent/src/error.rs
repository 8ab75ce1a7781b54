//! The crate's one error type: what can stop the agent from starting or keep it from working.

use thiserror::Error;

use crate::battery::BatteryError;

/// Everything that can go wrong in the agent. Start-up failures surface from [`crate::run`];
/// failures while running are logged and retried, never fatal.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The configuration is missing a value or has one out of range.
    #[error("config: {0}")]
    Config(String),
    /// The plan store cannot be opened, read or written.
    #[error("store {path}: {reason}")]
    Store {
        /// The store file (or directory).
        path: String,
        /// What failed.
        reason: String,
    },
    /// The MQTT session cannot be started.
    #[error(transparent)]
    Mqtt(#[from] max300_mqtt::MqttError),
    /// The battery controller cannot be driven.
    #[error("battery: {0}")]
    Battery(#[from] BatteryError),
}
