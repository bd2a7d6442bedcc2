//! The consuming side: one fetcher per topic feeding a keyed pool.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Subject};
use async_trait::async_trait;
use bus_core::{
    run_with_retry, wire, AggregateControl, CloseReport, Envelope, FailurePolicy, HaltedAggregate,
    Handler, RawHandler, RawKey, RawMessage, RetryOutcome, SubscribeError, SubscribeErrorKind,
    Subscription, SubscriptionHandle, SubscriptionMetrics, Topic,
};
use futures::StreamExt;
use keyed_pool::KeyedPool;
use tokio::sync::{mpsc, watch};

use crate::{provision, NatsError, Shared, StreamSpec};

/// The handler a subscription delivers to.
#[derive(Clone)]
pub(crate) enum Dispatch {
    Envelope(Arc<dyn Handler>),
    Raw(Arc<dyn RawHandler>, RawKey),
}

enum Input {
    Envelope(Envelope),
    Raw(RawMessage),
}

impl Input {
    fn clone_for_attempt(&self) -> Input {
        match self {
            Input::Envelope(e) => Input::Envelope(e.clone()),
            Input::Raw(m) => Input::Raw(m.clone()),
        }
    }
}

struct Job {
    /// The ordering key (aggregate ID) the pool routed it by.
    key: String,
    /// The message's stream sequence, if its ack subject could be read.
    sequence: Option<u64>,
    message: async_nats::Message,
    /// The message ready for the handler, or why it cannot be handled.
    input: Result<Input, (&'static str, String)>,
}

impl Job {
    fn event_version(&self) -> Option<u64> {
        match &self.input {
            Ok(Input::Envelope(e)) => Some(e.event_version()),
            _ => None,
        }
    }
}

/// What a worker is given.
enum Work {
    Message(Box<Job>),
    /// An operator resumes a halted aggregate, or skips its failed event.
    Resume {
        key: String,
        skip: bool,
    },
}

/// How a handler's final failure went.
struct Failure {
    reason: &'static str,
    error: String,
    attempts: u32,
}

/// A halted aggregate: its failed event first, then the events that arrived behind it.
struct Halt {
    jobs: VecDeque<Box<Job>>,
    since: std::time::SystemTime,
    failure: Failure,
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    dead_lettered: AtomicU64,
    copies_skipped: AtomicU64,
}

/// What the subscription knows of a stream position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    New,
    /// Being handled or queued: a redelivered copy must not reach the handler a second time.
    InFlight,
    /// Handled (acknowledged or dead-lettered) recently: a copy means the ack was lost.
    Finished,
}

/// Stream positions in flight and recently finished in this subscription, so that a copy the
/// broker redelivers (AckWait expiry, lost acks across a reconnect, a consumer reset) is
/// recognised instead of being handled twice, possibly after later events of its aggregate.
#[derive(Debug)]
pub(crate) struct Copies {
    /// Position → (ack subject, when it was dispatched).
    in_flight: HashMap<u64, (Option<Subject>, Instant), ahash::RandomState>,
    finished: HashSet<u64, ahash::RandomState>,
    finished_order: VecDeque<u64>,
    capacity: usize,
}

impl Copies {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            in_flight: HashMap::default(),
            finished: HashSet::default(),
            finished_order: VecDeque::new(),
            capacity,
        }
    }

    fn admit(&mut self, sequence: u64, reply: Option<Subject>) -> Seen {
        if self.in_flight.contains_key(&sequence) {
            Seen::InFlight
        } else if self.finished.contains(&sequence) {
            Seen::Finished
        } else {
            self.in_flight.insert(sequence, (reply, Instant::now()));
            Seen::New
        }
    }

    /// Ack subjects of the messages in flight for at least `age`.
    fn older_than(&self, age: Duration) -> Vec<Subject> {
        self.in_flight
            .values()
            .filter(|(_, since)| since.elapsed() >= age)
            .filter_map(|(reply, _)| reply.clone())
            .collect()
    }

    fn finish(&mut self, sequence: u64) {
        self.in_flight.remove(&sequence);
        if self.finished.insert(sequence) {
            self.finished_order.push_back(sequence);
            if self.finished_order.len() > self.capacity {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }

    #[cfg(test)]
    fn admit_for_test(&mut self, sequence: u64) -> Seen {
        self.admit(sequence, None)
    }

    fn release(&mut self, sequence: u64) {
        self.in_flight.remove(&sequence);
    }
}

/// Where a JetStream message sits: parsed from its ack subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckInfo {
    pub(crate) delivered: u64,
    pub(crate) stream_sequence: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` and the newer
/// form with domain and account hash (`$JS.ACK.<domain>.<hash>.<stream>...`, 12 tokens).
pub(crate) fn ack_info(reply: &str) -> Option<AckInfo> {
    // Runs once per message: count and pick tokens without collecting them.
    let offset = match reply.split('.').count() {
        9 => 4,
        n if n >= 11 => 6,
        _ => return None,
    };
    let mut tokens = reply.split('.').skip(offset);
    Some(AckInfo {
        delivered: tokens.next()?.parse().ok()?,
        stream_sequence: tokens.next()?.parse().ok()?,
    })
}

fn header_pairs(headers: Option<&HeaderMap>) -> impl Iterator<Item = (&str, &str)> {
    headers
        .into_iter()
        .flat_map(|h| h.iter())
        .flat_map(|(name, values)| values.iter().map(move |v| (name.as_ref(), v.as_str())))
}

/// The headers a dead letter carries besides the original message's own.
pub fn dead_letter_headers() -> [&'static str; 6] {
    [
        "Bus-Dlq-Reason",
        "Bus-Dlq-Error",
        "Bus-Dlq-Attempts",
        "Bus-Dlq-Topic",
        "Bus-Dlq-Stream-Seq",
        "Bus-Dlq-Delivered",
    ]
}

/// Acknowledgements waiting to be sent. Workers add to it; one task sends everything queued in
/// one burst, so the connection writes many acks per system call instead of one each.
#[derive(Debug, Default)]
pub(crate) struct AckQueue {
    pending: Mutex<Vec<Subject>>,
    wake: tokio::sync::Notify,
    /// Set on close: the sender sends what is queued and stops.
    closing: std::sync::atomic::AtomicBool,
}

impl AckQueue {
    fn push(&self, reply: Subject) {
        let was_empty = {
            let mut pending = self.pending.lock().unwrap();
            pending.push(reply);
            pending.len() == 1
        };
        if was_empty {
            // A stored permit if the sender is busy: no wake-up is lost.
            self.wake.notify_one();
        }
    }

    /// Sends every queued acknowledgement. `spare` is an empty vector swapped in for the queue,
    /// so neither side grows a vector from nothing for every burst.
    async fn send_all(&self, client: &async_nats::Client, topic: &Topic, spare: &mut Vec<Subject>) {
        std::mem::swap(&mut *self.pending.lock().unwrap(), spare);
        for reply in spare.drain(..) {
            if let Err(error) = client
                .publish(reply, bytes::Bytes::from_static(b"+ACK"))
                .await
            {
                tracing::warn!(%topic, %error, "acknowledgement could not be sent");
            }
        }
    }
}

async fn send_acks(client: async_nats::Client, acks: Arc<AckQueue>, topic: Topic) {
    let mut spare = Vec::new();
    loop {
        acks.wake.notified().await;
        // Let the workers that are ready run first: their acks join this burst, so the
        // connection writes them in one system call instead of a few each.
        tokio::task::yield_now().await;
        acks.send_all(&client, &topic, &mut spare).await;
        if acks.closing.load(Ordering::Acquire) {
            acks.send_all(&client, &topic, &mut spare).await;
            return;
        }
    }
}

struct Runner {
    acks: Arc<AckQueue>,
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    topic: Topic,
    dispatch: Dispatch,
    retry: bus_core::RetryPolicy,
    dead_letter_subject: String,
    counters: Arc<Counters>,
    copies: Arc<Mutex<Copies>>,
    policy: FailurePolicy,
    /// Halted aggregates by key; `halted_count` lets the hot path skip the lock while none is.
    halted: Mutex<HashMap<String, Halt>>,
    halted_count: AtomicUsize,
}

impl Runner {
    async fn ack(&self, reply: &Option<Subject>, kind: &'static [u8]) {
        if let Some(reply) = reply {
            if let Err(error) = self
                .client
                .publish(reply.clone(), bytes::Bytes::from_static(kind))
                .await
            {
                tracing::warn!(topic = %self.topic, %error, "acknowledgement could not be sent");
            }
        }
    }

    async fn run(&self, work: Work) {
        match work {
            Work::Message(job) => {
                if self.halted_count.load(Ordering::Acquire) > 0 {
                    let mut halted = self.halted.lock().unwrap();
                    if let Some(halt) = halted.get_mut(&job.key) {
                        // Behind the aggregate's failed event; still kept alive at the broker.
                        halt.jobs.push_back(job);
                        return;
                    }
                }
                if let Err((job, failure)) = self.process(job).await {
                    self.halt(job, failure, VecDeque::new());
                }
            }
            Work::Resume { key, skip } => self.resume(key, skip).await,
        }
    }

    fn settle_copies(&self, sequence: Option<u64>, finished: bool) {
        if let Some(sequence) = sequence {
            let mut copies = self.copies.lock().unwrap();
            if finished {
                copies.finish(sequence);
            } else {
                copies.release(sequence);
            }
        }
    }

    /// Handles one message to the end, unless its final failure halts its aggregate: then the
    /// job comes back, unacknowledged, with why it failed.
    async fn process(&self, job: Box<Job>) -> Result<(), (Box<Job>, Failure)> {
        let finished = match self.handle(&job).await {
            Ok(finished) => finished,
            Err(failure) => match self.policy {
                FailurePolicy::HaltAggregate => return Err((job, failure)),
                FailurePolicy::DeadLetter => {
                    self.dead_letter(
                        &job.message,
                        failure.reason,
                        &failure.error,
                        failure.attempts,
                    )
                    .await
                }
            },
        };
        self.settle_copies(job.sequence, finished);
        Ok(())
    }

    fn halt(&self, first: Box<Job>, failure: Failure, mut rest: VecDeque<Box<Job>>) {
        tracing::error!(
            topic = %self.topic,
            aggregate = %first.key,
            version = ?first.event_version(),
            stream_sequence = ?first.sequence,
            reason = failure.reason,
            error = %failure.error,
            attempts = failure.attempts,
            "aggregate halted: its later events wait until an operator resumes or skips it"
        );
        let key = first.key.clone();
        rest.push_front(first);
        let halt = Halt {
            jobs: rest,
            since: std::time::SystemTime::now(),
            failure,
        };
        let mut halted = self.halted.lock().unwrap();
        if halted.insert(key, halt).is_none() {
            self.halted_count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Runs in the aggregate's worker, after everything queued there before the request.
    async fn resume(&self, key: String, skip: bool) {
        let Some(halt) = self.halted.lock().unwrap().remove(&key) else {
            return;
        };
        self.halted_count.fetch_sub(1, Ordering::AcqRel);
        let Halt {
            mut jobs, failure, ..
        } = halt;
        tracing::warn!(topic = %self.topic, aggregate = %key, skip, waiting = jobs.len(), "operator resumes aggregate");
        if skip {
            if let Some(first) = jobs.pop_front() {
                let error = format!("skipped by an operator after: {}", failure.error);
                if self
                    .dead_letter(&first.message, "skipped", &error, failure.attempts)
                    .await
                {
                    self.settle_copies(first.sequence, true);
                } else {
                    // Not stored anywhere: stay halted rather than lose it.
                    self.halt(first, failure, jobs);
                    return;
                }
            }
        }
        while let Some(job) = jobs.pop_front() {
            if let Err((job, failure)) = self.process(job).await {
                self.halt(job, failure, jobs);
                return;
            }
        }
    }

    fn halted_list(&self) -> Vec<HaltedAggregate> {
        self.halted
            .lock()
            .unwrap()
            .iter()
            .map(|(key, halt)| {
                let first = halt.jobs.front();
                HaltedAggregate {
                    key: key.clone(),
                    waiting: halt.jobs.len(),
                    since: halt.since,
                    reason: halt.failure.reason.to_owned(),
                    error: halt.failure.error.clone(),
                    attempts: halt.failure.attempts,
                    event_version: first.and_then(|j| j.event_version()),
                    stream_sequence: first.and_then(|j| j.sequence),
                }
            })
            .collect()
    }

    fn halted_events(&self) -> u64 {
        self.halted
            .lock()
            .unwrap()
            .values()
            .map(|h| h.jobs.len() as u64)
            .sum()
    }

    /// Handles one message. `Ok(finished)` once it is acknowledged (`true`) or dead-lettered
    /// (`true`), or could not be dead-lettered (`false`); `Err` when the handler failed for
    /// good and the failure policy decides.
    async fn handle(&self, job: &Job) -> Result<bool, Failure> {
        let input = match &job.input {
            Ok(input) => input,
            Err((reason, error)) => {
                return Ok(self.dead_letter(&job.message, reason, error, 0).await)
            }
        };
        let attempts = run_with_retry(
            &self.retry,
            || {
                let input = input.clone_for_attempt();
                let dispatch = &self.dispatch;
                async move {
                    match (dispatch, input) {
                        (Dispatch::Envelope(h), Input::Envelope(e)) => h.handle(e).await,
                        (Dispatch::Raw(h, _), Input::Raw(m)) => h.handle(m).await,
                        _ => unreachable!("jobs are prepared for their subscription's handler"),
                    }
                }
            },
            tokio::time::sleep,
            bus_core::jitter,
            |attempt, error| {
                tracing::debug!(topic = %self.topic, attempt, %error, "handler failed; retrying in place");
            },
        );
        match attempts.await {
            RetryOutcome::Succeeded { .. } => {
                if let Some(reply) = job.message.reply.clone() {
                    self.acks.push(reply);
                }
                self.counters.handled.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            RetryOutcome::Failed { attempts, reason } => Err(Failure {
                reason: reason.code(),
                error: reason.to_string(),
                attempts,
            }),
        }
    }

    /// Stores the message in the dead-letter stream with why it failed, then terminates the
    /// original so the broker never redelivers it. If the dead letter cannot be stored, the
    /// original is left unacknowledged rather than lost.
    async fn dead_letter(
        &self,
        message: &async_nats::Message,
        reason: &str,
        error: &str,
        attempts: u32,
    ) -> bool {
        let info = message.reply.as_deref().and_then(ack_info);
        let mut headers = message.headers.clone().unwrap_or_default();
        // Header values cannot hold line breaks.
        let error_text: String = error
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(1024)
            .collect();
        let [h_reason, h_error, h_attempts, h_topic, h_seq, h_delivered] = dead_letter_headers();
        headers.insert(h_reason, reason);
        headers.insert(h_error, error_text.as_str());
        headers.insert(h_attempts, attempts.to_string());
        headers.insert(h_topic, self.topic.as_str());
        if let Some(info) = info {
            headers.insert(h_seq, info.stream_sequence.to_string());
            headers.insert(h_delivered, info.delivered.to_string());
            // One dead letter per stream position, even if this is tried twice.
            headers.insert(
                "Nats-Msg-Id",
                format!("dlq-{}-{}", self.topic, info.stream_sequence),
            );
        }
        tracing::warn!(topic = %self.topic, reason, error = %error_text, ?info, "dead-lettering message");
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=5 {
            let stored = async {
                self.jetstream
                    .publish_with_headers(
                        self.dead_letter_subject.clone(),
                        headers.clone(),
                        message.payload.clone(),
                    )
                    .await?
                    .await
            }
            .await;
            match stored {
                Ok(_) => {
                    self.ack(&message.reply, b"+TERM").await;
                    self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
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

/// Decodes a message for the subscription's handler and picks its ordering key.
fn prepare(
    topic: &Topic,
    dispatch: &Dispatch,
    message: &async_nats::Message,
) -> (String, Result<Input, (&'static str, String)>) {
    match dispatch {
        Dispatch::Envelope(_) => {
            match wire::decode(
                header_pairs(message.headers.as_ref()),
                message.payload.clone(),
            ) {
                Ok(e) => (e.aggregate_id().to_string(), Ok(Input::Envelope(e))),
                // Undecodable messages have no aggregate; they share one key so they never hold
                // up an aggregate, and are dead-lettered in stream order.
                Err(err) => (
                    String::new(),
                    Err(("undecodable", format!("not an envelope: {err}"))),
                ),
            }
        }
        Dispatch::Raw(_, key) => {
            let raw = RawMessage {
                topic: topic.clone(),
                subject: message.subject.to_string(),
                headers: header_pairs(message.headers.as_ref())
                    .map(|(n, v)| (n.to_owned(), v.to_owned()))
                    .collect(),
                payload: message.payload.clone(),
            };
            match key.key_of(&raw) {
                Some(k) => (k, Ok(Input::Raw(raw))),
                None => (
                    String::new(),
                    Err(("no-key", "no ordering key could be extracted".to_owned())),
                ),
            }
        }
    }
}

/// What the fetcher needs besides its pool.
struct FetchPlan {
    client: async_nats::Client,
    next_subject: String,
    batch: usize,
    expires: Duration,
    topic: Topic,
    dispatch: Dispatch,
    copies: Arc<Mutex<Copies>>,
    counters: Arc<Counters>,
}

/// The topic's single fetcher. It keeps up to two pull requests outstanding (so the next batch
/// is on its way while this one is dispatched), reads the replies in stream order, and gives
/// each message to the worker of its key. On stop it sends no new request and returns once
/// every outstanding request is complete or expired, so no message is left delivered-but-unseen.
async fn fetch(
    plan: FetchPlan,
    pool: KeyedPool<Work>,
    mut stop: watch::Receiver<bool>,
    mut control: mpsc::UnboundedReceiver<(String, bool)>,
) -> Result<KeyedPool<Work>, NatsError> {
    let inbox = Subject::from(plan.client.new_inbox());
    let mut replies = plan.client.subscribe(inbox.clone()).await.map_err(|e| {
        NatsError::api(
            format!("subscribing to the pull inbox of topic `{}`", plan.topic),
            e,
        )
    })?;
    let request = bytes::Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "batch": plan.batch,
            "expires": plan.expires.as_nanos() as u64,
        }))
        .expect("pull request serialises"),
    );
    // Messages asked for and neither delivered nor expired yet.
    let mut credit: usize = 0;
    let mut stopping = false;
    let mut last_reply = Instant::now();
    // A request the server forgot (a reconnect, a restart) never reports; after this much
    // silence its credit is written off so the fetcher asks again.
    let forget_after = plan.expires + Duration::from_secs(2);
    let mut watchdog = tokio::time::interval(plan.expires.max(Duration::from_millis(50)));
    loop {
        if !stopping && credit < plan.batch {
            match plan
                .client
                .publish_with_reply(plan.next_subject.clone(), inbox.clone(), request.clone())
                .await
            {
                Ok(()) => credit += plan.batch,
                Err(e) => tracing::warn!(topic = %plan.topic, error = %e, "pull request not sent"),
            }
            last_reply = Instant::now();
        }
        if stopping && credit == 0 {
            break;
        }
        tokio::select! {
            biased;
            // Any change, or the sender going away, means stop.
            _ = stop.changed(), if !stopping => stopping = true,
            message = replies.next() => {
                let Some(message) = message else { break };
                last_reply = Instant::now();
                match message.status {
                    None => {
                        credit = credit.saturating_sub(1);
                        let sequence = message.reply.as_deref().and_then(ack_info).map(|i| i.stream_sequence);
                        let seen = sequence.map_or(Seen::New, |s| plan.copies.lock().unwrap().admit(s, message.reply.clone()));
                        if seen != Seen::New {
                            plan.counters.copies_skipped.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(topic = %plan.topic, ?sequence, ?seen, "redelivered copy recognised; not handled again");
                            if seen == Seen::Finished {
                                // Its first ack was lost: acknowledge the copy.
                                if let Some(reply) = message.reply.clone() {
                                    let _ = plan.client.publish(reply, bytes::Bytes::from_static(b"+ACK")).await;
                                }
                            }
                            continue;
                        }
                        let (key, input) = prepare(&plan.topic, &plan.dispatch, &message);
                        let job = Box::new(Job { key: key.clone(), sequence, message, input });
                        if pool.submit(&key, Work::Message(job)).await.is_err() {
                            break;
                        }
                    }
                    Some(status) if status.as_u16() == 100 => {} // idle heartbeat
                    Some(status) => {
                        // 408 (expired), 404 (nothing), 409 (limits, leadership change): the
                        // request is over; its undelivered part is in Nats-Pending-Messages.
                        let pending = message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Pending-Messages"))
                            .and_then(|v| v.as_str().parse::<usize>().ok())
                            .unwrap_or(plan.batch);
                        credit = credit.saturating_sub(pending);
                        if status.as_u16() == 409 {
                            tracing::warn!(topic = %plan.topic, description = ?message.description, "pull request refused");
                        }
                    }
                }
            }
            Some((key, skip)) = control.recv(), if !stopping => {
                // Routed like the aggregate's messages: it runs after what is queued before it.
                if pool.submit(&key, Work::Resume { key: key.clone(), skip }).await.is_err() {
                    break;
                }
            }
            _ = watchdog.tick() => {
                if credit > 0 && last_reply.elapsed() > forget_after {
                    tracing::debug!(topic = %plan.topic, credit, "pull requests went unanswered; asking again");
                    credit = 0;
                }
            }
        }
    }
    let _ = replies.unsubscribe().await;
    Ok(pool)
}

/// Tells the broker, every `every`, that each message in flight for longer than `every` is
/// still being worked on (`+WPI`), whether its handler is running, retrying or it waits in its
/// aggregate's queue behind a slow event. So the broker never redelivers a message behind the
/// worker's back, however long the aggregate is held up.
async fn keep_alive(
    client: async_nats::Client,
    copies: Arc<Mutex<Copies>>,
    every: Duration,
    topic: Topic,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        let replies = copies.lock().unwrap().older_than(every);
        for reply in replies {
            if let Err(error) = client
                .publish(reply, bytes::Bytes::from_static(b"+WPI"))
                .await
            {
                tracing::warn!(%topic, %error, "in-progress acknowledgement could not be sent");
            }
        }
    }
}

/// After an unclean stop, messages the dead process held are redelivered only after AckWait,
/// while newer ones are delivered at once, which would break per-aggregate order. So when the
/// consumer has unacknowledged messages at start, delivery is restarted at its ack floor + 1:
/// by the consumer reset API on servers 2.14+, by recreating the consumer on older ones.
async fn recover_order(
    connection: &crate::TopicConnection,
    stream: &str,
    want: &async_nats::jetstream::consumer::pull::Config,
    mut consumer: async_nats::jetstream::consumer::PullConsumer,
) -> Result<(), NatsError> {
    let name = want.durable_name.clone().unwrap_or_default();
    let info = consumer
        .info()
        .await
        .map_err(|e| NatsError::api(format!("reading consumer `{name}`"), e))?
        .clone();
    if info.num_ack_pending == 0 {
        return Ok(());
    }
    let floor = info.ack_floor.stream_sequence;
    tracing::warn!(
        consumer = %name,
        unacknowledged = info.num_ack_pending,
        ack_floor = floor,
        "consumer has unacknowledged messages from an earlier run; restarting delivery at the ack floor"
    );
    let version = connection.client.server_info().version;
    if server_at_least(&version, (2, 14)) {
        let subject = format!("$JS.API.CONSUMER.RESET.{stream}.{name}");
        let reply = connection
            .client
            .request(subject, bytes::Bytes::new())
            .await
            .map_err(|e| NatsError::api(format!("resetting consumer `{name}`"), e))?;
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
        if let Some(error) = body.get("error") {
            return Err(NatsError::Configuration(format!(
                "resetting consumer `{name}` failed: {error}"
            )));
        }
        return Ok(());
    }
    // Servers before 2.14: delete and recreate, starting after the ack floor.
    let stream_handle = connection
        .jetstream
        .get_stream(stream)
        .await
        .map_err(|e| NatsError::api(format!("looking up stream `{stream}`"), e))?;
    stream_handle
        .delete_consumer(&name)
        .await
        .map_err(|e| NatsError::api(format!("deleting consumer `{name}`"), e))?;
    let mut config = want.clone();
    config.deliver_policy = async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
        start_sequence: floor + 1,
    };
    stream_handle
        .create_consumer(config)
        .await
        .map_err(|e| NatsError::api(format!("recreating consumer `{name}`"), e))?;
    Ok(())
}

/// Whether a server version string like `2.15.1` is at least `(major, minor)`.
pub(crate) fn server_at_least(version: &str, wanted: (u32, u32)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= wanted
}

struct NatsSubscription {
    shared: Arc<Shared>,
    topic: Topic,
    client: async_nats::Client,
    stop: watch::Sender<bool>,
    fetcher: tokio::task::JoinHandle<Result<KeyedPool<Work>, NatsError>>,
    runner: Arc<Runner>,
    control: Arc<NatsControl>,
    keeper: tokio::task::JoinHandle<()>,
    /// Removes what every consumer acknowledged, for `Retention::Acknowledged` topics.
    purger: Option<tokio::task::JoinHandle<()>>,
    acker: tokio::task::JoinHandle<()>,
    acks: Arc<AckQueue>,
    counters: Arc<Counters>,
}

fn subscribe_error(topic: &Topic, error: NatsError) -> SubscribeError {
    let kind = match &error {
        NatsError::Connect { .. } => SubscribeErrorKind::Connection,
        _ => SubscribeErrorKind::Configuration,
    };
    SubscribeError::with_source(
        kind,
        format!("subscribing to topic `{topic}` failed"),
        error,
    )
}

pub(crate) async fn start(
    shared: Arc<Shared>,
    topic: &Topic,
    dispatch: Dispatch,
) -> Result<Subscription, SubscribeError> {
    if !shared.active.lock().unwrap().insert(topic.clone()) {
        return Err(SubscribeError::new(
            SubscribeErrorKind::AlreadySubscribed,
            format!("topic `{topic}` already has an active subscription on this bus (one fetcher per topic keeps order)"),
        ));
    }
    match setup(&shared, topic, dispatch).await {
        Ok(subscription) => Ok(subscription),
        Err(error) => {
            shared.active.lock().unwrap().remove(topic);
            Err(subscribe_error(topic, error))
        }
    }
}

async fn setup(
    shared: &Arc<Shared>,
    topic: &Topic,
    dispatch: Dispatch,
) -> Result<Subscription, NatsError> {
    let config = &shared.config;
    let connection = shared.connection(topic).await?;
    let acknowledged = config.stream_for(topic).retention == crate::Retention::Acknowledged;
    if acknowledged {
        // Before 2.14 an order-safe restart deletes and recreates the consumer; while it is
        // gone, another group's purge would not see its ack floor.
        let version = connection.client.server_info().version;
        if !server_at_least(&version, (2, 14)) {
            return Err(NatsError::Configuration(format!(
                "topic `{topic}`: Retention::Acknowledged needs nats-server 2.14 or newer (the consumer reset API); this server is {version}"
            )));
        }
    }
    let name = config.consumer_name(topic);
    let want = provision::consumer_config(&name, topic.as_str(), &config.consumer);
    let consumer = provision::ensure_consumer(
        &connection.jetstream,
        &connection.stream,
        &want,
        config.provisioning,
    )
    .await?;
    recover_order(&connection, &connection.stream, &want, consumer).await?;

    let dlq_subject = format!("{}.{topic}", config.dead_letters.subject_prefix);
    let mut dlq = StreamSpec::new(config.dead_letters.stream.clone(), []);
    dlq.retention = crate::Retention::Limits;
    let mut dlq_config = provision::stream_config(&dlq);
    dlq_config.subjects = vec![format!("{}.>", config.dead_letters.subject_prefix)];
    provision::ensure_dead_letter_stream(&connection.jetstream, dlq_config, config.provisioning)
        .await?;

    let counters = Arc::new(Counters::default());
    // Finished positions are remembered for a few windows of MaxAckPending: long enough to
    // recognise the copies a reconnect or AckWait expiry brings back.
    let copies = Arc::new(Mutex::new(Copies::new(
        (config.consumer.max_ack_pending.max(1) as usize).saturating_mul(4),
    )));
    let acks = Arc::new(AckQueue::default());
    let acker = tokio::spawn(send_acks(
        connection.client.clone(),
        acks.clone(),
        topic.clone(),
    ));
    let runner = Arc::new(Runner {
        acks: acks.clone(),
        client: connection.client.clone(),
        jetstream: connection.jetstream.clone(),
        topic: topic.clone(),
        dispatch: dispatch.clone(),
        retry: config.retry.clone(),
        dead_letter_subject: dlq_subject,
        counters: counters.clone(),
        copies: copies.clone(),
        policy: config.on_failure,
        halted: Mutex::new(HashMap::new()),
        halted_count: AtomicUsize::new(0),
    });
    // Jobs are boxed: a worker's queue then holds pointers, not whole messages, which keeps
    // the memory of idle queue blocks small with many workers.
    let pool = {
        let runner = runner.clone();
        KeyedPool::new(config.pool.clone(), move |work: Work| {
            let runner = runner.clone();
            async move {
                runner.run(work).await;
                Ok::<(), std::convert::Infallible>(())
            }
        })
    };
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let control = Arc::new(NatsControl {
        topic: topic.clone(),
        runner: runner.clone(),
        requests: control_tx,
    });
    let plan = FetchPlan {
        client: connection.client.clone(),
        next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{}.{name}", connection.stream),
        batch: config.fetch.batch,
        expires: config.fetch.expires,
        topic: topic.clone(),
        dispatch,
        copies,
        counters: counters.clone(),
    };
    let keeper = tokio::spawn(keep_alive(
        connection.client.clone(),
        plan.copies.clone(),
        config.consumer.ack_wait / 3,
        topic.clone(),
    ));
    let purger = acknowledged.then(|| {
        tokio::spawn(crate::retention::purge_acknowledged(
            connection.jetstream.clone(),
            connection.stream.clone(),
            topic.clone(),
            crate::ACKNOWLEDGED_PURGE_EVERY,
        ))
    });
    let (stop, stop_rx) = watch::channel(false);
    let fetcher = tokio::spawn(fetch(plan, pool, stop_rx, control_rx));
    Ok(Subscription::new(NatsSubscription {
        shared: shared.clone(),
        topic: topic.clone(),
        client: connection.client.clone(),
        stop,
        fetcher,
        runner,
        control,
        keeper,
        purger,
        acker,
        acks,
        counters,
    }))
}

/// Operator control of one subscription's halted aggregates.
struct NatsControl {
    topic: Topic,
    runner: Arc<Runner>,
    /// To the fetcher, which routes each request to the aggregate's worker.
    requests: mpsc::UnboundedSender<(String, bool)>,
}

impl NatsControl {
    fn request(&self, key: &str, skip: bool) -> Result<(), SubscribeError> {
        if !self.runner.halted.lock().unwrap().contains_key(key) {
            return Err(SubscribeError::new(
                SubscribeErrorKind::NotHalted,
                format!("aggregate `{key}` of topic `{}` is not halted", self.topic),
            ));
        }
        self.requests.send((key.to_owned(), skip)).map_err(|_| {
            SubscribeError::new(
                SubscribeErrorKind::Closed,
                format!("the subscription to topic `{}` is closed", self.topic),
            )
        })
    }
}

#[async_trait]
impl AggregateControl for NatsControl {
    fn metrics(&self) -> SubscriptionMetrics {
        let runner = &self.runner;
        let (halted_aggregates, halted_events) = {
            let halted = runner.halted.lock().unwrap();
            (
                halted.len() as u64,
                halted.values().map(|h| h.jobs.len() as u64).sum(),
            )
        };
        SubscriptionMetrics {
            handled: runner.counters.handled.load(Ordering::Relaxed),
            dead_lettered: runner.counters.dead_lettered.load(Ordering::Relaxed),
            copies_skipped: runner.counters.copies_skipped.load(Ordering::Relaxed),
            in_flight: runner.copies.lock().unwrap().in_flight.len() as u64,
            halted_aggregates,
            halted_events,
        }
    }

    fn halted(&self) -> Vec<HaltedAggregate> {
        self.runner.halted_list()
    }

    async fn resume(&self, key: &str) -> Result<(), SubscribeError> {
        self.request(key, false)
    }

    async fn skip(&self, key: &str) -> Result<(), SubscribeError> {
        self.request(key, true)
    }
}

#[async_trait]
impl SubscriptionHandle for NatsSubscription {
    fn control(&self) -> Option<Arc<dyn AggregateControl>> {
        Some(self.control.clone())
    }

    async fn close(self: Box<Self>, deadline: Duration) -> Result<CloseReport, SubscribeError> {
        let started = tokio::time::Instant::now();
        let NatsSubscription {
            shared,
            topic,
            client,
            stop,
            fetcher,
            runner,
            control: _,
            keeper,
            purger,
            acker,
            acks,
            counters,
        } = *self;
        let _ = stop.send(true);
        let acker_abort = acker.abort_handle();
        let result = async {
            let pool = match tokio::time::timeout(deadline, fetcher).await {
                Ok(Ok(Ok(pool))) => pool,
                Ok(Ok(Err(e))) => return Err(subscribe_error(&topic, e)),
                Ok(Err(join)) => {
                    return Err(SubscribeError::with_source(SubscribeErrorKind::Closed, "fetcher task failed", join))
                }
                Err(_) => {
                    return Err(SubscribeError::new(
                        SubscribeErrorKind::ShutdownTimedOut,
                        format!("fetcher of topic `{}` did not stop within {deadline:?}", topic),
                    ))
                }
            };
            let remaining = deadline.saturating_sub(started.elapsed());
            let report = pool.shutdown_within(remaining).await;
            // Push the last acknowledgements out before saying we are done: the sender finishes
            // the burst it may be in the middle of, then sends what is left, and stops.
            acks.closing.store(true, Ordering::Release);
            acks.wake.notify_one();
            let remaining = deadline.saturating_sub(started.elapsed());
            let mut acker = acker;
            if tokio::time::timeout(remaining, &mut acker).await.is_err() {
                acker.abort();
            }
            acks.send_all(&client, &topic, &mut Vec::new()).await;
            let _ = client.flush().await;
            // Events of halted aggregates stay unacknowledged: delivered again, in order.
            let returned =
                report.not_run.len() as u64 + report.interrupted + runner.halted_events();
            if report.interrupted > 0 {
                return Err(SubscribeError::new(
                    SubscribeErrorKind::ShutdownTimedOut,
                    format!(
                        "{} handlers of topic `{}` were still running after {deadline:?}; {returned} messages were not acknowledged and will be delivered again, in order",
                        report.interrupted, topic
                    ),
                ));
            }
            Ok(CloseReport {
                handled: counters.handled.load(Ordering::Relaxed),
                returned,
            })
        }
        .await;
        // In-flight messages are all settled or returned by now.
        keeper.abort();
        if let Some(purger) = purger {
            purger.abort();
        }
        acker_abort.abort();
        shared.active.lock().unwrap().remove(&topic);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_parse_in_both_forms() {
        let v1 = "$JS.ACK.ORDERS.bus-orders.3.1042.17.1700000000000000000.5";
        assert_eq!(
            ack_info(v1),
            Some(AckInfo {
                delivered: 3,
                stream_sequence: 1042
            })
        );
        let v2 = "$JS.ACK.hub.ACCHASH.ORDERS.bus-orders.1.77.70.1700000000000000000.0.tok";
        assert_eq!(
            ack_info(v2),
            Some(AckInfo {
                delivered: 1,
                stream_sequence: 77
            })
        );
        assert_eq!(ack_info("_INBOX.abc"), None);
    }

    #[test]
    fn copies_are_recognised_until_forgotten() {
        let mut copies = Copies::new(2);
        assert_eq!(copies.admit_for_test(1), Seen::New);
        assert_eq!(copies.admit_for_test(1), Seen::InFlight);
        copies.finish(1);
        assert_eq!(copies.admit_for_test(1), Seen::Finished);
        assert_eq!(copies.admit_for_test(2), Seen::New);
        copies.release(2);
        assert_eq!(
            copies.admit_for_test(2),
            Seen::New,
            "a released position may be handled again"
        );
        copies.finish(2);
        assert_eq!(copies.admit_for_test(3), Seen::New);
        copies.finish(3);
        // Capacity 2: position 1 is forgotten once 2 and 3 finished.
        assert_eq!(copies.admit_for_test(1), Seen::New);
    }

    #[test]
    fn server_versions_compare() {
        assert!(server_at_least("2.15.1", (2, 14)));
        assert!(server_at_least("2.14.0", (2, 14)));
        assert!(!server_at_least("2.9.10", (2, 14)));
        assert!(!server_at_least("2.10.22", (2, 14)));
    }
}
