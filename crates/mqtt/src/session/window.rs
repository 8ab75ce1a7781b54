//! The window of our own QoS 1 publishes: how many may sit in rumqttc's request queue or await
//! the broker's PUBACK at once. Pure bookkeeping, no I/O and no tokio, fed by what the session
//! task sees (as rumqttc's own `MqttState` is).

use std::collections::BTreeSet;

/// Slots for QoS 1 publishes. Every slot is in exactly one place:
///
/// ```text
///            try_take              sent(pkid)                acked(pkid)
///   free ───────────────▶ queued ─────────────▶ in flight ───────────────▶ free
///     ▲                     │  give_back (never reached rumqttc)            │
///     ├─────────────────────┘  connection_lost: drained from the queue      │
///     └─────────────────────────────────────────────────────────────────────┘
///                              connection_lost: everything in flight
/// ```
///
/// so `free + queued + in flight == capacity` always holds, and a move from an empty place is a
/// no-op: a slot is never made up nor lost, whatever order the reports come in.
#[derive(Debug)]
pub(crate) struct Window {
    capacity: usize,
    free: usize,
    /// Taken for a publish that is being handed to rumqttc or waits in its request queue.
    queued: usize,
    /// Packet ids written on the current connection, awaiting their PUBACK.
    in_flight: BTreeSet<u16>,
}

impl Window {
    pub(crate) fn new(capacity: usize) -> Window {
        Window {
            capacity,
            free: capacity,
            queued: 0,
            in_flight: BTreeSet::new(),
        }
    }

    /// Takes a slot for a publish about to be handed to rumqttc; `false` if none is free.
    pub(crate) fn try_take(&mut self) -> bool {
        if self.free == 0 {
            return false;
        }
        self.free -= 1;
        self.queued += 1;
        true
    }

    /// The publish never reached rumqttc (its queue refused it, or the wait timed out).
    pub(crate) fn give_back(&mut self) {
        if self.queued > 0 {
            self.queued -= 1;
            self.free += 1;
        }
    }

    /// rumqttc wrote a QoS 1 publish with this packet id on the connection. Slots are not
    /// told apart while queued: whichever publish goes out, one queued slot moves.
    pub(crate) fn sent(&mut self, pkid: u16) {
        if self.queued > 0 && self.in_flight.insert(pkid) {
            self.queued -= 1;
        }
    }

    /// The broker acknowledged `pkid`; `true` if that freed a slot.
    pub(crate) fn acked(&mut self, pkid: u16) -> bool {
        let freed = self.in_flight.remove(&pkid);
        if freed {
            self.free += 1;
        }
        freed
    }

    /// The connection is gone, and with it every publish in flight on it: their PUBACKs will
    /// never come. `drained` publishes were taken out of rumqttc's queue with it and will never
    /// be sent; the ones still queued go out on the next connection. Returns the slots freed.
    pub(crate) fn connection_lost(&mut self, drained: usize) -> usize {
        let drained = drained.min(self.queued);
        let freed = self.in_flight.len() + drained;
        self.in_flight.clear();
        self.queued -= drained;
        self.free += freed;
        debug_assert_eq!(
            self.free + self.queued + self.in_flight.len(),
            self.capacity
        );
        freed
    }

    /// Slots free now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.free
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// rumqttc and the broker as the window sees them: a FIFO request queue, packet ids given
    /// out in turn, PUBACKs in order.
    struct Model {
        window: Window,
        rng: fastrand::Rng,
        /// Publishes in rumqttc's request queue.
        queue: usize,
        /// Packet ids sent on the current connection and not yet acknowledged.
        on_the_wire: VecDeque<u16>,
        last_pkid: u16,
    }

    impl Model {
        fn new(seed: u64) -> Model {
            Model {
                window: Window::new(80),
                rng: fastrand::Rng::with_seed(seed),
                queue: 0,
                on_the_wire: VecDeque::new(),
                last_pkid: 0,
            }
        }

        /// One `Session::publish`: a slot, then the hand-off, which may fail or time out.
        fn publish(&mut self) {
            if !self.window.try_take() {
                // Waited for a slot and timed out: nothing was taken.
                return;
            }
            match self.rng.u8(0..10) {
                0 => self.window.give_back(), // the client refused it
                1 => self.window.give_back(), // timed out waiting for room in the queue
                _ => self.queue += 1,
            }
        }

        fn rumqttc_sends_one(&mut self) {
            if self.queue > 0 {
                self.queue -= 1;
                self.last_pkid = self.last_pkid % 100 + 1;
                self.on_the_wire.push_back(self.last_pkid);
                self.window.sent(self.last_pkid);
            }
        }

        fn broker_acks_one(&mut self) {
            if let Some(pkid) = self.on_the_wire.pop_front() {
                assert!(
                    self.window.acked(pkid),
                    "the PUBACK of {pkid} freed no slot"
                );
            }
        }

        /// The connection drops: what is on the wire is gone, and rumqttc drains its queue,
        /// except the publishes that enter it after the drain (they go on the next connection).
        fn connection_lost(&mut self) {
            let late = self.rng.usize(0..=self.queue);
            let drained = self.queue - late;
            self.on_the_wire.clear();
            self.queue = late;
            self.window.connection_lost(drained);
        }

        /// What really waits on rumqttc: queued or unacknowledged.
        fn outstanding(&self) -> usize {
            self.queue + self.on_the_wire.len()
        }

        fn check(&self) {
            let w = &self.window;
            assert_eq!(
                w.free + w.queued + w.in_flight.len(),
                80,
                "a slot was made up or lost"
            );
            assert!(
                self.outstanding() <= 80,
                "{} outstanding",
                self.outstanding()
            );
            assert_eq!(
                self.window.free(),
                80 - self.outstanding(),
                "the window's count differs from what is outstanding"
            );
        }
    }

    #[test]
    fn ten_thousand_publishes_with_timeouts_failures_and_reconnects_leave_the_window_whole() {
        for seed in 0..5 {
            let mut m = Model::new(seed);
            for _ in 0..10_000 {
                m.publish();
                for _ in 0..m.rng.usize(0..3) {
                    m.rumqttc_sends_one();
                }
                for _ in 0..m.rng.usize(0..3) {
                    m.broker_acks_one();
                }
                if m.rng.u16(0..500) == 0 {
                    m.connection_lost();
                }
                m.check();
            }
            while m.queue > 0 {
                m.rumqttc_sends_one();
            }
            while !m.on_the_wire.is_empty() {
                m.broker_acks_one();
            }
            m.check();
            assert_eq!(m.window.free(), 80, "seed {seed}: the window is not whole");
        }
    }

    #[test]
    fn a_publish_that_never_reached_rumqttc_gives_its_slot_back() {
        let mut w = Window::new(2);
        assert!(w.try_take());
        assert!(w.try_take());
        assert!(!w.try_take(), "both slots are taken");
        w.give_back();
        assert_eq!(w.free(), 1);
        assert!(w.try_take());
    }

    #[test]
    fn a_reconnect_frees_what_was_in_flight_and_drained_but_not_what_is_still_queued() {
        let mut w = Window::new(10);
        for _ in 0..6 {
            assert!(w.try_take());
        }
        w.sent(1);
        w.sent(2);
        // Two in flight, four queued: two of those drained with the connection, two entered
        // the queue after the drain and will go out on the next connection.
        assert_eq!(w.connection_lost(2), 4);
        assert_eq!(w.free(), 8);
        w.sent(1);
        w.sent(2);
        assert!(w.acked(1));
        assert!(w.acked(2));
        assert_eq!(w.free(), 10);
    }

    #[test]
    fn an_ack_for_a_packet_id_not_in_flight_frees_nothing() {
        let mut w = Window::new(3);
        assert!(w.try_take());
        w.sent(7);
        assert!(!w.acked(8));
        assert_eq!(w.free(), 2);
        assert!(w.acked(7));
        assert!(!w.acked(7), "a second PUBACK for 7");
        assert_eq!(w.free(), 3);
    }
}
