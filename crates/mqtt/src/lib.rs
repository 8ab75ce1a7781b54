//! One robust MQTT session over rumqttc, used by the cloud and by every agent.
//!
//! Only this crate knows about rumqttc. It reconnects with backoff and jitter, resubscribes
//! after every connect (nothing depends on the broker keeping sessions), reports "connected"
//! only once the broker has granted every filter (a refused filter or a missing SUBACK means
//! reconnect, and the reason is kept for readiness probes), and hands out decoded protocol
//! messages that the application acks after it has committed them: PUBACKs go out in arrival
//! order, never on a later connection.
//!
//! # Layout
//! - [`url`]: the `mqtt://` / `mqtts://` broker address.
//! - [`session`]: the session task, its handle and its events.
//! - [`link`]: a lean connection without a task, for a process holding thousands of them (the
//!   fleet simulator).
//! - [`tls`]: server verification against a CA, client certificates, plain-words errors.
//! - [`trace`]: the `traceparent` of a message as the OpenTelemetry parent of a span, and back.
//! - `broker` (feature `broker`): the embedded rumqttd broker, loopback only.

#[cfg(feature = "broker")]
pub mod broker;
pub mod link;
pub mod session;
pub mod tls;
pub mod trace;
pub mod url;

pub use link::{Delivery, Link, LinkConfig, LinkEvent};
pub use session::{Event, Inbound, Qos, Session, SessionConfig, SessionLimits, connect};
pub use tls::TlsFiles;

use max300_protocol::error::Cause;
pub use url::BrokerUrl;

/// What can go wrong with the MQTT session.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The broker address is malformed or unsupported.
    #[error("broker address {url:?}: {reason}")]
    Url {
        /// The address given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A connection could not be made, or its subscription was refused.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The broker.
        url: String,
        /// Why: the socket's error, the broker's refusal, a filter refused or a timeout.
        reason: String,
    },
    /// The session task has stopped (shutdown).
    #[error("the MQTT session is closed")]
    Closed,
    /// The TLS settings are unusable.
    #[error("tls: {what}")]
    Tls {
        /// Which setting or file, and what failed.
        what: String,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
    /// The embedded broker could not start.
    #[error("embedded broker: {what}")]
    Broker {
        /// What failed.
        what: String,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
    /// The client refused a request.
    #[error("mqtt client: {what}")]
    Client {
        /// What was refused.
        what: String,
        /// The error underneath, if one.
        #[source]
        cause: Option<Cause>,
    },
}
