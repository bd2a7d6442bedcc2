//! How a publisher orders and batches.

use super::*;

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
    /// once (default [`DEFAULT_BATCH_MAX_IN_FLIGHT`]). A batch that is not full is sent only
    /// while no other batch of its topic (partition) is in flight: events published meanwhile
    /// gather into the next batch, so the broker stores, de-duplicates and delivers fewer,
    /// fuller messages; full batches use the rest of the room.
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

    /// Batches in flight below which a batch that is not full is sent: one, so a partial batch
    /// goes only while nothing else of its topic (partition) awaits an ack. At every load
    /// measured this left fewer messages for the broker and a shorter tail than letting partial
    /// batches take half of `max_in_flight` (`docs/performance.md`, twentieth look).
    pub(crate) fn partial_in_flight(&self) -> usize {
        1
    }

    /// Whether events are packed into batches at all.
    pub fn enabled(&self) -> bool {
        self.max_events > 1
    }
}
