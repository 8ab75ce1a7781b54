//! The sweeper: once a second (real time), applies the clock-driven transitions (`late`,
//! `expired`, `incomplete`) and publishes again whatever is still waiting for an ack, with
//! backoff. Nothing is left stuck in a non-terminal state.

use std::sync::Arc;
use std::time::Duration;

use jiff::SignedDuration;
use max300_protocol::Clock;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::CommandState;
use crate::lifecycle::resend_due;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::{CloudError, CommandStore};

/// Real time between sweeps.
const TICK: Duration = Duration::from_secs(1);
/// No resend comes sooner than this much real time after the last publish.
const REAL_FLOOR: Duration = Duration::from_secs(2);

/// Runs the sweeps.
#[derive(Debug)]
pub struct Sweeper {
    /// The command store.
    pub store: Arc<dyn CommandStore>,
    /// Publishes resends.
    pub publisher: Publisher,
    /// Plan time.
    pub clock: Arc<dyn Clock>,
    /// First resend delay, in clock time.
    pub ack_timeout: SignedDuration,
    /// Counts late and expired commands, and resends.
    pub metrics: Arc<Metrics>,
}

impl Sweeper {
    /// Sweeps until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.sweep_once().await {
                warn!(error = %e, "sweep failed");
            }
        }
    }

    /// One sweep: transitions, then resends.
    pub async fn sweep_once(&self) -> Result<(), CloudError> {
        let now = self.clock.now();
        for s in self.store.sweep(now).await? {
            match s.state {
                Some(state) => {
                    if state == CommandState::Expired {
                        self.metrics.expired();
                    }
                    info!(device_id = %s.device_id, message_id = %s.message_id, state = %state, "command state changed by the clock")
                }
                None => {
                    self.metrics.late();
                    warn!(device_id = %s.device_id, message_id = %s.message_id, "command late: not acknowledged when its first period started")
                }
            }
        }
        let floor = SignedDuration::try_from(REAL_FLOOR.mul_f64(self.clock.speed()))
            .unwrap_or(SignedDuration::MAX);
        let due: Vec<_> = self
            .store
            .awaiting_ack(now)
            .await?
            .into_iter()
            .filter(|u| resend_due(u.publishes, u.last_sent_at, now, self.ack_timeout, floor))
            .collect();
        if !due.is_empty() {
            for u in &due {
                info!(device_id = %u.device_id, message_id = %u.message_id, publishes = u.publishes, "no ack yet: publishing again");
            }
            self.metrics.resent(due.len() as u64);
            let ids: Vec<_> = due.into_iter().map(|u| u.message_id).collect();
            self.publisher.stored(&ids).await?;
        }
        Ok(())
    }
}
