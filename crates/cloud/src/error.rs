//! The one error type of the cloud crate.

use thiserror::Error;

/// What can go wrong in the cloud service.
#[derive(Debug, Error)]
pub enum CloudError {
    /// The configuration is invalid; the message names the setting.
    #[error("config: {0}")]
    Config(String),
    /// The command store failed.
    #[error("store: {0}")]
    Store(String),
    /// The audit store failed.
    #[error("audit store: {0}")]
    Audit(String),
    /// The schedule provider could not be reached or answered badly.
    #[error("provider: {0}")]
    Provider(String),
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
    #[error("publish: {0}")]
    Publish(String),
    /// A Lambda event of no known shape, or broken.
    #[error("lambda event: {0}")]
    Event(String),
    /// MQTT failed.
    #[error(transparent)]
    Mqtt(#[from] max300_mqtt::MqttError),
    /// A listener or file could not be opened.
    #[error("{0}")]
    Io(String),
}
