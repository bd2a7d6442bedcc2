//! Acknowledgements: one place that tells the broker a message is done (`+ACK`), given up on
//! after its dead letter is stored (`+TERM`), or still being worked on (`+WPI`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Subject;
use bus_core::Topic;

use super::copies::{ack_info, AckQueue, Copies};
use super::unacked::AckKind;

/// Longest a work-queue topic's acknowledgement of the newest message delivered is held back
/// (see [`Tail`]): far below any AckWait, and long enough to bridge the gaps between messages
/// of a steady flow.
pub(crate) const TAIL_HOLD: Duration = Duration::from_millis(10);

/// On a work-queue stream, acknowledging the only message left empties the stream, and the
/// server's file store then removes its block file and makes a new one for the next message
/// stored. At a rate the consumer keeps up with, that is file work for nearly every message (a
/// quarter of the broker's CPU at half capacity, `docs/performance.md`). So the acknowledgement
/// of the newest message delivered is held back: it is sent first (keeping the release order)
/// as soon as another acknowledgement is sent, once a later message has been delivered, or
/// after [`TAIL_HOLD`]; at close it is sent with the rest. The stream keeps one message while
/// messages flow, and a successor that takes over within `TAIL_HOLD` of a crash handles that
/// one message again, as it would any message whose acknowledgement was still on its way.
#[derive(Debug, Default)]
struct Tail {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    reply: Subject,
    kind: AckKind,
    sequence: u64,
    since: Instant,
}

impl Tail {
    /// Plans one burst: `queued` holds the acknowledgements released since the last burst, in
    /// release order, and keeps what to send after the returned one (a held acknowledgement
    /// whose time came, sent first). With `hold`, the last of `queued` is held instead if its
    /// message is the newest delivered (`delivered` is the highest stream sequence received).
    fn plan(
        &mut self,
        queued: &mut Vec<(Subject, AckKind)>,
        delivered: u64,
        now: Instant,
        hold: bool,
    ) -> Option<(Subject, AckKind)> {
        let due = self.held.as_ref().is_some_and(|held| {
            !hold
                || !queued.is_empty()
                || held.sequence < delivered
                || now.saturating_duration_since(held.since) >= TAIL_HOLD
        });
        let first = if due {
            self.held.take().map(|held| (held.reply, held.kind))
        } else {
            None
        };
        if hold && self.held.is_none() {
            let newest = queued
                .last()
                .and_then(|(reply, _)| ack_info(reply))
                .map(|info| info.stream_sequence)
                .filter(|&sequence| sequence >= delivered);
            if let Some(sequence) = newest {
                let (reply, kind) = queued.pop().expect("the last one exists");
                self.held = Some(Held {
                    reply,
                    kind,
                    sequence,
                    since: now,
                });
            }
        }
        first
    }

    /// When the held acknowledgement is due, if one is held.
    fn deadline(&self) -> Option<Instant> {
        self.held.as_ref().map(|held| held.since + TAIL_HOLD)
    }
}

/// Sends a subscription's acknowledgements. Acknowledgements and terminations are queued in the
/// order [`Copies`] releases them: workers add to the queue and one task sends everything queued
/// in one burst, in order, so the connection writes many per system call instead of one each.
/// Progress reports go out at once.
#[derive(Debug)]
pub(crate) struct Acker {
    client: async_nats::Client,
    topic: Topic,
    pending: Mutex<Vec<(Subject, AckKind)>>,
    wake: tokio::sync::Notify,
    /// Set on close: the sender sends what is queued and stops.
    closing: AtomicBool,
    /// Whether the newest message's acknowledgement is held back ([`Tail`]): work-queue
    /// topics only, where acknowledging removes the message.
    hold_tail: bool,
    tail: Mutex<Tail>,
    /// The highest stream sequence the fetcher has received.
    delivered: AtomicU64,
}

impl Acker {
    pub(crate) fn new(client: async_nats::Client, topic: Topic, hold_tail: bool) -> Self {
        Self {
            client,
            topic,
            pending: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            closing: AtomicBool::new(false),
            hold_tail,
            tail: Mutex::new(Tail::default()),
            delivered: AtomicU64::new(0),
        }
    }

    /// The fetcher received the message at stream position `sequence`.
    pub(crate) fn delivered(&self, sequence: u64) {
        self.delivered.fetch_max(sequence, Ordering::Relaxed);
    }

    /// Sends `+ACK` at once (acknowledgements sent again at close).
    pub(crate) async fn ack_now(&self, reply: Subject) {
        self.send(reply, b"+ACK").await;
    }

    /// Restarts the message's AckWait clock: it is still being worked on.
    pub(crate) async fn progress(&self, reply: Subject) {
        self.send(reply, b"+WPI").await;
    }

    async fn send(&self, reply: Subject, kind: &'static [u8]) {
        if let Err(error) = self
            .client
            .publish(reply, bytes::Bytes::from_static(kind))
            .await
        {
            let kind = String::from_utf8_lossy(kind);
            tracing::warn!(topic = %self.topic, %error, %kind, "acknowledgement could not be sent");
        }
    }

    /// Sends every queued acknowledgement. `spare` is an empty vector swapped in for the queue,
    /// so neither side grows a vector from nothing for every burst.
    /// A held acknowledgement first if its time came, then the rest in order (the newest
    /// message's perhaps held back; none once closing).
    async fn send_all(&self, spare: &mut Vec<(Subject, AckKind)>) {
        std::mem::swap(&mut *self.pending.lock().unwrap(), spare);
        let hold = self.hold_tail && !self.closing.load(Ordering::Acquire);
        let first = self.tail.lock().unwrap().plan(
            spare,
            self.delivered.load(Ordering::Relaxed),
            Instant::now(),
            hold,
        );
        for (reply, kind) in first.into_iter().chain(spare.drain(..)) {
            let body: &'static [u8] = match kind {
                AckKind::Ack => b"+ACK",
                AckKind::Term => b"+TERM",
            };
            self.send(reply, body).await;
        }
    }

    /// The sender task: sends queued acks in bursts until [`Acker::finish`].
    pub(crate) async fn run(self: Arc<Self>) {
        let mut spare = Vec::new();
        loop {
            let deadline = self.tail.lock().unwrap().deadline();
            match deadline {
                Some(deadline) => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(deadline.into()) => {}
                    }
                }
                None => self.wake.notified().await,
            }
            // Let the workers that are ready run first: their acks join this burst, so the
            // connection writes them in one system call instead of a few each.
            tokio::task::yield_now().await;
            self.send_all(&mut spare).await;
            if self.closing.load(Ordering::Acquire) {
                self.send_all(&mut spare).await;
                return;
            }
        }
    }

    /// Asks the sender task to send what is queued and stop.
    pub(crate) fn finish(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Sends what is still queued or held (after the sender task stopped) and flushes the
    /// connection.
    pub(crate) async fn flush(&self) {
        self.closing.store(true, Ordering::Release);
        self.send_all(&mut Vec::new()).await;
        let _ = self.client.flush().await;
    }
}

impl AckQueue for Acker {
    /// Queues `+ACK` or `+TERM` for the message whose ack subject is `reply`.
    fn queue(&self, reply: Subject, kind: AckKind) {
        let was_empty = {
            let mut pending = self.pending.lock().unwrap();
            pending.push((reply, kind));
            pending.len() == 1
        };
        if was_empty {
            // A stored permit if the sender is busy: no wake-up is lost.
            self.wake.notify_one();
        }
    }
}

/// Tells the broker, every `every`, that each message delivered longer than `every` ago and not
/// acknowledged is still being worked on (`+WPI`), whether its handler is running, retrying,
/// it waits in its aggregate's queue behind a slow event, or it was handled and its
/// acknowledgement waits for an earlier message. So the broker never redelivers a message
/// behind the worker's back, however long the aggregate is held up.
pub(crate) async fn keep_alive(acker: Arc<Acker>, copies: Arc<Mutex<Copies>>, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        let replies = copies.lock().unwrap().older_than(every);
        for reply in replies {
            acker.progress(reply).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(sequence: u64) -> (Subject, AckKind) {
        (
            Subject::from(format!("$JS.ACK.S.C.1.{sequence}.{sequence}.0.0")),
            AckKind::Ack,
        )
    }

    fn sequences(first: Option<(Subject, AckKind)>, rest: &[(Subject, AckKind)]) -> Vec<u64> {
        first
            .iter()
            .chain(rest)
            .map(|(reply, _)| ack_info(reply).unwrap().stream_sequence)
            .collect()
    }

    #[test]
    fn the_newest_delivered_message_is_held_and_goes_first_in_the_next_burst() {
        let mut tail = Tail::default();
        let now = Instant::now();
        let mut queued = vec![ack(1), ack(2), ack(3)];
        let first = tail.plan(&mut queued, 3, now, true);
        assert_eq!(
            sequences(first, &queued),
            [1, 2],
            "3 is the newest delivered: held"
        );
        assert_eq!(tail.deadline(), Some(now + TAIL_HOLD));

        // The next burst sends it before its own, in release order, and holds its newest.
        let mut queued = vec![ack(4), ack(5)];
        let first = tail.plan(&mut queued, 5, now, true);
        assert_eq!(sequences(first, &queued), [3, 4]);
        assert_eq!(tail.held.as_ref().map(|h| h.sequence), Some(5));
    }

    #[test]
    fn an_acknowledgement_behind_a_later_delivery_is_not_held() {
        let mut tail = Tail::default();
        let mut queued = vec![ack(6), ack(7)];
        let first = tail.plan(&mut queued, 9, Instant::now(), true);
        assert_eq!(sequences(first, &queued), [6, 7]);
        assert!(tail.held.is_none() && tail.deadline().is_none());
    }

    #[test]
    fn a_held_acknowledgement_goes_once_later_delivered_or_due_or_closing() {
        let now = Instant::now();
        let held = |tail: &mut Tail| {
            let mut queued = vec![ack(3)];
            assert!(tail.plan(&mut queued, 3, now, true).is_none());
            assert!(queued.is_empty());
        };
        // Nothing new, not due: kept.
        let mut tail = Tail::default();
        held(&mut tail);
        let mut empty = Vec::new();
        assert!(tail
            .plan(&mut empty, 3, now + TAIL_HOLD / 2, true)
            .is_none());
        assert!(tail.held.is_some());
        // A later message delivered: sent.
        assert_eq!(sequences(tail.plan(&mut empty, 4, now, true), &empty), [3]);
        // Due: sent.
        let mut tail = Tail::default();
        held(&mut tail);
        assert_eq!(
            sequences(tail.plan(&mut empty, 3, now + TAIL_HOLD, true), &empty),
            [3]
        );
        // Closing (or a topic that does not hold): sent, and nothing new is held.
        let mut tail = Tail::default();
        held(&mut tail);
        let mut queued = vec![ack(4)];
        let first = tail.plan(&mut queued, 4, now, false);
        assert_eq!(sequences(first, &queued), [3, 4]);
        assert!(tail.held.is_none());
    }

    #[test]
    fn a_topic_that_does_not_hold_sends_everything_in_order() {
        let mut tail = Tail::default();
        let mut queued = vec![ack(1), ack(2)];
        let first = tail.plan(&mut queued, 2, Instant::now(), false);
        assert_eq!(sequences(first, &queued), [1, 2]);
        assert!(tail.held.is_none());
    }
}
