//! A control message (an operator's cancel) and what each event does to it: published until
//! its device acks it, or until the date of the plan it cancels is over.

use jiff::Timestamp;
use max300_protocol::message::{AckStatus, ControlAction, ControlMsg, V1};
use max300_protocol::{DeviceId, MessageId};

use super::CommandState;
use super::command::Command;
use super::policy::Policy;

/// A control message as the lifecycle sees it. Its state is `created`, `sent`,
/// `acknowledged` or `rejected`.
#[derive(Clone, Debug, PartialEq)]
pub struct Control {
    /// Its id.
    pub message_id: MessageId,
    /// The device.
    pub device_id: DeviceId,
    /// The command it cancels.
    pub target: MessageId,
    /// Where it is.
    pub state: CommandState,
    /// When it was made.
    pub created_at: Timestamp,
    /// The end of its target's date: no use sending it after that.
    pub ends_at: Timestamp,
    /// Times published.
    pub publishes: u32,
    /// Times a publish was tried.
    pub attempts: u32,
    /// When it was last published.
    pub last_sent_at: Option<Timestamp>,
    /// When to try publishing again, while it waits for an ack.
    pub retry_at: Option<Timestamp>,
    /// The store's revision of it, as for a command.
    pub rev: u64,
}

impl Control {
    /// A cancel of `target`, made at `at`.
    pub fn cancel(
        target: &Command,
        message_id: MessageId,
        at: Timestamp,
        policy: &Policy,
    ) -> Control {
        Control {
            message_id,
            device_id: target.device_id().clone(),
            target: target.message_id.clone(),
            state: CommandState::Created,
            created_at: at,
            ends_at: target.ends_at(),
            publishes: 0,
            // Whoever makes it publishes it at once: that is its first try.
            attempts: 1,
            last_sent_at: None,
            retry_at: Some(at + policy.resend_delay(1)),
            rev: 0,
        }
    }

    /// The message that carries it.
    pub fn message(&self) -> ControlMsg {
        ControlMsg {
            v: V1,
            message_id: self.message_id.clone(),
            device_id: self.device_id.clone(),
            action: ControlAction::Cancel,
            target_message_id: self.target.clone(),
            issued_at: self.created_at,
            traceparent: None,
        }
    }

    /// Whether it may be published at `now`.
    pub fn publishable(&self, now: Timestamp) -> bool {
        self.state.awaits_ack() && now < self.ends_at
    }

    /// When the clock next has something to do to it: publish it again, or give up.
    pub fn wake_at(&self) -> Option<Timestamp> {
        if !self.state.awaits_ack() {
            return None;
        }
        self.retry_at.map(|at| at.min(self.ends_at))
    }

    /// A publish of it went out at `at`.
    pub fn published(&self, at: Timestamp, policy: &Policy) -> Control {
        let mut c = self.clone();
        c.publishes += 1;
        c.attempts = c.attempts.max(c.publishes);
        c.last_sent_at = Some(at);
        if c.state == CommandState::Created {
            c.state = CommandState::Sent;
        }
        if c.state.awaits_ack() {
            c.retry_at = Some(at + policy.resend_delay(c.attempts));
        }
        c
    }

    /// Its device's answer.
    pub(super) fn acked(&self, status: AckStatus) -> Control {
        let mut c = self.clone();
        if c.state.awaits_ack() {
            c.state = match status {
                AckStatus::Accepted => CommandState::Acknowledged,
                AckStatus::Rejected => CommandState::Rejected,
            };
            c.retry_at = None;
        }
        c
    }

    /// The clock reached `now`: the control after it, and whether to publish it again now;
    /// `None` when nothing changes.
    pub fn tick(&self, now: Timestamp, policy: &Policy) -> Option<(Control, bool)> {
        if self.wake_at().is_none_or(|at| at > now) {
            return None;
        }
        let mut c = self.clone();
        if now >= self.ends_at {
            c.retry_at = None;
            return Some((c, false));
        }
        c.attempts += 1;
        c.retry_at = Some(now + policy.resend_delay(c.attempts));
        Some((c, true))
    }
}
