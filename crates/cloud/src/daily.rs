//! The daily fetch: at a configured local time, fetch tomorrow's plan; retry with backoff
//! until it succeeds or the date begins; and run at start-up when tomorrow has no finished
//! ingestion. Runs on clock time, so a scaled clock plays it too.

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

/// When to fetch.
#[derive(Clone, Debug)]
pub struct DailyFetch {
    /// The fleet's zone.
    pub timezone: TimeZone,
    /// Local time of the fetch.
    pub at: Time,
}

impl DailyFetch {
    /// The next fetch instant strictly after the day containing `now` began.
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
            let wake = match self.step(now, startup, &ingestor, &store).await {
                Ok(Step::Done) => {
                    backoff = SignedDuration::from_secs(30);
                    None
                }
                Ok(Step::NotYet) => None,
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

    async fn step(
        &self,
        now: Timestamp,
        startup: bool,
        ingestor: &Ingestor,
        store: &Arc<dyn CommandStore>,
    ) -> Result<Step, CloudError> {
        let today = now.to_zoned_datetime(self.timezone.clone()).date();
        let tomorrow = today
            .tomorrow()
            .map_err(|e| CloudError::Config(e.to_string()))?;
        if !(startup || now >= self.fetch_instant(now)?) || store.ingested(tomorrow).await? {
            return Ok(Step::NotYet);
        }
        info!(schedule_date = %tomorrow, "daily fetch");
        ingestor.fetch(tomorrow).await?;
        Ok(Step::Done)
    }

    fn next_fetch(&self, now: Timestamp) -> Result<Timestamp, CloudError> {
        let today = self.fetch_instant(now)?;
        if today > now {
            return Ok(today);
        }
        let tomorrow = now + SignedDuration::from_hours(24);
        // Across a clock change the next day's fetch is 23 or 25 hours away; recompute it
        // from the next day's local date rather than adding 24 h.
        let next = self.fetch_instant(tomorrow)?;
        Ok(if next > now { next } else { tomorrow })
    }
}

enum Step {
    Done,
    NotYet,
}
