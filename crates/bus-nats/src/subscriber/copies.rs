//! What the subscription has seen of the stream: positions not acknowledged and recently
//! acknowledged, and where a delivered message sits, read from its ack subject.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;

use super::unacked::{AckKind, Again, Settled, Unacked};

/// What the subscription knows of a stream position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    New,
    /// Queued, being handled, or handled and waiting for its acknowledgement: a redelivered
    /// copy must not reach the handler a second time.
    InFlight,
    /// Acknowledged (or terminated) recently: a copy means the ack was lost.
    Finished,
}

/// Stream positions not acknowledged yet and recently acknowledged in this subscription, so
/// that a copy the broker redelivers (AckWait expiry, lost acks across a reconnect, a consumer
/// reset) is recognised instead of being handled twice, possibly after later events of its
/// aggregate; and the one place acknowledgements are released, in the order [`Unacked`] keeps.
#[derive(Debug)]
pub(crate) struct Copies {
    /// Messages delivered and not acknowledged: queued, running, handled and waiting for their
    /// acknowledgement, or returned to be delivered again.
    pub(crate) unacked: Unacked,
    finished: HashSet<u64, ahash::RandomState>,
    finished_order: VecDeque<u64>,
    capacity: usize,
    /// Woken when the last message queued or running settles.
    drained: Arc<tokio::sync::Notify>,
    /// The events in unacknowledged messages, for the fetcher, which pulls no more while they
    /// are `limit` or more; `room` wakes it when they fall below.
    events: Arc<AtomicUsize>,
    limit: usize,
    room: Arc<tokio::sync::Notify>,
    /// The ack subjects of the most recently acknowledged messages, so that acknowledgements
    /// the broker lost (a consumer-leader election) can be sent again before close reports them.
    recent_acks: VecDeque<Subject>,
    /// Scratch space for the acknowledgements a settlement releases.
    ready: Vec<(u64, Option<Subject>, AckKind)>,
    /// Record batches left unacknowledged with some of their events settled; shared by every
    /// subscription of this bus to the same consumer, so that a subscription opened again
    /// after a close is not handed them again either.
    partial: Arc<std::sync::Mutex<PartialBatches>>,
}

/// Per consumer, for a whole bus: the record batches its subscriptions released with some
/// events settled, so that one opened again is not handed them again.
#[derive(Debug, Default)]
pub(crate) struct BatchMemory(
    std::sync::Mutex<HashMap<String, Arc<std::sync::Mutex<PartialBatches>>>>,
);

impl BatchMemory {
    /// What is remembered for `consumer`.
    pub(crate) fn of(&self, consumer: &str) -> Arc<std::sync::Mutex<PartialBatches>> {
        self.0
            .lock()
            .unwrap()
            .entry(consumer.to_owned())
            .or_default()
            .clone()
    }
}

/// Record batches left unacknowledged with some of their events handled (or dead-lettered):
/// which ones, by stream position, so that a redelivery hands the handler only the others.
#[derive(Debug, Default)]
pub(crate) struct PartialBatches {
    /// By stream position: the batch's first record's header block (so that another batch at
    /// the same position, in a stream deleted and created again, is not mistaken for it) and
    /// which records were settled.
    by_sequence: HashMap<u64, (bytes::Bytes, Vec<bool>), ahash::RandomState>,
    order: VecDeque<u64>,
}

impl Copies {
    /// `capacity`: how many acknowledged positions are remembered; `limit`: the events in
    /// unacknowledged messages above which the fetcher stops pulling.
    pub(crate) fn new(
        capacity: usize,
        limit: usize,
        partial: Arc<std::sync::Mutex<PartialBatches>>,
    ) -> Self {
        Self {
            unacked: Unacked::default(),
            finished: HashSet::default(),
            finished_order: VecDeque::new(),
            capacity,
            drained: Default::default(),
            events: Default::default(),
            limit: limit.max(1),
            room: Default::default(),
            recent_acks: VecDeque::new(),
            ready: Vec::new(),
            partial,
        }
    }

    /// Remembers which events of the batch at `sequence` were settled, as it is released.
    pub(crate) fn remember_partial(&mut self, sequence: u64, first: bytes::Bytes, done: Vec<bool>) {
        let mut partial = self.partial.lock().unwrap();
        if partial
            .by_sequence
            .insert(sequence, (first, done))
            .is_none()
        {
            partial.order.push_back(sequence);
            if partial.order.len() > self.capacity {
                if let Some(old) = partial.order.pop_front() {
                    partial.by_sequence.remove(&old);
                }
            }
        }
    }

    /// Which events of the batch at `sequence` were settled before it was released, if any.
    pub(crate) fn take_partial(
        &mut self,
        sequence: u64,
        first: &bytes::Bytes,
    ) -> Option<Vec<bool>> {
        let mut partial = self.partial.lock().unwrap();
        let (remembered, done) = partial.by_sequence.remove(&sequence)?;
        partial.order.retain(|s| *s != sequence);
        (remembered == *first).then_some(done)
    }

    /// A delivery at `sequence` arrived: new (or returned earlier, so to be handled again), a
    /// copy of one not acknowledged yet, or a copy of one acknowledged recently, which is
    /// acknowledged again (its first ack was lost or came before a restart of delivery).
    pub(crate) fn admit(
        &mut self,
        sequence: u64,
        reply: Option<Subject>,
        acker: &impl AckQueue,
    ) -> Seen {
        match self.unacked.delivered_again(sequence, reply.clone()) {
            Some(Again::Handle) => Seen::New,
            Some(Again::Copy) => Seen::InFlight,
            None if self.finished.contains(&sequence) => {
                if let Some(reply) = reply {
                    acker.queue(reply, AckKind::Ack);
                }
                Seen::Finished
            }
            None => {
                self.unacked.insert(sequence, reply);
                Seen::New
            }
        }
    }

    /// Records the aggregates of the events of the message at `sequence` (see
    /// [`Unacked::link`]): before any of them may settle.
    pub(crate) fn link<'a>(
        &mut self,
        sequence: u64,
        keys: impl IntoIterator<Item = &'a [u8]>,
        events: usize,
    ) {
        self.unacked.link(sequence, keys, events);
        self.count_events();
    }

    /// The message at `sequence` is settled: the acknowledgements this releases are queued on
    /// `acker` at once, under the same lock, so that they leave in the order they were released.
    pub(crate) fn settle(&mut self, sequence: u64, how: Settled, acker: &impl AckQueue) {
        let mut ready = std::mem::take(&mut self.ready);
        if self.unacked.settle(sequence, how, &mut ready) {
            for (sequence, reply, kind) in ready.drain(..) {
                self.remember_finished(sequence);
                if let Some(reply) = reply {
                    if kind == AckKind::Ack {
                        self.recent_acks.push_back(reply.clone());
                        if self.recent_acks.len() > self.capacity / 4 {
                            self.recent_acks.pop_front();
                        }
                    }
                    acker.queue(reply, kind);
                }
            }
            if self.unacked.pending() == 0 {
                self.drained.notify_waiters();
            }
            self.count_events();
        }
        self.ready = ready;
    }

    fn remember_finished(&mut self, sequence: u64) {
        if self.finished.insert(sequence) {
            self.finished_order.push_back(sequence);
            if self.finished_order.len() > self.capacity {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }

    fn count_events(&self) {
        let now = self.unacked.events();
        let before = self.events.swap(now, Ordering::AcqRel);
        if before >= self.limit && now < self.limit {
            // A stored permit if the fetcher is not waiting yet: no wake-up is lost.
            self.room.notify_one();
        }
    }

    /// Whether the fetcher may pull more: the events in unacknowledged messages are below the
    /// limit. Read without the lock.
    pub(crate) fn room(&self) -> Room {
        Room {
            events: self.events.clone(),
            limit: self.limit,
            wake: self.room.clone(),
        }
    }

    /// Ack subjects of the messages delivered at least `age` ago and not returned.
    pub(crate) fn older_than(&self, age: Duration) -> Vec<Subject> {
        self.unacked.older_than(age)
    }

    /// Wakes whoever waits for the last message queued or running once none is.
    pub(crate) fn drained(&self) -> Arc<tokio::sync::Notify> {
        self.drained.clone()
    }

    /// The ack subjects of recently acknowledged messages, oldest first.
    pub(crate) fn recent_acks(&self) -> Vec<Subject> {
        self.recent_acks.iter().cloned().collect()
    }

    /// The subscription lost the topic: nothing delivered so far is acknowledged any more (the
    /// new owner has it delivered again), and the ack subjects kept for re-sending are dropped.
    /// Forgets what was settled here (messages acknowledged, record batches partly settled):
    /// after an operator moved delivery to an earlier position, they are to be handled again,
    /// not recognised as copies.
    pub(crate) fn forget_settled(&mut self) {
        self.finished.clear();
        self.finished_order.clear();
        let mut partial = self.partial.lock().unwrap();
        partial.order.clear();
        partial.by_sequence.clear();
    }

    pub(crate) fn abandon(&mut self) {
        self.unacked.abandon();
        self.recent_acks.clear();
        self.count_events();
    }
}

/// Where released acknowledgements go, in order: the subscription's [`super::acker::Acker`].
pub(crate) trait AckQueue {
    fn queue(&self, reply: Subject, kind: AckKind);
}

/// The fetcher's view of [`Copies`]' event count.
pub(crate) struct Room {
    events: Arc<AtomicUsize>,
    limit: usize,
    wake: Arc<tokio::sync::Notify>,
}

impl Room {
    /// No more may be pulled until [`Room::freed`].
    pub(crate) fn is_full(&self) -> bool {
        self.events.load(Ordering::Acquire) >= self.limit
    }

    /// Completes once the count fell below the limit (possibly before this was called).
    pub(crate) async fn freed(&self) {
        self.wake.notified().await
    }
}

/// Where a JetStream message sits: parsed from its ack subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckInfo {
    /// How many times the broker has delivered the message.
    pub(crate) delivered: u64,
    /// Its position in the stream.
    pub(crate) stream_sequence: u64,
    /// Its position in the consumer's deliveries: one more than the delivery before it, so a
    /// jump says deliveries were lost on the way.
    pub(crate) consumer_sequence: u64,
    /// When the broker stored it, in nanoseconds since the Unix epoch.
    pub(crate) stored_nanos: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` and the newer
/// form with domain and account hash (`$JS.ACK.<domain>.<hash>.<stream>...`, 12 tokens).
pub(crate) fn ack_info(reply: &str) -> Option<AckInfo> {
    // Runs once per message: count and pick tokens without collecting them.
    let offset = match reply.split('.').count() {
        9 => 4,
        n if n >= 11 => 6,
        _ => return None,
    };
    let mut tokens = reply.split('.').skip(offset);
    Some(AckInfo {
        delivered: tokens.next()?.parse().ok()?,
        stream_sequence: tokens.next()?.parse().ok()?,
        consumer_sequence: tokens.next()?.parse().ok()?,
        stored_nanos: tokens.next()?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_parse_in_both_forms() {
        let v1 = "$JS.ACK.ORDERS.bus-orders.3.1042.17.1700000000000000000.5";
        assert_eq!(
            ack_info(v1),
            Some(AckInfo {
                delivered: 3,
                stream_sequence: 1042,
                consumer_sequence: 17,
                stored_nanos: 1_700_000_000_000_000_000,
            })
        );
        let v2 = "$JS.ACK.hub.ACCHASH.ORDERS.bus-orders.1.77.70.1700000000000000000.0.tok";
        assert_eq!(
            ack_info(v2),
            Some(AckInfo {
                delivered: 1,
                stream_sequence: 77,
                consumer_sequence: 70,
                stored_nanos: 1_700_000_000_000_000_000,
            })
        );
        assert_eq!(ack_info("_INBOX.abc"), None);
    }

    /// Collects what would be sent.
    #[derive(Default)]
    struct Sent(std::sync::Mutex<Vec<(String, AckKind)>>);

    impl AckQueue for Sent {
        fn queue(&self, reply: Subject, kind: AckKind) {
            self.0.lock().unwrap().push((reply.to_string(), kind));
        }
    }

    fn reply(sequence: u64) -> Option<Subject> {
        Some(Subject::from(format!(
            "$JS.ACK.S.C.1.{sequence}.{sequence}.0.0"
        )))
    }

    #[test]
    fn copies_are_recognised_until_forgotten() {
        let sent = Sent::default();
        let mut copies = Copies::new(2, 100, Default::default());
        let admit = |copies: &mut Copies, sequence: u64| {
            let seen = copies.admit(sequence, reply(sequence), &sent);
            if seen == Seen::New {
                copies.link(sequence, [format!("k{sequence}").as_bytes()], 1);
            }
            seen
        };
        assert_eq!(admit(&mut copies, 1), Seen::New);
        assert_eq!(admit(&mut copies, 1), Seen::InFlight);
        copies.settle(1, Settled::Done(AckKind::Ack), &sent);
        assert_eq!(admit(&mut copies, 1), Seen::Finished);
        assert_eq!(
            sent.0.lock().unwrap().len(),
            2,
            "acknowledged, then its copy acknowledged again"
        );
        assert_eq!(admit(&mut copies, 2), Seen::New);
        copies.settle(2, Settled::Returned, &sent);
        assert_eq!(
            admit(&mut copies, 2),
            Seen::New,
            "a returned position is handled again"
        );
        copies.settle(2, Settled::Done(AckKind::Term), &sent);
        assert_eq!(sent.0.lock().unwrap()[2].1, AckKind::Term);
        assert_eq!(admit(&mut copies, 3), Seen::New);
        copies.settle(3, Settled::Done(AckKind::Ack), &sent);
        // Capacity 2: position 1 is forgotten once 2 and 3 finished.
        assert_eq!(admit(&mut copies, 1), Seen::New);
    }

    #[test]
    fn acknowledgements_wait_for_an_earlier_message_of_their_aggregate() {
        let sent = Sent::default();
        let mut copies = Copies::new(100, 3, Default::default());
        let room = copies.room();
        for sequence in [1, 2] {
            assert_eq!(copies.admit(sequence, reply(sequence), &sent), Seen::New);
        }
        copies.link(1, [b"a".as_slice(), b"b"], 2);
        copies.link(2, [b"b".as_slice()], 1);
        assert!(room.is_full(), "3 events unacknowledged, the limit");
        copies.settle(2, Settled::Done(AckKind::Ack), &sent);
        assert!(sent.0.lock().unwrap().is_empty(), "b is pending in 1");
        assert_eq!(
            copies.admit(2, reply(2), &sent),
            Seen::InFlight,
            "held, not finished"
        );
        copies.settle(1, Settled::Done(AckKind::Ack), &sent);
        let sent: Vec<String> = sent
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(r, _)| r.clone())
            .collect();
        assert_eq!(sent, [reply(1), reply(2)].map(|r| r.unwrap().to_string()));
        assert!(!room.is_full());
        assert_eq!(copies.recent_acks().len(), 2);
    }
}
