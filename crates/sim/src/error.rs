//! The crate's error type: what can go wrong in a simulator, with its cause kept.

use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

/// Everything the simulators can fail at.
#[derive(Debug, Error)]
pub enum SimError {
    /// A setting is out of range; the message starts with the setting's name.
    #[error("{0}")]
    Config(String),
    /// A log on disk cannot be opened, read or parsed.
    #[error("{}: {what}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// What failed: `cannot read`, `line 7`.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A listener cannot be bound.
    #[error("{what}: cannot listen on {addr}")]
    Listen {
        /// Which server.
        what: &'static str,
        /// Where it was to listen.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A date, zone, id or plan breaks the protocol's rules.
    #[error(transparent)]
    Protocol(#[from] max300_protocol::ProtocolError),
    /// A date or time out of range.
    #[error(transparent)]
    Time(#[from] jiff::Error),
    /// A document cannot be encoded.
    #[error("cannot encode a document")]
    Json(#[from] serde_json::Error),
    /// A document cannot be written out.
    #[error("cannot write a document")]
    Write(#[from] std::io::Error),
    /// The MQTT session cannot be started or used.
    #[error(transparent)]
    Mqtt(#[from] max300_mqtt::MqttError),
    /// Something awaited did not come in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The MQTT session stopped (shutdown).
    #[error("the MQTT session stopped")]
    Closed,
}
