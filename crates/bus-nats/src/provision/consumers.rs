//! A subscription's durable consumer (and the dead-letter stream it needs): created, updated or
//! validated as the configuration asks.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};

use super::{mismatches, Mismatches, PRIORITY_GROUP};
use crate::config::{ConsumerSpec, Provisioning, StartAt};
use crate::NatsError;

/// The topic's durable. With `pinned` (servers 2.14+) it has a priority group with the
/// pinned-client policy, so that one subscription consumes and the others wait as standbys.
pub(crate) fn consumer_config(
    name: &str,
    filter_subject: &str,
    spec: &ConsumerSpec,
    pinned: bool,
) -> consumer::pull::Config {
    let (priority_policy, priority_groups, priority_timeout) = if pinned {
        (
            consumer::PriorityPolicy::PinnedClient,
            vec![PRIORITY_GROUP.to_owned()],
            spec.takeover_after,
        )
    } else {
        (consumer::PriorityPolicy::None, Vec::new(), Duration::ZERO)
    };
    consumer::pull::Config {
        priority_policy,
        priority_groups,
        priority_timeout,
        durable_name: Some(name.to_owned()),
        name: Some(name.to_owned()),
        // Every consumer filters on its topic, so one topic's fetcher never receives another
        // topic's messages even when several topics share a stream.
        filter_subject: filter_subject.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        deliver_policy: match spec.start {
            StartAt::Start => consumer::DeliverPolicy::All,
            StartAt::New => consumer::DeliverPolicy::New,
            StartAt::Sequence(start_sequence) => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            StartAt::Time(time) => consumer::DeliverPolicy::ByStartTime {
                start_time: time.into(),
            },
        },
        max_ack_pending: spec.max_ack_pending,
        max_waiting: spec.max_waiting,
        // Redelivery is never the way a failed message is retried (the worker retries it in
        // place), so the broker's own limit stays unlimited.
        max_deliver: -1,
        ..Default::default()
    }
}

/// Fields of the consumer that differ from what was asked for.
fn consumer_mismatches(want: &consumer::pull::Config, have: &consumer::Config) -> Mismatches {
    mismatches!(want, have;
        filter_subject, ack_policy, ack_wait, max_ack_pending, max_waiting,
        priority_policy, priority_groups, priority_timeout,
    )
}

pub(crate) async fn ensure_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    want: &consumer::pull::Config,
    strategy: Provisioning,
) -> Result<consumer::PullConsumer, NatsError> {
    let name = want.durable_name.clone().unwrap_or_default();
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| NatsError::api(format!("looking up stream `{stream_name}`"), e))?;
    // Looked up by its info first: that error says "not found" by kind, not by text.
    let exists = match stream.consumer_info(&name).await {
        Ok(_) => true,
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => false,
        Err(e) => return Err(NatsError::api(format!("looking up consumer `{name}`"), e)),
    };
    let existing = if exists {
        Some(
            stream
                .get_consumer::<consumer::pull::Config>(&name)
                .await
                .map_err(|e| NatsError::api(format!("looking up consumer `{name}`"), e))?,
        )
    } else {
        None
    };
    match (strategy, existing) {
        (Provisioning::UseExisting | Provisioning::ValidateOnly, None) => Err(NatsError::Configuration(format!(
            "consumer `{name}` of stream `{stream_name}` does not exist and provisioning is {strategy:?}"
        ))),
        (Provisioning::UseExisting, Some(c)) => Ok(c),
        (Provisioning::ValidateOnly | Provisioning::Create, Some(mut c)) => {
            let info = c.info().await.map_err(|e| NatsError::api(format!("reading consumer `{name}`"), e))?;
            let mismatches = consumer_mismatches(want, &info.config);
            if mismatches.is_empty() {
                Ok(c)
            } else if let Some(error) = ownership_differs(&name, stream_name, want, &info.config) {
                Err(error)
            } else {
                Err(mismatches.error(format!("consumer `{name}` of stream `{stream_name}`")))
            }
        }
        (Provisioning::CreateOrUpdate, Some(mut c)) => {
            let info = c.info().await.map_err(|e| NatsError::api(format!("reading consumer `{name}`"), e))?;
            if consumer_mismatches(want, &info.config).is_empty() {
                return Ok(c);
            }
            // Members that hold the consumer differently would not exclude each other: never
            // switch it under a running owner.
            if let Some(error) = ownership_differs(&name, stream_name, want, &info.config) {
                return Err(error);
            }
            stream
                .update_consumer(want.clone())
                .await
                .map_err(|e| NatsError::api(format!("updating consumer `{name}`"), e))
        }
        (Provisioning::Create | Provisioning::CreateOrUpdate, None) => {
            match stream.create_consumer(want.clone()).await {
                Ok(c) => Ok(c),
                Err(e) if work_queue_taken(&e) => {
                    Err(second_group_error(&stream, stream_name, &name, want).await)
                }
                Err(e) => Err(NatsError::api(format!("creating consumer `{name}`"), e)),
            }
        }
    }
}

/// The error for a consumer owned otherwise than this subscriber is set to own it, if it is.
fn ownership_differs(
    name: &str,
    stream_name: &str,
    want: &consumer::pull::Config,
    have: &consumer::Config,
) -> Option<NatsError> {
    (have.priority_policy != want.priority_policy).then(|| {
        NatsError::Configuration(format!(
            "consumer `{name}` of stream `{stream_name}` is owned {}, this subscriber is set to own it {} (`consumer.ownership`): set every member of the group alike, or delete the consumer to change how the group owns it",
            ownership_of(&have.priority_policy),
            ownership_of(&want.priority_policy),
        ))
    })
}

/// How a consumer's priority policy has it owned, in words.
fn ownership_of(policy: &consumer::PriorityPolicy) -> &'static str {
    match policy {
        consumer::PriorityPolicy::PinnedClient => "by a pinned-client priority group",
        _ => "by a lease (no priority group)",
    }
}

/// Whether the broker refused a consumer because the work-queue stream's subjects already have
/// one.
fn work_queue_taken(error: &async_nats::jetstream::stream::ConsumerError) -> bool {
    use async_nats::jetstream::{stream::ConsumerErrorKind, ErrorCode};
    match error.kind() {
        ConsumerErrorKind::JetStream(e) => matches!(
            e.error_code(),
            ErrorCode::CONSUMER_WQ_CONSUMER_NOT_UNIQUE | ErrorCode::CONSUMER_WQ_MULTIPLE_UNFILTERED
        ),
        _ => false,
    }
}

/// Says that a work-queue topic has a consumer group already, which one, and what to do.
async fn second_group_error(
    stream: &jetstream::stream::Stream,
    stream_name: &str,
    name: &str,
    want: &consumer::pull::Config,
) -> NatsError {
    use futures::TryStreamExt;
    let others: Vec<String> = match stream.consumer_names().try_collect::<Vec<_>>().await {
        Ok(names) => names.into_iter().filter(|n| n != name).collect(),
        Err(_) => Vec::new(),
    };
    let others = if others.is_empty() {
        "another consumer".to_owned()
    } else {
        format!("`{}`", others.join("`, `"))
    };
    NatsError::Configuration(format!(
        "consumer `{name}` cannot read `{topic}`: stream `{stream_name}` uses work-queue retention, \
         which lets one consumer group read a topic, and {others} already does. For several \
         groups (several services, projections) give the topic's stream \
         `Retention::Acknowledged`; to join the existing group use its `consumer.group`",
        topic = want.filter_subject,
    ))
}
