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
//! let bus = NatsBus::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
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

mod config;
mod dead_letters;
mod provision;
mod publisher;
mod retention;
mod subscriber;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use async_nats::jetstream;
use async_trait::async_trait;
use bus_core::{
    Envelope, Handler, PublishError, Publisher, RawHandler, RawKey, Receipt, SubscribeError,
    Subscriber, Subscription, Topic, ValidationError,
};
use bytes::Bytes;

pub use config::{
    check_stream_name, default_stream_name, Auth, ConnectionCallback, ConnectionConfig,
    ConnectionEvent, ConsumerSpec, DeadLetterConfig, FetchConfig, NatsConfig, Provisioning,
    PublishFailureCallback, PublishOrdering, Retention, StreamSpec, TlsConfig,
    ACKNOWLEDGED_PURGE_EVERY, DEFAULT_ACK_WAIT, DEFAULT_DUPLICATE_WINDOW, DEFAULT_FETCH_BATCH,
    DEFAULT_FETCH_EXPIRES, DEFAULT_MAX_ACK_PENDING, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_WAITING,
    DEFAULT_PUBLISH_RETRY_FOR, DEFAULT_STREAM_MAX_BYTES, DEFAULT_STREAM_MAX_MSGS,
};
pub use dead_letters::DeadLetter;
pub use publisher::{NatsPublisher, PublishFailure, PUBLISH_ACK_TIMEOUT};
pub use subscriber::dead_letter_headers;

/// Errors of the NATS transport.
#[derive(Debug)]
#[non_exhaustive]
pub enum NatsError {
    /// The configuration was refused before anything was sent.
    Invalid(ValidationError),
    /// Connecting failed.
    Connect {
        /// The servers tried.
        servers: Vec<String>,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// A stream or consumer is missing or differs from the configuration.
    Configuration(String),
    /// A JetStream API call failed.
    Api {
        /// What was being done.
        what: String,
        /// The error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server lacks a feature the configuration needs.
    Unsupported(String),
}

impl NatsError {
    pub(crate) fn api(
        what: String,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        NatsError::Api {
            what,
            source: source.into(),
        }
    }
}

impl fmt::Display for NatsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsError::Invalid(e) => write!(f, "invalid configuration: {e}"),
            NatsError::Connect { servers, source } => {
                write!(f, "could not connect to {}: {source}", servers.join(", "))
            }
            NatsError::Configuration(m) => f.write_str(m),
            NatsError::Api { what, source } => write!(f, "{what} failed: {source}"),
            NatsError::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for NatsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NatsError::Invalid(e) => Some(e),
            NatsError::Connect { source, .. } => Some(source),
            NatsError::Api { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

impl From<ValidationError> for NatsError {
    fn from(value: ValidationError) -> Self {
        NatsError::Invalid(value)
    }
}

/// A topic's connection, with its stream provisioned. Shared behind an `Arc`: the publish
/// path looks it up per message and must not clone its strings.
#[derive(Debug)]
pub(crate) struct TopicConnection {
    /// The topic as a subject, built once.
    pub(crate) subject: async_nats::Subject,
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) stream: String,
    /// The server's `max_payload`, read once: `server_info()` clones a large struct.
    pub(crate) max_payload: usize,
}

pub(crate) struct Shared {
    pub(crate) config: NatsConfig,
    connections: RwLock<HashMap<Topic, Arc<TopicConnection>>>,
    connecting: tokio::sync::Mutex<()>,
    pub(crate) active: Mutex<HashSet<Topic>>,
}

impl Shared {
    /// The topic's connection, connecting and provisioning its stream on first use.
    pub(crate) async fn connection(
        &self,
        topic: &Topic,
    ) -> Result<Arc<TopicConnection>, NatsError> {
        if let Some(c) = self.connections.read().unwrap().get(topic) {
            return Ok(c.clone());
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.connections.read().unwrap().get(topic) {
            return Ok(c.clone());
        }
        let shared_client = if self.config.share_connection {
            self.connections
                .read()
                .unwrap()
                .values()
                .next()
                .map(|c| c.client.clone())
        } else {
            None
        };
        let client = match shared_client {
            Some(client) => client,
            None => self.connect(topic).await?,
        };
        // The ack window is ours (`max_in_flight`); the client's own is set to the same size
        // and waits rather than failing at the bound.
        let jetstream = jetstream::ContextBuilder::new()
            .max_ack_inflight(self.config.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let spec = self.config.stream_for(topic);
        provision::ensure_stream(&jetstream, &spec, self.config.provisioning).await?;
        let connection = Arc::new(TopicConnection {
            subject: async_nats::Subject::from(topic.as_str()),
            max_payload: client.server_info().max_payload,
            client,
            jetstream,
            stream: spec.name,
        });
        self.connections
            .write()
            .unwrap()
            .insert(topic.clone(), connection.clone());
        Ok(connection)
    }

    async fn connect(&self, topic: &Topic) -> Result<async_nats::Client, NatsError> {
        let c = &self.config.connection;
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("{}:{topic}", c.client_name))
            .connection_timeout(c.connect_timeout)
            .max_reconnects(c.max_reconnects)
            // A publisher's acks come back on one subscription, up to `max_in_flight` at a time;
            // a full subscription would drop them (and the publishes would time out).
            .subscription_capacity(self.config.max_in_flight.saturating_mul(2).max(65_536));
        options = match &c.auth {
            config::Auth::None => options,
            config::Auth::Token(t) => options.token(t.clone()),
            config::Auth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            config::Auth::NKey(seed) => options.nkey(seed.clone()),
            config::Auth::CredentialsFile(path) => {
                options.credentials_file(path).await.map_err(|e| {
                    NatsError::Configuration(format!(
                        "credentials file `{}` could not be read: {e}",
                        path.display()
                    ))
                })?
            }
        };
        if let Some(tls) = &c.tls {
            for ca in &tls.ca_files {
                options = options.add_root_certificates(ca.clone());
            }
            if let Some((cert, key)) = &tls.client_certificate {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            options = options.require_tls(tls.require_tls);
        }
        if c.retry_on_initial_connect {
            options = options.retry_on_initial_connect();
        }
        let callback = c.on_event.clone();
        let event_topic = topic.clone();
        options = options.event_callback(move |event| {
            let callback = callback.clone();
            let topic = event_topic.clone();
            async move {
                let event = match event {
                    async_nats::Event::Connected => ConnectionEvent::Connected { topic },
                    async_nats::Event::Disconnected => ConnectionEvent::Disconnected { topic },
                    async_nats::Event::Closed => ConnectionEvent::Closed { topic },
                    other => ConnectionEvent::Error {
                        topic,
                        message: other.to_string(),
                    },
                };
                tracing::info!(?event, "nats connection event");
                if let Some(callback) = callback {
                    callback(event);
                }
            }
        });
        options
            .connect(c.servers.clone())
            .await
            .map_err(|source| NatsError::Connect {
                servers: c.servers.clone(),
                source,
            })
    }
}

/// The NATS JetStream transport: a [`Publisher`] (through its default [`NatsPublisher`]) and a
/// [`Subscriber`]. Clones share connections.
#[derive(Clone)]
pub struct NatsBus {
    shared: Arc<Shared>,
    publisher: NatsPublisher,
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl NatsBus {
    /// Validates `config` and prepares the bus. Connections are made per topic on first use;
    /// this call connects once to check that a server answers.
    pub async fn connect(config: NatsConfig) -> Result<Self, NatsError> {
        config.validate()?;
        let shared = Arc::new(Shared {
            config,
            connections: RwLock::new(HashMap::new()),
            connecting: tokio::sync::Mutex::new(()),
            active: Mutex::new(HashSet::new()),
        });
        // Fail at start-up, not at the first publish, when no server answers.
        let probe = Topic::new("bus-probe").expect("valid topic");
        let client = shared.connect(&probe).await?;
        drop(client);
        let publisher = NatsPublisher::new(shared.clone());
        Ok(Self { shared, publisher })
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
        NatsPublisher::new(self.shared.clone())
    }

    /// The underlying client of `topic`'s connection, connecting on first use.
    pub async fn client(&self, topic: &Topic) -> Result<async_nats::Client, NatsError> {
        Ok(self.shared.connection(topic).await?.client.clone())
    }

    /// The JetStream stream that holds `topic`, provisioning it on first use.
    pub async fn stream_name(&self, topic: &Topic) -> Result<String, NatsError> {
        Ok(self.shared.connection(topic).await?.stream.clone())
    }

    /// Flushes the default publisher and closes every connection.
    pub async fn close(&self) -> Result<(), PublishError> {
        let flushed = self.publisher.close().await;
        let connections: Vec<_> = self.shared.connections.write().unwrap().drain().collect();
        for (_, connection) in connections {
            let _ = connection.client.drain().await;
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
        subscriber::start(
            self.shared.clone(),
            topic,
            subscriber::Dispatch::Envelope(handler),
        )
        .await
    }

    async fn subscribe_raw(
        &self,
        topic: &Topic,
        key: RawKey,
        handler: Arc<dyn RawHandler>,
    ) -> Result<Subscription, SubscribeError> {
        subscriber::start(
            self.shared.clone(),
            topic,
            subscriber::Dispatch::Raw(handler, key),
        )
        .await
    }
}

/// The README's examples, compiled as doc-tests so the quick start stays true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
