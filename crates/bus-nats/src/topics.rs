//! Listing the topics the broker holds, with their streams' and consumers' state.

use std::collections::BTreeMap;

use async_nats::jetstream::stream::RetentionPolicy;
use bus_core::Topic;
use futures::TryStreamExt;

use crate::{NatsBus, NatsError};

/// One topic as the broker holds it: its stream and the consumers reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicState {
    /// The topic.
    pub topic: Topic,
    /// The stream holding it.
    pub stream: String,
    /// The stream's retention as the broker has it: `work-queue`, `limits` or `interest`.
    /// (The bus's `acknowledged` retention is a `limits` stream it purges.)
    pub retention: &'static str,
    /// Its partitions; 1 for an unpartitioned topic.
    pub partitions: u32,
    /// Messages stored on the topic now: events published one per message, or record batches
    /// of several events each (the default), as the broker counts them.
    pub messages: u64,
    /// The consumers reading it (one per consumer group, per partition).
    pub consumers: Vec<ConsumerState>,
}

/// One durable consumer of a topic (or of one partition of it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerState {
    /// The consumer's name: `<group>-<topic>-<hash>`, with `-p<k>` for partition `k`.
    pub name: String,
    /// The partition it reads, on a partitioned topic.
    pub partition: Option<u32>,
    /// The stream sequence below which everything is acknowledged, inclusive.
    pub ack_floor: u64,
    /// The highest stream sequence delivered.
    pub delivered: u64,
    /// Events stored and not yet delivered.
    pub undelivered: u64,
    /// Events delivered and not yet acknowledged.
    pub unacknowledged: u64,
    /// Events delivered more than once.
    pub redelivered: u64,
    /// Pull requests waiting at the broker (a live subscription keeps some).
    pub waiting: u64,
}

impl NatsBus {
    /// Every topic the broker holds in a stream (the dead-letter stream and KV or object
    /// buckets left out), in topic order, with its stream and consumers. For an operator:
    /// reads the broker's state, needs no subscription, and works for any consumer group.
    pub async fn topics(&self) -> Result<Vec<TopicState>, NatsError> {
        let probe = Topic::new("bus-topics").expect("valid topic");
        let (client, _signals) = self
            .shared
            .connect(
                &probe,
                crate::connection::Role::Topic,
                crate::connection::On::Home,
            )
            .await?;
        let jetstream = async_nats::jetstream::new(client);
        let streams: Vec<_> = jetstream
            .streams()
            .try_collect()
            .await
            .map_err(|e| NatsError::api("listing streams".to_owned(), e))?;
        let mut out = Vec::new();
        for info in streams {
            let name = &info.config.name;
            if name.starts_with("KV_")
                || name.starts_with("OBJ_")
                || *name == self.shared.config.dead_letters.stream
            {
                continue;
            }
            let topics = topics_of(&info.config.subjects);
            if topics.is_empty() {
                continue;
            }
            let mut stream = jetstream
                .get_stream(name)
                .await
                .map_err(|e| NatsError::api(format!("looking up stream `{name}`"), e))?;
            let consumers: Vec<_> = stream
                .consumers()
                .try_collect()
                .await
                .map_err(|e| NatsError::api(format!("listing consumers of `{name}`"), e))?;
            let counts: BTreeMap<String, usize> = if topics.len() == 1 {
                BTreeMap::new()
            } else {
                stream
                    .info_with_subjects(">")
                    .await
                    .map_err(|e| NatsError::api(format!("reading stream `{name}`"), e))?
                    .try_collect()
                    .await
                    .map_err(|e| NatsError::api(format!("reading stream `{name}`"), e))?
            };
            let state = stream
                .info()
                .await
                .map_err(|e| NatsError::api(format!("reading stream `{name}`"), e))?
                .state
                .clone();
            for (topic, partitions) in &topics {
                let on_topic = |subject: &str| -> Option<Option<u32>> {
                    if subject == topic.as_str() {
                        return Some(None);
                    }
                    let p = subject.strip_prefix(topic.as_str())?.strip_prefix('.')?;
                    let p: u32 = p.parse().ok()?;
                    (*partitions > 1 && p < *partitions).then_some(Some(p))
                };
                let messages = if topics.len() == 1 {
                    state.messages
                } else {
                    counts
                        .iter()
                        .filter(|(s, _)| on_topic(s).is_some())
                        .map(|(_, n)| *n as u64)
                        .sum()
                };
                let mut readers: Vec<ConsumerState> = consumers
                    .iter()
                    .filter_map(|c| {
                        let partition = on_topic(&c.config.filter_subject)?;
                        Some(ConsumerState {
                            name: c.name.clone(),
                            partition,
                            ack_floor: c.ack_floor.stream_sequence,
                            delivered: c.delivered.stream_sequence,
                            undelivered: c.num_pending,
                            unacknowledged: c.num_ack_pending as u64,
                            redelivered: c.num_redelivered as u64,
                            waiting: c.num_waiting as u64,
                        })
                    })
                    .collect();
                readers.sort_by(|a, b| (&a.name, a.partition).cmp(&(&b.name, b.partition)));
                out.push(TopicState {
                    topic: topic.clone(),
                    stream: name.clone(),
                    retention: match info.config.retention {
                        RetentionPolicy::WorkQueue => "work-queue",
                        RetentionPolicy::Limits => "limits",
                        RetentionPolicy::Interest => "interest",
                    },
                    partitions: *partitions,
                    messages,
                    consumers: readers,
                });
            }
        }
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        Ok(out)
    }
}

/// The topics a stream's subjects hold, with their partitions: `t.0` … `t.<n-1>` (all of
/// them, n ≥ 2) are partitions of `t`; any other subject that is a valid topic is one.
fn topics_of(subjects: &[String]) -> Vec<(Topic, u32)> {
    let mut by_prefix: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for subject in subjects {
        if let Some((prefix, raw)) = subject.rsplit_once('.') {
            // Partitions are written in plain decimal: `t.01` or `t.+1` are no partitions.
            if let Ok(p) = raw.parse::<u32>() {
                if p.to_string() == raw {
                    by_prefix.entry(prefix).or_default().push(p);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut partitioned = Vec::new();
    for (prefix, mut ps) in by_prefix {
        ps.sort_unstable();
        let n = ps.len() as u32;
        if n >= 2 && ps.iter().copied().eq(0..n) {
            if let Ok(topic) = Topic::new(prefix) {
                partitioned.extend((0..n).map(|p| format!("{prefix}.{p}")));
                out.push((topic, n));
            }
        }
    }
    for subject in subjects {
        if partitioned.contains(subject) {
            continue;
        }
        if let Ok(topic) = Topic::new(subject.as_str()) {
            out.push((topic, 1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_folded_into_their_topic() {
        let subjects = ["orders.0", "orders.1", "orders.2", "audit", "v.1", "x.*"]
            .map(String::from)
            .to_vec();
        let mut topics: Vec<(String, u32)> = topics_of(&subjects)
            .into_iter()
            .map(|(t, n)| (t.to_string(), n))
            .collect();
        topics.sort();
        // `v.1` alone is a topic of its own, not partition 1 of `v`; a wildcard is no topic.
        assert_eq!(
            topics,
            [("audit".into(), 1), ("orders".into(), 3), ("v.1".into(), 1)]
        );
    }
}
