//! An in-memory transport with the bus's guarantee: per aggregate (per topic) events are handled
//! strictly in publish order, different aggregates in parallel, with bounded queues.
//!
//! It behaves like a durable broker inside one process: a topic keeps its messages until they
//! are handled, a subscriber that closes and reopens continues where the last one stopped
//! (nothing handled is handled again, nothing unhandled is lost), and only one subscription per
//! topic is active at a time. Use it in your own unit tests in place of `bus-nats`.
//!
//! ```
//! use std::sync::Arc;
//! use bus_core::{handler_fn, Envelope, Publisher, Subscriber, Topic};
//! use bus_memory::MemoryBus;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = MemoryBus::new();
//! let topic = Topic::new("accounts")?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let subscription = bus
//!     .subscribe(&topic, Arc::new(handler_fn(move |e: Envelope| {
//!         let tx = tx.clone();
//!         async move { tx.send(e.event_version()).unwrap(); Ok(()) }
//!     })))
//!     .await?;
//! for version in 1..=3 {
//!     let _receipt = bus.publish(&topic, Envelope::builder("acc-1", "Deposited", version).build()?).await?;
//! }
//! assert_eq!([rx.recv().await, rx.recv().await, rx.recv().await], [Some(1), Some(2), Some(3)]);
//! subscription.close().await?;
//! # Ok(())
//! # }
//! ```
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{
    run_with_retry, wire, with_delivery, CancelSource, CloseReport, Delivery, Envelope, Handler,
    HandlerError, Prepared, PublishError, PublishErrorKind, Published, Publisher, RawHandler,
    RawKey, RawMessage, Receipt, RetryOutcome, RetryPolicy, SubscribeError, SubscribeErrorKind,
    Subscriber, Subscription, SubscriptionHandle, Topic, TraceParent, Unhandleable, TRACEPARENT,
};
use bytes::Bytes;
use keyed_pool::{KeyedPool, PoolConfig};
use tokio::sync::{watch, Notify};

/// Default number of messages a topic holds before `publish` waits for the subscriber.
pub const DEFAULT_TOPIC_CAPACITY: usize = 100_000;

/// Configuration of a [`MemoryBus`].
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Messages a topic holds before `publish` waits (default [`DEFAULT_TOPIC_CAPACITY`]).
    pub topic_capacity: usize,
    /// Workers and queue sizes of each subscription's keyed pool.
    pub pool: PoolConfig,
    /// How retryable handler errors are retried.
    pub retry: RetryPolicy,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            topic_capacity: DEFAULT_TOPIC_CAPACITY,
            pool: PoolConfig {
                workers: 64,
                ..PoolConfig::default()
            },
            retry: RetryPolicy::default(),
        }
    }
}

/// A message that could not be handled: kept with its reason instead of being dropped.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message as it was published.
    pub message: RawMessage,
    /// Why it was dead-lettered (`permanent`, `retries-exhausted`, `panic`, `undecodable`).
    pub reason: String,
    /// The failure's text.
    pub error: String,
    /// Handler attempts made (0 if the message never reached the handler).
    pub attempts: u32,
}

#[derive(Debug, Clone)]
enum Body {
    Envelope(Envelope),
    Raw(RawMessage),
}

#[derive(Debug)]
struct LogState {
    /// Offset of `entries[0]`.
    base: u64,
    /// `None` marks a handled entry that cannot be removed yet because an earlier one is not.
    entries: VecDeque<Option<Arc<Body>>>,
    subscribed: bool,
}

#[derive(Debug)]
struct TopicLog {
    state: Mutex<LogState>,
    /// Signalled when a message is appended.
    appended: Notify,
    /// Signalled when a message is removed.
    freed: Notify,
}

impl TopicLog {
    fn ack(&self, offset: u64) {
        let mut state = self.state.lock().unwrap();
        let index = (offset - state.base) as usize;
        state.entries[index] = None;
        let mut freed = false;
        while let Some(None) = state.entries.front() {
            state.entries.pop_front();
            state.base += 1;
            freed = true;
        }
        drop(state);
        if freed {
            self.freed.notify_waiters();
        }
    }
}

struct Inner {
    config: MemoryConfig,
    topics: Mutex<HashMap<Topic, Arc<TopicLog>>>,
    dead_letters: Mutex<Vec<DeadLetter>>,
    closed: std::sync::atomic::AtomicBool,
}

/// The in-memory transport: both [`Publisher`] and [`Subscriber`]. Clones share one bus;
/// [`Publisher::close`] closes it for publishing through every clone.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    /// A bus with the default configuration.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A bus with `config`.
    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                topics: Mutex::new(HashMap::new()),
                dead_letters: Mutex::new(Vec::new()),
                closed: Default::default(),
            }),
        }
    }

    /// Messages that could not be handled, in the order they failed.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.dead_letters.lock().unwrap().clone()
    }

    /// Messages of `topic` not yet handled.
    pub fn pending(&self, topic: &Topic) -> usize {
        self.log(topic)
            .state
            .lock()
            .unwrap()
            .entries
            .iter()
            .filter(|e| e.is_some())
            .count()
    }

    fn log(&self, topic: &Topic) -> Arc<TopicLog> {
        self.inner
            .topics
            .lock()
            .unwrap()
            .entry(topic.clone())
            .or_insert_with(|| {
                Arc::new(TopicLog {
                    state: Mutex::new(LogState {
                        base: 0,
                        entries: VecDeque::new(),
                        subscribed: false,
                    }),
                    appended: Notify::new(),
                    freed: Notify::new(),
                })
            })
            .clone()
    }

    async fn append(&self, topic: &Topic, body: Body) -> Result<Receipt, PublishError> {
        let log = self.log(topic);
        loop {
            let freed = log.freed.notified();
            {
                let mut state = log.state.lock().unwrap();
                if self.inner.closed.load(Ordering::Acquire) {
                    return Err(PublishError::new(
                        PublishErrorKind::Closed,
                        format!("cannot publish on topic `{topic}`: the bus is closed"),
                    ));
                }
                if state.entries.len() < self.inner.config.topic_capacity {
                    let offset = state.base + state.entries.len() as u64;
                    state.entries.push_back(Some(Arc::new(body)));
                    drop(state);
                    log.appended.notify_waiters();
                    return Ok(Receipt::ready(Ok(Published {
                        topic: topic.clone(),
                        sequence: Some(offset + 1),
                        duplicate: false,
                    })));
                }
            }
            freed.await;
        }
    }

    async fn start(
        &self,
        topic: &Topic,
        dispatch: Dispatch,
    ) -> Result<Subscription, SubscribeError> {
        let log = self.log(topic);
        {
            let mut state = log.state.lock().unwrap();
            if state.subscribed {
                return Err(SubscribeError::new(
                    SubscribeErrorKind::AlreadySubscribed,
                    format!("topic `{topic}` already has an active subscription"),
                ));
            }
            state.subscribed = true;
        }
        let handled = Arc::new(AtomicU64::new(0));
        let dispatch = Arc::new(dispatch);
        let runner = JobRunner {
            log: log.clone(),
            topic: topic.clone(),
            dispatch: dispatch.clone(),
            retry: self.inner.config.retry.clone(),
            handled: handled.clone(),
            bus: self.inner.clone(),
            cancel: Arc::new(CancelSource::new()),
            stopped: Arc::default(),
            returned: Arc::default(),
        };
        let cancel = runner.cancel.clone();
        let returned = runner.returned.clone();
        let pool = KeyedPool::new(self.inner.config.pool.clone(), move |job: Job| {
            let runner = runner.clone();
            async move {
                runner.run(job).await;
                Ok::<(), std::convert::Infallible>(())
            }
        });
        let (stop, stop_rx) = watch::channel(false);
        let fetcher = tokio::spawn(fetch(log.clone(), topic.clone(), dispatch, pool, stop_rx));
        Ok(Subscription::new(MemorySubscription {
            log,
            stop,
            fetcher,
            handled,
            cancel,
            returned,
        }))
    }
}

#[derive(Clone)]
enum Dispatch {
    Envelope(Arc<dyn Handler>),
    Raw(Arc<dyn RawHandler>, RawKey),
}

struct Job {
    offset: u64,
    /// The ordering key the pool routed it by.
    key: Arc<str>,
    body: Arc<Body>,
    /// The message decoded for the handler, or why it could not be.
    input: Result<Input, Unhandleable>,
}

type Input = Prepared;

#[derive(Clone)]
struct JobRunner {
    log: Arc<TopicLog>,
    topic: Topic,
    dispatch: Arc<Dispatch>,
    retry: RetryPolicy,
    handled: Arc<AtomicU64>,
    bus: Arc<Inner>,
    cancel: Arc<CancelSource>,
    /// Keys whose event failed after the subscription started closing: that event and the
    /// key's later ones stay in the log unacknowledged, for the next subscriber, in order.
    stopped: Arc<Mutex<HashSet<String>>>,
    /// Events left unacknowledged that way.
    returned: Arc<AtomicU64>,
}

fn as_raw(topic: &Topic, body: &Body) -> RawMessage {
    match body {
        Body::Raw(m) => m.clone(),
        Body::Envelope(e) => {
            let mut headers = Vec::new();
            wire::encode_headers(e, |n, v| headers.push((n.to_owned(), v.to_owned())));
            RawMessage {
                topic: topic.clone(),
                subject: topic.to_string(),
                headers,
                payload: e.payload().clone(),
            }
        }
    }
}

impl JobRunner {
    async fn run(&self, job: Job) {
        if self.stopped.lock().unwrap().contains(&*job.key) {
            self.returned.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let outcome = match job.input {
            Err(why) => {
                let reason = match why {
                    Unhandleable::Undecodable(_) => "undecodable",
                    Unhandleable::NoKey => "no-key",
                };
                self.dead_letter(&job.body, reason, why.to_string(), 0);
                self.log.ack(job.offset);
                return;
            }
            Ok(input) => {
                let input = &input;
                run_with_retry(
                    &self.retry,
                    |attempt| {
                        let dispatch = self.dispatch.clone();
                        let (input, traceparent) = match input {
                            Prepared::Envelope(e) => {
                                (Prepared::Envelope(e.clone()), e.traceparent())
                            }
                            Prepared::Raw(m) => (
                                Prepared::Raw(m.clone()),
                                m.header(TRACEPARENT).and_then(TraceParent::parse),
                            ),
                        };
                        let delivery = Delivery {
                            attempt,
                            stream_sequence: Some(job.offset + 1),
                            batch_index: None,
                            partition: None,
                            cancellation: self.cancel.signal(),
                            traceparent,
                            // A log in memory: stored and received are the same moment.
                            stored_at: None,
                            received_at: None,
                            ownership_term: None,
                        };
                        // Once closing, a failed event is not tried again: it is returned.
                        let closing = attempt > 1 && self.cancel.is_closed();
                        with_delivery(delivery, async move {
                            if closing {
                                return Err(HandlerError::retryable("the subscription is closing"));
                            }
                            match (&*dispatch, input) {
                                (Dispatch::Envelope(h), Prepared::Envelope(e)) => h.handle(e).await,
                                (Dispatch::Raw(h, _), Prepared::Raw(m)) => h.handle(m).await,
                                _ => unreachable!("jobs are decoded for their dispatch"),
                            }
                        })
                    },
                    |delay| {
                        let cancellation = self.cancel.signal();
                        async move {
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = cancellation.cancelled() => {}
                            }
                        }
                    },
                    bus_core::jitter,
                    |attempt, error| {
                        tracing::debug!(topic = %self.topic, attempt, %error, "retrying handler");
                    },
                )
                .await
            }
        };
        match outcome {
            RetryOutcome::Succeeded { .. } => {
                self.handled.fetch_add(1, Ordering::Relaxed);
            }
            // A retryable failure while closing may be the handler giving up because of it.
            RetryOutcome::Failed { ref reason, .. }
                if reason.is_retryable() && self.cancel.is_closed() =>
            {
                // Closing: not dead-lettered, but returned with the key's later events.
                self.stopped.lock().unwrap().insert(job.key.to_string());
                self.returned.fetch_add(1, Ordering::Relaxed);
                return;
            }
            RetryOutcome::Failed { attempts, reason } => {
                self.dead_letter(&job.body, reason.code(), reason.to_string(), attempts);
            }
        }
        self.log.ack(job.offset);
    }

    fn dead_letter(&self, body: &Body, reason: &str, error: String, attempts: u32) {
        tracing::warn!(topic = %self.topic, reason, %error, "message dead-lettered");
        self.bus.dead_letters.lock().unwrap().push(DeadLetter {
            message: as_raw(&self.topic, body),
            reason: reason.to_owned(),
            error,
            attempts,
        });
    }
}

/// Decodes a stored message for the subscription's handler; returns the ordering key too (see
/// [`bus_core::prepare`]: the same rules as every transport).
fn prepare(
    topic: &Topic,
    dispatch: &Dispatch,
    body: &Body,
) -> (Arc<str>, Result<Input, Unhandleable>) {
    if let (Dispatch::Envelope(_), Body::Envelope(e)) = (dispatch, body) {
        // Stored as an envelope: nothing to decode.
        return (e.aggregate_id().shared(), Ok(Prepared::Envelope(e.clone())));
    }
    let raw_key = match dispatch {
        Dispatch::Envelope(_) => None,
        Dispatch::Raw(_, key) => Some(key),
    };
    let raw = as_raw(topic, body);
    let headers = raw.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    bus_core::prepare(topic, raw_key, &raw.subject, headers, &raw.payload)
}

/// The subscription's single reader: walks the topic in offset order and hands each message to
/// the keyed pool under its ordering key.
async fn fetch(
    log: Arc<TopicLog>,
    topic: Topic,
    dispatch: Arc<Dispatch>,
    pool: KeyedPool<Job>,
    mut stop: watch::Receiver<bool>,
) -> KeyedPool<Job> {
    let mut cursor = log.state.lock().unwrap().base;
    loop {
        let appended = log.appended.notified();
        let next = {
            let state = log.state.lock().unwrap();
            cursor = cursor.max(state.base);
            let mut found = None;
            while cursor < state.base + state.entries.len() as u64 {
                let entry = &state.entries[(cursor - state.base) as usize];
                cursor += 1;
                if let Some(body) = entry {
                    found = Some((cursor - 1, body.clone()));
                    break;
                }
            }
            found
        };
        match next {
            Some((offset, body)) => {
                let (key, input) = prepare(&topic, &dispatch, &body);
                let job = Job {
                    offset,
                    key: key.clone(),
                    body,
                    input,
                };
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    result = pool.submit(&key, job) => {
                        if result.is_err() {
                            break;
                        }
                    }
                }
            }
            None => {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    _ = appended => {}
                }
            }
        }
    }
    pool
}

struct MemorySubscription {
    log: Arc<TopicLog>,
    stop: watch::Sender<bool>,
    fetcher: tokio::task::JoinHandle<KeyedPool<Job>>,
    handled: Arc<AtomicU64>,
    /// Fired when the subscription starts closing; handlers see it in their [`Delivery`].
    cancel: Arc<CancelSource>,
    /// Events that failed while closing, or waited behind one, left for the next subscriber.
    returned: Arc<AtomicU64>,
}

#[async_trait]
impl SubscriptionHandle for MemorySubscription {
    async fn close(self: Box<Self>, deadline: Duration) -> Result<CloseReport, SubscribeError> {
        let _ = self.stop.send(true);
        self.cancel.close();
        let pool = self.fetcher.await.map_err(|e| {
            SubscribeError::with_source(SubscribeErrorKind::Closed, "subscription reader failed", e)
        })?;
        // Jobs not run stay in the log un-acknowledged: the next subscriber gets them, in order.
        let report = pool.shutdown_within(deadline).await;
        self.log.state.lock().unwrap().subscribed = false;
        let result = CloseReport {
            handled: self.handled.load(Ordering::Relaxed),
            returned: report.not_run.len() as u64
                + report.interrupted
                + self.returned.load(Ordering::Relaxed),
            unconfirmed: 0,
        };
        if report.interrupted > 0 {
            return Err(SubscribeError::new(
                SubscribeErrorKind::ShutdownTimedOut,
                format!(
                    "{} handlers were still running after {deadline:?}; their messages will be delivered again",
                    report.interrupted
                ),
            ));
        }
        Ok(result)
    }
}

#[async_trait]
impl Publisher for MemoryBus {
    async fn publish(
        &self,
        topic: &Topic,
        mut envelope: Envelope,
    ) -> Result<Receipt, PublishError> {
        bus_core::continue_trace(&mut envelope, bus_core::new_parent_id);
        self.append(topic, Body::Envelope(envelope)).await
    }

    async fn publish_raw(
        &self,
        topic: &Topic,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<Receipt, PublishError> {
        let message = RawMessage {
            topic: topic.clone(),
            subject: topic.to_string(),
            headers,
            payload,
        };
        self.append(topic, Body::Raw(message)).await
    }

    async fn flush(&self) -> Result<(), PublishError> {
        // Every publish is stored before `publish` returns.
        Ok(())
    }

    async fn close(&self) -> Result<(), PublishError> {
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl Subscriber for MemoryBus {
    async fn subscribe(
        &self,
        topic: &Topic,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription, SubscribeError> {
        self.start(topic, Dispatch::Envelope(handler)).await
    }

    async fn subscribe_raw(
        &self,
        topic: &Topic,
        key: RawKey,
        handler: Arc<dyn RawHandler>,
    ) -> Result<Subscription, SubscribeError> {
        self.start(topic, Dispatch::Raw(handler, key)).await
    }
}
