//! Changing a topic's partition count: an explicit operation, never a side effect of the next
//! process's configuration (provisioning refuses a count that differs from the stream's).

use bus_core::Topic;

use crate::{NatsBus, NatsError, MAX_PARTITIONS};

impl NatsBus {
    /// Gives `topic` `partitions` partitions (1: none), in the stream that stores it.
    ///
    /// An aggregate's partition depends on the count, so this is refused unless the topic is
    /// drained and nobody reads it: it stores no event, no consumer of it has a pull request
    /// waiting at the broker (a live subscription always has), and no consumer group has a
    /// live member on it. Its consumers are deleted (each group's are created again, for the
    /// new partitions, by its next subscription) and the stream's subjects for the topic are
    /// replaced. Publishers are not known to the broker: stop those configured with the old
    /// count first (one that is still running is refused its next connection, and its
    /// publishes to partitions that no longer exist fail).
    ///
    /// Returns the count the topic had.
    pub async fn repartition(&self, topic: &Topic, partitions: u32) -> Result<u32, NatsError> {
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(NatsError::Configuration(format!(
                "topic `{topic}`: {partitions} partitions; give 1 to {MAX_PARTITIONS}"
            )));
        }
        let refuse = |why: String| {
            NatsError::Configuration(format!(
                "topic `{topic}` cannot be repartitioned now: {why}"
            ))
        };
        let state = self
            .topics()
            .await?
            .into_iter()
            .find(|t| t.topic == *topic)
            .ok_or_else(|| refuse("no stream stores it".to_owned()))?;
        if state.partitions == partitions {
            return Ok(partitions);
        }
        if state.messages > 0 {
            return Err(refuse(format!(
                "stream `{}` stores {} of its events; let its consumers drain it first",
                state.stream, state.messages
            )));
        }
        if let Some(live) = state.consumers.iter().find(|c| c.waiting > 0) {
            return Err(refuse(format!(
                "consumer `{}` is being read ({} pull requests waiting); close its subscriptions first",
                live.name, live.waiting
            )));
        }
        let coordination = self.shared.coordination().await?;
        let members = live_members(&coordination.client, topic).await?;
        if !members.is_empty() {
            return Err(refuse(format!(
                "consumer group members are alive on it ({}); close them first",
                members.join(", ")
            )));
        }
        let jetstream = &coordination.jetstream;
        let what = |action: &str| format!("{action} while repartitioning topic `{topic}`");
        let mut stream = jetstream
            .get_stream(&state.stream)
            .await
            .map_err(|e| NatsError::api(what("reading its stream"), e))?;
        for consumer in &state.consumers {
            stream.delete_consumer(&consumer.name).await.map_err(|e| {
                NatsError::api(what(&format!("deleting consumer `{}`", consumer.name)), e)
            })?;
        }
        let mut config = stream
            .info()
            .await
            .map_err(|e| NatsError::api(what("reading its stream"), e))?
            .config
            .clone();
        config.subjects.retain(|s| {
            crate::provision::partitions_in(topic.as_str(), std::slice::from_ref(s)) == 0
        });
        config.subjects.extend(crate::provision::partition_subjects(
            topic.as_str(),
            partitions,
        ));
        jetstream
            .update_stream(&config)
            .await
            .map_err(|e| NatsError::api(what("updating its stream"), e))?;
        tracing::warn!(%topic, stream = %state.stream, from = state.partitions, to = partitions, "topic repartitioned");
        Ok(state.partitions)
    }
}

/// The members of every consumer group on `topic` whose membership has not run out.
async fn live_members(
    client: &async_nats::Client,
    topic: &Topic,
) -> Result<Vec<String>, NatsError> {
    let bucket = crate::subscriber::MEMBERS_BUCKET;
    let prefix = format!("$KV.{bucket}.");
    let stored = crate::broker::stream_subjects(
        client,
        &format!("KV_{bucket}"),
        &format!("{prefix}*.{topic}.*"),
        crate::broker::DEADLINE,
    )
    .await;
    match stored {
        Ok(subjects) => Ok(subjects
            .into_keys()
            .map(|k| k[prefix.len()..].to_owned())
            .collect()),
        // No bucket: no group ever ran here.
        Err(e) if crate::broker::error_code(&e) == Some(crate::broker::codes::STREAM_NOT_FOUND) => {
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}
