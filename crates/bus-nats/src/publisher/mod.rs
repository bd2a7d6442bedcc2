//! The asynchronous, bounded publisher.
//!
//! A publish is one write: the message goes to its topic's connection with a reply subject of
//! the publisher's own ack inbox (`<inbox>.<id>`), and waits in a map until the broker's ack
//! comes back on that inbox. One task per publisher reads the acks in bursts, resolves receipts,
//! retries transient failures, times out the acks that never come and sends the next event of
//! each aggregate chain. So publishing wakes no task of its own and arms no timer per message.

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
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use crate::telemetry::{PublishMetrics, Seconds};
use crate::{BatchConfig, PublishFailure, PublishOrdering, Shared, TopicConnection};

mod acks;
mod encode;
mod lane;
mod message;
mod settle;
#[cfg(test)]
mod test_support;

use acks::{collect_acks, transmit, AckResult, Awaiting, Timer, Timers};
pub(crate) use encode::header_len;
pub use encode::message_size;
use encode::{batch_body, batch_headers};
use lane::Lane;
use message::{Message, Publish};
use settle::Settler;

/// The publishes of one batch. One is held inline: with batching off every batch is one event.
type Batched = smallvec::SmallVec<[Message; 1]>;

/// What one NATS message carries while it awaits its ack: a raw publish, or a batch of envelopes
/// (one event when batching is off).
enum Flight {
    Raw(Message),
    Batch(Batch),
}

impl Flight {
    fn topic(&self) -> &Topic {
        match self {
            Flight::Raw(m) => &m.topic,
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
    messages: Batched,
    /// The body, built on the first send and sent again as it is (the headers are built
    /// again, the same).
    body: Option<Bytes>,
    first_sent: Option<Instant>,
    /// Times sent.
    sends: u32,
}

/// Where a topic's publishes go and where their acks come back.
struct Route {
    connection: Arc<TopicConnection>,
    /// `<inbox>.`: a publish's reply subject is this followed by its ID.
    reply_prefix: String,
    /// The connection's re-connections when last looked at: a change means the acks of what
    /// was sent before may have gone down the old socket.
    reconnects_seen: AtomicU64,
    /// The connection's permissions violations, to notice a refused publish to the topic.
    violations: Mutex<tokio::sync::watch::Receiver<Option<crate::broker::Violation>>>,
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

struct State {
    window: Arc<Semaphore>,
    outstanding: AtomicU64,
    idle: Notify,
    first_error: Mutex<Option<PublishError>>,
    closed: AtomicBool,
    /// Each topic's connection and ack inbox, set up on its first publish.
    routes: RwLock<HashMap<Topic, Arc<Route>, ahash::RandomState>>,
    routing: tokio::sync::Mutex<()>,
    awaiting: Mutex<Awaiting>,
    next_id: AtomicU64,
    /// Publishes sent again after a transient failure.
    retries: AtomicU64,
    /// Settled publishes kept to make the next ones in.
    spares: message::Spares,
    /// Its publishes go out on connections of its own, not on the bus's
    /// ([`NatsBus::publisher_on_own_connections`](crate::NatsBus::publisher_on_own_connections)).
    own_connections: bool,
}

/// The key of an aggregate's chain in its lane: a hash of the topic and the aggregate. A
/// collision only makes two aggregates share one chain, which keeps both in order. Seeded at
/// random once per process: the lanes' tables use the key as its own hash, so keys must not be
/// predictable from aggregate IDs.
fn chain_key(topic: &Topic, aggregate: &str) -> u64 {
    static HASHER: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    HASHER
        .get_or_init(ahash::RandomState::new)
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
    pub(crate) fn new(shared: Arc<Shared>, own_connections: bool) -> Self {
        let state = Arc::new(State {
            window: Arc::new(Semaphore::new(shared.config.max_in_flight)),
            outstanding: AtomicU64::new(0),
            idle: Notify::new(),
            first_error: Mutex::new(None),
            closed: AtomicBool::new(false),
            routes: RwLock::new(HashMap::default()),
            routing: tokio::sync::Mutex::new(()),
            awaiting: Mutex::new(Awaiting::default()),
            next_id: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            spares: message::Spares::for_batches(
                &shared.config.batching,
                shared.config.max_in_flight,
            ),
            own_connections,
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
        let connection = if self.state.own_connections {
            self.shared
                .new_publish_connection(topic, crate::connection::On::Caller)
                .await
                .map(Arc::new)
        } else {
            self.shared.publish_connection(topic).await
        };
        let connection = connection.map_err(|e| {
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
        if !limits.enabled() {
            // Batching off: every event is a batch of one, and different aggregates are
            // pipelined up to the publisher's window (`max_in_flight` of the bus).
            limits.max_in_flight = usize::MAX;
        }
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
        raw: Option<Box<(HeaderMap, Bytes)>>,
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
        let record_len = match (&raw, &envelope) {
            (None, Some(e)) => wire::record_len(e),
            _ => 0,
        };
        let (header_len, payload_len) = match (&raw, &envelope) {
            (Some(raw), _) => (header_len(&raw.0), raw.1.len()),
            (None, Some(e)) => (
                // The envelope's header lines, plus the block's first and last lines and the
                // `Nats-Msg-Id` a single-event message adds.
                wire::header_lines_len(e)
                    + b"NATS/1.0\r\n\r\n".len()
                    + "Nats-Msg-Id: \r\n".len()
                    + e.event_id().as_str().len(),
                e.payload().len(),
            ),
            (None, None) => unreachable!("a publish is an envelope or raw"),
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
        // A free place in the window is the usual case: taken without making a waiting future.
        let permit = match self.state.window.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => self
                .state
                .window
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| PublishError::new(PublishErrorKind::Closed, "publisher is closed"))?,
        };
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
        // Envelopes go through their lane, batched or not: one chain mechanism. A raw
        // publish belongs to no chain and goes as it is.
        let lane = envelope
            .as_ref()
            .map(|e| route.lane_for(e.aggregate_id().as_str()).clone());
        let publish = Publish::create(
            &self.state.spares,
            topic.clone(),
            chain,
            record_len,
            route.metrics.clone(),
            envelope,
            raw,
            span,
            permit,
        );
        let receipt = Receipt::from_outcome(publish.clone());
        let message = Message(publish);
        self.state.outstanding.fetch_add(1, Ordering::AcqRel);
        match lane {
            Some(lane) => self.enqueue(topic, &route, lane, message).await?,
            None => self.write(&route, Flight::Raw(message)).await?,
        }
        Ok(receipt)
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
        lane: Arc<Lane>,
        message: Message,
    ) -> Result<(), PublishError> {
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
                && st.in_flight < limits.partial_in_flight()
            {
                st.lingering = true;
                let oldest = st.oldest().map_or(now, |m| m.created);
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
                body: None,
                first_sent: None,
                sends: 0,
            };
            self.write(route, Flight::Batch(batch)).await?;
        }
        Ok(())
    }
}

impl NatsPublisher {
    /// [`Publisher::publish`], without the boxed future the trait's method returns: what a
    /// call on a `NatsPublisher` itself (not through `dyn Publisher` or a generic) runs. The
    /// publishing future is large; allocating and copying it per event is measurable.
    pub async fn publish(
        &self,
        topic: &Topic,
        mut envelope: Envelope,
    ) -> Result<Receipt, PublishError> {
        #[cfg(feature = "opentelemetry")]
        crate::otel::inject(&mut envelope);
        bus_core::continue_trace(&mut envelope, bus_core::new_parent_id);
        // Headers are built when it is sent: as a record of a batch, or alone.
        self.send(topic, Some(envelope), None).await
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, topic: &Topic, envelope: Envelope) -> Result<Receipt, PublishError> {
        NatsPublisher::publish(self, topic, envelope).await
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
        self.send(topic, None, Some(Box::new((map, payload)))).await
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
