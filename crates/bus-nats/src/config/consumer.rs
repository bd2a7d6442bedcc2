//! The durable consumer of each topic, how it fetches, and where dead letters go.

use super::*;

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
    /// Where a new group starts reading a topic (default [`StartAt::Start`]: every event the
    /// stream keeps). Applies when the group's consumer is created; a group that exists keeps
    /// its position (move it with `NatsBus::reset_group`). Only `Start` on `WorkQueue` topics.
    pub start: StartAt,
    /// How one subscription of the group comes to own each topic's consumer (default
    /// [`Ownership::Auto`]). Every member of a group must be set alike: a member set otherwise
    /// fails to subscribe rather than change the consumer under the others.
    pub ownership: Ownership,
}

/// How one subscription of a group owns a topic's consumer ([`ConsumerSpec::ownership`]). In
/// configuration files: `ownership = "auto"` or `"lease"`. Both keep every aggregate's order
/// through takeovers (`docs/guarantees.md`, "Several replicas of one service").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ownership {
    /// On nats-server 2.14 or newer a priority group with the pinned-client policy: the broker
    /// delivers only to the owner. On older servers a lease, as [`Ownership::Lease`].
    ///
    /// The broker pins a standby only when it has a message for it: once the owner has gone
    /// (closed, or a group moved its partition), a topic with nothing new to deliver has no
    /// owner (`SubscriptionMetrics::owner` is `false` everywhere) until its next event, which
    /// the standby takes over with. With a lease the standby takes over as soon as it is free.
    #[default]
    Auto,
    /// A lease in the KV bucket `BUS_OWNERS` on every server, as before 2.14: the owner fences
    /// itself when it cannot renew the lease. A takeover restarts delivery by the consumer
    /// reset API on 2.14+ (so `Retention::Acknowledged` works with it there), by deleting and
    /// recreating the consumer before. The broker then does less per delivered message (a
    /// pinned client's messages are each copied once more to carry the pin;
    /// `docs/performance.md`, eighteenth look), for a shorter latency tail.
    Lease,
}

/// Where a subscription's fetcher, workers and handlers run ([`NatsConfig::subscription_runtime`]).
/// In configuration files: `subscription_runtime = "caller"` or `"own-thread"`. Either way the
/// bus's connections run on the runtime the bus was connected on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubscriptionRuntime {
    /// The tokio runtime `subscribe` is called on: its handlers run on that runtime's worker
    /// threads, beside the caller's other tasks.
    #[default]
    Caller,
    /// A current-thread tokio runtime on a thread of its own per subscription, named
    /// `bus:<topic>`, ended when the subscription is closed or dropped. A subscription's tasks
    /// then hand each event to each other on one thread, and never wait behind the caller's
    /// tasks (publishing, above all) for a worker thread of the caller's runtime: at full load
    /// a process that publishes and consumes ran up to 16 % faster here (median +3 % to +11 %
    /// over three sets of runs), while at half load its latency was longer (a delivery wakes
    /// the thread from sleep), and a process that only consumes drained a backlog 3-15 % slower
    /// (one thread where the caller's runtime has several: `docs/performance.md`, "A
    /// subscription on a thread of its own"). Its handlers run there, one at a time: a handler
    /// that computes for long holds up the subscription's other aggregates (move such work to
    /// `tokio::task::spawn_blocking`), and one that blocks its thread past
    /// [`ConsumerSpec::takeover_after`] lets a standby take the topic over;
    /// `tokio::task::block_in_place` is not available there; tasks a handler spawns run there
    /// too, and end with the subscription.
    OwnThread,
}

/// Where a new consumer group starts reading a topic ([`ConsumerSpec::start`]). In
/// configuration files: `start = "start"`, `"new"`, `{ sequence = 41 }` or
/// `{ time = "2026-12-01T00:00:00Z" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartAt {
    /// Every event the stream keeps.
    #[default]
    Start,
    /// Only events stored after the group's consumer is created.
    New,
    /// From this stream sequence on.
    Sequence(u64),
    /// From the first event stored at or after this time.
    Time(#[serde(with = "humantime_serde")] std::time::SystemTime),
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
            start: StartAt::Start,
            ownership: Ownership::Auto,
        }
    }
}

/// How each topic's single fetcher pulls.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Events asked for in one pull request (default [`DEFAULT_FETCH_BATCH`]): as many
    /// messages as hold about this many events, going by the events per message seen so far
    /// (at least one message; `batch` / [`DEFAULT_BATCH_MAX_EVENTS`] until 16 have arrived, as
    /// if every message were a full default batch). For messages of one event each that is
    /// `batch` messages. The fetcher asks again once less than one request's worth is
    /// outstanding, so at most about two requests' worth is in flight: a small `batch` on a
    /// topic of record batches (500 events when its messages hold 128) leaves a few messages
    /// per round trip to the broker, and the topic's throughput is then bounded by that round
    /// trip, not by its handlers.
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
