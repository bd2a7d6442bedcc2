//! Exclusive ownership of a topic's consumer: any number of subscriptions of one group may
//! exist, in any number of processes; exactly one consumes at a time, the others wait as
//! standbys and take over when it goes.
//!
//! * **nats-server 2.14+: a priority group with the pinned-client policy** (ADR-42). Every pull
//!   request carries the group; the broker pins one client and delivers only to pull requests
//!   that carry its pin ID. A standby pulls without an ID; when the pin is free (the owner
//!   unpinned it on close, or sent no pull for `takeover_after`), the broker pins the standby
//!   and delivers it one message carrying the new `Nats-Pin-Id`. That message is not handled:
//!   the new owner first restarts delivery at the ack floor + 1 (the consumer reset API), so
//!   what the old owner left unacknowledged comes first. The broker does not wait for the old
//!   owner's messages in flight (ADR-42 promises no exclusivity); the reset is what keeps order.
//! * **Older servers: a lease in a KV bucket** (`BUS_OWNERS`, one key per consumer, the bucket's
//!   `max_age` as the lease's lifetime, renewed by compare-and-set). A standby polls for the
//!   lease and takes it once it is free (deleted by a graceful close, or run out after a crash);
//!   it then restarts delivery at the ack floor + 1 (deleting and recreating the consumer)
//!   before it handles anything. Nothing at the broker stops a former owner from pulling, so an
//!   owner fences itself: without a successful renewal for two thirds of the lifetime, counted
//!   from when that renewal was sent, it stops consuming, before the lease can run out at the
//!   server; then it polls for the lease like a standby.
//!
//! While it owns the topic, a keeper task refreshes the claim several times per
//! `takeover_after`, independently of the fetcher, so slow handlers or a full worker queue never
//! cost the owner its topic; it reports the loss of the claim to the fetcher.
//!
//! **Validity.** Either way the claim is known good until a deadline on this process's
//! monotonic clock ([`Validity`]): two thirds of `takeover_after` after the last request the
//! broker confirmed was *sent* (a keep-alive pull it answered with anything but 423, a lease
//! write it accepted). Nobody else can take the claim before `takeover_after` has passed since
//! the broker received that request. The worker that is about to start a job checks the
//! deadline and returns the job unhandled once it has passed: a process that was stopped or
//! frozen while its successor took over (SIGSTOP, a paused machine) does not handle what it had
//! queued when it runs again, before its keeper has even noticed. A deadline that passed is
//! final for the term: a late confirmation does not revive it, and the keeper reports the loss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::Subject;
use bus_core::Topic;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::connection::{Coordination, TopicConnection};
use crate::provision::PRIORITY_GROUP;
use crate::{NatsConfig, NatsError};

/// The KV bucket holding ownership leases on servers before 2.14.
pub(crate) const LEASE_BUCKET: &str = "BUS_OWNERS";

/// The header that carries the pin ID on deliveries of a pinned-client consumer.
const PIN_HEADER: &str = "Nats-Pin-Id";

/// How this server lets one subscription own a consumer.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    /// Priority group, pinned client (2.14+).
    Pinned,
    /// A lease in [`LEASE_BUCKET`] (older servers).
    Lease {
        kv: Box<kv::Store>,
        /// The consumer's name: the lease's key.
        key: String,
        /// Who holds it, as stored in the lease.
        holder: String,
    },
}

/// What the subscription holds while it owns the topic.
#[derive(Debug, Clone)]
enum Held {
    Pin(String),
    /// The lease's current revision, kept up to date by its keeper: releasing it is a delete
    /// that expects that revision.
    Lease(Arc<AtomicU64>),
}

/// Until when this subscription's claim on its topic is known good, shared by its keeper (which
/// extends it) and its workers (which check it before starting a job): nanoseconds on the
/// monotonic clock since `base`; 0 when no claim is held, or once it passed.
#[derive(Debug)]
pub(crate) struct Validity {
    base: std::time::Instant,
    deadline: AtomicU64,
}

impl Default for Validity {
    fn default() -> Self {
        Self {
            // A second back, so that no deadline counted from it is 0 (which means none).
            base: {
                let now = std::time::Instant::now();
                now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
            },
            deadline: AtomicU64::new(0),
        }
    }
}

impl Validity {
    fn nanos(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// A new claim, good until `until`.
    fn grant(&self, until: std::time::Instant) {
        self.deadline.store(self.nanos(until), Ordering::Release);
    }

    /// The claim is gone (lost, released, or its deadline passed).
    fn revoke(&self) {
        self.deadline.store(0, Ordering::Release);
    }

    /// Moves the deadline to `until` if the claim still holds now; `false` if it had passed
    /// (then it stays passed: what was returned meanwhile must not be followed by handling).
    fn extend(&self, until: std::time::Instant) -> bool {
        let until = self.nanos(until);
        let mut current = self.deadline.load(Ordering::Acquire);
        loop {
            if current == 0 || self.nanos(std::time::Instant::now()) >= current {
                self.deadline.store(0, Ordering::Release);
                return false;
            }
            match self.deadline.compare_exchange_weak(
                current,
                current.max(until),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
    }

    /// Whether the claim holds at `now`; once it does not, it does not again (for this claim).
    #[inline]
    pub(crate) fn holds(&self, now: std::time::Instant) -> bool {
        let current = self.deadline.load(Ordering::Acquire);
        if current == 0 {
            return false;
        }
        let now = self.nanos(now);
        if now < current {
            return true;
        }
        self.passed(now, current)
    }

    /// [`holds`](Self::holds) found the deadline passed at `now`: made final, unless the
    /// keeper moved it on meanwhile.
    #[cold]
    fn passed(&self, now: u64, mut current: u64) -> bool {
        loop {
            if current == 0 {
                return false;
            }
            if now < current {
                return true;
            }
            match self.deadline.compare_exchange_weak(
                current,
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return false,
                Err(moved) => current = moved,
            }
        }
    }
}

/// The outcome of waiting to own the topic.
pub(crate) enum Wait {
    Gained,
    Stopped,
}

/// One subscription's side of the ownership of its topic's consumer.
pub(crate) struct Ownership {
    client: async_nats::Client,
    topic: Topic,
    stream: String,
    consumer: String,
    takeover_after: Duration,
    mode: Mode,
    held: Option<Held>,
    keeper: Option<tokio::task::JoinHandle<()>>,
    lost: Option<mpsc::Receiver<String>>,
    validity: Arc<Validity>,
    /// Times this subscription gained the topic.
    pub(crate) gained: u64,
}

impl Ownership {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: async_nats::Client,
        topic: Topic,
        stream: String,
        consumer: String,
        takeover_after: Duration,
        mode: Mode,
    ) -> Self {
        Self {
            client,
            topic,
            stream,
            consumer,
            takeover_after,
            mode,
            held: None,
            keeper: None,
            lost: None,
            validity: Arc::default(),
            gained: 0,
        }
    }

    /// Until when the claim is known good, for the workers to check.
    pub(crate) fn validity(&self) -> Arc<Validity> {
        self.validity.clone()
    }

    /// The subject its pull requests go to (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`).
    pub(crate) fn next_subject(&self) -> String {
        crate::broker::next_subject(&self.stream, &self.consumer)
    }

    pub(crate) fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// The priority-group fields of a pull request (`"group"` and, once pinned, `"id"`).
    pub(crate) fn pull_fields(&self, request: &mut serde_json::Map<String, serde_json::Value>) {
        if let Mode::Pinned = self.mode {
            request.insert("group".into(), PRIORITY_GROUP.into());
            if let Some(Held::Pin(pin)) = &self.held {
                request.insert("id".into(), pin.clone().into());
            }
        }
    }

    /// On a server before 2.14, takes the lease now if it is free; otherwise the subscription
    /// starts as a standby and its fetcher waits for the lease ([`Ownership::wait`]).
    pub(crate) async fn try_acquire(&mut self) -> Result<(), NatsError> {
        let Mode::Lease { kv, key, holder } = &self.mode else {
            return Ok(());
        };
        let sent = std::time::Instant::now();
        let revision = within(
            self.takeover_after,
            "taking the ownership lease",
            try_lease(kv, key, holder),
        )
        .await??;
        match revision {
            Some(revision) => self.gain(Held::Lease(Arc::new(AtomicU64::new(revision))), sent),
            None => {
                let other = match within(self.takeover_after, "", kv.get(key.as_str())).await {
                    Ok(Ok(Some(value))) => String::from_utf8_lossy(&value).into_owned(),
                    _ => "another process".to_owned(),
                };
                tracing::info!(topic = %self.topic, consumer = %self.consumer, owner = %other, "the topic is owned by another subscription; waiting as a standby for its lease");
            }
        }
        Ok(())
    }

    /// Waits until this subscription owns the topic, or `stop` changes.
    pub(crate) async fn wait(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        reconnects: &mut watch::Receiver<u64>,
    ) -> Result<Wait, NatsError> {
        if *stop.borrow() {
            return Ok(Wait::Stopped);
        }
        let held = match self.mode.clone() {
            Mode::Pinned => self.wait_for_pin(stop, reconnects).await?,
            Mode::Lease { kv, key, holder } => {
                // Often enough that a graceful close hands over quickly; every attempt bounded.
                let every = (self.takeover_after / 3).min(LEASE_POLL);
                let mut poll = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = stop.changed() => return Ok(Wait::Stopped),
                        _ = poll.tick() => {
                            let sent = std::time::Instant::now();
                            match within(self.takeover_after, "taking the ownership lease", try_lease(&kv, &key, &holder)).await {
                                Ok(Ok(Some(revision))) => break Some((Held::Lease(Arc::new(AtomicU64::new(revision))), sent)),
                                Ok(Ok(None)) => {}
                                Ok(Err(error)) | Err(error) => tracing::warn!(topic = %self.topic, %error, "ownership lease could not be taken"),
                            }
                        }
                    }
                }
            }
        };
        match held {
            Some((held, sent)) => {
                self.gain(held, sent);
                Ok(Wait::Gained)
            }
            None => Ok(Wait::Stopped),
        }
    }

    /// Pulls as a candidate of the priority group until the broker pins this subscription.
    async fn wait_for_pin(
        &self,
        stop: &mut watch::Receiver<bool>,
        reconnects: &mut watch::Receiver<u64>,
    ) -> Result<Option<(Held, std::time::Instant)>, NatsError> {
        let inbox = Subject::from(self.client.new_inbox());
        let next_subject = Subject::from(self.next_subject());
        let mut replies = self.client.subscribe(inbox.clone()).await.map_err(|e| {
            NatsError::api(
                format!("subscribing to the standby inbox of topic `{}`", self.topic),
                e,
            )
        })?;
        // One message at a time: the message that comes with the pin is only the sign of it.
        let expires = (self.takeover_after / 2).min(Duration::from_secs(1));
        let request = bytes::Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "batch": 1,
                "expires": expires.as_nanos() as u64,
                "group": PRIORITY_GROUP,
            }))
            .expect("pull request serialises"),
        );
        let mut sent_at: Option<tokio::time::Instant> = None;
        let mut check = tokio::time::interval(expires);
        let result = loop {
            if sent_at.is_none() {
                match self
                    .client
                    .publish_with_reply(next_subject.clone(), inbox.clone(), request.clone())
                    .await
                {
                    Ok(()) => sent_at = Some(tokio::time::Instant::now()),
                    Err(e) => {
                        tracing::debug!(topic = %self.topic, error = %e, "standby pull not sent")
                    }
                }
            }
            tokio::select! {
                _ = stop.changed() => break Ok(None),
                _ = reconnects.changed() => sent_at = None,
                message = replies.next() => {
                    let Some(message) = message else { break Ok(None) };
                    match message.status.map(|s| s.as_u16()) {
                        None => {
                            let pin = message.headers.as_ref().and_then(|h| h.get(PIN_HEADER)).map(|v| v.as_str().to_owned());
                            // The broker pinned this subscription when that pull reached it.
                            let sent = sent_at.map_or_else(std::time::Instant::now, |t| t.into_std());
                            match pin {
                                Some(pin) => break Ok(Some((Held::Pin(pin), sent))),
                                None => break Err(NatsError::Configuration(format!(
                                    "consumer `{}` of stream `{}` delivered without a pin: it has no pinned-client priority group (was it created outside the bus?)",
                                    self.consumer, self.stream
                                ))),
                            }
                        }
                        Some(100) => {}
                        Some(400) => break Err(NatsError::Configuration(format!(
                            "consumer `{}` of stream `{}` refused a pull of priority group `{PRIORITY_GROUP}`: {}",
                            self.consumer, self.stream, message.description.as_deref().unwrap_or("bad request")
                        ))),
                        Some(_) => sent_at = None,
                    }
                }
                _ = check.tick() => {
                    // A request the server forgot (a restart) never answers.
                    if sent_at.is_some_and(|t| t.elapsed() > expires + Duration::from_secs(1)) {
                        sent_at = None;
                    }
                    self.free_orphans().await;
                }
            }
        };
        let _ = replies.unsubscribe().await;
        result
    }

    /// The broker pins a standby only when it has a message to deliver. Messages an owner that
    /// crashed left unacknowledged are not deliverable until their AckWait runs out, so on a
    /// quiet topic the standby would wait that long. When nobody is pinned and messages await
    /// acknowledgement, their owner is gone: restarting delivery at the ack floor makes them
    /// deliverable at once, and the standby that gets the pin restarts again before handling
    /// anything. A restart never breaks order for an owner either: it sees the consumer
    /// sequence start again and restarts itself.
    async fn free_orphans(&self) {
        let Ok(info) =
            crate::broker::consumer_state(&self.client, &self.stream, &self.consumer).await
        else {
            return;
        };
        let (pending, pinned) = (info.num_ack_pending, info.pinned);
        if pending == 0 || pinned {
            return;
        }
        tracing::info!(topic = %self.topic, consumer = %self.consumer, pending, "no subscriber owns the topic and messages await acknowledgement; restarting delivery at the ack floor");
        if let Err(error) =
            crate::broker::reset_consumer(&self.client, &self.stream, &self.consumer, None).await
        {
            tracing::debug!(topic = %self.topic, %error, "restarting delivery for a standby failed");
        }
    }

    /// Holds the claim taken by a request sent at `sent`.
    fn gain(&mut self, held: Held, sent: std::time::Instant) {
        self.gained += 1;
        tracing::info!(topic = %self.topic, consumer = %self.consumer, ?held, "this subscription now owns the topic");
        self.validity.grant(sent + fence(self.takeover_after));
        let (lost_tx, lost_rx) = mpsc::channel(1);
        let keeper = match &held {
            Held::Pin(pin) => tokio::spawn(keep_pin(
                self.client.clone(),
                self.next_subject(),
                pin.clone(),
                self.takeover_after,
                self.validity.clone(),
                lost_tx,
            )),
            Held::Lease(revision) => {
                let Mode::Lease { kv, key, holder } = &self.mode else {
                    unreachable!("a lease is held only in lease mode")
                };
                tokio::spawn(keep_lease(
                    (**kv).clone(),
                    key.clone(),
                    holder.clone(),
                    revision.clone(),
                    self.takeover_after,
                    self.validity.clone(),
                    lost_tx,
                ))
            }
        };
        if let Some(old) = self.keeper.replace(keeper) {
            old.abort();
        }
        self.lost = Some(lost_rx);
        self.held = Some(held);
    }

    /// Resolves when the keeper finds that the claim was lost, with why.
    pub(crate) async fn lost(&mut self) -> String {
        match &mut self.lost {
            Some(lost) => lost
                .recv()
                .await
                .unwrap_or_else(|| "ownership keeper stopped".to_owned()),
            None => std::future::pending().await,
        }
    }

    /// Forgets the claim after the broker or the lease said it is gone.
    pub(crate) fn forget(&mut self) {
        self.validity.revoke();
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        self.lost = None;
        self.held = None;
    }

    /// Gives the topic up at once (after a graceful close has drained), so a standby takes
    /// over without waiting for `takeover_after`. With `returned` messages left
    /// unacknowledged (held by halted aggregates), delivery is restarted at the ack floor first,
    /// so they are deliverable to the next owner at once instead of after AckWait.
    pub(crate) async fn release(mut self, returned: u64) {
        self.validity.revoke();
        let held = self.held.take();
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        match (held, &self.mode) {
            (Some(Held::Pin(_)), Mode::Pinned) => {
                if returned > 0 {
                    if let Err(error) = crate::broker::reset_consumer(
                        &self.client,
                        &self.stream,
                        &self.consumer,
                        None,
                    )
                    .await
                    {
                        tracing::debug!(topic = %self.topic, %error, "restarting delivery before releasing the topic failed");
                    }
                }
                if let Err(error) =
                    crate::broker::unpin(&self.client, &self.stream, &self.consumer, PRIORITY_GROUP)
                        .await
                {
                    tracing::warn!(topic = %self.topic, %error, "unpin failed; a standby takes over after takeover_after");
                }
            }
            (Some(Held::Lease(revision)), Mode::Lease { kv, key, .. }) => {
                let revision = revision.load(Ordering::Acquire);
                if let Err(error) = kv
                    .delete_expect_revision(key.as_str(), Some(revision))
                    .await
                {
                    tracing::warn!(topic = %self.topic, %error, "ownership lease not released; it runs out by itself");
                }
            }
            _ => {}
        }
    }
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("topic", &self.topic)
            .field("consumer", &self.consumer)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// The ownership of consumer `name` of `subject`, tried once: pinned by the broker on 2.14+
/// (no `coordination` connection), a lease in `BUS_OWNERS` on the coordination connection
/// before. The caller guards it against permission violations on both connections.
pub(crate) async fn establish(
    config: &NatsConfig,
    connection: &TopicConnection,
    coordination: Option<&Coordination>,
    name: &str,
    subject: &Topic,
) -> Result<Ownership, NatsError> {
    let mode = match coordination {
        None => Mode::Pinned,
        Some(coordination) => Mode::Lease {
            kv: Box::new(
                lease_store(
                    &coordination.client,
                    &coordination.jetstream,
                    config.consumer.takeover_after,
                    config.consumer.coordination_replicas,
                )
                .await?,
            ),
            key: name.to_owned(),
            holder: format!(
                "`{}` (host {}, pid {})",
                config.connection.client_name,
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .or_else(|_| std::env::var("HOSTNAME"))
                    .unwrap_or_else(|_| "unknown".into()),
                std::process::id(),
            ),
        },
    };
    let mut ownership = Ownership::new(
        connection.client.clone(),
        subject.clone(),
        connection.stream.clone(),
        name.to_owned(),
        config.consumer.takeover_after,
        mode,
    );
    ownership.try_acquire().await?;
    Ok(ownership)
}

/// The lease bucket, created on first use with `takeover_after` as the lifetime of a lease.
pub(crate) async fn lease_store(
    client: &async_nats::Client,
    jetstream: &async_nats::jetstream::Context,
    takeover_after: Duration,
    replicas: usize,
) -> Result<kv::Store, NatsError> {
    crate::broker::ensure_bucket(client, jetstream, LEASE_BUCKET, takeover_after, replicas).await
}

/// Takes the lease if nobody holds it: `Some(revision)`, or `None` when it is held.
async fn try_lease(kv: &kv::Store, key: &str, holder: &str) -> Result<Option<u64>, NatsError> {
    match kv.create(key, holder.to_owned().into()).await {
        Ok(revision) => Ok(Some(revision)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(NatsError::api(
            format!("taking the ownership lease `{key}`"),
            e,
        )),
    }
}

/// How long after a confirmed request was sent the claim is held good: two thirds of
/// `takeover_after`, the rest a margin for the two clocks' rates and the request's way.
fn fence(takeover_after: Duration) -> Duration {
    takeover_after * 2 / 3
}

/// Keeps the pin: a pull request that carries the pin ID restarts the broker's
/// `priority_timeout`. These ask for at most 1 byte, so the broker never delivers on them (it
/// answers 409 when a message is waiting, 408 at expiry), and they go on while the fetcher is
/// blocked behind a full worker queue or drains on close. A 423 means the pin is gone. Any other
/// answer confirms the pin as of when its request was sent (each request has a reply subject of
/// its own, so the answer names it; one a dropped connection lost is never answered), which
/// moves the validity on; without a confirmation for [`fence`] the pin is given up before the
/// broker can move it.
async fn keep_pin(
    client: async_nats::Client,
    next_subject: String,
    pin: String,
    takeover_after: Duration,
    validity: Arc<Validity>,
    lost: mpsc::Sender<String>,
) {
    let every = takeover_after / 4;
    let fence = fence(takeover_after);
    let inbox = client.new_inbox();
    let Ok(mut replies) = client.subscribe(Subject::from(format!("{inbox}.*"))).await else {
        validity.revoke();
        let _ = lost
            .send("the pin keeper could not subscribe".to_owned())
            .await;
        return;
    };
    let request = bytes::Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "batch": 1,
            "max_bytes": 1,
            "expires": every.as_nanos() as u64,
            "group": PRIORITY_GROUP,
            "id": pin,
        }))
        .expect("pull request serialises"),
    );
    // When each request still unanswered was sent, by its number (the last token of its reply
    // subject).
    let mut sent: std::collections::BTreeMap<u64, std::time::Instant> = Default::default();
    let mut number = 0u64;
    let mut tick = tokio::time::interval(every);
    let mut check = tokio::time::interval(every / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                number += 1;
                let at = std::time::Instant::now();
                let reply = Subject::from(format!("{inbox}.{number}"));
                match client.publish_with_reply(next_subject.clone(), reply, request.clone()).await {
                    Ok(()) => {
                        sent.insert(number, at);
                    }
                    Err(error) => tracing::debug!(%error, "pin keep-alive not sent"),
                }
                // Long past its expiry, a request is not answered any more (lost with a
                // connection): forgotten.
                sent.retain(|_, t| t.elapsed() < takeover_after * 2);
            }
            _ = check.tick() => {}
            Some(reply) = replies.next() => {
                if reply.status.map(|s| s.as_u16()) == Some(423) {
                    validity.revoke();
                    let _ = lost.send("the broker moved the pin to another subscriber (423)".to_owned()).await;
                    return;
                }
                let answered = reply.subject.rsplit('.').next().and_then(|n| n.parse::<u64>().ok());
                if let Some(at) = answered.and_then(|n| sent.remove(&n)) {
                    validity.extend(at + fence);
                }
            }
        }
        if !validity.holds(std::time::Instant::now()) {
            let _ = lost
                .send(format!(
                    "the broker confirmed the pin to no keep-alive sent in the last {fence:?}; stopping before it can move it"
                ))
                .await;
            return;
        }
    }
}

/// How often a standby on a server before 2.14 tries to take the lease, at most.
const LEASE_POLL: Duration = Duration::from_millis(500);

/// Runs a broker request with a deadline: on servers before 2.14 some requests go unanswered.
pub(crate) async fn within<T>(
    deadline: Duration,
    what: &str,
    request: impl std::future::Future<Output = T>,
) -> Result<T, NatsError> {
    tokio::time::timeout(deadline, request)
        .await
        .map_err(|elapsed| {
            NatsError::api(format!("{what}: no answer within {deadline:?}"), elapsed)
        })
}

/// Renews the lease every quarter of its lifetime. A renewal refused because someone else wrote
/// the key means it is lost; so does no successful renewal for two thirds of the lifetime,
/// counted from when the last successful one was sent: the server keeps the lease at least a
/// whole lifetime after that write, so the owner stops before anyone else can take it over.
async fn keep_lease(
    kv: kv::Store,
    key: String,
    holder: String,
    current: Arc<AtomicU64>,
    lifetime: Duration,
    validity: Arc<Validity>,
    lost: mpsc::Sender<String>,
) {
    let mut revision = current.load(Ordering::Acquire);
    let every = lifetime / 4;
    let fence = fence(lifetime);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    // The lease was written (taken) before this task started.
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(renewed + fence) => {}
        }
        if renewed.elapsed() >= fence || !validity.holds(std::time::Instant::now()) {
            validity.revoke();
            let _ = lost
                .send(format!(
                    "the ownership lease `{key}` could not be renewed for {fence:?}; stopping before it can run out"
                ))
                .await;
            return;
        }
        let sent = tokio::time::Instant::now();
        let renewal = kv.update(key.as_str(), holder.clone().into(), revision);
        match tokio::time::timeout(renewed + fence - sent, renewal).await {
            Ok(Ok(next)) => {
                revision = next;
                current.store(next, Ordering::Release);
                renewed = sent;
                // A renewal that comes back after the deadline passed does not revive it: the
                // loop ends at the check above.
                validity.extend(sent.into_std() + fence);
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                validity.revoke();
                let _ = lost
                    .send(format!("the ownership lease `{key}` was taken over"))
                    .await;
                return;
            }
            Ok(Err(error)) => tracing::warn!(%key, %error, "ownership lease not renewed"),
            Err(_) => tracing::warn!(%key, "ownership lease renewal unanswered"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_claim_holds_until_its_deadline_and_a_passed_one_stays_passed() {
        let validity = Validity::default();
        let now = Instant::now();
        assert!(!validity.holds(now), "nothing granted yet");
        validity.grant(now + Duration::from_secs(10));
        assert!(validity.holds(now));
        assert!(validity.extend(now + Duration::from_secs(20)));
        assert!(validity.holds(now + Duration::from_secs(15)));
        // An older confirmation never moves the deadline back.
        assert!(validity.extend(now + Duration::from_secs(5)));
        assert!(validity.holds(now + Duration::from_secs(15)));
        // Seen passed once, it is final: a later confirmation does not revive it.
        assert!(!validity.holds(now + Duration::from_secs(25)));
        assert!(!validity.extend(now + Duration::from_secs(60)));
        assert!(!validity.holds(now));
        // A new claim starts afresh; a revoked one holds no more.
        validity.grant(now + Duration::from_secs(10));
        assert!(validity.holds(now));
        validity.revoke();
        assert!(!validity.holds(now));
    }

    #[test]
    fn a_confirmation_that_comes_after_the_deadline_does_not_extend_it() {
        let validity = Validity::default();
        let sent = Instant::now() - Duration::from_secs(2);
        validity.grant(sent + Duration::from_millis(500));
        assert!(!validity.extend(Instant::now() + Duration::from_secs(10)));
        assert!(!validity.holds(Instant::now()));
    }
}
