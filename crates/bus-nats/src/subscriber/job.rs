//! What a worker is given: a job (one delivered event, decoded for its handler, with where it
//! travelled and when it arrived) or an operator's request for an aggregate.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use async_nats::HeaderMap;

use bus_core::{wire, Prepared, Topic, Unhandleable};

use super::Dispatch;
use crate::dead_letters::DeadLetterReason;

/// A job's message, ready for the handler.
pub(crate) type Input = Prepared;

/// Queues `work` behind the earlier work of the aggregate whose ID is `key`. Every job and
/// request reaches the pool through here, its key as bytes: a record routed by its aggregate
/// ID as it lies in the batch and an event routed by its decoded envelope's ID reach the same
/// worker, as the key's hash is of the same bytes.
pub(crate) async fn submit(
    pool: &keyed_pool::KeyedPool<Work>,
    key: &[u8],
    work: Work,
) -> Result<(), keyed_pool::Closed<Work>> {
    pool.submit(key, work).await
}

/// [`submit`] for each of `work`, every worker's driver handed its share at once (a record
/// batch's events, say): as submitted one after another, each behind the earlier work of its
/// key. If the pool stops, what it did not take is handed back.
pub(crate) async fn submit_all<'k>(
    pool: &keyed_pool::KeyedPool<Work>,
    work: impl IntoIterator<Item = (&'k [u8], Work)>,
) -> Result<(), keyed_pool::Closed<Vec<Work>>> {
    pool.submit_all(work).await
}

/// One event ready for its handler: the ordering key (aggregate ID) the pool routes it by, and
/// its message decoded for the handler, or why it cannot be handled.
pub(crate) struct Event {
    pub(crate) key: Arc<str>,
    pub(crate) input: Result<Input, (DeadLetterReason, String)>,
}

/// A message of its own (not a record batch), with its event.
pub(crate) struct Single {
    pub(crate) message: async_nats::Message,
    /// The message's stream sequence, if its ack subject could be read.
    pub(crate) sequence: Option<u64>,
    pub(crate) event: Event,
    /// The ownership term it was delivered in; see [`Job::term`].
    pub(crate) term: u64,
    pub(crate) arrival: Arrival,
}

/// One record of a batch as its worker finds it: twelve bytes, so that a batch's list of them
/// is a few cache lines, not an envelope's room per record.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RecordEvent {
    /// Decoded where the batch was split, at this index of [`BatchProgress::ready`]: every
    /// record for a raw handler (keyed by its own header), and a record whose aggregate ID
    /// could not be read without decoding it.
    Ready(u32),
    /// Decoded by its worker when it runs, on the worker's thread: the envelope is made where
    /// the handler takes it (its aggregate ID made there, in place unless longer than 38
    /// bytes, its event type from that thread's own), not on the fetcher's thread and handed over. Its key, the aggregate
    /// ID it decodes with, lies at these bytes of the batch's payload
    /// ([`wire::RecordView::aggregate_id_bytes`]): routed and linked by them as they lie,
    /// without reading them as text.
    Deferred { key: (u32, u32) },
}

/// A record batch being handled: acknowledged once every one of its events is handled or
/// dead-lettered, by whichever worker settles the last. It holds its events, one per record:
/// its jobs are indexes into it, so that a batch of 128 events takes one allocation for them
/// rather than one each.
pub(crate) struct BatchProgress {
    pub(crate) message: async_nats::Message,
    /// Where each record lies in the message's payload.
    pub(crate) spans: Vec<wire::RecordSpan>,
    /// Per record, where its event or its key lies (for those settled before too: their keys
    /// order the batch's acknowledgement).
    pub(crate) events: Vec<RecordEvent>,
    /// The events decoded where the batch was split.
    pub(crate) ready: Vec<Event>,
    /// The batch message's stream sequence.
    pub(crate) sequence: u64,
    /// The ownership term it was delivered in; see [`Job::term`].
    pub(crate) term: u64,
    pub(crate) arrival: Arrival,
    /// Events dispatched and not settled yet.
    pub(crate) remaining: AtomicUsize,
    /// Per record: handled or dead-lettered (skipped ones start out done).
    pub(crate) done: Vec<AtomicBool>,
}

/// One delivered event for its worker: a message of its own, or record `.1` of a batch.
pub(crate) enum Job {
    /// Boxed: a record of a batch, the usual case, needs none of it.
    Single(Box<Single>),
    Record(Arc<BatchProgress>, usize),
}

impl Job {
    /// The ordering key (aggregate ID) the pool routed it by.
    pub(crate) fn key(&self) -> &str {
        match self {
            Job::Single(single) => &single.event.key,
            Job::Record(progress, index) => std::str::from_utf8(progress.key(*index))
                .expect("a run of the UTF-8 header block between ASCII bytes"),
        }
    }

    /// The message ready for the handler, or why it cannot be handled: a copy of what was
    /// decoded, or for a deferred record decoded now, on this thread (again at each call).
    pub(crate) fn input(&self) -> Result<Input, (DeadLetterReason, String)> {
        match self {
            Job::Single(single) => single.event.input.clone(),
            Job::Record(progress, index) => match progress.events[*index] {
                RecordEvent::Ready(at) => progress.ready[at as usize].input.clone(),
                RecordEvent::Deferred { .. } => progress.decode(*index),
            },
        }
    }

    /// The message's stream sequence, if its ack subject could be read.
    pub(crate) fn sequence(&self) -> Option<u64> {
        match self {
            Job::Single(single) => single.sequence,
            Job::Record(progress, _) => Some(progress.sequence),
        }
    }

    /// The ownership term it was delivered in: a job of an earlier term (the subscription lost
    /// the topic since) is not handled, since the new owner has it delivered again.
    pub(crate) fn term(&self) -> u64 {
        match self {
            Job::Single(single) => single.term,
            Job::Record(progress, _) => progress.term,
        }
    }

    /// When the broker stored its message, and when the fetcher received it.
    pub(crate) fn arrival(&self) -> Arrival {
        match self {
            Job::Single(single) => single.arrival,
            Job::Record(progress, _) => progress.arrival,
        }
    }

    /// Its index in its record batch.
    pub(crate) fn batch_index(&self) -> Option<usize> {
        match self {
            Job::Single(_) => None,
            Job::Record(_, index) => Some(*index),
        }
    }
}

impl BatchProgress {
    /// Record `index`'s key, as the pool routed it: the bytes of its aggregate ID.
    pub(crate) fn key(&self, index: usize) -> &[u8] {
        match self.events[index] {
            RecordEvent::Ready(at) => self.ready[at as usize].key.as_bytes(),
            RecordEvent::Deferred { key } => &self.message.payload[key.0 as usize..key.1 as usize],
        }
    }

    /// Decodes record `index` for an envelope handler, as [`prepare_record`] would have.
    fn decode(&self, index: usize) -> Result<Input, (DeadLetterReason, String)> {
        thread_local! {
            /// The event types this thread's workers read lately. Aggregate IDs arrive in no
            /// useful order here and are made anew (in place, unless longer than 38 bytes).
            static IDS: RefCell<bus_core::AggregateIds> =
                RefCell::new(bus_core::AggregateIds::new(0));
        }
        IDS.with(|ids| {
            self.spans[index]
                .decode_with(&self.message.payload, &mut ids.borrow_mut())
                .expect("a batch's spans are of its own payload")
        })
        .map(Prepared::Envelope)
        .map_err(|error| dead_letter_reason(Unhandleable::Undecodable(error.to_string())))
    }
}

/// When a message was stored and received: the first stages of its events' latency, handed to
/// the handler in its `Delivery`. One clock read per message, not per event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    pub(crate) stored_at: Option<std::time::SystemTime>,
    pub(crate) received_at: std::time::SystemTime,
}

impl Arrival {
    /// A message received now, stored at `stored_nanos` (Unix epoch) by the broker's clock.
    pub(crate) fn now(stored_nanos: u64) -> Self {
        Self {
            stored_at: (stored_nanos > 0)
                .then(|| std::time::UNIX_EPOCH + std::time::Duration::from_nanos(stored_nanos)),
            received_at: std::time::SystemTime::now(),
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Its handler succeeded.
    Handled,
    /// Its dead letter is stored.
    DeadLettered,
    /// Not handled here: its message is left to be delivered again.
    Returned,
}

impl Job {
    pub(crate) fn event_version(&self) -> Option<u64> {
        match self.input() {
            Ok(Prepared::Envelope(e)) => Some(e.event_version()),
            _ => None,
        }
    }
}

/// What an operator asks of a halted aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Hand its failed event to the handler again, then its waiting events.
    Resume,
    /// Dead-letter its failed event, then hand over its waiting events.
    Skip,
}

/// An operator's request for one aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) key: Arc<str>,
    pub(crate) action: Action,
}

/// What a worker is given.
pub(crate) enum Work {
    Message(Job),
    /// An operator's request, run in the aggregate's worker after what is queued before it.
    Operator(Request),
}

pub(crate) fn header_pairs(headers: Option<&HeaderMap>) -> impl Iterator<Item = (&str, &str)> {
    headers
        .into_iter()
        .flat_map(|h| h.iter())
        .flat_map(|(name, values)| values.iter().map(move |v| (name.as_ref(), v.as_str())))
}

/// Decodes a message for the subscription's handler and picks its ordering key.
pub(crate) fn prepare(
    topic: &Topic,
    dispatch: &Dispatch,
    message: &async_nats::Message,
) -> (Arc<str>, Result<Input, (DeadLetterReason, String)>) {
    prepare_parts(
        topic,
        dispatch,
        &message.subject,
        header_pairs(message.headers.as_ref()),
        &message.payload,
    )
}

/// Decodes one record of a batch for the subscription's handler and picks its ordering key.
pub(crate) fn prepare_record(
    topic: &Topic,
    dispatch: &Dispatch,
    subject: &str,
    record: wire::RecordView<'_>,
    ids: &mut bus_core::AggregateIds,
) -> (Arc<str>, Result<Input, (DeadLetterReason, String)>) {
    match dispatch {
        Dispatch::Envelope(_) => {
            let (key, prepared) = bus_core::prepare_record(subject, record, ids);
            (key, prepared.map_err(dead_letter_reason))
        }
        Dispatch::Raw(..) => prepare_parts(
            topic,
            dispatch,
            subject,
            wire::header_pairs(&record.header_block()),
            &record.payload(),
        ),
    }
}

fn prepare_parts<'a>(
    topic: &Topic,
    dispatch: &Dispatch,
    subject: &str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    payload: &bytes::Bytes,
) -> (Arc<str>, Result<Input, (DeadLetterReason, String)>) {
    let (key, prepared) = match dispatch {
        Dispatch::Envelope(_) => bus_core::prepare(topic, None, subject, headers, payload),
        Dispatch::Raw(_, key) => {
            // The pin ID is the broker's, added on delivery: not the message's.
            let headers = headers.filter(|(n, _)| !n.eq_ignore_ascii_case("Nats-Pin-Id"));
            bus_core::prepare(topic, Some(key), subject, headers, payload)
        }
    };
    (key, prepared.map_err(dead_letter_reason))
}

fn dead_letter_reason(why: Unhandleable) -> (DeadLetterReason, String) {
    let reason = match why {
        Unhandleable::Undecodable(_) => DeadLetterReason::Undecodable,
        Unhandleable::NoKey => DeadLetterReason::NoKey,
    };
    (reason, why.to_string())
}
