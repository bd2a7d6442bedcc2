//! One publish as the publisher keeps it, shared with its receipt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::HeaderMap;
use bus_core::{Envelope, PublishError, PublishErrorKind, Published, Topic};
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::telemetry::PublishMetrics;

/// The publisher's handle on one publish, from the call to `publish` until it is settled; its
/// receipt holds the other. One allocation holds what is sent and the outcome the receipt
/// waits for (a channel beside it was a second allocation per event); a pointer moves from the
/// call to a lane, a batch and settlement.
///
/// Dropped unsettled (the publisher's tasks stopped with it in flight), it resolves its receipt
/// as a connection failure rather than leave it waiting.
pub(super) struct Message(pub(super) Arc<Publish>);

impl std::ops::Deref for Message {
    type Target = Publish;
    fn deref(&self) -> &Publish {
        &self.0
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if !self.0.settled.load(Ordering::Acquire) {
            // What it holds goes now, as it would with the publish (its place in the window
            // first): the receipt may be kept for long.
            let held = {
                let mut held = self.0.held();
                (
                    held.permit.take(),
                    held.span.take(),
                    held.envelope.take(),
                    held.raw.take(),
                )
            };
            drop(held);
            self.0.resolve(Err(PublishError::new(
                PublishErrorKind::Connection,
                "the publisher stopped before the broker's answer arrived",
            )));
        }
    }
}

/// Settled publishes nobody holds any more, kept for the next publishes to be made in: a
/// publish is made by the caller's task and settled by the ack task, often on the other
/// thread, and an allocation freed on another thread than the one that made it takes the
/// allocator's slow path on both (callgrind, `--quick --row default`: about 380 instructions
/// per event for this one allocation). At most as many are kept as a lane's batches in flight
/// hold ([`Spares::for_batches`]): the acks of those batches can come in together while the
/// caller waits for room, and every publish they settle is needed again.
pub(super) struct Spares {
    kept: Mutex<Vec<Arc<Publish>>>,
    most: usize,
}

/// The fewest settled publishes a publisher keeps for reuse (about 400 bytes each).
const SPARES: usize = 1024;

impl Default for Spares {
    fn default() -> Self {
        Self {
            kept: Mutex::default(),
            most: SPARES,
        }
    }
}

impl Spares {
    /// Room for the publishes of `batching.max_in_flight` full batches, at least [`SPARES`]
    /// and at most `window`, the publishes a publisher has outstanding at once. With room for
    /// 1 024 and 16 batches of 128 in flight, 59 % of the publishes of `--quick --row default`
    /// were made in new allocations, against 20 % with 8 in flight (callgrind).
    pub(super) fn for_batches(batching: &crate::BatchConfig, window: usize) -> Self {
        let held = batching.max_in_flight.saturating_mul(batching.max_events);
        Self {
            kept: Mutex::default(),
            most: held.max(SPARES).min(window.max(1)),
        }
    }

    fn take(&self) -> Option<Arc<Publish>> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    }

    /// Keeps `publish` if it is settled, nothing else holds it (its receipt was dropped) and
    /// there is room.
    #[cfg(test)]
    pub(super) fn keep(&self, publish: Arc<Publish>) {
        self.keep_all(vec![publish]);
    }

    /// [`Spares::keep`] for each of `publishes`, under one lock.
    pub(super) fn keep_all(&self, publishes: Vec<Arc<Publish>>) {
        let mut keep = publishes
            .into_iter()
            .filter_map(|mut publish| {
                let idle =
                    publish.settled.load(Ordering::Acquire) && Arc::get_mut(&mut publish).is_some();
                idle.then_some(publish)
            })
            .peekable();
        if keep.peek().is_none() {
            return;
        }
        let mut spares = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = self.most.saturating_sub(spares.len());
        spares.extend(keep.take(room));
    }
}

/// What a [`Message`] holds.
pub(super) struct Publish {
    pub(super) topic: Topic,
    /// The aggregate chain it belongs to, under [`PublishOrdering::PerAggregate`](crate::PublishOrdering::PerAggregate).
    pub(super) chain: Option<u64>,
    /// When `publish` was called.
    pub(super) created: Instant,
    /// The bytes it takes as a record of a batch (0 when it is never batched).
    pub(super) record_len: usize,
    pub(super) metrics: Arc<PublishMetrics>,
    /// Whether its span records (so that sending it looks at the span at all).
    pub(super) traced: bool,
    /// Set once it is settled (its outcome is in `held`).
    pub(super) settled: AtomicBool,
    /// What is sent, what settling takes, and the outcome. Locked by the publisher's tasks
    /// while it flies and by its receipt when polled: never for long, seldom at once.
    pub(super) held: Mutex<Held>,
}

pub(super) struct Held {
    /// The envelope, kept for retries and the failure callback; `None` for raw publishes
    /// (sent once, from `raw`) and once settled.
    pub(super) envelope: Option<Envelope>,
    /// A raw publish's headers and body (boxed: rare, and large beside the rest).
    pub(super) raw: Option<Box<(HeaderMap, Bytes)>>,
    /// `bus.publish`, from the call until it is settled (then closed).
    pub(super) span: Option<tracing::Span>,
    /// Its place in the in-flight window, given back when it is settled.
    pub(super) permit: Option<OwnedSemaphorePermit>,
    pub(super) outcome: Outcome,
}

/// Where a publish's outcome stands, for its receipt.
pub(super) enum Outcome {
    /// Not known yet; the receipt's waker, once it waits.
    Pending(Option<std::task::Waker>),
    Known(Result<Published, PublishError>),
    /// Read by the receipt.
    Read,
}

impl Publish {
    /// A publish made now, in flight, in one expression: its fields are written where they
    /// end up rather than moved there through a `Held` and a `Mutex` of their own.
    /// Made in place of a settled one from `spare` (see [`Spares`]) when there is one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        spares: &Spares,
        topic: Topic,
        chain: Option<u64>,
        record_len: usize,
        metrics: Arc<PublishMetrics>,
        envelope: Option<Envelope>,
        raw: Option<Box<(HeaderMap, Bytes)>>,
        span: tracing::Span,
        permit: OwnedSemaphorePermit,
    ) -> Arc<Self> {
        if let Some(mut spare) = spares.take() {
            // Nothing else holds a spare: its last holder gave it up. Written field by field,
            // where they are, rather than moved in whole.
            if let Some(publish) = Arc::get_mut(&mut spare) {
                publish.topic = topic;
                publish.chain = chain;
                publish.created = Instant::now();
                publish.record_len = record_len;
                publish.metrics = metrics;
                publish.traced = !span.is_disabled();
                *publish.settled.get_mut() = false;
                let held = publish
                    .held
                    .get_mut()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                held.envelope = envelope;
                held.raw = raw;
                held.span = Some(span);
                held.permit = Some(permit);
                held.outcome = Outcome::Pending(None);
                return spare;
            }
        }
        Arc::new(Self {
            topic,
            chain,
            created: Instant::now(),
            record_len,
            metrics,
            traced: !span.is_disabled(),
            settled: AtomicBool::new(false),
            held: Mutex::new(Held {
                envelope,
                raw,
                span: Some(span),
                permit: Some(permit),
                outcome: Outcome::Pending(None),
            }),
        })
    }

    pub(super) fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Settles a publish whose span records nothing, under one lock: lets go of what it sent,
    /// records its outcome (the first one given) and wakes its receipt. Returns its place in
    /// the window.
    pub(super) fn resolve_untraced(
        &self,
        outcome: Result<Published, PublishError>,
    ) -> Option<OwnedSemaphorePermit> {
        let (permit, waker) = {
            let mut held = self.held();
            held.envelope = None;
            held.raw = None;
            held.span = None;
            let waker = match &mut held.outcome {
                Outcome::Pending(waker) => {
                    let waker = waker.take();
                    held.outcome = Outcome::Known(outcome);
                    waker
                }
                Outcome::Known(_) | Outcome::Read => None,
            };
            (held.permit.take(), waker)
        };
        self.settled.store(true, Ordering::Release);
        if let Some(waker) = waker {
            waker.wake();
        }
        permit
    }

    /// Records its outcome (the first one given) and wakes its receipt.
    pub(super) fn resolve(&self, outcome: Result<Published, PublishError>) {
        let waker = {
            let mut held = self.held();
            match &mut held.outcome {
                Outcome::Pending(waker) => {
                    let waker = waker.take();
                    held.outcome = Outcome::Known(outcome);
                    waker
                }
                Outcome::Known(_) | Outcome::Read => None,
            }
        };
        self.settled.store(true, Ordering::Release);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl bus_core::PublishOutcome for Publish {
    fn poll_outcome(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Published, PublishError>> {
        let mut held = self.held();
        match std::mem::replace(&mut held.outcome, Outcome::Read) {
            Outcome::Known(outcome) => std::task::Poll::Ready(outcome),
            Outcome::Pending(waker) => {
                let waker = match waker {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                };
                held.outcome = Outcome::Pending(Some(waker));
                std::task::Poll::Pending
            }
            Outcome::Read => std::task::Poll::Ready(Err(PublishError::new(
                PublishErrorKind::Invalid,
                "a receipt is not polled after it resolved",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Wake, Waker};

    use bus_core::Receipt;

    use super::*;
    use crate::publisher::test_support::{message, publish_in};

    /// Counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn receipt_of(m: &Message) -> Receipt {
        Receipt::from_outcome(m.0.clone())
    }

    /// `n` publishes settled and given up by their holders, as a batch's are when acked.
    fn settled(n: usize) -> Vec<Arc<Publish>> {
        (0..n)
            .map(|_| {
                let m = publish_in(&Spares::default(), None, 0, None);
                m.resolve(Ok(published()));
                let publish = m.0.clone();
                drop(m);
                publish
            })
            .collect()
    }

    fn published() -> Published {
        Published {
            topic: Topic::new("orders").unwrap(),
            sequence: Some(7),
            duplicate: false,
        }
    }

    fn envelope(version: u64) -> Envelope {
        Envelope::builder("a-1", "T", version).build().unwrap()
    }

    #[test]
    fn a_settled_publish_nobody_holds_is_made_again_with_nothing_of_the_old_one() {
        let spares = Spares::default();
        let first = publish_in(&spares, Some(1), 10, Some(envelope(1)));
        let first_at = Arc::as_ptr(&first.0);
        first.resolve(Ok(published()));
        let publish = first.0.clone();
        drop(first);
        spares.keep(publish);
        assert_eq!(spares.kept.lock().unwrap().len(), 1);

        let second = publish_in(&spares, Some(2), 20, Some(envelope(2)));
        assert_eq!(Arc::as_ptr(&second.0), first_at, "made in the spare");
        assert!(spares.kept.lock().unwrap().is_empty());
        assert_eq!((second.chain, second.record_len), (Some(2), 20));
        assert!(!second.settled.load(Ordering::Acquire));
        assert_eq!(
            second.held().envelope.as_ref().map(|e| e.event_version()),
            Some(2)
        );
        // Its receipt waits for its own outcome, not the old one's.
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut receipt = pin!(receipt_of(&second));
        assert!(receipt.as_mut().poll(&mut cx).is_pending());
        let stored = Published {
            sequence: Some(8),
            ..published()
        };
        second.resolve(Ok(stored.clone()));
        assert!(matches!(receipt.as_mut().poll(&mut cx), Poll::Ready(Ok(p)) if p == stored));
    }

    #[test]
    fn a_publish_whose_receipt_lives_or_that_is_not_settled_is_not_kept() {
        let spares = Spares::default();
        let held = publish_in(&spares, Some(1), 10, Some(envelope(1)));
        let _receipt = receipt_of(&held);
        held.resolve(Ok(published()));
        let publish = held.0.clone();
        drop(held);
        spares.keep(publish);
        let unsettled = publish_in(&spares, Some(2), 10, Some(envelope(2)));
        spares.keep(unsettled.0.clone());
        assert!(spares.kept.lock().unwrap().is_empty());
        // At most `SPARES` are kept.
        for _ in 0..SPARES + 10 {
            let m = publish_in(&Spares::default(), None, 0, None);
            m.resolve(Ok(published()));
            let publish = m.0.clone();
            drop(m);
            spares.keep(publish);
        }
        assert_eq!(spares.kept.lock().unwrap().len(), SPARES);
        // Kept together, as a batch's are: only as many as there is room for.
        let spares = Spares::default();
        spares.keep_all(settled(SPARES - 2));
        let mut last = settled(5);
        let unsettled = publish_in(&spares, None, 0, None);
        let taken_at = Arc::as_ptr(&unsettled.0);
        last.insert(0, unsettled.0.clone());
        spares.keep_all(last);
        let kept = spares.kept.lock().unwrap();
        // One was taken for the publish in flight: room for three of the five.
        assert_eq!(kept.len(), SPARES);
        assert!(
            kept.iter().all(|p| Arc::as_ptr(p) != taken_at),
            "not while in flight"
        );
    }

    /// A publisher keeps as many spares as its batches in flight hold, within its window: the
    /// publishes of 16 batches of 128 settled together are all kept.
    #[test]
    fn spares_are_kept_for_the_batches_in_flight() {
        let batching = |max_in_flight, max_events| crate::BatchConfig {
            max_in_flight,
            max_events,
            ..crate::BatchConfig::default()
        };
        for (max_in_flight, max_events, window, kept) in [
            (16, 128, 10_000, 2_048),
            (8, 128, 10_000, SPARES),
            (1, 1, 10_000, SPARES),
            (64, 512, 10_000, 10_000),
            (16, 128, 100, 100),
        ] {
            let spares = Spares::for_batches(&batching(max_in_flight, max_events), window);
            spares.keep_all(settled(kept + 7));
            assert_eq!(
                spares.kept.lock().unwrap().len(),
                kept,
                "{max_in_flight} x {max_events} in flight, window {window}"
            );
        }
    }

    #[test]
    fn a_waiting_receipt_is_woken_with_the_outcome_and_reads_it_once() {
        let m = message();
        let mut receipt = pin!(receipt_of(&m));
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(receipt.as_mut().poll(&mut cx).is_pending());
        m.resolve(Ok(published()));
        // A second outcome (a late failure) does not replace the first.
        m.resolve(Err(PublishError::new(PublishErrorKind::Connection, "late")));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(matches!(receipt.as_mut().poll(&mut cx), Poll::Ready(Ok(p)) if p == published()));
        let again = receipt.as_mut().poll(&mut cx);
        assert!(matches!(again, Poll::Ready(Err(e)) if e.kind() == PublishErrorKind::Invalid));
    }

    #[test]
    fn an_untraced_publish_settles_under_one_lock_as_a_resolved_one_does() {
        let m = publish_in(&Spares::default(), Some(1), 10, Some(envelope(1)));
        let window = Arc::new(tokio::sync::Semaphore::new(1));
        m.held().permit = Some(window.clone().try_acquire_owned().unwrap());
        let mut receipt = pin!(receipt_of(&m));
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(receipt.as_mut().poll(&mut cx).is_pending());
        let permit = m.resolve_untraced(Ok(published()));
        assert!(m.settled.load(Ordering::Acquire));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "its receipt is woken");
        assert!(permit.is_some(), "its place in the window is handed back");
        assert!(m.held().envelope.is_none() && m.held().span.is_none());
        // A later outcome does not replace the first.
        assert!(m
            .resolve_untraced(Err(PublishError::new(PublishErrorKind::Connection, "late")))
            .is_none());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(matches!(receipt.as_mut().poll(&mut cx), Poll::Ready(Ok(p)) if p == published()));
        drop(permit);
        assert_eq!(window.available_permits(), 1);
    }

    #[test]
    fn a_publish_dropped_unsettled_fails_its_receipt_and_one_settled_does_not() {
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);

        let m = message();
        let window = Arc::new(tokio::sync::Semaphore::new(1));
        m.held().permit = Some(window.clone().try_acquire_owned().unwrap());
        let mut receipt = pin!(receipt_of(&m));
        assert!(receipt.as_mut().poll(&mut cx).is_pending());
        drop(m);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Its place in the window is back while its receipt still lives.
        assert_eq!(window.available_permits(), 1);
        assert!(matches!(
            receipt.as_mut().poll(&mut cx),
            Poll::Ready(Err(e)) if e.kind() == PublishErrorKind::Connection
        ));

        let m = message();
        let mut receipt = pin!(receipt_of(&m));
        m.resolve(Ok(published()));
        drop(m);
        assert!(matches!(receipt.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    }
}
