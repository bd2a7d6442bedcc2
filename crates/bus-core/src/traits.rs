//! The traits a transport implements and a user implements.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::envelope::Envelope;
use crate::error::{HandlerError, PublishError, SubscribeError, SubscribeErrorKind};
use crate::names::Topic;

/// Handles the events of one topic.
///
/// Calls for one aggregate never overlap and come in version order; calls for different
/// aggregates run in parallel. Returning `Ok` acknowledges the event; returning an error hands
/// it to the transport's retry and failure policy, and the aggregate's later events wait.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one event.
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError>;
}

/// A message received on a raw (non-envelope) subscription.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// The topic it was received on.
    pub topic: Topic,
    /// The concrete subject or channel it was published to.
    pub subject: String,
    /// Its headers, as received.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub payload: Bytes,
}

impl RawMessage {
    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Handles raw messages of one topic.
#[async_trait]
pub trait RawHandler: Send + Sync + 'static {
    /// Handles one message.
    async fn handle(&self, message: RawMessage) -> Result<(), HandlerError>;
}

/// A function that extracts the ordering key of a raw message.
pub type KeyExtractor = Arc<dyn Fn(&RawMessage) -> Option<String> + Send + Sync>;

/// How a raw subscription chooses the ordering key of a message.
#[derive(Clone, Default)]
pub enum RawKey {
    /// All messages of one subject are handled in order (the default).
    #[default]
    Subject,
    /// Messages with the same extracted key are handled in order. A message for which the
    /// function returns `None` cannot be ordered and takes the transport's dead-letter path.
    Extract(KeyExtractor),
}

impl RawKey {
    /// Orders by the value of header `name`.
    pub fn header(name: impl Into<String>) -> Self {
        let name = name.into();
        RawKey::Extract(Arc::new(move |m| m.header(&name).map(str::to_owned)))
    }

    /// The key of `message`, or `None` if it has none.
    pub fn key_of(&self, message: &RawMessage) -> Option<String> {
        match self {
            RawKey::Subject => Some(message.subject.clone()),
            RawKey::Extract(f) => f(message),
        }
    }
}

impl fmt::Debug for RawKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawKey::Subject => f.write_str("RawKey::Subject"),
            RawKey::Extract(_) => f.write_str("RawKey::Extract(..)"),
        }
    }
}

/// What a transport reports once a message is safely stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The topic it was published on.
    pub topic: Topic,
    /// Its position in the broker's log, if the broker has one.
    pub sequence: Option<u64>,
    /// Whether the broker recognised it as a repeat of an earlier publish of the same event ID.
    pub duplicate: bool,
}

/// A future that resolves when the broker has stored (or refused) one published message.
///
/// Dropping a receipt does not lose the outcome: a transport also reports failures through
/// its `flush` and its error callback.
#[must_use = "a receipt says whether the message was stored; await it or rely on flush()"]
pub struct Receipt(ReceiptInner);

enum ReceiptInner {
    Boxed(Pin<Box<dyn Future<Output = Result<Published, PublishError>> + Send>>),
    Channel(tokio::sync::oneshot::Receiver<Result<Published, PublishError>>),
    Shared(Arc<dyn PublishOutcome>),
    Ready(Option<Result<Published, PublishError>>),
}

/// A transport's own record of one publish's outcome, which a [`Receipt`] made with
/// [`Receipt::from_outcome`] waits on: it can live in the allocation the transport keeps for
/// the publish anyway, where a channel would be one more per message.
pub trait PublishOutcome: Send + Sync + 'static {
    /// The outcome, once known (handed out once: a receipt reads it once); until then
    /// `Pending`, with `cx`'s waker kept to be woken when it is known. A transport that can
    /// no longer settle the publish resolves it as an error rather than leave it pending.
    fn poll_outcome(&self, cx: &mut Context<'_>) -> Poll<Result<Published, PublishError>>;
}

impl Receipt {
    /// Wraps a transport's future.
    pub fn new(
        future: impl Future<Output = Result<Published, PublishError>> + Send + 'static,
    ) -> Self {
        Self(ReceiptInner::Boxed(Box::pin(future)))
    }

    /// A receipt resolved by whatever the transport sends on `outcome`, without a future of
    /// its own to allocate; if the sender is dropped unsent, it resolves as a
    /// [`PublishErrorKind::Connection`](crate::PublishErrorKind::Connection) error.
    pub fn from_channel(
        outcome: tokio::sync::oneshot::Receiver<Result<Published, PublishError>>,
    ) -> Self {
        Self(ReceiptInner::Channel(outcome))
    }

    /// A receipt resolved by the transport's shared record of the publish.
    pub fn from_outcome(outcome: Arc<dyn PublishOutcome>) -> Self {
        Self(ReceiptInner::Shared(outcome))
    }

    /// A receipt that is already resolved.
    pub fn ready(result: Result<Published, PublishError>) -> Self {
        Self(ReceiptInner::Ready(Some(result)))
    }
}

impl Future for Receipt {
    type Output = Result<Published, PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            ReceiptInner::Boxed(future) => future.as_mut().poll(cx),
            ReceiptInner::Channel(outcome) => Pin::new(outcome).poll(cx).map(|sent| {
                sent.unwrap_or_else(|_| {
                    Err(PublishError::new(
                        crate::PublishErrorKind::Connection,
                        "the publisher stopped before the broker's answer arrived",
                    ))
                })
            }),
            ReceiptInner::Shared(outcome) => outcome.poll_outcome(cx),
            ReceiptInner::Ready(result) => Poll::Ready(
                result
                    .take()
                    .expect("a receipt is not polled after it resolved"),
            ),
        }
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Receipt(..)")
    }
}

/// Publishes envelopes and raw messages.
///
/// Envelopes published in order from one task are stored in that order.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Sends `envelope` on `topic` and returns once it is handed to the transport, without
    /// waiting for the broker. May wait while the transport's in-flight window is full.
    async fn publish(&self, topic: &Topic, envelope: Envelope) -> Result<Receipt, PublishError>;

    /// Sends raw bytes with optional headers on `topic`.
    async fn publish_raw(
        &self,
        topic: &Topic,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<Receipt, PublishError>;

    /// Waits until every message sent so far is stored or has failed; returns the first
    /// failure since the previous flush, if any.
    async fn flush(&self) -> Result<(), PublishError>;

    /// Flushes, then refuses further publishes.
    async fn close(&self) -> Result<(), PublishError>;
}

/// What a closed subscription did with its in-flight messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Messages handled and acknowledged over the subscription's life.
    pub handled: u64,
    /// Messages that were received but not handled before close; the broker delivers them
    /// again to the next subscriber, in order.
    pub returned: u64,
    /// Messages handled and acknowledged whose acknowledgement the broker had still not taken
    /// into account when the subscription closed (after it was sent again): the next
    /// subscriber receives them again, in order. Zero unless the broker lost acknowledgements
    /// (a cluster electing a consumer leader at that moment).
    pub unconfirmed: u64,
}

/// An aggregate whose events wait because one of them failed under
/// [`FailurePolicy::HaltAggregate`](crate::FailurePolicy::HaltAggregate).
///
/// Serialises (with serde) for remote control: a transport may carry it to an operator.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HaltedAggregate {
    /// The ordering key: the aggregate ID (or what the raw key extractor returned).
    pub key: String,
    /// Events waiting, the failed one included.
    pub waiting: usize,
    /// When it halted.
    pub since: std::time::SystemTime,
    /// Why, as in a dead letter's reason: `permanent`, `retries-exhausted` or `panic`.
    pub reason: String,
    /// The last error's text.
    pub error: String,
    /// Handler attempts made on the failed event.
    pub attempts: u32,
    /// The failed event's version, when the message is an envelope.
    pub event_version: Option<u64>,
    /// The failed message's position in its stream, when the transport has one.
    pub stream_sequence: Option<u64>,
}

/// Counters of one subscription, for metrics and health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionMetrics {
    /// Messages handled and acknowledged.
    pub handled: u64,
    /// Messages dead-lettered (any reason, `skipped` included).
    pub dead_lettered: u64,
    /// Redelivered copies recognised and not handed to the handler again.
    pub copies_skipped: u64,
    /// Messages received and not yet settled: queued, running, retrying or held.
    pub in_flight: u64,
    /// Of those, messages waiting in the worker queues for their aggregate's turn.
    pub queued: u64,
    /// Messages handled whose acknowledgement waits for an earlier message that holds an event
    /// of one of their aggregates (record batches): a successor after a crash replays each
    /// aggregate as a contiguous run, never an old event after a newer one.
    pub acks_waiting: u64,
    /// Aggregates halted now.
    pub halted_aggregates: u64,
    /// Events held behind halted aggregates now, the failed ones included.
    pub halted_events: u64,
    /// Whether this subscription consumes its topic now; `false` while it waits as a standby
    /// for another subscription of its group (in this or another process) to go. A transport
    /// may leave a standby waiting after the owner went until there is something to deliver
    /// (the NATS transport's pinned group does): a quiet topic can then have no owner at all.
    pub owner: bool,
    /// Times this subscription became the one consuming its topic.
    pub ownership_gained: u64,
    /// Times it lost the topic to another subscription of its group.
    pub ownership_lost: u64,
    /// Times delivery was restarted in order after a discontinuity (a dropped connection, a
    /// gap in the deliveries, a consumer-leader change).
    pub delivery_restarts: u64,
    /// Times an operator moved delivery to another point of the topic (a reset of the group:
    /// every aggregate's events come again from there, in order).
    pub delivery_moves: u64,
    /// Messages no client could read, dead-lettered with their raw bytes and removed.
    pub unreadable: u64,
    /// For a partitioned topic, the partitions this subscription consumes now (its share of
    /// the consumer group); 0 otherwise.
    pub partitions: u64,
}

/// Operator control and metrics of a subscription: its counters, and its halted aggregates.
#[async_trait]
pub trait AggregateControl: Send + Sync {
    /// A snapshot of the subscription's counters.
    fn metrics(&self) -> SubscriptionMetrics;

    /// Every halted aggregate, in no particular order.
    fn halted(&self) -> Vec<HaltedAggregate>;

    /// Hands the failed event to the handler again (with the full retry policy), then the
    /// aggregate's waiting events in order. If it fails again the aggregate halts again.
    /// Returns once the resumption is queued behind the aggregate's earlier work.
    async fn resume(&self, key: &str) -> Result<(), SubscribeError>;

    /// Dead-letters the failed event (reason `skipped`) and goes on with the aggregate's
    /// waiting events in order.
    async fn skip(&self, key: &str) -> Result<(), SubscribeError>;

    /// For a partitioned topic, the partitions this subscription consumes now (what
    /// [`restart_at`](Self::restart_at) moves); empty otherwise (the default).
    fn partitions(&self) -> Vec<u32> {
        Vec::new()
    }

    /// Moves delivery to stream position `sequence` (earlier, to rebuild from there, or later,
    /// to skip ahead): handlers already running finish, what is queued is released unhandled,
    /// and every aggregate's events are delivered again in order from `sequence`. Only the
    /// subscription that consumes the topic can (`NotOwner` otherwise). Returns once delivery
    /// restarted there. Transports without stream positions answer `Unsupported` (the
    /// default).
    async fn restart_at(&self, sequence: u64) -> Result<(), SubscribeError> {
        Err(SubscribeError::new(
            SubscribeErrorKind::Unsupported,
            format!(
                "this transport cannot restart delivery at a stream position (asked: {sequence})"
            ),
        ))
    }
}

/// A transport's side of an active subscription.
#[async_trait]
pub trait SubscriptionHandle: Send + Sync {
    /// Stops receiving, lets in-flight handlers finish within `deadline`, acknowledges what
    /// succeeded and never what did not.
    async fn close(self: Box<Self>, deadline: Duration) -> Result<CloseReport, SubscribeError>;

    /// Control of halted aggregates, if the transport supports
    /// [`FailurePolicy::HaltAggregate`](crate::FailurePolicy::HaltAggregate).
    fn control(&self) -> Option<Arc<dyn AggregateControl>> {
        None
    }
}

/// An active subscription; close it with [`Subscription::close`] for a graceful stop.
pub struct Subscription(Box<dyn SubscriptionHandle>);

impl Subscription {
    /// Default time [`Subscription::close`] waits for in-flight handlers.
    pub const DEFAULT_CLOSE_DEADLINE: Duration = Duration::from_secs(10);

    /// Wraps a transport's handle.
    pub fn new(handle: impl SubscriptionHandle + 'static) -> Self {
        Self(Box::new(handle))
    }

    /// Stops the subscription gracefully, waiting at most [`Self::DEFAULT_CLOSE_DEADLINE`].
    pub async fn close(self) -> Result<CloseReport, SubscribeError> {
        self.0.close(Self::DEFAULT_CLOSE_DEADLINE).await
    }

    /// Stops the subscription gracefully, waiting at most `deadline` for in-flight handlers.
    pub async fn close_within(self, deadline: Duration) -> Result<CloseReport, SubscribeError> {
        self.0.close(deadline).await
    }

    /// Lists, resumes and skips halted aggregates; `None` if the transport has no halt policy.
    /// The handle stays usable while the subscription runs and may be kept separately.
    pub fn control(&self) -> Option<Arc<dyn AggregateControl>> {
        self.0.control()
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subscription(..)")
    }
}

/// Starts subscriptions.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Delivers the envelopes of `topic` to `handler`, per aggregate in order.
    async fn subscribe(
        &self,
        topic: &Topic,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription, SubscribeError>;

    /// Delivers raw messages of `topic` to `handler`, in order per `key`.
    async fn subscribe_raw(
        &self,
        topic: &Topic,
        key: RawKey,
        handler: Arc<dyn RawHandler>,
    ) -> Result<Subscription, SubscribeError>;
}

/// A [`Handler`] made from an async closure; see [`handler_fn`].
pub struct HandlerFn<F>(F);

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerFn(..)")
    }
}

/// Makes a [`Handler`] from an async closure.
///
/// ```
/// use bus_core::{handler_fn, Handler};
/// let handler = handler_fn(|envelope| async move {
///     println!("{} v{}", envelope.aggregate_id(), envelope.event_version());
///     Ok(())
/// });
/// # fn is_handler(_: impl Handler) {}
/// # is_handler(handler);
/// ```
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    HandlerFn(f)
}

/// Written out rather than through `async_trait`: the closure's own future is the one boxed,
/// without a wrapping future that would move the envelope in and out once more per event.
impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle<'life0, 'async_trait>(
        &'life0 self,
        envelope: Envelope,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin((self.0)(envelope))
    }
}

/// A [`RawHandler`] made from an async closure; see [`raw_handler_fn`].
pub struct RawHandlerFn<F>(F);

impl<F> fmt::Debug for RawHandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RawHandlerFn(..)")
    }
}

/// Makes a [`RawHandler`] from an async closure.
pub fn raw_handler_fn<F, Fut>(f: F) -> RawHandlerFn<F>
where
    F: Fn(RawMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    RawHandlerFn(f)
}

/// Written out rather than through `async_trait`, as [`HandlerFn`]'s is.
impl<F, Fut> RawHandler for RawHandlerFn<F>
where
    F: Fn(RawMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle<'life0, 'async_trait>(
        &'life0 self,
        message: RawMessage,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin((self.0)(message))
    }
}
