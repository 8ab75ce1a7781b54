//! The async shell around the engine: one task per agent, one `select!` over MQTT events,
//! the next period boundary, the heartbeat, the re-assert, the outbox resend, the sync
//! re-send and shutdown. It decides nothing itself: the engine and the safety rules do.
//!
//! ```text
//!  schedule ─▶ engine.on_schedule ─▶ store.accept_plan (plan + ack, one tx) ─▶ publish ack ─▶ PUBACK
//!  boundary ─▶ read ─▶ store.close_period (the period that ended: its energy) ─▶ publish report
//!           ─▶ engine.due ─▶ missed: store.record_period ─▶ publish report
//!                         ─▶ current: clamp, apply, read back ─▶ store.open_period
//!  every battery read (boundary, re-assert, write, heartbeat) ─▶ PeriodEnergy of the open period
//! ```
//!
//! The current period's report is made when the period is run (so it is never run or
//! reported twice) and stays open in the store; at the boundary that ends the period, its
//! `energy_kwh` (what the unit delivered, from the readings) and `at` are filled in and it
//! goes to the outbox. A report left open by a crash or a stop goes out at the next start,
//! with `energy_kwh` null: what ran while the agent was away is unknown.

use max300_protocol::error::Chain;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use max300_mqtt::trace;
use max300_mqtt::{Event, Inbound, Qos, Session, SessionConfig};
use max300_protocol::clock::monotonic;
use max300_protocol::message::{
    ControlMsg, Fallback, HeartbeatMsg, PeriodReason, ReceiptMsg, ReportMsg, ReportStatus,
    ScheduleMsg, SyncMsg, V1,
};
use max300_protocol::{
    Channel, Clock, DeviceId, Message, MessageId, RateKw, Setpoint, Topics, TraceParent,
};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, error, info, info_span, instrument, warn};

use crate::battery::{Battery, BatteryStatus, ReadOnly, SunSpecBattery};
use crate::config::BatteryChoice;
use crate::energy::PeriodEnergy;
use crate::engine::{Action, ControlDecision, Decision, Engine, PeriodDue, Plan, Verdict};
use crate::metrics::AgentMetrics;
use crate::safety::{Clamped, Guard, SafetyConfig};
use crate::store::{Outgoing, Store};
use crate::{AgentConfig, AgentError};

/// At most this many outbox entries are (re)published per resend tick of one second.
const RESEND_BATCH: usize = 100;
/// How often the outbox is checked for entries to resend (real time).
const RESEND_TICK: Duration = Duration::from_secs(1);
/// How often `sync` is sent again while a plan for today or tomorrow is missing (real time).
const SYNC_EVERY: Duration = Duration::from_secs(600);
/// How often the system's time sync is asked, where it is checked (real time).
const TIME_SOURCE_EVERY: Duration = Duration::from_secs(60);
/// The longest sleep between checks of the clock, so a clock that jumps is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// A publish that cannot be queued this fast is left to the outbox resend, so a stalled
/// session never stalls the agent.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Capacity of the session's event channel: one agent handles one message at a time.
const EVENT_CAPACITY: usize = 32;
/// One period of plan time.
const PERIOD: jiff::SignedDuration = jiff::SignedDuration::from_secs(max300_protocol::PERIOD_SECS);
/// How often the measured power is read while it settles on a new setpoint (real time).
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// How much earlier than a boundary the timer is set. Tokio's timer fires on whole
/// milliseconds, rounded up, so a timer set for the boundary wakes up to a millisecond or two
/// after it. Woken early, the agent reads the controller and clamps the next period's plan
/// ahead, and yields through what is left (see [`Agent::at_boundary`]).
const WAKE_EARLY: Duration = Duration::from_millis(3);

/// Runs one agent until `shutdown` on the controller its config names: a SunSpec controller,
/// or one only read (`dry-run:`). A simulated battery (`battery = "sim"`) is not built here:
/// it stands in for the outside world and lives in `max300-sim`, which hands one to
/// [`run_with`]; asked for one, this returns a config error saying so. Start-up failures
/// (config, store, broker address) are returned; everything after start-up is logged and
/// retried.
pub async fn run(
    config: AgentConfig,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    config.validate()?;
    let battery: Arc<dyn Battery> = match config.battery_choice()? {
        BatteryChoice::Sim => {
            return Err(AgentError::Config(
                "battery = \"sim\": this build has no simulated battery (it is left out of the \
                 agent-only build); use sunspec+tcp://host:port/unit or dry-run:sunspec+tcp://…"
                    .into(),
            ));
        }
        BatteryChoice::SunSpec(url) => Arc::new(SunSpecBattery::new(url, config.revert_timeout())),
        BatteryChoice::DryRun(url) => {
            Arc::new(ReadOnly(SunSpecBattery::new(url, config.revert_timeout())))
        }
    };
    run_with(config, battery, clock, shutdown).await
}

/// Runs one agent until `shutdown`, driving `battery`: opens its store, connects to the
/// broker and follows its plans. With `battery = "dry-run:…"` in the config, `battery` is
/// only read and periods are reported with what would have run. Start-up failures (config,
/// store, broker address) are returned; everything after start-up is logged and retried.
#[instrument(skip_all, fields(device_id = %config.device_id))]
pub async fn run_with(
    config: AgentConfig,
    battery: Arc<dyn Battery>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    config.validate()?;
    let url = config.broker_url()?;
    let tz = config.time_zone()?;
    let max_rate = config.max_rate()?;
    let device_id = config.device_id.clone();

    let data_dir = config.data_dir.clone();
    let path = config.store_path();
    let durable = config.durable;
    let store = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            AgentError::store(data_dir.display(), "cannot create the data directory", e)
        })?;
        Store::open(&path, durable)
    })
    .await
    .map_err(|e| AgentError::store(config.store_path().display(), "opening task failed", e))??;
    let store = Arc::new(store);

    let dry_run = matches!(config.battery_choice()?, BatteryChoice::DryRun(_));

    let mut engine = Engine::new(device_id.clone(), tz, &config.timezone, max_rate)
        .with_catch_up(config.catch_up());
    let loaded = blocking(&store, |s| s.load()).await?;
    for stored in loaded.plans {
        let msg = stored.msg;
        match msg.to_schedule() {
            Ok(schedule) => engine.hold(Plan {
                message_id: msg.message_id.clone(),
                version: msg.version,
                sha256: schedule.sha256(),
                effective_period: stored.effective_period,
                schedule,
                cancelled: stored.cancelled,
                traceparent: msg.traceparent.clone(),
            }),
            Err(e) => {
                warn!(device_id = %device_id, message_id = %msg.message_id, error = %Chain(&e), "stored plan unreadable: ignored")
            }
        }
    }
    for c in loaded.controls {
        engine.cancel(c.control, &c.target, c.received);
    }
    engine.restore(loaded.last_done, loaded.last_instant);

    let topics = config.topics();
    // Reports left open by a crash or a stop: out now, with the energy unknown. Queued unsent,
    // so the flush after the session connects sends them.
    let (report_topic, now) = (topics.topic(&device_id, Channel::Report), clock.now());
    let closed = blocking(&store, move |s| {
        s.close_open_periods(now, report_topic, false)
    })
    .await?;
    for out in &closed {
        info!(device_id = %device_id, seq = out.seq, "report left open at the last stop: sent, energy unknown");
    }
    // The session lives exactly as long as this function: the guard stops it on any return.
    let session_stop = shutdown.child_token();
    let _session_guard = session_stop.clone().drop_guard();
    let mut session_config =
        SessionConfig::new(url, device_id.as_str(), topics.device_filters(&device_id));
    session_config.topics = topics.clone();
    session_config.channel_capacity = EVENT_CAPACITY;
    session_config.tls = config.tls();
    let (session, events) = max300_mqtt::connect(session_config, session_stop)?;

    let metrics = Arc::new(AgentMetrics::new());
    if let Some(addr) = &config.metrics {
        let bound = crate::metrics::serve(addr, metrics.clone(), shutdown.clone()).await?;
        info!(device_id = %device_id, metrics = %bound, "metrics endpoint listening");
    }
    let reassert = (config.revert_timeout() / 2).max(Duration::from_millis(500));
    info!(
        device_id = %device_id,
        store_id = %store.store_id(),
        plans = engine.held_plans(clock.now()).len(),
        "agent started"
    );
    let check_time = match config.clock_sync.as_str() {
        "ntp" => true,
        "assume" => false,
        // A scaled clock is not the system clock: NTP says nothing about it.
        _ => (clock.speed() - 1.0).abs() < f64::EPSILON,
    };
    let agent = Agent {
        device_id,
        clock,
        store,
        battery,
        session,
        topics,
        engine,
        guard: Guard::new(config.safety, max_rate),
        safety: config.safety,
        store_fault: false,
        dry_run,
        check_time,
        last_batch: None,
        fault: None,
        started: monotonic(),
        resend_after: Duration::from_secs(config.resend_after_s),
        dropped: 0,
        metrics,
        open: None,
    };
    agent
        .run(
            events,
            shutdown,
            Duration::from_secs(config.heartbeat_interval_s),
            reassert,
        )
        .await
}

/// Runs one short store transaction on the blocking pool, so a thousand agents in one
/// process never block the runtime's workers on disk.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    let store = store.clone();
    let path = store.path().to_owned();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| AgentError::store(path, "store task failed", e))?
}

struct Agent {
    device_id: DeviceId,
    clock: Arc<dyn Clock>,
    store: Arc<Store>,
    battery: Arc<dyn Battery>,
    session: Session,
    topics: Topics,
    engine: Engine,
    guard: Guard,
    /// The power check after a write: its tolerance and how long it may take.
    safety: SafetyConfig,
    /// Set while reports cannot be stored: the unit then idles rather than run a plan whose
    /// outcome cannot be recorded.
    store_fault: bool,
    /// `dry-run:` battery: read the controller, never drive it; report what would run.
    dry_run: bool,
    /// The last controller error, until a write and read-back succeed again.
    fault: Option<String>,
    started: Instant,
    resend_after: Duration,
    /// Inbound messages dropped as undecodable or not for this device.
    dropped: u64,
    /// Outbox depth, write latency, boundary lateness.
    metrics: Arc<AgentMetrics>,
    /// Whether to ask the system's time sync before acting on plans.
    check_time: bool,
    /// When the last outbox batch went out (real time).
    last_batch: Option<Instant>,
    /// The current period, whose report is open in the store until it ends.
    open: Option<OpenPeriod>,
}

/// The period being run: its report waits in the store for what the period delivered.
struct OpenPeriod {
    /// The planned mode: the direction `energy_kwh` is counted in.
    mode: max300_protocol::Mode,
    energy: PeriodEnergy,
}

/// What to write for a plan: the controller's reading it was decided on, and the plan
/// clamped by the safety rules against it.
#[derive(Clone, Copy, Debug)]
struct Ready {
    planned: Setpoint,
    status: BatteryStatus,
    clamped: Clamped,
}

impl Agent {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
        heartbeat_every: Duration,
        reassert_every: Duration,
    ) -> Result<(), AgentError> {
        self.check_time_source().await;
        // After a restart: report what was missed, and apply the current period at once.
        self.on_boundary().await;
        let mut time_source = tokio::time::interval(TIME_SOURCE_EVERY);
        time_source.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        let mut reassert = tokio::time::interval(reassert_every);
        let mut resend = tokio::time::interval(RESEND_TICK);
        let mut sync = tokio::time::interval(SYNC_EVERY);
        for timer in [&mut heartbeat, &mut reassert, &mut resend, &mut sync] {
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        // Every connect sends a sync; the timer only repeats it while a plan is missing.
        sync.reset();
        // Under systemd: ready now; the watchdog is petted from this loop, so a loop stuck in
        // one step stops the petting and systemd restarts the agent.
        let notifier = crate::systemd::Notifier::from_env();
        let pet_every = notifier.pet_every();
        let mut watchdog = tokio::time::interval(pet_every.unwrap_or(MAX_SLEEP));
        watchdog.set_missed_tick_behavior(MissedTickBehavior::Delay);
        notifier.ready();
        let mut boundary = self.engine.next_wake(self.clock.now());
        loop {
            // next_wake only looks forward: keep a boundary that passed while the loop was
            // busy (a controller taking seconds to answer), so it is handled late, not
            // skipped while the re-assert and heartbeat ticks win every select.
            boundary = boundary.min(self.engine.next_wake(self.clock.now()));
            let sleep = self
                .clock
                .real_until(boundary)
                .saturating_sub(WAKE_EARLY)
                .min(MAX_SLEEP);
            if sleep.is_zero() {
                self.at_boundary(boundary).await;
                boundary = self.engine.next_wake(self.clock.now());
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(Event::Connected) => {
                        self.on_connected().await;
                        // The flush counts as this second's resend batch.
                        resend.reset();
                    }
                    Some(Event::Disconnected(reason)) => {
                        info!(device_id = %self.device_id, reason = %reason, "mqtt disconnected: outbox waits");
                    }
                    Some(Event::Message(inbound)) => {
                        self.on_inbound(&inbound).await;
                        // Acked in arrival order, after the message was committed or refused.
                        inbound.ack().await;
                    }
                    None => break,
                },
                _ = tokio::time::sleep(sleep) => {
                    self.at_boundary(boundary).await;
                    boundary = self.engine.next_wake(self.clock.now());
                }
                _ = heartbeat.tick() => self.heartbeat().await,
                _ = time_source.tick(), if self.check_time => {
                    if self.check_time_source().await {
                        self.on_boundary().await;
                    }
                }
                _ = reassert.tick() => {
                    self.drive(true).await;
                }
                _ = watchdog.tick(), if pet_every.is_some() => notifier.pet(),
                _ = resend.tick() => self.resend(self.resend_after).await,
                _ = sync.tick() => {
                    if self.engine.lacks_plan(self.clock.now()) {
                        self.sync().await;
                    }
                }
            }
        }
        info!(device_id = %self.device_id, dropped = self.dropped, "agent stopped");
        Ok(())
    }

    /// Asks the system's time sync (where configured); returns true when the clock has just
    /// become synchronized, so the current period can be applied at once.
    async fn check_time_source(&mut self) -> bool {
        if !self.check_time {
            return false;
        }
        let synced = crate::timesync::system_clock_synchronized().await;
        let was = !self.engine.clock_unsynced(self.clock.now());
        self.engine.set_time_source(synced);
        if !synced {
            warn!(device_id = %self.device_id, "the system clock is not synchronized: idle");
            self.clock_untrusted();
            self.drive(false).await;
        }
        synced && !was
    }

    /// The clock cannot be trusted now: what is missed until it is right says
    /// `clock_unsynced`, and what the open period delivers can no longer be told in clock
    /// time (its `energy_kwh` will be null).
    fn clock_untrusted(&mut self) {
        self.engine.note_unsynced();
        if let Some(open) = &mut self.open {
            open.energy.spoil();
        }
    }

    async fn on_connected(&mut self) {
        self.sync().await;
        self.resend(Duration::ZERO).await;
    }

    fn topic(&self, channel: Channel) -> String {
        self.topics.topic(&self.device_id, channel)
    }

    // ---- inbound ----

    async fn on_inbound(&mut self, inbound: &Inbound) {
        if let Some((device, _)) = &inbound.route
            && device != &self.device_id
        {
            self.dropped += 1;
            warn!(device_id = %self.device_id, topic = %inbound.topic, "message on another device's topic dropped");
            return;
        }
        match &inbound.message {
            Err(e) => {
                self.dropped += 1;
                warn!(device_id = %self.device_id, topic = %inbound.topic, error = %Chain(e), dropped = self.dropped, "undecodable message dropped");
            }
            Ok(Message::Schedule(msg)) => {
                // The cloud's trace continues here: the ack carries this span's context.
                let span = info_span!(parent: None, "schedule", device_id = %self.device_id, message_id = %msg.message_id, version = msg.version);
                trace::set_parent(&span, msg.traceparent.as_ref());
                self.on_schedule(msg).instrument(span).await
            }
            Ok(Message::Control(msg)) => {
                let span = info_span!(parent: None, "control", device_id = %self.device_id, message_id = %msg.message_id, target_message_id = %msg.target_message_id);
                trace::set_parent(&span, msg.traceparent.as_ref());
                self.on_control(msg).instrument(span).await
            }
            Ok(Message::Receipt(msg)) => self.on_receipt(msg).await,
            Ok(other) => {
                self.dropped += 1;
                warn!(device_id = %self.device_id, topic = %inbound.topic, channel = other.channel().as_str(), "unexpected message type dropped");
            }
        }
    }

    /// The ack of `message_id` saying `verdict`. The store stamps its id and the seq inside
    /// the transaction.
    fn ack(&self, message_id: &MessageId, now: Timestamp, verdict: Verdict) -> Message {
        let from = (self.store.store_id(), 0);
        Message::Ack(verdict.ack(message_id, &self.device_id, from, now))
    }

    /// Stamps an ack or report with the trace context of the span it is made in, or else
    /// `fallback` (the context it answers), so the trace goes on even when this agent exports
    /// no spans itself.
    fn traced(mut message: Message, fallback: Option<&TraceParent>) -> Message {
        let tp = trace::of(&Span::current()).or_else(|| fallback.cloned());
        match &mut message {
            Message::Ack(m) => m.traceparent = tp,
            Message::Report(m) => m.traceparent = tp,
            _ => {}
        }
        message
    }

    async fn on_schedule(&mut self, msg: &ScheduleMsg) {
        let now = self.clock.now();
        let id = &self.device_id;
        let mid = &msg.message_id;
        let topic = self.topic(Channel::Ack);
        let sent = self.session.is_connected();
        let decision = self.engine.on_schedule(msg, now);
        let Some(verdict) = decision.verdict() else {
            if let Decision::Withhold { why } = decision {
                warn!(device_id = %id, message_id = %mid, why, "ack withheld: the cloud will resend");
            }
            return;
        };
        let ack = Self::traced(self.ack(mid, now, verdict), msg.traceparent.as_ref());
        let (result, plan) = match decision {
            Decision::Accept(plan) => {
                let (m, eff) = (msg.clone(), plan.effective_period);
                let r = blocking(&self.store, move |s| {
                    s.accept_plan(&m, eff, ack, topic, now, sent)
                })
                .await;
                (r, Some(plan))
            }
            Decision::Repeat { .. } => {
                debug!(device_id = %id, message_id = %mid, "repeated schedule: accepted again");
                (
                    blocking(&self.store, move |s| s.enqueue(ack, topic, sent)).await,
                    None,
                )
            }
            Decision::Reject { reason, details } => {
                warn!(device_id = %id, message_id = %mid, reason = ?reason, details = details.as_deref().unwrap_or(""), "schedule rejected");
                (
                    blocking(&self.store, move |s| s.enqueue(ack, topic, sent)).await,
                    None,
                )
            }
            // Answered above: it has no verdict.
            Decision::Withhold { .. } => return,
        };
        match result {
            Ok(out) => {
                if let Some(plan) = plan {
                    info!(device_id = %id, message_id = %mid, date = %msg.schedule_date, version = plan.version, effective_period = plan.effective_period, "schedule accepted");
                    self.engine.hold(plan);
                    self.engine.acted(now);
                }
                self.publish(&out).await;
            }
            Err(e) => {
                // Never ack what is not on disk; the cloud resends.
                error!(device_id = %id, message_id = %mid, error = %Chain(&e), "schedule not stored: ack withheld");
            }
        }
    }

    async fn on_control(&mut self, msg: &ControlMsg) {
        let now = self.clock.now();
        let mid = msg.message_id.clone();
        let topic = self.topic(Channel::Ack);
        let sent = self.session.is_connected();
        let result = match self.engine.on_control(msg) {
            ControlDecision::Cancel { target, held } => {
                let ack = Self::traced(
                    self.ack(&mid, now, Verdict::ACCEPTED),
                    msg.traceparent.as_ref(),
                );
                let (control, t) = (mid.clone(), target.clone());
                let r = blocking(&self.store, move |s| {
                    s.cancel_plan(&control, &t, ack, topic, now, sent)
                })
                .await;
                if r.is_ok() {
                    self.engine.cancel(mid.clone(), &target, now);
                    self.engine.acted(now);
                    if held {
                        info!(device_id = %self.device_id, message_id = %mid, target_message_id = %target, "plan cancelled: going idle");
                    } else {
                        // The cancel overtook its plan: kept, so the plan is refused if it comes.
                        info!(device_id = %self.device_id, message_id = %mid, target_message_id = %target, "cancel kept for a plan not held: it will be refused");
                    }
                    if self.engine.active(now).is_none() {
                        self.drive(false).await;
                    }
                }
                r
            }
            ControlDecision::Repeat => {
                let ack = Self::traced(
                    self.ack(&mid, now, Verdict::ACCEPTED),
                    msg.traceparent.as_ref(),
                );
                blocking(&self.store, move |s| s.enqueue(ack, topic, sent)).await
            }
            ControlDecision::Reject { reason, details } => {
                warn!(device_id = %self.device_id, message_id = %mid, reason = ?reason, details = details.as_deref().unwrap_or(""), "control rejected");
                let verdict = Verdict::Rejected { reason, details };
                let ack = Self::traced(self.ack(&mid, now, verdict), msg.traceparent.as_ref());
                blocking(&self.store, move |s| s.enqueue(ack, topic, sent)).await
            }
        };
        match result {
            Ok(out) => {
                self.publish(&out).await;
            }
            Err(e) => {
                error!(device_id = %self.device_id, message_id = %mid, error = %Chain(&e), "control not stored: ack withheld")
            }
        }
    }

    async fn on_receipt(&mut self, msg: &ReceiptMsg) {
        if &msg.store_id != self.store.store_id() {
            debug!(device_id = %self.device_id, store_id = %msg.store_id, "receipt for another store ignored");
            return;
        }
        let (store_id, seqs) = (msg.store_id.clone(), msg.seqs.clone());
        match blocking(&self.store, move |s| s.receipt(&store_id, &seqs)).await {
            Ok(n) => debug!(device_id = %self.device_id, removed = n, "receipt applied"),
            Err(e) => {
                warn!(device_id = %self.device_id, error = %Chain(&e), "receipt not applied: entries will be resent")
            }
        }
    }

    // ---- periods ----

    /// Woken for `boundary` ([`WAKE_EARLY`] before it, or after it): when the agent runs
    /// through it, the controller is read and the next period's plan clamped ahead, so the
    /// write goes out the moment the clock reads the boundary.
    async fn at_boundary(&mut self, boundary: Timestamp) {
        let crossing = self
            .open
            .as_ref()
            .is_some_and(|o| o.energy.end() == boundary);
        let ahead = if crossing
            && !self.dry_run
            && self.clock.real_until(boundary) <= 2 * WAKE_EARLY
            && !self.engine.clock_unsynced(boundary)
        {
            self.ready(boundary).await
        } else {
            None
        };
        self.reach(boundary).await;
        self.boundary(ahead).await;
    }

    /// A boundary, or a restart or a recovered clock: what [`Agent::at_boundary`] does
    /// without reading ahead.
    async fn on_boundary(&mut self) {
        self.boundary(None).await;
    }

    /// `ahead`: the controller's reading and the new period's clamped plan, taken
    /// just before the boundary.
    async fn boundary(&mut self, ahead: Option<Ready>) {
        let now = self.clock.now();
        if self.engine.clock_unsynced(now) {
            // Whether the time source is unsynchronized was logged when it was found.
            if self.engine.time_source_synced() {
                warn!(device_id = %self.device_id, now = %now, "clock reads earlier than the last stored instant: idle");
            }
            self.clock_untrusted();
            self.drive(false).await;
            return;
        }
        // At a boundary the agent ran through, the new period's setpoint goes to the
        // controller first, before the report of the period that ended is committed: a store
        // slow to commit (an SD card's fsync takes milliseconds, sometimes seconds) must not
        // keep the unit on the old setpoint. If that commit fails, the unit idles right after
        // it, as it does whenever reports cannot be stored (DESIGN §7). Only there: after a
        // restart or mid-period, the period's first reading must see what the unit ran
        // before the write.
        let crossed = self
            .open
            .as_ref()
            .map(|o| o.energy.end())
            .filter(|end| *end <= now);
        let (driven, mut decided) = match (crossed, ahead) {
            (None, _) => (false, None),
            (Some(_), Some(ahead)) => {
                let put = self.put(ahead, false).await;
                (put, put.then_some(ahead))
            }
            (Some(_), None) => (self.drive(false).await, None),
        };
        if driven && let Some(boundary) = crossed {
            // Plan time after the boundary, in real seconds.
            let late = self.clock.now().duration_since(boundary).as_secs_f64() / self.clock.speed();
            self.metrics.boundary_lateness(late);
        }
        if crossed.is_some() {
            // Where one process runs many units (`max300 up`, the fault suite's fleet), every
            // unit waiting on this boundary writes before any unit's bookkeeping starts: that
            // goes to the blocking pool, whose threads would otherwise take the CPU from the
            // writes still to come. With 200 units on a loaded 2-core machine this took the
            // median write from 76 ms to 7 ms after the boundary.
            tokio::task::yield_now().await;
        }
        if !self.close_period(now).await {
            return;
        }
        // How long this process has run, in clock time: what it missed before that, it
        // missed while down.
        let uptime = self
            .clock
            .clock_duration(monotonic().saturating_duration_since(self.started));
        let due = self.engine.due(now, uptime);
        if let (Some(done), Some(first)) = (self.engine.last_done(), due.first()) {
            let unreported =
                first.start.duration_since(done).as_secs() / max300_protocol::PERIOD_SECS - 1;
            if unreported > 0 {
                warn!(device_id = %self.device_id, periods = unreported, from = %done, to = %first.start, "periods missed before the catch_up_h cut-off get no report");
            }
        }
        let count = due.len();
        for (i, period) in due.into_iter().enumerate() {
            let is_current = i + 1 == count;
            // One span per period, in the trace of the plan that governed it (if any).
            let governing = match &period.action {
                Action::Run { message_id, .. } => Some(message_id),
                Action::Skip { message_id, .. } => message_id.as_ref(),
            };
            let span = info_span!(
                parent: None,
                "period",
                device_id = %self.device_id,
                message_id = governing.map(MessageId::as_str),
                period = period.period,
                interval_start = %period.start,
                status = Empty,
            );
            let plan_trace = governing
                .and_then(|id| self.engine.traceparent(id))
                .cloned();
            trace::set_parent(&span, plan_trace.as_ref());
            if is_current {
                // Opened before it runs, so the reads of the run count towards its energy.
                let mode = match &period.action {
                    Action::Run { setpoint, .. } => setpoint.mode(),
                    Action::Skip { planned, .. } => planned.mode(),
                };
                self.open = Some(OpenPeriod {
                    mode,
                    energy: PeriodEnergy::new(period.start, period.start + PERIOD),
                });
            }
            // The current period is the last: the ones before it were missed.
            let decided = if is_current { decided.take() } else { None };
            let report = self
                .handle_period(&period, is_current, decided, now)
                .instrument(span.clone())
                .await;
            let report = span.in_scope(|| Self::traced(report, plan_trace.as_ref()));
            if let Message::Report(r) = &report {
                span.record("status", r.status.as_str());
            }
            let topic = self.topic(Channel::Report);
            let sent = self.session.is_connected();
            let start = period.start;
            // The current period's report stays open until the period ends; a missed one
            // goes out at once.
            let recorded = if is_current {
                blocking(&self.store, move |s| s.open_period(report, now))
                    .await
                    .map(|opened| opened.then_some(None))
            } else {
                blocking(&self.store, move |s| {
                    s.record_period(report, topic, now, sent)
                })
                .await
                .map(|out| out.map(Some))
            };
            if !matches!(recorded, Ok(Some(_))) {
                self.open = None;
            }
            match recorded {
                Ok(Some(out)) => {
                    self.store_fault = false;
                    self.engine.mark_done(start);
                    self.engine.acted(now);
                    if let Some(out) = out {
                        self.publish(&out).await;
                    }
                }
                Ok(None) => {
                    warn!(device_id = %self.device_id, interval_start = %start, "period already reported: not again");
                    self.engine.mark_done(start);
                }
                Err(e) => {
                    // Left for the next boundary; it will then be reported as missed, once.
                    // Until a report can be stored again, the unit idles (DESIGN §7 fallback).
                    error!(device_id = %self.device_id, interval_start = %start, error = %Chain(&e), "report not stored: idle");
                    self.store_fault = true;
                    self.drive(false).await;
                    break;
                }
            }
        }
    }

    /// At the boundary that ends the open period: one last reading, then its report is
    /// finalized with what it delivered and queued. `false` when the report could not be
    /// stored (the unit then idles, and the next boundary tries again).
    async fn close_period(&mut self, now: Timestamp) -> bool {
        let Some(start) = self
            .open
            .as_ref()
            .map(|o| o.energy.start())
            .filter(|start| *start + PERIOD <= now)
        else {
            return true;
        };
        // The boundary's drive has usually taken the closing reading already.
        if !self.open.as_ref().is_some_and(|o| o.energy.read_to_end())
            && let Err(e) = self.read().await
        {
            self.faulted(Chain(&e).to_string());
        }
        let Some(open) = self.open.as_ref() else {
            return true;
        };
        let energy = open.energy.delivered_kwh(open.mode);
        let topic = self.topic(Channel::Report);
        let sent = self.session.is_connected();
        match blocking(&self.store, move |s| {
            s.close_period(start, energy, now, topic, sent)
        })
        .await
        {
            Ok(out) => {
                self.open = None;
                self.store_fault = false;
                self.engine.acted(now);
                debug!(device_id = %self.device_id, interval_start = %start, energy_kwh = ?energy, "period report closed");
                if let Some(out) = out {
                    self.publish(&out).await;
                }
                true
            }
            Err(e) => {
                error!(device_id = %self.device_id, interval_start = %start, error = %Chain(&e), "report not closed: idle");
                self.store_fault = true;
                self.drive(false).await;
                false
            }
        }
    }

    /// Reads the controller; every reading also counts towards the open period's energy.
    async fn read(&mut self) -> Result<BatteryStatus, crate::battery::BatteryError> {
        let status = self.battery.read().await?;
        if let Some(open) = &mut self.open {
            // Measured where the controller measures it, else the setpoint it runs.
            let kw = status
                .measured_kw
                .unwrap_or_else(|| status.setpoint.signed_kw());
            open.energy.sample(self.clock.now(), kw);
        }
        Ok(status)
    }

    /// Runs or skips one period and builds its report (seq and store id are stamped later).
    /// `decided`: the current period's decision, when the boundary already wrote it.
    async fn handle_period(
        &mut self,
        due: &PeriodDue,
        is_current: bool,
        decided: Option<Ready>,
        now: Timestamp,
    ) -> Message {
        let mut report = due.report(&self.device_id, self.store.store_id(), now);
        match &due.action {
            Action::Skip {
                reason, message_id, ..
            } => {
                if is_current {
                    self.drive(false).await;
                }
                if !matches!(
                    reason,
                    PeriodReason::AgentDown | PeriodReason::ClockUnsynced
                ) {
                    info!(device_id = %self.device_id, message_id = ?message_id.as_ref().map(|m| m.as_str()), period = due.period, reason = ?reason, "period skipped");
                }
            }
            Action::Run {
                setpoint,
                message_id,
            } => {
                if self.dry_run {
                    self.would_run(&mut report, *setpoint).await;
                    return report.into_message();
                }
                // A decision made for another plan (a store fault idles the unit) is not
                // this period's.
                let decided = decided.filter(|d| d.planned == *setpoint);
                let run = self.execute(*setpoint, decided).await;
                report.status = run.status;
                report.applied_kw = run.applied;
                report.limited_by = run.limited_by;
                report.soc_pct = run.soc_pct;
                report.error = run.error;
                info!(device_id = %self.device_id, message_id = %message_id, period = due.period, status = report.status.as_str(), applied_kw = ?report.applied_kw.map(|r| r.kw()), "period run");
            }
        }
        report.into_message()
    }

    /// A dry run's period: what the safety rules would apply, from a read of the controller.
    async fn would_run(&mut self, report: &mut ReportMsg, planned: Setpoint) {
        report.status = ReportStatus::Skipped;
        report.reason = Some(PeriodReason::DryRun);
        match self.read().await {
            Ok(status) => {
                let clamped = self.guard.clamp(planned, &status);
                report.would_kw = Some(clamped.setpoint.rate());
                report.limited_by = clamped.limited_by;
                report.soc_pct = Some(status.soc_pct);
                self.fault = None;
            }
            Err(e) => report.error = Some(self.faulted(Chain(&e).to_string())),
        }
    }

    /// Clamps, writes if it changed, reads back, and waits for the measured power to follow
    /// (at most `settle_s`). `decided`: the decision the boundary already wrote, on a reading
    /// taken just before it; it is not made again on a later reading, which under load can
    /// come well into the period. The report gives the state of charge the decision was made
    /// on, not one read after the unit has run a while.
    async fn execute(&mut self, planned: Setpoint, decided: Option<Ready>) -> Run {
        let (status, clamped) = match decided {
            Some(Ready {
                status, clamped, ..
            }) => (status, clamped),
            None => {
                let status = match self.read().await {
                    Ok(s) => s,
                    Err(e) => return Run::failed(self.faulted(Chain(&e).to_string()), None),
                };
                let clamped = self.guard.clamp(planned, &status);
                if status.setpoint != clamped.setpoint
                    && let Err(e) = self.apply(clamped.setpoint).await
                {
                    let error = self.faulted(Chain(&e).to_string());
                    // Say what the unit runs instead, if it still answers.
                    let observed = self.read().await.ok();
                    return Run::failed(error, observed.as_ref());
                }
                (status, clamped)
            }
        };
        let mut back = match self.read().await {
            Ok(s) => s,
            Err(e) => return Run::failed(self.faulted(Chain(&e).to_string()), None),
        };
        if back.setpoint != clamped.setpoint {
            let error = format!("read back {}, expected {}", back.setpoint, clamped.setpoint);
            return Run::failed(error, Some(&back));
        }
        self.fault = None;
        // A controller that measures its power is believed only once the power follows. The
        // wait never takes more than a tenth of a period, so on a fast clock a unit that does
        // not deliver cannot hold up the periods after this one.
        let tenth = Duration::from_secs_f64(
            max300_protocol::PERIOD_SECS as f64 / 10.0 / self.clock.speed(),
        );
        let settle_by = monotonic() + self.safety.settle().min(tenth);
        while let Some(measured) = back.measured_kw {
            if self.safety.delivers(clamped.setpoint, measured) {
                break;
            }
            if monotonic() >= settle_by {
                // `+ 0.0` prints a measured -0 as 0.
                let measured = measured + 0.0;
                let error = format!(
                    "measured {measured:.1} kW, expected {:.1} kW (tolerance {} kW)",
                    clamped.setpoint.signed_kw(),
                    self.safety.power_tolerance_kw
                );
                warn!(device_id = %self.device_id, error = %error, "the unit does not deliver its setpoint");
                return Run {
                    limited_by: clamped.limited_by,
                    ..Run::failed(error, Some(&back))
                };
            }
            tokio::time::sleep(SETTLE_POLL).await;
            back = match self.read().await {
                Ok(s) => s,
                Err(e) => return Run::failed(self.faulted(Chain(&e).to_string()), None),
            };
        }
        Run {
            status: ReportStatus::Executed,
            applied: Some(clamped.setpoint.rate()),
            limited_by: clamped.limited_by,
            soc_pct: Some(status.soc_pct),
            error: None,
        }
    }

    /// One controller write, timed.
    async fn apply(&self, setpoint: Setpoint) -> Result<(), crate::battery::BatteryError> {
        let started = monotonic();
        let written = self.battery.apply(setpoint).await;
        self.metrics
            .battery_write(monotonic().saturating_duration_since(started));
        written
    }

    fn faulted(&mut self, error: String) -> String {
        warn!(device_id = %self.device_id, error = %error, "controller fault");
        self.fault = Some(error.clone());
        error
    }

    /// Keeps the controller on the clamped plan: writes when the clamped setpoint differs
    /// from what it runs, and always when `reassert` (before its revert timer runs out).
    /// `true` when the controller then runs it.
    async fn drive(&mut self, reassert: bool) -> bool {
        if self.dry_run {
            return false;
        }
        match self.ready(self.clock.now()).await {
            Some(ready) => self.put(ready, reassert).await,
            None => false,
        }
    }

    /// The plan at `at`, clamped against a reading of the controller: what a drive writes.
    /// `None` when the controller cannot be read.
    async fn ready(&mut self, at: Timestamp) -> Option<Ready> {
        // Derived from the engine each time, so a restart or a recovered clock mid-period
        // drives the current period's plan, not a stale copy of it.
        let planned = if self.store_fault {
            Setpoint::IDLE
        } else {
            self.engine.current(at)
        };
        match self.read().await {
            Ok(status) => {
                let clamped = self.guard.clamp(planned, &status);
                Some(Ready {
                    planned,
                    status,
                    clamped,
                })
            }
            Err(e) => {
                self.faulted(Chain(&e).to_string());
                None
            }
        }
    }

    /// Writes a clamped plan when the controller runs something else, and always when
    /// `reassert`. `true` when the controller then runs it.
    async fn put(
        &mut self,
        Ready {
            status, clamped, ..
        }: Ready,
        reassert: bool,
    ) -> bool {
        if reassert || status.setpoint != clamped.setpoint {
            match self.apply(clamped.setpoint).await {
                Ok(()) => self.fault = None,
                Err(e) => {
                    self.faulted(Chain(&e).to_string());
                    return false;
                }
            }
            // A changed setpoint (the SoC window stopping a charge, a cancel) changes what the
            // period delivers from now: read it, so the energy steps here and not at the next
            // reading.
            if status.setpoint != clamped.setpoint
                && self.open.is_some()
                && let Err(e) = self.read().await
            {
                self.faulted(Chain(&e).to_string());
            }
        }
        true
    }

    /// Yields until the clock reads `instant`, when it is at most a few milliseconds away
    /// (the timer woke [`WAKE_EARLY`]); bounded, in case the clock steps back meanwhile.
    async fn reach(&self, instant: Timestamp) {
        if self.clock.real_until(instant) > 2 * WAKE_EARLY {
            return;
        }
        let give_up = monotonic() + 4 * WAKE_EARLY;
        while self.clock.now() < instant && monotonic() < give_up {
            tokio::task::yield_now().await;
        }
    }

    // ---- outbound ----

    /// Publishes one outbox entry; `false` if it did not reach the session in time.
    async fn publish(&self, out: &Outgoing) -> bool {
        if !self.session.is_connected() {
            return false;
        }
        let publish =
            self.session
                .publish(out.topic.clone(), out.payload.clone(), Qos::AtLeastOnce);
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                debug!(device_id = %self.device_id, seq = out.seq, error = %Chain(&e), "publish failed: left to resend");
                false
            }
            Err(_) => {
                debug!(device_id = %self.device_id, seq = out.seq, "publish timed out: left to resend");
                false
            }
        }
    }

    /// Publishes outbox entries not sent within `older_than`, at most 100 per call.
    async fn resend(&mut self, older_than: Duration) {
        if !self.session.is_connected() {
            return;
        }
        // One batch of at most 100 per second, whatever asks for it (the tick or a burst of
        // reconnects): AWS IoT Core allows 100 publishes a second per connection.
        if self
            .last_batch
            .is_some_and(|at| monotonic().saturating_duration_since(at) < RESEND_TICK)
        {
            return;
        }
        self.last_batch = Some(monotonic());
        let batch = match blocking(&self.store, move |s| {
            s.due_for_resend(older_than, RESEND_BATCH)
        })
        .await
        {
            Ok(b) => b,
            Err(e) => {
                warn!(device_id = %self.device_id, error = %Chain(&e), "outbox not readable");
                return;
            }
        };
        if batch.is_empty() {
            return;
        }
        let mut seqs = Vec::with_capacity(batch.len());
        for out in &batch {
            // A stalled session would hold up the loop past the revert timer: stop at the
            // first entry that does not go out, and leave the rest for the next tick.
            if !self.publish(out).await {
                break;
            }
            seqs.push(out.seq);
        }
        debug!(device_id = %self.device_id, entries = seqs.len(), "outbox sent");
        if let Err(e) = blocking(&self.store, move |s| s.mark_sent(&seqs)).await {
            warn!(device_id = %self.device_id, error = %Chain(&e), "outbox send times not stored");
        }
    }

    async fn sync(&self) {
        if !self.session.is_connected() {
            return;
        }
        let have = self.engine.held_plans(self.clock.now());
        let msg = Message::Sync(SyncMsg {
            v: V1,
            device_id: self.device_id.clone(),
            have,
        });
        let send = self
            .session
            .send(self.topic(Channel::Sync), &msg, Qos::AtLeastOnce);
        if !matches!(
            tokio::time::timeout(PUBLISH_TIMEOUT, send).await,
            Ok(Ok(()))
        ) {
            debug!(device_id = %self.device_id, "sync not sent: will retry");
        }
    }

    async fn heartbeat(&mut self) {
        if !self.session.is_connected() {
            return;
        }
        let now = self.clock.now();
        let status = match self.read().await {
            Ok(s) => Some(s),
            Err(e) => {
                self.faulted(Chain(&e).to_string());
                None
            }
        };
        let outbox = blocking(&self.store, |s| s.outbox_len()).await.unwrap_or(0);
        self.metrics.outbox(outbox);
        let running = status.map_or(Setpoint::IDLE, |s| s.setpoint);
        let fallback = if self.dry_run {
            Some(Fallback::DryRun)
        } else {
            self.engine
                .fallback(now)
                .or(self.fault.as_ref().map(|_| Fallback::ControllerFault))
        };
        let msg = Message::Heartbeat(HeartbeatMsg {
            v: V1,
            device_id: self.device_id.clone(),
            at: now,
            uptime_s: monotonic()
                .saturating_duration_since(self.started)
                .as_secs(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            active_message_id: self.engine.active(now).cloned(),
            mode: running.mode(),
            rate_kw: running.rate(),
            soc_pct: status.map(|s| s.soc_pct),
            fallback,
            outbox,
        });
        let send = self
            .session
            .send(self.topic(Channel::Heartbeat), &msg, Qos::AtMostOnce);
        if !matches!(
            tokio::time::timeout(PUBLISH_TIMEOUT, send).await,
            Ok(Ok(()))
        ) {
            debug!(device_id = %self.device_id, "heartbeat not sent");
        }
    }
}

/// Wraps a report as a message for the store.
trait IntoMessage {
    fn into_message(self) -> Message;
}

impl IntoMessage for ReportMsg {
    fn into_message(self) -> Message {
        Message::Report(self)
    }
}

/// What running one period did, for its report.
struct Run {
    status: ReportStatus,
    /// What the unit ran: the setpoint when executed; when failed, the measured power or, if
    /// the unit does not measure it, the setpoint it reads back.
    applied: Option<RateKw>,
    limited_by: Option<max300_protocol::message::LimitedBy>,
    soc_pct: Option<f64>,
    error: Option<String>,
}

impl Run {
    fn failed(error: String, observed: Option<&BatteryStatus>) -> Run {
        Run {
            status: ReportStatus::Failed,
            applied: observed.map(|s| match s.measured_kw {
                Some(kw) => RateKw::try_from(kw.abs()).unwrap_or(RateKw::ZERO),
                None => s.setpoint.rate(),
            }),
            limited_by: None,
            soc_pct: observed.map(|s| s.soc_pct),
            error: Some(error),
        }
    }
}
