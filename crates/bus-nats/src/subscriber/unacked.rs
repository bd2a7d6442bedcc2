//! Messages delivered and not acknowledged yet, and the order their acknowledgements go out in.
//!
//! A successor (a standby taking over after a crash, a group member taking a dead member's
//! partition, this subscription after a restart of delivery) gets every message that was not
//! acknowledged again, from the ack floor + 1, in stream order; on a work-queue stream an
//! acknowledged message is gone. A record batch holds events of many aggregates and is
//! acknowledged when the last of them is handled, so a later batch could be acknowledged (and
//! removed) while an earlier one holding an older event of one of its aggregates is still
//! pending: after a crash the successor would handle that older event again, after the newer
//! one. So one rule decides when an acknowledgement is sent:
//!
//! **A message is acknowledged (or terminated) only once every earlier message that holds an
//! event of one of its aggregates has been.**
//!
//! Then, for every aggregate, the messages holding its events that are still unacknowledged
//! are the last ones of the aggregate, and a successor replays, per aggregate, a contiguous run
//! that ends where the last owner stopped, followed by what is new. A message of one event
//! waits for nothing it would not wait for anyway (its aggregate's earlier events were handled
//! before it); a record batch waits for the batches before it that share an aggregate.
//!
//! Each message is linked to the latest earlier unacknowledged message of each of its
//! aggregates (its *predecessors*); it is released when it is settled and none is left.
//! Aggregates are told apart by a 64-bit hash of their key: two keys with the same hash only
//! make a message wait longer, never shorter.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::Subject;

use crate::prehashed::PrehashedMap;

/// What a settled message is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckKind {
    /// `+ACK`: handled.
    Ack,
    /// `+TERM`: never deliver it again (its dead letter is stored).
    Term,
}

/// How a message's handling ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// To be acknowledged with `kind` once its predecessors are.
    Done(AckKind),
    /// Left unacknowledged, to be delivered again (a failure returned at close, a dead letter
    /// that could not be stored, a record batch with an event not handled).
    Returned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Queued or running.
    Pending,
    /// Settled; its acknowledgement waits for its predecessors.
    Held(AckKind),
    /// To be delivered again; its successors wait for it.
    Returned,
}

#[derive(Debug)]
struct Entry {
    reply: Option<Subject>,
    /// When it was delivered (or delivered again after being returned).
    since: Instant,
    state: State,
    /// Events it holds (a record batch holds several), counted once linked.
    events: usize,
    /// The hashes of its aggregates, distinct; `None` until linked.
    keys: Option<Vec<u64>>,
    /// Predecessors not acknowledged yet.
    waiting_on: u32,
    /// Later messages that have this one among their predecessors.
    successors: Vec<u64>,
    /// Delivered before the subscription lost the topic: settled without an acknowledgement
    /// (the new owner has it delivered again).
    orphan: bool,
}

/// Every message of a subscription delivered and not acknowledged, by stream sequence.
#[derive(Debug, Default)]
pub(crate) struct Unacked {
    entries: HashMap<u64, Entry, ahash::RandomState>,
    /// Per aggregate hash: the latest unacknowledged message holding one of its events. Keyed
    /// by the hash itself: it is `hasher`'s output already, and hashing it again cost a second
    /// hash per event on each side.
    tails: PrehashedMap<u64>,
    hasher: ahash::RandomState,
    /// Events held by linked entries.
    events: usize,
    /// Entries queued or running.
    pending: usize,
    /// Entries settled whose acknowledgement waits.
    held: usize,
}

/// What happened to a message delivered again while the subscription still knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Again {
    /// It was returned: hand it to the handler again.
    Handle,
    /// It is queued, running, or handled and waiting for its acknowledgement: a copy.
    Copy,
}

impl Unacked {
    /// Starts tracking a message that was just delivered.
    pub(crate) fn insert(&mut self, sequence: u64, reply: Option<Subject>) {
        let entry = Entry {
            reply,
            since: Instant::now(),
            state: State::Pending,
            events: 0,
            keys: None,
            waiting_on: 0,
            successors: Vec::new(),
            orphan: false,
        };
        if self.entries.insert(sequence, entry).is_none() {
            self.pending += 1;
        }
    }

    /// A message this subscription knows was delivered again: its newest ack subject is kept.
    /// `None` if it is not tracked.
    pub(crate) fn delivered_again(
        &mut self,
        sequence: u64,
        reply: Option<Subject>,
    ) -> Option<Again> {
        let entry = self.entries.get_mut(&sequence)?;
        if reply.is_some() {
            entry.reply = reply;
        }
        if entry.state == State::Returned && !entry.orphan {
            entry.state = State::Pending;
            entry.since = Instant::now();
            self.pending += 1;
            Some(Again::Handle)
        } else {
            Some(Again::Copy)
        }
    }

    /// Records the aggregates of a tracked message's `events` events, in order, before any of
    /// them can settle, and links it behind the latest unacknowledged message of each. Done
    /// once per message: a message delivered again keeps its place.
    pub(crate) fn link<'a>(
        &mut self,
        sequence: u64,
        keys: impl IntoIterator<Item = &'a [u8]>,
        events: usize,
    ) {
        match self.entries.get(&sequence) {
            Some(entry) if entry.keys.is_none() && !entry.orphan => {}
            _ => return,
        }
        let keys = keys.into_iter();
        let mut hashes = Vec::with_capacity(keys.size_hint().0);
        let mut predecessors: Vec<u64> = Vec::new();
        for key in keys {
            let hash = self.hasher.hash_one(key);
            match self.tails.insert(hash, sequence) {
                Some(previous) if previous == sequence => continue,
                Some(previous) if !predecessors.contains(&previous) => predecessors.push(previous),
                _ => {}
            }
            hashes.push(hash);
        }
        let mut waiting_on = 0;
        for previous in predecessors {
            if let Some(before) = self.entries.get_mut(&previous) {
                before.successors.push(sequence);
                waiting_on += 1;
            }
        }
        let entry = self.entries.get_mut(&sequence).expect("checked above");
        entry.keys = Some(hashes);
        entry.waiting_on = waiting_on;
        entry.events = events;
        self.events += events;
    }

    /// A tracked message's handling ended. Appends to `ready` every acknowledgement that may go
    /// out now, in an order that keeps the rule: this message's and those of successors that
    /// were only waiting for it. Returns whether the message was tracked and pending.
    pub(crate) fn settle(
        &mut self,
        sequence: u64,
        how: Settled,
        ready: &mut Vec<(u64, Option<Subject>, AckKind)>,
    ) -> bool {
        let Some(entry) = self.entries.get_mut(&sequence) else {
            return false;
        };
        if entry.state != State::Pending {
            return false;
        }
        self.pending -= 1;
        if entry.orphan {
            self.remove(sequence);
            return true;
        }
        match how {
            Settled::Returned => entry.state = State::Returned,
            Settled::Done(kind) if entry.waiting_on > 0 => {
                entry.state = State::Held(kind);
                self.held += 1;
            }
            Settled::Done(kind) => {
                entry.state = State::Held(kind);
                self.held += 1;
                self.release_from(sequence, ready);
            }
        }
        true
    }

    /// Releases `first` (settled, waiting for nothing) and every successor that becomes free.
    fn release_from(&mut self, first: u64, ready: &mut Vec<(u64, Option<Subject>, AckKind)>) {
        let mut free = vec![first];
        while let Some(sequence) = free.pop() {
            let Some(entry) = self.remove(sequence) else {
                continue;
            };
            let State::Held(kind) = entry.state else {
                unreachable!("only settled entries are released")
            };
            self.held -= 1;
            ready.push((sequence, entry.reply, kind));
            for successor in entry.successors {
                if let Some(next) = self.entries.get_mut(&successor) {
                    next.waiting_on -= 1;
                    if next.waiting_on == 0 && matches!(next.state, State::Held(_)) {
                        free.push(successor);
                    }
                }
            }
        }
    }

    /// Stops tracking a message; its aggregates' tails that still point at it are cleared.
    fn remove(&mut self, sequence: u64) -> Option<Entry> {
        let entry = self.entries.remove(&sequence)?;
        self.events -= entry.events;
        if let Some(keys) = &entry.keys {
            for hash in keys {
                // One lookup, not a look and a removal.
                if let std::collections::hash_map::Entry::Occupied(tail) = self.tails.entry(*hash) {
                    if *tail.get() == sequence {
                        tail.remove();
                    }
                }
            }
        }
        Some(entry)
    }

    /// The subscription lost the topic: nothing it was given is acknowledged any more. Settled
    /// and returned messages are forgotten; those still queued or running become orphans,
    /// forgotten as they settle.
    pub(crate) fn abandon(&mut self) {
        self.entries.retain(|_, e| e.state == State::Pending);
        self.tails.clear();
        self.events = 0;
        self.held = 0;
        for entry in self.entries.values_mut() {
            entry.orphan = true;
            entry.keys = None;
            entry.events = 0;
            entry.waiting_on = 0;
            entry.successors.clear();
        }
    }

    /// Ack subjects of the messages delivered at least `age` ago and not returned: queued,
    /// running, or waiting for their acknowledgement.
    pub(crate) fn older_than(&self, age: Duration) -> Vec<Subject> {
        self.entries
            .values()
            .filter(|e| e.state != State::Returned && e.since.elapsed() >= age)
            .filter_map(|e| e.reply.clone())
            .collect()
    }

    /// Messages not acknowledged.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Messages queued or running.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Messages handled whose acknowledgement waits for an earlier one.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Events in the messages not acknowledged.
    pub(crate) fn events(&self) -> usize {
        self.events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn settle(u: &mut Unacked, sequence: u64) -> Vec<u64> {
        let mut ready = Vec::new();
        assert!(u.settle(sequence, Settled::Done(AckKind::Ack), &mut ready));
        ready.into_iter().map(|(s, _, _)| s).collect()
    }

    fn deliver(u: &mut Unacked, sequence: u64, keys: &[&str]) {
        u.insert(sequence, None);
        u.link(sequence, keys.iter().map(|k| k.as_bytes()), keys.len());
    }

    #[test]
    fn a_batch_waits_for_an_earlier_one_sharing_an_aggregate() {
        let mut u = Unacked::default();
        deliver(&mut u, 1, &["a", "b"]);
        deliver(&mut u, 2, &["b", "c"]);
        deliver(&mut u, 3, &["d"]);
        assert_eq!(
            settle(&mut u, 2),
            Vec::<u64>::new(),
            "b is still pending in 1"
        );
        assert_eq!(u.held(), 1);
        assert_eq!(settle(&mut u, 3), vec![3], "d shares nothing");
        assert_eq!(settle(&mut u, 1), vec![1, 2]);
        assert_eq!((u.len(), u.held(), u.pending(), u.events()), (0, 0, 0, 0));
    }

    #[test]
    fn a_returned_message_holds_its_successors_until_handled_again() {
        let mut u = Unacked::default();
        deliver(&mut u, 1, &["a", "b"]);
        deliver(&mut u, 2, &["b"]);
        let mut ready = Vec::new();
        assert!(u.settle(1, Settled::Returned, &mut ready));
        assert_eq!(settle(&mut u, 2), Vec::<u64>::new());
        assert_eq!(u.delivered_again(2, None), Some(Again::Copy));
        assert_eq!(u.delivered_again(1, None), Some(Again::Handle));
        // Linked again: a no-op, it keeps its place.
        u.link(1, [b"a".as_slice(), b"b"], 2);
        assert_eq!(settle(&mut u, 1), vec![1, 2]);
        assert_eq!(u.events(), 0);
    }

    #[test]
    fn abandoned_messages_are_never_acknowledged() {
        let mut u = Unacked::default();
        deliver(&mut u, 1, &["a"]);
        deliver(&mut u, 2, &["a"]);
        assert_eq!(settle(&mut u, 2), Vec::<u64>::new());
        u.abandon();
        assert_eq!((u.len(), u.pending()), (1, 1));
        assert_eq!(settle(&mut u, 1), Vec::<u64>::new());
        assert_eq!(u.len(), 0);
    }

    #[derive(Debug, Clone)]
    struct Plan {
        /// Per message, the aggregates of its events.
        messages: Vec<Vec<u8>>,
        /// Which message settles next (an index among those not settled).
        choices: Vec<usize>,
        /// Messages returned the first time they settle, then delivered again later.
        returned: HashSet<usize>,
    }

    fn plans() -> impl Strategy<Value = Plan> {
        (1usize..30)
            .prop_flat_map(|n| {
                (
                    proptest::collection::vec(proptest::collection::vec(0u8..6, 1..5), n),
                    proptest::collection::vec(0usize..64, 0..80),
                    proptest::collection::hash_set(0..n, 0..4),
                )
            })
            .prop_map(|(messages, choices, returned)| Plan {
                messages,
                choices,
                returned,
            })
    }

    const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    proptest! {
        /// Messages settle in any order; some are returned and delivered again later. Whatever
        /// the order, acknowledgements come out per aggregate in stream order (so each only
        /// after every earlier message of its aggregates), and once everything settled,
        /// everything is acknowledged exactly once.
        #[test]
        fn acknowledgements_keep_per_aggregate_stream_order(plan in plans()) {
            let mut u = Unacked::default();
            for (m, keys) in plan.messages.iter().enumerate() {
                let sequence = m as u64 + 1;
                u.insert(sequence, None);
                u.link(sequence, keys.iter().map(|k| NAMES[*k as usize].as_bytes()), keys.len());
            }
            let mut unsettled: Vec<usize> = (0..plan.messages.len()).collect();
            let mut returned_once: HashSet<usize> = HashSet::new();
            let mut acked: Vec<u64> = Vec::new();
            let mut choices = plan.choices.iter().copied().chain(std::iter::repeat(0));
            while !unsettled.is_empty() {
                let m = unsettled.remove(choices.next().unwrap() % unsettled.len());
                let sequence = m as u64 + 1;
                let mut ready = Vec::new();
                if plan.returned.contains(&m) && returned_once.insert(m) {
                    prop_assert!(u.settle(sequence, Settled::Returned, &mut ready));
                    prop_assert!(ready.is_empty());
                    prop_assert_eq!(u.delivered_again(sequence, None), Some(Again::Handle));
                    // Linking again changes nothing; it settles later.
                    u.link(sequence, plan.messages[m].iter().map(|k| NAMES[*k as usize].as_bytes()), 99);
                    unsettled.push(m);
                } else {
                    prop_assert!(u.settle(sequence, Settled::Done(AckKind::Ack), &mut ready));
                }
                acked.extend(ready.into_iter().map(|(s, _, _)| s));
            }
            let mut sorted = acked.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (1..=plan.messages.len() as u64).collect::<Vec<_>>());
            prop_assert_eq!((u.len(), u.held(), u.pending(), u.events()), (0, 0, 0, 0));
            for k in 0u8..6 {
                let holding: Vec<u64> = acked
                    .iter()
                    .copied()
                    .filter(|s| plan.messages[*s as usize - 1].contains(&k))
                    .collect();
                let mut in_order = holding.clone();
                in_order.sort_unstable();
                prop_assert_eq!(holding, in_order, "aggregate {}", k);
            }
        }
    }
}
