//! The daily fetch: at a configured local time, fetch tomorrow's plan; retry with backoff
//! until it succeeds or the date begins; and run at start-up when tomorrow has no finished
//! ingestion. Runs on clock time, so a scaled clock plays it too.
//!
//! Several instances on one store run each date's fetch once: the one that takes the date's
//! lease fetches, the others look again a little later and find it done.

use max300_protocol::error::Chain;
use std::sync::Arc;
use std::time::Duration;

use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use max300_protocol::{Backoff, Clock, ProtocolError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ingest::{Ingestor, LEASE, Listing, ingest_lease};
use crate::store::{Fence, Interrupted};
use crate::{CloudError, CommandStore};

/// The wait after a failed fetch, in clock time: 30 s doubling to 15 min, so a provider that
/// is down is not hammered, yet a recovered one is tried within 15 min until the date begins.
/// No jitter: instances share the date's lease, so at most one of them fetches.
const RETRY: Backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(15 * 60));

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
            .map_err(|e| CloudError::config_because("fetch_at", e))?;
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
        // Fetches failed since the last one that succeeded: the RETRY attempt.
        let mut failures = 0u32;
        loop {
            let now = clock.now();
            let lease_until = now + clock.clock_duration(LEASE);
            let wake = match self
                .step(now, startup, lease_until, &ingestor, &store)
                .await
            {
                Ok(Step::Done) => {
                    failures = 0;
                    None
                }
                Ok(Step::NotYet) => None,
                Ok(Step::Held) => Some(now + SignedDuration::from_secs(30)),
                Err(e) => {
                    let wait = SignedDuration::try_from(RETRY.delay(failures))
                        .unwrap_or(SignedDuration::from_mins(15));
                    warn!(error = %Chain(&e), retry_in_s = wait.as_secs(), "daily fetch failed");
                    failures = failures.saturating_add(1);
                    Some(now + wait)
                }
            };
            startup = false;
            let wake = match wake {
                Some(at) => at,
                None => match self.next_fetch(now) {
                    Ok(at) => at,
                    Err(e) => {
                        warn!(error = %Chain(&e), "daily fetch disabled");
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
            .map_err(|e| ProtocolError::out_of_range(today, e))?;
        if !(early || now >= self.fetch_instant(now)?) || store.ingested(tomorrow).await? {
            return Ok(Step::NotYet);
        }
        let lease = ingest_lease(tomorrow);
        let fence = match &self.owner {
            Some(owner) => match store.lease(&lease, owner, lease_until, now).await? {
                Some(token) => Some(Fence {
                    name: lease.clone(),
                    owner: owner.clone(),
                    token,
                }),
                None => {
                    info!(schedule_date = %tomorrow, "daily fetch: another instance holds it");
                    return Ok(Step::Held);
                }
            },
            None => None,
        };
        info!(schedule_date = %tomorrow, "daily fetch");
        let fetched = ingestor.fetch(tomorrow, fence, Listing::Counts).await;
        // Given back either way: after a failure any instance may retry at once.
        if let Some(owner) = &self.owner
            && let Err(e) = store.release(&lease, owner).await
        {
            warn!(error = %Chain(&e), "daily fetch lease not released; it expires");
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
        let today = now.to_zoned_datetime(self.timezone.clone()).date();
        let tomorrow = today
            .tomorrow()
            .map_err(|e| ProtocolError::out_of_range(today, e))?;
        let at = tomorrow
            .to_datetime(self.at)
            .to_zoned_datetime(self.timezone.clone())
            .map_err(|e| CloudError::config_because("fetch_at", e))?;
        Ok(at.timestamp())
    }
}

/// Runs again, from their raw documents, the ingestions that started and never finished (the
/// service stopped in the middle); says how many it settled (replayed or closed). A run that a later run of its date has overtaken, or
/// whose date is over, is closed instead: replaying it could only put an older document over
/// a newer one. A run another instance is in the middle of is under its date's lease, and
/// left to it; a replay holds the lease, fenced, so it never commits over a newer holder.
pub async fn replay_interrupted(
    ingestor: &Ingestor,
    store: &Arc<dyn CommandStore>,
    clock: &Arc<dyn Clock>,
    timezone: &TimeZone,
    owner: Option<&str>,
) -> Result<usize, CloudError> {
    let mut settled = 0;
    for run in store.interrupted_ingestions().await? {
        let now = clock.now();
        if let Some(why) = stale(&run, now, timezone)? {
            info!(schedule_date = %run.schedule_date, audit_key = %run.audit_key, reason = %why, "interrupted ingestion closed, not replayed");
            store
                .finish_ingestion(run.id, Err(format!("not replayed: {why}")), now)
                .await?;
            settled += 1;
            continue;
        }
        let lease = ingest_lease(run.schedule_date);
        let fence = match owner {
            Some(owner) => {
                let until = now + clock.clock_duration(LEASE);
                match store.lease(&lease, owner, until, now).await? {
                    Some(token) => Some(Fence {
                        name: lease.clone(),
                        owner: owner.to_owned(),
                        token,
                    }),
                    None => {
                        info!(schedule_date = %run.schedule_date, "interrupted ingestion held by another instance");
                        continue;
                    }
                }
            }
            None => None,
        };
        info!(schedule_date = %run.schedule_date, audit_key = %run.audit_key, "replaying an interrupted ingestion");
        match ingestor.replay(&run, fence).await {
            Ok(_) => settled += 1,
            Err(e) => {
                warn!(schedule_date = %run.schedule_date, error = %Chain(&e), "replay failed")
            }
        }
        if let Some(owner) = owner
            && let Err(e) = store.release(&lease, owner).await
        {
            warn!(error = %Chain(&e), "replay lease not released; it expires");
        }
    }
    Ok(settled)
}

/// Why an interrupted run must not be replayed at `now`, if so.
fn stale(run: &Interrupted, now: Timestamp, tz: &TimeZone) -> Result<Option<String>, CloudError> {
    if run.overtaken {
        return Ok(Some(format!(
            "a later ingestion of {} has finished",
            run.schedule_date
        )));
    }
    let day = max300_protocol::Day::new(run.schedule_date, tz.clone())?;
    Ok((now >= day.end()).then(|| format!("{} is over", run.schedule_date)))
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
    fn a_failed_fetch_is_retried_from_30_s_doubling_to_15_min() {
        let waits: Vec<u64> = (0..7).map(|n| RETRY.delay(n).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 900, 900]);
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
