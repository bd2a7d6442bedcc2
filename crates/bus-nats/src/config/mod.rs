//! Typed configuration with the design note's values as documented defaults, one file per
//! part: `connection`, `streams`, `consumer`, `publishing`; `NatsConfig` here.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::NatsError;
use bus_core::{FailurePolicy, RetryPolicy, Topic, ValidationError};
use keyed_pool::PoolConfig;

mod connection;
mod consumer;
mod publishing;
mod streams;

pub use connection::*;
pub use consumer::*;
pub use publishing::*;
pub use streams::*;

/// Default bound on publishes whose broker acknowledgement is outstanding, per publisher.
///
/// The design note's asynchronous publish (optimisation 1) must be bounded, or unacknowledged
/// messages pile up in memory when the broker slows down; 10 000 keeps a fast broker busy
/// (about 0.1 s of traffic at 100k msg/s) while bounding memory to 10 000 messages.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;

/// Default most events in one record batch ([`BatchConfig::max_events`]).
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 128;

/// Default most bytes of one record batch's body ([`BatchConfig::max_bytes`]): 64 KiB keeps a
/// pull of many batches small in memory, and is far below the server's `max_payload` (1 MiB).
pub const DEFAULT_BATCH_MAX_BYTES: usize = 64 << 10;

/// Default batches of one topic (or partition) awaiting their ack at once
/// ([`BatchConfig::max_in_flight`]): 16, of which a batch that is not full takes one only when
/// it would be the only one. Against 8, 16 publishes and delivers faster at full load, the
/// broker doing less work per event, with the same tail at half load; beyond it a process that
/// publishes and consumes at full load publishes faster than it consumes
/// (`docs/performance.md`, thirtieth look).
pub const DEFAULT_BATCH_MAX_IN_FLIGHT: usize = 16;

/// Default events asked for in one pull request (optimisation 2: 10 → 500, then 2 000 for
/// record batches; see [`FetchConfig::batch`]).
///
/// Bounded above by the note's rule `batch ≤ AckWait / per-message time` (30 s / 10 ms = 3 000).
/// With record batches of up to 128 events, 500 events is about four messages a request, and a
/// topic's fetcher fell behind its own publisher at full speed (`docs/performance.md`, "The
/// fetcher's pull size"); 2 000 is about sixteen, and the fetcher keeps up.
pub const DEFAULT_FETCH_BATCH: usize = 2_000;

/// Default expiry of a pull request (optimisation 3: MaxWait 1 s → 100 ms).
///
/// Bounds how long a quiet topic's fetcher waits before asking again, and how long a graceful
/// close waits for the last outstanding request.
pub const DEFAULT_FETCH_EXPIRES: Duration = Duration::from_millis(100);

/// Default consumer MaxAckPending (optimisation 8: 500 → 10 000): delivered but not yet
/// acknowledged messages. It bounds the bus's in-flight memory on the consuming side.
pub const DEFAULT_MAX_ACK_PENDING: i64 = 10_000;

/// Default consumer MaxWaiting (optimisation 8: 200 → 1 000): pull requests the server queues.
pub const DEFAULT_MAX_WAITING: i64 = 1_000;

/// Default consumer AckWait (optimisation 8: 30 s). Handlers that run longer are kept alive by
/// in-progress acknowledgements, so this only matters when a process dies.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Default time a publisher keeps retrying a publish that failed for a transient reason (no
/// ack in time, connection lost) before its receipt reports the failure. Retries carry the same
/// `Nats-Msg-Id`, so this must stay within the stream's duplicate window.
pub const DEFAULT_PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);

/// Default stream MaxBytes (optimisation 8: 512 MiB → 1 GiB).
pub const DEFAULT_STREAM_MAX_BYTES: i64 = 1 << 30;

/// Default stream MaxMsgs (optimisation 8: 100 000 → 1 000 000).
pub const DEFAULT_STREAM_MAX_MSGS: i64 = 1_000_000;

/// How often a subscription to a [`Retention::Acknowledged`] topic removes what every consumer
/// of the topic has acknowledged.
pub const ACKNOWLEDGED_PURGE_EVERY: Duration = Duration::from_secs(1);

/// Default time after which a standby subscriber takes a topic over from an owner that stopped
/// pulling (it crashed, hangs or lost its network). An owner that is alive refreshes its claim
/// several times within this time, even while its handlers are slow; a shorter time means a
/// quicker takeover after a crash and a quicker loss of ownership during a network blip.
pub const DEFAULT_TAKEOVER_AFTER: Duration = Duration::from_secs(5);

/// Default time a publish waits for the broker's ack before it counts as a transient failure
/// and (under [`PublishOrdering::PerAggregate`]) is sent again with the same `Nats-Msg-Id`.
/// A broker that restarts, or a cluster that elects a stream leader, answers within a few
/// seconds; waiting longer only delays the retry.
pub const DEFAULT_PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Default window in which the broker recognises a re-published event ID as a duplicate.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A publish that failed, as told to [`NatsConfig::on_publish_error`].
#[derive(Debug)]
pub struct PublishFailure {
    /// The topic it was published on.
    pub topic: Topic,
    /// The envelope, for envelope publishes (raw publishes have none).
    pub envelope: Option<bus_core::Envelope>,
    /// What went wrong.
    pub error: bus_core::PublishError,
}

/// A callback told of every failed publish, with the envelope that failed.
pub type PublishFailureCallback = Arc<dyn Fn(&PublishFailure) + Send + Sync>;

/// Everything [`NatsBus`](crate::NatsBus) needs.
#[derive(Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Servers, credentials, TLS, reconnects.
    pub connection: ConnectionConfig,
    /// Streams and the topics they hold. A topic not listed gets its own stream, named
    /// `BUS_<TOPIC>` (upper case, `.` as `_`), with default limits.
    pub streams: Vec<StreamSpec>,
    /// Each topic's durable consumer.
    pub consumer: ConsumerSpec,
    /// How streams and consumers are provisioned (default create-or-update).
    pub provisioning: Provisioning,
    /// The fetcher's pull size and expiry.
    pub fetch: FetchConfig,
    /// Per publisher, the most publishes awaiting the broker's ack (default
    /// [`DEFAULT_MAX_IN_FLIGHT`]); `publish` waits while the window is full.
    pub max_in_flight: usize,
    /// How publishes of one aggregate are ordered (default [`PublishOrdering::PerAggregate`]).
    /// Raw publishes carry no aggregate and are always pipelined.
    pub publish_ordering: PublishOrdering,
    /// How long a transiently failed publish is retried under
    /// [`PublishOrdering::PerAggregate`] (default [`DEFAULT_PUBLISH_RETRY_FOR`]).
    #[serde(with = "humantime_serde")]
    pub publish_retry_for: Duration,
    /// How envelopes are packed into record batches (on by default; see [`BatchConfig`]).
    pub batching: BatchConfig,
    /// How long a publish waits for the broker's ack before it counts as a transient failure
    /// (default [`DEFAULT_PUBLISH_ACK_TIMEOUT`]).
    #[serde(with = "humantime_serde")]
    pub publish_ack_timeout: Duration,
    /// Workers and queue sizes of each subscription's keyed pool.
    pub pool: PoolConfig,
    /// Where each subscription's fetcher, workers and handlers run (default
    /// [`SubscriptionRuntime::Caller`]: the runtime `subscribe` is called on).
    pub subscription_runtime: SubscriptionRuntime,
    /// How retryable handler errors are retried, in place, while the aggregate's later events
    /// wait. Once retries are exhausted, or on a permanent error or a panic, `on_failure`
    /// decides.
    pub retry: RetryPolicy,
    /// What happens once a handler has failed for good (default
    /// [`FailurePolicy::DeadLetter`]). Undecodable messages and messages without a key are
    /// always dead-lettered: they belong to no aggregate that could be halted.
    pub on_failure: FailurePolicy,
    /// Where dead letters go.
    pub dead_letters: DeadLetterConfig,
    /// Told of every failed publish, in addition to its receipt and `flush`.
    #[serde(skip)]
    pub on_publish_error: Option<PublishFailureCallback>,
    /// Use one connection for every topic instead of one per topic (default false). Only for
    /// comparison with designs that share a connection; per-topic connections isolate topics
    /// and measured faster (`docs/performance.md`).
    pub share_connection: bool,
    /// Publish each topic's events on a connection of their own, apart from the topic's
    /// subscriptions (default true; ignored with `share_connection`). A process that both
    /// publishes and consumes a topic then keeps two connections to it: a publisher's messages
    /// and their acks do not queue behind the topic's deliveries on one socket, and the
    /// broker, reading each socket in reads of similar sizes, allocates less per event
    /// (`docs/performance.md`). A process that only publishes, or only consumes, a topic has
    /// one connection to it either way.
    pub separate_publish_connection: bool,
    /// How often each subscription sets its sampled gauges (in flight, queued, halted, owner,
    /// and the group's lag, read from the broker) through the `metrics` facade (default
    /// [`DEFAULT_METRICS_INTERVAL`]); zero samples nothing. See [`crate::telemetry`].
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
}

/// Default [`NatsConfig::metrics_interval`].
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(5);

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            connection: ConnectionConfig::default(),
            streams: Vec::new(),
            consumer: ConsumerSpec::default(),
            provisioning: Provisioning::default(),
            fetch: FetchConfig::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            publish_ordering: PublishOrdering::default(),
            publish_retry_for: DEFAULT_PUBLISH_RETRY_FOR,
            publish_ack_timeout: DEFAULT_PUBLISH_ACK_TIMEOUT,
            batching: BatchConfig::default(),
            pool: PoolConfig::default(),
            subscription_runtime: SubscriptionRuntime::default(),
            retry: RetryPolicy::default(),
            on_failure: FailurePolicy::default(),
            dead_letters: DeadLetterConfig::default(),
            on_publish_error: None,
            share_connection: false,
            separate_publish_connection: true,
            metrics_interval: DEFAULT_METRICS_INTERVAL,
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("connection", &self.connection)
            .field("streams", &self.streams)
            .field("consumer", &self.consumer)
            .field("provisioning", &self.provisioning)
            .field("fetch", &self.fetch)
            .field("max_in_flight", &self.max_in_flight)
            .field("publish_ordering", &self.publish_ordering)
            .field("publish_retry_for", &self.publish_retry_for)
            .field("publish_ack_timeout", &self.publish_ack_timeout)
            .field("batching", &self.batching)
            .field("pool", &self.pool)
            .field("subscription_runtime", &self.subscription_runtime)
            .field("retry", &self.retry)
            .field("on_failure", &self.on_failure)
            .field("dead_letters", &self.dead_letters)
            .field("share_connection", &self.share_connection)
            .field(
                "separate_publish_connection",
                &self.separate_publish_connection,
            )
            .field("metrics_interval", &self.metrics_interval)
            .finish_non_exhaustive()
    }
}

impl NatsConfig {
    /// The default configuration for servers at `url` (comma-separated for several).
    pub fn new(url: &str) -> Self {
        Self {
            connection: ConnectionConfig {
                servers: url.split(',').map(|s| s.trim().to_owned()).collect(),
                ..ConnectionConfig::default()
            },
            ..Self::default()
        }
    }

    /// The prefix of environment variables that override a configuration file's values; see
    /// [`NatsConfig::from_toml_with_env`].
    pub const ENV_PREFIX: &'static str = "BUS__";

    /// Reads a configuration from TOML text: every field optional, with the documented
    /// defaults, durations written as `"5s"` or `"250ms"`, enums in kebab case
    /// (`on_failure = "halt-aggregate"`). Unknown fields are refused, naming them, and the
    /// result is [validated](Self::validate). Callbacks cannot be written in a file; set them
    /// on the result.
    pub fn from_toml(text: &str) -> Result<Self, NatsError> {
        Self::from_toml_with_env(text, std::iter::empty::<(String, String)>())
    }

    /// [`NatsConfig::from_toml`], then each variable of `env` named
    /// `BUS__<FIELD>[__<FIELD>...]` overrides the field at that path (lower-cased):
    /// `BUS__CONSUMER__GROUP=billing`, `BUS__CONNECTION__SERVERS='["nats://a:4222"]'`,
    /// `BUS__RETRY__MAX_ATTEMPTS=3`. A value is read as a TOML value when it is one (a number,
    /// a boolean, an array, a quoted string) and as a plain string otherwise. Other variables
    /// are ignored. Pass `std::env::vars()` for the process's environment.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, NatsError> {
        let mut table: toml::Table = text.parse().map_err(|e| {
            NatsError::Configuration(format!("configuration is not valid TOML: {e}"))
        })?;
        for (name, raw) in env {
            let Some(path) = name.strip_prefix(Self::ENV_PREFIX) else {
                continue;
            };
            let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            if keys.iter().any(String::is_empty) {
                return Err(NatsError::Configuration(format!(
                    "environment variable `{name}` does not name a field"
                )));
            }
            let value = format!("value = {raw}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("value"))
                .unwrap_or(toml::Value::String(raw));
            let (last, parents) = keys.split_last().expect("at least one key");
            let mut at = &mut table;
            for key in parents {
                let entry = at
                    .entry(key.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                at = entry.as_table_mut().ok_or_else(|| {
                    NatsError::Configuration(format!(
                        "environment variable `{name}`: `{key}` is not a table"
                    ))
                })?;
            }
            at.insert(last.clone(), value);
        }
        let config: NatsConfig = table
            .try_into()
            .map_err(|e| NatsError::Configuration(format!("configuration: {e}")))?;
        config
            .validate()
            .map_err(|e| NatsError::Configuration(format!("configuration: {e}")))?;
        Ok(config)
    }

    /// Reads the TOML file at `path`, with overrides from the process's `BUS__*` environment
    /// variables ([`NatsConfig::from_toml_with_env`]). Errors name the file.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, NatsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            NatsError::Configuration(format!(
                "reading configuration file {}: {e}",
                path.display()
            ))
        })?;
        Self::from_toml_with_env(&text, std::env::vars())
            .map_err(|e| NatsError::Configuration(format!("{}: {e}", path.display())))
    }

    /// Checks every name and number; the error names the field and value at fault.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.connection.servers.is_empty() {
            return Err(ValidationError::new(
                "connection.servers",
                "",
                "must name at least one server",
            ));
        }
        let mut seen: HashMap<&Topic, &str> = HashMap::new();
        for stream in &self.streams {
            check_stream_name(&stream.name)?;
            if stream.topics.is_empty() {
                return Err(ValidationError::new(
                    "stream.topics",
                    &stream.name,
                    "a stream needs at least one topic",
                ));
            }
            if !(1..=MAX_PARTITIONS).contains(&stream.partitions) {
                return Err(ValidationError::new(
                    "stream.partitions",
                    stream.partitions.to_string(),
                    format!("must be 1 to {MAX_PARTITIONS}"),
                ));
            }
            if !(1..=5).contains(&stream.replicas) {
                return Err(ValidationError::new(
                    "stream.replicas",
                    stream.replicas.to_string(),
                    "must be 1 to 5",
                ));
            }
            if stream.retention != Retention::Limits {
                if !stream.max_age.is_zero() {
                    return Err(ValidationError::new(
                        "stream.max_age",
                        format!("{:?}", stream.max_age),
                        format!("would remove events of stream `{}` that its consumer group has not handled; only a stream with limits retention may have one", stream.name),
                    ));
                }
                if stream.discard == Some(Discard::Old) {
                    return Err(ValidationError::new(
                        "stream.discard",
                        "old",
                        format!("would remove events of stream `{}` that its consumer group has not handled when it is full; only a stream with limits retention may discard old ones", stream.name),
                    ));
                }
            }
            for topic in &stream.topics {
                if let Some(other) = seen.insert(topic, &stream.name) {
                    return Err(ValidationError::new(
                        "stream.topics",
                        topic.as_str(),
                        format!("is listed in streams `{other}` and `{}`", stream.name),
                    ));
                }
            }
        }
        check_stream_name(&self.dead_letters.stream)?;
        if !(1..=5).contains(&self.consumer.coordination_replicas) {
            return Err(ValidationError::new(
                "consumer.coordination_replicas",
                self.consumer.coordination_replicas.to_string(),
                "must be 1 to 5",
            ));
        }
        if !(1..=5).contains(&self.dead_letters.replicas) {
            return Err(ValidationError::new(
                "dead_letters.replicas",
                self.dead_letters.replicas.to_string(),
                "must be 1 to 5",
            ));
        }
        if self.dead_letters.max_bytes < 1 {
            return Err(ValidationError::new(
                "dead_letters.max_bytes",
                self.dead_letters.max_bytes.to_string(),
                "must be at least 1",
            ));
        }
        Topic::new(self.dead_letters.subject_prefix.as_str()).map_err(|e| {
            ValidationError::new("dead_letters.subject_prefix", e.value(), e.reason())
        })?;
        if !self.consumer.group.is_empty() {
            check_token("consumer.group", &self.consumer.group)?;
        }
        for (field, value) in [
            ("consumer.max_ack_pending", self.consumer.max_ack_pending),
            ("consumer.max_waiting", self.consumer.max_waiting),
            ("fetch.batch", self.fetch.batch as i64),
            ("max_in_flight", self.max_in_flight as i64),
            ("batching.max_events", self.batching.max_events as i64),
            ("batching.max_in_flight", self.batching.max_in_flight as i64),
            ("pool.workers", self.pool.workers as i64),
            ("pool.queue_capacity", self.pool.queue_capacity as i64),
            ("pool.drivers", self.pool.drivers as i64),
        ] {
            if value < 1 {
                return Err(ValidationError::new(
                    field,
                    value.to_string(),
                    "must be at least 1",
                ));
            }
        }
        if self.fetch.expires < Duration::from_millis(1) {
            return Err(ValidationError::new(
                "fetch.expires",
                format!("{:?}", self.fetch.expires),
                "must be at least 1 ms",
            ));
        }
        if self.consumer.ack_wait < Duration::from_secs(1) {
            return Err(ValidationError::new(
                "consumer.ack_wait",
                format!("{:?}", self.consumer.ack_wait),
                "must be at least 1 s",
            ));
        }
        if self.consumer.takeover_after < Duration::from_secs(1) {
            return Err(ValidationError::new(
                "consumer.takeover_after",
                format!("{:?}", self.consumer.takeover_after),
                "must be at least 1 s",
            ));
        }
        if self.fetch.expires * 2 > self.consumer.takeover_after {
            return Err(ValidationError::new(
                "fetch.expires",
                format!("{:?}", self.fetch.expires),
                format!(
                    "must be at most half of consumer.takeover_after ({:?}), or a live owner could lose its topic between two pulls",
                    self.consumer.takeover_after
                ),
            ));
        }
        if self.batching.enabled() && self.batching.max_bytes < 1024 {
            return Err(ValidationError::new(
                "batching.max_bytes",
                self.batching.max_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        if self.batching.linger >= self.publish_ack_timeout {
            return Err(ValidationError::new(
                "batching.linger",
                format!("{:?}", self.batching.linger),
                format!(
                    "must be shorter than publish_ack_timeout ({:?})",
                    self.publish_ack_timeout
                ),
            ));
        }
        if self.publish_ack_timeout < Duration::from_millis(10) {
            return Err(ValidationError::new(
                "publish_ack_timeout",
                format!("{:?}", self.publish_ack_timeout),
                "must be at least 10 ms",
            ));
        }
        let shortest_window = self
            .streams
            .iter()
            .map(|s| s.duplicate_window)
            .chain([DEFAULT_DUPLICATE_WINDOW])
            .min()
            .unwrap_or(DEFAULT_DUPLICATE_WINDOW);
        if self.publish_retry_for > shortest_window {
            return Err(ValidationError::new(
                "publish_retry_for",
                format!("{:?}", self.publish_retry_for),
                format!("must not exceed the streams' duplicate window ({shortest_window:?}), or a retried publish could be stored twice"),
            ));
        }
        if self.retry.max_attempts < 1 {
            return Err(ValidationError::new(
                "retry.max_attempts",
                "0",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The stream that holds `topic`: a configured one, or the topic's own default stream.
    pub fn stream_for(&self, topic: &Topic) -> StreamSpec {
        self.streams
            .iter()
            .find(|s| s.topics.contains(topic))
            .cloned()
            .unwrap_or_else(|| StreamSpec::new(default_stream_name(topic), [topic.clone()]))
    }

    /// This configuration with `group` as its consumer group (see [`ConsumerSpec::group`]).
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.consumer.group = group.into();
        self
    }

    /// The partitions of `topic` (1 when it is not partitioned).
    pub fn partitions_of(&self, topic: &Topic) -> u32 {
        self.streams
            .iter()
            .find(|s| s.topics.contains(topic))
            .map_or(1, |s| s.partitions.max(1))
    }

    /// The durable consumer name of `topic`.
    pub fn consumer_name(&self, topic: &Topic) -> String {
        // FNV-1a: stable across versions and platforms, unlike std's hasher.
        let hash = topic.as_str().bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        format!(
            "{}-{}-{hash:08x}",
            self.consumer.group,
            topic.as_str().replace('.', "_")
        )
    }
}

/// `BUS_<TOPIC>` with `.` and `-` as `_`, upper case.
pub fn default_stream_name(topic: &Topic) -> String {
    format!(
        "BUS_{}",
        topic.as_str().replace(['.', '-'], "_").to_uppercase()
    )
}

fn check_token(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() || value.len() > 200 {
        return Err(ValidationError::new(
            field,
            value,
            "must be 1 to 200 characters",
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(ValidationError::new(
            field,
            value,
            format!("contains {bad:?}; allowed are ASCII letters, digits, '-' and '_'"),
        ));
    }
    Ok(())
}

/// Stream names: letters, digits, `-` and `_` (JetStream refuses `.`, `*`, `>`, spaces and
/// path separators, and the name becomes a directory on disk).
pub fn check_stream_name(name: &str) -> Result<(), ValidationError> {
    check_token("stream name", name)
}

#[cfg(test)]
mod tests;
