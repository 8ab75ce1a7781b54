//! The sweeper: once a second (real time), applies the clock-driven transitions (`late`,
//! `expired`, `incomplete`) and publishes again whatever is still waiting for an ack, with
//! backoff. Nothing is left stuck in a non-terminal state.

use max300_protocol::error::Chain;
use std::sync::Arc;
use std::time::Duration;

use max300_protocol::Clock;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::CloudError;
use crate::CommandState;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::publish::Publisher;

/// Real time between sweeps.
const TICK: Duration = Duration::from_secs(1);
/// Instances on one store take turns by a lease: one sweeps (and resends) at a time, and if
/// it dies another takes over once this much real time has passed.
const LEASE: Duration = Duration::from_secs(10);
/// The lease's name in the store.
const LEASE_NAME: &str = "sweeper";

/// Runs the sweeps.
#[derive(Debug)]
pub struct Sweeper {
    /// The commands.
    pub ledger: Ledger,
    /// Publishes what is due again.
    pub publisher: Publisher,
    /// Plan time.
    pub clock: Arc<dyn Clock>,
    /// Counts late and expired commands, and resends.
    pub metrics: Arc<Metrics>,
    /// This instance, as a lease holder; `None` when it runs alone and needs no lease
    /// (restarted under a new name, it would otherwise wait out its own old one).
    pub owner: Option<String>,
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
                warn!(error = %Chain(&e), "sweep failed");
            }
        }
    }

    /// One sweep: the clock's transitions, then the publishes due again (commands and
    /// control messages never published included), a page at a time until none is left;
    /// nothing when another instance holds the lease.
    pub async fn sweep_once(&self) -> Result<(), CloudError> {
        loop {
            let now = self.clock.now();
            let until = now + self.clock.clock_duration(LEASE);
            // Taken again for each page, so a long sweep keeps what it holds.
            if let Some(owner) = &self.owner
                && self
                    .ledger
                    .store()
                    .lease(LEASE_NAME, owner, until, now)
                    .await?
                    .is_none()
            {
                return Ok(());
            }
            if !self.sweep_page(now).await? {
                return Ok(());
            }
        }
    }

    /// One page of a sweep; says whether more may be due.
    async fn sweep_page(&self, now: jiff::Timestamp) -> Result<bool, CloudError> {
        let sweep = self.ledger.sweep(now).await?;
        for s in &sweep.swept {
            if s.late {
                self.metrics.late();
                warn!(device_id = %s.device_id, message_id = %s.message_id, "command late: not acknowledged when its first period started");
            }
            if let Some(state) = s.state {
                if state == CommandState::Expired {
                    self.metrics.expired();
                }
                info!(device_id = %s.device_id, message_id = %s.message_id, state = %state, "command state changed by the clock");
            }
        }
        if !sweep.resend.is_empty() {
            for s in &sweep.resend {
                info!(device_id = %s.device_id(), message_id = %s.message_id(), "no ack yet: publishing again");
            }
            self.metrics.resent(sweep.resend.len() as u64);
            self.publisher.publish_loaded(sweep.resend).await?;
        }
        Ok(sweep.more)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use jiff::Timestamp;
    use max300_protocol::{
        Day, DeviceId, ManualClock, Message, MessageId, Schedule, Setpoint, Topics,
    };

    use super::*;
    use crate::publish::{Publisher, Transport};
    use crate::store::NewCommand;
    use crate::{CommandStore, Policy, SqliteStore};
    use jiff::SignedDuration;

    /// The broker's side of publishing, recorded.
    #[derive(Debug, Default)]
    struct Recorded(Mutex<Vec<String>>);

    #[async_trait]
    impl Transport for Recorded {
        async fn publish(&self, topic: String, _: &Message) -> Result<(), CloudError> {
            self.0.lock().unwrap().push(topic);
            Ok(())
        }

        fn is_connected(&self) -> bool {
            true
        }
    }

    const T0: &str = "2026-11-29T16:00:00Z";

    /// A ledger on a new SQLite store (kept alive by the directory returned) whose commands
    /// wait 5 s for an ack, holding `devices` commands (`d0`, `d1`, …) published at [`T0`].
    async fn sent_commands(devices: usize) -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn CommandStore> =
            Arc::new(SqliteStore::open(&dir.path().join("cloud.sqlite")).unwrap());
        let t0: Timestamp = T0.parse().unwrap();
        let day = Day::named("2026-11-30".parse().unwrap(), "Europe/London").unwrap();
        let policy = Policy {
            ack_timeout: SignedDuration::from_secs(5),
            ..Policy::default()
        };
        let ledger = Ledger::new(store, policy);
        let commands: Vec<NewCommand> = (0..devices)
            .map(|i| NewCommand {
                message_id: MessageId::generate(t0),
                schedule: Schedule::new(
                    DeviceId::parse(format!("d{i}")).unwrap(),
                    day.clone(),
                    vec![Setpoint::IDLE; 48],
                )
                .unwrap(),
                traceparent: None,
            })
            .collect();
        ledger.insert_commands(&commands, t0, None).await.unwrap();
        let ids: Vec<MessageId> = commands.into_iter().map(|c| c.message_id).collect();
        let loaded = ledger.publishable(&ids, t0).await.unwrap();
        ledger.published(loaded, t0).await.unwrap();
        (dir, ledger)
    }

    /// A sweeper named `owner` whose publishes are recorded in `sent`.
    fn sweeper(
        ledger: &Ledger,
        clock: &Arc<ManualClock>,
        sent: &Arc<Recorded>,
        owner: &str,
    ) -> Sweeper {
        Sweeper {
            ledger: ledger.clone(),
            publisher: Publisher::new(
                sent.clone(),
                Topics::new("max300"),
                ledger.clone(),
                clock.clone(),
                Arc::new(Metrics::new()),
            ),
            clock: clock.clone(),
            metrics: Arc::new(Metrics::new()),
            owner: Some(owner.into()),
        }
    }

    #[tokio::test]
    async fn two_instances_take_turns_and_the_second_takes_over_when_the_first_stops() {
        let (_dir, ledger) = sent_commands(1).await;
        let clock = Arc::new(ManualClock::new(T0.parse().unwrap()));
        let sent = Arc::new(Recorded::default());
        let (a, b) = (
            sweeper(&ledger, &clock, &sent, "a"),
            sweeper(&ledger, &clock, &sent, "b"),
        );
        let resends = || sent.0.lock().unwrap().len();

        // `a` sweeps first, with nothing due yet, and holds the lease for 10 s.
        clock.advance(SignedDuration::from_secs(1));
        a.sweep_once().await.unwrap();
        // Due now (5 s without an ack), but `b` does not hold the lease: it leaves it.
        clock.advance(SignedDuration::from_secs(5));
        b.sweep_once().await.unwrap();
        assert_eq!(resends(), 0, "only the lease holder resends");
        a.sweep_once().await.unwrap();
        assert_eq!(resends(), 1);

        // `a` stops. Its lease ends 10 s after its last sweep, and `b` takes over the next
        // resend (due 10 s after the last, by backoff).
        clock.advance(SignedDuration::from_secs(9));
        b.sweep_once().await.unwrap();
        assert_eq!(resends(), 1, "a's lease still holds");
        clock.advance(SignedDuration::from_secs(2));
        b.sweep_once().await.unwrap();
        assert_eq!(resends(), 2);
        assert_eq!(sent.0.lock().unwrap()[1], "max300/d0/schedule");
    }

    /// A day's commands all wake together; a sweep takes them a page at a time, so it never
    /// holds a whole fleet's, and still leaves none of them for the next tick.
    #[tokio::test]
    async fn a_sweep_takes_what_is_due_a_page_at_a_time_and_all_of_it() {
        let (_dir, ledger) = sent_commands(crate::ledger::SWEEP_PAGE + 1).await;
        let clock = Arc::new(ManualClock::new(T0.parse().unwrap()));

        // No ack from any of them: all due again at once.
        clock.advance(SignedDuration::from_secs(6));
        let page = ledger.sweep(clock.now()).await.unwrap();
        assert_eq!(page.resend.len(), crate::ledger::SWEEP_PAGE);
        assert!(page.more, "a whole page: more may be due");
        let rest = ledger.sweep(clock.now()).await.unwrap();
        assert_eq!(rest.resend.len(), 1);
        assert!(!rest.more);

        // Due again, after the backoff: one sweep of the sweeper sends every one.
        clock.advance(ledger.policy().resend_delay(2) + SignedDuration::from_secs(1));
        let sent = Arc::new(Recorded::default());
        sweeper(&ledger, &clock, &sent, "a")
            .sweep_once()
            .await
            .unwrap();
        assert_eq!(sent.0.lock().unwrap().len(), crate::ledger::SWEEP_PAGE + 1);
        assert!(ledger.sweep(clock.now()).await.unwrap().resend.is_empty());
    }
}
