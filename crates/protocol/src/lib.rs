//! The MAX300 wire contract, shared by the cloud service and the edge agent.
//!
//! Everything here is pure: no tokio, no sockets, no database. Both sides agree on the
//! schedule format, the messages and the period grid because they use this crate.
//!
//! # Layout
//! - [`ids`]: device, message and store identifiers, parsed once at the edge.
//! - [`setpoint`]: mode, rate in whole watts, and the pair of them.
//! - [`day`]: the half-hour period grid of one local date (46, 48 or 50 periods).
//! - [`schedule`]: a normalized per-device plan and its `sha256`.
//! - [`document`]: the provider document and its normalization into schedules.
//! - [`message`]: the MQTT payloads and their decoding.
//! - [`topic`]: topic names, built and parsed in one place.
//! - [`trace`]: the W3C `traceparent` that carries a trace across the broker.
//! - [`backoff`]: [`Backoff`], the pause before trying again, for every retry loop.
//! - [`clock`]: system, scaled and manual clocks; the only place wall time is read.
//! - [`error`]: the crate's error type.

pub mod backoff;
pub mod clock;
pub mod day;
pub mod document;
pub mod error;
pub mod ids;
pub mod message;
pub mod schedule;
pub mod setpoint;
pub mod topic;
pub mod trace;

pub use backoff::Backoff;
pub use clock::{Clock, ManualClock, ScaledClock, SystemClock};
pub use day::Day;
pub use document::{FieldError, Fleet, Normalized, NormalizedSchedule, Rejection};
pub use error::ProtocolError;
pub use ids::{DeviceId, MessageId, MessageIds, Roster, StoreId};
pub use message::Message;
pub use schedule::Schedule;
pub use setpoint::{Mode, RateKw, Setpoint};
pub use topic::{Channel, Topics};
pub use trace::TraceParent;

/// Length of one period of a plan, in seconds.
pub const PERIOD_SECS: i64 = 1800;

/// The largest MQTT payload either side sends or accepts.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// The fleet's default time zone.
pub const DEFAULT_TIMEZONE: &str = "Europe/London";
