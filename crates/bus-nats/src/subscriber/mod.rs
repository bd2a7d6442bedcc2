//! The consuming side: one fetcher per topic feeding a keyed pool.
//!
//! * `fetch`: the single fetcher and its pull requests;
//! * `runner`: one message through the handler, retries in place, dead letters;
//! * `halts`: aggregates held after a failure under `FailurePolicy::HaltAggregate`;
//! * `acker`: every acknowledgement the subscription sends;
//! * `copies`: what was delivered and finished, to recognise redelivered copies;
//! * `ownership`: one subscription of a group consumes, the others wait as standbys;
//! * `recovery`: restarting delivery at the ack floor, and removing unreadable messages.

mod acker;
mod copies;
mod epoch;
mod fetch;
mod group;
mod halts;
mod job;
mod ownership;
mod recovery;
mod registry;
mod runner;
mod thread;
mod unacked;
pub(crate) use copies::BatchMemory;
pub(crate) use group::MEMBERS_BUCKET;
pub(crate) use ownership::lease_store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{
    AggregateControl, CloseReport, HaltedAggregate, Handler, RawHandler, RawKey, SubscribeError,
    SubscribeErrorKind, Subscription, SubscriptionHandle, SubscriptionMetrics, Topic,
};
use keyed_pool::KeyedPool;
use tokio::sync::{mpsc, watch};

use crate::{provision, NatsError, NatsErrorKind, Shared};
use acker::Acker;
use copies::Copies;
use epoch::FetchPlan;
use fetch::fetch;
use job::Work;
use recovery::Restarter;
use registry::Registration;
use runner::{Counters, Runner};

/// The handler a subscription delivers to.
#[derive(Clone)]
pub(crate) enum Dispatch {
    Envelope(Arc<dyn Handler>),
    Raw(Arc<dyn RawHandler>, RawKey),
}

struct NatsSubscription {
    topic: Topic,
    stop: watch::Sender<bool>,
    fetcher: tokio::task::JoinHandle<Result<fetch::Stopped, NatsError>>,
    runner: Arc<Runner>,
    control: Arc<NatsControl>,
    keeper: tokio::task::JoinHandle<()>,
    /// Removes what every consumer acknowledged, for `Retention::Acknowledged` topics.
    purger: Option<tokio::task::JoinHandle<()>>,
    acker_task: tokio::task::JoinHandle<()>,
    acker: Arc<Acker>,
    counters: Arc<Counters>,
    restarter: Restarter,
    /// This process's claim on the topic and group; released when the subscription ends.
    _registration: Registration,
}

fn subscribe_error(topic: &Topic, error: NatsError) -> SubscribeError {
    let kind = match error.kind() {
        // An API call that failed or went unanswered: the broker, not the configuration.
        NatsErrorKind::Connect | NatsErrorKind::Api => SubscribeErrorKind::Connection,
        NatsErrorKind::Owned => SubscribeErrorKind::AlreadySubscribed,
        NatsErrorKind::Closed => SubscribeErrorKind::Closed,
        NatsErrorKind::PermissionDenied => SubscribeErrorKind::PermissionDenied,
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
    memory: Arc<BatchMemory>,
    topic: &Topic,
    dispatch: Dispatch,
) -> Result<Subscription, SubscribeError> {
    match shared.config.subscription_runtime {
        crate::SubscriptionRuntime::Caller => start_here(shared, memory, topic, dispatch).await,
        crate::SubscriptionRuntime::OwnThread => {
            // Made there, its tasks are spawned there; the connections it uses run on the
            // bus's runtime wherever they are made (`Shared::home`).
            let thread = thread::OwnThread::start(topic).await?;
            let made = {
                let topic = topic.clone();
                thread
                    .run("subscribing", async move {
                        start_here(shared, memory, &topic, dispatch).await
                    })
                    .await?
            };
            Ok(Subscription::new(thread::OnOwnThread {
                inner: Some(made),
                thread,
            }))
        }
    }
}

/// [`start`], its tasks on the runtime this runs on.
async fn start_here(
    shared: Arc<Shared>,
    memory: Arc<BatchMemory>,
    topic: &Topic,
    dispatch: Dispatch,
) -> Result<Subscription, SubscribeError> {
    let partitions = shared.config.partitions_of(topic);
    if partitions > 1 {
        return group::start(shared, memory, topic, dispatch, partitions).await;
    }
    let target = Target {
        topic: topic.clone(),
        subject: topic.clone(),
        consumer: shared.config.consumer_name(topic),
        partition: None,
    };
    Ok(Subscription::new(
        setup(&shared, &memory, &target, dispatch).await?,
    ))
}

/// Subscribing needs a consumer group: two services sharing a default one would leave one
/// waiting behind the other.
fn require_group(config: &crate::NatsConfig, topic: &Topic) -> Result<(), NatsError> {
    if config.consumer.group.is_empty() {
        return Err(NatsError::Configuration(format!(
            "topic `{topic}`: no consumer group; set `consumer.group` (or `NatsConfig::with_group`) \
             to the service's name: its replicas share it, other services must not"
        )));
    }
    Ok(())
}

/// What one fetcher consumes: a topic, or one partition of it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The topic.
    pub(crate) topic: Topic,
    /// The subject the consumer filters on: the topic, or `<topic>.<partition>`.
    pub(crate) subject: Topic,
    /// The durable consumer's name.
    pub(crate) consumer: String,
    /// The partition, for a partitioned topic.
    pub(crate) partition: Option<u32>,
}

async fn setup(
    shared: &Arc<Shared>,
    memory: &BatchMemory,
    target: &Target,
    dispatch: Dispatch,
) -> Result<NatsSubscription, SubscribeError> {
    let config = &shared.config;
    let topic = &target.topic;
    let subject = &target.subject;
    let fail = |e: NatsError| subscribe_error(subject, e);
    require_group(config, topic).map_err(fail)?;
    let connection = shared.connection(topic).await.map_err(fail)?;
    let name = target.consumer.clone();
    let registration = Registration::claim(
        &config.connection.servers,
        &connection.stream,
        &name,
        subject,
    )?;
    let pinned = connection.pinned;
    let acknowledged = connection.retention == crate::Retention::Acknowledged;
    if acknowledged && !connection.can_reset {
        // Before 2.14 an order-safe restart deletes and recreates the consumer; while it is
        // gone, another group's purge would not see its ack floor.
        return Err(fail(NatsError::Unsupported(format!(
            "topic `{topic}`: Retention::Acknowledged needs nats-server 2.14 or newer (the consumer reset API); this server is {}",
            connection.server_version
        ))));
    }
    if connection.retention == crate::Retention::WorkQueue
        && config.consumer.start != crate::StartAt::Start
    {
        return Err(fail(NatsError::Invalid(bus_core::ValidationError::new(
            "consumer.start",
            format!("{:?}", config.consumer.start),
            format!("topic `{topic}` uses WorkQueue retention: its one group reads every event the stream keeps (it keeps only what was not read); start other groups on Limits or Acknowledged topics"),
        ))));
    }
    // Before 2.14 the ownership is a lease, kept on the coordination connection.
    let coordination = match pinned {
        true => None,
        false => Some(shared.coordination().await.map_err(fail)?),
    };
    let (want, ownership) = crate::broker::guarded_on(
        &connection.violations,
        coordination.map(|c| &c.violations),
        || {
            format!(
                "provisioning consumer `{name}` of `{subject}` and the dead-letter stream `{}`, and taking the consumer's ownership",
                config.dead_letters.stream
            )
        },
        async {
            let want = provision::subscription(
                &connection.jetstream,
                &connection.stream,
                config,
                &name,
                subject.as_str(),
                pinned,
            )
            .await?;
            let ownership =
                ownership::establish(config, &connection, coordination, &name, subject).await?;
            Ok((want, ownership))
        },
    )
    .await
    .map_err(fail)?;

    let counters = Arc::new(Counters::default());
    // Finished positions are remembered for a few windows of MaxAckPending: long enough to
    // recognise the copies a reconnect, a restart of delivery or AckWait expiry brings back.
    let partial = memory.of(&name);
    let max_ack_pending = config.consumer.max_ack_pending.max(1) as usize;
    // The fetcher pulls no more while the unacknowledged messages hold `max_ack_pending` events
    // (the broker's own limit counts messages, and a record batch holds many events): what a
    // successor replays after a crash stays within that, plus what was already asked for.
    let copies = Arc::new(Mutex::new(Copies::new(
        max_ack_pending.saturating_mul(4),
        max_ack_pending,
        partial,
    )));
    let acker = Arc::new(Acker::new(connection.client.clone(), subject.clone()));
    let acker_task = tokio::spawn(acker.clone().run());
    let letters = crate::dead_letters::LetterBox::new(
        connection.jetstream.clone(),
        &config.dead_letters.subject_prefix,
        topic,
        connection.max_payload,
    );
    let runner = Arc::new(Runner {
        acker: acker.clone(),
        topic: topic.clone(),
        dispatch: dispatch.clone(),
        retry: config.retry.clone(),
        letters: letters.clone(),
        counters: counters.clone(),
        copies: copies.clone(),
        policy: config.on_failure,
        halted: Mutex::new(HashMap::new()),
        halted_count: AtomicUsize::new(0),
        term: AtomicU64::new(runner::next_term()),
        validity: ownership.validity(),
        cancel: bus_core::CancelSource::new(),
        partition: target.partition,
        metrics: crate::telemetry::HandleMetrics::new(topic, &config.consumer.group),
    });
    // Jobs are boxed: a worker's queue then holds pointers, not whole messages, which keeps
    // the memory of idle queue blocks small with many workers.
    let pool = {
        let runner = runner.clone();
        // The runner's own future is the job's: no wrapping future to move it into.
        KeyedPool::new(config.pool.clone(), move |work: Work| {
            runner.clone().run(work)
        })
    };
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (moves_tx, moves_rx) = mpsc::unbounded_channel();
    let restarter = Restarter {
        client: connection.client.clone(),
        jetstream: connection.jetstream.clone(),
        topic: topic.clone(),
        subject: subject.clone(),
        stream: connection.stream.clone(),
        want,
        provisioning: config.provisioning,
        can_reset: connection.can_reset,
        pinned,
        work_queue: connection.retention == crate::Retention::WorkQueue,
        letters,
    };
    let control = Arc::new(NatsControl {
        moves: moves_tx,
        topic: subject.clone(),
        runner: runner.clone(),
        requests: control_tx,
        queues: pool.probe(),
        restarter: restarter.clone(),
    });
    let plan = FetchPlan {
        client: connection.client.clone(),
        batch: config.fetch.batch,
        expires: config.fetch.expires,
        topic: topic.clone(),
        dispatch,
        copies,
        counters: counters.clone(),
        acker: acker.clone(),
        runner: runner.clone(),
        ids: Default::default(),
        restarter: restarter.clone(),
        reconnects: connection.reconnects.clone(),
    };
    let keeper = tokio::spawn(acker::keep_alive(
        acker.clone(),
        plan.copies.clone(),
        config.consumer.ack_wait / 3,
    ));
    let purger = acknowledged.then(|| {
        tokio::spawn(crate::retention::purge_acknowledged(
            connection.jetstream.clone(),
            connection.stream.clone(),
            subject.clone(),
            crate::ACKNOWLEDGED_PURGE_EVERY,
        ))
    });
    let (stop, stop_rx) = watch::channel(false);
    let fetcher = tokio::spawn(fetch(plan, pool, stop_rx, control_rx, moves_rx, ownership));
    Ok(NatsSubscription {
        topic: subject.clone(),
        stop,
        fetcher,
        runner,
        control,
        keeper,
        purger,
        acker_task,
        acker,
        counters,
        restarter,
        _registration: registration,
    })
}

/// Operator control of one subscription: its halted aggregates, and where delivery stands.
struct NatsControl {
    topic: Topic,
    runner: Arc<Runner>,
    /// To the fetcher, which routes each request to the aggregate's worker.
    requests: mpsc::UnboundedSender<job::Request>,
    /// To the fetcher: move delivery to a stream position.
    moves: mpsc::UnboundedSender<epoch::MoveTo>,
    queues: keyed_pool::PoolProbe<Work>,
    /// The consumer, for a move while this subscription is a standby.
    restarter: Restarter,
}

impl NatsControl {
    fn request(&self, key: &str, action: job::Action) -> Result<(), SubscribeError> {
        if !self.runner.halted.lock().unwrap().contains_key(key) {
            return Err(SubscribeError::new(
                SubscribeErrorKind::NotHalted,
                format!("aggregate `{key}` of topic `{}` is not halted", self.topic),
            ));
        }
        let request = job::Request {
            key: key.into(),
            action,
        };
        self.requests.send(request).map_err(|_| {
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
        let (in_flight, acks_waiting) = {
            let copies = runner.copies.lock().unwrap();
            (
                copies.unacked.pending() as u64,
                copies.unacked.held() as u64,
            )
        };
        SubscriptionMetrics {
            handled: runner.counters.handled.load(Ordering::Relaxed),
            dead_lettered: runner.counters.dead_lettered.load(Ordering::Relaxed),
            copies_skipped: runner.counters.copies_skipped.load(Ordering::Relaxed),
            in_flight,
            queued: self.queues.queued() as u64,
            acks_waiting,
            halted_aggregates,
            halted_events,
            owner: runner.counters.owner.load(Ordering::Relaxed) == 1,
            ownership_gained: runner.counters.gained.load(Ordering::Relaxed),
            ownership_lost: runner.counters.lost.load(Ordering::Relaxed),
            delivery_restarts: runner.counters.restarts.load(Ordering::Relaxed),
            delivery_moves: runner.counters.moves.load(Ordering::Relaxed),
            unreadable: runner.counters.unreadable.load(Ordering::Relaxed),
            partitions: 0,
        }
    }

    fn halted(&self) -> Vec<HaltedAggregate> {
        self.runner.halted_list()
    }

    async fn resume(&self, key: &str) -> Result<(), SubscribeError> {
        self.request(key, job::Action::Resume)
    }

    async fn skip(&self, key: &str) -> Result<(), SubscribeError> {
        self.request(key, job::Action::Skip)
    }

    async fn restart_at(&self, sequence: u64) -> Result<(), SubscribeError> {
        self.move_to(sequence, None).await
    }
}

impl NatsControl {
    /// [`AggregateControl::restart_at`]. A standby refuses (`NotOwner`: the subscription that
    /// consumes the topic moves it), unless `standby_wait` is given: a partition its group has
    /// just assigned to this member is a standby until the member it came from lets go, and
    /// nobody else moves it meanwhile (see [`Self::move_standby`]).
    async fn move_to(
        &self,
        sequence: u64,
        standby_wait: Option<Duration>,
    ) -> Result<(), SubscribeError> {
        match standby_wait {
            Some(wait) if !self.is_owner() => self.move_standby(sequence, wait).await,
            None if !self.is_owner() => Err(SubscribeError::new(
                SubscribeErrorKind::NotOwner,
                format!("this subscription to topic `{}` is a standby: the one that consumes it moves delivery", self.topic),
            )),
            _ => self.move_owned(sequence, None).await,
        }
    }

    fn is_owner(&self) -> bool {
        self.runner.counters.owner.load(Ordering::Relaxed) == 1
    }

    /// Has the fetcher move delivery and waits until it has; gives up after `within` if given
    /// (the move is then withdrawn: the fetcher drops a move whose requester stopped waiting).
    async fn move_owned(
        &self,
        sequence: u64,
        within: Option<Duration>,
    ) -> Result<(), SubscribeError> {
        let closed = || {
            SubscribeError::new(
                SubscribeErrorKind::Closed,
                format!("the subscription to topic `{}` is closed", self.topic),
            )
        };
        let (done, moved) = tokio::sync::oneshot::channel();
        self.moves
            .send(epoch::MoveTo { sequence, done })
            .map_err(|_| closed())?;
        let moved = match within {
            None => moved.await,
            Some(wait) => match tokio::time::timeout(wait, moved).await {
                Ok(moved) => moved,
                Err(_) => return Err(self.not_taken_over(wait)),
            },
        };
        match moved {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(subscribe_error(&self.topic, error)),
            Err(_) => Err(closed()),
        }
    }

    /// Moves a partition this member is taking over from another, within `wait`. Where a lease
    /// owns the consumer (servers before 2.14, or `consumer.ownership` Lease) a standby takes
    /// it as soon as it is released: the move is queued and the fetcher applies it once it has
    /// taken over. With the pinned-client group (2.14+, by default) the broker pins a
    /// standby only when it has a message to deliver, which an idle partition may not have for
    /// a long time: once the member it comes from has unpinned (nobody consumes it), the
    /// consumer itself is moved, and this subscription takes it over with the first message
    /// delivered from there (starting at the ack floor, as after any gain). Should it take it
    /// over meanwhile, it moves it as an owner.
    async fn move_standby(&self, sequence: u64, wait: Duration) -> Result<(), SubscribeError> {
        tracing::info!(topic = %self.topic, sequence, ?wait, "a move waits for the member this partition comes from to let go");
        let restarter = &self.restarter;
        if !restarter.pinned {
            return self.move_owned(sequence, Some(wait)).await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        let consumer = restarter.want.durable_name.as_deref().unwrap_or_default();
        loop {
            if self.is_owner() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                return self.move_owned(sequence, Some(left)).await;
            }
            let state =
                crate::broker::consumer_state(&restarter.client, &restarter.stream, consumer)
                    .await
                    .map_err(|e| subscribe_error(&self.topic, e))?;
            if !state.pinned {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.not_taken_over(wait));
            }
            tokio::time::sleep(STANDBY_POLL).await;
        }
        crate::broker::reset_consumer(
            &restarter.client,
            &restarter.stream,
            consumer,
            Some(sequence),
        )
        .await
        .map_err(|e| subscribe_error(&self.topic, e))?;
        self.runner.counters.moves.fetch_add(1, Ordering::Relaxed);
        tracing::info!(topic = %self.topic, sequence, "moved the consumer of a partition being taken over");
        Ok(())
    }

    fn not_taken_over(&self, wait: Duration) -> SubscribeError {
        SubscribeError::new(
            SubscribeErrorKind::NotOwner,
            format!("this subscription to topic `{}` is a standby, and the member it is being handed over from did not let go within {wait:?}: nothing was moved; try again", self.topic),
        )
    }
}

/// How often a move for a standby looks whether the member a partition comes from has let go.
const STANDBY_POLL: Duration = Duration::from_millis(50);

/// What a close allows each broker round trip after its deadline has passed: a close must not
/// hang on an unreachable broker, and what it could not confirm is delivered again, in order.
const FLOOR: Duration = Duration::from_millis(200);
/// The same for releasing the topic (one or two requests).
const RELEASE_FLOOR: Duration = Duration::from_secs(1);

#[async_trait]
impl SubscriptionHandle for NatsSubscription {
    fn control(&self) -> Option<Arc<dyn AggregateControl>> {
        Some(self.control.clone())
    }

    async fn close(self: Box<Self>, deadline: Duration) -> Result<CloseReport, SubscribeError> {
        let started = tokio::time::Instant::now();
        let NatsSubscription {
            topic,
            stop,
            fetcher,
            runner,
            control: _,
            keeper,
            purger,
            acker_task,
            acker,
            counters,
            restarter,
            _registration,
        } = *self;
        let _ = stop.send(true);
        runner.cancel.close();
        let acker_abort = acker_task.abort_handle();
        let result = async {
            let (pool, ownership) = match tokio::time::timeout(deadline, fetcher).await {
                Ok(Ok(Ok(stopped))) => stopped,
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
            acker.finish();
            let remaining = deadline.saturating_sub(started.elapsed());
            let mut acker_task = acker_task;
            if tokio::time::timeout(remaining, &mut acker_task).await.is_err() {
                acker_task.abort();
            }
            // Bounded: with the broker unreachable a flush would wait for the reconnection.
            let remaining = deadline.saturating_sub(started.elapsed());
            let _ = tokio::time::timeout(remaining.max(FLOOR), acker.flush()).await;
            // Events of halted aggregates stay unacknowledged: delivered again, in order.
            let returned =
                report.not_run.len() as u64 + report.interrupted + runner.halted_events();
            // The messages left unacknowledged: one per returned event, but a record batch
            // holds several events.
            // Returned, so that a record batch among them remembers which of its events were
            // handled: a subscription opened again on this bus skips those.
            for work in &report.not_run {
                if let job::Work::Message(job) = work {
                    runner.settle(job, job::Outcome::Returned);
                }
            }
            runner.release_halted();
            // The messages left unacknowledged: the returned ones (one per returned event, but a
            // record batch holds several) and those handled whose acknowledgement waits for one
            // of them; all are delivered again, in order.
            let unacked = runner.copies.lock().unwrap().unacked.len() as u64;
            tracing::debug!(%topic, elapsed = ?started.elapsed(), "close: pool drained and acks sent");
            // The broker processes acks after their connection flushed, and a cluster electing
            // a consumer leader can lose them; a standby that took over before they count
            // would replay handled events. So the claim is released once the consumer shows no
            // more than what was returned, the recent acks sent again if it does not.
            let mut unconfirmed = 0;
            if ownership.is_held() {
                let remaining = deadline.saturating_sub(started.elapsed());
                unconfirmed = restarter
                    .wait_for_acks(unacked, remaining.min(Duration::from_secs(1)))
                    .await;
                if unconfirmed > 0 {
                    let again = runner.copies.lock().unwrap().recent_acks();
                    tracing::warn!(%topic, unconfirmed, resent = again.len(), "acknowledgements not taken into account by the broker; sending them again");
                    let resend = async {
                        for reply in again {
                            acker.ack_now(reply).await;
                        }
                        acker.flush().await;
                    };
                    let remaining = deadline.saturating_sub(started.elapsed());
                    let _ = tokio::time::timeout(remaining.max(FLOOR), resend).await;
                    let remaining = deadline.saturating_sub(started.elapsed());
                    unconfirmed = restarter
                        .wait_for_acks(unacked, remaining.min(Duration::from_secs(2)))
                        .await;
                }
                tracing::debug!(%topic, elapsed = ?started.elapsed(), unconfirmed, "close: acks checked");
                // Without an answer from the broker the claim lapses by itself (after
                // `takeover_after`); closing does not wait for it.
                let remaining = deadline.saturating_sub(started.elapsed());
                if tokio::time::timeout(remaining.max(RELEASE_FLOOR), ownership.release(unacked))
                    .await
                    .is_err()
                {
                    tracing::warn!(%topic, "the broker did not answer the release of the topic; a standby takes over after takeover_after");
                }
            }
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
                unconfirmed,
            })
        }
        .await;
        // In-flight messages are all settled or returned by now.
        keeper.abort();
        if let Some(purger) = purger {
            purger.abort();
        }
        acker_abort.abort();
        result
    }
}
