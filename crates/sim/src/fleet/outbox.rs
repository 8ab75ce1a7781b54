//! A simulated device's outbox: every ack and report it sends, kept by seq until a receipt
//! for its store names it, and sent again when none comes, as the agent's store keeps them.
//! Pure: the caller passes the real instant.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use max300_protocol::{Channel, StoreId};

/// One message waiting for its receipt.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Its seq in the device's store.
    pub seq: u64,
    /// Ack or report: the topic it goes to.
    pub channel: Channel,
    /// The encoded message, sent again as it is.
    pub payload: Box<[u8]>,
    /// The boundary whose report it is (for the per-boundary tallies); `None` for an ack or a
    /// report made outside a boundary tick.
    pub boundary: Option<Timestamp>,
    /// When it was last handed to the session; `None` while never sent.
    sent_at: Option<Instant>,
}

impl Entry {
    /// Whether it was handed to the session before: sending it now is a resend.
    pub fn was_sent(&self) -> bool {
        self.sent_at.is_some()
    }
}

/// The entries of one store, oldest first.
#[derive(Debug)]
pub struct Outbox {
    store_id: StoreId,
    last_seq: u64,
    entries: VecDeque<Entry>,
}

impl Outbox {
    /// An empty outbox of a store made now.
    pub fn new(store_id: StoreId) -> Outbox {
        Outbox {
            store_id,
            last_seq: 0,
            entries: VecDeque::new(),
        }
    }

    /// The store its entries belong to.
    pub fn store_id(&self) -> &StoreId {
        &self.store_id
    }

    /// The seq the next entry gets (seqs increase within the store, from 1).
    pub fn next_seq(&self) -> u64 {
        self.last_seq + 1
    }

    /// Keeps a message stamped with [`Outbox::next_seq`], not yet sent.
    pub fn push(&mut self, channel: Channel, payload: Vec<u8>, boundary: Option<Timestamp>) -> u64 {
        self.last_seq += 1;
        self.entries.push_back(Entry {
            seq: self.last_seq,
            channel,
            payload: payload.into_boxed_slice(),
            boundary,
            sent_at: None,
        });
        self.last_seq
    }

    /// How many entries wait for a receipt (a heartbeat's `outbox`).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every entry is receipted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes the entries a receipt names and returns them; a receipt for another store (a
    /// device's earlier life) removes nothing.
    pub fn receipt(&mut self, store_id: &StoreId, seqs: &[u64]) -> Vec<Entry> {
        if store_id != &self.store_id {
            return Vec::new();
        }
        let mut removed = Vec::new();
        self.entries.retain(|e| {
            let named = seqs.contains(&e.seq);
            if named {
                removed.push(e.clone());
            }
            !named
        });
        removed
    }

    /// Up to `limit` entries, oldest first, never sent or last sent at least `older_than`
    /// before `now`: what the agent's resend sends (`older_than` zero on a reconnect).
    pub fn due(&self, now: Instant, older_than: Duration, limit: usize) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|e| e.sent_at.is_none_or(|at| at + older_than <= now))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Notes that entry `seq` was handed to the session at `now`.
    pub fn mark_sent(&mut self, seq: u64, now: Instant) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.seq == seq) {
            e.sent_at = Some(now);
        }
    }

    /// When the next entry comes due for a resend after `older_than`; `None` when empty.
    pub fn next_due(&self, older_than: Duration) -> Option<Instant> {
        self.entries
            .iter()
            .map(|e| e.sent_at.map(|at| at + older_than))
            .min_by(|a, b| match (a, b) {
                // Never sent: due at once, before any sent one.
                (None, _) => std::cmp::Ordering::Less,
                (_, None) => std::cmp::Ordering::Greater,
                (Some(a), Some(b)) => a.cmp(b),
            })
            .map(|at| at.unwrap_or_else(max300_protocol::clock::monotonic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use max300_protocol::clock::monotonic;

    fn outbox() -> Outbox {
        Outbox::new(StoreId::parse("store-a").unwrap())
    }

    #[test]
    fn seqs_increase_from_one_and_a_receipt_removes_only_what_it_names() {
        let mut out = outbox();
        assert_eq!(out.next_seq(), 1);
        for _ in 0..3 {
            out.push(Channel::Report, b"r".to_vec(), None);
        }
        assert_eq!(out.next_seq(), 4);
        let store = out.store_id().clone();
        let removed = out.receipt(&store, &[1, 3, 9]);
        assert_eq!(removed.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(out.len(), 1);
        let other = StoreId::parse("store-b").unwrap();
        assert!(
            out.receipt(&other, &[2]).is_empty(),
            "another store's receipt"
        );
        assert_eq!(out.len(), 1);
        out.receipt(&store, &[2]);
        assert!(out.is_empty());
        assert_eq!(out.next_seq(), 4, "seqs are never reused");
    }

    #[test]
    fn an_entry_is_due_when_never_sent_or_sent_longer_ago_than_the_timeout() {
        let mut out = outbox();
        let t0 = monotonic();
        let after = Duration::from_secs(10);
        let a = out.push(Channel::Ack, b"a".to_vec(), None);
        let b = out.push(Channel::Report, b"b".to_vec(), None);
        out.mark_sent(a, t0);
        let due = out.due(t0, after, 100);
        assert_eq!(due.iter().map(|e| e.seq).collect::<Vec<_>>(), [b]);
        assert_eq!(out.next_due(after).map(|at| at <= monotonic()), Some(true));
        out.mark_sent(b, t0 + Duration::from_secs(1));
        assert!(out.due(t0 + Duration::from_secs(9), after, 100).is_empty());
        assert_eq!(out.next_due(after), Some(t0 + after));
        let due = out.due(t0 + after, after, 100);
        assert_eq!(due.iter().map(|e| e.seq).collect::<Vec<_>>(), [a]);
        // A reconnect sends everything, a batch at a time.
        assert_eq!(out.due(t0, Duration::ZERO, 1).len(), 1);
        assert_eq!(out.due(t0 + after, Duration::ZERO, 100).len(), 2);
    }
}
