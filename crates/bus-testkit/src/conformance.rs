//! The transport conformance suite: functions any transport's tests call.
//!
//! Each function sets up its own topics (named by [`Harness::topic`]), publishes, subscribes and
//! panics with a description of what went wrong. A transport's test file generates one test per
//! function, each with a fresh harness, with [`conformance_tests!`](crate::conformance_tests):
//!
//! ```text
//! bus_testkit::conformance_tests!(MyHarness::new().await);
//! ```

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bus_core::{
    handler_fn, Envelope, HandlerError, Publisher, RawKey, Subscriber, Subscription, Topic,
};
use bytes::Bytes;
use tokio::sync::Notify;

use crate::SequenceVerifier;

/// How long a conformance step may wait for events before it fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What a transport gives the suite.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A publisher; the suite may call this more than once.
    async fn publisher(&self) -> Arc<dyn Publisher>;
    /// A subscriber; the suite may call this more than once.
    async fn subscriber(&self) -> Arc<dyn Subscriber>;
    /// A topic for the test `name`, distinct per name, that the transport can publish on and
    /// subscribe to. Retries of retryable handler errors must be configured with a backoff
    /// of at most a few hundred milliseconds.
    fn topic(&self, name: &str) -> Topic;
}

/// Records handled events in a [`SequenceVerifier`] and wakes waiters.
#[derive(Debug, Default)]
pub struct Recorder {
    /// The verifier fed by [`record`](Self::record).
    pub verifier: SequenceVerifier,
    changed: Notify,
}

impl Recorder {
    /// A new, shared recorder.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Records one handled event.
    pub fn record(&self, topic: &Topic, envelope: &Envelope) {
        self.verifier.record(
            topic.as_str(),
            envelope.aggregate_id().as_str(),
            envelope.event_version(),
        );
        self.changed.notify_waiters();
    }

    /// Waits until `done(report)` holds, for at most `timeout`; panics with `what` otherwise.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&crate::VerifierReport) -> bool,
    ) {
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let changed = self.changed.notified();
                if done(&self.verifier.report()) {
                    return;
                }
                changed.await;
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "timed out after {timeout:?} waiting for {what}; verifier: {:?}",
                self.verifier.report()
            );
        }
    }

    /// Waits until at least `n` distinct events were handled.
    pub async fn wait_unique(&self, n: u64) {
        self.wait_until(&format!("{n} distinct events"), STEP_TIMEOUT, |r| {
            r.unique >= n
        })
        .await
    }
}

fn envelope(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "conformance.Tested", version)
        .payload(Bytes::from(format!("{aggregate}:{version}")))
        .build()
        .expect("valid envelope")
}

/// Subscribes a handler that records into `recorder`.
pub async fn subscribe_recording(
    subscriber: &dyn Subscriber,
    topic: &Topic,
    recorder: &Arc<Recorder>,
) -> Subscription {
    let recorder = recorder.clone();
    let t = topic.clone();
    subscriber
        .subscribe(
            topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let recorder = recorder.clone();
                let t = t.clone();
                async move {
                    recorder.record(&t, &e);
                    Ok(())
                }
            })),
        )
        .await
        .expect("subscribe")
}

/// One envelope with every field set arrives unchanged.
pub async fn round_trip(h: &dyn Harness) {
    let topic = h.topic("round-trip");
    let publisher = h.publisher().await;
    let subscriber = h.subscriber().await;
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let sent = Envelope::builder("order-1", "OrderPlaced", 1)
        .event_id("evt-round-trip-1")
        .timestamp(UNIX_EPOCH + Duration::from_micros(micros))
        .trace_id("trace-1")
        .correlation_id("corr-1")
        .tenant_id("tenant-1")
        .header("X-Custom", "value with spaces")
        .typed_payload(&("a", 1u32), bus_core::Codec::MessagePack)
        .unwrap()
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let subscription = subscriber
        .subscribe(
            &topic,
            Arc::new(handler_fn(move |e: Envelope| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(e);
                    Ok(())
                }
            })),
        )
        .await
        .expect("subscribe");
    let receipt = publisher
        .publish(&topic, sent.clone())
        .await
        .expect("publish");
    let published = receipt.await.expect("stored");
    assert_eq!(published.topic, topic);
    assert!(!published.duplicate);
    let received = tokio::time::timeout(STEP_TIMEOUT, rx.recv())
        .await
        .expect("envelope arrives")
        .expect("channel open");
    assert_eq!(received, sent);
    assert_eq!(
        received.decode_payload::<(String, u32)>().unwrap(),
        ("a".into(), 1)
    );
    subscription.close().await.expect("close");
}

/// Many aggregates, several concurrent publishers: each aggregate's events are handled in
/// version order, none lost, none duplicated.
pub async fn per_aggregate_order(h: &dyn Harness) {
    per_aggregate_order_with(h, "order", 400, 25, 4).await
}

/// [`per_aggregate_order`] with explicit sizes; returns once verified.
pub async fn per_aggregate_order_with(
    h: &dyn Harness,
    name: &str,
    aggregates: usize,
    versions: u64,
    publishers: usize,
) {
    let topic = h.topic(name);
    let recorder = Recorder::new();
    let subscriber = h.subscriber().await;
    let subscription = subscribe_recording(&*subscriber, &topic, &recorder).await;
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let publisher = h.publisher().await;
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            // Each task owns the aggregates `a` with `a % publishers == p`, and interleaves
            // them version by version, as a service handling many commands would.
            for version in 1..=versions {
                for a in (p..aggregates).step_by(publishers) {
                    let _receipt = publisher
                        .publish(&topic, envelope(&format!("agg-{a}"), version))
                        .await
                        .expect("publish");
                }
            }
            publisher.flush().await.expect("flush");
        }));
    }
    for task in tasks {
        task.await.expect("publisher task");
    }
    let expected = aggregates as u64 * versions;
    recorder.wait_unique(expected).await;
    subscription.close().await.expect("close");
    recorder.verifier.report().assert_exact(expected);
}

/// A handler that fails with a retryable error is retried before the aggregate's next event.
pub async fn redelivery_after_handler_error(h: &dyn Harness) {
    let topic = h.topic("retry");
    let recorder = Recorder::new();
    let attempts = Arc::new(Mutex::new(HashSet::new()));
    let retried = Arc::new(AtomicU64::new(0));
    let subscriber = h.subscriber().await;
    let subscription = {
        let (recorder, attempts, retried, t) = (
            recorder.clone(),
            attempts.clone(),
            retried.clone(),
            topic.clone(),
        );
        subscriber
            .subscribe(
                &topic,
                Arc::new(handler_fn(move |e: Envelope| {
                    let (recorder, attempts, retried, t) = (
                        recorder.clone(),
                        attempts.clone(),
                        retried.clone(),
                        t.clone(),
                    );
                    async move {
                        let key = (e.aggregate_id().to_string(), e.event_version());
                        // Every third version fails on its first attempt.
                        if e.event_version().is_multiple_of(3)
                            && attempts.lock().unwrap().insert(key)
                        {
                            return Err(HandlerError::retryable("transient failure"));
                        }
                        if e.event_version().is_multiple_of(3) {
                            retried.fetch_add(1, Ordering::Relaxed);
                        }
                        recorder.record(&t, &e);
                        Ok(())
                    }
                })),
            )
            .await
            .expect("subscribe")
    };
    let publisher = h.publisher().await;
    let (aggregates, versions) = (20, 12u64);
    for version in 1..=versions {
        for a in 0..aggregates {
            let _receipt = publisher
                .publish(&topic, envelope(&format!("r-{a}"), version))
                .await
                .expect("publish");
        }
    }
    publisher.flush().await.expect("flush");
    let expected = aggregates as u64 * versions;
    recorder.wait_unique(expected).await;
    subscription.close().await.expect("close");
    recorder.verifier.report().assert_exact(expected);
    assert_eq!(
        retried.load(Ordering::Relaxed),
        aggregates as u64 * (versions / 3)
    );
}

/// Closing a subscription half-way and opening a new one loses nothing and repeats nothing.
pub async fn no_loss_across_close_and_reopen(h: &dyn Harness) {
    let topic = h.topic("reopen");
    let recorder = Recorder::new();
    let publisher = h.publisher().await;
    // Enough events that the close comes well before the end, whatever the transport has
    // fetched ahead (a close lets the fetched events finish): more than twice the NATS
    // transport's default MaxAckPending (10 000), which bounds what it holds.
    let (aggregates, versions) = (20, 1_100u64);
    for version in 1..=versions {
        for a in 0..aggregates {
            let _receipt = publisher
                .publish(&topic, envelope(&format!("c-{a}"), version))
                .await
                .expect("publish");
        }
    }
    publisher.flush().await.expect("flush");
    let expected = aggregates as u64 * versions;

    let slow_recorder = {
        let recorder = recorder.clone();
        let t = topic.clone();
        Arc::new(handler_fn(move |e: Envelope| {
            let recorder = recorder.clone();
            let t = t.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                recorder.record(&t, &e);
                Ok(())
            }
        }))
    };
    let first = h.subscriber().await;
    let subscription = first
        .subscribe(&topic, slow_recorder.clone())
        .await
        .expect("subscribe");
    recorder
        .wait_until("a third of the events", STEP_TIMEOUT, |r| {
            r.unique >= expected / 3
        })
        .await;
    subscription.close().await.expect("close");
    let after_close = recorder.verifier.report();
    assert!(
        after_close.unique < expected,
        "the close came after the last event, so reopening was not tested: {after_close:?}"
    );

    let second = h.subscriber().await;
    let subscription = second
        .subscribe(&topic, slow_recorder)
        .await
        .expect("subscribe again");
    recorder.wait_unique(expected).await;
    subscription.close().await.expect("close");
    recorder.verifier.report().assert_exact(expected);
}

/// Events of one topic never reach another topic's subscriber.
pub async fn topic_isolation(h: &dyn Harness) {
    let (a, b) = (h.topic("iso-a"), h.topic("iso-b"));
    let recorder = Recorder::new();
    let subscriber = h.subscriber().await;
    let sub_a = subscribe_recording(&*subscriber, &a, &recorder).await;
    let sub_b = subscribe_recording(&*subscriber, &b, &recorder).await;
    let publisher = h.publisher().await;
    for version in 1..=50 {
        let _receipt = publisher
            .publish(&a, envelope("only-a", version))
            .await
            .expect("publish");
        let _receipt = publisher
            .publish(&b, envelope("only-b", version))
            .await
            .expect("publish");
    }
    publisher.flush().await.expect("flush");
    recorder.wait_unique(100).await;
    sub_a.close().await.expect("close a");
    sub_b.close().await.expect("close b");
    let report = recorder.verifier.report();
    report.assert_exact(100);
    // Had a message crossed topics, its aggregate would appear under the other topic too.
    assert_eq!(report.aggregates, 2, "{report:?}");
    assert_eq!(recorder.verifier.last_version(a.as_str(), "only-b"), 0);
    assert_eq!(recorder.verifier.last_version(b.as_str(), "only-a"), 0);
}

/// Closing a publisher stores everything published before, even if no receipt was awaited.
pub async fn publisher_close_flushes(h: &dyn Harness) {
    let topic = h.topic("close-flush");
    let publisher = h.publisher().await;
    let n = 2_000u64;
    for version in 1..=n {
        // Receipts are dropped on purpose: close() must still wait for every message.
        let _receipt = publisher
            .publish(&topic, envelope("flushed", version))
            .await
            .expect("publish");
    }
    publisher.close().await.expect("close flushes");
    let refused = publisher.publish(&topic, envelope("flushed", n + 1)).await;
    assert!(
        matches!(&refused, Err(e) if e.kind() == bus_core::PublishErrorKind::Closed),
        "publish after close must fail with Closed, got {refused:?}"
    );
    let recorder = Recorder::new();
    let subscriber = h.subscriber().await;
    let subscription = subscribe_recording(&*subscriber, &topic, &recorder).await;
    recorder.wait_unique(n).await;
    subscription.close().await.expect("close");
    recorder.verifier.report().assert_exact(n);
}

/// `close` waits for a handler in progress, and its event is not handled again later.
pub async fn graceful_shutdown(h: &dyn Harness) {
    let topic = h.topic("graceful");
    let publisher = h.publisher().await;
    let recorder = Recorder::new();
    let started = Arc::new(Notify::new());
    let finished = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (recorder, started, finished, t) = (
            recorder.clone(),
            started.clone(),
            finished.clone(),
            topic.clone(),
        );
        Arc::new(handler_fn(move |e: Envelope| {
            let (recorder, started, finished, t) = (
                recorder.clone(),
                started.clone(),
                finished.clone(),
                t.clone(),
            );
            async move {
                if e.event_version() == 1 {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                recorder.record(&t, &e);
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }))
    };
    let subscriber = h.subscriber().await;
    let subscription = subscriber
        .subscribe(&topic, handler.clone())
        .await
        .expect("subscribe");
    let _receipt = publisher
        .publish(&topic, envelope("slow", 1))
        .await
        .expect("publish");
    publisher.flush().await.expect("flush");
    tokio::time::timeout(STEP_TIMEOUT, started.notified())
        .await
        .expect("handler starts");
    let report = subscription
        .close()
        .await
        .expect("close waits for the handler");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "close returned before the handler finished"
    );
    assert_eq!(report.handled, 1);
    // The event was acknowledged: a new subscriber sees only what comes next.
    let subscription = subscriber
        .subscribe(&topic, handler)
        .await
        .expect("subscribe again");
    let _receipt = publisher
        .publish(&topic, envelope("slow", 2))
        .await
        .expect("publish");
    publisher.flush().await.expect("flush");
    recorder.wait_unique(2).await;
    subscription.close().await.expect("close");
    recorder.verifier.report().assert_exact(2);
}

/// A handler that gives up with a retryable error when its subscription's cancellation fires
/// (at close) has its event, and the aggregate's later ones, handed to the next subscription
/// in order: not retried, not dead-lettered, not overtaken.
pub async fn cancelled_handler_returns_its_events(h: &dyn Harness) {
    let topic = h.topic("cancel");
    let publisher = h.publisher().await;
    let started = Arc::new(Notify::new());
    let gave_up = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (started, gave_up) = (started.clone(), gave_up.clone());
        Arc::new(handler_fn(move |e: Envelope| {
            let (started, gave_up) = (started.clone(), gave_up.clone());
            async move {
                let delivery = bus_core::current_delivery().expect("inside a handler call");
                if e.event_version() == 1 {
                    started.notify_one();
                }
                delivery.cancellation.cancelled().await;
                gave_up.fetch_add(1, Ordering::SeqCst);
                Err(HandlerError::retryable("the subscription is going"))
            }
        }))
    };
    let subscriber = h.subscriber().await;
    let subscription = subscriber
        .subscribe(&topic, handler)
        .await
        .expect("subscribe");
    for version in 1..=3 {
        let _receipt = publisher
            .publish(&topic, envelope("c", version))
            .await
            .expect("publish");
    }
    publisher.flush().await.expect("flush");
    tokio::time::timeout(STEP_TIMEOUT, started.notified())
        .await
        .expect("handler starts");
    let report = tokio::time::timeout(STEP_TIMEOUT, subscription.close())
        .await
        .expect("close fires the cancellation and returns")
        .expect("close");
    assert_eq!(
        gave_up.load(Ordering::SeqCst),
        1,
        "one call, not retried; the later events did not reach the handler"
    );
    assert_eq!(report.handled, 0, "{report:?}");
    assert!(report.returned >= 1, "{report:?}");
    let recorder = Recorder::new();
    let subscription = subscribe_recording(&*subscriber, &topic, &recorder).await;
    recorder.wait_unique(3).await;
    subscription.close().await.expect("close");
    recorder.verifier.report().assert_exact(3);
}

/// Raw messages keyed by a header are handled in order per key.
pub async fn raw_ordered_by_key(h: &dyn Harness) {
    let topic = h.topic("raw");
    let recorder = Recorder::new();
    let subscriber = h.subscriber().await;
    let subscription = {
        let recorder = recorder.clone();
        let t = topic.clone();
        subscriber
            .subscribe_raw(
                &topic,
                RawKey::header("X-Key"),
                Arc::new(bus_core::raw_handler_fn(move |m| {
                    let recorder = recorder.clone();
                    let t = t.clone();
                    async move {
                        let key = m.header("X-Key").unwrap_or_default().to_owned();
                        let n: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                        recorder.verifier.record(t.as_str(), &key, n);
                        recorder.changed.notify_waiters();
                        Ok(())
                    }
                })),
            )
            .await
            .expect("subscribe raw")
    };
    let publisher = h.publisher().await;
    for n in 1..=100u64 {
        for key in ["k1", "k2", "k3"] {
            let _receipt = publisher
                .publish_raw(
                    &topic,
                    vec![("X-Key".into(), key.into())],
                    Bytes::from(n.to_string()),
                )
                .await
                .expect("publish raw");
        }
    }
    publisher.flush().await.expect("flush");
    recorder.wait_unique(300).await;
    subscription.close().await.expect("close");
    recorder.verifier.report().assert_exact(300);
}

/// Generates one `#[tokio::test]` per function of the suite, each against a fresh harness from
/// `$harness` (an expression, which may `.await`), so that a transport's tests cannot miss one.
/// The calling crate needs `tokio` with `macros` and `rt-multi-thread`.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@each $harness;
            round_trip,
            per_aggregate_order,
            redelivery_after_handler_error,
            no_loss_across_close_and_reopen,
            topic_isolation,
            publisher_close_flushes,
            graceful_shutdown,
            cancelled_handler_returns_its_events,
            raw_ordered_by_key,
        );
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $crate::conformance::$name(&$harness).await;
        }
    )*};
}

/// Runs every function of the suite in turn.
pub async fn run_all(h: &dyn Harness) {
    round_trip(h).await;
    per_aggregate_order(h).await;
    redelivery_after_handler_error(h).await;
    no_loss_across_close_and_reopen(h).await;
    topic_isolation(h).await;
    publisher_close_flushes(h).await;
    graceful_shutdown(h).await;
    cancelled_handler_returns_its_events(h).await;
    raw_ordered_by_key(h).await;
}
