//! Running one job: calling the handler with retries in place, and settling it (acknowledged,
//! dead-lettered, or halted with its aggregate).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use tracing::Instrument;

use bus_core::{
    run_with_retry, with_delivery, CancelSource, Delivery, FailurePolicy, HandlerError, Prepared,
    RetryOutcome, Topic, TraceParent, TRACEPARENT,
};

use super::acker::Acker;
use super::copies::{ack_info, Copies};
use super::halts::Halt;
use super::job::{header_pairs, BatchProgress, Input, Job, Outcome, Work};
use super::unacked::{AckKind, Settled};
use super::Dispatch;
use crate::dead_letters::{DeadLetterReason, LetterBox, LetterHeaders};
use crate::telemetry::Seconds;

const PREPARED_FOR_ITS_HANDLER: &str = "jobs are prepared for their subscription's handler";

/// Why a handler's final failure stops its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// It failed for good: the failure policy decides (dead letter or halt).
    Failed(DeadLetterReason),
    /// It failed with a retryable error after the subscription started closing or lost its
    /// topic: never dead-lettered, always returned.
    Cancelled,
}

impl Stop {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Stop::Failed(reason) => reason.as_str(),
            Stop::Cancelled => "cancelled",
        }
    }
}

/// How a handler's final failure went.
pub(crate) struct Failure {
    pub(crate) reason: Stop,
    pub(crate) error: String,
    pub(crate) attempts: u32,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) handled: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) copies_skipped: AtomicU64,
    /// Times delivery was restarted at the ack floor after a discontinuity (counted once it
    /// runs again).
    pub(crate) restarts: AtomicU64,
    /// Times an operator moved delivery to another stream position.
    pub(crate) moves: AtomicU64,
    /// Times this subscription gained the topic.
    pub(crate) gained: AtomicU64,
    /// Times it lost the topic to another subscription.
    pub(crate) lost: AtomicU64,
    /// Unreadable messages dead-lettered and removed from the stream.
    pub(crate) unreadable: AtomicU64,
    /// Whether it owns the topic now (0 or 1).
    pub(crate) owner: AtomicU64,
}

pub(crate) struct Runner {
    pub(crate) acker: Arc<Acker>,
    pub(crate) topic: Topic,
    pub(crate) dispatch: Dispatch,
    pub(crate) retry: bus_core::RetryPolicy,
    /// Where its dead letters go.
    pub(crate) letters: LetterBox,
    pub(crate) counters: Arc<Counters>,
    pub(crate) copies: Arc<Mutex<Copies>>,
    pub(crate) policy: FailurePolicy,
    /// Halted aggregates by key; `halted_count` lets the hot path skip the lock while none is.
    pub(crate) halted: Mutex<HashMap<Arc<str>, Halt>>,
    pub(crate) halted_count: AtomicUsize,
    /// The current ownership term; see [`Job::term`]. Unique in the process (from
    /// [`next_term`]), as handlers see it in their `Delivery::ownership_term`.
    pub(crate) term: AtomicU64,
    /// Until when the claim on the topic is known good: a job is not started after it.
    pub(crate) validity: Arc<super::ownership::Validity>,
    /// The partition consumed, for a partitioned topic.
    pub(crate) partition: Option<u32>,
    /// Handlers' cancellation (in their [`Delivery`]): `cancel` fires the signals given out so
    /// far when the subscription loses its topic (later ones are fresh, for a later term), and
    /// `close` fires every signal when it closes.
    pub(crate) cancel: CancelSource,
    pub(crate) metrics: crate::telemetry::HandleMetrics,
}

/// A fresh ownership term, unique in the process: every subscription starts with one and takes
/// another each time it loses its topic or is moved.
pub(crate) fn next_term() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Runner {
    /// Runs what a worker was given. Never fails: a job's failure is settled here.
    pub(crate) async fn run(self: Arc<Self>, work: Work) -> Result<(), std::convert::Infallible> {
        match work {
            Work::Message(job) => {
                if job.term() != self.term.load(Ordering::Acquire) {
                    // Delivered before the subscription lost the topic: the new owner has it.
                    self.settle(&job, Outcome::Returned);
                    return Ok(());
                }
                if self.halted_count.load(Ordering::Acquire) > 0 {
                    let mut halted = self.halted.lock().unwrap();
                    if let Some(halt) = halted.get_mut(job.key()) {
                        // Behind the aggregate's failed event; still kept alive at the broker.
                        halt.jobs.push_back(job);
                        return Ok(());
                    }
                }
                if let Err((job, failure)) = self.process(job).await {
                    if job.term() != self.term.load(Ordering::Acquire) {
                        // The topic was lost meanwhile: the new owner has it.
                        self.settle(&job, Outcome::Returned);
                        return Ok(());
                    }
                    self.halt(job, failure, VecDeque::new());
                }
            }
            // Boxed, as the rare path (see `dead_letter_job`).
            Work::Operator(request) => Box::pin(self.resume(request)).await,
        }
        Ok(())
    }

    /// A job is over. A single-event message is acknowledged (terminated once dead-lettered)
    /// or returned; a batch is acknowledged when the last of its events is settled, if every
    /// one was handled or dead-lettered. Otherwise it is returned, and what was settled is
    /// remembered so that its events are not handled twice. Acknowledgements go out in the
    /// order [`super::unacked`] keeps.
    pub(crate) fn settle(&self, job: &Job, outcome: Outcome) {
        match job {
            Job::Single(single) => self.settle_message(
                single.sequence,
                match outcome {
                    Outcome::Handled => Settled::Done(AckKind::Ack),
                    Outcome::DeadLettered => Settled::Done(AckKind::Term),
                    Outcome::Returned => Settled::Returned,
                },
            ),
            Job::Record(progress, index) => {
                if outcome != Outcome::Returned {
                    progress.done[*index].store(true, Ordering::Release);
                }
                self.settle_records(progress, Some(progress.sequence), 1);
            }
        }
    }

    /// `count` events of a batch are settled (or will never run).
    pub(crate) fn settle_records(
        &self,
        progress: &BatchProgress,
        sequence: Option<u64>,
        count: usize,
    ) {
        if progress.remaining.fetch_sub(count, Ordering::AcqRel) != count {
            return;
        }
        let done: Vec<bool> = progress
            .done
            .iter()
            .map(|d| d.load(Ordering::Acquire))
            .collect();
        if done.iter().all(|d| *d) {
            self.settle_message(sequence, Settled::Done(AckKind::Ack));
        } else {
            if let Some(sequence) = sequence {
                let first = progress
                    .spans
                    .first()
                    .map(|span| span.header_block(&progress.message.payload))
                    .unwrap_or_default();
                self.copies
                    .lock()
                    .unwrap()
                    .remember_partial(sequence, first, done);
            }
            self.settle_message(sequence, Settled::Returned);
        }
    }

    fn settle_message(&self, sequence: Option<u64>, how: Settled) {
        if let Some(sequence) = sequence {
            self.copies
                .lock()
                .unwrap()
                .settle(sequence, how, &*self.acker);
        }
    }

    /// Handles one message to the end, unless its final failure halts its aggregate: then the
    /// job comes back, unacknowledged, with why it failed.
    pub(crate) async fn process(&self, job: Job) -> Result<(), (Job, Failure)> {
        let outcome = match self.handle(&job).await {
            Ok(outcome) => outcome,
            // Failed while the subscription is going: held like a halt, so that it and its
            // aggregate's later events are returned unacknowledged, in order.
            Err(failure) => match (&failure.reason, self.policy) {
                (Stop::Cancelled, _) | (_, FailurePolicy::HaltAggregate) => {
                    return Err((job, failure))
                }
                (Stop::Failed(reason), FailurePolicy::DeadLetter) => {
                    self.dead_letter_job(&job, reason, &failure.error, failure.attempts)
                        .await
                }
            },
        };
        self.settle(&job, outcome);
        Ok(())
    }

    /// Handles one message: `Ok` once it is handled, dead-lettered, or could not be
    /// dead-lettered (returned); `Err` when the handler failed for good and the failure policy
    /// decides.
    async fn handle(&self, job: &Job) -> Result<Outcome, Failure> {
        // Owned: the first attempt takes it, later ones read the job again. Kept where it is
        // read until then: an envelope is large, and each move on its way to the handler a copy.
        let mut first = Some(job.input());
        let (traceparent, span) = match first.as_ref().expect("read above") {
            Ok(input) => self.span(job, input),
            Err((reason, error)) => return Ok(self.dead_letter_job(job, reason, error, 0).await),
        };
        let cancellation = self.cancel.signal();
        let arrival = job.arrival();
        let started = std::time::Instant::now();
        if !self.validity.holds(started) {
            // The claim on the topic is no longer known good: this process may have been
            // stopped while another took over, and its keeper has not said so yet. The new
            // owner has the event.
            return Ok(Outcome::Returned);
        }
        // Pinned where it is made and instrumented by reference: the handler call's future is
        // not moved again.
        let attempts = std::pin::pin!(run_with_retry(
            &self.retry,
            |attempt| {
                span.record("attempt", attempt);
                let input = first.take().unwrap_or_else(|| job.input());
                let dispatch = &self.dispatch;
                // Once the subscription is going, or its claim is no longer known good (a
                // process stopped during the backoff), a failed event is not tried again.
                let going = attempt > 1
                    && (self.cancel.has_fired(&cancellation)
                        || !self.validity.holds(std::time::Instant::now()));
                let delivery = Delivery {
                    attempt,
                    stream_sequence: job.sequence(),
                    batch_index: job.batch_index().map(|index| index as u32),
                    partition: self.partition,
                    cancellation,
                    traceparent: traceparent.clone(),
                    stored_at: arrival.stored_at,
                    received_at: Some(arrival.received_at),
                    ownership_term: Some(job.term()),
                };
                with_delivery(delivery, async move {
                    if going {
                        return Err(HandlerError::retryable(
                            "the subscription is closing or lost its topic",
                        ));
                    }
                    // Matched as it is, not moved into a tuple with the handler first.
                    match input {
                        Ok(Prepared::Envelope(e)) => match dispatch {
                            Dispatch::Envelope(h) => h.handle(e).await,
                            Dispatch::Raw(..) => unreachable!("{PREPARED_FOR_ITS_HANDLER}"),
                        },
                        Ok(Prepared::Raw(m)) => match dispatch {
                            Dispatch::Raw(h, _) => h.handle(m).await,
                            Dispatch::Envelope(_) => unreachable!("{PREPARED_FOR_ITS_HANDLER}"),
                        },
                        // It was read for the first attempt: the same bytes read the same.
                        Err((_, error)) => Err(HandlerError::permanent(format!(
                            "the event could not be read again: {error}"
                        ))),
                    }
                })
            },
            // Backoffs end early once the subscription is going.
            // Boxed, as the rare path: a timer is large, and held inline it would grow every
            // handler call's future.
            |delay| {
                Box::pin(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancellation.cancelled() => {}
                    }
                })
            },
            bus_core::jitter,
            |attempt, error| {
                self.metrics.retries.increment(1);
                tracing::debug!(topic = %self.topic, attempt, %error, "handler failed; retrying in place");
            },
        ));
        let outcome = attempts.instrument(span.clone()).await;
        span.record(
            "outcome",
            match &outcome {
                RetryOutcome::Succeeded { .. } => "handled",
                RetryOutcome::Failed { .. } => "failed",
            },
        );
        self.metrics.seconds.record(Seconds::since(started));
        match outcome {
            RetryOutcome::Succeeded { .. } => {
                self.metrics.handled.increment(1);
                self.counters.handled.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Handled)
            }
            RetryOutcome::Failed { attempts, reason } => Err(Failure {
                // A retryable failure once the subscription is going may be the handler giving
                // up because of it: returned, never dead-lettered. Permanent failures and
                // panics follow the failure policy as ever. So once the claim is no longer
                // known good: the loss is on its way to the fetcher.
                reason: if reason.is_retryable()
                    && (self.cancel.has_fired(&cancellation)
                        || !self.validity.holds(std::time::Instant::now()))
                {
                    Stop::Cancelled
                } else {
                    Stop::Failed(DeadLetterReason::of_failure(&reason))
                },
                error: reason.to_string(),
                attempts,
            }),
        }
    }

    /// The span of one message's handling, and the trace context it carried: `bus.handle`,
    /// with topic, aggregate (or key), version, event type and ID, trace ID, stream sequence,
    /// partition, then the attempt and the outcome as they happen.
    fn span(&self, job: &Job, input: &Input) -> (Option<TraceParent>, tracing::Span) {
        let traceparent = match input {
            Prepared::Envelope(e) => e.traceparent(),
            Prepared::Raw(m) => m.header(TRACEPARENT).and_then(TraceParent::parse),
        };
        let span = tracing::info_span!(
            "bus.handle",
            topic = %self.topic,
            aggregate = %job.key(),
            version = tracing::field::Empty,
            event_type = tracing::field::Empty,
            event_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            traceparent = tracing::field::Empty,
            stream_sequence = job.sequence(),
            partition = self.partition,
            attempt = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        if !span.is_disabled() {
            if let Prepared::Envelope(e) = input {
                span.record("version", e.event_version());
                span.record("event_type", e.event_type().as_str());
                span.record("event_id", e.event_id().as_str());
            }
            let trace_id = match (input, &traceparent) {
                (Prepared::Envelope(e), _) if e.trace_id().is_some() => e.trace_id(),
                (_, Some(t)) => Some(t.trace_id()),
                _ => None,
            };
            if let Some(trace_id) = trace_id {
                span.record("trace_id", trace_id);
            }
            if let Some(t) = &traceparent {
                span.record("traceparent", tracing::field::display(t));
                #[cfg(feature = "opentelemetry")]
                crate::otel::set_parent(&span, t);
            }
        }
        (traceparent, span)
    }

    /// Dead-letters a job's event: a single-event message as it is, an event of a batch as a
    /// single-event message of its record's headers and payload, with `Bus-Dlq-Batch-Index`.
    /// [`Outcome::Returned`] if the letter could not be stored.
    ///
    /// Boxed: storing a letter is the rare path, and its future (a JetStream publish) is as
    /// large as the whole handler call's; held inline it would double the size of every job's
    /// future, copied as the job moves into its worker.
    pub(crate) fn dead_letter_job<'a>(
        &'a self,
        job: &'a Job,
        reason: &'a DeadLetterReason,
        error: &'a str,
        attempts: u32,
    ) -> futures::future::BoxFuture<'a, Outcome> {
        Box::pin(self.dead_letter_job_inline(job, reason, error, attempts))
    }

    async fn dead_letter_job_inline(
        &self,
        job: &Job,
        reason: &DeadLetterReason,
        error: &str,
        attempts: u32,
    ) -> Outcome {
        let stored = match job {
            Job::Single(single) => {
                self.dead_letter(&single.message, reason, error, attempts)
                    .await
            }
            Job::Record(progress, index) => {
                let record = progress.spans[*index]
                    .record(&progress.message.payload)
                    .expect("a batch's spans are of its own payload");
                let mut headers = HeaderMap::new();
                for (name, value) in record.headers() {
                    headers.append(name, value);
                }
                let letter = Letter {
                    headers,
                    payload: record.payload().clone(),
                    reply: progress.message.reply.as_deref(),
                    index: Some(*index),
                };
                self.store_dead_letter(letter, reason, error, attempts)
                    .await
            }
        };
        if stored {
            Outcome::DeadLettered
        } else {
            Outcome::Returned
        }
    }

    /// Stores the message in the dead-letter stream with why it failed (settling it then
    /// terminates the original, so the broker never redelivers it). If the dead letter cannot
    /// be stored, the original is left unacknowledged rather than lost.
    async fn dead_letter(
        &self,
        message: &async_nats::Message,
        reason: &DeadLetterReason,
        error: &str,
        attempts: u32,
    ) -> bool {
        // The original's headers, less the pin ID the broker added on delivery.
        let mut headers = HeaderMap::new();
        for (name, value) in header_pairs(message.headers.as_ref()) {
            if !name.eq_ignore_ascii_case("Nats-Pin-Id") {
                headers.append(name, value);
            }
        }
        let letter = Letter {
            headers,
            payload: message.payload.clone(),
            reply: message.reply.as_deref(),
            index: None,
        };
        self.store_dead_letter(letter, reason, error, attempts)
            .await
    }

    async fn store_dead_letter(
        &self,
        letter: Letter<'_>,
        reason: &DeadLetterReason,
        error: &str,
        attempts: u32,
    ) -> bool {
        let Letter {
            headers,
            payload: original,
            reply,
            index,
        } = letter;
        let info = reply.and_then(ack_info);
        let about = LetterHeaders {
            reason: reason.clone(),
            error: error.to_owned(),
            attempts,
            topic: Some(self.topic.clone()),
            stream_sequence: info.map(|i| i.stream_sequence),
            delivered: info.map(|i| i.delivered),
            batch_index: index.map(|i| i as u32),
            ..LetterHeaders::default()
        };
        let index_suffix = index.map(|i| format!("-{i}")).unwrap_or_default();
        let msg_id =
            info.map(|info| format!("dlq-{}-{}{index_suffix}", self.topic, info.stream_sequence));
        tracing::warn!(topic = %self.topic, %reason, %error, ?info, "dead-lettering message");
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=5 {
            let stored = self
                .letters
                .store(headers.clone(), &about, msg_id.clone(), original.clone())
                .await;
            match stored {
                Ok(()) => {
                    self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    self.metrics.dead_lettered.increment(1);
                    self.metrics.dead_letter(reason.as_str());
                    return true;
                }
                Err(e) => {
                    tracing::error!(topic = %self.topic, attempt, error = %e, "dead letter could not be stored");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        tracing::error!(topic = %self.topic, "giving up on storing the dead letter; the message stays unacknowledged and will be delivered again");
        false
    }
}

/// A dead letter to store: the original's headers (to which the dead-letter headers are
/// added) and payload, its ack subject (where it sits in the stream) and its index in its
/// batch.
struct Letter<'a> {
    headers: HeaderMap,
    payload: bytes::Bytes,
    reply: Option<&'a str>,
    index: Option<usize>,
}
