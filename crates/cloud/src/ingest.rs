//! Ingestion: keep the raw document, normalize it, commit one command per changed device
//! schedule, then publish. One run at a time; a second one answers [`CloudError::Busy`].

use max300_protocol::error::Chain;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use max300_mqtt::trace;
use max300_protocol::day::period_start_at;
use max300_protocol::document::{
    Fleet, NormalizedSchedule, Normalizer, Outcome, Outline, Rejection, Survey,
};
use max300_protocol::{Clock, Day, DeviceId, MessageId, MessageIds, RateKw, Schedule};
use max300_protocol::{ProtocolError, Roster};
use serde::Serialize;
use tokio::sync::{Mutex, mpsc};
use tracing::field::Empty;
use tracing::{Span, info, info_span, instrument, warn};

use crate::audit::Audit;
use crate::feasibility::Pack;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::provider::ProviderClient;
use crate::publish::{Publisher, Sent};
use crate::store::{Fence, IngestionCounts, Insert, Interrupted, NewCommand, PlanFold};
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

/// How much of each device's outcome an ingestion's report names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Every accepted and unchanged command by name: the HTTP API's answer (DESIGN §8).
    Every,
    /// Only how many: for a caller that prints or logs counts (the daily fetch, `max300
    /// ingest`), so that the report's memory does not grow with the fleet (about 130 bytes a
    /// device listed; 13 MB at 100,000 units).
    Counts,
}

/// The commands of one outcome in an [`IngestReport`]: always counted, and named one by one
/// when the run was asked for [`Listing::Every`]. Serialized as the list, or else the count.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRefs {
    count: usize,
    listed: Option<Vec<CommandRef>>,
}

impl CommandRefs {
    fn new(listing: Listing) -> CommandRefs {
        CommandRefs {
            count: 0,
            listed: (listing == Listing::Every).then(Vec::new),
        }
    }

    fn push(&mut self, command: CommandRef) {
        self.count += 1;
        if let Some(listed) = &mut self.listed {
            listed.push(command);
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.count
    }

    /// None at all.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each one, when the run listed them.
    pub fn listed(&self) -> Option<&[CommandRef]> {
        self.listed.as_deref()
    }
}

impl Serialize for CommandRefs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.listed {
            Some(listed) => listed.serialize(s),
            None => s.serialize_u64(self.count as u64),
        }
    }
}

/// The answer to an ingestion (DESIGN §8).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct IngestReport {
    /// The local date.
    pub schedule_date: Date,
    /// New commands.
    pub accepted: CommandRefs,
    /// Schedules identical to what is already held.
    pub unchanged: CommandRefs,
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

/// Devices go through the stages in batches of this many: each batch is one commit and one
/// publish, and progress moves as they go out.
const BATCH: usize = 500;

/// Where the second pass reads the document again.
enum Document {
    /// Held whole already (a POST, limited in size by the HTTP layer).
    Held(Bytes),
    /// Under this key in the audit store.
    Kept(String),
}

/// What the first stage hands the second: a batch of outcomes, in document order.
#[derive(Default)]
struct Batch {
    schedules: Vec<NormalizedSchedule>,
    rejected: Vec<Rejection>,
}

impl Batch {
    fn len(&self) -> usize {
        self.schedules.len() + self.rejected.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the feasibility check needs of the fleet, read once per ingestion.
struct Outlook {
    /// The last reported SoC of each unit that has one.
    soc: Arc<Roster<f64>>,
    /// The SoC each unit should have once the rest of today's plan has run: where a plan for
    /// a later day starts. One number a unit, not today's setpoints.
    after_today: Roster<f64>,
    today: Date,
    from: Timestamp,
}

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
    ///
    /// The body is written to the audit store and surveyed as it arrives; the second pass
    /// reads it back from there, so no copy of a fleet's document is ever held whole.
    #[instrument(parent = None, name = "ingest", skip_all, fields(schedule_date = %date, source = "fetch"))]
    pub async fn fetch(
        &self,
        date: Date,
        fence: Option<Fence>,
        listing: Listing,
    ) -> Result<IngestReport, CloudError> {
        let provider = self.provider.as_ref().ok_or_else(|| {
            CloudError::config("provider: not configured, so there is nothing to fetch")
        })?;
        let _guard = self.running.try_lock().map_err(|_| CloudError::Busy)?;
        self.stage.send_replace(Stage::Fetching);
        let received = self.clock.now();
        let fleet = self.fleet().await?;
        let (audit_key, outline) = provider
            .with_retries(|| self.download(provider, date, &fleet, received))
            .await?;
        let document = Document::Kept(audit_key.clone());
        self.run(
            document,
            fleet,
            outline,
            "fetch",
            audit_key,
            Some(date),
            fence,
            listing,
        )
        .await
    }

    /// One attempt at the provider's document: each chunk goes to the audit store and to the
    /// survey. The audit store keeps a document that is not JSON too; a transfer that breaks
    /// off keeps nothing.
    async fn download(
        &self,
        provider: &ProviderClient,
        date: Date,
        fleet: &Fleet,
        received: Timestamp,
    ) -> Result<(String, Result<Outline, ProtocolError>), CloudError> {
        let mut download = provider.open(date).await?;
        let mut writer = self.audit.raw_writer("fetch", received).await?;
        let mut survey = Ok(Survey::new(fleet));
        loop {
            let chunk = match download.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    writer.abort().await;
                    return Err(e);
                }
            };
            if let Ok(s) = &mut survey
                && let Err(e) = s.feed(&chunk)
            {
                survey = Err(e);
            }
            if let Err(e) = writer.write(chunk).await {
                writer.abort().await;
                return Err(e);
            }
        }
        let key = writer.finish().await?;
        Ok((key, survey.and_then(Survey::finish)))
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
        let report = async {
            let fleet = self.fleet().await?;
            let mut survey = Survey::new(&fleet);
            let mut chunks = std::pin::pin!(self.audit.stream(&run.audit_key).await?);
            let mut failed = None;
            while let Some(chunk) = chunks.next().await {
                if let Err(e) = survey.feed(&chunk?) {
                    failed = Some(e);
                    break;
                }
            }
            let outline = match failed {
                Some(e) => Err(e),
                None => survey.finish(),
            };
            let document = Document::Kept(run.audit_key.clone());
            self.run(
                document,
                fleet,
                outline,
                &run.source,
                run.audit_key.clone(),
                Some(run.schedule_date),
                fence,
                Listing::Counts,
            )
            .await
        }
        .await;
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

    /// Ingests a POSTed document (already held whole: the HTTP layer limits its size).
    #[instrument(parent = None, name = "ingest", skip_all, fields(schedule_date = Empty, source = "post"))]
    pub async fn post(&self, body: Bytes) -> Result<IngestReport, CloudError> {
        let _guard = self.running.try_lock().map_err(|_| CloudError::Busy)?;
        let received = self.clock.now();
        let audit_key = self.audit.put_raw(body.clone(), "post", received).await?;
        let fleet = self.fleet().await?;
        let mut survey = Survey::new(&fleet);
        let outline = survey.feed(&body).and_then(|()| survey.finish());
        self.run(
            Document::Held(body),
            fleet,
            outline,
            "post",
            audit_key,
            None,
            None,
            Listing::Every,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        document: Document,
        fleet: Fleet,
        outline: Result<Outline, ProtocolError>,
        source: &str,
        audit_key: String,
        want: Option<Date>,
        fence: Option<Fence>,
        listing: Listing,
    ) -> Result<IngestReport, CloudError> {
        self.stage.send_replace(Stage::Normalizing);
        let report = self
            .run_once(
                document, fleet, outline, source, audit_key, want, fence, listing,
            )
            .await;
        self.stage.send_replace(Stage::Done);
        match &report {
            Ok(_) => self.metrics.ingestion(source, "ok"),
            Err(_) => self.metrics.ingestion(source, "failed"),
        }
        report
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_once(
        &self,
        document: Document,
        fleet: Fleet,
        outline: Result<Outline, ProtocolError>,
        source: &str,
        audit_key: String,
        want: Option<Date>,
        fence: Option<Fence>,
        listing: Listing,
    ) -> Result<IngestReport, CloudError> {
        let received = self.clock.now();
        let outline = match outline {
            Ok(outline) => outline,
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
        let date = outline.day.date();
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
            .commit_and_publish(document, outline, fleet, received, fence.as_ref(), listing)
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

    /// Everything an ingestion does once its run is recorded, in three stages joined by
    /// bounded channels, each working while the others do: normalize a batch (a blocking
    /// thread, reading the document a second time), commit it (one transaction), publish
    /// what it created. A batch is published only once committed. A failure part-way leaves
    /// the batches before it committed, each device whole; the run is closed as failed, and
    /// a retry finds them `unchanged`.
    async fn commit_and_publish(
        &self,
        document: Document,
        outline: Outline,
        fleet: Fleet,
        received: Timestamp,
        fence: Option<&Fence>,
        listing: Listing,
    ) -> Result<IngestReport, CloudError> {
        let (outline, fleet) = (Arc::new(outline), Arc::new(fleet));
        let total = outline.most_schedules(&fleet);
        let (batches_tx, batches) = mpsc::channel::<Batch>(2);
        let normalizing =
            self.normalize_in_batches(document, outline.clone(), fleet.clone(), batches_tx);
        let (ids_tx, ids) = mpsc::channel::<Vec<MessageId>>(2);
        let mut report = IngestReport {
            schedule_date: outline.day.date(),
            accepted: CommandRefs::new(listing),
            unchanged: CommandRefs::new(listing),
            rejected: Vec::new(),
            warnings: Vec::new(),
        };
        let mut outlook = None;
        let mut message_ids = MessageIds::at(received);
        // Each stage owns its receiver, so one that fails closes its channel and the stage
        // before it stops sending, instead of waiting on a full channel for ever.
        let committing = async {
            let mut batches = batches;
            while let Some(batch) = batches.recv().await {
                // Once publishing has begun it is what progress shows: the stages overlap.
                self.stage.send_if_modified(|stage| {
                    let first = *stage == Stage::Normalizing;
                    if first {
                        *stage = Stage::Committing;
                    }
                    first
                });
                let created = self
                    .commit(
                        batch,
                        &fleet,
                        &mut message_ids,
                        received,
                        fence,
                        &mut report,
                    )
                    .await?;
                if created.is_empty() {
                    continue;
                }
                let warned = self.feasibility(&created, received, &mut outlook).await?;
                report.warnings.extend(warned);
                let batch: Vec<MessageId> = created.into_iter().map(|c| c.message_id).collect();
                if ids_tx.send(batch).await.is_err() {
                    // The publishing stopped; its error is the one returned.
                    break;
                }
            }
            drop(ids_tx);
            Ok::<(), CloudError>(())
        };
        // Each batch's publishes are recorded while the next batch goes out: a third stage.
        let (sent_tx, sent) = mpsc::channel::<Sent>(2);
        let publishing = async {
            let mut ids = ids;
            let mut done = 0;
            while let Some(batch) = ids.recv().await {
                self.stage.send_replace(Stage::Publishing { done, total });
                let out = self.publisher.send(&batch).await?;
                done += batch.len();
                if sent_tx.send(out).await.is_err() {
                    // The recording stopped; its error is the one returned.
                    break;
                }
            }
            drop(sent_tx);
            Ok::<(), CloudError>(())
        };
        let recording = async {
            let mut sent = sent;
            while let Some(out) = sent.recv().await {
                self.publisher.record(out).await?;
            }
            Ok::<(), CloudError>(())
        };
        let (committed, published, recorded) = tokio::join!(committing, publishing, recording);
        let normalized = normalizing
            .await
            .map_err(|e| CloudError::store_failed("the normalizing thread", e))?;
        committed?;
        published?;
        recorded?;
        normalized?;
        if !report.rejected.is_empty() {
            let json = serde_json::to_vec_pretty(&report.rejected)
                .map_err(|e| CloudError::audit_failed("rejections", e))?;
            self.audit
                .put_rejections(&report.schedule_date.to_string(), received, json)
                .await?;
        }
        Ok(report)
    }

    /// The first stage: reads the document again and normalizes it on a blocking thread,
    /// sending each [`BATCH`] of outcomes on as it fills. Stops when the next stage does.
    fn normalize_in_batches(
        &self,
        document: Document,
        outline: Arc<Outline>,
        fleet: Arc<Fleet>,
        tx: mpsc::Sender<Batch>,
    ) -> tokio::task::JoinHandle<Result<(), CloudError>> {
        let audit = self.audit.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut normalizer = Normalizer::new(&outline, &fleet);
            let mut batch = Batch::default();
            let mut open = true;
            let mut out = |outcome: Outcome| {
                match outcome {
                    Outcome::Accepted(s) => {
                        // Hashed here, on this thread, and not in the commit that holds the
                        // store: the schedule caches it.
                        s.schedule.sha256();
                        batch.schedules.push(s)
                    }
                    Outcome::Rejected(r) => batch.rejected.push(r),
                }
                if open && batch.len() >= BATCH {
                    open = tx.blocking_send(std::mem::take(&mut batch)).is_ok();
                }
            };
            match document {
                Document::Held(body) => {
                    for chunk in body.chunks(64 * 1024) {
                        normalizer.feed(chunk, &mut out)?;
                    }
                }
                Document::Kept(key) => {
                    let mut chunks = Box::pin(handle.block_on(audit.stream(&key))?);
                    while let Some(chunk) = handle.block_on(chunks.next()) {
                        normalizer.feed(&chunk?, &mut out)?;
                    }
                }
            }
            normalizer.finish()?;
            if open && !batch.is_empty() {
                let _ = tx.blocking_send(batch);
            }
            Ok(())
        })
    }

    /// The second stage for one batch: registers its newcomers and commits its commands in
    /// one transaction; adds it to the report. Returns the commands it created.
    async fn commit(
        &self,
        batch: Batch,
        fleet: &Fleet,
        message_ids: &mut MessageIds,
        received: Timestamp,
        fence: Option<&Fence>,
        report: &mut IngestReport,
    ) -> Result<Vec<Created>, CloudError> {
        for r in &batch.rejected {
            if let Some(first) = r.errors.first() {
                self.metrics.rejection(field_at_fault(&first.path));
            }
            warn!(device_id = %r.label, errors = ?r.errors.iter().map(ToString::to_string).collect::<Vec<_>>(), "schedule rejected");
            report.rejected.push(RejectedRef {
                device_id: r.label.clone(),
                errors: r.errors.iter().map(ToString::to_string).collect(),
            });
        }
        let newcomers: Vec<DeviceId> = batch
            .schedules
            .iter()
            .filter(|s| {
                !s.from_wildcard && !fleet.devices.contains(s.schedule.device_id().as_str())
            })
            .map(|s| s.schedule.device_id().clone())
            .collect();
        if !newcomers.is_empty() {
            self.store.register_devices(&newcomers, received).await?;
        }
        // One span per device schedule, a child of the ingestion; its context is stored with
        // the command, so the publish, the ack and the reports join this trace.
        let mut spans = Vec::with_capacity(batch.schedules.len());
        let commands: Vec<NewCommand> = batch
            .schedules
            .into_iter()
            .map(|s| {
                let message_id = message_ids.make();
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
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let inserts = self
            .ledger
            .insert_commands(&commands, received, fence)
            .await?;
        let mut created = Vec::new();
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
        Ok(created)
    }

    /// Estimates whether each new plan runs into its unit's SoC limits, from the unit's last
    /// reported SoC and what is left of today's plan; keeps and returns the warnings. What it
    /// needs of the fleet is read once per ingestion, on the first batch, into `outlook`.
    async fn feasibility(
        &self,
        created: &[Created],
        now: Timestamp,
        outlook: &mut Option<Outlook>,
    ) -> Result<Vec<WarningRef>, CloudError> {
        if created.is_empty() {
            return Ok(Vec::new());
        }
        let outlook = match outlook {
            Some(o) => o,
            None => outlook.insert(self.outlook(now).await?),
        };
        let mut warnings = Vec::new();
        for Created {
            message_id,
            schedule,
            ..
        } in created
        {
            let device = schedule.device_id();
            let later_day = schedule.day().date() > outlook.today;
            let last = outlook.soc.get(device.as_str()).copied();
            let start = match later_day {
                true => outlook.after_today.get(device.as_str()).copied().or(last),
                false => last,
            };
            let Some(soc) = start else {
                continue;
            };
            let plan = schedule
                .periods()
                .filter(|p| later_day || p.start >= outlook.from)
                .map(|p| (p.period, p.setpoint));
            if let Some(bad) = self.pack.check(soc, plan) {
                warn!(device_id = %device, message_id = %message_id, warning = %bad.message(), "plan may not run as written");
                warnings.push(WarningRef {
                    device_id: device.clone(),
                    message_id: message_id.clone(),
                    warning: bad.message(),
                });
            }
        }
        if !warnings.is_empty() {
            let kept: Vec<_> = warnings
                .iter()
                .map(|w| (w.message_id.clone(), w.warning.clone()))
                .collect();
            self.store.record_warnings(&kept).await?;
        }
        Ok(warnings)
    }

    /// The units' last SoC and the rest of today's plans, for [`Ingestor::feasibility`].
    async fn outlook(&self, now: Timestamp) -> Result<Outlook, CloudError> {
        let soc = Arc::new(self.store.device_socs().await?);
        let today = Day::containing(now, &self.timezone)?;
        let from = period_start_at(now, &self.timezone)?;
        let mut after_today = Roster::default();
        if !soc.is_empty() {
            let (known, pack) = (soc.clone(), self.pack);
            let play: PlanFold = Arc::new(move |device, rest| {
                let now = *known.get(device.as_str())?;
                Some(pack.play(now, rest))
            });
            after_today = self.store.planned_from(today.date(), from, play).await?;
        }
        Ok(Outlook {
            soc,
            after_today,
            today: today.date(),
            from,
        })
    }

    async fn fleet(&self) -> Result<Fleet, CloudError> {
        let devices = self
            .store
            .device_limits()
            .await?
            .map(|own| own.unwrap_or(self.default_max_rate));
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
    #![allow(clippy::unwrap_used)]

    #[test]
    fn names_the_field_at_fault() {
        assert_eq!(
            super::field_at_fault("schedules[3].intervals[12].rate_kw"),
            "rate_kw"
        );
        assert_eq!(super::field_at_fault("schedules[3]"), "schedules");
        assert_eq!(super::field_at_fault("date"), "date");
    }

    /// A run asked for counts keeps no command of its own (what the daily fetch holds does
    /// not grow with the fleet), and says how many, never an empty list.
    #[test]
    fn a_run_asked_for_counts_keeps_none_and_says_how_many() {
        use super::{CommandRef, CommandRefs, Listing};
        let command = |n: u32| CommandRef {
            device_id: format!("dev-{n}").parse().unwrap(),
            message_id: format!("m-{n}").parse().unwrap(),
            version: 1,
        };
        let mut counted = CommandRefs::new(Listing::Counts);
        let mut listed = CommandRefs::new(Listing::Every);
        for n in 0..3 {
            counted.push(command(n));
            listed.push(command(n));
        }
        assert_eq!((counted.len(), listed.len()), (3, 3));
        assert_eq!(counted.listed(), None);
        assert_eq!(listed.listed().map(<[_]>::len), Some(3));
        assert_eq!(
            serde_json::to_value(&counted).unwrap(),
            serde_json::json!(3)
        );
        assert_eq!(
            serde_json::to_value(&listed).unwrap()[2],
            serde_json::json!({"device_id": "dev-2", "message_id": "m-2", "version": 1})
        );
    }
}
