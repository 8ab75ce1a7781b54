//! The MAX300 edge agent: receives day-ahead plans over MQTT, keeps them on disk, and drives
//! one battery controller through every half-hour period, reporting what happened.
//!
//! Each period gets exactly one report. The current period is run at its start, and its
//! report is recorded then (so it is never run or reported twice) but sent when the period
//! ends, with `energy_kwh`, the energy the unit delivered in it. Periods missed while the agent
//! was down (`agent_down`) or its clock unsynchronized (`clock_unsynced`) are reported at once,
//! with no energy, back to the `catch_up_h` cut-off. A cancel for a plan the unit does not
//! hold yet is kept, and refuses that plan when it comes (reason `cancelled`).
//!
//! # Layout
//! - [`config`]: the agent's settings, layered from defaults, a file and `MAX300_*` variables.
//! - [`agent`]: the async shell: one `select!` over MQTT events, period boundaries, heartbeats,
//!   re-asserts, outbox resends and shutdown. It carries out what the engine decides.
//!   [`run`] drives the controller the config names; [`run_with`] is handed one (the
//!   simulated battery of `max300-sim`, which this crate does not contain).
//! - [`engine`]: pure decisions: which plans are held (and which are cancelled, before or after
//!   they arrive), what each period runs or skips and why, when to wake next, and the fallback
//!   when there is no plan.
//! - [`energy`]: pure integration of the energy a period delivers, from the power readings
//!   the agent takes anyway.
//! - [`safety`]: pure clamping to the device limit, the controller's live limits and the
//!   state-of-charge window with hysteresis.
//! - [`store`]: the SQLite store: plans, control messages, reports (one per period; the
//!   current one open until the period ends), the outbox of acks and reports awaiting a
//!   receipt, and the store's id and sequence.
//! - [`battery`]: the controller seam ([`Battery`]), the SunSpec controller over Modbus TCP
//!   ([`SunSpecBattery`]) with its register map (shared with the simulator's server), and the
//!   settings of a simulated unit ([`SimConfig`], the `[sim]` table).
//! - [`metrics`]: the agent's Prometheus metrics and its optional local endpoint.
//! - [`systemd`]: `READY=1` and the watchdog, when run by systemd with `Type=notify`.
//! - [`timesync`]: whether the system clock is synchronized (NTP), for `clock_sync`.
//! - [`error`]: the crate's error type.

pub mod agent;
pub mod battery;
pub mod config;
pub mod energy;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod safety;
pub mod store;
pub mod systemd;
pub mod timesync;

pub use agent::{run, run_with};
pub use battery::{Battery, BatteryStatus, SimConfig, SunSpecBattery, SunSpecUrl};
pub use config::AgentConfig;
pub use error::AgentError;
