//! Remote control of halted aggregates: every subscription answers requests on
//! `$BUS.control.<group>.<topic>`, so that an operator (the `bus` CLI, or
//! [`NatsBus::remote_halted`] from any process) can list, resume and skip the halted
//! aggregates of a consumer group without being inside the service.
//!
//! Every replica of the group answers (standbys with nothing halted); a request gathers the
//! answers that arrive within its wait. Requests and replies are JSON.

use std::sync::Arc;
use std::time::Duration;

use bus_core::{AggregateControl, HaltedAggregate, Topic};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::connection::Shared;
use crate::{MemberRefusal, NatsBus, NatsError};

/// The subject prefix of control requests. No topic can start with `$`, so it never collides
/// with a topic's subject.
pub const CONTROL_PREFIX: &str = "$BUS.control";

/// How long a control request gathers answers by default.
pub const DEFAULT_CONTROL_WAIT: Duration = Duration::from_millis(500);

/// The subject the subscriptions of `group` to `topic` answer control requests on.
pub fn control_subject(group: &str, topic: &Topic) -> String {
    format!("{CONTROL_PREFIX}.{group}.{topic}")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
    Halted,
    Resume { key: String },
    Skip { key: String },
    MoveTo { sequence: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    member: String,
    owner: bool,
    #[serde(default)]
    halted: Vec<HaltedAggregate>,
    #[serde(default)]
    error: Option<String>,
    /// For a move on a partitioned topic: the partitions this member moved.
    #[serde(default)]
    moved: Vec<u32>,
}

/// What one subscription (one replica of the group) answered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemberHalts {
    /// Which process and connection answered: `pid <pid> client <id>`.
    pub member: String,
    /// Whether it consumes the topic (or some of its partitions) now.
    pub owner: bool,
    /// Its halted aggregates.
    pub halted: Vec<HaltedAggregate>,
}

/// The connection control requests are answered on: its own, so that a user without the
/// permission for them gets a violation there, never on a topic's connection. Made by the first
/// subscription that answers them.
#[derive(Debug, Default)]
pub(crate) struct ControlConnection(tokio::sync::OnceCell<async_nats::Client>);

impl ControlConnection {
    /// The connection, if one was made.
    pub(crate) fn get(&self) -> Option<&async_nats::Client> {
        self.0.get()
    }
}

/// Answers control requests for one subscription until it closes.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    connection: Arc<ControlConnection>,
    topic: Topic,
    control: Arc<dyn AggregateControl>,
) {
    let client = match connection
        .0
        .get_or_try_init(|| async {
            let name = Topic::new("bus-control").expect("a valid topic");
            shared
                .connect(
                    &name,
                    crate::connection::Role::Topic,
                    crate::connection::On::Home,
                )
                .await
                .map(|(client, _signals)| client)
        })
        .await
    {
        Ok(client) => client.clone(),
        Err(error) => {
            tracing::warn!(%topic, %error, "control requests cannot be answered");
            return;
        }
    };
    let subject = control_subject(&shared.config.consumer.group, &topic);
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(requests) => requests,
        Err(error) => {
            tracing::warn!(%topic, %error, "control requests cannot be answered");
            return;
        }
    };
    let member = format!(
        "pid {} client {}",
        std::process::id(),
        client.server_info().client_id
    );
    while let Some(message) = requests.next().await {
        let Some(reply_to) = message.reply else {
            continue;
        };
        let mut reply = Reply {
            member: member.clone(),
            owner: control.metrics().owner,
            halted: Vec::new(),
            error: None,
            moved: Vec::new(),
        };
        match serde_json::from_slice::<Request>(&message.payload) {
            Ok(Request::Halted) => reply.halted = control.halted(),
            Ok(Request::Resume { key }) => {
                reply.error = control.resume(&key).await.err().map(|e| e.to_string())
            }
            Ok(Request::Skip { key }) => {
                reply.error = control.skip(&key).await.err().map(|e| e.to_string())
            }
            Ok(Request::MoveTo { sequence }) => {
                let partitions = control.partitions();
                match control.restart_at(sequence).await {
                    Ok(()) => reply.moved = partitions,
                    Err(e) => reply.error = Some(e.to_string()),
                }
            }
            Err(e) => reply.error = Some(format!("unreadable control request: {e}")),
        }
        let body = serde_json::to_vec(&reply).expect("replies serialise");
        if let Err(error) = client.publish(reply_to, body.into()).await {
            tracing::debug!(%topic, %error, "control reply not sent");
        }
    }
}

impl NatsBus {
    async fn control_request(
        &self,
        topic: &Topic,
        request: &Request,
        wait: Duration,
    ) -> Result<Vec<Reply>, NatsError> {
        self.control_request_until(topic, request, wait, |_| false)
            .await
    }

    /// [`Self::control_request`], done as soon as a reply satisfies `enough`.
    async fn control_request_until(
        &self,
        topic: &Topic,
        request: &Request,
        wait: Duration,
        mut enough: impl FnMut(&Reply) -> bool,
    ) -> Result<Vec<Reply>, NatsError> {
        let connection = self.shared.connection(topic).await?;
        let client = &connection.client;
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| NatsError::api("subscribing to control replies".to_owned(), e))?;
        let subject = control_subject(&self.shared.config.consumer.group, topic);
        client
            .publish_with_reply(
                subject,
                inbox,
                serde_json::to_vec(request)
                    .expect("requests serialise")
                    .into(),
            )
            .await
            .map_err(|e| NatsError::api("sending a control request".to_owned(), e))?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
            match serde_json::from_slice::<Reply>(&message.payload) {
                Ok(reply) if enough(&reply) => {
                    out.push(reply);
                    break;
                }
                Ok(reply) => out.push(reply),
                Err(e) => tracing::warn!(error = %e, "unreadable control reply"),
            }
        }
        if out.is_empty() {
            return Err(NatsError::Unanswered(format!(
                "no subscription of group `{}` to topic `{topic}` answered within {wait:?}",
                self.shared.config.consumer.group
            )));
        }
        out.sort_by(|a, b| a.member.cmp(&b.member));
        Ok(out)
    }

    /// The halted aggregates of this bus's consumer group on `topic`, as each live subscription
    /// of the group (in any process) reports them within `wait`. Fails if none answers.
    pub async fn remote_halted(
        &self,
        topic: &Topic,
        wait: Duration,
    ) -> Result<Vec<MemberHalts>, NatsError> {
        Ok(self
            .control_request(topic, &Request::Halted, wait)
            .await?
            .into_iter()
            .map(|r| MemberHalts {
                member: r.member,
                owner: r.owner,
                halted: r.halted,
            })
            .collect())
    }

    /// Resumes halted aggregate `key` of this bus's group on `topic` in whichever process
    /// holds it ([`AggregateControl::resume`]). Fails if no subscription has it halted.
    pub async fn remote_resume(
        &self,
        topic: &Topic,
        key: &str,
        wait: Duration,
    ) -> Result<String, NatsError> {
        self.remote_settle(
            topic,
            Request::Resume {
                key: key.to_owned(),
            },
            wait,
        )
        .await
    }

    /// Skips (dead-letters) the failed event of halted aggregate `key` of this bus's group on
    /// `topic` in whichever process holds it ([`AggregateControl::skip`]).
    pub async fn remote_skip(
        &self,
        topic: &Topic,
        key: &str,
        wait: Duration,
    ) -> Result<String, NatsError> {
        self.remote_settle(
            topic,
            Request::Skip {
                key: key.to_owned(),
            },
            wait,
        )
        .await
    }

    /// Sends a resume or skip; the member that did it, or why none could.
    async fn remote_settle(
        &self,
        topic: &Topic,
        request: Request,
        wait: Duration,
    ) -> Result<String, NatsError> {
        let replies = self.control_request(topic, &request, wait).await?;
        if let Some(done) = replies.iter().find(|r| r.error.is_none()) {
            return Ok(done.member.clone());
        }
        let what = match &request {
            Request::Resume { key } => format!("resume aggregate `{key}` on topic `{topic}`"),
            Request::Skip { key } => {
                format!("skip the failed event of aggregate `{key}` on topic `{topic}`")
            }
            Request::Halted | Request::MoveTo { .. } => {
                unreachable!("only resume and skip are settled here")
            }
        };
        Err(NatsError::Refused {
            what,
            refusals: replies
                .into_iter()
                .map(|r| MemberRefusal {
                    member: r.member,
                    reason: r.error.unwrap_or_default(),
                })
                .collect(),
        })
    }
}

/// Where [`NatsBus::reset_group`] moves a consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The first event the topic's stream still keeps.
    Start,
    /// A stream sequence (as in [`bus_core::Delivery::stream_sequence`]).
    Sequence(u64),
    /// The first event stored at or after this time (the end, if none is).
    Time(std::time::SystemTime),
}

/// What [`NatsBus::reset_group`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupReset {
    /// The stream sequence delivery restarts at.
    pub sequence: u64,
    /// The member that consumes the topic and moved its delivery (`pid <pid> client <id>`; on
    /// a partitioned topic each member that moved some, with its partitions, comma-separated);
    /// `None` when no subscription of the group was running and the consumers themselves were
    /// reset.
    pub moved_by: Option<String>,
}

impl NatsBus {
    /// Moves this bus's consumer group on `topic` to a point of the stream, to rebuild what it
    /// builds from there (or to skip ahead). The subscription that consumes the topic, in
    /// whichever process, does it as a discontinuity: its running handlers finish, what it has
    /// queued is released unhandled, and every aggregate's events are delivered again in order
    /// from the point (handlers see versions they saw before: a projection rebuilt this way
    /// starts from its state at that point, or from scratch with [`ResetTo::Start`]). With no
    /// subscription of the group running, the group's consumer is reset, and the next
    /// subscription starts there (nats-server 2.14+: older servers have no consumer reset API,
    /// and a running subscription must move it). `wait` bounds how long the owner may take (its
    /// running handlers finish first).
    ///
    /// On a partitioned topic every partition moves: each member moves the partitions it
    /// consumes, and the consumers of partitions nobody consumes now are reset directly. A
    /// partition being handed over to a member is moved by that member once the one it comes
    /// from has let go, within `consumer.takeover_after`: give `wait` more than that.
    ///
    /// Only where the stream keeps the events: a `WorkQueue` topic deletes what it delivered,
    /// and a point before the first event kept is refused.
    pub async fn reset_group(
        &self,
        topic: &Topic,
        to: ResetTo,
        wait: Duration,
    ) -> Result<GroupReset, NatsError> {
        let config = &self.shared.config;
        let group = &config.consumer.group;
        let connection = self.shared.connection(topic).await?;
        if connection.retention == crate::Retention::WorkQueue {
            return Err(NatsError::Unsupported(format!(
                "topic `{topic}` keeps events until one group reads them (WorkQueue): what was read is gone, there is nothing to reset group `{group}` to; use Limits or Acknowledged retention to rebuild from the stream"
            )));
        }
        // One consumer per partition of a partitioned topic.
        let partitions = config.partitions_of(topic);
        let consumers: Vec<String> = if partitions > 1 {
            (0..partitions)
                .map(|p| format!("{}-p{p}", config.consumer_name(topic)))
                .collect()
        } else {
            vec![config.consumer_name(topic)]
        };
        let mut pinned_before = Vec::with_capacity(consumers.len());
        let mut pin_group = Vec::with_capacity(consumers.len());
        for consumer in &consumers {
            let state =
                crate::broker::consumer_state(&connection.client, &connection.stream, consumer)
                    .await
                    .map_err(|e| match crate::broker::error_code(&e) {
                        Some(crate::broker::codes::CONSUMER_NOT_FOUND) => NatsError::NotFound(format!(
                            "consumer group `{group}` never subscribed to topic `{topic}` (no consumer `{consumer}`)"
                        )),
                        _ => e,
                    })?;
            pinned_before.push(state.pinned);
            pin_group.push(state.pin_group);
        }
        let sequence = self.reset_point(topic, &connection, to).await?;
        let request = Request::MoveTo { sequence };
        // Done once a member reports a failure, or the moves cover every partition.
        let mut covered = std::collections::BTreeSet::new();
        let replies = match self
            .control_request_until(topic, &request, wait, |r| {
                if r.error.is_some() {
                    return true;
                }
                if partitions > 1 {
                    covered.extend(r.moved.iter().copied());
                    covered.len() == partitions as usize
                } else {
                    r.owner
                }
            })
            .await
        {
            Ok(replies) => replies,
            Err(NatsError::Unanswered(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        if replies.iter().any(|r| r.error.is_some()) {
            return Err(NatsError::Refused {
                what: format!("move group `{group}` on topic `{topic}` to {sequence}"),
                refusals: replies
                    .into_iter()
                    .filter(|r| r.error.is_some())
                    .map(|r| MemberRefusal {
                        member: r.member,
                        reason: r.error.unwrap_or_default(),
                    })
                    .collect(),
            });
        }
        let moved: Vec<&Reply> = replies
            .iter()
            .filter(|r| {
                if partitions > 1 {
                    !r.moved.is_empty()
                } else {
                    r.owner
                }
            })
            .collect();
        let moved_by = (!moved.is_empty()).then(|| {
            moved
                .iter()
                .map(|r| {
                    if partitions > 1 {
                        format!("{} (partitions {:?})", r.member, r.moved)
                    } else {
                        r.member.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        });
        // What no running subscription moved: the consumers themselves.
        let left: Vec<usize> = (0..consumers.len())
            .filter(|i| {
                if partitions > 1 {
                    !moved.iter().any(|r| r.moved.contains(&(*i as u32)))
                } else {
                    moved.is_empty()
                }
            })
            .collect();
        if left.is_empty() {
            return Ok(GroupReset { sequence, moved_by });
        }
        if !connection.can_reset {
            return Err(NatsError::Unsupported(format!(
                "no subscription of group `{group}` to topic `{topic}` moved {}, and nats-server {} (before 2.14) has no consumer reset API: a consumer is not reset without a subscription; start one and reset again",
                what_is_left(partitions, &left),
                connection.server_version
            )));
        }
        let mut leases = None;
        for &i in &left {
            // A subscription that owns the consumer (the broker pinned it, or it holds the
            // lease) consumes it, yet did not move it: moving the consumer under it would hand
            // it a replay it takes for copies. How the group owns it is read off the consumer,
            // not this process's configuration.
            let (consumed, expire) = match pin_group[i] {
                true => {
                    let pinned = crate::broker::consumer_state(
                        &connection.client,
                        &connection.stream,
                        &consumers[i],
                    )
                    .await?
                    .pinned;
                    (pinned_before[i] || pinned, "pin to expire")
                }
                false => {
                    if leases.is_none() {
                        leases = Some(self.leases().await?);
                    }
                    let kv = leases.as_ref().expect("opened above");
                    let held = kv.get(consumers[i].as_str()).await.map_err(|e| {
                        NatsError::api(
                            format!("reading the lease of consumer `{}`", consumers[i]),
                            e,
                        )
                    })?;
                    (held.is_some(), "lease to run out")
                }
            };
            if consumed {
                return Err(NatsError::Unanswered(format!(
                    "a subscription of group `{group}` consumes {} of topic `{topic}` but did not move it within {wait:?}: wait longer (its running handlers finish first), or for its {expire} if it is gone{}",
                    what_is_left(partitions, &[i]),
                    if moved.is_empty() { String::new() } else { format!("; moved already: {}", moved_by.clone().unwrap_or_default()) }
                )));
            }
        }
        for &i in &left {
            crate::broker::reset_consumer(
                &connection.client,
                &connection.stream,
                &consumers[i],
                Some(sequence),
            )
            .await?;
        }
        Ok(GroupReset { sequence, moved_by })
    }

    /// The bucket of the ownership leases (`BUS_OWNERS`), as the group's subscriptions open it.
    async fn leases(&self) -> Result<async_nats::jetstream::kv::Store, NatsError> {
        let config = &self.shared.config;
        let coordination = self.shared.coordination().await?;
        crate::subscriber::lease_store(
            &coordination.client,
            &coordination.jetstream,
            config.consumer.takeover_after,
            config.consumer.coordination_replicas,
        )
        .await
    }

    /// The stream sequence `to` stands for on `topic`'s stream, checked against what it keeps.
    async fn reset_point(
        &self,
        topic: &Topic,
        connection: &crate::TopicConnection,
        to: ResetTo,
    ) -> Result<u64, NatsError> {
        let group = &self.shared.config.consumer.group;
        let mut stream = connection
            .jetstream
            .get_stream(&connection.stream)
            .await
            .map_err(|e| NatsError::api(format!("looking up stream `{}`", connection.stream), e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| NatsError::api(format!("reading stream `{}`", connection.stream), e))?;
        // The stream as the broker has it (a configuration that uses an existing stream may
        // not say).
        if info.config.retention == async_nats::jetstream::stream::RetentionPolicy::WorkQueue {
            return Err(NatsError::Unsupported(format!(
                "topic `{topic}` is stored in work-queue stream `{}`: what was read is gone, there is nothing to reset group `{group}` to",
                connection.stream
            )));
        }
        let state = info.state.clone();
        let (first, end) = (state.first_sequence.max(1), state.last_sequence + 1);
        let sequence = match to {
            ResetTo::Start => first,
            ResetTo::Sequence(n) => n,
            ResetTo::Time(t) => {
                crate::broker::first_sequence_at(&connection.client, &connection.stream, t)
                    .await?
                    .unwrap_or(end)
            }
        };
        if sequence == 0 || sequence > end {
            return Err(NatsError::Invalid(bus_core::ValidationError::new(
                "sequence",
                sequence.to_string(),
                format!(
                    "must be from 1 to {end} (one past the last event of stream `{}`)",
                    connection.stream
                ),
            )));
        }
        if sequence < first {
            return Err(NatsError::Configuration(format!(
                "stream `{}` no longer keeps the events before {first} (its retention removed them): group `{group}` cannot be reset to {sequence}",
                connection.stream
            )));
        }
        Ok(sequence)
    }
}

/// "the topic", or "partition(s) …" of a partitioned one.
fn what_is_left(partitions: u32, left: &[usize]) -> String {
    if partitions > 1 {
        format!("partition(s) {left:?}")
    } else {
        "the topic".to_owned()
    }
}
