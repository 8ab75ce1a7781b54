//! One agent as a build with the simulator runs it: handed a simulated battery when its config
//! says `battery = "sim"`, else on the controller its config names.

use std::sync::Arc;

use max300_agent::config::BatteryChoice;
use max300_agent::{AgentConfig, AgentError};
use max300_protocol::Clock;
use tokio_util::sync::CancellationToken;

use crate::SimBattery;

/// Runs one agent until `shutdown`, as [`max300_agent::run`] does, except that
/// `battery = "sim"` gets a [`SimBattery`] (see [`SimBattery::for_agent`]).
pub async fn run_agent(
    config: AgentConfig,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    // A config error is reported as the agent reports it, before any battery is made.
    config.validate()?;
    match config.battery_choice()? {
        BatteryChoice::Sim => {
            let battery = Arc::new(SimBattery::for_agent(&config, clock.clone()));
            max300_agent::run_with(config, battery, clock, shutdown).await
        }
        BatteryChoice::SunSpec(_) | BatteryChoice::DryRun(_) => {
            max300_agent::run(config, clock, shutdown).await
        }
    }
}
