//! The asynchronous, bounded publisher.
//!
//! A publish is one write: the message goes to its topic's connection with a reply subject of
//! the publisher's own ack inbox (`<inbox>.<id>`), and waits in a map until the broker's ack
//! comes back on that inbox. One task per publisher reads the acks in bursts, resolves receipts,
//! retries transient failures, times out the acks that never come and sends the next event of
//! each aggregate chain. So publishing wakes no task of its own and arms no timer per message.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, StatusCode, Subject};
use async_trait::async_trait;
use bus_core::{
    wire, Envelope, PublishError, PublishErrorKind, Published, Publisher, Receipt, Topic,
};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, SelectAll, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::telemetry::PublishMetrics;
use crate::{BatchConfig, PublishOrdering, Shared, TopicConnection};

/// How often the ack task looks for publishes past `NatsConfig::publish_ack_timeout`.
const TIMEOUT_CHECK: Duration = Duration::from_millis(100);

/// A publish that failed, as told to [`NatsConfig::on_publish_error`](crate::NatsConfig).
#[derive(Debug)]
pub struct PublishFailure {
    /// The topic it was published on.
    pub topic: Topic,
    /// The envelope, for envelope publishes (raw publishes have none).
    pub envelope: Option<Envelope>,
    /// What went wrong.
    pub error: PublishError,
}

/// One publish, from the call to `publish` until its receipt is settled.
struct Message {
    topic: Topic,
    /// The aggregate chain it belongs to, under [`PublishOrdering::PerAggregate`].
    chain: Option<u64>,
    /// The envelope, kept for retries and the failure callback; `None` for raw publishes,
    /// which are sent once, from `prepared`.
    envelope: Option<Envelope>,
    receipt: oneshot::Sender<Result<Published, PublishError>>,
    /// When it was first sent; transient failures are retried until `publish_retry_for` after.
    first_sent: Option<Instant>,
    /// Headers and body for the first send, built once; a retry builds them again.
    prepared: Option<(HeaderMap, Bytes)>,
    /// When `publish` was called.
    created: Instant,
    /// `bus.publish`, from the call to the settled receipt.
    span: tracing::Span,
    /// Times sent.
    sends: u32,
    /// The bytes it takes as a record of a batch (0 when it is never batched).
    record_len: usize,
    metrics: Arc<PublishMetrics>,
    _permit: OwnedSemaphorePermit,
}

/// What one NATS message carries while it awaits its ack: a publish sent alone, or a batch.
// Not boxed: a publish sent alone is the unbatched hot path, and a box would add an allocation
// to every one of them.
#[allow(clippy::large_enum_variant)]
enum Flight {
    One(Message),
    Batch(Batch),
}

impl Flight {
    fn topic(&self) -> &Topic {
        match self {
            Flight::One(m) => &m.topic,
            Flight::Batch(b) => &b.topic,
        }
    }
}

/// Publishes sent as one message: a record batch or, for one event, a single-event message.
struct Batch {
    topic: Topic,
    lane: Arc<Lane>,
    /// Its number in its lane; the aggregate chains it holds are marked with it.
    number: u64,
    messages: Vec<Message>,
    /// Headers and body, built on the first send and sent again as they are.
    wire: Option<(HeaderMap, Bytes)>,
    first_sent: Option<Instant>,
}

/// Where the batched publishes to one subject (a topic, or one partition of it) wait.
struct Lane {
    subject: Subject,
    /// The batching limits, `max_bytes` cut to what the server's `max_payload` allows.
    limits: BatchConfig,
    state: Mutex<LaneState>,
}

/// The publishes of a lane that wait, and the aggregate chains in it.
///
/// Invariant: while a chain's publishes are in a batch in flight, none of its later publishes
/// is in `pending` (they are in the chain's `waiting`), so two batches in flight never hold
/// the same aggregate, and a chain's next batch is cut only after its previous one is stored.
#[derive(Default)]
struct LaneState {
    /// Publishes waiting to be packed, in publish order.
    pending: VecDeque<Message>,
    /// Their record bytes.
    pending_bytes: usize,
    /// Aggregate chains with a publish pending or in flight.
    chains: HashMap<u64, Chain, ahash::RandomState>,
    /// Batches awaiting their ack (or to be sent again).
    in_flight: usize,
    next_number: u64,
    /// A linger timer runs for this lane.
    lingering: bool,
}

/// One aggregate chain of a lane.
#[derive(Default)]
struct Chain {
    /// Its publishes in `pending`.
    pending: usize,
    /// The batch holding its earlier publishes, while that awaits its ack.
    batch: Option<u64>,
    /// Its publishes that wait for that batch to be stored, in order.
    waiting: VecDeque<Message>,
}

impl LaneState {
    /// Adds a publish behind its chain's earlier ones.
    fn push(&mut self, message: Message) {
        if let Some(key) = message.chain {
            let chain = self.chains.entry(key).or_default();
            if chain.batch.is_some() {
                chain.waiting.push_back(message);
                return;
            }
            chain.pending += 1;
        }
        self.pending_bytes += message.record_len;
        self.pending.push_back(message);
    }

    /// Whether a batch should be cut now: there is room in flight, and either nothing lingers
    /// or the pending publishes fill a batch or have waited long enough.
    fn ready(&self, limits: &BatchConfig, now: Instant) -> bool {
        let Some(oldest) = self.pending.front() else {
            return false;
        };
        self.in_flight < limits.max_in_flight
            && (limits.linger.is_zero()
                || self.pending.len() >= limits.max_events
                || self.pending_bytes >= limits.max_bytes
                || now.duration_since(oldest.created) >= limits.linger)
    }

    /// Takes the next batch: the first pending publishes, within the limits (at least one).
    fn cut(&mut self, limits: &BatchConfig) -> Option<(u64, Vec<Message>)> {
        if self.pending.is_empty() || self.in_flight >= limits.max_in_flight {
            return None;
        }
        let number = self.next_number;
        self.next_number += 1;
        let mut taken = Vec::with_capacity(self.pending.len().min(limits.max_events));
        let mut bytes = 0;
        let mut left_behind = false;
        while let Some(next) = self.pending.front() {
            if !taken.is_empty()
                && (taken.len() >= limits.max_events || bytes + next.record_len > limits.max_bytes)
            {
                break;
            }
            let message = self.pending.pop_front().expect("front exists");
            bytes += message.record_len;
            if let Some(key) = message.chain {
                let chain = self
                    .chains
                    .get_mut(&key)
                    .expect("a pending publish's chain is known");
                chain.pending -= 1;
                chain.batch = Some(number);
                left_behind |= chain.pending > 0;
            }
            taken.push(message);
        }
        self.pending_bytes -= bytes;
        self.in_flight += 1;
        if left_behind {
            // Later publishes of an aggregate in this batch did not fit: they wait for it to
            // be stored rather than go in a batch that could overtake it.
            let mut kept = VecDeque::with_capacity(self.pending.len());
            for message in self.pending.drain(..) {
                match message.chain.and_then(|k| self.chains.get_mut(&k)) {
                    Some(chain) if chain.batch == Some(number) => {
                        chain.pending -= 1;
                        self.pending_bytes -= message.record_len;
                        chain.waiting.push_back(message);
                    }
                    _ => kept.push_back(message),
                }
            }
            self.pending = kept;
        }
        Some((number, taken))
    }

    /// Batch `number`, holding `chains`, is settled: stored (its chains' waiting publishes
    /// become pending), or failed for good (they are returned, not to be sent after a gap).
    fn settled(
        &mut self,
        number: u64,
        chains: impl IntoIterator<Item = u64>,
        failed: bool,
    ) -> Vec<Message> {
        self.in_flight -= 1;
        let mut aborted = Vec::new();
        for key in chains {
            let Some(chain) = self.chains.get_mut(&key) else {
                continue;
            };
            if chain.batch != Some(number) {
                continue;
            }
            chain.batch = None;
            let waiting = std::mem::take(&mut chain.waiting);
            if failed {
                aborted.extend(waiting);
                if chain.pending == 0 {
                    self.chains.remove(&key);
                }
            } else if waiting.is_empty() {
                if chain.pending == 0 {
                    self.chains.remove(&key);
                }
            } else {
                chain.pending += waiting.len();
                for message in waiting {
                    self.pending_bytes += message.record_len;
                    self.pending.push_back(message);
                }
            }
        }
        aborted
    }
}

/// A batch's headers and body: a single-event message for one event, a record batch
/// (`Bus-Batch: <n>`, records in order) for more. Its `Nats-Msg-Id` is the first event's ID
/// and the number of events: the same on every send of the batch.
fn batch_wire(messages: &[Message]) -> (HeaderMap, Bytes) {
    fn envelope(m: &Message) -> &Envelope {
        m.envelope.as_ref().expect("only envelopes are batched")
    }
    if let [only] = messages {
        let e = envelope(only);
        return (envelope_headers(e), e.payload().clone());
    }
    let mut body = Vec::with_capacity(messages.iter().map(|m| m.record_len).sum());
    for m in messages {
        wire::encode_record(envelope(m), &mut body);
    }
    let mut headers = HeaderMap::new();
    headers.insert(wire::BATCH, messages.len().to_string());
    headers.insert(
        "Nats-Msg-Id",
        format!("{}+{}", envelope(&messages[0]).event_id(), messages.len()),
    );
    (headers, Bytes::from(body))
}

/// Bytes of a header block as it travels: `NATS/1.0\r\n`, each `name: value\r\n`, then
/// `\r\n`; an empty map sends no block. The server counts it against `max_payload`.
pub(crate) fn header_len(headers: &HeaderMap) -> usize {
    if headers.is_empty() {
        return 0;
    }
    let lines: usize = headers
        .iter()
        .map(|(n, vs)| {
            let n: &str = n.as_ref();
            vs.iter()
                .map(|v| n.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    b"NATS/1.0\r\n".len() + lines + b"\r\n".len()
}

/// The bytes `envelope` takes on the wire, header block included: what the server compares
/// with its `max_payload` (1 MiB by default). A publish over it fails at once with
/// `PublishErrorKind::PayloadTooLarge`.
pub fn message_size(envelope: &Envelope) -> usize {
    header_len(&envelope_headers(envelope)) + envelope.payload().len()
}

/// The broker's answer to one publish: its stream sequence and whether it was a duplicate.
type AckResult = Result<(u64, bool), PublishError>;

/// Where a topic's publishes go and where their acks come back.
struct Route {
    connection: Arc<TopicConnection>,
    /// `<inbox>.`: a publish's reply subject is this followed by its ID.
    reply_prefix: String,
    /// The connection's re-connections when last looked at: a change means the acks of what
    /// was sent before may have gone down the old socket.
    reconnects_seen: AtomicU64,
    /// The connection's permissions violations, to notice a refused publish to the topic.
    violations: Mutex<tokio::sync::watch::Receiver<Option<String>>>,
    metrics: Arc<PublishMetrics>,
    /// One lane per subject (per partition of a partitioned topic), for batched publishes.
    lanes: Vec<Arc<Lane>>,
}

impl Route {
    fn lane_for(&self, aggregate: &str) -> &Arc<Lane> {
        let p = wire::partition_of(aggregate, self.lanes.len() as u32);
        &self.lanes[p as usize]
    }
}

/// Sent publishes awaiting their ack, by ID, with when they were sent.
#[derive(Default)]
struct Awaiting {
    by_id: HashMap<u64, (Instant, Flight), ahash::RandomState>,
}

impl Awaiting {
    /// The publishes to `topic`, taken out.
    fn of_topic(&mut self, topic: &Topic) -> Vec<Flight> {
        let ids: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, (_, f))| f.topic() == topic)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.by_id.remove(&id).map(|(_, m)| m))
            .collect()
    }

    /// The publishes sent at least `timeout` ago, taken out.
    fn expired(&mut self, timeout: Duration) -> Vec<Flight> {
        let now = Instant::now();
        let ids: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, (sent, _))| now.duration_since(*sent) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.by_id.remove(&id).map(|(_, m)| m))
            .collect()
    }
}

struct State {
    window: Arc<Semaphore>,
    outstanding: AtomicU64,
    idle: Notify,
    first_error: Mutex<Option<PublishError>>,
    closed: AtomicBool,
    /// Aggregate chains with a publish awaiting its ack → the publishes waiting behind it.
    chains: Mutex<HashMap<u64, VecDeque<Message>, ahash::RandomState>>,
    /// Each topic's connection and ack inbox, set up on its first publish.
    routes: RwLock<HashMap<Topic, Arc<Route>, ahash::RandomState>>,
    routing: tokio::sync::Mutex<()>,
    awaiting: Mutex<Awaiting>,
    next_id: AtomicU64,
    /// Publishes sent again after a transient failure.
    retries: AtomicU64,
}

fn chain_key(topic: &Topic, aggregate: &str) -> u64 {
    // Fixed seeds: a collision only makes two aggregates share one chain, which keeps both in
    // order.
    static HASHER: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    HASHER
        .get_or_init(|| ahash::RandomState::with_seeds(7, 11, 13, 17))
        .hash_one((topic.as_str(), aggregate))
}

/// What the publishing side tells the ack task.
enum Event {
    /// A topic's ack inbox, subscribed on the first publish to the topic.
    Inbox(async_nats::Subscriber),
    /// A publish that could not be written.
    Failed(Box<Flight>, PublishError),
    /// A lane's pending publishes linger: cut a batch at their deadline.
    Linger(Topic, Arc<Lane>, Instant),
}

/// Publishes on NATS JetStream without waiting for each ack, within a bounded window.
///
/// Envelopes of one aggregate published in order from one task are stored in that order, even
/// when the connection fails with several of them in flight: under the default
/// [`PublishOrdering::PerAggregate`] only one publish per aggregate awaits its ack, and one that
/// fails for a transient reason is retried before the aggregate's next event is sent. Different
/// aggregates are pipelined within `max_in_flight`. Each envelope's event ID is its
/// `Nats-Msg-Id`, so a retry, or publishing the same envelope again within the stream's
/// duplicate window, is recognised by the broker (the receipt says `duplicate: true`).
///
/// With record batches on (the default, [`BatchConfig`]), the envelopes waiting for one topic
/// (one partition) go as one message, cut when a batch's ack comes back; an aggregate's events
/// are in no more than one batch in flight, in order. A batch's `Nats-Msg-Id` is its first event
/// ID and its length, so a resent batch is recognised; an envelope published again by the
/// caller is recognised only if it goes alone or in a batch of the same events.
///
/// An ack that does not arrive within `NatsConfig::publish_ack_timeout` counts as a transient
/// failure.
/// A failed publish is reported three ways: through its [`Receipt`], through the next
/// [`flush`](Publisher::flush), and through `NatsConfig::on_publish_error` with the envelope.
#[derive(Clone)]
pub struct NatsPublisher {
    shared: Arc<Shared>,
    state: Arc<State>,
    events: mpsc::UnboundedSender<Event>,
}

impl fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPublisher")
            .field(
                "outstanding",
                &self.state.outstanding.load(Ordering::Relaxed),
            )
            .field("closed", &self.state.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl NatsPublisher {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let state = Arc::new(State {
            window: Arc::new(Semaphore::new(shared.config.max_in_flight)),
            outstanding: AtomicU64::new(0),
            idle: Notify::new(),
            first_error: Mutex::new(None),
            closed: AtomicBool::new(false),
            chains: Mutex::new(HashMap::default()),
            routes: RwLock::new(HashMap::default()),
            routing: tokio::sync::Mutex::new(()),
            awaiting: Mutex::new(Awaiting::default()),
            next_id: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        });
        let (events, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect_acks(rx, state.clone(), shared.clone()));
        Self {
            shared,
            state,
            events,
        }
    }

    /// Publishes whose ack has not arrived yet.
    pub fn outstanding(&self) -> u64 {
        self.state.outstanding.load(Ordering::Relaxed)
    }

    /// Publishes this publisher has sent again after a transient failure (a lost connection,
    /// no ack in time, no stream leader), with the same `Nats-Msg-Id`.
    pub fn retries(&self) -> u64 {
        self.state.retries.load(Ordering::Relaxed)
    }

    /// The topic's connection and ack inbox, set up on the first publish to the topic.
    async fn route(&self, topic: &Topic) -> Result<Arc<Route>, PublishError> {
        if let Some(route) = self.state.routes.read().unwrap().get(topic) {
            return Ok(route.clone());
        }
        // Boxed: the first publish to a topic connects and provisions, and that future is
        // large; inlined, every publish's future would carry (and copy) its size.
        Box::pin(self.new_route(topic)).await
    }

    /// Connects, provisions and subscribes to the ack inbox of a topic's first publish.
    async fn new_route(&self, topic: &Topic) -> Result<Arc<Route>, PublishError> {
        let _one_at_a_time = self.state.routing.lock().await;
        if let Some(route) = self.state.routes.read().unwrap().get(topic) {
            return Ok(route.clone());
        }
        let connection = self.shared.connection(topic).await.map_err(|e| {
            let kind = match e.kind() {
                crate::NatsErrorKind::Closed => PublishErrorKind::Closed,
                crate::NatsErrorKind::PermissionDenied => PublishErrorKind::Rejected,
                crate::NatsErrorKind::Invalid | crate::NatsErrorKind::Configuration => {
                    PublishErrorKind::Invalid
                }
                _ => PublishErrorKind::Connection,
            };
            PublishError::with_source(kind, format!("no connection for topic `{topic}`"), e)
        })?;
        let inbox = connection.client.new_inbox();
        let subscriber = connection
            .client
            .subscribe(Subject::from(format!("{inbox}.*")))
            .await
            .map_err(|e| {
                PublishError::with_source(
                    PublishErrorKind::Connection,
                    format!("subscribing to the ack inbox of topic `{topic}`"),
                    e,
                )
            })?;
        self.events.send(Event::Inbox(subscriber)).map_err(|_| {
            PublishError::new(PublishErrorKind::Closed, "publisher ack task stopped")
        })?;
        let reconnects_seen = AtomicU64::new(*connection.reconnects.borrow());
        let mut violations = connection.violations.clone();
        violations.mark_unchanged();
        let mut limits = self.shared.config.batching.clone();
        // Room for the batch's own headers within the server's limit.
        limits.max_bytes = limits
            .max_bytes
            .min(connection.max_payload.saturating_sub(1024).max(1));
        let subjects = if connection.partitions.is_empty() {
            vec![connection.subject.clone()]
        } else {
            connection.partitions.clone()
        };
        let lanes = subjects
            .into_iter()
            .map(|subject| {
                Arc::new(Lane {
                    subject,
                    limits: limits.clone(),
                    state: Mutex::default(),
                })
            })
            .collect();
        let route = Arc::new(Route {
            lanes,
            reconnects_seen,
            violations: Mutex::new(violations),
            connection,
            reply_prefix: format!("{inbox}."),
            metrics: Arc::new(PublishMetrics::new(topic)),
        });
        self.state
            .routes
            .write()
            .unwrap()
            .insert(topic.clone(), route.clone());
        Ok(route)
    }

    async fn send(
        &self,
        topic: &Topic,
        envelope: Option<Envelope>,
        prepared: Option<(HeaderMap, Bytes)>,
    ) -> Result<Receipt, PublishError> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(PublishError::new(
                PublishErrorKind::Closed,
                format!("cannot publish on topic `{topic}`: the publisher is closed"),
            ));
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(PublishError::new(
                PublishErrorKind::Closed,
                format!("cannot publish on topic `{topic}`: the bus is closed"),
            ));
        }
        let route = self.route(topic).await?;
        if envelope.is_none() && !route.connection.partitions.is_empty() {
            return Err(PublishError::new(
                PublishErrorKind::Invalid,
                format!("topic `{topic}` is partitioned: publish envelopes, whose aggregate ID picks the partition, not raw messages"),
            ));
        }
        let max_payload = route.connection.max_payload;
        // Batched envelopes have no headers built yet: their size as a record tells.
        let record_len = match (&prepared, &envelope) {
            (None, Some(e)) => wire::record_len(e),
            _ => 0,
        };
        let (header_len, payload_len) = match (&prepared, &envelope) {
            (Some((headers, payload)), _) => (header_len(headers), payload.len()),
            (None, Some(e)) => (
                // A record's header lines, plus the block's first and last lines and the
                // `Nats-Msg-Id` a single-event message adds.
                record_len - 8 - e.payload().len()
                    + b"NATS/1.0\r\n\r\n".len()
                    + "Nats-Msg-Id: \r\n".len()
                    + e.event_id().as_str().len(),
                e.payload().len(),
            ),
            (None, None) => unreachable!("raw publishes are prepared"),
        };
        if payload_len + header_len > max_payload {
            return Err(PublishError::new(
                PublishErrorKind::PayloadTooLarge,
                format!(
                    "message on topic `{topic}` is {} bytes ({} payload + {header_len} header block), over the server's max_payload of {max_payload} bytes",
                    payload_len + header_len,
                    payload_len
                ),
            ));
        }
        let permit = self
            .state
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PublishError::new(PublishErrorKind::Closed, "publisher is closed"))?;
        let chain = match (&envelope, self.shared.config.publish_ordering) {
            (Some(e), PublishOrdering::PerAggregate) => {
                Some(chain_key(topic, e.aggregate_id().as_str()))
            }
            _ => None,
        };
        let span = tracing::info_span!(
            "bus.publish",
            topic = %topic,
            aggregate = tracing::field::Empty,
            version = tracing::field::Empty,
            event_type = tracing::field::Empty,
            event_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            traceparent = tracing::field::Empty,
            attempt = tracing::field::Empty,
            sequence = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        if let (false, Some(e)) = (span.is_disabled(), &envelope) {
            span.record("aggregate", e.aggregate_id().as_str());
            span.record("version", e.event_version());
            span.record("event_type", e.event_type().as_str());
            span.record("event_id", e.event_id().as_str());
            if let Some(trace_id) = e.trace_id() {
                span.record("trace_id", trace_id);
            }
            if let Some(t) = e.traceparent() {
                span.record("traceparent", tracing::field::display(&t));
                if e.trace_id().is_none() {
                    span.record("trace_id", t.trace_id());
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let message = Message {
            topic: topic.clone(),
            chain,
            envelope,
            receipt: tx,
            first_sent: None,
            prepared,
            created: Instant::now(),
            metrics: route.metrics.clone(),
            span,
            sends: 0,
            record_len,
            _permit: permit,
        };
        self.state.outstanding.fetch_add(1, Ordering::AcqRel);
        if message.prepared.is_none() {
            self.enqueue(topic, &route, message).await?;
            return Ok(receipt(rx));
        }
        let send_now = match chain {
            None => Some(message),
            Some(key) => {
                let mut chains = self.state.chains.lock().unwrap();
                match chains.entry(key) {
                    Entry::Occupied(mut waiting) => {
                        // An earlier event of this aggregate awaits its ack: wait behind it.
                        waiting.get_mut().push_back(message);
                        None
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(VecDeque::new());
                        Some(message)
                    }
                }
            }
        };
        if let Some(message) = send_now {
            self.write(&route, Flight::One(message)).await?;
        }
        Ok(receipt(rx))
    }

    /// Writes a flight now; one that could not be written is settled by the ack task, like
    /// any other failure.
    async fn write(&self, route: &Route, flight: Flight) -> Result<(), PublishError> {
        if let Err((flight, error)) = transmit(&self.state, route, flight).await {
            if self
                .events
                .send(Event::Failed(Box::new(flight), error))
                .is_err()
            {
                return Err(PublishError::new(
                    PublishErrorKind::Closed,
                    "publisher ack task stopped",
                ));
            }
        }
        Ok(())
    }

    /// Puts a batched publish in its lane, and sends a batch if one is due.
    async fn enqueue(
        &self,
        topic: &Topic,
        route: &Route,
        message: Message,
    ) -> Result<(), PublishError> {
        let aggregate = message
            .envelope
            .as_ref()
            .map(|e| e.aggregate_id().as_str())
            .unwrap_or_default();
        let lane = route.lane_for(aggregate).clone();
        let limits = &lane.limits;
        // Just created: its creation time serves as now, without another clock read.
        let now = message.created;
        let (cut, linger) = {
            let mut st = lane.state.lock().unwrap();
            st.push(message);
            if st.ready(limits, now) {
                (st.cut(limits), None)
            } else if !limits.linger.is_zero()
                && !st.lingering
                && st.in_flight < limits.max_in_flight
            {
                st.lingering = true;
                let oldest = st.pending.front().map_or(now, |m| m.created);
                (None, Some(oldest + limits.linger))
            } else {
                (None, None)
            }
        };
        if let Some(deadline) = linger {
            let _ = self
                .events
                .send(Event::Linger(topic.clone(), lane.clone(), deadline));
        }
        if let Some((number, messages)) = cut {
            let batch = Batch {
                topic: topic.clone(),
                lane,
                number,
                messages,
                wire: None,
                first_sent: None,
            };
            self.write(route, Flight::Batch(batch)).await?;
        }
        Ok(())
    }
}

fn receipt(rx: oneshot::Receiver<Result<Published, PublishError>>) -> Receipt {
    Receipt::new(async move {
        rx.await.unwrap_or_else(|_| {
            Err(PublishError::new(
                PublishErrorKind::Connection,
                "publisher stopped before the ack arrived",
            ))
        })
    })
}

/// Writes `message` to its topic's connection now (so publishes leave in call order), with a
/// reply subject of the publisher's ack inbox, and leaves it awaiting its ack. A message that
/// could not be written comes back with why.
async fn transmit(
    state: &State,
    route: &Route,
    mut flight: Flight,
) -> Result<(), (Flight, PublishError)> {
    let now = Instant::now();
    let (subject, headers, payload) = match &mut flight {
        Flight::One(message) => {
            message.first_sent.get_or_insert(now);
            message.sends += 1;
            message.span.record("attempt", message.sends);
            let (headers, payload) = match (message.prepared.take(), &message.envelope) {
                (Some(prepared), _) => prepared,
                (None, Some(e)) => (envelope_headers(e), e.payload().clone()),
                (None, None) => unreachable!("raw publishes are sent once"),
            };
            let subject = match &message.envelope {
                Some(e) => route
                    .connection
                    .subject_for(e.aggregate_id().as_str())
                    .clone(),
                None => route.connection.subject.clone(),
            };
            (subject, headers, payload)
        }
        Flight::Batch(batch) => {
            if batch.first_sent.is_none() {
                if let Some(first) = batch.messages.first() {
                    first
                        .metrics
                        .batch_events
                        .record(batch.messages.len() as f64);
                }
            }
            batch.first_sent.get_or_insert(now);
            for message in &mut batch.messages {
                message.first_sent.get_or_insert(now);
                message.sends += 1;
                message.span.record("attempt", message.sends);
            }
            let (headers, payload) = batch
                .wire
                .get_or_insert_with(|| batch_wire(&batch.messages))
                .clone();
            (batch.lane.subject.clone(), headers, payload)
        }
    };
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Subject::from(format!("{}{id}", route.reply_prefix));
    // In the map before it is written: the ack may come back before the write returns.
    state
        .awaiting
        .lock()
        .unwrap()
        .by_id
        .insert(id, (now, flight));
    let written = route
        .connection
        .client
        .publish_with_reply_and_headers(subject, reply, headers, payload)
        .await;
    match written {
        Ok(()) => Ok(()),
        Err(error) => match state.awaiting.lock().unwrap().by_id.remove(&id) {
            Some((_, flight)) => {
                // Too large is final: sending it again cannot help.
                let kind = match error.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                        PublishErrorKind::PayloadTooLarge
                    }
                    _ => PublishErrorKind::Connection,
                };
                let error = PublishError::with_source(
                    kind,
                    format!("publish on topic `{}` could not be written", flight.topic()),
                    error,
                );
                Err((flight, error))
            }
            None => Ok(()),
        },
    }
}

/// The publish ID an ack's subject (`<inbox>.<id>`) carries.
fn ack_id(subject: &str) -> Option<u64> {
    subject.rsplit('.').next()?.parse().ok()
}

/// JetStream error codes of a publish that say "not now" rather than "no": the cluster is
/// unavailable (10008), this server is not the leader (10009), JetStream is not enabled yet
/// (10076, while a server starts), a per-subject sequence is not ready (10163).
const TRANSIENT_ERR_CODES: [u64; 4] = [10008, 10009, 10076, 10163];

/// Reads the broker's answer to a publish.
fn read_ack(topic: &Topic, ack: &async_nats::Message) -> AckResult {
    #[derive(serde::Deserialize)]
    struct ApiError {
        code: Option<u64>,
        err_code: Option<u64>,
        description: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        seq: Option<u64>,
        #[serde(default)]
        duplicate: bool,
        error: Option<ApiError>,
    }
    match ack.status {
        None => {}
        Some(StatusCode::NO_RESPONDERS) => {
            // Nothing stores the subject right now: a stream leader is being elected, or the
            // server restarts. Transient: retried with the same Nats-Msg-Id within
            // `publish_retry_for`.
            return Err(PublishError::new(
                PublishErrorKind::Connection,
                format!("publish on topic `{topic}` failed: no responders (no stream leader stores its subject; an election or a restart is under way, or the stream is gone)"),
            ));
        }
        Some(status) => {
            return Err(PublishError::new(
                PublishErrorKind::Connection,
                format!(
                "publish on topic `{topic}` failed: the broker answered with status {status} ({})",
                ack.description.as_deref().unwrap_or("no description")
            ),
            ))
        }
    }
    match serde_json::from_slice::<Body>(&ack.payload) {
        Ok(Body {
            error: Some(error), ..
        }) => {
            let err_code = error.err_code.unwrap_or(0);
            // Errors that an election, a restart or a busy cluster cause; the publish is
            // retried. Every other refusal (a full stream, a wrong expectation) is final.
            let kind = if TRANSIENT_ERR_CODES.contains(&err_code) {
                PublishErrorKind::Connection
            } else {
                PublishErrorKind::Rejected
            };
            Err(PublishError::new(
                kind,
                format!(
                    "publish on topic `{topic}` refused by the broker: {} (code {}, error code {err_code})",
                    error.description.as_deref().unwrap_or("no description"),
                    error.code.unwrap_or(0),
                ),
            ))
        }
        Ok(Body {
            seq: Some(seq),
            duplicate,
            ..
        }) => Ok((seq, duplicate)),
        _ => Err(PublishError::new(
            PublishErrorKind::Connection,
            format!(
                "publish on topic `{topic}`: unreadable ack `{}`",
                String::from_utf8_lossy(&ack.payload)
            ),
        )),
    }
}

/// What the ack task waits for besides acks.
enum Timer {
    /// A flight to send again after a transient failure.
    Resend(Box<Flight>),
    /// A lane whose pending publishes have lingered long enough.
    Linger(Topic, Arc<Lane>),
}

type Timers = FuturesUnordered<Pin<Box<dyn Future<Output = Timer> + Send>>>;

/// The publisher's ack task: reads acks from every topic's inbox, times out the ones that do not
/// come, retries what failed for a transient reason, sends the next publish of each aggregate
/// chain, resolves receipts and records failures. It ends once every handle of the publisher
/// is dropped and nothing is outstanding.
async fn collect_acks(
    mut events: mpsc::UnboundedReceiver<Event>,
    state: Arc<State>,
    shared: Arc<Shared>,
) {
    let mut inboxes = SelectAll::new();
    let mut timers: Timers = FuturesUnordered::new();
    let mut tick = tokio::time::interval(TIMEOUT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut closing = false;
    let settler = Settler {
        state: &state,
        shared: &shared,
    };
    loop {
        if closing && state.outstanding.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut settled: Vec<(AckResult, Flight)> = Vec::new();
        tokio::select! {
            event = events.recv(), if !closing => match event {
                Some(Event::Inbox(subscriber)) => inboxes.push(subscriber),
                Some(Event::Failed(flight, error)) => settled.push((Err(error), *flight)),
                Some(Event::Linger(topic, lane, deadline)) => timers.push(Box::pin(async move {
                    tokio::time::sleep_until(deadline.into()).await;
                    Timer::Linger(topic, lane)
                })),
                None => closing = true,
            },
            Some(ack) = inboxes.next(), if !inboxes.is_empty() => {
                // A late ack of a publish that already timed out (and was sent again) is
                // no longer awaited: the retry's own ack settles it.
                let found = ack_id(ack.subject.as_str())
                    .and_then(|id| state.awaiting.lock().unwrap().by_id.remove(&id));
                if let Some((_, flight)) = found {
                    settled.push((read_ack(flight.topic(), &ack), flight));
                }
            }
            Some(timer) = timers.next(), if !timers.is_empty() => {
                let flights = match timer {
                    Timer::Resend(flight) => vec![*flight],
                    Timer::Linger(topic, lane) => {
                        lane.state.lock().unwrap().lingering = false;
                        settler.next_batches(&topic, &lane, &mut timers)
                    }
                };
                for flight in flights {
                    if let Err((flight, error)) = settler.transmit(flight).await {
                        settled.push((Err(error), flight));
                    }
                }
            }
            _ = tick.tick() => {
                // A re-connection: the acks of publishes sent before it may have been written
                // to the old socket. They are retried now (the same Nats-Msg-Id makes a stored
                // one a duplicate) instead of after the ack timeout.
                let routes: Vec<(Topic, Arc<Route>)> = state.routes.read().unwrap().iter().map(|(t, r)| (t.clone(), r.clone())).collect();
                for (topic, route) in routes {
                    // The server answers a publish this user may not make only with a
                    // permissions violation report; the ack never comes. Final, not retried.
                    let refused = {
                        let mut violations = route.violations.lock().unwrap();
                        match violations.has_changed() {
                            Ok(true) => violations.borrow_and_update().clone().filter(|v| {
                                let topic = route.connection.subject.as_str();
                                v.contains(&format!("\"{topic}\"")) || v.contains(&format!("\"{topic}."))
                            }),
                            _ => None,
                        }
                    };
                    if let Some(violation) = refused {
                        let lost = state.awaiting.lock().unwrap().of_topic(&topic);
                        for message in lost {
                            let error = PublishError::new(
                                PublishErrorKind::Rejected,
                                format!("publish on topic `{topic}` refused: the server does not let this user publish to `{topic}` ({violation})"),
                            );
                            settled.push((Err(error), message));
                        }
                    }
                    let now = *route.connection.reconnects.borrow();
                    if route.reconnects_seen.swap(now, Ordering::AcqRel) != now {
                        let lost = state.awaiting.lock().unwrap().of_topic(&topic);
                        for message in lost {
                            let error = PublishError::new(
                                PublishErrorKind::Connection,
                                format!("publish on topic `{topic}`: the connection was re-established before its ack arrived"),
                            );
                            settled.push((Err(error), message));
                        }
                    }
                }
                let timeout = shared.config.publish_ack_timeout;
                let expired = state.awaiting.lock().unwrap().expired(timeout);
                for message in expired {
                    let error = PublishError::new(
                        PublishErrorKind::TimedOut,
                        format!("publish on topic `{}`: no ack within {timeout:?}", message.topic()),
                    );
                    settled.push((Err(error), message));
                }
            }
        }
        settler.settle(settled, &mut timers).await;
    }
}

struct Settler<'a> {
    state: &'a State,
    shared: &'a Arc<Shared>,
}

impl Settler<'_> {
    async fn transmit(&self, flight: Flight) -> Result<(), (Flight, PublishError)> {
        let route = self
            .state
            .routes
            .read()
            .unwrap()
            .get(flight.topic())
            .cloned();
        match route {
            Some(route) => transmit(self.state, &route, flight).await,
            None => {
                let error = PublishError::new(
                    PublishErrorKind::Connection,
                    format!("no connection for topic `{}`", flight.topic()),
                );
                Err((flight, error))
            }
        }
    }

    /// Settles acks and failures; what they start (the next publish of a chain, the next
    /// batches of a lane) may fail at once, and is settled in turn.
    async fn settle(&self, mut work: Vec<(AckResult, Flight)>, timers: &mut Timers) {
        while let Some((result, flight)) = work.pop() {
            for next in self.decide(result, flight, timers) {
                if let Err((flight, error)) = self.transmit(next).await {
                    work.push((Err(error), flight));
                }
            }
        }
    }

    /// What to send now that `flight` is settled; resends and lingers go to `timers`.
    fn decide(&self, result: AckResult, flight: Flight, timers: &mut Timers) -> Vec<Flight> {
        match flight {
            Flight::One(message) => match self.decide_one(result, message) {
                Next::Nothing => Vec::new(),
                Next::Send(message) => vec![Flight::One(message)],
                Next::Retry(message, delay) => {
                    timers.push(Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        Timer::Resend(Box::new(Flight::One(message)))
                    }));
                    Vec::new()
                }
            },
            Flight::Batch(batch) => self.decide_batch(result, batch, timers),
        }
    }

    fn decide_batch(&self, result: AckResult, batch: Batch, timers: &mut Timers) -> Vec<Flight> {
        let (state, shared) = (self.state, self.shared);
        let topic = batch.topic.clone();
        let chains: Vec<u64> = batch.messages.iter().filter_map(|m| m.chain).collect();
        match result {
            Ok((sequence, duplicate)) => {
                let Batch {
                    lane,
                    number,
                    messages,
                    ..
                } = batch;
                lane.state.lock().unwrap().settled(number, chains, false);
                let now = Instant::now();
                for message in messages {
                    let published = Published {
                        topic: topic.clone(),
                        sequence: Some(sequence),
                        duplicate,
                    };
                    finish_at(message, Ok(published), state, shared, now);
                }
                self.next_batches(&topic, &lane, timers)
            }
            Err(error) => {
                let elapsed = batch.first_sent.map_or(Duration::ZERO, |t| t.elapsed());
                if !chains.is_empty()
                    && is_transient(&error)
                    && elapsed < shared.config.publish_retry_for
                {
                    // The same bytes again, with the same Nats-Msg-Id, before any later event
                    // of its aggregates: a batch that was in fact stored is a duplicate.
                    let delay = retry_delay(elapsed);
                    let events = batch.messages.len() as u64;
                    tracing::debug!(%topic, %error, ?delay, events, "batch publish failed; retrying before the aggregates' later events");
                    state.retries.fetch_add(events, Ordering::Relaxed);
                    if let Some(first) = batch.messages.first() {
                        first.metrics.retries.increment(events);
                    }
                    timers.push(Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        Timer::Resend(Box::new(Flight::Batch(batch)))
                    }));
                    return Vec::new();
                }
                tracing::warn!(%topic, %error, events = batch.messages.len(), "batch publish failed");
                let Batch {
                    lane,
                    number,
                    messages,
                    ..
                } = batch;
                let aborted = lane.state.lock().unwrap().settled(number, chains, true);
                let reason = error.to_string();
                for message in messages {
                    finish(
                        message,
                        Err(PublishError::new(error.kind(), reason.clone())),
                        state,
                        shared,
                    );
                }
                // The aggregates' later events must not be stored after a gap: fail them too.
                for later in aborted {
                    let error = PublishError::new(
                        PublishErrorKind::Aborted,
                        format!("not sent: an earlier event of its aggregate on topic `{topic}` failed ({reason})"),
                    );
                    finish(later, Err(error), state, shared);
                }
                self.next_batches(&topic, &lane, timers)
            }
        }
    }

    /// The batches a lane can send now; if what is pending lingers, a timer for it.
    fn next_batches(&self, topic: &Topic, lane: &Arc<Lane>, timers: &mut Timers) -> Vec<Flight> {
        let limits = &lane.limits;
        let mut flights = Vec::new();
        let mut st = lane.state.lock().unwrap();
        let now = Instant::now();
        while st.ready(limits, now) {
            let Some((number, messages)) = st.cut(limits) else {
                break;
            };
            flights.push(Flight::Batch(Batch {
                topic: topic.clone(),
                lane: lane.clone(),
                number,
                messages,
                wire: None,
                first_sent: None,
            }));
        }
        if !limits.linger.is_zero()
            && !st.lingering
            && st.in_flight < limits.max_in_flight
            && !st.pending.is_empty()
        {
            st.lingering = true;
            let deadline = st.pending.front().map_or(now, |m| m.created) + limits.linger;
            let (topic, lane) = (topic.clone(), lane.clone());
            timers.push(Box::pin(async move {
                tokio::time::sleep_until(deadline.into()).await;
                Timer::Linger(topic, lane)
            }));
        }
        flights
    }

    fn decide_one(&self, result: AckResult, message: Message) -> Next {
        let state = self.state;
        let shared = self.shared;
        let topic = message.topic.clone();
        match result {
            Ok((sequence, duplicate)) => {
                let chain = message.chain;
                finish(
                    message,
                    Ok(Published {
                        topic,
                        sequence: Some(sequence),
                        duplicate,
                    }),
                    state,
                    shared,
                );
                let Some(key) = chain else {
                    return Next::Nothing;
                };
                let mut chains = state.chains.lock().unwrap();
                match chains.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(next) => Next::Send(next),
                    None => {
                        chains.remove(&key);
                        Next::Nothing
                    }
                }
            }
            Err(error) => {
                let elapsed = message.first_sent.map_or(Duration::ZERO, |t| t.elapsed());
                if message.chain.is_some()
                    && is_transient(&error)
                    && elapsed < shared.config.publish_retry_for
                {
                    // Retried before any later event of the aggregate is sent; the same
                    // Nats-Msg-Id makes a retry of a publish that was in fact stored a duplicate.
                    let delay = retry_delay(elapsed);
                    tracing::debug!(%topic, %error, ?delay, "publish failed; retrying before the aggregate's later events");
                    state.retries.fetch_add(1, Ordering::Relaxed);
                    message.metrics.retries.increment(1);
                    return Next::Retry(message, delay);
                }
                tracing::warn!(%topic, %error, "publish failed");
                let chain = message.chain;
                let reason = error.to_string();
                finish(message, Err(error), state, shared);
                if let Some(key) = chain {
                    // The aggregate's later events must not be stored after a gap: fail them too.
                    let waiting = state
                        .chains
                        .lock()
                        .unwrap()
                        .remove(&key)
                        .unwrap_or_default();
                    for later in waiting {
                        let error = PublishError::new(
                            PublishErrorKind::Aborted,
                            format!("not sent: an earlier event of its aggregate on topic `{topic}` failed ({reason})"),
                        );
                        finish(later, Err(error), state, shared);
                    }
                }
                Next::Nothing
            }
        }
    }
}

/// Backoff before sending a transiently failed publish again, growing with how long it has
/// been failing.
fn retry_delay(elapsed: Duration) -> Duration {
    (RETRY_FIRST_DELAY * 2u32.pow((elapsed.as_millis() / 500).min(5) as u32)).min(RETRY_MAX_DELAY)
}

/// What settling one publish starts.
enum Next {
    Nothing,
    /// The next publish of its aggregate chain.
    Send(Message),
    /// The same publish again, after a delay.
    Retry(Message, Duration),
}

fn is_transient(error: &PublishError) -> bool {
    matches!(
        error.kind(),
        PublishErrorKind::TimedOut | PublishErrorKind::Connection
    )
}

const RETRY_FIRST_DELAY: Duration = Duration::from_millis(50);
/// At most this long between two sends of a publish failing for a transient reason: an
/// election or a restart is noticed this soon after it ends.
const RETRY_MAX_DELAY: Duration = Duration::from_millis(500);

/// Resolves a receipt and tells failures to `flush` and the failure callback.
fn finish(
    message: Message,
    outcome: Result<Published, PublishError>,
    state: &State,
    shared: &Shared,
) {
    finish_at(message, outcome, state, shared, Instant::now())
}

/// [`finish`], with the time it settled read once for a whole batch.
fn finish_at(
    message: Message,
    outcome: Result<Published, PublishError>,
    state: &State,
    shared: &Shared,
    now: Instant,
) {
    let Message {
        topic,
        envelope,
        receipt,
        created,
        metrics,
        span,
        ..
    } = message;
    metrics
        .seconds
        .record(now.saturating_duration_since(created).as_secs_f64());
    if !span.is_disabled() {
        match &outcome {
            Ok(published) => {
                span.record(
                    "outcome",
                    if published.duplicate {
                        "duplicate"
                    } else {
                        "stored"
                    },
                );
                if let Some(sequence) = published.sequence {
                    span.record("sequence", sequence);
                }
            }
            Err(error) => {
                span.record("outcome", "failed");
                span.in_scope(|| tracing::debug!(%error, "publish failed"));
            }
        }
    }
    match &outcome {
        Ok(published) if published.duplicate => metrics.duplicate.increment(1),
        Ok(_) => metrics.stored.increment(1),
        Err(_) => metrics.failed.increment(1),
    }
    if let Err(error) = &outcome {
        if let Some(callback) = &shared.config.on_publish_error {
            callback(&PublishFailure {
                topic,
                envelope,
                error: PublishError::new(error.kind(), error.to_string()),
            });
        }
        let mut first = state.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(PublishError::new(error.kind(), error.to_string()));
        }
    }
    let _ = receipt.send(outcome);
    if state.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
        state.idle.notify_waiters();
    }
}

pub(crate) fn envelope_headers(envelope: &Envelope) -> HeaderMap {
    let mut headers = HeaderMap::new();
    wire::encode_headers(envelope, |name, value| headers.insert(name, value));
    // The broker's de-duplication key: a retried publish of the same event is stored once.
    headers.insert("Nats-Msg-Id", envelope.event_id().as_str());
    headers
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(
        &self,
        topic: &Topic,
        mut envelope: Envelope,
    ) -> Result<Receipt, PublishError> {
        #[cfg(feature = "opentelemetry")]
        crate::otel::inject(&mut envelope);
        bus_core::continue_trace(&mut envelope, bus_core::new_parent_id);
        if self.shared.config.batching.enabled() {
            // Headers are built when it is sent: as a record of a batch, or alone.
            return self.send(topic, Some(envelope), None).await;
        }
        let headers = envelope_headers(&envelope);
        let payload = envelope.payload().clone();
        self.send(topic, Some(envelope), Some((headers, payload)))
            .await
    }

    async fn publish_raw(
        &self,
        topic: &Topic,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<Receipt, PublishError> {
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            map.append(name.as_str(), value.as_str());
        }
        self.send(topic, None, Some((map, payload))).await
    }

    async fn flush(&self) -> Result<(), PublishError> {
        loop {
            let idle = self.state.idle.notified();
            if self.state.outstanding.load(Ordering::Acquire) == 0 {
                break;
            }
            idle.await;
        }
        match self.state.first_error.lock().unwrap().take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    async fn close(&self) -> Result<(), PublishError> {
        self.state.closed.store(true, Ordering::Release);
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(payload: &str, status: Option<StatusCode>) -> async_nats::Message {
        async_nats::Message {
            subject: Subject::from("_INBOX.abc.42"),
            reply: None,
            payload: Bytes::from(payload.to_owned()),
            headers: None,
            status,
            description: status.map(|_| "test".to_owned()),
            length: payload.len(),
        }
    }

    fn topic() -> Topic {
        Topic::new("orders").unwrap()
    }

    fn message() -> Message {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        Message {
            topic: topic(),
            chain: None,
            envelope: None,
            receipt: oneshot::channel().0,
            first_sent: None,
            prepared: None,
            created: Instant::now(),
            metrics: Arc::new(PublishMetrics::new(&topic())),
            span: tracing::Span::none(),
            sends: 0,
            record_len: 0,
            _permit: permit,
        }
    }

    /// Event `version` of aggregate `chain`, `len` bytes as a record.
    fn event(chain: u64, version: u64, len: usize) -> Message {
        let mut m = message();
        m.chain = Some(chain);
        m.record_len = len;
        m.envelope = Some(
            Envelope::builder(format!("a{chain}"), "T", version)
                .build()
                .unwrap(),
        );
        m
    }

    fn version(m: &Message) -> (u64, u64) {
        (
            m.chain.unwrap(),
            m.envelope.as_ref().unwrap().event_version(),
        )
    }

    fn limits(max_events: usize, max_bytes: usize, max_in_flight: usize) -> BatchConfig {
        BatchConfig {
            max_events,
            max_bytes,
            linger: Duration::ZERO,
            max_in_flight,
        }
    }

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
            prop_assert!(lane.pending.is_empty() && lane.chains.is_empty() && lane.pending_bytes == 0);
        }
    }

    #[test]
    fn the_publish_id_is_the_last_token_of_the_ack_subject() {
        assert_eq!(ack_id("_INBOX.abc.42"), Some(42));
        assert_eq!(ack_id("_INBOX.abc.x"), None);
        assert_eq!(ack_id(""), None);
    }

    #[test]
    fn acks_are_read_as_sequence_duplicate_or_refusal() {
        let t = topic();
        assert_eq!(
            read_ack(&t, &ack(r#"{"stream":"S","seq":7}"#, None)).unwrap(),
            (7, false)
        );
        assert_eq!(
            read_ack(&t, &ack(r#"{"stream":"S","seq":7,"duplicate":true}"#, None)).unwrap(),
            (7, true)
        );
        let refused = read_ack(
            &t,
            &ack(
                r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
                None,
            ),
        )
        .unwrap_err();
        assert_eq!(refused.kind(), PublishErrorKind::Rejected);
        assert!(
            refused.to_string().contains("maximum messages exceeded"),
            "{refused}"
        );
        // No responders: a stream leader is being elected; retried, not refused.
        let no_stream = read_ack(&t, &ack("", Some(StatusCode::NO_RESPONDERS))).unwrap_err();
        assert_eq!(no_stream.kind(), PublishErrorKind::Connection);
        let electing = read_ack(
            &t,
            &ack(
                r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#,
                None,
            ),
        )
        .unwrap_err();
        assert_eq!(electing.kind(), PublishErrorKind::Connection);
        // Anything else is not a refusal: it is retried with the same Nats-Msg-Id.
        let garbage = read_ack(&t, &ack("not json", None)).unwrap_err();
        assert_eq!(garbage.kind(), PublishErrorKind::Connection);
        let status = read_ack(&t, &ack("", Some(StatusCode::REQUEST_TERMINATED))).unwrap_err();
        assert_eq!(status.kind(), PublishErrorKind::Connection);
    }

    #[test]
    fn only_publishes_past_the_timeout_expire() {
        let mut awaiting = Awaiting::default();
        let now = Instant::now();
        awaiting
            .by_id
            .insert(1, (now - Duration::from_secs(6), Flight::One(message())));
        awaiting.by_id.insert(2, (now, Flight::One(message())));
        let expired = awaiting.expired(Duration::from_secs(5));
        assert_eq!(expired.len(), 1);
        assert_eq!(awaiting.by_id.keys().copied().collect::<Vec<_>>(), [2]);
        assert!(awaiting.expired(Duration::from_secs(5)).is_empty());
    }
}
