//! Record batches: where the batched publishes to one subject wait, and how a batch is cut.

use super::*;

/// Where the batched publishes to one subject (a topic, or one partition of it) wait.
pub(super) struct Lane {
    pub(super) subject: Subject,
    /// The batching limits, `max_bytes` cut to what the server's `max_payload` allows.
    pub(super) limits: BatchConfig,
    pub(super) state: Mutex<LaneState>,
}

/// The publishes of a lane that wait, and the aggregate chains in it.
///
/// Invariant: while a chain's publishes are in a batch in flight, none of its later publishes
/// is in `pending` (they are in the chain's `waiting`), so two batches in flight never hold
/// the same aggregate, and a chain's next batch is cut only after its previous one is stored.
///
/// A chain's publishes in `pending` are linked from one to the next by their positions, so
/// that those a cut leaves behind are moved to the chain's `waiting` without looking at the
/// rest: the place each leaves in `pending` stays empty until it reaches the front. (A scan of
/// all of `pending` at each such cut made publishing quadratic in the window: with 40 000
/// publishes in flight, 62 % of the bus's time went to it.)
#[derive(Default)]
pub(super) struct LaneState {
    /// Publishes waiting to be packed, in publish order, with gaps where one was moved to its
    /// chain's `waiting`; never a gap at the front.
    pending: VecDeque<Pending>,
    /// The position of `pending`'s front: positions count every publish ever put in
    /// `pending`, so that they stay valid as the front is taken.
    front: u64,
    /// Gaps in `pending` (its publishes are the rest): while there is none, the front needs
    /// no tidying.
    gaps: usize,
    /// The record bytes of the publishes in `pending`.
    pub(super) pending_bytes: usize,
    /// Aggregate chains with a publish pending or in flight, keyed by their [`chain_key`]
    /// (a hash already: not hashed again).
    pub(super) chains: crate::prehashed::PrehashedMap<Chain>,
    /// Batches awaiting their ack (or to be sent again).
    pub(super) in_flight: usize,
    pub(super) next_number: u64,
    /// A linger timer runs for this lane.
    pub(super) lingering: bool,
}

/// A place in [`LaneState::pending`].
struct Pending {
    /// `None` once moved to its chain's `waiting`.
    message: Option<Message>,
    /// The position of its chain's next publish in `pending`, or [`NO_NEXT`] (a place of 16
    /// bytes rather than 24: each publish is put in and taken out).
    next: u64,
}

/// [`Pending::next`] of a chain's last publish in `pending`.
const NO_NEXT: u64 = u64::MAX;

/// One aggregate chain of a lane.
#[derive(Default)]
pub(super) struct Chain {
    /// Its publishes in `pending`.
    pub(super) pending: usize,
    /// The position of the last of them (meaningful while `pending > 0`).
    last: u64,
    /// The batch holding its earlier publishes, while that awaits its ack.
    pub(super) batch: Option<u64>,
    /// Its publishes that wait for that batch to be stored, in order.
    pub(super) waiting: VecDeque<Message>,
}

impl LaneState {
    /// Adds a publish behind its chain's earlier ones.
    pub(super) fn push(&mut self, message: Message) {
        if let Some(key) = message.chain {
            let chain = self.chains.entry(key).or_default();
            if chain.batch.is_some() {
                chain.waiting.push_back(message);
                return;
            }
            let position = self.front + self.pending.len() as u64;
            if chain.pending > 0 {
                self.pending[(chain.last - self.front) as usize].next = position;
            }
            chain.last = position;
            chain.pending += 1;
        }
        self.pending_bytes += message.record_len;
        self.pending.push_back(Pending {
            message: Some(message),
            next: NO_NEXT,
        });
    }

    /// The oldest publish waiting to be packed.
    #[inline]
    pub(super) fn oldest(&self) -> Option<&Message> {
        self.pending.front().map(|p| {
            p.message
                .as_ref()
                .expect("the front of `pending` is never a gap")
        })
    }

    /// Whether no publish waits to be packed.
    pub(super) fn nothing_pending(&self) -> bool {
        self.pending.is_empty()
    }

    /// Publishes waiting to be packed.
    fn waiting_to_pack(&self) -> usize {
        self.pending.len() - self.gaps
    }

    /// Drops the gaps at the front of `pending`.
    #[inline(always)]
    fn close_front_gaps(&mut self) {
        while self.gaps > 0 && self.pending.front().is_some_and(|p| p.message.is_none()) {
            self.pending.pop_front();
            self.front += 1;
            self.gaps -= 1;
        }
    }

    /// Whether a batch should be cut now: there is room in flight (for a batch that is not
    /// full, only while nothing else is in flight: events published meanwhile gather into
    /// the next batch, and full ones take the rest of `max_in_flight`), and
    /// either nothing lingers or the pending publishes fill a batch or have waited long enough.
    #[inline]
    pub(super) fn ready(&self, limits: &BatchConfig, now: Instant) -> bool {
        let Some(oldest) = self.oldest() else {
            return false;
        };
        let full =
            self.waiting_to_pack() >= limits.max_events || self.pending_bytes >= limits.max_bytes;
        let room = if full {
            limits.max_in_flight
        } else {
            limits.partial_in_flight()
        };
        self.in_flight < room
            && (limits.linger.is_zero()
                || full
                || now.duration_since(oldest.created) >= limits.linger)
    }

    /// Takes the next batch: the first pending publishes, within the limits (at least one).
    pub(super) fn cut(&mut self, limits: &BatchConfig) -> Option<(u64, Batched)> {
        if self.pending.is_empty() || self.in_flight >= limits.max_in_flight {
            return None;
        }
        let number = self.next_number;
        self.next_number += 1;
        let mut taken = Batched::with_capacity(self.waiting_to_pack().min(limits.max_events));
        let mut bytes = 0;
        // Chains with publishes left in `pending` behind this batch, with the position of the
        // first of them as the batch's last publish of the chain links it (a chain is listed
        // once per publish taken while more were left: its last entry is right).
        let mut left_behind = Vec::new();
        while let Some(next) = self.oldest() {
            if !taken.is_empty()
                && (taken.len() >= limits.max_events || bytes + next.record_len > limits.max_bytes)
            {
                break;
            }
            let place = self.pending.pop_front().expect("front exists");
            self.front += 1;
            let message = place
                .message
                .expect("the front of `pending` is never a gap");
            bytes += message.record_len;
            if let Some(key) = message.chain {
                let chain = self
                    .chains
                    .get_mut(&key)
                    .expect("a pending publish's chain is known");
                chain.pending -= 1;
                chain.batch = Some(number);
                if chain.pending > 0 {
                    left_behind.push((key, place.next));
                }
            }
            taken.push(message);
            self.close_front_gaps();
        }
        self.pending_bytes -= bytes;
        self.in_flight += 1;
        // Later publishes of an aggregate in this batch did not fit: they wait for it to be
        // stored rather than go in a batch that could overtake it.
        for (key, first) in left_behind.into_iter().rev() {
            let chain = self
                .chains
                .get_mut(&key)
                .expect("a chain in a batch is known");
            // Moved already from its last entry, when the batch took more than one of its
            // publishes.
            let mut position = first;
            for left in (0..chain.pending).rev() {
                let place = &mut self.pending[(position - self.front) as usize];
                let message = place
                    .message
                    .take()
                    .expect("a chain's pending position holds its publish");
                self.pending_bytes -= message.record_len;
                self.gaps += 1;
                chain.waiting.push_back(message);
                if left > 0 {
                    position = place.next;
                }
            }
            chain.pending = 0;
        }
        self.close_front_gaps();
        Some((number, taken))
    }

    /// Batch `number`, holding `chains`, is settled: stored (its chains' waiting publishes
    /// become pending), or failed for good (they are returned, not to be sent after a gap).
    pub(super) fn settled(
        &mut self,
        number: u64,
        chains: impl IntoIterator<Item = u64>,
        failed: bool,
    ) -> Vec<Message> {
        self.in_flight -= 1;
        let mut aborted = Vec::new();
        for key in chains {
            // Looked up once, and removed through the same entry when it is done.
            let std::collections::hash_map::Entry::Occupied(mut entry) = self.chains.entry(key)
            else {
                continue;
            };
            let chain = entry.get_mut();
            if chain.batch != Some(number) {
                continue;
            }
            // None of its publishes is in `pending` while its batch is in flight.
            debug_assert_eq!(chain.pending, 0);
            chain.batch = None;
            let waiting = std::mem::take(&mut chain.waiting);
            if waiting.is_empty() {
                entry.remove();
            } else if failed {
                entry.remove();
                aborted.extend(waiting);
            } else {
                for message in waiting {
                    self.push(message);
                }
            }
        }
        aborted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::test_support::*;

    #[test]
    fn a_cut_keeps_an_aggregate_out_of_a_second_batch_in_flight() {
        let limits = limits(2, 1 << 20, 4);
        let mut lane = LaneState::default();
        for (chain, v) in [(1, 1), (1, 2), (1, 3), (2, 1)] {
            lane.push(event(chain, v, 10));
        }
        let (first, batch) = lane.cut(&limits).unwrap();
        assert_eq!(
            batch.iter().map(version).collect::<Vec<_>>(),
            [(1, 1), (1, 2)]
        );
        // 1/3 did not fit; it waits for the first batch, and 2/1 goes on.
        let (_, batch) = lane.cut(&limits).unwrap();
        assert_eq!(batch.iter().map(version).collect::<Vec<_>>(), [(2, 1)]);
        assert!(lane.cut(&limits).is_none());
        lane.push(event(1, 4, 10));
        assert!(lane.cut(&limits).is_none(), "1/4 waits behind 1/3");
        assert!(lane.settled(first, [1, 1], false).is_empty());
        let (_, batch) = lane.cut(&limits).unwrap();
        assert_eq!(
            batch.iter().map(version).collect::<Vec<_>>(),
            [(1, 3), (1, 4)]
        );
    }

    #[test]
    fn a_partial_batch_goes_alone_and_full_ones_take_the_rest_of_the_room() {
        let limits = limits(3, 1 << 20, 4);
        let now = Instant::now();
        let mut lane = LaneState::default();
        let mut chain = 0;
        let mut push = |lane: &mut LaneState, n: usize| {
            for _ in 0..n {
                chain += 1;
                lane.push(event(chain, 1, 10));
            }
        };
        // A partial batch of one event goes while nothing is in flight.
        push(&mut lane, 1);
        assert!(lane.ready(&limits, now));
        lane.cut(&limits).unwrap();
        push(&mut lane, 1);
        assert!(
            !lane.ready(&limits, now),
            "a second partial batch waits for the first"
        );
        // Once a full batch's worth is pending it goes, up to all four places.
        push(&mut lane, 2);
        assert!(lane.ready(&limits, now));
        assert_eq!(lane.cut(&limits).unwrap().1.len(), 3);
        for _ in 0..2 {
            push(&mut lane, 3);
            assert!(lane.ready(&limits, now));
            lane.cut(&limits).unwrap();
        }
        push(&mut lane, 3);
        assert!(
            !lane.ready(&limits, now),
            "no place left, even for a full batch"
        );
        assert_eq!(lane.in_flight, 4);
        // Settled down to nothing in flight, what is pending goes even when not full.
        let mut lane = LaneState::default();
        lane.push(event(1, 1, 10));
        let (only, _) = lane.cut(&limits).unwrap();
        lane.push(event(2, 1, 10));
        lane.push(event(3, 1, 10));
        assert!(!lane.ready(&limits, now));
        assert!(lane.settled(only, [1], false).is_empty());
        assert!(
            lane.ready(&limits, now),
            "nothing in flight: the partial batch goes"
        );
        assert_eq!(lane.cut(&limits).unwrap().1.len(), 2);
    }

    #[test]
    fn a_failed_batch_returns_its_aggregates_later_events() {
        let limits = limits(8, 25, 4);
        let mut lane = LaneState::default();
        for (chain, v) in [(1, 1), (2, 1), (1, 2), (3, 1)] {
            lane.push(event(chain, v, 10));
        }
        // 25 bytes: two records of 10.
        let (first, batch) = lane.cut(&limits).unwrap();
        assert_eq!(
            batch.iter().map(version).collect::<Vec<_>>(),
            [(1, 1), (2, 1)]
        );
        lane.push(event(2, 2, 10));
        let aborted = lane.settled(first, [1, 2], true);
        assert_eq!(
            aborted.iter().map(version).collect::<Vec<_>>(),
            [(1, 2), (2, 2)]
        );
        let (_, batch) = lane.cut(&limits).unwrap();
        assert_eq!(batch.iter().map(version).collect::<Vec<_>>(), [(3, 1)]);
        assert!(
            lane.chains.keys().all(|k| *k == 3),
            "failed chains are forgotten"
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever the publishes, limits, acks and failures: two batches in flight never hold
        /// the same aggregate, an aggregate's events go out in publish order, and every event
        /// is sent or returned exactly once.
        #[test]
        fn lanes_keep_each_aggregate_in_order(
            ops in proptest::collection::vec((0u8..4, 0u64..5, 1usize..40), 1..200),
            max_events in 1usize..6,
            max_in_flight in 1usize..4,
        ) {
            let limits = limits(max_events, 64, max_in_flight);
            let mut lane = LaneState::default();
            let mut next_version = [0u64; 5];
            let mut in_flight: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
            let mut sent_last = [0u64; 5];
            let mut accounted = 0usize;
            let mut published = 0usize;
            let check = |in_flight: &Vec<(u64, Vec<(u64, u64)>)>| {
                let mut seen = std::collections::HashSet::new();
                for (_, events) in in_flight {
                    let chains: std::collections::HashSet<u64> = events.iter().map(|e| e.0).collect();
                    for c in chains {
                        assert!(seen.insert(c), "aggregate {c} in two batches in flight");
                    }
                }
            };
            for (op, chain, len) in ops {
                match op {
                    0 | 1 => {
                        next_version[chain as usize] += 1;
                        lane.push(event(chain, next_version[chain as usize], len));
                        published += 1;
                    }
                    2 if !in_flight.is_empty() => {
                        let (number, events) = in_flight.remove(0);
                        let chains: Vec<u64> = events.iter().map(|e| e.0).collect();
                        prop_assert!(lane.settled(number, chains, false).is_empty());
                    }
                    3 if !in_flight.is_empty() => {
                        let i = chain as usize % in_flight.len();
                        let (number, events) = in_flight.remove(i);
                        let chains: Vec<u64> = events.iter().map(|e| e.0).collect();
                        for m in lane.settled(number, chains, true) {
                            let (c, v) = version(&m);
                            prop_assert!(v > sent_last[c as usize]);
                            sent_last[c as usize] = v;
                            accounted += 1;
                        }
                    }
                    _ => {}
                }
                while let Some((number, batch)) = lane.cut(&limits) {
                    prop_assert!(!batch.is_empty() && batch.len() <= max_events);
                    prop_assert!(batch.len() == 1 || batch.iter().map(|m| m.record_len).sum::<usize>() <= 64);
                    let events: Vec<(u64, u64)> = batch.iter().map(version).collect();
                    for (c, v) in &events {
                        prop_assert_eq!(*v, sent_last[*c as usize] + 1, "aggregate {} out of order", c);
                        sent_last[*c as usize] = *v;
                    }
                    accounted += events.len();
                    in_flight.push((number, events));
                    check(&in_flight);
                }
                prop_assert!(lane.in_flight == in_flight.len());
            }
            // Drain: ack everything.
            while !in_flight.is_empty() {
                let (number, events) = in_flight.remove(0);
                lane.settled(number, events.iter().map(|e| e.0).collect::<Vec<_>>(), false);
                while let Some((number, batch)) = lane.cut(&limits) {
                    let events: Vec<(u64, u64)> = batch.iter().map(version).collect();
                    for (c, v) in &events {
                        prop_assert_eq!(*v, sent_last[*c as usize] + 1);
                        sent_last[*c as usize] = *v;
                    }
                    accounted += events.len();
                    in_flight.push((number, events));
                }
            }
            prop_assert_eq!(accounted, published);
            prop_assert!(lane.nothing_pending() && lane.pending.is_empty() && lane.gaps == 0 && lane.chains.is_empty() && lane.pending_bytes == 0);
        }
    }
}
