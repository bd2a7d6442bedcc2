//! What the subscription has seen of the stream: positions in flight and recently finished,
//! and where a delivered message sits, read from its ack subject.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use async_nats::Subject;

/// What the subscription knows of a stream position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    New,
    /// Being handled or queued: a redelivered copy must not reach the handler a second time.
    InFlight,
    /// Handled (acknowledged or dead-lettered) recently: a copy means the ack was lost.
    Finished,
}

/// Stream positions in flight and recently finished in this subscription, so that a copy the
/// broker redelivers (AckWait expiry, lost acks across a reconnect, a consumer reset) is
/// recognised instead of being handled twice, possibly after later events of its aggregate.
#[derive(Debug)]
pub(crate) struct Copies {
    /// Position → (ack subject, when it was dispatched).
    pub(crate) in_flight: HashMap<u64, (Option<Subject>, Instant), ahash::RandomState>,
    finished: HashSet<u64, ahash::RandomState>,
    finished_order: VecDeque<u64>,
    capacity: usize,
    /// Woken when the last message in flight settles.
    drained: std::sync::Arc<tokio::sync::Notify>,
    /// The ack subjects of the most recently finished messages, so that acknowledgements the
    /// broker lost (a consumer-leader election) can be sent again before close reports them.
    recent_acks: VecDeque<Subject>,
    /// Record batches left unacknowledged with some of their events settled; shared by every
    /// subscription of this bus to the same consumer, so that a subscription opened again
    /// after a close is not handed them again either.
    partial: std::sync::Arc<std::sync::Mutex<PartialBatches>>,
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
    pub(crate) fn new(
        capacity: usize,
        partial: std::sync::Arc<std::sync::Mutex<PartialBatches>>,
    ) -> Self {
        Self {
            in_flight: HashMap::default(),
            finished: HashSet::default(),
            finished_order: VecDeque::new(),
            capacity,
            drained: Default::default(),
            recent_acks: VecDeque::new(),
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

    pub(crate) fn admit(&mut self, sequence: u64, reply: Option<Subject>) -> Seen {
        if self.in_flight.contains_key(&sequence) {
            Seen::InFlight
        } else if self.finished.contains(&sequence) {
            Seen::Finished
        } else {
            self.in_flight.insert(sequence, (reply, Instant::now()));
            Seen::New
        }
    }

    /// Ack subjects of the messages in flight for at least `age`.
    pub(crate) fn older_than(&self, age: Duration) -> Vec<Subject> {
        self.in_flight
            .values()
            .filter(|(_, since)| since.elapsed() >= age)
            .filter_map(|(reply, _)| reply.clone())
            .collect()
    }

    /// Wakes whoever waits for the last message in flight once none is.
    pub(crate) fn drained(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.drained.clone()
    }

    fn settled(&mut self, sequence: u64) -> Option<Subject> {
        let entry = self.in_flight.remove(&sequence);
        if entry.is_some() && self.in_flight.is_empty() {
            self.drained.notify_waiters();
        }
        entry.and_then(|(reply, _)| reply)
    }

    /// The ack subjects of recently finished messages, newest last.
    pub(crate) fn recent_acks(&self) -> Vec<Subject> {
        self.recent_acks.iter().cloned().collect()
    }

    pub(crate) fn finish(&mut self, sequence: u64) {
        if let Some(reply) = self.settled(sequence) {
            self.recent_acks.push_back(reply);
            if self.recent_acks.len() > self.capacity / 4 {
                self.recent_acks.pop_front();
            }
        }
        if self.finished.insert(sequence) {
            self.finished_order.push_back(sequence);
            if self.finished_order.len() > self.capacity {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }

    #[cfg(test)]
    fn admit_for_test(&mut self, sequence: u64) -> Seen {
        self.admit(sequence, None)
    }

    pub(crate) fn release(&mut self, sequence: u64) {
        self.settled(sequence);
    }

    /// Forgets the ack subjects kept for re-sending.
    pub(crate) fn clear_recent_acks(&mut self) {
        self.recent_acks.clear();
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
            })
        );
        let v2 = "$JS.ACK.hub.ACCHASH.ORDERS.bus-orders.1.77.70.1700000000000000000.0.tok";
        assert_eq!(
            ack_info(v2),
            Some(AckInfo {
                delivered: 1,
                stream_sequence: 77,
                consumer_sequence: 70,
            })
        );
        assert_eq!(ack_info("_INBOX.abc"), None);
    }

    #[test]
    fn copies_are_recognised_until_forgotten() {
        let mut copies = Copies::new(2, Default::default());
        assert_eq!(copies.admit_for_test(1), Seen::New);
        assert_eq!(copies.admit_for_test(1), Seen::InFlight);
        copies.finish(1);
        assert_eq!(copies.admit_for_test(1), Seen::Finished);
        assert_eq!(copies.admit_for_test(2), Seen::New);
        copies.release(2);
        assert_eq!(
            copies.admit_for_test(2),
            Seen::New,
            "a released position may be handled again"
        );
        copies.finish(2);
        assert_eq!(copies.admit_for_test(3), Seen::New);
        copies.finish(3);
        // Capacity 2: position 1 is forgotten once 2 and 3 finished.
        assert_eq!(copies.admit_for_test(1), Seen::New);
    }
}
