//! What an ack or a failure settles: receipts, the next batches of a lane (the next events of
//! its aggregate chains), and whether a failed batch is sent again.

use super::*;

pub(super) struct Settler<'a> {
    pub(super) state: &'a State,
    pub(super) shared: &'a Arc<Shared>,
}

impl Settler<'_> {
    pub(super) async fn transmit(&self, flight: Flight) -> Result<(), (Flight, PublishError)> {
        let route = self
            .state
            .routes
            .read()
            .unwrap()
            .get(flight.topic())
            .cloned();
        match route {
            Some(route) => transmit(self.state, &route, flight).await,
            None => {
                let error = PublishError::new(
                    PublishErrorKind::Connection,
                    format!("no connection for topic `{}`", flight.topic()),
                );
                Err((flight, error))
            }
        }
    }

    /// Settles acks and failures; what they start (the next publish of a chain, the next
    /// batches of a lane) may fail at once, and is settled in turn.
    pub(super) async fn settle(&self, mut work: Vec<(AckResult, Flight)>, timers: &mut Timers) {
        while let Some((result, flight)) = work.pop() {
            for next in self.decide(result, flight, timers) {
                if let Err((flight, error)) = self.transmit(next).await {
                    work.push((Err(error), flight));
                }
            }
        }
    }

    /// What to send now that `flight` is settled; resends and lingers go to `timers`.
    pub(super) fn decide(
        &self,
        result: AckResult,
        flight: Flight,
        timers: &mut Timers,
    ) -> Vec<Flight> {
        match flight {
            Flight::Raw(message) => {
                // Raw publishes belong to no chain and are sent once.
                let outcome = result.map(|(sequence, duplicate)| Published {
                    topic: message.topic.clone(),
                    sequence: Some(sequence),
                    duplicate,
                });
                if let Err(error) = &outcome {
                    tracing::warn!(topic = %message.topic, %error, "raw publish failed");
                }
                finish(message, outcome, self.state, self.shared);
                Vec::new()
            }
            Flight::Batch(batch) => self.decide_batch(result, batch, timers),
        }
    }

    pub(super) fn decide_batch(
        &self,
        result: AckResult,
        batch: Batch,
        timers: &mut Timers,
    ) -> Vec<Flight> {
        let (state, shared) = (self.state, self.shared);
        let topic = batch.topic.clone();
        let chained = batch.messages.iter().any(|m| m.chain.is_some());
        match result {
            Ok((sequence, duplicate)) => {
                let Batch {
                    lane,
                    number,
                    messages,
                    ..
                } = batch;
                lane.state.lock().unwrap().settled(
                    number,
                    messages.iter().filter_map(|m| m.chain),
                    false,
                );
                let now = Instant::now();
                let mut back = GiveBack::with_capacity(messages.len());
                for message in messages {
                    let published = Published {
                        topic: topic.clone(),
                        sequence: Some(sequence),
                        duplicate,
                    };
                    finish_at(message, Ok(published), state, shared, now, &mut back);
                }
                back.give(state);
                self.next_batches(&topic, &lane, timers)
            }
            Err(error) => {
                if let Some(delay) = self.retry_after(&error, chained, batch.first_sent) {
                    // The same bytes again, with the same Nats-Msg-Id, before any later event
                    // of its aggregates: a batch that was in fact stored is a duplicate.
                    let events = batch.messages.len() as u64;
                    tracing::debug!(%topic, %error, ?delay, events, "batch publish failed; retrying before the aggregates' later events");
                    state.retries.fetch_add(events, Ordering::Relaxed);
                    if let Some(first) = batch.messages.first() {
                        first.metrics.retries.increment(events);
                    }
                    timers.push(Box::pin(async move {
                        tokio::time::sleep(delay).await;
                        Timer::Resend(Box::new(Flight::Batch(batch)))
                    }));
                    return Vec::new();
                }
                tracing::warn!(%topic, %error, events = batch.messages.len(), "batch publish failed");
                let Batch {
                    lane,
                    number,
                    messages,
                    ..
                } = batch;
                let aborted = lane.state.lock().unwrap().settled(
                    number,
                    messages.iter().filter_map(|m| m.chain),
                    true,
                );
                let reason = error.to_string();
                for message in messages {
                    finish(
                        message,
                        Err(PublishError::new(error.kind(), reason.clone())),
                        state,
                        shared,
                    );
                }
                self.abort(&topic, &reason, aborted);
                self.next_batches(&topic, &lane, timers)
            }
        }
    }

    /// Whether a failed flight is sent again, and after how long: a transient failure of
    /// chained publishes (their aggregates' later events wait behind them) within
    /// `publish_retry_for` of their first send. The one retry decision, batched or not.
    fn retry_after(
        &self,
        error: &PublishError,
        chained: bool,
        first_sent: Option<Instant>,
    ) -> Option<Duration> {
        let elapsed = first_sent.map_or(Duration::ZERO, |t| t.elapsed());
        (chained && is_transient(error) && elapsed < self.shared.config.publish_retry_for)
            .then(|| retry_delay(elapsed))
    }

    /// Fails the publishes that waited behind one that failed for good: an aggregate's later
    /// events must not be stored after a gap.
    fn abort(&self, topic: &Topic, reason: &str, later: impl IntoIterator<Item = Message>) {
        for message in later {
            let error = PublishError::new(
                PublishErrorKind::Aborted,
                format!("not sent: an earlier event of its aggregate on topic `{topic}` failed ({reason})"),
            );
            finish(message, Err(error), self.state, self.shared);
        }
    }

    /// The batches a lane can send now; if what is pending lingers, a timer for it.
    pub(super) fn next_batches(
        &self,
        topic: &Topic,
        lane: &Arc<Lane>,
        timers: &mut Timers,
    ) -> Vec<Flight> {
        let limits = &lane.limits;
        let mut flights = Vec::new();
        let mut st = lane.state.lock().unwrap();
        let now = Instant::now();
        while st.ready(limits, now) {
            let Some((number, messages)) = st.cut(limits) else {
                break;
            };
            flights.push(Flight::Batch(Batch {
                topic: topic.clone(),
                lane: lane.clone(),
                number,
                messages,
                body: None,
                first_sent: None,
                sends: 0,
            }));
        }
        if !limits.linger.is_zero()
            && !st.lingering
            && st.in_flight < limits.partial_in_flight()
            && !st.nothing_pending()
        {
            st.lingering = true;
            let deadline = st.oldest().map_or(now, |m| m.created) + limits.linger;
            let (topic, lane) = (topic.clone(), lane.clone());
            timers.push(Box::pin(async move {
                tokio::time::sleep_until(deadline.into()).await;
                Timer::Linger(topic, lane)
            }));
        }
        flights
    }
}

/// Backoff before sending a transiently failed publish again, growing with how long it has
/// been failing.
pub(super) fn retry_delay(elapsed: Duration) -> Duration {
    (RETRY_FIRST_DELAY * 2u32.pow((elapsed.as_millis() / 500).min(5) as u32)).min(RETRY_MAX_DELAY)
}

pub(super) fn is_transient(error: &PublishError) -> bool {
    matches!(
        error.kind(),
        PublishErrorKind::TimedOut | PublishErrorKind::Connection
    )
}

pub(super) const RETRY_FIRST_DELAY: Duration = Duration::from_millis(50);
/// At most this long between two sends of a publish failing for a transient reason: an
/// election or a restart is noticed this soon after it ends.
pub(super) const RETRY_MAX_DELAY: Duration = Duration::from_millis(500);

/// Resolves a receipt and tells failures to `flush` and the failure callback.
pub(super) fn finish(
    message: Message,
    outcome: Result<Published, PublishError>,
    state: &State,
    shared: &Shared,
) {
    let mut back = GiveBack::with_capacity(1);
    finish_at(message, outcome, state, shared, Instant::now(), &mut back);
    back.give(state);
}

/// What publishes settled together give back at once ([`GiveBack::give`]): their places in
/// the in-flight window (one release, a lock of the semaphore's waiters, instead of one per
/// event), their count off `outstanding` (one atomic update, and `flush` woken once nothing is
/// left), and their allocations to the spares (one lock).
pub(super) struct GiveBack {
    window: Option<OwnedSemaphorePermit>,
    settled: u64,
    spares: Vec<Arc<Publish>>,
}

impl GiveBack {
    pub(super) fn with_capacity(publishes: usize) -> Self {
        Self {
            window: None,
            settled: 0,
            spares: Vec::with_capacity(publishes),
        }
    }

    /// Gives back what the publishes settled since it was made hold. Their receipts are
    /// resolved already, so `flush` finds every one settled when it is woken.
    pub(super) fn give(self, state: &State) {
        drop(self.window);
        if self.settled > 0
            && state.outstanding.fetch_sub(self.settled, Ordering::AcqRel) == self.settled
        {
            state.idle.notify_waiters();
        }
        state.spares.keep_all(self.spares);
    }
}

/// [`finish`], with the time it settled read once for a whole batch, and what the publish
/// gives back added to `back`.
pub(super) fn finish_at(
    message: Message,
    outcome: Result<Published, PublishError>,
    state: &State,
    shared: &Shared,
    now: Instant,
    back: &mut GiveBack,
) {
    let metrics = &message.metrics;
    metrics.seconds.record(Seconds {
        from: message.created,
        to: Some(now),
    });
    match &outcome {
        Ok(published) if published.duplicate => metrics.duplicate.increment(1),
        Ok(_) => metrics.stored.increment(1),
        Err(_) => metrics.failed.increment(1),
    }
    // Stored, and its span records nothing: taken apart and resolved under one lock of what
    // it holds rather than two (the span and the failure callback need nothing of it).
    if outcome.is_ok() && !message.traced {
        let permit = message.resolve_untraced(outcome);
        give_back(message, permit, back);
        return;
    }
    let (envelope, span, permit) = {
        let mut held = message.held();
        (held.envelope.take(), held.span.take(), held.permit.take())
    };
    if let Some(span) = span.as_ref().filter(|s| !s.is_disabled()) {
        match &outcome {
            Ok(published) => {
                span.record(
                    "outcome",
                    if published.duplicate {
                        "duplicate"
                    } else {
                        "stored"
                    },
                );
                if let Some(sequence) = published.sequence {
                    span.record("sequence", sequence);
                }
            }
            Err(error) => {
                span.record("outcome", "failed");
                span.in_scope(|| tracing::debug!(%error, "publish failed"));
            }
        }
    }
    if let Err(error) = &outcome {
        if let Some(callback) = &shared.config.on_publish_error {
            callback(&PublishFailure {
                topic: message.topic.clone(),
                envelope,
                error: PublishError::new(error.kind(), error.to_string()),
            });
        }
        let mut first = state.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(PublishError::new(error.kind(), error.to_string()));
        }
    }
    // The span closes now, settled, whatever the receipt does.
    drop(span);
    message.resolve(outcome);
    give_back(message, permit, back);
}

/// What a settled publish gives back, added to `back`.
fn give_back(message: Message, permit: Option<OwnedSemaphorePermit>, back: &mut GiveBack) {
    back.settled += 1;
    match (&mut back.window, permit) {
        (Some(window), Some(permit)) => window.merge(permit),
        (None, permit) => back.window = permit,
        (Some(_), None) => {}
    }
    // Settled: dropping the message does nothing more than let go of the publish.
    let publish = message.0.clone();
    drop(message);
    back.spares.push(publish);
}
