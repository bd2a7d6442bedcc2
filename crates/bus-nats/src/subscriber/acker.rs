//! Acknowledgements: one place that tells the broker a message is done (`+ACK`), given up on
//! after its dead letter is stored (`+TERM`), or still being worked on (`+WPI`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use bus_core::Topic;

use super::copies::{AckQueue, Copies};
use super::unacked::AckKind;

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
}

impl Acker {
    pub(crate) fn new(client: async_nats::Client, topic: Topic) -> Self {
        Self {
            client,
            topic,
            pending: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            closing: AtomicBool::new(false),
        }
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
    async fn send_all(&self, spare: &mut Vec<(Subject, AckKind)>) {
        std::mem::swap(&mut *self.pending.lock().unwrap(), spare);
        for (reply, kind) in spare.drain(..) {
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
            self.wake.notified().await;
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

    /// Sends what is still queued (after the sender task stopped) and flushes the connection.
    pub(crate) async fn flush(&self) {
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
