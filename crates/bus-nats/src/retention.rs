//! [`Retention::Acknowledged`](crate::Retention::Acknowledged): removing, in bulk, what every
//! consumer of a topic has acknowledged.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bus_core::Topic;
use futures::TryStreamExt;

/// Whether the subject filter `filter` (NATS wildcards `*` and `>`) matches `subject`.
pub(crate) fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut filter = filter.split('.');
    let mut subject = subject.split('.');
    loop {
        match (filter.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a consumer with these filters receives the messages of `topic`.
fn reads(config: &consumer::Config, topic: &str) -> bool {
    let filters: Vec<&str> = std::iter::once(config.filter_subject.as_str())
        .chain(config.filter_subjects.iter().map(String::as_str))
        .filter(|f| !f.is_empty())
        .collect();
    filters.is_empty() || filters.iter().any(|f| subject_matches(f, topic))
}

/// The highest stream sequence up to which every consumer that reads `topic` has acknowledged
/// everything, or `None` when no consumer reads it (then nothing may be removed).
pub(crate) fn acknowledged_through<'a>(
    consumers: impl IntoIterator<Item = &'a consumer::Info>,
    topic: &str,
) -> Option<u64> {
    consumers
        .into_iter()
        .filter(|info| reads(&info.config, topic))
        .map(|info| info.ack_floor.stream_sequence)
        .min()
}

/// Every `every`, removes the messages of `topic` that every consumer reading it has
/// acknowledged. Runs until aborted; a failed round is logged and tried again next time.
pub(crate) async fn purge_acknowledged(
    js: jetstream::Context,
    stream_name: String,
    topic: Topic,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Everything below this sequence is gone already.
    let mut purged_below = 0u64;
    loop {
        tick.tick().await;
        match purge_once(&js, &stream_name, topic.as_str(), purged_below).await {
            Ok(Some(below)) => purged_below = below,
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%topic, stream = %stream_name, %error, "removing acknowledged messages failed; trying again");
            }
        }
    }
}

/// One round: returns the new `purged_below` if anything was purged.
async fn purge_once(
    js: &jetstream::Context,
    stream_name: &str,
    topic: &str,
    purged_below: u64,
) -> Result<Option<u64>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = js.get_stream(stream_name).await?;
    let consumers: Vec<consumer::Info> = stream.consumers().try_collect().await?;
    let Some(through) = acknowledged_through(&consumers, topic) else {
        return Ok(None);
    };
    let below = through + 1;
    if below <= purged_below.max(1) {
        return Ok(None);
    }
    // Looking the stream up already read its configuration.
    let subjects = &stream.cached_info().config.subjects;
    let only_topic = subjects.len() == 1 && subjects[0] == topic;
    // A stream holding only this topic is compacted (whole blocks dropped); otherwise only
    // this topic's messages go.
    let purged = if only_topic {
        stream.purge().sequence(below).await?
    } else {
        stream.purge().filter(topic).sequence(below).await?
    };
    tracing::debug!(%topic, stream = %stream_name, below, purged = purged.purged, "removed acknowledged messages");
    Ok(Some(below))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_literally_and_by_wildcard() {
        assert!(subject_matches("orders", "orders"));
        assert!(subject_matches("orders.*", "orders.v1"));
        assert!(subject_matches("orders.>", "orders.v1.x"));
        assert!(subject_matches(">", "orders"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(!subject_matches("orders.*", "orders.v1.x"));
        assert!(!subject_matches("orders", "orders.v1"));
        assert!(!subject_matches("billing", "orders"));
    }

    fn info(filter: &str, filters: &[&str], floor: u64) -> consumer::Info {
        let mut value = serde_json::json!({
            "stream_name": "S",
            "name": format!("c{floor}"),
            "created": "2026-01-01T00:00:00Z",
            "config": {
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "replay_policy": "instant",
            },
            "delivered": {"consumer_seq": floor, "stream_seq": floor},
            "ack_floor": {"consumer_seq": floor, "stream_seq": floor},
            "num_ack_pending": 0,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": 0,
            "cluster": null,
            "push_bound": false,
            "ts": "2026-01-01T00:00:00Z",
        });
        if !filter.is_empty() {
            value["config"]["filter_subject"] = filter.into();
        }
        if !filters.is_empty() {
            value["config"]["filter_subjects"] = filters.to_vec().into();
        }
        serde_json::from_value(value).expect("consumer info")
    }

    #[test]
    fn the_lowest_floor_of_the_consumers_reading_the_topic_counts() {
        let consumers = [
            info("orders", &[], 40),
            info("", &[], 25),              // reads everything
            info("billing", &[], 3),        // another topic: ignored
            info("", &["x", "orders"], 30), // one of several filters
        ];
        assert_eq!(acknowledged_through(&consumers, "orders"), Some(25));
        assert_eq!(acknowledged_through(&consumers[..1], "orders"), Some(40));
        assert_eq!(acknowledged_through(&consumers[2..3], "orders"), None);
        assert_eq!(acknowledged_through([], "orders"), None);
    }
}
