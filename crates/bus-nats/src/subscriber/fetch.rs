//! The topic's single fetcher: pull requests in stream order, each message to its key's worker.
//!
//! The fetcher runs in *epochs*. An epoch starts when delivery (re)starts at a known consumer
//! sequence, with a fresh inbox for its pull requests, and it dispatches only a contiguous run
//! of deliveries: each one must carry the consumer sequence after the one before. Anything that
//! breaks that (a re-connection, a jump in the consumer sequence, a consumer-leader change, pull
//! requests the broker forgot) ends the epoch at once, before anything after the break reaches
//! a worker; the next epoch restarts delivery at the ack floor + 1 ([`super::recovery`]). The
//! old inbox is dropped, so what the broker still sends on old requests is never handled.
//! Messages already dispatched keep running: a redelivered copy of one of them is recognised
//! ([`super::copies`]), and every message after the break comes again, in order, behind them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Subject;
use bus_core::{wire, Topic};
use futures::{FutureExt, StreamExt};
use keyed_pool::KeyedPool;
use tokio::sync::{mpsc, watch};

use super::acker::Acker;
use super::copies::{ack_info, Copies, Seen};
use super::ownership::{Ownership, Wait};
use super::recovery::{Restarter, Start};
use super::runner::{
    prepare, prepare_record, Arrival, BatchProgress, Counters, Job, Origin, Request, Runner, Work,
};
use super::Dispatch;
use crate::broker::{self, PullEnd};
use crate::NatsError;

/// How long one attempt to restart delivery may take before it is tried again.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

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
enum End {
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
enum Break {
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

/// What the fetcher hands back when it stops: the pool to drain, and the claim to release once
/// the pool is drained and the acks are out.
pub(crate) type Stopped = (KeyedPool<Work>, Ownership);

struct Fetcher {
    plan: FetchPlan,
    pool: KeyedPool<Work>,
    stop: watch::Receiver<bool>,
    control: mpsc::UnboundedReceiver<Request>,
    moves: mpsc::UnboundedReceiver<MoveTo>,
    /// Where pull requests go.
    next_subject: async_nats::Subject,
    ownership: Ownership,
}

/// Runs the topic's fetcher until `stop` changes: waits to own the topic, then runs epochs,
/// restarting delivery after every discontinuity and waiting again after losing the topic.
/// On stop it sends no new request and returns once every outstanding request is complete or
/// expired, so no message is left delivered-but-unseen.
pub(crate) async fn fetch(
    plan: FetchPlan,
    pool: KeyedPool<Work>,
    stop: watch::Receiver<bool>,
    control: mpsc::UnboundedReceiver<Request>,
    moves: mpsc::UnboundedReceiver<MoveTo>,
    ownership: Ownership,
) -> Result<Stopped, NatsError> {
    let mut fetcher = Fetcher {
        plan,
        pool,
        stop,
        control,
        moves,
        next_subject: ownership.next_subject().into(),
        ownership,
    };
    fetcher.run().await?;
    Ok((fetcher.pool, fetcher.ownership))
}

impl Fetcher {
    async fn run(&mut self) -> Result<(), NatsError> {
        let mut next: Option<Start> = None;
        loop {
            let start = match next.take() {
                Some(start) => start,
                None => {
                    if !self.ownership.is_held() {
                        let mut reconnects = self.plan.reconnects.clone();
                        match self.ownership.wait(&mut self.stop, &mut reconnects).await? {
                            Wait::Gained => {}
                            Wait::Stopped => return Ok(()),
                        }
                    }
                    self.plan
                        .counters
                        .gained
                        .store(self.ownership.gained, Ordering::Relaxed);
                    self.plan.counters.owner.store(1, Ordering::Relaxed);
                    let restarter = self.plan.restarter.clone();
                    match self
                        .retrying("starting delivery", || restarter.start_on_gain())
                        .await
                    {
                        Some(start) => start,
                        None => return Ok(()),
                    }
                }
            };
            match self.epoch(start).await? {
                End::Stopped => return Ok(()),
                End::Discontinuity { why, seen_up_to } => {
                    tracing::warn!(topic = %self.plan.topic, subject = %self.plan.restarter.subject, %why, "delivery is no longer contiguous; restarting it at the ack floor");
                    let restarter = self.plan.restarter.clone();
                    let counters = self.plan.counters.clone();
                    next = self
                        .retrying("restarting delivery", || {
                            let restarter = restarter.clone();
                            let counters = counters.clone();
                            async move {
                                // Best effort: if the stream cannot be read now (an election),
                                // restart anyway; an unreadable message would drop the
                                // connection again and be found on the next restart.
                                match restarter.remove_unreadable(seen_up_to).await {
                                    Ok(removed) => {
                                        counters.unreadable.fetch_add(removed, Ordering::Relaxed);
                                        counters.dead_lettered.fetch_add(removed, Ordering::Relaxed);
                                    }
                                    Err(error) => tracing::warn!(topic = %restarter.topic, %error, "looking for unreadable messages failed; restarting delivery without"),
                                }
                                restarter.restart_at(None).await
                            }
                        })
                        .await;
                    if next.is_none() {
                        return Ok(());
                    }
                    // Counted once delivery runs again: a discontinuity during the restart is
                    // covered by it.
                    self.plan.counters.restarts.fetch_add(1, Ordering::Relaxed);
                }
                End::Moved(MoveTo { sequence, done }) => {
                    tracing::info!(topic = %self.plan.topic, subject = %self.plan.restarter.subject, sequence, "an operator moved delivery; restarting it there");
                    // As after losing the topic, but keeping it: running handlers finish, what
                    // is queued is released unhandled, nothing of this term is acknowledged.
                    if !self.abandon().await {
                        let _ = done.send(Err(NatsError::Closed(
                            "the subscription closed before delivery was moved".into(),
                        )));
                        return Ok(());
                    }
                    self.plan.copies.lock().unwrap().forget_settled();
                    let restarter = self.plan.restarter.clone();
                    next = self
                        .retrying("moving delivery", || {
                            let restarter = restarter.clone();
                            async move { restarter.restart_at(Some(sequence)).await }
                        })
                        .await;
                    let Some(_) = next else {
                        let _ = done.send(Err(NatsError::Closed(
                            "the subscription closed before delivery was moved".into(),
                        )));
                        return Ok(());
                    };
                    self.plan.counters.moves.fetch_add(1, Ordering::Relaxed);
                    let _ = done.send(Ok(()));
                }
                End::Lost(why) => {
                    tracing::warn!(topic = %self.plan.topic, %why, "this subscription lost the topic; waiting as a standby");
                    self.plan.counters.lost.fetch_add(1, Ordering::Relaxed);
                    self.plan.counters.owner.store(0, Ordering::Relaxed);
                    self.ownership.forget();
                    if !self.abandon().await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Runs `attempt` until it succeeds, backing off, unless close is asked for (`None`). A
    /// failed attempt is followed by a check that the consumer exists.
    async fn retrying<T, F, Fut>(&mut self, what: &str, mut attempt: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, NatsError>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut failures = 0u32;
        loop {
            if *self.stop.borrow() {
                return None;
            }
            // A request to a stream or consumer without a leader waits for the client's whole
            // request timeout; an election is over sooner, so attempts are cut short.
            match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt()).await {
                Ok(Ok(value)) => return Some(value),
                Ok(Err(error)) => {
                    tracing::warn!(topic = %self.plan.topic, %error, ?delay, "{what} failed; trying again");
                }
                Err(_) => {
                    tracing::warn!(topic = %self.plan.topic, ?delay, "{what} took over {ATTEMPT_TIMEOUT:?}; trying again");
                }
            }
            tokio::select! {
                _ = self.stop.changed() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_millis(250));
            failures += 1;
            // A consumer that is gone (deleted, lost with a memory store) answers nothing; check
            // now and then rather than after every failure, which is usually an election.
            if !failures.is_multiple_of(3) {
                continue;
            }
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.plan.restarter.ensure_consumer()).await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(topic = %self.plan.topic, %error, "the consumer could not be checked")
                }
                Err(_) => {
                    tracing::warn!(topic = %self.plan.topic, "checking the consumer took over {ATTEMPT_TIMEOUT:?}")
                }
            }
        }
    }

    /// After losing the topic: what was queued is not handled (its term is over), halted
    /// aggregates are given up, and the handlers still running finish before this subscription
    /// may become the owner again. `false` if close was asked for meanwhile.
    async fn abandon(&mut self) -> bool {
        let runner = &self.plan.runner;
        runner
            .term
            .store(super::runner::next_term(), Ordering::Release);
        // Handlers still running learn that their outcome will not be acknowledged; those of
        // a later term get a fresh signal.
        runner.cancel.cancel();
        runner.drop_halts();
        // Their acks are the new owner's business now: none is sent any more.
        self.plan.copies.lock().unwrap().abandon();
        let drained = self.plan.copies.lock().unwrap().drained();
        loop {
            let notified = drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.plan.copies.lock().unwrap().unacked.pending() == 0 {
                return true;
            }
            tokio::select! {
                _ = self.stop.changed() => return false,
                _ = notified => {}
            }
        }
    }

    fn pull_request(&self, size: usize) -> bytes::Bytes {
        let mut request = serde_json::Map::new();
        request.insert("batch".into(), size.into());
        request.insert(
            "expires".into(),
            (self.plan.expires.as_nanos() as u64).into(),
        );
        self.ownership.pull_fields(&mut request);
        bytes::Bytes::from(serde_json::to_vec(&request).expect("pull request serialises"))
    }

    /// One contiguous run of deliveries.
    async fn epoch(&mut self, start: Start) -> Result<End, NatsError> {
        let plan = &self.plan;
        // A re-connection from here on may lose what this epoch asks for.
        let mut reconnects = plan.reconnects.clone();
        reconnects.mark_unchanged();
        let inbox = Subject::from(plan.client.new_inbox());
        let mut replies = plan.client.subscribe(inbox.clone()).await.map_err(|e| {
            NatsError::api(
                format!("subscribing to the pull inbox of topic `{}`", plan.topic),
                e,
            )
        })?;
        // Messages per pull request: `batch` events' worth, as record batches hold several.
        let mut pull = (plan.batch / 10).max(1);
        let mut request = self.pull_request(pull);
        let term = plan.runner.term.load(Ordering::Acquire);
        let mut next_delivery = start.next_delivery;
        let mut seen_up_to = start.seen_up_to;
        // Messages asked for and neither delivered nor expired yet.
        let mut credit: usize = 0;
        let mut stopping = *self.stop.borrow();
        let mut last_reply = Instant::now();
        // A request the broker forgot (a restart, a consumer-leader change) never answers.
        let forget_after = plan.expires + Duration::from_secs(1);
        let mut watchdog = tokio::time::interval(plan.expires.max(Duration::from_millis(50)));
        let mut events_per_message = (0u64, 0u64);
        // The events not acknowledged yet bound what is asked for (see `Copies::room`).
        let room = plan.copies.lock().unwrap().room();
        let end = loop {
            let full = room.is_full();
            if !stopping && credit < pull && !full {
                let (events, messages) = events_per_message;
                if messages >= 16 {
                    let size = ((plan.batch as u64 * messages) / events.max(1))
                        .clamp(1, plan.batch as u64) as usize;
                    if size != pull {
                        pull = size;
                        request = self.pull_request(pull);
                    }
                }
                match plan
                    .client
                    .publish_with_reply(self.next_subject.clone(), inbox.clone(), request.clone())
                    .await
                {
                    Ok(()) => credit += pull,
                    Err(e) => {
                        tracing::warn!(topic = %plan.topic, error = %e, "pull request not sent")
                    }
                }
                last_reply = Instant::now();
            }
            if stopping && credit == 0 {
                break End::Stopped;
            }
            tokio::select! {
                biased;
                // Any change, or the sender going away, means stop.
                _ = self.stop.changed(), if !stopping => stopping = true,
                _ = reconnects.changed() => {
                    break if stopping { End::Stopped } else {
                        End::Discontinuity { why: Break::Reconnected, seen_up_to }
                    };
                }
                why = self.ownership.lost() => {
                    break if stopping { End::Stopped } else { End::Lost(why) };
                }
                message = replies.next() => {
                    let Some(message) = message else {
                        break End::Discontinuity { why: Break::InboxClosed, seen_up_to };
                    };
                    last_reply = Instant::now();
                    let mut st = Progress { credit, next_delivery, seen_up_to, stopping, events_per_message };
                    let mut outcome = on_reply(plan, &self.pool, term, &mut st, message).await;
                    // The rest of what has arrived, without another turn of the select: its other
                    // branches cost a few wake-up registrations each turn.
                    let mut burst = 0;
                    while outcome.is_none() && burst < BURST {
                        match replies.next().now_or_never() {
                            Some(Some(message)) => {
                                outcome = on_reply(plan, &self.pool, term, &mut st, message).await;
                                burst += 1;
                            }
                            Some(None) => {
                                outcome = Some(End::Discontinuity { why: Break::InboxClosed, seen_up_to: st.seen_up_to });
                            }
                            None => break,
                        }
                    }
                    Progress { credit, next_delivery, seen_up_to, stopping, events_per_message, .. } = st;
                    if let Some(end) = outcome {
                        break end;
                    }
                }
                Some(move_to) = self.moves.recv(), if !stopping => break End::Moved(move_to),
                Some(request) = self.control.recv(), if !stopping => {
                    // Routed like the aggregate's messages: it runs after what is queued before it.
                    let key = request.key.clone();
                    if self.pool.submit(&key, Work::Operator(request)).await.is_err() {
                        break End::Stopped;
                    }
                }
                _ = room.freed(), if full && !stopping => {}
                _ = watchdog.tick() => {
                    if credit > 0 && last_reply.elapsed() > forget_after {
                        if stopping {
                            break End::Stopped;
                        }
                        break End::Discontinuity {
                            why: Break::Unanswered(forget_after),
                            seen_up_to,
                        };
                    }
                }
            }
        };
        let _ = replies.unsubscribe().await;
        Ok(end)
    }
}

/// How many replies the fetcher takes in one turn of its select.
const BURST: usize = 256;

/// Where an epoch's deliveries stand.
struct Progress {
    /// Messages asked for and neither delivered nor expired yet.
    credit: usize,
    /// The consumer sequence the next delivery must carry.
    next_delivery: u64,
    /// The highest stream sequence received.
    seen_up_to: u64,
    stopping: bool,
    /// Events and messages received (a record batch is one message of several events).
    events_per_message: (u64, u64),
}

impl Progress {
    /// The one place a discontinuity ends an epoch: unless close was asked for (then it just
    /// stops), delivery restarts at the ack floor + 1.
    fn broken(&self, why: Break) -> Option<End> {
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
async fn on_reply(
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
            let batch = message
                .headers
                .as_ref()
                .and_then(|h| h.get(wire::BATCH))
                .map(|v| wire::decode_batch(v.as_str(), &message.payload));
            let (key, input) = match batch {
                Some(Ok(records)) => {
                    st.events_per_message.0 += records.len() as u64;
                    st.events_per_message.1 += 1;
                    return dispatch_batch(plan, pool, term, sequence, message, records, arrival)
                        .await;
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
            plan.copies.lock().unwrap().link(sequence, [&*key], 1);
            let job = Box::new(Job {
                key: key.clone(),
                sequence: Some(sequence),
                origin: Origin::Single(message),
                input,
                term,
                arrival,
            });
            if pool.submit(&key, Work::Message(job)).await.is_err() {
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

/// Dispatches the events of a record batch, each to its key's worker, in record order. Events
/// settled before the batch was last released in this subscription (handled or dead-lettered)
/// are not handed to the handler again.
async fn dispatch_batch(
    plan: &FetchPlan,
    pool: &KeyedPool<Work>,
    term: u64,
    sequence: u64,
    message: async_nats::Message,
    records: Vec<wire::Record>,
    arrival: Arrival,
) -> Option<End> {
    let first = records
        .first()
        .map(|r| r.header_block().clone())
        .unwrap_or_default();
    let before = plan.copies.lock().unwrap().take_partial(sequence, &first);
    let done: Vec<AtomicBool> = (0..records.len())
        .map(|i| AtomicBool::new(before.as_ref().is_some_and(|d| d.get(i) == Some(&true))))
        .collect();
    let to_run: Vec<usize> = (0..records.len())
        .filter(|i| !done[*i].load(Ordering::Relaxed))
        .collect();
    let skipped = records.len() - to_run.len();
    if skipped > 0 {
        plan.counters
            .copies_skipped
            .fetch_add(skipped as u64, Ordering::Relaxed);
        tracing::debug!(topic = %plan.topic, sequence, skipped, "record batch delivered again; its settled events are not handled again");
    }
    let progress = Arc::new(BatchProgress {
        message,
        records,
        // One more than the events to run, released below once all are dispatched: a worker
        // settling the last event before the others are dispatched must not ack the batch.
        remaining: AtomicUsize::new(to_run.len() + 1),
        done,
    });
    // Every event's aggregate is known before any of them can settle, those settled before
    // included: the batch holds them until it is acknowledged.
    let mut keys = Vec::new();
    if skipped > 0 {
        keys.extend(
            (0..progress.records.len())
                .filter(|i| progress.done[*i].load(Ordering::Relaxed))
                .map(|index| {
                    prepare_record(
                        &plan.topic,
                        &plan.dispatch,
                        progress.message.subject.as_str(),
                        &progress.records[index],
                    )
                    .0
                }),
        );
    }
    let jobs: Vec<(Arc<str>, Box<Job>)> = to_run
        .iter()
        .map(|&index| {
            let (key, input) = prepare_record(
                &plan.topic,
                &plan.dispatch,
                progress.message.subject.as_str(),
                &progress.records[index],
            );
            let job = Box::new(Job {
                key: key.clone(),
                sequence: Some(sequence),
                origin: Origin::Batch(progress.clone(), index),
                input,
                term,
                arrival,
            });
            (key, job)
        })
        .collect();
    plan.copies.lock().unwrap().link(
        sequence,
        keys.iter()
            .chain(jobs.iter().map(|(key, _)| key))
            .map(|key| &**key),
        progress.records.len(),
    );
    let mut stopped = None;
    let mut dispatched = 0;
    for (key, job) in jobs {
        if pool.submit(&key, Work::Message(job)).await.is_err() {
            stopped = Some(End::Stopped);
            break;
        }
        dispatched += 1;
    }
    // The events never dispatched (the pool stopped) and the guard.
    plan.runner
        .settle_records(&progress, Some(sequence), to_run.len() - dispatched + 1);
    stopped
}
