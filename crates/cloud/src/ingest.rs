//! Ingestion: keep the raw document, normalize it, commit one command per changed device
//! schedule, then publish. One run at a time; a second one answers [`CloudError::Busy`].

use max300_protocol::error::Chain;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use max300_mqtt::trace;
use max300_protocol::day::period_start_at;
use max300_protocol::document::{Fleet, Normalized, normalize};
use max300_protocol::{Clock, Day, DeviceId, MessageId, RateKw, Schedule, Setpoint};
use serde::Serialize;
use tokio::sync::Mutex;
use tracing::field::Empty;
use tracing::{Span, info, info_span, instrument, warn};

use crate::audit::Audit;
use crate::feasibility::Pack;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::provider::ProviderClient;
use crate::publish::Publisher;
use crate::store::{Fence, IngestionCounts, Insert, Interrupted, NewCommand};
use crate::{CloudError, CommandStore};

/// A command this ingestion created, until it is published.
struct Created {
    message_id: MessageId,
    schedule: Schedule,
}

/// How long, in real time, a date's ingestion holds the date's lease (several instances on
/// one store). One that takes longer loses its fence, and its commit is refused rather than
/// made over a newer one.
pub(crate) const LEASE: std::time::Duration = std::time::Duration::from_secs(120);

/// The lease a date's ingestion runs under: fetched, posted or replayed.
pub(crate) fn ingest_lease(date: Date) -> String {
    format!("ingest:{date}")
}

/// One device's command in an ingestion result.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CommandRef {
    /// The device.
    pub device_id: DeviceId,
    /// The command.
    pub message_id: MessageId,
    /// Its version.
    pub version: u32,
}

/// One device's refused schedule in an ingestion result.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RejectedRef {
    /// The device, or the entry's label when its id was unreadable.
    pub device_id: String,
    /// Every error, with its place.
    pub errors: Vec<String>,
}

/// An accepted plan that may not run as written.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WarningRef {
    /// The device.
    pub device_id: DeviceId,
    /// The command.
    pub message_id: MessageId,
    /// What would happen.
    pub warning: String,
}

/// The answer to an ingestion (DESIGN §8).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct IngestReport {
    /// The local date.
    pub schedule_date: Date,
    /// New commands.
    pub accepted: Vec<CommandRef>,
    /// Schedules identical to what is already held.
    pub unchanged: Vec<CommandRef>,
    /// Refused schedules.
    pub rejected: Vec<RejectedRef>,
    /// Accepted plans that would run into a unit's SoC limits (estimated; see
    /// [`crate::feasibility`]).
    pub warnings: Vec<WarningRef>,
}

/// What an ingestion run is doing, for a progress display (`max300 ingest`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage {
    /// Nothing running.
    #[default]
    Idle,
    /// Downloading the document.
    Fetching,
    /// Checking and normalizing it.
    Normalizing,
    /// Committing the commands.
    Committing,
    /// Publishing them: `done` of `total`.
    Publishing {
        /// Published so far.
        done: usize,
        /// To publish.
        total: usize,
    },
    /// Finished.
    Done,
}

/// Commands are published in batches of this many, so progress moves as they go out.
const PUBLISH_BATCH: usize = 500;

/// Runs ingestions.
#[derive(Debug)]
pub struct Ingestor {
    ledger: Ledger,
    store: Arc<dyn CommandStore>,
    audit: Audit,
    publisher: Publisher,
    clock: Arc<dyn Clock>,
    timezone: TimeZone,
    default_max_rate: RateKw,
    max_document_bytes: usize,
    provider: Option<ProviderClient>,
    running: Mutex<()>,
    pack: Pack,
    metrics: Arc<Metrics>,
    stage: tokio::sync::watch::Sender<Stage>,
    /// This instance, as a lease holder, when several share the store.
    owner: Option<String>,
}

impl Ingestor {
    /// An ingestor; `provider` enables fetching.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ledger: Ledger,
        audit: Audit,
        publisher: Publisher,
        clock: Arc<dyn Clock>,
        timezone: TimeZone,
        default_max_rate: RateKw,
        max_document_bytes: usize,
        provider: Option<ProviderClient>,
        pack: Pack,
        metrics: Arc<Metrics>,
        owner: Option<String>,
    ) -> Ingestor {
        Ingestor {
            store: ledger.store().clone(),
            ledger,
            audit,
            publisher,
            clock,
            timezone,
            default_max_rate,
            max_document_bytes,
            provider,
            running: Mutex::new(()),
            pack,
            metrics,
            stage: tokio::sync::watch::Sender::new(Stage::Idle),
            owner,
        }
    }

    /// Follows what the current run is doing.
    pub fn progress(&self) -> tokio::sync::watch::Receiver<Stage> {
        self.stage.subscribe()
    }

    /// Whether a provider is configured.
    pub fn can_fetch(&self) -> bool {
        self.provider.is_some()
    }

    /// Fetches the document for `date` from the provider and ingests it; under `fence`, the
    /// date's lease taken before the fetch, when several instances share the store.
    #[instrument(parent = None, name = "ingest", skip_all, fields(schedule_date = %date, source = "fetch"))]
    pub async fn fetch(
        &self,
        date: Date,
        fence: Option<Fence>,
    ) -> Result<IngestReport, CloudError> {
        let provider = self.provider.as_ref().ok_or_else(|| {
            CloudError::config("provider: not configured, so there is nothing to fetch")
        })?;
        let _guard = self.running.try_lock().map_err(|_| CloudError::Busy)?;
        self.stage.send_replace(Stage::Fetching);
        let body = provider.fetch(date).await?;
        let received = self.clock.now();
        let audit_key = self.audit.put_raw(body.clone(), "fetch", received).await?;
        self.run(body, "fetch", audit_key, Some(date), fence).await
    }

    /// Runs an interrupted ingestion again from its raw document (under `fence`, as
    /// [`Ingestor::fetch`]). Safe to repeat: content already committed is `unchanged`, and
    /// commands left `created` are published by the sweeper. The caller has checked that no
    /// later run of the date has finished and the date is not over.
    #[instrument(parent = None, name = "ingest", skip_all, fields(schedule_date = %run.schedule_date, source = %run.source, replay = true))]
    pub async fn replay(
        &self,
        run: &Interrupted,
        fence: Option<Fence>,
    ) -> Result<IngestReport, CloudError> {
        let _guard = self.running.lock().await;
        let report = match self.audit.get(&run.audit_key).await {
            Ok(body) => {
                self.run(
                    body,
                    &run.source,
                    run.audit_key.clone(),
                    Some(run.schedule_date),
                    fence,
                )
                .await
            }
            Err(e) => Err(e),
        };
        // The replay recorded its own run; close the interrupted one either way.
        let outcome = match &report {
            Ok(r) => Ok(counts(r)),
            Err(e) => Err(format!("replay failed: {}", Chain(e))),
        };
        self.store
            .finish_ingestion(run.id, outcome, self.clock.now())
            .await?;
        report
    }

    /// Ingests a POSTed document.
    #[instrument(parent = None, name = "ingest", skip_all, fields(schedule_date = Empty, source = "post"))]
    pub async fn post(&self, body: Bytes) -> Result<IngestReport, CloudError> {
        let _guard = self.running.try_lock().map_err(|_| CloudError::Busy)?;
        let received = self.clock.now();
        let audit_key = self.audit.put_raw(body.clone(), "post", received).await?;
        self.run(body, "post", audit_key, None, None).await
    }

    async fn run(
        &self,
        body: Bytes,
        source: &str,
        audit_key: String,
        want: Option<Date>,
        fence: Option<Fence>,
    ) -> Result<IngestReport, CloudError> {
        self.stage.send_replace(Stage::Normalizing);
        let report = self.run_once(body, source, audit_key, want, fence).await;
        self.stage.send_replace(Stage::Done);
        match &report {
            Ok(_) => self.metrics.ingestion(source, "ok"),
            Err(_) => self.metrics.ingestion(source, "failed"),
        }
        report
    }

    async fn run_once(
        &self,
        body: Bytes,
        source: &str,
        audit_key: String,
        want: Option<Date>,
        fence: Option<Fence>,
    ) -> Result<IngestReport, CloudError> {
        let received = self.clock.now();
        let fleet = self.fleet().await?;
        let normalized = match normalize(&body, &fleet) {
            Ok(n) => n,
            Err(e) => {
                self.metrics.rejection("document");
                warn!(audit_key = %audit_key, error = %Chain(&e), "document rejected");
                let json =
                    serde_json::json!({"audit_key": audit_key, "error": Chain(&e).to_string()});
                self.audit
                    .put_rejections("whole", received, json.to_string().into_bytes())
                    .await?;
                return Err(e.into());
            }
        };
        let date = normalized.day.date();
        Span::current().record("schedule_date", tracing::field::display(date));
        if let Some(want) = want
            && want != date
        {
            return Err(CloudError::Provider {
                what: format!(
                    "the document is for {date}, but {want} was asked for (kept as {audit_key})"
                ),
                transient: false,
                cause: None,
            });
        }
        drop(body);
        // A POST takes the date's lease here, as the daily fetch did before fetching: of
        // several instances, one ingests a date at a time.
        let (fence, taken) = match (fence, &self.owner) {
            (Some(fence), _) => (Some(fence), false),
            (None, Some(owner)) => {
                let name = ingest_lease(date);
                let until = received + self.clock.clock_duration(LEASE);
                match self.store.lease(&name, owner, until, received).await? {
                    Some(token) => (
                        Some(Fence {
                            name,
                            owner: owner.clone(),
                            token,
                        }),
                        true,
                    ),
                    None => return Err(CloudError::Busy),
                }
            }
            (None, None) => (None, false),
        };
        // From here a crash leaves the run open (it is replayed at start-up), and any error
        // closes it as failed, so a replay can never bring back what a later run replaced.
        let run_id = self
            .store
            .begin_ingestion(date, source, &audit_key, received)
            .await?;
        let result = self
            .commit_and_publish(normalized, &fleet, received, fence.as_ref())
            .await;
        let outcome = match &result {
            Ok(report) => Ok(counts(report)),
            Err(e) => Err(Chain(e).to_string()),
        };
        let closed = self
            .store
            .finish_ingestion(run_id, outcome, self.clock.now())
            .await;
        if let (true, Some(fence)) = (taken, &fence)
            && let Err(e) = self.store.release(&fence.name, &fence.owner).await
        {
            warn!(error = %Chain(&e), "ingestion lease not released; it expires");
        }
        let report = result?;
        closed?;
        info!(
            schedule_date = %date,
            source,
            audit_key = %audit_key,
            accepted = report.accepted.len(),
            unchanged = report.unchanged.len(),
            rejected = report.rejected.len(),
            "ingestion finished"
        );
        Ok(report)
    }

    /// Everything an ingestion does once its run is recorded: commit, keep the rejections,
    /// publish.
    async fn commit_and_publish(
        &self,
        normalized: Normalized,
        fleet: &Fleet,
        received: Timestamp,
        fence: Option<&Fence>,
    ) -> Result<IngestReport, CloudError> {
        let date = normalized.day.date();
        let newcomers: Vec<DeviceId> = normalized
            .schedules
            .iter()
            .filter(|s| !s.from_wildcard && !fleet.devices.contains_key(s.schedule.device_id()))
            .map(|s| s.schedule.device_id().clone())
            .collect();
        if !newcomers.is_empty() {
            self.store.register_devices(&newcomers, received).await?;
        }
        // One span per device schedule, a child of the ingestion; its context is stored with
        // the command, so the publish, the ack and the reports join this trace.
        let mut spans = Vec::with_capacity(normalized.schedules.len());
        let commands: Vec<NewCommand> = normalized
            .schedules
            .into_iter()
            .map(|s| {
                let message_id = MessageId::generate(received);
                let span = info_span!(
                    "command",
                    device_id = %s.schedule.device_id(),
                    message_id = Empty,
                    version = Empty,
                    outcome = Empty,
                );
                let traceparent = trace::of(&span);
                spans.push(span);
                NewCommand {
                    message_id,
                    schedule: s.schedule,
                    traceparent,
                }
            })
            .collect();
        self.stage.send_replace(Stage::Committing);
        let inserts = self
            .ledger
            .insert_commands(&commands, received, fence)
            .await?;

        let mut report = IngestReport {
            schedule_date: date,
            accepted: Vec::new(),
            unchanged: Vec::new(),
            rejected: normalized
                .rejected
                .iter()
                .map(|r| RejectedRef {
                    device_id: r.label.clone(),
                    errors: r.errors.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            warnings: Vec::new(),
        };
        // Messages are built a batch at a time as they are published: held all at once they
        // would be most of the ingestion's memory.
        let mut created: Vec<Created> = Vec::new();
        for ((cmd, insert), span) in commands.into_iter().zip(inserts).zip(spans) {
            let device_id = cmd.schedule.device_id().clone();
            match insert {
                Insert::Created {
                    message_id,
                    version,
                } => {
                    span.record("message_id", tracing::field::display(&message_id));
                    span.record("version", version);
                    span.record("outcome", "created");
                    span.in_scope(|| {
                        info!(device_id = %device_id, message_id = %message_id, version, "command created");
                    });
                    created.push(Created {
                        message_id: message_id.clone(),
                        schedule: cmd.schedule,
                    });
                    report.accepted.push(CommandRef {
                        device_id,
                        message_id,
                        version,
                    });
                }
                Insert::Unchanged {
                    message_id,
                    version,
                } => {
                    // This span is not the command's: it only says, in the ingestion's trace,
                    // that nothing new was made for the device.
                    span.record("message_id", tracing::field::display(&message_id));
                    span.record("version", version);
                    span.record("outcome", "unchanged");
                    report.unchanged.push(CommandRef {
                        device_id,
                        message_id,
                        version,
                    })
                }
            }
        }
        report.warnings = self.feasibility(&created, received).await?;
        for r in &normalized.rejected {
            if let Some(first) = r.errors.first() {
                self.metrics.rejection(field_at_fault(&first.path));
            }
            warn!(device_id = %r.label, errors = ?r.errors.iter().map(ToString::to_string).collect::<Vec<_>>(), "schedule rejected");
        }
        if !report.rejected.is_empty() {
            let json = serde_json::to_vec_pretty(&report.rejected)
                .map_err(|e| CloudError::audit_failed("rejections", e))?;
            self.audit
                .put_rejections(&date.to_string(), received, json)
                .await?;
        }
        let total = created.len();
        for (i, batch) in created.chunks(PUBLISH_BATCH).enumerate() {
            self.stage.send_replace(Stage::Publishing {
                done: i * PUBLISH_BATCH,
                total,
            });
            let ids: Vec<MessageId> = batch.iter().map(|c| c.message_id.clone()).collect();
            self.publisher.publish(&ids).await?;
        }
        Ok(report)
    }

    /// Estimates whether each new plan runs into its unit's SoC limits, from the unit's last
    /// reported SoC and what is left of today's plan; keeps and returns the warnings.
    async fn feasibility(
        &self,
        created: &[Created],
        now: Timestamp,
    ) -> Result<Vec<WarningRef>, CloudError> {
        if created.is_empty() {
            return Ok(Vec::new());
        }
        let soc: HashMap<DeviceId, f64> = self
            .store
            .devices()
            .await?
            .into_iter()
            .filter_map(|d| Some((d.device_id, d.soc_pct?)))
            .collect();
        let today = Day::containing(now, &self.timezone)?;
        let from = period_start_at(now, &self.timezone)?;
        let mut rest_of_today: HashMap<DeviceId, Vec<Setpoint>> = HashMap::new();
        for (device, setpoint) in self.store.planned_from(today.date(), from).await? {
            rest_of_today.entry(device).or_default().push(setpoint);
        }
        let mut warnings = Vec::new();
        for Created {
            message_id,
            schedule,
            ..
        } in created
        {
            let device = schedule.device_id();
            let Some(&soc) = soc.get(device) else {
                continue;
            };
            let later_day = schedule.day().date() > today.date();
            let before = if later_day {
                rest_of_today.get(device).map(Vec::as_slice).unwrap_or(&[])
            } else {
                &[]
            };
            let plan = schedule
                .periods()
                .filter(|p| later_day || p.start >= from)
                .map(|p| (p.period, p.setpoint));
            if let Some(bad) = self.pack.check(soc, before, plan) {
                warn!(device_id = %device, message_id = %message_id, warning = %bad.message(), "plan may not run as written");
                warnings.push(WarningRef {
                    device_id: device.clone(),
                    message_id: message_id.clone(),
                    warning: bad.message(),
                });
            }
        }
        let kept: Vec<_> = warnings
            .iter()
            .map(|w| (w.message_id.clone(), w.warning.clone()))
            .collect();
        self.store.record_warnings(&kept).await?;
        Ok(warnings)
    }

    async fn fleet(&self) -> Result<Fleet, CloudError> {
        let devices: BTreeMap<DeviceId, RateKw> = self
            .store
            .devices()
            .await?
            .into_iter()
            .map(|d| (d.device_id, d.max_rate_kw.unwrap_or(self.default_max_rate)))
            .collect();
        Ok(Fleet {
            timezone: self.timezone.clone(),
            default_max_rate: self.default_max_rate,
            devices,
            max_document_bytes: self.max_document_bytes,
        })
    }
}

/// The field an error path ends in, without indices: `schedules[3].intervals[12].rate_kw`
/// is `rate_kw`. A small, fixed vocabulary, fit for a metric label.
fn field_at_fault(path: &str) -> &str {
    let last = path.rsplit('.').next().unwrap_or(path);
    last.split('[').next().unwrap_or(last)
}

fn counts(report: &IngestReport) -> IngestionCounts {
    IngestionCounts {
        accepted: report.accepted.len() as u32,
        unchanged: report.unchanged.len() as u32,
        rejected: report.rejected.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_field_at_fault() {
        assert_eq!(
            super::field_at_fault("schedules[3].intervals[12].rate_kw"),
            "rate_kw"
        );
        assert_eq!(super::field_at_fault("schedules[3]"), "schedules");
        assert_eq!(super::field_at_fault("date"), "date");
    }
}
