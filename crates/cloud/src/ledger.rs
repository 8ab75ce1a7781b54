//! The ledger of commands: the lifecycle's decisions, carried out on the store.
//!
//! Every event goes the same way, whatever the backend:
//!
//! ```text
//!  load (store) ──▶ decide (lifecycle, pure) ──▶ write one unit (store, over the revisions read)
//!       ▲                                                │ a unit that lost a race
//!       └────────────────────────────────────────────────┘ is loaded and decided again
//! ```
//!
//! A batch of device messages is decided in order over one load, each seeing what the ones
//! before it did, and written in one call (on SQLite, one commit). Nothing here is a rule of
//! its own: the rules are in [`crate::lifecycle`], the atomicity in the store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use jiff::Timestamp;
use max300_protocol::message::{AckMsg, ReportMsg};
use max300_protocol::{Backoff, DeviceId, MessageId};

use crate::CloudError;
use crate::lifecycle::feedback::{self, AckOutcome, AckTarget, ReportOutcome};
use crate::lifecycle::{Command, CommandState, Control, Policy, Subject};
use crate::store::{
    AckContext, Cancel, CommandStore, ControlWrite, Due, Fence, Insert, NewCommand, Record,
    Recorded, ReportContext, Unit, Written,
};

/// Tries before an event that keeps losing races gives up with an error.
const ATTEMPTS: u32 = 25;

/// The longest free text kept from a device message (`details`, `error`): a device cannot
/// grow the store by sending long strings.
const TEXT_CAP: usize = 1024;

/// How many of its own cancels an instance remembers (see [`Ledger::cancelled_here`]).
const RECENT_CANCELS: usize = 10_000;

/// The store and the timing its commands follow.
#[derive(Clone, Debug)]
pub struct Ledger {
    store: Arc<dyn CommandStore>,
    policy: Policy,
    /// What this instance cancelled lately, oldest first.
    cancels: Arc<std::sync::Mutex<std::collections::VecDeque<MessageId>>>,
}

/// What the clock did to one command at a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Swept {
    /// The command.
    pub message_id: MessageId,
    /// The device.
    pub device_id: DeviceId,
    /// It was flagged `late`.
    pub late: bool,
    /// Its new state, if the clock moved it (`expired`, `incomplete`).
    pub state: Option<CommandState>,
}

/// What a sweep did, and what it leaves to publish.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sweep {
    /// Commands the clock changed.
    pub swept: Vec<Swept>,
    /// Commands and control messages to publish again now (their attempt is recorded).
    pub resend: Vec<Subject>,
    /// Whether the sweep took a whole page: what is due after it is left to the next one.
    pub more: bool,
}

/// The most commands (and control messages) one sweep loads and writes. A day after its end
/// every acknowledged command of a day wakes at once (to be marked `incomplete` or not), and
/// after a broker outage every unacknowledged one is due again: at 100,000 units, whole
/// commands (about a kilobyte each in memory) in one transaction, some 100 MB held at once.
/// Page by page, a sweep holds no more than this many.
pub const SWEEP_PAGE: usize = 1000;

/// How a decision ends for one message: a unit to write (and what it means once written),
/// or an outcome that writes nothing.
type Decision = Result<(Unit, Recorded), Recorded>;

impl Ledger {
    /// A ledger over `store`.
    pub fn new(store: Arc<dyn CommandStore>, policy: Policy) -> Ledger {
        Ledger {
            store,
            policy,
            cancels: Arc::default(),
        }
    }

    /// Whether this instance cancelled `id` lately. A publish that read its batch before the
    /// cancel asks this right before each message, so a cancel made here while the batch goes
    /// out is never sent; a cancel made by another instance is caught by the re-read before
    /// the next batch, and by the unit itself, which refuses a plan it holds a cancel for.
    pub fn cancelled_here(&self, id: &MessageId) -> bool {
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn CommandStore> {
        &self.store
    }

    /// The timing.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Creates commands, versioning by content (see [`CommandStore::insert_commands`]).
    pub async fn insert_commands(
        &self,
        commands: &[NewCommand],
        at: Timestamp,
        fence: Option<&Fence>,
    ) -> Result<Vec<Insert>, CloudError> {
        self.store
            .insert_commands(commands, at, &self.policy, fence)
            .await
    }

    /// Applies an ack once, by its `message_id`.
    pub async fn record_ack(&self, ack: &AckMsg, at: Timestamp) -> Result<Recorded, CloudError> {
        let mut out = self.record_acks(std::slice::from_ref(ack), at).await?;
        out.pop()
            .ok_or_else(|| CloudError::store("an ack lost its outcome"))
    }

    /// Applies acks in order, as each would be alone; on SQLite in one commit.
    pub async fn record_acks(
        &self,
        acks: &[AckMsg],
        at: Timestamp,
    ) -> Result<Vec<Recorded>, CloudError> {
        self.settle(acks, |ack: &AckMsg, mut ctx: AckContext, seen: &Overlay| {
            seen.patch_ack(&mut ctx, ack);
            match feedback::ack(&ctx.target, ctx.seen, ack, at) {
                AckOutcome::Apply { commands, control } => Ok((
                    Unit {
                        commands,
                        control: control.map(ControlWrite::Update),
                        record: Some(Record::Ack {
                            ack: capped_ack(ack),
                            at,
                        }),
                    },
                    Recorded::Applied,
                )),
                AckOutcome::Duplicate => Err(Recorded::Duplicate),
                AckOutcome::Unknown => Err(Recorded::UnknownCommand),
                AckOutcome::Invalid(why) => Err(Recorded::Refused(why)),
            }
        })
        .await
    }

    /// Applies a report once, by its device and `interval_start`.
    pub async fn record_report(
        &self,
        report: &ReportMsg,
        at: Timestamp,
    ) -> Result<Recorded, CloudError> {
        let mut out = self
            .record_reports(std::slice::from_ref(report), at)
            .await?;
        out.pop()
            .ok_or_else(|| CloudError::store("a report lost its outcome"))
    }

    /// Applies reports in order, as each would be alone; on SQLite in one commit.
    pub async fn record_reports(
        &self,
        reports: &[ReportMsg],
        at: Timestamp,
    ) -> Result<Vec<Recorded>, CloudError> {
        let policy = self.policy;
        self.settle(
            reports,
            |report: &ReportMsg, mut ctx: ReportContext, seen: &Overlay| {
                seen.patch_report(&mut ctx, report);
                match feedback::report(&ctx.commands, ctx.seen, report, at, &policy) {
                    ReportOutcome::Apply(step) => {
                        let meaning = match (&step, &report.message_id) {
                            (None, Some(_)) => Recorded::UnknownCommand,
                            _ => Recorded::Applied,
                        };
                        Ok((
                            Unit {
                                commands: step.into_iter().map(|s| *s).collect(),
                                control: None,
                                record: Some(Record::Report {
                                    report: capped_report(report),
                                    at,
                                }),
                            },
                            meaning,
                        ))
                    }
                    ReportOutcome::Duplicate => Err(Recorded::Duplicate),
                    ReportOutcome::Refused(why) => Err(Recorded::Refused(why)),
                }
            },
        )
        .await
    }

    /// Decides `messages` in order over one load and writes them in one call; the ones whose
    /// unit lost a race go round again.
    async fn settle<M: Feed>(
        &self,
        messages: &[M],
        decide: impl Fn(&M, M::Context, &Overlay) -> Decision,
    ) -> Result<Vec<Recorded>, CloudError> {
        let mut out: Vec<Option<Recorded>> = vec![None; messages.len()];
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        for attempt in 0..ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let batch: Vec<M> = pending.iter().map(|&i| messages[i].clone()).collect();
            let contexts = M::contexts(&*self.store, &batch).await?;
            let mut overlay = Overlay::default();
            let mut units = Vec::new();
            let mut owners = Vec::new();
            for ((&i, message), ctx) in pending.iter().zip(&batch).zip(contexts) {
                match decide(message, ctx, &overlay) {
                    Ok((unit, meaning)) => {
                        overlay.note(&unit);
                        units.push(unit);
                        owners.push((i, meaning));
                    }
                    Err(outcome) => out[i] = Some(outcome),
                }
            }
            let written = self.store.write(units).await?;
            pending = Vec::new();
            for ((i, meaning), w) in owners.into_iter().zip(written) {
                match w {
                    Written::Applied => out[i] = Some(meaning),
                    Written::Conflict => pending.push(i),
                }
            }
            if !pending.is_empty() {
                backoff(attempt).await;
            }
        }
        if !pending.is_empty() {
            return Err(CloudError::store(format!(
                "{} device messages kept losing races after {ATTEMPTS} tries",
                pending.len()
            )));
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| CloudError::store("a message lost its outcome")))
            .collect()
    }

    /// The commands and control messages these ids name that may still be published at
    /// `now`: a cancelled, superseded or rejected one never is.
    pub async fn publishable(
        &self,
        ids: &[MessageId],
        now: Timestamp,
    ) -> Result<Vec<Subject>, CloudError> {
        Ok(self
            .store
            .load(ids)
            .await?
            .into_iter()
            .flatten()
            .filter(|s| s.publishable(now))
            .collect())
    }

    /// Records that these went out at `at`.
    pub async fn published(&self, subjects: Vec<Subject>, at: Timestamp) -> Result<(), CloudError> {
        let mut pending = subjects;
        for attempt in 0..ATTEMPTS {
            if pending.is_empty() {
                return Ok(());
            }
            let units = pending
                .iter()
                .map(|s| match s {
                    Subject::Command(c) => Unit {
                        commands: vec![c.published(at, &self.policy)],
                        ..Unit::default()
                    },
                    Subject::Control(c) => Unit {
                        control: Some(ControlWrite::Update(c.published(at, &self.policy))),
                        ..Unit::default()
                    },
                })
                .collect();
            let written = self.store.write(units).await?;
            let lost: Vec<MessageId> = pending
                .iter()
                .zip(written)
                .filter(|(_, w)| *w == Written::Conflict)
                .map(|(s, _)| s.message_id().clone())
                .collect();
            if lost.is_empty() {
                return Ok(());
            }
            backoff(attempt).await;
            // An ack (or a cancel) came first: record the publish over what it left.
            pending = self
                .store
                .load(&lost)
                .await?
                .into_iter()
                .flatten()
                .collect();
        }
        Err(CloudError::store(format!(
            "{} publishes kept losing races after {ATTEMPTS} tries",
            pending.len()
        )))
    }

    /// Applies the clock at `now` to the [`SWEEP_PAGE`] earliest commands that are due, and
    /// as many control messages: `late`, `expired`, `incomplete`, and the publishes to try
    /// again. One that lost a race to another writer is still due, and the next sweep decides
    /// it again. [`Sweep::more`] says whether more may be due already.
    pub async fn sweep(&self, now: Timestamp) -> Result<Sweep, CloudError> {
        let mut units = Vec::new();
        let mut changes = Vec::new();
        let due = self.store.due(now, SWEEP_PAGE).await?;
        let commands = due
            .iter()
            .filter(|d| matches!(d, Due::Command { .. }))
            .count();
        let full = commands == SWEEP_PAGE || due.len() - commands == SWEEP_PAGE;
        for due in due {
            match due {
                Due::Command { command, newest } => {
                    if let Some(tick) = command.tick(now, newest, &self.policy) {
                        units.push(Unit {
                            commands: vec![tick.step.clone()],
                            ..Unit::default()
                        });
                        changes.push(Change::Command(Box::new(tick)));
                    }
                }
                Due::Control(control) => {
                    if let Some((after, resend)) = control.tick(now, &self.policy) {
                        units.push(Unit {
                            control: Some(ControlWrite::Update(after.clone())),
                            ..Unit::default()
                        });
                        changes.push(Change::Control(after, resend));
                    }
                }
            }
        }
        let written = self.store.write(units).await?;
        let mut sweep = Sweep {
            // Only when this page moved on: one that did not would come back whole.
            more: full && written.contains(&Written::Applied),
            ..Sweep::default()
        };
        for (change, w) in changes.into_iter().zip(written) {
            if w == Written::Conflict {
                continue;
            }
            match change {
                Change::Command(tick) => {
                    let mut after = tick.step.after;
                    after.rev += 1;
                    if tick.late || tick.state.is_some() {
                        sweep.swept.push(Swept {
                            message_id: after.message_id.clone(),
                            device_id: after.device_id().clone(),
                            late: tick.late,
                            state: tick.state,
                        });
                    }
                    if tick.resend {
                        sweep.resend.push(Subject::Command(after));
                    }
                }
                Change::Control(mut after, resend) => {
                    after.rev += 1;
                    if resend {
                        sweep.resend.push(Subject::Control(after));
                    }
                }
            }
        }
        Ok(sweep)
    }

    /// An operator's cancel: the command becomes `cancelled` and a control message with id
    /// `control_id` is made, for delivery.
    pub async fn cancel(
        &self,
        id: &MessageId,
        control_id: MessageId,
        at: Timestamp,
    ) -> Result<Cancel, CloudError> {
        for attempt in 0..ATTEMPTS {
            let loaded = self.store.load(std::slice::from_ref(id)).await?;
            let Some(Some(Subject::Command(command))) = loaded.into_iter().next() else {
                return Ok(Cancel::NotFound);
            };
            let step = match command.cancel(at) {
                Ok(step) => step,
                Err(state) => return Ok(Cancel::AlreadyEnded(state)),
            };
            let control = Control::cancel(&command, control_id.clone(), at, &self.policy);
            let unit = Unit {
                commands: vec![step],
                control: Some(ControlWrite::New(control.clone())),
                record: None,
            };
            if self.store.write(vec![unit]).await?.first() == Some(&Written::Applied) {
                let mut cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
                if cancels.len() >= RECENT_CANCELS {
                    cancels.pop_front();
                }
                cancels.push_back(id.clone());
                return Ok(Cancel::Cancelled(control.message()));
            }
            backoff(attempt).await;
        }
        Err(CloudError::store(format!(
            "{id}: the cancel kept losing races after {ATTEMPTS} tries"
        )))
    }
}

/// A device message applied in batches, with how to load what deciding it needs.
#[async_trait::async_trait]
trait Feed: Clone + Send + Sync {
    /// What the store loads for one.
    type Context: Send;

    /// Loads the contexts of a batch, in order.
    async fn contexts(
        store: &dyn CommandStore,
        batch: &[Self],
    ) -> Result<Vec<Self::Context>, CloudError>;
}

#[async_trait::async_trait]
impl Feed for AckMsg {
    type Context = AckContext;

    async fn contexts(
        store: &dyn CommandStore,
        batch: &[AckMsg],
    ) -> Result<Vec<AckContext>, CloudError> {
        store.ack_contexts(batch).await
    }
}

#[async_trait::async_trait]
impl Feed for ReportMsg {
    type Context = ReportContext;

    async fn contexts(
        store: &dyn CommandStore,
        batch: &[ReportMsg],
    ) -> Result<Vec<ReportContext>, CloudError> {
        store.report_contexts(batch).await
    }
}

/// A change a sweep made.
enum Change {
    Command(Box<crate::lifecycle::Tick>),
    Control(Control, bool),
}

/// What the earlier messages of a batch did, so each later one is decided over it.
#[derive(Default)]
struct Overlay {
    commands: HashMap<MessageId, Command>,
    controls: HashMap<MessageId, Control>,
    acks: HashSet<MessageId>,
    reports: HashSet<(DeviceId, Timestamp)>,
}

impl Overlay {
    /// Notes a unit as if written: revisions move on as the store will move them.
    fn note(&mut self, unit: &Unit) {
        for step in &unit.commands {
            let mut c = step.after.clone();
            c.rev += 1;
            self.commands.insert(c.message_id.clone(), c);
        }
        match &unit.control {
            Some(ControlWrite::New(c)) => {
                self.controls.insert(c.message_id.clone(), c.clone());
            }
            Some(ControlWrite::Update(c)) => {
                let mut c = c.clone();
                c.rev += 1;
                self.controls.insert(c.message_id.clone(), c);
            }
            None => {}
        }
        match &unit.record {
            Some(Record::Ack { ack, .. }) => {
                self.acks.insert(ack.message_id.clone());
            }
            Some(Record::Report { report, .. }) => {
                self.reports
                    .insert((report.device_id.clone(), report.interval_start));
            }
            None => {}
        }
    }

    fn command(&self, c: &mut Command) {
        if let Some(newer) = self.commands.get(&c.message_id) {
            *c = newer.clone();
        }
    }

    fn patch_ack(&self, ctx: &mut AckContext, ack: &AckMsg) {
        ctx.seen |= self.acks.contains(&ack.message_id);
        match &mut ctx.target {
            AckTarget::Command { command, others } => {
                self.command(command);
                others.iter_mut().for_each(|c| self.command(c));
            }
            AckTarget::Control(control) => {
                if let Some(newer) = self.controls.get(&control.message_id) {
                    *control = newer.clone();
                }
            }
            AckTarget::Unknown => {}
        }
    }

    fn patch_report(&self, ctx: &mut ReportContext, report: &ReportMsg) {
        ctx.seen |= self
            .reports
            .contains(&(report.device_id.clone(), report.interval_start));
        ctx.commands.iter_mut().for_each(|c| self.command(c));
    }
}

fn cap(text: &mut Option<String>) {
    if let Some(t) = text
        && t.len() > TEXT_CAP
    {
        let mut end = TEXT_CAP;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
        t.push('…');
    }
}

/// An ack as kept: free text capped, and a sha256 too long to be one dropped.
fn capped_ack(ack: &AckMsg) -> AckMsg {
    let mut ack = ack.clone();
    cap(&mut ack.details);
    if ack.sha256.as_ref().is_some_and(|s| s.len() > 64) {
        ack.sha256 = None;
    }
    ack
}

/// A report as kept: free text capped.
fn capped_report(report: &ReportMsg) -> ReportMsg {
    let mut report = report.clone();
    cap(&mut report.error);
    report
}

/// The pause after a lost race (0-based attempt): 5 ms doubling to 320 ms, then up to twice
/// that at random, so two instances that collided do not collide again. Real time; short,
/// because the winner has already written and a read shows what it did.
const LOST_RACE: Backoff = Backoff::new(
    std::time::Duration::from_millis(5),
    std::time::Duration::from_millis(320),
)
.jitter(1.0, 2.0);

/// Sleeps the [`LOST_RACE`] pause for `attempt`.
async fn backoff(attempt: u32) {
    tokio::time::sleep(LOST_RACE.jittered(attempt, fastrand::f64())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_race_waits_5_ms_doubling_to_320_ms_and_up_to_double() {
        // 5 ms << attempt, as far as 320 ms; then up to double at random.
        for attempt in 0..12u32 {
            let base = std::time::Duration::from_millis(5 << attempt.min(6));
            assert_eq!(LOST_RACE.delay(attempt), base);
            assert_eq!(LOST_RACE.jittered(attempt, 0.0), base);
            assert_eq!(LOST_RACE.jittered(attempt, 1.0), base * 2);
        }
    }

    #[test]
    fn long_free_text_from_a_device_is_capped() {
        let mut text = Some("é".repeat(2000));
        cap(&mut text);
        let t = text.unwrap();
        assert!(t.len() <= TEXT_CAP + '…'.len_utf8());
        assert!(t.ends_with('…'));
        let mut short = Some("fine".to_owned());
        cap(&mut short);
        assert_eq!(short.as_deref(), Some("fine"));
    }
}
