//! Integration tests of the cloud service: the store contract, the HTTP API and the feedback
//! consumer, against real SQLite files, a real HTTP server and the embedded broker.

// Test helpers unwrap too: a panic there is the failure message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod audit;
mod dashboard;
#[cfg(feature = "aws")]
pub mod moto;
mod provider;
mod store;

use jiff::Timestamp;
use max300_protocol::{Day, DeviceId, Mode, RateKw, Schedule, Setpoint};

/// A 48-period day.
pub fn day() -> Day {
    Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap()
}

/// A schedule charging at `kw` in period 1.
pub fn schedule(device: &str, kw: u32) -> Schedule {
    let mut setpoints = vec![Setpoint::IDLE; 48];
    setpoints[0] = Setpoint::new(Mode::Charge, RateKw::from_watts(kw * 1000)).unwrap();
    Schedule::new(DeviceId::parse(device).unwrap(), day(), setpoints).unwrap()
}

/// An instant the day before.
pub fn eve() -> Timestamp {
    "2026-11-29T16:00:00Z".parse().unwrap()
}
