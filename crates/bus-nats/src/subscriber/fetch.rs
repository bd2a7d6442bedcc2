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

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::Subject;
use futures::{FutureExt, StreamExt};
use keyed_pool::KeyedPool;
use tokio::sync::{mpsc, watch};

use super::epoch::{on_reply, Break, End, FetchPlan, MoveTo, Progress, BURST};
use super::job::{submit, Request, Work};
use super::ownership::{Ownership, Wait};
use super::recovery::Start;
use crate::NatsError;

/// How long one attempt to restart delivery may take before it is tried again.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

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
            let end = match self.epoch(start).await? {
                // A break found after the claim ran out (a stopped process that runs again)
                // is not this subscription's to repair: restarting delivery would move the
                // consumer under the owner that took over.
                End::Discontinuity { why, .. }
                    if !self.plan.runner.validity.holds(std::time::Instant::now()) =>
                {
                    End::Lost(format!(
                        "delivery broke ({why}) after this subscription's claim ran out"
                    ))
                }
                end => end,
            };
            match end {
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
        // Until enough have arrived to tell, messages are taken for full default batches, so the
        // first requests hold about `batch` events whatever the publishers do.
        let mut pull = (plan.batch / crate::DEFAULT_BATCH_MAX_EVENTS).max(1);
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
                Some(move_to) = self.moves.recv(), if !stopping => {
                    // One its requester gave up waiting for (a partition's move queued while it
                    // was being handed over here, see `NatsControl::move_to`) is not applied.
                    if move_to.done.is_closed() {
                        tracing::info!(topic = %plan.topic, sequence = move_to.sequence, "a move its requester withdrew is not applied");
                    } else {
                        break End::Moved(move_to);
                    }
                }
                Some(request) = self.control.recv(), if !stopping => {
                    // Routed like the aggregate's messages: it runs after what is queued before it.
                    let key = request.key.clone();
                    if submit(&self.pool, key.as_bytes(), Work::Operator(request)).await.is_err() {
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
