//! The battery controller seam: what the agent asks of any controller, in domain words.
//! [`sim`] is the simulated unit (the one battery model), which can keep a [`write_log`] on
//! disk for tests and audits; [`sunspec`] drives a real controller over Modbus TCP, and serves
//! the simulated unit the same way for `max300 battery-sim`.

use std::fmt::Debug;

use async_trait::async_trait;
use max300_protocol::{RateKw, Setpoint};
use thiserror::Error;

pub mod sim;
pub mod sunspec;
pub mod write_log;

pub use sim::{SimBattery, SimConfig};
pub use sunspec::{SunSpecBattery, SunSpecUrl};
pub use write_log::{WriteLogEntry, read_write_log};

/// A battery controller: takes a setpoint, and says what it runs and what it can do.
#[async_trait]
pub trait Battery: Send + Sync + Debug {
    /// Asks the controller to run `setpoint` (and restarts its revert timer).
    async fn apply(&self, setpoint: Setpoint) -> Result<(), BatteryError>;

    /// Reads what the controller runs now, its state of charge and its live limits.
    async fn read(&self) -> Result<BatteryStatus, BatteryError>;
}

/// A controller that is only read, for a `dry-run:` unit: every write is refused here, so
/// nothing the agent does can reach the controller.
#[derive(Debug)]
pub struct ReadOnly<B>(pub B);

#[async_trait]
impl<B: Battery> Battery for ReadOnly<B> {
    async fn apply(&self, setpoint: Setpoint) -> Result<(), BatteryError> {
        Err(BatteryError::Device(format!(
            "dry run: {setpoint} not written (this unit only reads its controller)"
        )))
    }

    async fn read(&self) -> Result<BatteryStatus, BatteryError> {
        self.0.read().await
    }
}

/// What a controller reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatteryStatus {
    /// The setpoint the controller is running.
    pub setpoint: Setpoint,
    /// State of charge, in percent.
    pub soc_pct: f64,
    /// The most it will charge at right now.
    pub max_charge: RateKw,
    /// The most it will discharge at right now.
    pub max_discharge: RateKw,
    /// The power the unit measures flowing now, kW, charge positive (see
    /// [`Setpoint::signed_kw`]); `None` when the controller does not measure it.
    pub measured_kw: Option<f64>,
}

/// Why a controller could not be driven.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum BatteryError {
    /// The controller could not be reached.
    #[error("controller unreachable: {0}")]
    Transport(String),
    /// The controller answered with an error, or with registers that make no sense.
    #[error("controller refused: {0}")]
    Device(String),
    /// The controller took a write but reads back something else.
    #[error("controller read back {register} = {read}, but {wrote} was written")]
    ReadBack {
        /// The register's SunSpec name.
        register: &'static str,
        /// What was written.
        wrote: u16,
        /// What it holds.
        read: u16,
    },
}

/// The contract every [`Battery`] meets; each implementation's tests run it.
#[cfg(test)]
pub(crate) async fn contract(battery: &dyn Battery) {
    use max300_protocol::Mode;

    let charge = Setpoint::new(Mode::Charge, RateKw::from_watts(10_000)).unwrap();
    battery.apply(charge).await.unwrap();
    let status = battery.read().await.unwrap();
    assert_eq!(status.setpoint, charge, "reads back what was applied");
    assert!(
        (0.0..=100.0).contains(&status.soc_pct),
        "{}",
        status.soc_pct
    );

    let discharge = Setpoint::new(Mode::Discharge, RateKw::from_watts(5_000)).unwrap();
    battery.apply(discharge).await.unwrap();
    assert_eq!(battery.read().await.unwrap().setpoint, discharge);

    battery.apply(Setpoint::IDLE).await.unwrap();
    assert_eq!(battery.read().await.unwrap().setpoint, Setpoint::IDLE);
}
