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
            shared.connect(&name).await.map(|(client, _signals)| client)
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
                reply.error = control
                    .restart_at(sequence)
                    .await
                    .err()
                    .map(|e| e.to_string())
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
        enough: impl Fn(&Reply) -> bool,
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
    /// The member that consumes the topic and moved its delivery (`pid <pid> client <id>`);
    /// `None` when no subscription of the group was running and the consumer itself was reset.
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
    /// subscription starts there. `wait` bounds how long the owner may take (its running
    /// handlers finish first).
    ///
    /// Only where the stream keeps the events: a `WorkQueue` topic deletes what it delivered,
    /// and a point before the first event kept is refused. Partitioned topics are refused for
    /// now (each partition has its own consumer).
    pub async fn reset_group(
        &self,
        topic: &Topic,
        to: ResetTo,
        wait: Duration,
    ) -> Result<GroupReset, NatsError> {
        let config = &self.shared.config;
        let group = &config.consumer.group;
        if config.partitions_of(topic) > 1 {
            return Err(NatsError::Unsupported(format!(
                "topic `{topic}` is partitioned: resetting a group on a partitioned topic is not supported yet"
            )));
        }
        let connection = self.shared.connection(topic).await?;
        if connection.retention == crate::Retention::WorkQueue {
            return Err(NatsError::Unsupported(format!(
                "topic `{topic}` keeps events until one group reads them (WorkQueue): what was read is gone, there is nothing to reset group `{group}` to; use Limits or Acknowledged retention to rebuild from the stream"
            )));
        }
        let consumer = config.consumer_name(topic);
        let consumer_state =
            crate::broker::consumer_state(&connection.client, &connection.stream, &consumer)
                .await
            .map_err(|e| match crate::broker::error_code(&e) {
                Some(crate::broker::codes::CONSUMER_NOT_FOUND) => NatsError::NotFound(format!(
                    "consumer group `{group}` never subscribed to topic `{topic}` (no consumer `{consumer}`)"
                )),
                _ => e,
            })?;
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
        let request = Request::MoveTo { sequence };
        match self
            .control_request_until(topic, &request, wait, |r| r.owner && r.error.is_none())
            .await
        {
            Ok(replies) => match replies.iter().find(|r| r.owner && r.error.is_none()) {
                Some(done) => Ok(GroupReset {
                    sequence,
                    moved_by: Some(done.member.clone()),
                }),
                None => Err(NatsError::Refused {
                    what: format!("move group `{group}` on topic `{topic}` to {sequence}"),
                    refusals: replies
                        .into_iter()
                        .map(|r| MemberRefusal {
                            member: r.member,
                            reason: r.error.unwrap_or_else(|| {
                                "no answer from the subscription that consumes the topic".into()
                            }),
                        })
                        .collect(),
                }),
            },
            Err(NatsError::Unanswered(_)) => {
                // No subscription of the group runs: the consumer itself moves.
                if !connection.pinned {
                    return Err(NatsError::Unsupported(format!(
                        "no subscription of group `{group}` to topic `{topic}` is running, and nats-server {} cannot reset a consumer (2.14 can); start a subscription and reset again",
                        connection.server_version
                    )));
                }
                // A client pinned to the consumer is consuming it, yet did not answer: moving
                // the consumer under it would hand it a replay it takes for copies.
                let pinned = crate::broker::consumer_state(
                    &connection.client,
                    &connection.stream,
                    &consumer,
                )
                .await?
                .pinned;
                if consumer_state.pinned || pinned {
                    return Err(NatsError::Unanswered(format!(
                        "a subscription of group `{group}` consumes topic `{topic}` but did not answer within {wait:?}: wait longer (its running handlers finish first), or for its pin to expire if it is gone"
                    )));
                }
                crate::broker::reset_consumer(
                    &connection.client,
                    &connection.stream,
                    &consumer,
                    Some(sequence),
                )
                .await?;
                Ok(GroupReset {
                    sequence,
                    moved_by: None,
                })
            }
            Err(e) => Err(e),
        }
    }
}
