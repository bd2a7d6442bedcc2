//! What a handler can learn about the delivery it runs for: which attempt this is, where the
//! event sits in the broker's log, its partition, and a signal that the subscription is going.
//!
//! A transport runs each handler call inside [`with_delivery`]; the handler (or anything it
//! calls on the same task) reads it with [`current_delivery`].

use std::fmt;
use std::future::Future;

use tokio::sync::watch;

use crate::envelope::Envelope;
use crate::trace::{TraceParent, TRACEPARENT};

/// Where and how the event a handler is running for was delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Which attempt this is at handling the event, counted from 1. Retries in place count up;
    /// a redelivery after a crash or a resumed halt starts again at 1.
    pub attempt: u32,
    /// The event's position in its stream or log, when the transport has one. Within one
    /// partition (or one unpartitioned topic) positions only grow, so it serves as a fencing
    /// token for the handler's own writes: a store that refuses a write older than the last it
    /// accepted for the partition never takes one from an owner that lost the partition while
    /// it was running.
    pub stream_sequence: Option<u64>,
    /// The partition of a partitioned topic, `None` otherwise.
    pub partition: Option<u32>,
    /// Fires when the subscription stops waiting for this call's outcome to matter.
    pub cancellation: Cancellation,
    /// The W3C trace context the event carried (its `traceparent` header), if any. What the
    /// handler publishes continues this trace.
    pub traceparent: Option<TraceParent>,
}

impl Delivery {
    /// A first attempt with no position, no partition and a signal that never fires.
    pub fn new(attempt: u32) -> Self {
        Self {
            attempt,
            stream_sequence: None,
            partition: None,
            cancellation: Cancellation::never(),
            traceparent: None,
        }
    }
}

tokio::task_local! {
    static DELIVERY: Delivery;
}

/// Inside a handler call: where the event being handled was delivered from. `None` outside one
/// (and on tasks the handler spawned).
pub fn current_delivery() -> Option<Delivery> {
    DELIVERY.try_with(Delivery::clone).ok()
}

/// The trace context of the event being handled on this task, under a new parent.
fn current_trace_child(parent_id: impl FnOnce() -> u64) -> Option<TraceParent> {
    DELIVERY
        .try_with(|d| d.traceparent.as_ref().map(|t| t.child(parent_id())))
        .ok()
        .flatten()
}

/// What a publisher does to each envelope before sending it: one without a `traceparent`
/// header gets one that continues the trace of the event being handled on this task (when
/// published from a handler) or, failing that, starts from the envelope's trace ID when that
/// is a W3C trace ID. `parent_id` gives the new parent ID (random, from the transport), called
/// only when one is needed.
pub fn continue_trace(envelope: Envelope, parent_id: impl FnOnce() -> u64) -> Envelope {
    if envelope.headers().contains_key(TRACEPARENT) {
        return envelope;
    }
    let mut parent_id = Some(parent_id);
    let mut next_id = || parent_id.take().map_or(1, |f| f());
    let traceparent = current_trace_child(&mut next_id).or_else(|| {
        envelope
            .trace_id()
            .and_then(|id| TraceParent::new(id, next_id()))
    });
    match traceparent {
        Some(traceparent) => envelope.with_traceparent(&traceparent),
        None => envelope,
    }
}

/// Runs `call` (a handler call) with `delivery` readable through [`current_delivery`]. For
/// transports.
pub async fn with_delivery<F: Future>(delivery: Delivery, call: F) -> F::Output {
    DELIVERY.scope(delivery, call).await
}

/// A signal that a subscription no longer waits for a handler's outcome, or will not
/// acknowledge it: the subscription is closing, or it lost its topic to another subscription of
/// its group (which gets the event again). A handler doing long work can stop early when it
/// fires: a *retryable* error returned then is not retried and never dead-lettered; the event
/// stays unacknowledged, with its aggregate's later events, and comes again, in order.
#[derive(Clone)]
pub struct Cancellation(Option<watch::Receiver<bool>>);

impl Cancellation {
    /// A signal that never fires.
    pub fn never() -> Self {
        Self(None)
    }

    /// Whether it has fired.
    pub fn is_cancelled(&self) -> bool {
        self.0.as_ref().is_some_and(|rx| *rx.borrow())
    }

    /// Resolves when it fires (never, for [`Cancellation::never`]).
    pub async fn cancelled(&self) {
        match &self.0 {
            Some(rx) => {
                let mut rx = rx.clone();
                // An error means the source is gone without firing: it never will.
                if rx.wait_for(|fired| *fired).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl fmt::Debug for Cancellation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Cancellation")
            .field(&self.is_cancelled())
            .finish()
    }
}

/// The sending side of [`Cancellation`], kept by a transport.
#[derive(Debug)]
pub struct CancelSource(watch::Sender<bool>);

impl CancelSource {
    /// A source that has not fired.
    pub fn new() -> Self {
        Self(watch::channel(false).0)
    }

    /// A signal that fires when [`CancelSource::cancel`] is called.
    pub fn signal(&self) -> Cancellation {
        Cancellation(Some(self.0.subscribe()))
    }

    /// Fires every signal it gave out.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
}

impl Default for CancelSource {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_sees_its_delivery_and_its_signal_fires() {
        assert!(current_delivery().is_none());
        let source = CancelSource::new();
        let delivery = Delivery {
            attempt: 3,
            stream_sequence: Some(17),
            partition: Some(2),
            cancellation: source.signal(),
            traceparent: None,
        };
        let seen = with_delivery(delivery, async {
            let d = current_delivery().expect("inside a call");
            assert!(!d.cancellation.is_cancelled());
            source.cancel();
            d.cancellation.cancelled().await;
            (
                d.attempt,
                d.stream_sequence,
                d.partition,
                d.cancellation.is_cancelled(),
            )
        })
        .await;
        assert_eq!(seen, (3, Some(17), Some(2), true));
        assert!(current_delivery().is_none());
        assert!(!Cancellation::never().is_cancelled());
    }

    #[tokio::test]
    async fn a_publish_continues_the_trace_of_the_event_being_handled() {
        let plain = Envelope::builder("a", "T", 1).build().unwrap();
        // Outside a handler, with no W3C trace ID: nothing to continue.
        let out = continue_trace(plain.clone(), || panic!("no parent ID is needed"));
        assert!(out.headers().get(TRACEPARENT).is_none());
        // A W3C trace ID on the envelope starts the trace.
        let traced = Envelope::builder("a", "T", 1)
            .trace_id("4bf92f3577b34da6a3ce929d0e0e4736")
            .build()
            .unwrap();
        let out = continue_trace(traced, || 7);
        assert_eq!(
            out.headers()[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000007-01"
        );
        // Inside a handler, the handled event's trace wins, under the new parent.
        let mut delivery = Delivery::new(1);
        delivery.traceparent =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let out = with_delivery(delivery, async { continue_trace(plain, || 9) }).await;
        assert_eq!(
            out.headers()[TRACEPARENT],
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000009-01"
        );
        // One set by the user is kept.
        let own = Envelope::builder("a", "T", 1)
            .header(
                TRACEPARENT,
                "00-11111111111111111111111111111111-2222222222222222-00",
            )
            .build()
            .unwrap();
        let out = continue_trace(own.clone(), || 5);
        assert_eq!(out, own);
    }
}
