//! What the bus provisions: streams (retention, discard, partitions) and how.

use super::*;

/// Where a stream keeps its messages. In configuration files: `"file"`, `"memory"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    /// On disk: survives a server restart. The default.
    #[default]
    File,
    /// In memory: lost when the server stops (with the consumer, whose state goes too).
    Memory,
}

impl From<Storage> for async_nats::jetstream::stream::StorageType {
    fn from(storage: Storage) -> Self {
        match storage {
            Storage::File => Self::File,
            Storage::Memory => Self::Memory,
        }
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
    /// Where the stream keeps its messages: [`Storage::File`] (the default) or memory.
    #[serde(default)]
    pub storage: Storage,
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
            storage: Storage::File,
            replicas: 1,
            partitions: 1,
        }
    }
}
