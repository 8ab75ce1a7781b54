//! Stand-ins for MAX300's outside world, for `max300 up`, the tests and the benchmarks: a
//! simulated battery (in-process, or served over Modbus as a SunSpec map).
//!
//! The dependency runs one way: this crate depends on what it simulates (the agent's battery
//! seam and its SunSpec register map), and nothing in production depends on it. The binary
//! links it only with its `sim` feature, which the Raspberry Pi's agent-only build leaves
//! out, so a Pi build has no simulated battery.
//!
//! # Layout
//! - [`battery`]: the simulated unit ([`SimBattery`]), the one battery model, with its write
//!   log on disk.
//! - [`sunspec`]: that unit served as a SunSpec Modbus TCP map (`max300 battery-sim`), with
//!   faults to play; its tests run the agent's SunSpec client against it.
//! - [`agent`]: an agent handed a simulated battery when its config says `battery = "sim"`.
//! - [`sample`]: the sample schedule provider (`max300 provider`).
//! - [`fleet`]: N simulated devices, one MQTT session each, that ack every schedule through
//!   the agent's own engine, hold the plans and report each period at its boundary, with
//!   the agent's outbox and receipt rules (`max300 fleet`).
//! - [`cloud`]: the one fake cloud of the agent's tests and the agent benchmark.
//! - [`bench`]: the drivers of `max300 bench …`.
//! - [`fds`]: the open-file limit a large fleet needs.
//! - [`error`]: the crate's error type.

pub mod agent;
pub mod battery;
pub mod bench;
pub mod cloud;
pub mod error;
pub mod fds;
pub mod fleet;
pub mod sample;
pub mod sunspec;

pub use agent::run_agent;
pub use battery::SimBattery;
pub use error::SimError;
