//! Consumer groups over partitioned topics: the processes of one group divide a topic's
//! partitions among themselves, each partition consumed by exactly one of them at a time.
//!
//! * **Membership**: each subscription puts a key `<group>.<topic>.<member>` in the KV bucket
//!   `BUS_MEMBERS`, whose `max_age` is `takeover_after`, and renews it every third of that. A
//!   member that crashes drops out when its key ages out; one that closes purges it (no delete
//!   marker is left). The live members are the subjects the bucket's stream holds under the
//!   group's prefix, read with one stream-info request (servers 2.9+ answer it alike; listing
//!   the keys through a consumer could hang on old servers). Every request of the group has a
//!   deadline, on the bus's coordination connection.
//! * **Assignment**: rendezvous hashing. Partition `p` goes to the live member with the highest
//!   FNV-1a hash of `<member>/<p>`: every member computes the same assignment from the same
//!   members, and a join or a leave moves only the partitions that must move.
//! * **Handover**: each partition has its own durable consumer and its own ownership (a pinned
//!   priority group, or a lease before 2.14; see `ownership`). A member that is no longer
//!   assigned a partition closes its subscription to it: it drains, acknowledges, confirms its
//!   acks and unpins (or releases the lease). The member it now belongs to subscribes at once,
//!   but as a standby: it takes over only once the old owner has let go (or, after a crash, its
//!   claim ran out after `takeover_after`), and it restarts delivery at the ack floor before
//!   handling anything. A member revokes and takes partitions at the same time: different
//!   partitions never wait for each other.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bus_core::{
    AggregateControl, CloseReport, HaltedAggregate, SubscribeError, SubscribeErrorKind,
    Subscription, SubscriptionHandle, SubscriptionMetrics, Topic,
};
use futures::StreamExt;
use tokio::sync::watch;

use super::{setup, subscribe_error, Dispatch, NatsSubscription, Target};
use crate::{NatsError, Shared};

/// The KV bucket of group memberships.
pub(crate) const MEMBERS_BUCKET: &str = "BUS_MEMBERS";

/// The partitions `member` owns among `members`: rendezvous hashing with a cap. Partition by
/// partition, in order, each goes to the member that scores highest for it among those that
/// have fewer than ⌈partitions / members⌉ yet. Every member computes the same assignment from
/// the same members; each gets its fair share (plain rendezvous hashing leaves some members
/// without any of a few partitions); and a join or a leave moves few partitions.
pub(crate) fn assigned(member: &str, members: &BTreeSet<String>, partitions: u32) -> Vec<u32> {
    // FNV-1a (64 bits) of `<member>/<partition>`, finished with splitmix64's mixer: FNV alone
    // leaves the members in nearly the same order for every partition. Both are fixed
    // functions, so every member, of any version, computes the same assignment.
    let score = |m: &str, p: u32| {
        let mut z = format!("{m}/{p}")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    if members.is_empty() {
        return Vec::new();
    }
    let cap = (partitions as usize).div_ceil(members.len());
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut mine = Vec::new();
    for p in 0..partitions {
        let owner = members
            .iter()
            .filter(|m| counts.get(m.as_str()).copied().unwrap_or(0) < cap)
            .max_by_key(|m| (score(m, p), m.as_str()))
            .expect("the caps leave room for every partition");
        *counts.entry(owner.as_str()).or_default() += 1;
        if owner == member {
            mine.push(p);
        }
    }
    mine
}

/// The partition subscriptions a member runs now.
type Running = Arc<Mutex<HashMap<u32, RunningPartition>>>;

struct RunningPartition {
    control: Arc<super::NatsControl>,
    subscription: NatsSubscription,
}

/// A subscription to a partitioned topic: the partitions this member owns.
struct GroupSubscription {
    topic: Topic,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    heartbeat: tokio::task::JoinHandle<()>,
    running: Running,
    control: Arc<GroupControl>,
    /// The coordination connection, and how long a request on it may take.
    client: async_nats::Client,
    deadline: Duration,
    key: String,
    /// Reports of partitions handed over while the subscription ran.
    handed_over: Arc<Mutex<CloseReport>>,
    _registration: super::registry::Registration,
}

pub(crate) async fn start(
    shared: Arc<Shared>,
    memory: Arc<super::BatchMemory>,
    topic: &Topic,
    dispatch: Dispatch,
    partitions: u32,
) -> Result<Subscription, SubscribeError> {
    let fail = |e: NatsError| subscribe_error(topic, e);
    let config = &shared.config;
    super::require_group(config, topic).map_err(fail)?;
    let connection = shared.connection(topic).await.map_err(fail)?;
    let coordination = shared.coordination().await.map_err(fail)?;
    let deadline = config.consumer.takeover_after;
    // One member per process: a second one would only fight for the same partitions.
    let registration = super::registry::Registration::claim(
        &config.connection.servers,
        &connection.stream,
        &config.consumer_name(topic),
        topic,
    )?;
    let kv = super::ownership::within(
        deadline,
        "opening the group membership bucket",
        crate::broker::ensure_bucket(
            &coordination.client,
            &coordination.jetstream,
            MEMBERS_BUCKET,
            config.consumer.takeover_after,
            config.consumer.coordination_replicas,
        ),
    )
    .await
    .and_then(|kv| kv)
    .map_err(fail)?;
    let member = connection
        .client
        .new_inbox()
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let prefix = format!("{}.{topic}.", config.consumer.group);
    let key = format!("{prefix}{member}");
    let joining = format!("joining group `{prefix}*`");
    super::ownership::within(
        deadline,
        &joining,
        kv.put(key.as_str(), bytes::Bytes::new()),
    )
    .await
    .and_then(|put| put.map_err(|e| NatsError::api(joining.clone(), e)))
    .map_err(fail)?;
    tracing::info!(%topic, group = %config.consumer.group, %member, partitions, "joined the consumer group");

    let running: Running = Arc::default();
    let handed_over = Arc::new(Mutex::new(CloseReport::default()));
    let (stop, stop_rx) = watch::channel(false);
    let every = config.consumer.takeover_after / 3;
    let heartbeat = tokio::spawn({
        let (kv, key, topic) = (kv.clone(), key.clone(), topic.clone());
        async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match tokio::time::timeout(every, kv.put(key.as_str(), bytes::Bytes::new())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%topic, %error, "group membership not renewed")
                    }
                    Err(_) => tracing::warn!(%topic, "group membership renewal unanswered"),
                }
            }
        }
    });
    let task = tokio::spawn(reconcile(Reconciler {
        client: coordination.client.clone(),
        shared: shared.clone(),
        memory,
        topic: topic.clone(),
        dispatch,
        partitions,
        member,
        prefix,
        kv: kv.clone(),
        running: running.clone(),
        handed_over: handed_over.clone(),
        stop: stop_rx,
        every,
    }));
    let control = Arc::new(GroupControl {
        topic: topic.clone(),
        partitions,
        running: running.clone(),
        handover_wait: config.consumer.takeover_after,
    });
    Ok(Subscription::new(GroupSubscription {
        topic: topic.clone(),
        stop,
        task,
        heartbeat,
        running,
        control,
        client: coordination.client.clone(),
        deadline,
        key,
        handed_over,
        _registration: registration,
    }))
}

struct Reconciler {
    /// The coordination connection.
    client: async_nats::Client,
    shared: Arc<Shared>,
    memory: Arc<super::BatchMemory>,
    topic: Topic,
    dispatch: Dispatch,
    partitions: u32,
    member: String,
    prefix: String,
    kv: kv::Store,
    running: Running,
    handed_over: Arc<Mutex<CloseReport>>,
    stop: watch::Receiver<bool>,
    every: Duration,
}

/// Keeps the partitions this member runs equal to the ones assigned to it: on every change of
/// the membership (watched) and every third of `takeover_after` (members that crash do not
/// say so).
async fn reconcile(mut r: Reconciler) {
    let mut tick = tokio::time::interval(r.every);
    let mut changes = match tokio::time::timeout(r.every, r.kv.watch(format!("{}*", r.prefix)))
        .await
    {
        Ok(Ok(watch)) => Some(watch),
        Ok(Err(error)) => {
            tracing::warn!(topic = %r.topic, %error, "group membership cannot be watched; polling it");
            None
        }
        Err(_) => {
            tracing::warn!(topic = %r.topic, "group membership watch unanswered; polling it");
            None
        }
    };
    loop {
        tokio::select! {
            _ = r.stop.changed() => return,
            _ = tick.tick() => {}
            Some(_) = async {
                match &mut changes {
                    Some(watch) => watch.next().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let members = match members(&r.client, &r.prefix, r.every).await {
            Ok(mut members) => {
                // Itself, even before its key is visible.
                members.insert(r.member.clone());
                members
            }
            Err(error) => {
                tracing::warn!(topic = %r.topic, %error, "group membership could not be read");
                continue;
            }
        };
        let mine: BTreeSet<u32> = assigned(&r.member, &members, r.partitions)
            .into_iter()
            .collect();
        tracing::debug!(topic = %r.topic, member = %r.member, ?members, ?mine, "group assignment");
        let now: BTreeSet<u32> = r.running.lock().unwrap().keys().copied().collect();
        // What moves away is drained and released, all at once; what moves here starts at
        // the same time. A partition released by another member is taken over at once; one
        // still held elsewhere starts as a standby and takes over when it is released (every
        // partition has its own ownership, so the two never wait for each other).
        let revoked: Vec<RunningPartition> = {
            let mut running = r.running.lock().unwrap();
            now.difference(&mine)
                .filter_map(|p| running.remove(p))
                .collect()
        };
        let revoking = futures::future::join_all(revoked.into_iter().map(|partition| {
            let handed_over = r.handed_over.clone();
            async move {
                let topic = partition.subscription.topic.clone();
                match Box::new(partition.subscription)
                    .close(bus_core::Subscription::DEFAULT_CLOSE_DEADLINE)
                    .await
                {
                    Ok(report) => {
                        tracing::info!(%topic, ?report, "partition handed over");
                        let mut total = handed_over.lock().unwrap();
                        total.handled += report.handled;
                        total.returned += report.returned;
                        total.unconfirmed += report.unconfirmed;
                    }
                    Err(error) => tracing::warn!(%topic, %error, "partition handed over uncleanly"),
                }
            }
        }));
        let assigning = async {
            for p in mine.difference(&now) {
                if *r.stop.borrow() {
                    return;
                }
                let target = Target {
                    topic: r.topic.clone(),
                    subject: Topic::new(format!("{}.{p}", r.topic))
                        .expect("a partition subject is a valid topic"),
                    consumer: format!("{}-p{p}", r.shared.config.consumer_name(&r.topic)),
                    partition: Some(*p),
                };
                match setup(&r.shared, &r.memory, &target, r.dispatch.clone()).await {
                    Ok(subscription) => {
                        let control = subscription.control.clone();
                        r.running.lock().unwrap().insert(
                            *p,
                            RunningPartition {
                                control,
                                subscription,
                            },
                        );
                    }
                    Err(error) => {
                        tracing::warn!(topic = %r.topic, partition = p, %error, "partition not started; trying again")
                    }
                }
            }
        };
        futures::join!(revoking, assigning);
        if *r.stop.borrow() {
            return;
        }
    }
}

/// The live members of a group: the subjects of the membership bucket's stream under `prefix`
/// (a member's key ages out `takeover_after` after its last renewal; a member that leaves
/// purges it). One request, answered alike by every server version, within `deadline`.
async fn members(
    client: &async_nats::Client,
    prefix: &str,
    deadline: Duration,
) -> Result<BTreeSet<String>, NatsError> {
    let subjects = format!("$KV.{MEMBERS_BUCKET}.{prefix}");
    let stored = crate::broker::stream_subjects(
        client,
        &format!("KV_{MEMBERS_BUCKET}"),
        &format!("{subjects}*"),
        deadline,
    )
    .await?;
    Ok(stored
        .keys()
        .filter_map(|subject| subject.strip_prefix(&subjects))
        .map(str::to_owned)
        .collect())
}

/// Leaves the group: the member's key is purged from the bucket's stream, leaving no marker,
/// within `deadline`.
async fn leave(
    client: &async_nats::Client,
    key: &str,
    deadline: Duration,
) -> Result<(), NatsError> {
    crate::broker::purge_subject(
        client,
        &format!("KV_{MEMBERS_BUCKET}"),
        &format!("$KV.{MEMBERS_BUCKET}.{key}"),
        deadline,
    )
    .await
}

/// Operator control across the partitions this member runs.
struct GroupControl {
    topic: Topic,
    partitions: u32,
    running: Running,
    /// How long a move waits for a partition being handed over to this member to be taken
    /// over (`takeover_after`: the longest a member that is gone can hold it).
    handover_wait: Duration,
}

impl GroupControl {
    fn controls(&self) -> Vec<Arc<dyn AggregateControl>> {
        self.partition_controls()
            .into_iter()
            .map(|(_, c)| c as Arc<dyn AggregateControl>)
            .collect()
    }

    fn partition_controls(&self) -> Vec<(u32, Arc<super::NatsControl>)> {
        let mut controls: Vec<_> = self
            .running
            .lock()
            .unwrap()
            .iter()
            .map(|(p, r)| (*p, r.control.clone()))
            .collect();
        controls.sort_unstable_by_key(|(p, _)| *p);
        controls
    }

    fn of_key(&self, key: &str) -> Result<Arc<dyn AggregateControl>, SubscribeError> {
        let p = bus_core::wire::partition_of(key, self.partitions);
        self.running
            .lock()
            .unwrap()
            .get(&p)
            .map(|r| r.control.clone() as Arc<dyn AggregateControl>)
            .ok_or_else(|| {
                SubscribeError::new(
                    SubscribeErrorKind::NotHalted,
                    format!(
                        "aggregate `{key}` of topic `{}` is in partition {p}, which this subscription does not consume now",
                        self.topic
                    ),
                )
            })
    }
}

#[async_trait]
impl AggregateControl for GroupControl {
    fn metrics(&self) -> SubscriptionMetrics {
        let controls = self.controls();
        let mut total = SubscriptionMetrics {
            partitions: controls.len() as u64,
            ..SubscriptionMetrics::default()
        };
        for control in controls {
            let m = control.metrics();
            total.handled += m.handled;
            total.dead_lettered += m.dead_lettered;
            total.copies_skipped += m.copies_skipped;
            total.in_flight += m.in_flight;
            total.queued += m.queued;
            total.acks_waiting += m.acks_waiting;
            total.halted_aggregates += m.halted_aggregates;
            total.halted_events += m.halted_events;
            total.owner |= m.owner;
            total.ownership_gained += m.ownership_gained;
            total.ownership_lost += m.ownership_lost;
            total.delivery_restarts += m.delivery_restarts;
            total.delivery_moves += m.delivery_moves;
            total.unreadable += m.unreadable;
        }
        total
    }

    fn halted(&self) -> Vec<HaltedAggregate> {
        self.controls().iter().flat_map(|c| c.halted()).collect()
    }

    async fn resume(&self, key: &str) -> Result<(), SubscribeError> {
        self.of_key(key)?.resume(key).await
    }

    async fn skip(&self, key: &str) -> Result<(), SubscribeError> {
        self.of_key(key)?.skip(key).await
    }

    fn partitions(&self) -> Vec<u32> {
        let mut partitions: Vec<u32> = self.running.lock().unwrap().keys().copied().collect();
        partitions.sort_unstable();
        partitions
    }

    /// Moves every partition this member runs, one after another. A partition assigned to it
    /// but still being handed over from another member (a standby until that one lets go) is
    /// moved once this member takes it over, within `takeover_after`: nobody else moves it.
    async fn restart_at(&self, sequence: u64) -> Result<(), SubscribeError> {
        for (_, control) in self.partition_controls() {
            control.move_to(sequence, Some(self.handover_wait)).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl SubscriptionHandle for GroupSubscription {
    fn control(&self) -> Option<Arc<dyn AggregateControl>> {
        Some(self.control.clone())
    }

    async fn close(self: Box<Self>, deadline: Duration) -> Result<CloseReport, SubscribeError> {
        let GroupSubscription {
            topic,
            stop,
            task,
            heartbeat,
            running,
            control: _,
            client,
            deadline: request_deadline,
            key,
            handed_over,
            _registration,
        } = *self;
        let started = tokio::time::Instant::now();
        let _ = stop.send(true);
        // The reconciler stops between steps; a hand-over it is in the middle of is bounded by
        // the same deadline as this close.
        let mut task = task;
        if tokio::time::timeout(deadline, &mut task).await.is_err() {
            tracing::warn!(%topic, "the group's reconciler did not stop within the close deadline");
            task.abort();
        }
        heartbeat.abort();
        let deadline = deadline.saturating_sub(started.elapsed());
        let partitions: Vec<NatsSubscription> = running
            .lock()
            .unwrap()
            .drain()
            .map(|(_, r)| r.subscription)
            .collect();
        let closes = partitions.into_iter().map(|s| Box::new(s).close(deadline));
        let results = futures::future::join_all(closes).await;
        // Leave the group only once every partition is released: the others take them over.
        if let Err(error) = leave(&client, &key, request_deadline).await {
            tracing::warn!(%topic, %error, "group membership not removed; it runs out by itself");
        }
        let mut total = handed_over.lock().unwrap().clone();
        let mut first_error = None;
        for result in results {
            match result {
                Ok(report) => {
                    total.handled += report.handled;
                    total.returned += report.returned;
                    total.unconfirmed += report.unconfirmed;
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(members: &[&str]) -> BTreeSet<String> {
        members.iter().map(|m| m.to_string()).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner_and_a_join_moves_few() {
        let three = set(&["a", "b", "c"]);
        let mut owners = vec![0; 64];
        for m in &three {
            for p in assigned(m, &three, 64) {
                owners[p as usize] += 1;
            }
        }
        assert!(owners.iter().all(|&n| n == 1), "{owners:?}");
        // Shared out evenly: at most ⌈partitions / members⌉ each, whatever the names.
        for (members, partitions) in [
            (set(&["a", "b", "c"]), 64u32),
            (
                set(&[
                    "BESb9JDuKQIt3DHJlohbzO",
                    "DuMJhnMKx5vwAcMttFt2zl",
                    "losLsiG3c7qisTqnu6BMWu",
                ]),
                8,
            ),
            (set(&["m1", "m2", "m3", "m4"]), 8),
            (set(&["x", "y", "z", "w", "v"]), 8),
        ] {
            let cap = (partitions as usize).div_ceil(members.len());
            let floor = partitions as usize / members.len();
            for m in &members {
                let n = assigned(m, &members, partitions).len();
                assert!((floor..=cap).contains(&n), "{m}: {n} of {partitions}");
            }
        }
        // A fourth member moves few partitions: about a quarter, not all.
        let four = set(&["a", "b", "c", "d"]);
        let moved = (0..64)
            .filter(|&p| {
                let before = three.iter().find(|m| assigned(m, &three, 64).contains(&p));
                let after = four.iter().find(|m| assigned(m, &four, 64).contains(&p));
                before != after
            })
            .count();
        assert!(moved <= 32, "{moved} of 64 moved");
    }
}
