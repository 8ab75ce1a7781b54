//! The PUBACKs we owe, in the order they must go. Pure bookkeeping, no I/O and no tokio.
//!
//! The broker expects PUBACKs in the order it sent the messages (rumqttd drops a client that
//! acks out of order), and a packet id means something only on the connection it came on: on
//! the next one the broker gives it to another message. So each received message gets a
//! ticket naming its connection and its place, and a PUBACK is released only once every
//! message before it on the same connection is handled.

use std::collections::VecDeque;

/// Where one received message stands in line.
#[derive(Debug)]
pub(crate) struct Ticket {
    connection: u64,
    seq: u64,
}

/// What became of a handled message's PUBACK.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Done {
    /// Released (with every handled one behind it that was waiting on it).
    Released,
    /// Waits for an earlier message of the same connection.
    Waiting,
    /// Its connection is gone: no PUBACK, its packet id would name another message now.
    Stale,
}

/// The PUBACKs of the current connection.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    connection: u64,
    /// Sequence number of `waiting[0]`.
    first_seq: u64,
    /// Messages not yet released, in arrival order: packet id, handled.
    waiting: VecDeque<(u16, bool)>,
    /// Released PUBACKs not yet taken by rumqttc's request queue, in order.
    ready: VecDeque<u16>,
    stale: u64,
}

impl Acks {
    /// A QoS 1 message with packet id `pkid` arrived on the current connection.
    pub(crate) fn arrived(&mut self, pkid: u16) -> Ticket {
        let seq = self.first_seq + self.waiting.len() as u64;
        self.waiting.push_back((pkid, false));
        Ticket {
            connection: self.connection,
            seq,
        }
    }

    /// The application is done with the message (handled, refused or dropped).
    pub(crate) fn done(&mut self, ticket: Ticket) -> Done {
        if ticket.connection != self.connection {
            self.stale += 1;
            return Done::Stale;
        }
        // A ticket is done once (it is consumed), so it is still waiting.
        let index = ticket.seq - self.first_seq;
        let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| self.waiting.get_mut(i))
        else {
            debug_assert!(false, "ticket {ticket:?} is not waiting");
            return Done::Stale;
        };
        entry.1 = true;
        if index != 0 {
            return Done::Waiting;
        }
        while let Some(&(pkid, true)) = self.waiting.front() {
            self.waiting.pop_front();
            self.first_seq += 1;
            self.ready.push_back(pkid);
        }
        Done::Released
    }

    /// The PUBACK to hand to rumqttc next, if one is released.
    pub(crate) fn next(&self) -> Option<u16> {
        self.ready.front().copied()
    }

    /// rumqttc's queue took the PUBACK [`Acks::next`] gave.
    pub(crate) fn handed(&mut self) {
        self.ready.pop_front();
    }

    /// The connection is gone: nothing owed on it can be sent any more.
    pub(crate) fn connection_lost(&mut self) {
        self.connection += 1;
        self.first_seq += self.waiting.len() as u64;
        self.waiting.clear();
        self.ready.clear();
    }

    /// Acks that were no-ops because their connection was gone.
    pub(crate) fn stale(&self) -> u64 {
        self.stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(acks: &mut Acks) -> Vec<u16> {
        let mut out = Vec::new();
        while let Some(pkid) = acks.next() {
            out.push(pkid);
            acks.handed();
        }
        out
    }

    #[test]
    fn pubacks_are_released_in_arrival_order() {
        let mut acks = Acks::default();
        let (t1, t2, t3) = (acks.arrived(1), acks.arrived(2), acks.arrived(3));
        assert_eq!(acks.done(t3), Done::Waiting);
        assert_eq!(released(&mut acks), Vec::<u16>::new());
        assert_eq!(acks.done(t1), Done::Released);
        assert_eq!(released(&mut acks), vec![1]);
        assert_eq!(acks.done(t2), Done::Released);
        assert_eq!(released(&mut acks), vec![2, 3]);
    }

    #[test]
    fn a_message_dropped_at_once_waits_behind_the_ones_before_it() {
        let mut acks = Acks::default();
        let held = acks.arrived(10);
        // The application's channel was full: done on arrival.
        let dropped = acks.arrived(11);
        assert_eq!(acks.done(dropped), Done::Waiting);
        assert_eq!(acks.next(), None);
        acks.done(held);
        assert_eq!(released(&mut acks), vec![10, 11]);
    }

    #[test]
    fn an_ack_from_an_earlier_connection_is_a_counted_no_op() {
        let mut acks = Acks::default();
        let old = acks.arrived(1);
        acks.connection_lost();
        // The broker gives packet id 1 to another message on the new connection.
        let new = acks.arrived(1);
        assert_eq!(acks.done(old), Done::Stale);
        assert_eq!(
            acks.next(),
            None,
            "the old ack would PUBACK the new message"
        );
        assert_eq!(acks.stale(), 1);
        assert_eq!(acks.done(new), Done::Released);
        assert_eq!(released(&mut acks), vec![1]);
    }

    #[test]
    fn a_new_connection_waits_for_nothing_left_from_the_old_one() {
        let mut acks = Acks::default();
        let _never_handled = acks.arrived(1);
        let handled = acks.arrived(2);
        acks.done(handled);
        acks.connection_lost();
        let t = acks.arrived(1);
        assert_eq!(acks.done(t), Done::Released);
        assert_eq!(released(&mut acks), vec![1]);
    }

    #[test]
    fn a_released_puback_rumqttc_has_not_taken_is_dropped_with_its_connection() {
        let mut acks = Acks::default();
        let t = acks.arrived(4);
        acks.done(t);
        // rumqttc's queue was full: the PUBACK is still ours when the connection drops.
        acks.connection_lost();
        assert_eq!(acks.next(), None);
    }
}
