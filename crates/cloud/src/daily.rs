//! The daily fetch: at a configured local time, fetch tomorrow's plan; retry with backoff
//! until it succeeds or the date begins; and run at start-up when tomorrow has no finished
//! ingestion. Runs on clock time, so a scaled clock plays it too.
//!
//! Several instances on one store run each date's fetch once: the one that takes the date's
//! lease fetches, the others look again a little later and find it done.

use std::sync::Arc;
use std::time::Duration;

use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use max300_protocol::Clock;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ingest::Ingestor;
use crate::{CloudError, CommandStore};

/// How long, in real time, a date's fetch is held by the instance that took it. A fetch that
/// takes longer may be run again by another instance, which is safe (the same content
/// creates no new commands), only wasteful; an instance that died gives it up after this.
const LEASE: Duration = Duration::from_secs(120);

/// When to fetch.
#[derive(Clone, Debug)]
pub struct DailyFetch {
    /// The fleet's zone.
    pub timezone: TimeZone,
    /// Local time of the fetch.
    pub at: Time,
    /// This instance, as a lease holder; `None` when it runs alone.
    pub owner: Option<String>,
}

/// What one look at the daily fetch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Tomorrow's plan was fetched now.
    Done,
    /// Not due, or already done.
    NotYet,
    /// Another instance holds the date's lease: look again soon.
    Held,
}

impl DailyFetch {
    /// Today's fetch instant, for the local date containing `now`.
    fn fetch_instant(&self, now: Timestamp) -> Result<Timestamp, CloudError> {
        let today = now.to_zoned_datetime(self.timezone.clone()).date();
        let at = today
            .to_datetime(self.at)
            .to_zoned_datetime(self.timezone.clone())
            .map_err(|e| CloudError::Config(format!("fetch_at: {e}")))?;
        Ok(at.timestamp())
    }

    /// Runs until shutdown.
    pub async fn run(
        self,
        ingestor: Arc<Ingestor>,
        store: Arc<dyn CommandStore>,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) {
        let mut startup = true;
        let mut backoff = SignedDuration::from_secs(30);
        loop {
            let now = clock.now();
            let lease_until = now + clock.clock_duration(LEASE);
            let wake = match self
                .step(now, startup, lease_until, &ingestor, &store)
                .await
            {
                Ok(Step::Done) => {
                    backoff = SignedDuration::from_secs(30);
                    None
                }
                Ok(Step::NotYet) => None,
                Ok(Step::Held) => Some(now + SignedDuration::from_secs(30)),
                Err(e) => {
                    warn!(error = %e, retry_in_s = backoff.as_secs(), "daily fetch failed");
                    let at = now + backoff;
                    backoff = (backoff * 2).min(SignedDuration::from_mins(15));
                    Some(at)
                }
            };
            startup = false;
            let wake = match wake {
                Some(at) => at,
                None => match self.next_fetch(now) {
                    Ok(at) => at,
                    Err(e) => {
                        warn!(error = %e, "daily fetch disabled");
                        return;
                    }
                },
            };
            // Retry delays are clock time, but never shorter than 2 s real.
            let pause = clock.real_until(wake).max(Duration::from_secs(2));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Fetches tomorrow's plan if it is due at `now` (or `early`, at start-up) and no
    /// instance has fetched it yet, holding the date's lease until `lease_until`.
    pub async fn step(
        &self,
        now: Timestamp,
        early: bool,
        lease_until: Timestamp,
        ingestor: &Ingestor,
        store: &Arc<dyn CommandStore>,
    ) -> Result<Step, CloudError> {
        let today = now.to_zoned_datetime(self.timezone.clone()).date();
        let tomorrow = today
            .tomorrow()
            .map_err(|e| CloudError::Config(e.to_string()))?;
        if !(early || now >= self.fetch_instant(now)?) || store.ingested(tomorrow).await? {
            return Ok(Step::NotYet);
        }
        let lease = ingest_lease(tomorrow);
        if let Some(owner) = &self.owner
            && !store.lease(&lease, owner, lease_until, now).await?
        {
            info!(schedule_date = %tomorrow, "daily fetch: another instance holds it");
            return Ok(Step::Held);
        }
        info!(schedule_date = %tomorrow, "daily fetch");
        let fetched = ingestor.fetch(tomorrow).await;
        // Given back either way: after a failure any instance may retry at once.
        if let Some(owner) = &self.owner
            && let Err(e) = store.release(&lease, owner).await
        {
            warn!(error = %e, "daily fetch lease not released; it expires");
        }
        fetched?;
        Ok(Step::Done)
    }

    fn next_fetch(&self, now: Timestamp) -> Result<Timestamp, CloudError> {
        let today = self.fetch_instant(now)?;
        if today > now {
            return Ok(today);
        }
        // The next local date's fetch time, by the calendar: across a clock change it is 23
        // or 25 hours away, so adding 24 h could skip a day or fetch twice.
        let tomorrow = now
            .to_zoned_datetime(self.timezone.clone())
            .date()
            .tomorrow()
            .map_err(|e| CloudError::Config(e.to_string()))?;
        let at = tomorrow
            .to_datetime(self.at)
            .to_zoned_datetime(self.timezone.clone())
            .map_err(|e| CloudError::Config(format!("fetch_at: {e}")))?;
        Ok(at.timestamp())
    }
}

/// The lease a date's ingestion is run under, fetched or replayed.
fn ingest_lease(date: jiff::civil::Date) -> String {
    format!("ingest:{date}")
}

/// Runs again, from their raw documents, the ingestions that started and never finished (the
/// service stopped in the middle). A run that another instance is in the middle of is under
/// its date's lease, and left to it.
pub async fn replay_interrupted(
    ingestor: Arc<Ingestor>,
    store: Arc<dyn CommandStore>,
    clock: Arc<dyn Clock>,
    owner: Option<String>,
) {
    let interrupted = match store.interrupted_ingestions().await {
        Ok(runs) => runs,
        Err(e) => {
            warn!(error = %e, "cannot list interrupted ingestions");
            return;
        }
    };
    for run in interrupted {
        let lease = ingest_lease(run.schedule_date);
        let now = clock.now();
        let held = match &owner {
            Some(owner) => {
                store
                    .lease(&lease, owner, now + clock.clock_duration(LEASE), now)
                    .await
            }
            None => Ok(true),
        };
        match held {
            Ok(true) => {}
            Ok(false) => {
                info!(schedule_date = %run.schedule_date, "interrupted ingestion held by another instance");
                continue;
            }
            Err(e) => {
                warn!(schedule_date = %run.schedule_date, error = %e, "replay not started");
                continue;
            }
        }
        info!(schedule_date = %run.schedule_date, audit_key = %run.audit_key, "replaying an interrupted ingestion");
        if let Err(e) = ingestor.replay(&run).await {
            warn!(schedule_date = %run.schedule_date, error = %e, "replay failed");
        }
        if let Some(owner) = &owner
            && let Err(e) = store.release(&lease, owner).await
        {
            warn!(error = %e, "replay lease not released; it expires");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daily() -> DailyFetch {
        DailyFetch {
            timezone: TimeZone::get("Europe/London").unwrap(),
            at: Time::constant(16, 0, 0, 0),
            owner: None,
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_next_fetch_is_today_before_the_time_and_tomorrow_after_it() {
        let d = daily();
        assert_eq!(
            d.next_fetch(at("2026-11-29T10:00:00Z")).unwrap(),
            at("2026-11-29T16:00:00Z")
        );
        assert_eq!(
            d.next_fetch(at("2026-11-29T16:00:00Z")).unwrap(),
            at("2026-11-30T16:00:00Z")
        );
    }

    #[test]
    fn the_next_fetch_follows_the_calendar_across_clock_changes() {
        let d = daily();
        // Late on the eve of the spring change: the change day's fetch, not the day after's.
        assert_eq!(
            d.next_fetch(at("2027-03-27T23:30:00Z")).unwrap(),
            at("2027-03-28T15:00:00Z")
        );
        // Summer time: 16:00 BST is 15:00 UTC.
        assert_eq!(
            d.next_fetch(at("2026-10-24T15:30:00Z")).unwrap(),
            at("2026-10-25T16:00:00Z")
        );
    }
}
