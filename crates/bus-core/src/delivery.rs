//! What a handler can learn about the delivery it runs for: which attempt this is, where the
//! event sits in the broker's log, its partition, and a signal that the subscription is going.
//!
//! A transport runs each handler call inside [`with_delivery`]; the handler (or anything it
//! calls on the same task) reads it with [`current_delivery`].

use std::fmt;
use std::future::Future;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use tokio::sync::Notify;

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
    /// it was running. Events of one record batch share it (see `batch_index`): positions
    /// never go down, but may repeat.
    pub stream_sequence: Option<u64>,
    /// For an event that travelled in a record batch (several events in one message, which
    /// share its `stream_sequence`): its index in the batch, from 0. `(stream_sequence,
    /// batch_index)` grows within a partition like the position alone does for single events.
    pub batch_index: Option<u32>,
    /// The partition of a partitioned topic, `None` otherwise.
    pub partition: Option<u32>,
    /// Fires when the subscription stops waiting for this call's outcome to matter.
    pub cancellation: Cancellation,
    /// The W3C trace context the event carried (its `traceparent` header), if any. What the
    /// handler publishes continues this trace.
    pub traceparent: Option<TraceParent>,
    /// When the broker stored the event, by the broker's clock, if the transport knows it.
    pub stored_at: Option<std::time::SystemTime>,
    /// When this process received it from the broker, before queueing it for its handler, if
    /// the transport tells. With `stored_at` and the time the handler starts, it splits an
    /// event's latency into its stages (the broker, the wire and fetch, the queue).
    pub received_at: Option<std::time::SystemTime>,
    /// The subscription's current hold on its topic (or partition), when the transport has
    /// one: an identifier unique in the process that changes whenever the subscription loses
    /// the topic and gains it again, or an operator moves its delivery. While it stays the
    /// same, no other subscription handles the topic's aggregates (calls an earlier owner had
    /// started aside), so what a handler learned about an aggregate under it stays true under
    /// it: [`HandledOnce`](crate::HandledOnce) keeps the versions it read and wrote per term.
    pub ownership_term: Option<u64>,
}

impl Delivery {
    /// A first attempt with no position, no partition and a signal that never fires.
    pub fn new(attempt: u32) -> Self {
        Self {
            attempt,
            stream_sequence: None,
            batch_index: None,
            partition: None,
            cancellation: Cancellation::never(),
            traceparent: None,
            stored_at: None,
            received_at: None,
            ownership_term: None,
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

/// Inside a handler call: `read` applied to the delivery of the event being handled, without
/// copying it (what [`current_delivery`] does). `None` outside one.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use bus_core::{with_current_delivery, with_delivery, Delivery};
/// assert_eq!(with_current_delivery(|d| d.attempt), None);
/// let attempt = with_delivery(Delivery::new(2), async { with_current_delivery(|d| d.attempt) });
/// assert_eq!(attempt.await, Some(2));
/// # });
/// ```
pub fn with_current_delivery<R>(read: impl FnOnce(&Delivery) -> R) -> Option<R> {
    DELIVERY.try_with(read).ok()
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
pub fn continue_trace(envelope: &mut Envelope, parent_id: impl FnOnce() -> u64) {
    if envelope.headers().contains_key(TRACEPARENT) {
        return;
    }
    let mut parent_id = Some(parent_id);
    let mut next_id = || parent_id.take().map_or(1, |f| f());
    let traceparent = current_trace_child(&mut next_id).or_else(|| {
        envelope
            .trace_id()
            .and_then(|id| TraceParent::new(id, next_id()))
    });
    if let Some(traceparent) = traceparent {
        envelope.set_traceparent(&traceparent);
    }
}

/// Runs `call` (a handler call) with `delivery` readable through [`current_delivery`]. For
/// transports. The scope itself is the future: no wrapper to move the call into.
pub fn with_delivery<F: Future>(delivery: Delivery, call: F) -> impl Future<Output = F::Output> {
    DELIVERY.scope(delivery, call)
}

/// A signal that a subscription no longer waits for a handler's outcome, or will not
/// acknowledge it: the subscription is closing, or it lost its topic to another subscription of
/// its group (which gets the event again). A handler doing long work can stop early when it
/// fires: a *retryable* error returned then is not retried and never dead-lettered; the event
/// stays unacknowledged, with its aggregate's later events, and comes again, in order.
///
/// A signal is two numbers (its source and the source's generation when it was given out), so
/// giving one to every handler call costs no shared reference count; its source is looked up
/// only when the handler asks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cancellation(Option<(u64, u64)>);

/// What a source shares with the signals it gave out.
#[derive(Debug, Default)]
struct SourceState {
    /// Bumped by each `cancel`: the signals of earlier generations have fired.
    generation: AtomicU64,
    /// Set by `close`: every signal has fired, whatever its generation.
    closed: AtomicBool,
    fired: Notify,
}

/// Every live source, by ID; a signal whose source is gone has fired.
fn sources() -> &'static RwLock<HashMap<u64, Arc<SourceState>>> {
    static SOURCES: OnceLock<RwLock<HashMap<u64, Arc<SourceState>>>> = OnceLock::new();
    SOURCES.get_or_init(Default::default)
}

impl Cancellation {
    /// A signal that never fires.
    pub fn never() -> Self {
        Self(None)
    }

    fn state(&self) -> Option<Option<Arc<SourceState>>> {
        let (id, _) = self.0?;
        Some(sources().read().unwrap().get(&id).cloned())
    }

    fn fired_in(&self, state: &SourceState) -> bool {
        let generation = self.0.map_or(0, |(_, g)| g);
        state.closed.load(Ordering::Acquire)
            || state.generation.load(Ordering::Acquire) != generation
    }

    /// Whether it has fired.
    pub fn is_cancelled(&self) -> bool {
        match self.state() {
            None => false,
            Some(None) => true,
            Some(Some(state)) => self.fired_in(&state),
        }
    }

    /// Resolves when it fires (never, for [`Cancellation::never`]).
    pub async fn cancelled(&self) {
        let state = match self.state() {
            None => return std::future::pending().await,
            Some(None) => return,
            Some(Some(state)) => state,
        };
        loop {
            let fired = state.fired.notified();
            tokio::pin!(fired);
            fired.as_mut().enable();
            if self.fired_in(&state) {
                return;
            }
            fired.await;
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

/// The sending side of [`Cancellation`], kept by a transport: one per subscription.
#[derive(Debug)]
pub struct CancelSource {
    id: u64,
    state: Arc<SourceState>,
}

impl CancelSource {
    /// A source that has not fired.
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(SourceState::default());
        sources().write().unwrap().insert(id, state.clone());
        Self { id, state }
    }

    /// A signal that fires at the next [`cancel`](Self::cancel) or at
    /// [`close`](Self::close). Reads one number: cheap enough for every handler call.
    pub fn signal(&self) -> Cancellation {
        Cancellation(Some((
            self.id,
            self.state.generation.load(Ordering::Acquire),
        )))
    }

    /// Fires every signal given out so far; later ones are fresh (the subscription lost its
    /// topic, and may own it again).
    pub fn cancel(&self) {
        self.state.generation.fetch_add(1, Ordering::AcqRel);
        self.state.fired.notify_waiters();
    }

    /// Whether a cancel or close happened since `signal` was given out: the same as
    /// `signal.is_cancelled()`, without the lookup.
    pub fn has_fired(&self, signal: &Cancellation) -> bool {
        signal.fired_in(&self.state)
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Acquire)
    }

    /// Fires every signal, given out already or later (the subscription is closing).
    pub fn close(&self) {
        self.state.closed.store(true, Ordering::Release);
        self.state.fired.notify_waiters();
    }
}

impl Default for CancelSource {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CancelSource {
    fn drop(&mut self) {
        self.close();
        sources().write().unwrap().remove(&self.id);
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
            batch_index: None,
            partition: Some(2),
            cancellation: source.signal(),
            traceparent: None,
            stored_at: None,
            received_at: None,
            ownership_term: None,
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
        // A signal given out after a cancel is fresh; a close fires every signal, and a signal
        // outlives its source as fired.
        let fresh = source.signal();
        assert!(!fresh.is_cancelled() && !source.has_fired(&fresh));
        let waiting = tokio::spawn(async move { fresh.cancelled().await });
        source.close();
        waiting.await.unwrap();
        assert!(fresh.is_cancelled() && source.signal().is_cancelled());
        drop(source);
        assert!(fresh.is_cancelled());
    }

    #[tokio::test]
    async fn a_publish_continues_the_trace_of_the_event_being_handled() {
        let plain = Envelope::builder("a", "T", 1).build().unwrap();
        // Outside a handler, with no W3C trace ID: nothing to continue.
        let mut out = plain.clone();
        continue_trace(&mut out, || panic!("no parent ID is needed"));
        assert!(out.headers().get(TRACEPARENT).is_none());
        // A W3C trace ID on the envelope starts the trace.
        let traced = Envelope::builder("a", "T", 1)
            .trace_id("4bf92f3577b34da6a3ce929d0e0e4736")
            .build()
            .unwrap();
        let mut out = traced;
        continue_trace(&mut out, || 7);
        assert_eq!(
            out.headers()[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000007-01"
        );
        // Inside a handler, the handled event's trace wins, under the new parent.
        let mut delivery = Delivery::new(1);
        delivery.traceparent =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let out = with_delivery(delivery, async {
            let mut out = plain;
            continue_trace(&mut out, || 9);
            out
        })
        .await;
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
        let mut out = own.clone();
        continue_trace(&mut out, || 5);
        assert_eq!(out, own);
    }
}
