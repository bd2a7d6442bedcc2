//! How far a consumer group is behind on a topic, read from the broker.

use std::time::{Duration, SystemTime};

use bus_core::Topic;

use crate::connection::Shared;
use crate::{NatsBus, NatsError};

/// How far this bus's consumer group is behind on a topic (every partition, for a partitioned
/// one), as the broker sees it: what any replica of the group can report, whichever of them
/// consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lag {
    /// The topic.
    pub topic: Topic,
    /// Messages stored and not yet delivered to the group: events, or record batches of
    /// several events each (the broker counts messages).
    pub undelivered: u64,
    /// Messages delivered and not yet acknowledged (being handled, held by a halted aggregate,
    /// or left by a member that stopped); a record batch counts once.
    pub unacknowledged: u64,
    /// How long ago the oldest event the group has not handled was stored; `None` when it has
    /// handled everything.
    pub oldest_unhandled_age: Option<Duration>,
}

impl NatsBus {
    /// How far this bus's consumer group (`consumer.group`) is behind on `topic`. Reads the
    /// consumers (one per partition) and, for the age, the first stored event above the lowest
    /// ack floor; does not need a subscription in this process.
    ///
    /// Fails with [`NatsErrorKind::NotFound`](crate::NatsErrorKind::NotFound) when no stream
    /// stores the topic (nothing is created to answer) or the group has no consumer on it (it
    /// never subscribed): figures for either would look like a group keeping up.
    pub async fn lag(&self, topic: &Topic) -> Result<Lag, NatsError> {
        // Looked up, not provisioned: an operator's question creates nothing.
        let coordination = self.shared.coordination().await?;
        let stream = self.shared.config.stream_for(topic).name;
        if let Err(e) = coordination.jetstream.get_stream(&stream).await {
            return Err(match e.kind() {
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    NatsError::NotFound(format!(
                        "no stream stores topic `{topic}` (looked for stream `{stream}`)"
                    ))
                }
                _ => NatsError::api(format!("looking up stream `{stream}`"), e),
            });
        }
        lag_of(&self.shared, topic, Missing::Refuse).await
    }
}

/// What a consumer of the group that does not exist means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// The group never subscribed: an error (an operator's question).
    Refuse,
    /// Not subscribed yet: everything stored on its subject waits (a subscription's own
    /// sampling, which may run before a partition's consumer is created).
    Waiting,
}

/// See [`NatsBus::lag`].
pub(crate) async fn lag_of(
    shared: &Shared,
    topic: &Topic,
    missing: Missing,
) -> Result<Lag, NatsError> {
    {
        let connection = shared.connection(topic).await?;
        let config = &shared.config;
        let partitions = config.partitions_of(topic);
        let base = config.consumer_name(topic);
        let consumers: Vec<(String, String)> = if partitions > 1 {
            (0..partitions)
                .map(|p| (format!("{base}-p{p}"), format!("{topic}.{p}")))
                .collect()
        } else {
            vec![(base, topic.to_string())]
        };
        let stream = connection
            .jetstream
            .get_stream(&connection.stream)
            .await
            .map_err(|e| NatsError::api(format!("looking up stream `{}`", connection.stream), e))?;
        let mut lag = Lag {
            topic: topic.clone(),
            undelivered: 0,
            unacknowledged: 0,
            oldest_unhandled_age: None,
        };
        for (name, subject) in consumers {
            let info = match stream.consumer_info(&name).await {
                Ok(info) => info,
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound
                        && missing == Missing::Refuse =>
                {
                    return Err(NatsError::NotFound(format!(
                        "consumer group `{}` has no consumer on topic `{topic}` (`{name}`): it never subscribed to it",
                        config.consumer.group
                    )));
                }
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound =>
                {
                    // Never subscribed: everything stored on the subject waits.
                    let pending = stream_messages_on(&stream, &subject).await?;
                    lag.undelivered += pending;
                    if pending > 0 {
                        let age =
                            first_age(&connection.client, &connection.stream, &subject, 1).await?;
                        lag.oldest_unhandled_age = lag.oldest_unhandled_age.max(age);
                    }
                    continue;
                }
                Err(e) => return Err(NatsError::api(format!("reading consumer `{name}`"), e)),
            };
            lag.undelivered += info.num_pending;
            lag.unacknowledged += info.num_ack_pending as u64;
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                let age = first_age(
                    &connection.client,
                    &connection.stream,
                    &subject,
                    info.ack_floor.stream_sequence + 1,
                )
                .await?;
                lag.oldest_unhandled_age = lag.oldest_unhandled_age.max(age);
            }
        }
        Ok(lag)
    }
}

/// Messages stored on `subject` in the stream.
async fn stream_messages_on(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
) -> Result<u64, NatsError> {
    let stream = stream.clone();
    let info = stream
        .info_with_subjects(subject)
        .await
        .map_err(|e| NatsError::api("reading the stream's subjects".to_owned(), e))?;
    use futures::TryStreamExt;
    let subjects: Vec<(String, usize)> = info
        .try_collect()
        .await
        .map_err(|e| NatsError::api("reading the stream's subjects".to_owned(), e))?;
    Ok(subjects.iter().map(|(_, n)| *n as u64).sum())
}

/// The age of the first message on `subject` at or after `sequence`.
async fn first_age(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    sequence: u64,
) -> Result<Option<Duration>, NatsError> {
    let Some(stored) = crate::broker::next_message(client, stream, subject, sequence).await? else {
        return Ok(None);
    };
    let stored_at = parse_rfc3339(&stored.time).ok_or_else(|| {
        NatsError::Configuration(format!(
            "stream `{stream}` gave an unreadable time `{}`",
            stored.time
        ))
    })?;
    Ok(Some(
        SystemTime::now()
            .duration_since(stored_at)
            .unwrap_or_default(),
    ))
}

/// `2026-12-01T22:54:17.899613123Z` (UTC, as nats-server writes it) as a `SystemTime`.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u64 = format!("{frac:0<9}")[..9].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3_600 + min * 60 + s;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_times_parse() {
        let t = parse_rfc3339("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::from_millis(86_401_500)
        );
        let t = parse_rfc3339("2026-12-01T22:54:17.899613123Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_796_165_657
        );
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
