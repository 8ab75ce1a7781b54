//! The battery controller seam: what the agent asks of any controller, in domain words.
//! [`sunspec`] drives a real controller over Modbus TCP. The simulated unit is not here: it
//! stands in for the outside world, so it lives in `max300-sim`, which hands one to
//! [`crate::run_with`]. Only its settings ([`SimConfig`], the `[sim]` table) stay, because
//! the agent's config carries them.

use std::fmt::{self, Debug};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use max300_protocol::{RateKw, Setpoint};
use serde::{Deserialize, Serialize};

pub mod sunspec;

pub use sunspec::{SunSpecBattery, SunSpecUrl};

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
///
/// `Display` and `Error` are written out rather than derived: a transport failure's cause is
/// shared (`Arc`, so the back-off after it can answer with the same error), and `source`
/// hands out the error inside the `Arc`, so that a caller can downcast it.
#[derive(Clone, Debug)]
pub enum BatteryError {
    /// The controller could not be reached.
    Transport {
        /// Which request, to where, and what happened (`read model 124 at 40070: no answer
        /// within 1000 ms`).
        what: String,
        /// The I/O or Modbus error underneath, if one.
        cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// The controller answered with an error, or with registers that make no sense.
    Device(String),
    /// The controller took a write but reads back something else.
    ReadBack {
        /// The register's SunSpec name.
        register: &'static str,
        /// What was written.
        wrote: u16,
        /// What it holds.
        read: u16,
    },
}

impl fmt::Display for BatteryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatteryError::Transport { what, .. } => write!(f, "controller unreachable: {what}"),
            BatteryError::Device(what) => write!(f, "controller refused: {what}"),
            BatteryError::ReadBack {
                register,
                wrote,
                read,
            } => write!(
                f,
                "controller read back {register} = {read}, but {wrote} was written"
            ),
        }
    }
}

impl std::error::Error for BatteryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BatteryError::Transport {
                cause: Some(cause), ..
            } => Some(cause.as_ref()),
            _ => None,
        }
    }
}

impl BatteryError {
    /// The controller could not be reached: `what` says which request and what happened.
    pub fn unreachable(what: impl Into<String>) -> BatteryError {
        BatteryError::Transport {
            what: what.into(),
            cause: None,
        }
    }

    /// The controller could not be reached because of `cause`.
    pub fn unreachable_because(
        what: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> BatteryError {
        BatteryError::Transport {
            what: what.into(),
            cause: Some(Arc::new(cause)),
        }
    }
}

/// The simulated unit: its size, limits and losses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Usable capacity in kWh.
    pub capacity_kwh: f64,
    /// State of charge at start-up, percent.
    pub initial_soc_pct: f64,
    /// The controller's own charge limit, kW.
    pub max_charge_kw: f64,
    /// The controller's own discharge limit, kW.
    pub max_discharge_kw: f64,
    /// How fast the power follows a new setpoint, kW per second of clock time; 0: at once.
    pub ramp_kw_per_s: f64,
    /// The fraction of the energy charged that can be discharged again (0 < η ≤ 1); the loss
    /// is split evenly between charging and discharging (√η each way).
    pub round_trip_efficiency: f64,
    /// Appends every controller write as one JSON line; for tests and audits. Unset: no log.
    /// (The simulated unit, in `max300-sim`, keeps it.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_log: Option<PathBuf>,
    /// Keeps the state of charge here, so a restarted unit resumes where it was rather than
    /// at `initial_soc_pct`. Unset: the state lives in memory only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            capacity_kwh: 300.0,
            initial_soc_pct: 50.0,
            max_charge_kw: 150.0,
            max_discharge_kw: 150.0,
            ramp_kw_per_s: 0.0,
            round_trip_efficiency: 1.0,
            write_log: None,
            state_file: None,
        }
    }
}

impl SimConfig {
    /// Checks the ranges; the message starts with the field name.
    pub fn validate(&self) -> Result<(), String> {
        let pct = |name: &str, v: f64| {
            if v.is_finite() && (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name}: {v} must be from 0 to 100"))
            }
        };
        if !(self.capacity_kwh.is_finite() && self.capacity_kwh > 0.0) {
            return Err(format!(
                "capacity_kwh: {} must be above 0",
                self.capacity_kwh
            ));
        }
        pct("initial_soc_pct", self.initial_soc_pct)?;
        for (name, v) in [
            ("max_charge_kw", self.max_charge_kw),
            ("max_discharge_kw", self.max_discharge_kw),
        ] {
            RateKw::try_from(v).map_err(|e| format!("{name}: {e}"))?;
        }
        if !(self.ramp_kw_per_s.is_finite() && self.ramp_kw_per_s >= 0.0) {
            return Err(format!(
                "ramp_kw_per_s: {} must be 0 (instant) or above",
                self.ramp_kw_per_s
            ));
        }
        if !(self.round_trip_efficiency > 0.0 && self.round_trip_efficiency <= 1.0) {
            return Err(format!(
                "round_trip_efficiency: {} must be above 0 and at most 1",
                self.round_trip_efficiency
            ));
        }
        if self
            .write_log
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("write_log: must be a file path when set".into());
        }
        Ok(())
    }
}
