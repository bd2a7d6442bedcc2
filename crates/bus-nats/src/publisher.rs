//! The asynchronous, bounded publisher.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind as NatsPublishErrorKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use bus_core::{
    wire, Envelope, PublishError, PublishErrorKind, Published, Publisher, Receipt, Topic,
};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::{Shared, TopicConnection};

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

struct InFlight {
    ack: PublishAckFuture,
    topic: Topic,
    envelope: Option<Envelope>,
    receipt: oneshot::Sender<Result<Published, PublishError>>,
    _permit: OwnedSemaphorePermit,
}

struct State {
    window: Arc<Semaphore>,
    outstanding: AtomicU64,
    idle: Notify,
    first_error: Mutex<Option<PublishError>>,
    closed: AtomicBool,
}

/// Publishes on NATS JetStream without waiting for each ack, within a bounded window.
///
/// Envelopes published in order from one task are stored in that order: they travel on their
/// topic's single connection, which the server reads in order. Each envelope's event ID is its
/// `Nats-Msg-Id`, so publishing the same envelope again within the stream's duplicate window is
/// recognised by the broker (the receipt says `duplicate: true`).
///
/// A failed publish is reported three ways: through its [`Receipt`], through the next
/// [`flush`](Publisher::flush), and through `NatsConfig::on_publish_error` with the envelope.
#[derive(Clone)]
pub struct NatsPublisher {
    shared: Arc<Shared>,
    state: Arc<State>,
    acks: mpsc::UnboundedSender<InFlight>,
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
        headers: HeaderMap,
        payload: Bytes,
        envelope: Option<Envelope>,
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
        let header_len: usize = headers
            .iter()
            .map(|(n, vs)| {
                let n: &str = n.as_ref();
                vs.iter()
                    .map(|v| n.len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum();
        if payload.len() + header_len > max_payload {
            return Err(PublishError::new(
                PublishErrorKind::PayloadTooLarge,
                format!(
                    "message on topic `{topic}` is {} bytes ({} payload + {header_len} headers), over the server's max_payload of {max_payload} bytes",
                    payload.len() + header_len,
                    payload.len()
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
        let ack = connection
            .jetstream
            .publish_with_headers(connection.subject.clone(), headers, payload)
            .await
            .map_err(|e| nats_error(topic, e))?;
        let (tx, rx) = oneshot::channel();
        self.state.outstanding.fetch_add(1, Ordering::AcqRel);
        let in_flight = InFlight {
            ack,
            topic: topic.clone(),
            envelope,
            receipt: tx,
            _permit: permit,
        };
        if self.acks.send(in_flight).is_err() {
            self.state.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(PublishError::new(
                PublishErrorKind::Closed,
                "publisher ack collector stopped",
            ));
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

/// Awaits every outstanding ack, resolves receipts and records failures.
async fn collect_acks(
    mut rx: mpsc::UnboundedReceiver<InFlight>,
    state: Arc<State>,
    shared: Arc<Shared>,
) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some(in_flight) => pending.push(async move {
                    let InFlight { ack, topic, envelope, receipt, _permit } = in_flight;
                    let result = ack.await;
                    (result, topic, envelope, receipt)
                }),
                None if pending.is_empty() => return,
                None => {
                    while let Some(done) = pending.next().await {
                        settle(done, &state, &shared);
                    }
                    return;
                }
            },
            Some(done) = pending.next(), if !pending.is_empty() => settle(done, &state, &shared),
        }
    }
}

type Settled = (
    Result<
        async_nats::jetstream::publish::PublishAck,
        async_nats::jetstream::context::PublishError,
    >,
    Topic,
    Option<Envelope>,
    oneshot::Sender<Result<Published, PublishError>>,
);

fn settle((result, topic, envelope, receipt): Settled, state: &State, shared: &Shared) {
    let outcome = match result {
        Ok(ack) => Ok(Published {
            topic,
            sequence: Some(ack.sequence),
            duplicate: ack.duplicate,
        }),
        Err(error) => {
            let error = nats_error(&topic, error);
            tracing::warn!(%topic, %error, "publish failed");
            if let Some(callback) = &shared.config.on_publish_error {
                callback(&PublishFailure {
                    topic: topic.clone(),
                    envelope,
                    error: PublishError::new(error.kind(), error.to_string()),
                });
            }
            let mut first = state.first_error.lock().unwrap();
            if first.is_none() {
                *first = Some(PublishError::new(error.kind(), error.to_string()));
            }
            Err(error)
        }
    };
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
        self.send(topic, headers, payload, Some(envelope)).await
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
        self.send(topic, map, payload, None).await
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
