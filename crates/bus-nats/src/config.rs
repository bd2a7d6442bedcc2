//! Typed configuration with the design note's values as documented defaults.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::NatsError;
use bus_core::{FailurePolicy, RetryPolicy, Topic, ValidationError};
use keyed_pool::PoolConfig;

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
/// ([`BatchConfig::max_in_flight`]).
pub const DEFAULT_BATCH_MAX_IN_FLIGHT: usize = 4;

/// Default messages asked for in one pull request (optimisation 2: 10 → 500).
///
/// Bounded above by the note's rule `batch ≤ AckWait / per-message time` (30 s / 10 ms = 3 000);
/// 500 amortises the request round trip over many messages without hoarding work.
pub const DEFAULT_FETCH_BATCH: usize = 500;

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

/// How the client authenticates.
///
/// In configuration files: `auth = "none"`, `auth = { token = "..." }`,
/// `auth = { user-password = { user = "...", password = "..." } }`, `auth = { nkey = "..." }`
/// or `auth = { credentials-file = "/path/to.creds" }`.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// A token.
    Token(String),
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// An NKey seed.
    #[serde(rename = "nkey")]
    NKey(String),
    /// A `.creds` file (JWT and NKey seed).
    CredentialsFile(PathBuf),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are never printed.
        match self {
            Auth::None => f.write_str("None"),
            Auth::Token(_) => f.write_str("Token(***)"),
            Auth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            Auth::NKey(_) => f.write_str("NKey(***)"),
            Auth::CredentialsFile(p) => write!(f, "CredentialsFile({})", p.display()),
        }
    }
}

/// Credentials written into a server URL (`nats://user:password@host`, `nats://token@host`).
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

/// Splits the credentials out of a server URL: the URL without them, and them. The client
/// library ignores credentials in URLs, so the bus passes them on as `Auth`.
impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are never printed.
        match self {
            UrlCredentials::UserPassword(user, _) => write!(f, "UserPassword({user}, ***)"),
            UrlCredentials::Token(_) => f.write_str("Token(***)"),
        }
    }
}

pub(crate) fn split_url_credentials(url: &str) -> (String, Option<UrlCredentials>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let userinfo = &rest[..at];
    let stripped = format!("{scheme}{}", &rest[at + 1..]);
    let credentials = match userinfo.split_once(':') {
        Some((user, password)) => {
            UrlCredentials::UserPassword(percent_decode(user), percent_decode(password))
        }
        None => UrlCredentials::Token(percent_decode(userinfo)),
    };
    (stripped, Some(credentials))
}

/// A server URL fit for logs and errors: any credentials in it replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match split_url_credentials(url) {
        (stripped, Some(_)) => match stripped.find("://") {
            Some(i) => format!("{}***@{}", &stripped[..i + 3], &stripped[i + 3..]),
            None => format!("***@{stripped}"),
        },
        (url, None) => url,
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// TLS settings.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM files of CA certificates to trust (besides the system's).
    pub ca_files: Vec<PathBuf>,
    /// A client certificate and its key, both PEM, for mutual TLS.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
    /// Refuse to connect without TLS.
    pub require_tls: bool,
}

/// Something that happened to a topic's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// Connected, or reconnected after a disconnection.
    Connected {
        /// The topic whose connection it is.
        topic: Topic,
    },
    /// The connection was lost; the client reconnects by itself.
    Disconnected {
        /// The topic whose connection it is.
        topic: Topic,
    },
    /// The connection was closed for good.
    Closed {
        /// The topic whose connection it is.
        topic: Topic,
    },
    /// The server or client reported a problem.
    Error {
        /// The topic whose connection it is.
        topic: Topic,
        /// The problem.
        message: String,
    },
}

/// A callback for [`ConnectionEvent`]s.
pub type ConnectionCallback = Arc<dyn Fn(ConnectionEvent) + Send + Sync>;

/// How to reach and authenticate with the NATS servers.
#[derive(Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Server URLs; the client picks one and fails over to the others (default
    /// `nats://127.0.0.1:4222`).
    pub servers: Vec<String>,
    /// Client name shown in server monitoring; the topic is appended (default `bus`).
    pub client_name: String,
    /// Credentials.
    pub auth: Auth,
    /// TLS, if any.
    pub tls: Option<TlsConfig>,
    /// Reconnect attempts before giving up; `None` (the default) retries for ever, so that a
    /// server restart never ends a long-running service.
    pub max_reconnects: Option<usize>,
    /// Timeout of one connection attempt (default 5 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Keep retrying the first connection instead of failing at once (default false: a
    /// misconfigured URL should fail loudly at start-up).
    pub retry_on_initial_connect: bool,
    /// Called on every connection event.
    #[serde(skip)]
    pub on_event: Option<ConnectionCallback>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            client_name: "bus".into(),
            auth: Auth::None,
            tls: None,
            max_reconnects: None,
            connect_timeout: Duration::from_secs(5),
            retry_on_initial_connect: false,
            on_event: None,
        }
    }
}

impl fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field(
                "servers",
                &self
                    .servers
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("client_name", &self.client_name)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("max_reconnects", &self.max_reconnects)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry_on_initial_connect", &self.retry_on_initial_connect)
            .field("on_event", &self.on_event.as_ref().map(|_| ".."))
            .finish()
    }
}

/// Where the bus's streams and consumers come from.
///
/// In configuration files: `"create"`, `"create-or-update"`, `"validate-only"`,
/// `"use-existing"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provisioning {
    /// Create what is missing; fail if something exists with a different configuration.
    Create,
    /// Create what is missing and update what differs (the default).
    #[default]
    CreateOrUpdate,
    /// Create nothing; fail with an error naming every field that differs or is missing.
    ValidateOnly,
    /// Use what exists as it is; fail only if it is missing.
    UseExisting,
}

/// How a stream keeps messages. In configuration files: `"work-queue"`, `"limits"`,
/// `"acknowledged"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Retention {
    /// A message is removed once the topic's consumer acknowledges it; when the stream is full
    /// new publishes are refused (the publisher's receipt says so), never silently dropped.
    /// The default, because it is the only combination that loses nothing by itself.
    ///
    /// One consumer group (one [`ConsumerSpec::group`]) reads each topic: a second
    /// group's subscribe fails with a configuration error naming the first.
    #[default]
    WorkQueue,
    /// Messages stay until the stream's limits remove the oldest ones (JetStream's default).
    /// Allows replay and several consumer groups, each receiving every event in order, but a
    /// consumer that falls `max_msgs` behind loses messages, and a subscriber that restarts
    /// with unacknowledged messages replays from its ack floor, handled events included.
    Limits,
    /// Kept until every consumer of the topic has acknowledged it: the stream keeps messages
    /// by limits and refuses publishes when full, and each subscription removes, every
    /// [`ACKNOWLEDGED_PURGE_EVERY`], the messages below the lowest ack floor of the topic's
    /// consumers, in one purge. Several consumer groups may read the topic and none loses
    /// anything; removing in bulk costs the broker less than a work-queue stream's delete per
    /// message. As with `Limits`, a subscriber that restarts with unacknowledged messages
    /// replays from its ack floor, handled events included; and a consumer that stops
    /// acknowledging (a halted aggregate, a group that is gone) keeps everything after its
    /// floor until the stream is full. A group created later starts with what is still kept.
    /// Needs nats-server 2.14 or newer; subscribing to such a topic on an older server fails.
    Acknowledged,
}

/// What a full stream does with a new message. In configuration files: `"new"`, `"old"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Discard {
    /// Refuse it: the publisher's receipt fails with `Rejected`, nothing stored is lost.
    New,
    /// Store it and remove the oldest message, handled or not. Only with
    /// [`Retention::Limits`]: the other retentions keep what a group has not handled.
    Old,
}

/// A JetStream stream holding one or more topics.
///
/// In configuration files, `[[streams]]` tables with the field names below; `name` and
/// `topics` are required, the rest default as documented.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// The stream's name: letters, digits, `-` and `_` only.
    pub name: String,
    /// The topics it holds; each topic is one subject.
    pub topics: Vec<Topic>,
    /// How messages are kept (default [`Retention::WorkQueue`]).
    #[serde(default)]
    pub retention: Retention,
    /// Bytes kept at most (default [`DEFAULT_STREAM_MAX_BYTES`]).
    #[serde(default = "defaults::stream_max_bytes")]
    pub max_bytes: i64,
    /// Messages kept at most (default [`DEFAULT_STREAM_MAX_MSGS`]).
    #[serde(default = "defaults::stream_max_msgs")]
    pub max_msgs: i64,
    /// How long a message is kept at most, handled or not; zero (the default) for no limit.
    /// Only with [`Retention::Limits`]: the other retentions keep what a group has not handled.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Duration,
    /// What a full stream does with a new message; `None` (the default) for what the retention
    /// implies: [`Discard::Old`] under [`Retention::Limits`], [`Discard::New`] otherwise.
    #[serde(default)]
    pub discard: Option<Discard>,
    /// Window for de-duplicating event IDs (default [`DEFAULT_DUPLICATE_WINDOW`]).
    #[serde(default = "defaults::duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// File storage (the default) or memory.
    #[serde(default = "defaults::yes")]
    pub file_storage: bool,
    /// Replicas, 1 to 5 (default 1).
    #[serde(default = "defaults::one")]
    pub replicas: usize,
    /// Partitions of each topic of the stream, 1 to [`MAX_PARTITIONS`] (default 1: none).
    /// With `n` > 1, topic `t` is stored on subjects `t.0` … `t.<n-1>`, an event on
    /// `t.<partition>` where the partition is [`bus_core::wire::partition_of`] of its aggregate
    /// ID; each partition has its own consumer, and the processes of a consumer group share the
    /// partitions out. Every process of the topic must give the same `n`: one that gives another
    /// count than the topic's stream is refused (it would send an aggregate's events to another
    /// partition); [`crate::NatsBus::repartition`] changes it, once the topic is drained.
    #[serde(default = "defaults::one_u32")]
    pub partitions: u32,
}

/// Defaults of the fields `serde` fills in when a configuration file leaves them out.
mod defaults {
    use super::*;
    pub(super) fn stream_max_bytes() -> i64 {
        DEFAULT_STREAM_MAX_BYTES
    }
    pub(super) fn stream_max_msgs() -> i64 {
        DEFAULT_STREAM_MAX_MSGS
    }
    pub(super) fn duplicate_window() -> Duration {
        DEFAULT_DUPLICATE_WINDOW
    }
    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn one() -> usize {
        1
    }
    pub(super) fn one_u32() -> u32 {
        1
    }
}

/// The most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

impl StreamSpec {
    /// A stream named `name` holding `topics`, with the default limits.
    pub fn new(name: impl Into<String>, topics: impl IntoIterator<Item = Topic>) -> Self {
        Self {
            name: name.into(),
            topics: topics.into_iter().collect(),
            retention: Retention::default(),
            max_bytes: DEFAULT_STREAM_MAX_BYTES,
            max_msgs: DEFAULT_STREAM_MAX_MSGS,
            max_age: Duration::ZERO,
            discard: None,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            file_storage: true,
            replicas: 1,
            partitions: 1,
        }
    }
}

/// The durable pull consumer of each topic.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSpec {
    /// The consumer group: name it after the service. The replicas of one service share it
    /// (one of them consumes each topic, the others wait as standbys); different services must
    /// not, or one would wait behind the other. No default: subscribing without a group fails
    /// (publishing needs none). ASCII letters, digits, `-` and `_`. Each topic's durable is
    /// named `<group>-<topic with . as _>-<8 hex digits of the topic's hash>`.
    pub group: String,
    /// MaxAckPending (default [`DEFAULT_MAX_ACK_PENDING`]).
    pub max_ack_pending: i64,
    /// MaxWaiting (default [`DEFAULT_MAX_WAITING`]).
    pub max_waiting: i64,
    /// AckWait (default [`DEFAULT_ACK_WAIT`]).
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long an owner that stopped pulling keeps its topic before a standby subscriber of
    /// the same group takes it over (default [`DEFAULT_TAKEOVER_AFTER`]). On servers with
    /// priority groups and the consumer reset API (2.14+) it is the consumer's
    /// `priority_timeout`; on older servers, the lifetime of the ownership lease.
    #[serde(with = "humantime_serde")]
    pub takeover_after: Duration,
    /// Replicas of the KV buckets that hold consumer-group memberships (`BUS_MEMBERS`, for
    /// partitioned topics) and ownership leases (`BUS_OWNERS`, servers before 2.14), 1 to 5
    /// (default 1). In a cluster give them as many as the topics' streams.
    pub coordination_replicas: usize,
}

impl Default for ConsumerSpec {
    fn default() -> Self {
        Self {
            group: String::new(),
            max_ack_pending: DEFAULT_MAX_ACK_PENDING,
            max_waiting: DEFAULT_MAX_WAITING,
            ack_wait: DEFAULT_ACK_WAIT,
            takeover_after: DEFAULT_TAKEOVER_AFTER,
            coordination_replicas: 1,
        }
    }
}

/// How each topic's single fetcher pulls.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Messages per pull request (default [`DEFAULT_FETCH_BATCH`]).
    pub batch: usize,
    /// Expiry of a pull request (default [`DEFAULT_FETCH_EXPIRES`]).
    #[serde(with = "humantime_serde")]
    pub expires: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            batch: DEFAULT_FETCH_BATCH,
            expires: DEFAULT_FETCH_EXPIRES,
        }
    }
}

/// Default bytes the dead-letter stream keeps (128 MiB). It reserves this much of the
/// server's storage, so it is kept smaller than a topic's stream; when it is full it refuses new
/// dead letters, and the messages stay unacknowledged (see `docs/guarantees.md`).
pub const DEFAULT_DEAD_LETTER_MAX_BYTES: i64 = 128 << 20;

/// Where messages that cannot be handled go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The stream that stores dead letters (default `BUS_DEAD_LETTERS`); provisioned with the
    /// bus's strategy.
    pub stream: String,
    /// Subject prefix: a dead letter of topic `t` is published on `<prefix>.t`
    /// (default `bus-dlq`).
    pub subject_prefix: String,
    /// Bytes the dead-letter stream keeps at most (default [`DEFAULT_DEAD_LETTER_MAX_BYTES`]).
    pub max_bytes: i64,
    /// Replicas of the dead-letter stream, 1 to 5 (default 1). In a cluster give it as many as
    /// the topics' streams, or losing one node loses the dead letters and stops dead-lettering.
    pub replicas: usize,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            stream: "BUS_DEAD_LETTERS".into(),
            subject_prefix: "bus-dlq".into(),
            max_bytes: DEFAULT_DEAD_LETTER_MAX_BYTES,
            replicas: 1,
        }
    }
}

/// How a publisher orders the publishes of one aggregate on one topic. In configuration
/// files: `"per-aggregate"` or `"pipelined"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishOrdering {
    /// At most one publish per aggregate and topic awaits its broker ack; the aggregate's
    /// later publishes wait in the publisher (within `max_in_flight`) and are sent when it is
    /// stored. A publish that fails for a transient reason is retried, with the same
    /// `Nats-Msg-Id`, before any later event of its aggregate is sent; if it fails for good,
    /// the aggregate's waiting publishes fail with [`PublishErrorKind::Aborted`]. So the stream
    /// holds each aggregate's events in publish order even when the connection fails in the
    /// middle of a pipeline. Different aggregates are pipelined freely.
    ///
    /// [`PublishErrorKind::Aborted`]: bus_core::PublishErrorKind::Aborted
    #[default]
    PerAggregate,
    /// Every publish is sent at once, without waiting for earlier acks of its aggregate, and
    /// is not retried. Faster for long bursts of one aggregate, but if a publish is lost on a
    /// failing connection while a later event of its aggregate is stored, the stream holds a
    /// gap the caller must fill by publishing again, after the later event.
    Pipelined,
}

/// How a publisher packs the envelopes waiting for one topic into record batches: one message
/// carrying several events (`docs/wire-format.md`). The broker's work is per message (a stored
/// message, an ack, a de-duplication entry), so a batch of k events costs it about what one event
/// did.
///
/// Batches form naturally: while `max_in_flight` batches of a topic (or of one partition) await
/// their ack, what is published meanwhile waits, and goes as the next batch when an ack comes
/// back. A lone event goes at once, as a single-event message in the unbatched format. An
/// aggregate's events in a batch are in publish order, and its next batch is sent only once the
/// previous one is stored. A batch that fails for a transient reason is sent again, the same
/// bytes with the same `Nats-Msg-Id`; every event's receipt settles with its batch. In
/// configuration files: `[batching]` with `max_events`, `max_bytes`, `linger`, `max_in_flight`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most events in one batch (default [`DEFAULT_BATCH_MAX_EVENTS`]). 1 turns batching off
    /// ([`BatchConfig::off`]): every event is its own message, in the single-event format, and
    /// different aggregates are pipelined up to `max_in_flight` of the bus.
    pub max_events: usize,
    /// Most bytes of a batch's records (default [`DEFAULT_BATCH_MAX_BYTES`]); at most the
    /// server's `max_payload` less 1 KiB for the batch's headers. An event larger than this is
    /// sent alone.
    pub max_bytes: usize,
    /// How long a partial batch may wait for more events when it could be sent (default 0:
    /// never; batches form only from what is published while earlier ones are in flight). A
    /// linger trades latency at low load for fewer, fuller batches.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Batches of one topic (one partition, for a partitioned topic) awaiting their ack at
    /// once (default [`DEFAULT_BATCH_MAX_IN_FLIGHT`]).
    pub max_in_flight: usize,
}

impl Default for BatchConfig {
    /// On: up to [`DEFAULT_BATCH_MAX_EVENTS`] events and [`DEFAULT_BATCH_MAX_BYTES`] in a
    /// batch, no linger, [`DEFAULT_BATCH_MAX_IN_FLIGHT`] batches in flight per topic or
    /// partition.
    fn default() -> Self {
        Self {
            max_events: DEFAULT_BATCH_MAX_EVENTS,
            max_bytes: DEFAULT_BATCH_MAX_BYTES,
            linger: Duration::ZERO,
            max_in_flight: DEFAULT_BATCH_MAX_IN_FLIGHT,
        }
    }
}

impl BatchConfig {
    /// Batching on: the default.
    pub fn on() -> Self {
        Self::default()
    }

    /// Batching off: every event is its own message, in the single-event format.
    ///
    /// For a topic read by consumers that do not read record batches: an older version of this
    /// library finds no `Bus-Event` header and dead-letters a batch as undecodable (its events
    /// can be replayed from there, one by one), and a client in another language must decode
    /// them (`docs/wire-format.md`). Also for counts the broker keeps per message (a stream's
    /// `max_msgs`, a consumer's lag and `max_ack_pending`) to mean events.
    pub fn off() -> Self {
        Self {
            max_events: 1,
            ..Self::default()
        }
    }

    /// Whether events are packed into batches at all.
    pub fn enabled(&self) -> bool {
        self.max_events > 1
    }
}

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
            retry: RetryPolicy::default(),
            on_failure: FailurePolicy::default(),
            dead_letters: DeadLetterConfig::default(),
            on_publish_error: None,
            share_connection: false,
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
            .field("retry", &self.retry)
            .field("on_failure", &self.on_failure)
            .field("dead_letters", &self.dead_letters)
            .field("share_connection", &self.share_connection)
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
mod tests {
    use super::*;

    #[test]
    fn publish_retries_must_fit_the_duplicate_window() {
        let mut config = NatsConfig::new("nats://localhost:4222");
        config.publish_retry_for = DEFAULT_DUPLICATE_WINDOW + Duration::from_secs(1);
        let err = config.validate().unwrap_err();
        assert_eq!(err.field(), "publish_retry_for");
        config.publish_retry_for = DEFAULT_PUBLISH_RETRY_FOR;
        let topic = Topic::new("t").unwrap();
        let mut spec = StreamSpec::new("SHORT", [topic]);
        spec.duplicate_window = Duration::from_secs(10);
        config.streams.push(spec);
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("10s"), "{err}");
        config.publish_retry_for = Duration::from_secs(10);
        config.validate().unwrap();
    }

    #[test]
    fn bad_stream_names_are_refused_by_name() {
        let mut config = NatsConfig::default();
        config.streams.push(StreamSpec::new(
            "orders.v1",
            [Topic::new("orders").unwrap()],
        ));
        let err = config.validate().unwrap_err();
        assert_eq!(err.to_string(), "stream name `orders.v1` is invalid: contains '.'; allowed are ASCII letters, digits, '-' and '_'");
        config.streams[0].name = "ORDERS X".into();
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("contains ' '"));
    }

    #[test]
    fn a_topic_in_two_streams_is_refused() {
        let t = Topic::new("t").unwrap();
        let mut config = NatsConfig::default();
        config.streams.push(StreamSpec::new("A", [t.clone()]));
        config.streams.push(StreamSpec::new("B", [t]));
        let err = config.validate().unwrap_err();
        assert!(
            err.to_string().contains("is listed in streams `A` and `B`"),
            "{err}"
        );
    }

    #[test]
    fn credentials_in_urls_are_split_out_and_redacted() {
        assert_eq!(
            split_url_credentials("nats://alice:s%40cret@host:4222"),
            (
                "nats://host:4222".to_owned(),
                Some(UrlCredentials::UserPassword(
                    "alice".into(),
                    "s@cret".into()
                ))
            )
        );
        assert_eq!(
            split_url_credentials("tls://t0ken@host"),
            (
                "tls://host".to_owned(),
                Some(UrlCredentials::Token("t0ken".into()))
            )
        );
        assert_eq!(
            split_url_credentials("nats://host:4222"),
            ("nats://host:4222".to_owned(), None)
        );
        assert_eq!(
            redact_url("nats://alice:pw@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(redact_url("host:4222"), "host:4222");
        let mut config = NatsConfig::new("nats://alice:hunter2@h1,nats://h2");
        config.connection.auth = Auth::Token("tok-secret".into());
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-secret"),
            "{shown}"
        );
    }

    #[test]
    fn names_are_derived_stably() {
        let config = NatsConfig::default().with_group("bus");
        let t = Topic::new("orders.v1").unwrap();
        assert_eq!(default_stream_name(&t), "BUS_ORDERS_V1");
        assert_eq!(config.stream_for(&t).topics, vec![t.clone()]);
        let name = config.consumer_name(&t);
        assert!(name.starts_with("bus-orders_v1-"), "{name}");
        assert_ne!(
            name,
            config.consumer_name(&Topic::new("orders_v1").unwrap())
        );
    }

    #[test]
    fn defaults_are_valid_and_zero_sizes_are_not() {
        NatsConfig::default().validate().unwrap();
        let config = NatsConfig {
            max_in_flight: 0,
            ..NatsConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field(), "max_in_flight");
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    /// The example file documents the defaults: read, it equals the defaults but for the group
    /// and the stream it sets.
    #[test]
    fn the_example_file_is_the_defaults() {
        let read = NatsConfig::from_toml(include_str!("../../../examples/bus.toml")).unwrap();
        let mut expected = NatsConfig::new("nats://127.0.0.1:4222").with_group("billing");
        expected.streams.push(StreamSpec::new(
            "ACCOUNTS",
            [Topic::new("accounts").unwrap()],
        ));
        assert_eq!(format!("{read:?}"), format!("{expected:?}"));
        assert_eq!(
            format!("{:?}", NatsConfig::from_toml("").unwrap()),
            format!("{:?}", NatsConfig::default())
        );
    }

    #[test]
    fn environment_variables_override_the_file() {
        let env = [
            ("BUS__CONSUMER__GROUP", "payments"),
            (
                "BUS__CONNECTION__SERVERS",
                r#"["nats://a:4222", "nats://b:4222"]"#,
            ),
            ("BUS__RETRY__MAX_ATTEMPTS", "3"),
            ("BUS__RETRY__INITIAL_BACKOFF", "10ms"),
            ("BUS__ON_FAILURE", "halt-aggregate"),
            ("BUS__CONNECTION__AUTH__TOKEN", "s3cret"),
            (
                "BUS__STREAMS",
                r#"[{name = "ACCOUNTS", topics = ["accounts"], replicas = 3}]"#,
            ),
            ("PATH", "/usr/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config =
            NatsConfig::from_toml_with_env("[consumer]\ngroup = \"billing\"\n", env).unwrap();
        assert_eq!(config.consumer.group, "payments");
        assert_eq!(
            config.connection.servers,
            ["nats://a:4222", "nats://b:4222"]
        );
        assert_eq!(config.retry.max_attempts, 3);
        assert_eq!(config.retry.initial_backoff, Duration::from_millis(10));
        assert_eq!(config.on_failure, FailurePolicy::HaltAggregate);
        assert!(matches!(&config.connection.auth, Auth::Token(t) if t == "s3cret"));
        assert_eq!(config.streams.len(), 1);
        assert_eq!(config.streams[0].replicas, 3);
        assert_eq!(config.streams[0].topics, [Topic::new("accounts").unwrap()]);
        let err = NatsConfig::from_toml_with_env("", [("BUS__NO_SUCH".to_owned(), "1".to_owned())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no_such"), "{err}");
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn mistakes_are_refused_naming_them() {
        let err = NatsConfig::from_toml("[consumer]\ngropu = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gropu"), "{err}");
        let err = NatsConfig::from_toml("[fetch]\nexpires = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("expires"), "{err}");
        let err = NatsConfig::from_toml("[[streams]]\nname = \"S\"\ntopics = [\"a b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a b"), "{err}");
        let err = NatsConfig::from_toml(
            "[[streams]]\nname = \"S\"\ntopics = [\"t\"]\nmax_age = \"1h\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_age") && err.contains("limits"), "{err}");
        let ok = NatsConfig::from_toml(
            "[[streams]]\nname = \"S\"\ntopics = [\"t\"]\nretention = \"limits\"\nmax_age = \"1h\"\ndiscard = \"new\"\n",
        )
        .unwrap();
        assert_eq!(ok.streams[0].max_age, Duration::from_secs(3600));
        assert_eq!(ok.streams[0].discard, Some(Discard::New));
        let err = NatsConfig::from_toml_with_env(
            "",
            [("BUS__FETCH__BATCH".to_owned(), "many".to_owned())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("batch"), "{err}");
    }
}
