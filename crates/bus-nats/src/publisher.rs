//! The asynchronous, bounded publisher.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind as NatsPublishErrorKind;
use async_nats::HeaderMap;
use async_trait::async_trait;
use bus_core::{
    wire, Envelope, PublishError, PublishErrorKind, Published, Publisher, Receipt, Topic,
};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::{PublishOrdering, Shared, TopicConnection};

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
    _permit: OwnedSemaphorePermit,
}

/// Bytes of headers as they travel (`name: value\r\n`).
fn header_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, vs)| {
            let n: &str = n.as_ref();
            vs.iter()
                .map(|v| n.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum()
}

type AckResult = Result<
    async_nats::jetstream::publish::PublishAck,
    async_nats::jetstream::context::PublishError,
>;

/// A publish on its way: sent, or waiting to be sent again.
type Attempt = Pin<Box<dyn Future<Output = (AckResult, Message)> + Send>>;

struct State {
    window: Arc<Semaphore>,
    outstanding: AtomicU64,
    idle: Notify,
    first_error: Mutex<Option<PublishError>>,
    closed: AtomicBool,
    /// Aggregate chains with a publish awaiting its ack → the publishes waiting behind it.
    chains: Mutex<HashMap<u64, VecDeque<Message>>>,
}

fn chain_key(topic: &Topic, aggregate: &str) -> u64 {
    // Fixed seeds: a collision only makes two aggregates share one chain, which keeps both in
    // order.
    static HASHER: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    HASHER
        .get_or_init(|| ahash::RandomState::with_seeds(7, 11, 13, 17))
        .hash_one((topic.as_str(), aggregate))
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
/// A failed publish is reported three ways: through its [`Receipt`], through the next
/// [`flush`](Publisher::flush), and through `NatsConfig::on_publish_error` with the envelope.
#[derive(Clone)]
pub struct NatsPublisher {
    shared: Arc<Shared>,
    state: Arc<State>,
    acks: mpsc::UnboundedSender<Attempt>,
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

fn nats_error(topic: &Topic, error: async_nats::jetstream::context::PublishError) -> PublishError {
    let kind = match error.kind() {
        NatsPublishErrorKind::TimedOut => PublishErrorKind::TimedOut,
        NatsPublishErrorKind::BrokenPipe => PublishErrorKind::Connection,
        NatsPublishErrorKind::StreamNotFound => PublishErrorKind::Rejected,
        NatsPublishErrorKind::MaxPayloadExceeded => PublishErrorKind::PayloadTooLarge,
        NatsPublishErrorKind::WrongLastMessageId | NatsPublishErrorKind::WrongLastSequence => {
            PublishErrorKind::Rejected
        }
        _ => {
            // "Other" covers both broker refusals (limits) and client-side send failures.
            let text = error.to_string();
            if text.contains("jetstream error") || text.contains("maximum") {
                PublishErrorKind::Rejected
            } else {
                PublishErrorKind::Connection
            }
        }
    };
    PublishError::with_source(kind, format!("publish on topic `{topic}` failed"), error)
}

impl NatsPublisher {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let state = Arc::new(State {
            window: Arc::new(Semaphore::new(shared.config.max_in_flight)),
            outstanding: AtomicU64::new(0),
            idle: Notify::new(),
            first_error: Mutex::new(None),
            closed: AtomicBool::new(false),
            chains: Mutex::new(HashMap::new()),
        });
        let (acks, rx) = mpsc::unbounded_channel();
        tokio::spawn(collect_acks(rx, state.clone(), shared.clone()));
        Self {
            shared,
            state,
            acks,
        }
    }

    /// Publishes whose ack has not arrived yet.
    pub fn outstanding(&self) -> u64 {
        self.state.outstanding.load(Ordering::Relaxed)
    }

    async fn send(
        &self,
        topic: &Topic,
        envelope: Option<Envelope>,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Receipt, PublishError> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(PublishError::new(
                PublishErrorKind::Closed,
                format!("cannot publish on topic `{topic}`: the publisher is closed"),
            ));
        }
        let connection: Arc<TopicConnection> =
            self.shared.connection(topic).await.map_err(|e| {
                PublishError::with_source(
                    PublishErrorKind::Connection,
                    format!("no connection for topic `{topic}`"),
                    e,
                )
            })?;
        let max_payload = connection.max_payload;
        let (header_len, payload_len) = (header_len(&headers), payload.len());
        if payload_len + header_len > max_payload {
            return Err(PublishError::new(
                PublishErrorKind::PayloadTooLarge,
                format!(
                    "message on topic `{topic}` is {} bytes ({} payload + {header_len} headers), over the server's max_payload of {max_payload} bytes",
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
        let (tx, rx) = oneshot::channel();
        let message = Message {
            topic: topic.clone(),
            chain,
            envelope,
            receipt: tx,
            first_sent: None,
            prepared: Some((headers, payload)),
            _permit: permit,
        };
        self.state.outstanding.fetch_add(1, Ordering::AcqRel);
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
            let attempt = transmit(connection, message).await;
            if self.acks.send(attempt).is_err() {
                return Err(PublishError::new(
                    PublishErrorKind::Closed,
                    "publisher ack collector stopped",
                ));
            }
        }
        Ok(Receipt::new(async move {
            rx.await.unwrap_or_else(|_| {
                Err(PublishError::new(
                    PublishErrorKind::Connection,
                    "publisher stopped before the ack arrived",
                ))
            })
        }))
    }
}

/// Writes `message` to its topic's connection now (so publishes leave in call order) and
/// returns the wait for its ack.
async fn transmit(connection: Arc<TopicConnection>, mut message: Message) -> Attempt {
    message.first_sent.get_or_insert_with(Instant::now);
    let (headers, payload) = match (message.prepared.take(), &message.envelope) {
        (Some(prepared), _) => prepared,
        (None, Some(e)) => (envelope_headers(e), e.payload().clone()),
        (None, None) => unreachable!("raw publishes are sent once"),
    };
    let sent = connection
        .jetstream
        .publish_with_headers(connection.subject.clone(), headers, payload)
        .await;
    Box::pin(async move {
        let result = match sent {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        (result, message)
    })
}

/// Sends `message` again after `delay`.
fn retransmit(shared: Arc<Shared>, message: Message, delay: Duration) -> Attempt {
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        match shared.connection(&message.topic).await {
            Ok(connection) => transmit(connection, message).await.await,
            Err(error) => {
                let error = async_nats::jetstream::context::PublishError::with_source(
                    NatsPublishErrorKind::Other,
                    error,
                );
                (Err(error), message)
            }
        }
    })
}

/// Awaits every outstanding ack, retries what failed for a transient reason, sends the next
/// publish of each aggregate chain, resolves receipts and records failures.
async fn collect_acks(
    mut rx: mpsc::UnboundedReceiver<Attempt>,
    state: Arc<State>,
    shared: Arc<Shared>,
) {
    let mut pending = FuturesUnordered::new();
    let mut closing = false;
    loop {
        tokio::select! {
            next = rx.recv(), if !closing => match next {
                Some(attempt) => pending.push(attempt),
                None => closing = true,
            },
            Some((result, message)) = pending.next(), if !pending.is_empty() => {
                if let Some(attempt) = settle(result, message, &state, &shared).await {
                    pending.push(attempt);
                }
            }
            else => return,
        }
    }
}

fn is_transient(error: &PublishError) -> bool {
    matches!(
        error.kind(),
        PublishErrorKind::TimedOut | PublishErrorKind::Connection
    )
}

/// Settles one ack. Returns the attempts it started: a retry of this publish, or the next
/// publish of its aggregate chain.
async fn settle(
    result: AckResult,
    message: Message,
    state: &State,
    shared: &Arc<Shared>,
) -> Option<Attempt> {
    let topic = message.topic.clone();
    match result {
        Ok(ack) => {
            let chain = message.chain;
            finish(
                message,
                Ok(Published {
                    topic: topic.clone(),
                    sequence: Some(ack.sequence),
                    duplicate: ack.duplicate,
                }),
                state,
                shared,
            );
            let key = chain?;
            let next = {
                let mut chains = state.chains.lock().unwrap();
                let next = chains.get_mut(&key).and_then(VecDeque::pop_front);
                if next.is_none() {
                    chains.remove(&key);
                }
                next
            }?;
            match shared.connection(&next.topic).await {
                Ok(connection) => Some(transmit(connection, next).await),
                Err(_) => Some(retransmit(shared.clone(), next, RETRY_FIRST_DELAY)),
            }
        }
        Err(error) => {
            let error = nats_error(&topic, error);
            let elapsed = message.first_sent.map_or(Duration::ZERO, |t| t.elapsed());
            if message.chain.is_some()
                && is_transient(&error)
                && elapsed < shared.config.publish_retry_for
            {
                // Retried before any later event of the aggregate is sent; the same
                // Nats-Msg-Id makes a retry of a publish that was in fact stored a duplicate.
                let delay = (RETRY_FIRST_DELAY
                    * 2u32.pow((elapsed.as_millis() / 500).min(5) as u32))
                .min(RETRY_MAX_DELAY);
                tracing::debug!(%topic, %error, ?delay, "publish failed; retrying before the aggregate's later events");
                return Some(retransmit(shared.clone(), message, delay));
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
            None
        }
    }
}

const RETRY_FIRST_DELAY: Duration = Duration::from_millis(50);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);

/// Resolves a receipt and tells failures to `flush` and the failure callback.
fn finish(
    message: Message,
    outcome: Result<Published, PublishError>,
    state: &State,
    shared: &Shared,
) {
    let Message {
        topic,
        envelope,
        receipt,
        ..
    } = message;
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
    async fn publish(&self, topic: &Topic, envelope: Envelope) -> Result<Receipt, PublishError> {
        let headers = envelope_headers(&envelope);
        let payload = envelope.payload().clone();
        self.send(topic, Some(envelope), headers, payload).await
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
        self.send(topic, None, map, payload).await
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
