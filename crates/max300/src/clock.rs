//! The `--clock-*` flags shared by every long-running command.

use std::sync::Arc;

use clap::Args;
use jiff::Timestamp;
use max300_protocol::{Clock, ScaledClock, SystemClock};

/// Which clock plan time runs on.
#[derive(Args, Clone, Debug, Default)]
pub struct ClockArgs {
    /// Run plan time this many times faster than real time.
    #[arg(long, env = "MAX300_CLOCK_SPEED")]
    pub clock_speed: Option<f64>,
    /// Plan time at the anchor (RFC 3339). Processes that must agree share it.
    #[arg(long, env = "MAX300_CLOCK_START")]
    pub clock_start: Option<Timestamp>,
    /// The real instant at which plan time reads --clock-start. Default: this process's start.
    #[arg(long, env = "MAX300_CLOCK_ANCHOR")]
    pub clock_anchor: Option<Timestamp>,
}

impl ClockArgs {
    /// The system clock, or a scaled one when any flag is given.
    pub fn build(&self) -> anyhow::Result<Arc<dyn Clock>> {
        if self.clock_speed.is_none() && self.clock_start.is_none() && self.clock_anchor.is_none() {
            return Ok(Arc::new(SystemClock));
        }
        let speed = self.clock_speed.unwrap_or(1.0);
        if !(speed.is_finite() && speed > 0.0) {
            anyhow::bail!("--clock-speed: {speed} must be a positive number");
        }
        let real_now = SystemClock.now();
        let anchor = self.clock_anchor.unwrap_or(real_now);
        let start = self.clock_start.unwrap_or(anchor);
        Ok(Arc::new(ScaledClock::new(start, anchor, speed)))
    }
}
