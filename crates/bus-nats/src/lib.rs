//! The NATS JetStream transport of the ordered event bus.
//!
//! * **One connection per topic.** A topic's publishes and its fetcher share that topic's
//!   connection, created on first use; topics do not slow each other down.
//! * **Asynchronous, bounded publishing.** [`NatsPublisher`] does not wait for each broker ack;
//!   at most `max_in_flight` acks are outstanding, and every failure reaches the caller.
//! * **One fetcher per topic feeding a keyed pool.** A single task pulls batches in stream order
//!   and hands each message to the worker its aggregate ID hashes to; a message is acknowledged
//!   only after its handler succeeded.
//!
//! ```no_run
//! use std::sync::Arc;
//! use bus_core::{handler_fn, Envelope, Publisher, Subscriber, Topic};
//! use bus_nats::{NatsBus, NatsConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = NatsConfig::new("nats://127.0.0.1:4222").with_group("accounting");
//! let bus = NatsBus::connect(config).await?;
//! let topic = Topic::new("accounts")?;
//! let subscription = bus
//!     .subscribe(&topic, Arc::new(handler_fn(|e: Envelope| async move {
//!         println!("{} v{}", e.aggregate_id(), e.event_version());
//!         Ok(())
//!     })))
//!     .await?;
//! let receipt = bus.publish(&topic, Envelope::builder("acc-1", "Opened", 1).build()?).await?;
//! receipt.await?; // stored
//! subscription.close().await?;
//! bus.close().await?;
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

mod broker;
mod config;
mod connection;
pub mod control;
mod dead_letters;
mod error;
mod handled;
mod health;
mod lag;
#[cfg(feature = "opentelemetry")]
mod otel;
mod prehashed;
mod provision;
mod publisher;
mod repartition;
mod retention;
mod subscriber;
pub mod telemetry;
mod topics;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bus_core::{
    Envelope, Handler, PublishError, Publisher, RawHandler, RawKey, Receipt, SubscribeError,
    Subscriber, Subscription, Topic,
};
use bytes::Bytes;

pub use bus_core::{current_delivery, with_current_delivery, Delivery};
pub use config::{
    check_stream_name, default_stream_name, redact_url, Auth, BatchConfig, ConnectionCallback,
    ConnectionConfig, ConnectionEvent, ConsumerSpec, DeadLetterConfig, Discard, FetchConfig,
    NatsConfig, Ownership, Provisioning, PublishFailure, PublishFailureCallback, PublishOrdering,
    Retention, StartAt, Storage, StreamSpec, SubscriptionRuntime, TlsConfig,
    ACKNOWLEDGED_PURGE_EVERY, DEFAULT_ACK_WAIT, DEFAULT_BATCH_MAX_BYTES, DEFAULT_BATCH_MAX_EVENTS,
    DEFAULT_BATCH_MAX_IN_FLIGHT, DEFAULT_DEAD_LETTER_MAX_BYTES, DEFAULT_DUPLICATE_WINDOW,
    DEFAULT_FETCH_BATCH, DEFAULT_FETCH_EXPIRES, DEFAULT_MAX_ACK_PENDING, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_WAITING, DEFAULT_METRICS_INTERVAL, DEFAULT_PUBLISH_ACK_TIMEOUT,
    DEFAULT_PUBLISH_RETRY_FOR, DEFAULT_STREAM_MAX_BYTES, DEFAULT_STREAM_MAX_MSGS,
    DEFAULT_TAKEOVER_AFTER, MAX_PARTITIONS,
};
pub(crate) use connection::{Shared, TopicConnection};
pub use control::{GroupReset, ResetTo};
pub use dead_letters::dead_letter_headers;
pub use dead_letters::{DeadLetter, DeadLetterReason};
pub use error::{MemberRefusal, NatsError, NatsErrorKind};
pub use handled::{handled_bucket, NatsHandledVersions};
pub use health::{
    Health, HealthAlert, HealthProblem, HealthStatus, HealthThresholds, SubscriptionHealth,
};
/// The keyed pool's settings, as `NatsConfig::pool` takes them.
pub use keyed_pool::PoolConfig;
pub use lag::Lag;
pub use publisher::{message_size, NatsPublisher};
pub use topics::{ConsumerState, TopicState};

/// The NATS JetStream transport: a [`Publisher`] (through its default [`NatsPublisher`]) and a
/// [`Subscriber`]. Clones share connections.
///
/// The bus's connections run on the tokio runtime [`NatsBus::connect`] was called on,
/// whichever runtime first uses them (a subscription on a thread of its own, a handler there,
/// a task of another runtime): they last as long as that runtime, so connect the bus on the
/// one the process runs on for its life. A publisher's ack task runs on the runtime the
/// publisher is made on ([`NatsBus::publisher`]): to publish from another runtime, such as a
/// current-thread runtime of a thread that publishes in bulk, make the publisher there, with
/// [`NatsBus::publisher_on_own_connections`] to keep all of its work there.
#[derive(Clone)]
pub struct NatsBus {
    shared: Arc<Shared>,
    publisher: NatsPublisher,
    /// The open subscriptions, for the health report.
    watched: Arc<health::Watched>,
    /// Where control requests are answered.
    answering: Arc<control::ControlConnection>,
    /// Record batches released with some events settled, per consumer.
    batch_memory: Arc<subscriber::BatchMemory>,
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl NatsBus {
    /// Validates `config` and prepares the bus. Connections are made per topic on first use,
    /// on the runtime this is called on; this call connects once to check that a server
    /// answers.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn connect(config: NatsConfig) -> Result<Self, NatsError> {
        config.validate()?;
        let shared = Arc::new(Shared {
            config,
            connections: RwLock::new(HashMap::new()),
            publishing: RwLock::new(HashMap::new()),
            connecting: tokio::sync::Mutex::new(()),
            closed: std::sync::atomic::AtomicBool::new(false),
            coordination: Default::default(),
            home: tokio::runtime::Handle::current(),
        });
        // Fail at start-up, not at the first publish, when no server answers.
        let probe = Topic::new("bus-probe").expect("valid topic");
        let client = shared
            .connect(
                &probe,
                crate::connection::Role::Topic,
                crate::connection::On::Home,
            )
            .await?;
        drop(client);
        let publisher = NatsPublisher::new(shared.clone(), false);
        Ok(Self {
            shared,
            publisher,
            watched: Default::default(),
            answering: Default::default(),
            batch_memory: Default::default(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &NatsConfig {
        &self.shared.config
    }

    /// A new publisher with its own in-flight window, sharing this bus's connections.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn publisher(&self) -> NatsPublisher {
        NatsPublisher::new(self.shared.clone(), false)
    }

    /// A new publisher with its own in-flight window and connections of its own: one per
    /// topic, made on its first publish to the topic, closed once every handle of the
    /// publisher is dropped and its publishes are settled.
    ///
    /// For publishing from a runtime of its own, such as a current-thread runtime on a thread
    /// that publishes in bulk. The bus's own connections run on the runtime the bus was
    /// connected on; this publisher's ack task runs on the runtime it is made on, and each of
    /// its connections on the runtime of its first publish to the topic, so made and used on
    /// such a thread all of its work stays there and ends with it.
    /// Kept on one thread, a publisher's tasks (the caller's, its ack task, its connection's)
    /// hand each event to each other without moving it between cores: see
    /// `docs/performance.md`, "Where the publisher's tasks run".
    ///
    /// Its connections are not in [`NatsBus::health`]'s report and [`NatsBus::close`] does not
    /// close them; once the bus is closed its publishes fail with `Closed`. It ignores
    /// [`NatsConfig::share_connection`] and
    /// [`NatsConfig::separate_publish_connection`]: its connections are always its own.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn publisher_on_own_connections(&self) -> NatsPublisher {
        NatsPublisher::new(self.shared.clone(), true)
    }

    /// The underlying client of `topic`'s connection, connecting on first use.
    pub async fn client(&self, topic: &Topic) -> Result<async_nats::Client, NatsError> {
        Ok(self.shared.connection(topic).await?.client.clone())
    }

    /// The JetStream stream that holds `topic`, provisioning it on first use.
    pub async fn stream_name(&self, topic: &Topic) -> Result<String, NatsError> {
        Ok(self.shared.connection(topic).await?.stream.clone())
    }

    /// Flushes the default publisher and closes every connection. From then on every
    /// operation of this bus and of its publishers fails at once with `Closed`.
    pub async fn close(&self) -> Result<(), PublishError> {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let flushed = self.publisher.close().await;
        if let Some(control) = self.answering.get() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), control.drain()).await;
        }
        if let Some(coordination) = self.shared.coordination.get() {
            let drain = coordination.client.drain();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
        }
        // Publishing connections first: what they sent is acknowledged (flushed above).
        let mut connections: Vec<_> = self.shared.publishing.write().unwrap().drain().collect();
        connections.extend(self.shared.connections.write().unwrap().drain());
        for (topic, connection) in connections {
            // Bounded: with the broker unreachable a drain would wait for the reconnection.
            if tokio::time::timeout(std::time::Duration::from_secs(2), connection.client.drain())
                .await
                .is_err()
            {
                tracing::warn!(%topic, "the broker did not answer while closing the connection");
            }
        }
        flushed
    }
}

#[async_trait]
impl Publisher for NatsBus {
    async fn publish(&self, topic: &Topic, envelope: Envelope) -> Result<Receipt, PublishError> {
        self.publisher.publish(topic, envelope).await
    }

    async fn publish_raw(
        &self,
        topic: &Topic,
        headers: Vec<(String, String)>,
        payload: Bytes,
    ) -> Result<Receipt, PublishError> {
        self.publisher.publish_raw(topic, headers, payload).await
    }

    async fn flush(&self) -> Result<(), PublishError> {
        self.publisher.flush().await
    }

    async fn close(&self) -> Result<(), PublishError> {
        NatsBus::close(self).await
    }
}

#[async_trait]
impl Subscriber for NatsBus {
    async fn subscribe(
        &self,
        topic: &Topic,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription, SubscribeError> {
        self.start(topic, subscriber::Dispatch::Envelope(handler))
            .await
    }

    async fn subscribe_raw(
        &self,
        topic: &Topic,
        key: RawKey,
        handler: Arc<dyn RawHandler>,
    ) -> Result<Subscription, SubscribeError> {
        self.start(topic, subscriber::Dispatch::Raw(handler, key))
            .await
    }
}

impl NatsBus {
    /// A subscription, listed for the health report, answering control requests, its gauges
    /// sampled.
    async fn start(
        &self,
        topic: &Topic,
        dispatch: subscriber::Dispatch,
    ) -> Result<Subscription, SubscribeError> {
        let subscription = subscriber::start(
            self.shared.clone(),
            self.batch_memory.clone(),
            topic,
            dispatch,
        )
        .await?;
        Ok(telemetry::sampled(
            self.shared.clone(),
            self.watched.clone(),
            self.answering.clone(),
            topic,
            subscription,
        ))
    }
}

/// The README's examples, compiled as doc-tests so the quick start stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
