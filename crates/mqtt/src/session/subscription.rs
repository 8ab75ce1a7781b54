//! Whether the subscription of the current connection is confirmed, and what to do when it
//! is not. Pure: the session task passes in the SUBACK's return codes and the time.
//!
//! ```text
//!  CONNACK ──▶ SUBSCRIBE queued ──SUBACK, every filter granted──▶ up (Event::Connected)
//!                  │   └──────────SUBACK refusing a filter (0x80)──▶ reconnect
//!                  ├── not queued (rumqttc's queue refused it) ───▶ reconnect
//!                  └── no SUBACK within the timeout ─────────────▶ reconnect
//! ```
//!
//! A connection whose subscription is not confirmed is never reported as connected: it would
//! be connected but deaf. Reconnecting (with the usual backoff) retries the subscription, so
//! a broker that refused for a passing reason (AWS IoT Core throttles SUBSCRIBEs with 0x80),
//! or a policy fixed meanwhile, heals without a restart.

use std::fmt;
use std::time::{Duration, Instant};

use rumqttc::SubscribeReasonCode;

/// Why a connection's subscription failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// rumqttc's request queue refused the SUBSCRIBE.
    NotQueued(String),
    /// No SUBACK came within the timeout.
    NoSubAck(Duration),
    /// The SUBACK refused these filters.
    Refused(Vec<String>),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotQueued(error) => write!(f, "the SUBSCRIBE could not be queued: {error}"),
            Failure::NoSubAck(timeout) => write!(
                f,
                "no SUBACK within {:.1} s of subscribing",
                timeout.as_secs_f64()
            ),
            Failure::Refused(filters) => write!(
                f,
                "the broker refused the subscription to {}",
                filters.join(", ")
            ),
        }
    }
}

/// What the session task must do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Queue a SUBSCRIBE for [`Subscription::filters`].
    Subscribe,
    /// The subscription is confirmed: the session is up.
    Up,
    /// Nothing yet.
    Wait,
    /// Drop the connection and connect again after the backoff.
    Reconnect(Failure),
}

#[derive(Debug)]
enum State {
    /// No connection, or one whose subscription failed.
    Down,
    /// SUBSCRIBE queued at `since`; its packet id once rumqttc has sent it.
    Awaiting {
        since: Instant,
        pkid: Option<u16>,
    },
    Up,
}

/// The subscription of the current connection.
#[derive(Debug)]
pub(crate) struct Subscription {
    filters: Vec<String>,
    timeout: Duration,
    state: State,
}

impl Subscription {
    pub(crate) fn new(filters: Vec<String>, timeout: Duration) -> Subscription {
        Subscription {
            filters,
            timeout,
            state: State::Down,
        }
    }

    pub(crate) fn filters(&self) -> &[String] {
        &self.filters
    }

    /// A connection was established (CONNACK) at `now`.
    pub(crate) fn connected(&mut self, now: Instant) -> Step {
        if self.filters.is_empty() {
            self.state = State::Up;
            return Step::Up;
        }
        self.state = State::Awaiting {
            since: now,
            pkid: None,
        };
        Step::Subscribe
    }

    /// rumqttc's queue refused the SUBSCRIBE.
    pub(crate) fn not_queued(&mut self, error: String) -> Step {
        self.state = State::Down;
        Step::Reconnect(Failure::NotQueued(error))
    }

    /// rumqttc sent the SUBSCRIBE with packet id `pkid`.
    pub(crate) fn sent(&mut self, pkid: u16) {
        if let State::Awaiting { pkid: sent, .. } = &mut self.state {
            *sent = Some(pkid);
        }
    }

    /// A SUBACK arrived: one return code per filter, in order.
    pub(crate) fn suback(&mut self, pkid: u16, codes: &[SubscribeReasonCode]) -> Step {
        match self.state {
            State::Awaiting { pkid: sent, .. } if sent.is_none_or(|sent| sent == pkid) => {}
            // Not an answer to this connection's SUBSCRIBE, or too late.
            _ => return Step::Wait,
        }
        // A filter without a code (a short SUBACK) was not granted either.
        let refused: Vec<String> = self
            .filters
            .iter()
            .enumerate()
            .filter(|(i, _)| !matches!(codes.get(*i), Some(SubscribeReasonCode::Success(_))))
            .map(|(_, filter)| filter.clone())
            .collect();
        if refused.is_empty() {
            self.state = State::Up;
            Step::Up
        } else {
            self.state = State::Down;
            Step::Reconnect(Failure::Refused(refused))
        }
    }

    /// Time has passed: `now` is at or after [`Subscription::deadline`].
    pub(crate) fn tick(&mut self, now: Instant) -> Step {
        match self.state {
            State::Awaiting { since, .. }
                if now.saturating_duration_since(since) >= self.timeout =>
            {
                self.state = State::Down;
                Step::Reconnect(Failure::NoSubAck(self.timeout))
            }
            _ => Step::Wait,
        }
    }

    /// When the SUBACK is overdue, while one is awaited.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Awaiting { since, .. } => Some(since + self.timeout),
            _ => None,
        }
    }

    /// The connection is gone.
    pub(crate) fn disconnected(&mut self) {
        self.state = State::Down;
    }
}

#[cfg(test)]
mod tests {
    use max300_protocol::clock::monotonic;
    use rumqttc::QoS;

    use super::*;

    const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn two_filters() -> Subscription {
        Subscription::new(
            vec!["max300/+/ack".into(), "max300/+/report".into()],
            TIMEOUT,
        )
    }

    /// Connected at `t0`, SUBSCRIBE sent with packet id 1.
    fn subscribing(t0: Instant) -> Subscription {
        let mut s = two_filters();
        assert_eq!(s.connected(t0), Step::Subscribe);
        s.sent(1);
        s
    }

    #[test]
    fn a_suback_granting_every_filter_is_up() {
        let mut s = subscribing(monotonic());
        assert_eq!(s.suback(1, &[GRANTED, GRANTED]), Step::Up);
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn a_refused_filter_means_reconnect_and_is_named() {
        let mut s = subscribing(monotonic());
        let step = s.suback(1, &[GRANTED, SubscribeReasonCode::Failure]);
        assert_eq!(
            step,
            Step::Reconnect(Failure::Refused(vec!["max300/+/report".into()]))
        );
        if let Step::Reconnect(failure) = step {
            assert_eq!(
                failure.to_string(),
                "the broker refused the subscription to max300/+/report"
            );
        }
        assert_eq!(s.deadline(), None, "nothing is awaited any more");
    }

    #[test]
    fn a_suback_with_too_few_codes_refuses_the_filters_it_leaves_out() {
        let mut s = subscribing(monotonic());
        assert_eq!(
            s.suback(1, &[GRANTED]),
            Step::Reconnect(Failure::Refused(vec!["max300/+/report".into()]))
        );
    }

    #[test]
    fn no_suback_within_the_timeout_means_reconnect() {
        let t0 = monotonic();
        let mut s = subscribing(t0);
        assert_eq!(s.deadline(), Some(t0 + TIMEOUT));
        assert_eq!(s.tick(t0 + TIMEOUT - Duration::from_millis(1)), Step::Wait);
        let step = s.tick(t0 + TIMEOUT);
        assert_eq!(step, Step::Reconnect(Failure::NoSubAck(TIMEOUT)));
        assert_eq!(s.deadline(), None);
        // A SUBACK that comes after all is too late: the connection is being dropped.
        assert_eq!(s.suback(1, &[GRANTED, GRANTED]), Step::Wait);
    }

    #[test]
    fn a_subscribe_that_cannot_be_queued_means_reconnect() {
        let mut s = two_filters();
        assert_eq!(s.connected(monotonic()), Step::Subscribe);
        assert_eq!(
            s.not_queued("queue full".into()),
            Step::Reconnect(Failure::NotQueued("queue full".into()))
        );
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn a_suback_for_another_packet_id_is_not_ours() {
        let t0 = monotonic();
        let mut s = subscribing(t0);
        assert_eq!(s.suback(9, &[GRANTED, GRANTED]), Step::Wait);
        assert_eq!(s.deadline(), Some(t0 + TIMEOUT), "still awaited");
        assert_eq!(s.suback(1, &[GRANTED, GRANTED]), Step::Up);
    }

    #[test]
    fn without_filters_a_connection_is_up_at_once() {
        let mut s = Subscription::new(Vec::new(), TIMEOUT);
        assert_eq!(s.connected(monotonic()), Step::Up);
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn a_lost_connection_awaits_nothing_and_the_next_one_starts_the_clock_again() {
        let t0 = monotonic();
        let mut s = subscribing(t0);
        s.disconnected();
        assert_eq!(s.deadline(), None);
        assert_eq!(s.tick(t0 + TIMEOUT * 2), Step::Wait);
        let t1 = t0 + TIMEOUT * 3;
        assert_eq!(s.connected(t1), Step::Subscribe);
        assert_eq!(s.deadline(), Some(t1 + TIMEOUT));
    }
}
