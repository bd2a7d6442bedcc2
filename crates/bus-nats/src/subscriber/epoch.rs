//! One epoch of the fetcher's deliveries: what the fetcher works with ([`FetchPlan`]), why an
//! epoch ends ([`End`], [`Break`]), and each reply on the epoch's inbox in turn: a delivery
//! checked to continue the consumer sequence, a redelivered copy recognised, a message or the
//! records of a batch turned into jobs for their keys' workers, or a status that ends a pull.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{wire, Topic};
use keyed_pool::KeyedPool;
use tokio::sync::watch;

use super::acker::Acker;
use super::copies::{ack_info, Copies, Seen};
use super::job::{
    prepare, prepare_record, submit, submit_all, Arrival, BatchProgress, Event, Job, RecordEvent,
    Single, Work,
};
use super::recovery::Restarter;
use super::runner::{Counters, Runner};
use super::Dispatch;
use crate::broker::{self, PullEnd};
use crate::NatsError;

/// What the fetcher needs besides its pool.
pub(crate) struct FetchPlan {
    pub(crate) client: async_nats::Client,
    pub(crate) batch: usize,
    pub(crate) expires: Duration,
    pub(crate) topic: Topic,
    pub(crate) dispatch: Dispatch,
    pub(crate) copies: Arc<Mutex<Copies>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) acker: Arc<Acker>,
    pub(crate) runner: Arc<Runner>,
    /// The aggregate IDs its records carried lately, shared by the next records that carry
    /// them (locked once per batch, by the fetcher alone).
    pub(crate) ids: Mutex<bus_core::AggregateIds>,
    pub(crate) restarter: Restarter,
    pub(crate) reconnects: watch::Receiver<u64>,
}

/// An operator's request to move delivery to stream position `sequence`; answered on `done`
/// once delivery restarted there.
#[derive(Debug)]
pub(crate) struct MoveTo {
    pub(crate) sequence: u64,
    pub(crate) done: tokio::sync::oneshot::Sender<Result<(), NatsError>>,
}

/// Why an epoch ended.
#[derive(Debug)]
pub(super) enum End {
    /// An operator moved delivery to another stream position.
    Moved(MoveTo),
    /// Close was asked for and every outstanding pull request is over.
    Stopped,
    /// Delivery is no longer contiguous; `seen_up_to` is the highest stream sequence received.
    Discontinuity { why: Break, seen_up_to: u64 },
    /// Another subscription owns the topic now.
    Lost(String),
}

/// Why delivery stopped being contiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Break {
    /// The topic's connection was re-established: what the broker wrote to the old one is lost.
    Reconnected,
    /// The epoch's pull inbox closed.
    InboxClosed,
    /// A delivery carried another consumer sequence than the one due.
    Jump { arrived: u64, due: u64 },
    /// The broker refused a pull request: a consumer-leader change, the consumer deleted, or a
    /// malformed request.
    Refused(broker::PullEnd, String),
    /// Pull requests went unanswered this long (the broker forgot them).
    Unanswered(Duration),
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::Reconnected => f.write_str("the connection was re-established"),
            Break::InboxClosed => f.write_str("the pull inbox closed"),
            Break::Jump { arrived, due } => {
                write!(f, "delivery {arrived} arrived where {due} was due")
            }
            Break::Refused(_, description) => write!(f, "pull request refused: {description}"),
            Break::Unanswered(after) => write!(f, "pull requests went unanswered for {after:?}"),
        }
    }
}

/// How many replies the fetcher takes in one turn of its select.
pub(super) const BURST: usize = 256;

/// Where an epoch's deliveries stand.
pub(super) struct Progress {
    /// Messages asked for and neither delivered nor expired yet.
    pub(super) credit: usize,
    /// The consumer sequence the next delivery must carry.
    pub(super) next_delivery: u64,
    /// The highest stream sequence received.
    pub(super) seen_up_to: u64,
    pub(super) stopping: bool,
    /// Events and messages received (a record batch is one message of several events).
    pub(super) events_per_message: (u64, u64),
}

impl Progress {
    /// The one place a discontinuity ends an epoch: unless close was asked for (then it just
    /// stops), delivery restarts at the ack floor + 1.
    pub(super) fn broken(&self, why: Break) -> Option<End> {
        Some(if self.stopping {
            End::Stopped
        } else {
            End::Discontinuity {
                why,
                seen_up_to: self.seen_up_to,
            }
        })
    }
}

/// Handles one reply on the epoch's inbox: a delivery (dispatched if it is the next in
/// sequence and not a copy) or a status. `Some` ends the epoch.
pub(super) async fn on_reply(
    plan: &FetchPlan,
    pool: &KeyedPool<Work>,
    term: u64,
    st: &mut Progress,
    message: async_nats::Message,
) -> Option<End> {
    match message.status.map(|s| s.as_u16()) {
        None => {
            st.credit = st.credit.saturating_sub(1);
            let info = message.reply.as_deref().and_then(ack_info);
            let Some(info) = info else {
                tracing::warn!(topic = %plan.topic, reply = ?message.reply, "a delivery without a JetStream ack subject; ignored");
                return None;
            };
            if info.consumer_sequence != st.next_delivery {
                return st.broken(Break::Jump {
                    arrived: info.consumer_sequence,
                    due: st.next_delivery,
                });
            }
            st.next_delivery += 1;
            st.seen_up_to = st.seen_up_to.max(info.stream_sequence);
            let arrival = Arrival::now(info.stored_nanos);
            let sequence = info.stream_sequence;
            // A copy of a message acknowledged recently is acknowledged again (its first ack was
            // lost or came too early); one not acknowledged yet keeps the copy's ack subject.
            let seen =
                plan.copies
                    .lock()
                    .unwrap()
                    .admit(sequence, message.reply.clone(), &*plan.acker);
            if seen != Seen::New {
                plan.counters.copies_skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(topic = %plan.topic, sequence, ?seen, "redelivered copy recognised; not handled again");
                return None;
            }
            // A record batch is routed as it is split, each record straight from the body.
            let mut ready = Vec::new();
            let batch = message
                .headers
                .as_ref()
                .and_then(|h| h.get(wire::BATCH))
                .map(|count| {
                    let mut ids = plan.ids.lock().unwrap();
                    let payload = message.payload.as_ptr() as usize;
                    let envelopes = matches!(plan.dispatch, Dispatch::Envelope(_));
                    wire::split_batch(count.as_str(), &message.payload, |record| {
                        // Routed by its aggregate ID as it lies in the payload, and decoded by
                        // its worker: the fetcher, one task, only splits and routes.
                        if let Some(key) = envelopes.then(|| record.aggregate_id_bytes()).flatten()
                        {
                            // Within the payload, which a batch keeps under 4 GiB.
                            let at = key.as_ptr() as usize - payload;
                            return RecordEvent::Deferred {
                                key: (at as u32, (at + key.len()) as u32),
                            };
                        }
                        let (key, input) = prepare_record(
                            &plan.topic,
                            &plan.dispatch,
                            message.subject.as_str(),
                            record,
                            &mut ids,
                        );
                        ready.push(Event { key, input });
                        RecordEvent::Ready(ready.len() as u32 - 1)
                    })
                });
            let (key, input) = match batch {
                Some(Ok((spans, events))) => {
                    st.events_per_message.0 += spans.len() as u64;
                    st.events_per_message.1 += 1;
                    let batch = Batch {
                        message,
                        spans,
                        events,
                        ready,
                    };
                    return dispatch_batch(plan, pool, term, sequence, batch, arrival).await;
                }
                Some(Err(error)) => (
                    Arc::from(""),
                    Err((
                        crate::dead_letters::DeadLetterReason::Undecodable,
                        format!("not a record batch: {error}"),
                    )),
                ),
                None => prepare(&plan.topic, &plan.dispatch, &message),
            };
            st.events_per_message.0 += 1;
            st.events_per_message.1 += 1;
            plan.copies
                .lock()
                .unwrap()
                .link(sequence, [key.as_bytes()], 1);
            let job = Job::Single(Box::new(Single {
                message,
                sequence: Some(sequence),
                event: Event {
                    key: key.clone(),
                    input,
                },
                term,
                arrival,
            }));
            if submit(pool, key.as_bytes(), Work::Message(job))
                .await
                .is_err()
            {
                return Some(End::Stopped);
            }
        }
        Some(100) => {} // idle heartbeat
        Some(423) => {
            return Some(if st.stopping {
                End::Stopped
            } else {
                End::Lost("the broker pinned another subscriber (423)".into())
            });
        }
        Some(status) => {
            // 408 (expired), 404 (nothing), 409 (limits, leadership change): the
            // request is over; its undelivered part is in Nats-Pending-Messages.
            let pending = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Pending-Messages"))
                .and_then(|v| v.as_str().parse::<usize>().ok())
                .unwrap_or(plan.batch);
            st.credit = st.credit.saturating_sub(pending);
            let description = message.description.clone().unwrap_or_default();
            match broker::pull_end(status, &description) {
                // A new consumer leader may not know what the old one handed out (those
                // messages would come back only after AckWait); a deleted consumer is
                // recreated on restart.
                end @ (PullEnd::LeadershipChange | PullEnd::ConsumerDeleted) => {
                    return st.broken(Break::Refused(end, description));
                }
                PullEnd::Malformed => {
                    tracing::error!(topic = %plan.topic, %description, "pull request refused as malformed");
                    return st.broken(Break::Refused(PullEnd::Malformed, description));
                }
                PullEnd::Over if status == 409 => {
                    tracing::warn!(topic = %plan.topic, %description, "pull request refused");
                }
                PullEnd::Over => {}
            }
        }
    }
    None
}

/// A record batch split: its message, where its records lie, and their events.
struct Batch {
    message: async_nats::Message,
    spans: Vec<wire::RecordSpan>,
    events: Vec<RecordEvent>,
    ready: Vec<Event>,
}

/// Dispatches the events of a record batch, each to its key's worker, in record order (each
/// worker's driver takes its share of the batch in one hand-over). Events settled before the
/// batch was last released in this subscription (handled or dead-lettered) are not handed to
/// the handler again.
async fn dispatch_batch(
    plan: &FetchPlan,
    pool: &KeyedPool<Work>,
    term: u64,
    sequence: u64,
    batch: Batch,
    arrival: Arrival,
) -> Option<End> {
    let Batch {
        message,
        spans,
        events,
        ready,
    } = batch;
    let first = spans
        .first()
        .map(|span| span.header_block(&message.payload))
        .unwrap_or_default();
    let before = plan.copies.lock().unwrap().take_partial(sequence, &first);
    let done: Vec<AtomicBool> = (0..spans.len())
        .map(|i| AtomicBool::new(before.as_ref().is_some_and(|d| d.get(i) == Some(&true))))
        .collect();
    let to_run: Vec<usize> = (0..spans.len())
        .filter(|i| !done[*i].load(Ordering::Relaxed))
        .collect();
    let skipped = spans.len() - to_run.len();
    if skipped > 0 {
        plan.counters
            .copies_skipped
            .fetch_add(skipped as u64, Ordering::Relaxed);
        tracing::debug!(topic = %plan.topic, sequence, skipped, "record batch delivered again; its settled events are not handled again");
    }
    let progress = Arc::new(BatchProgress {
        message,
        spans,
        events,
        ready,
        sequence,
        term,
        arrival,
        // One more than the events to run, released below once all are dispatched: a worker
        // settling the last event before the others are dispatched must not ack the batch.
        remaining: AtomicUsize::new(to_run.len() + 1),
        done,
    });
    let keys: Vec<&[u8]> = (0..progress.events.len())
        .map(|index| progress.key(index))
        .collect();
    // Every event's aggregate is known before any of them can settle, those settled before
    // included: the batch holds them until it is acknowledged.
    plan.copies
        .lock()
        .unwrap()
        .link(sequence, keys.iter().copied(), keys.len());
    // Each worker's driver takes its share of the batch in one hand-over.
    let work = to_run.iter().map(|&index| {
        (
            keys[index],
            Work::Message(Job::Record(progress.clone(), index)),
        )
    });
    let (stopped, dispatched) = match submit_all(pool, work).await {
        Ok(()) => (None, to_run.len()),
        Err(keyed_pool::Closed(not_taken)) => (Some(End::Stopped), to_run.len() - not_taken.len()),
    };
    // The events never dispatched (the pool stopped) and the guard.
    plan.runner
        .settle_records(&progress, Some(sequence), to_run.len() - dispatched + 1);
    stopped
}
