//! The last handled version per aggregate, kept in a NATS KV bucket: the default
//! [`HandledVersions`] store for services without a database of their own.

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bus_core::{AggregateId, HandledVersions, HandlerError, Topic};

use crate::{NatsBus, NatsError};

/// The KV bucket of a consumer group's handled versions: `BUS_HANDLED_<group>`.
pub fn handled_bucket(group: &str) -> String {
    format!("BUS_HANDLED_{group}")
}

/// The last version of each aggregate a consumer group handled on a topic, in the KV bucket
/// `BUS_HANDLED_<group>` (one key per topic and aggregate, kept until deleted): wrap a handler
/// in [`bus_core::HandledOnce`] with it, and a successor that takes over after a crash skips
/// the versions its predecessor handled.
///
/// Each delivery reads its aggregate's key and each handled one writes it (awaiting the
/// broker's ack) before the event is acknowledged. The write is not in the handler's own
/// transaction: a crash after the handler succeeded and before the write is stored calls the
/// handler again for that version. A handler whose effects live in a database keeps the
/// version there instead (see the projection example).
#[derive(Clone)]
pub struct NatsHandledVersions {
    kv: kv::Store,
    topic: Topic,
    bucket: String,
}

impl std::fmt::Debug for NatsHandledVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsHandledVersions")
            .field("bucket", &self.bucket)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl NatsHandledVersions {
    /// The store of `bus`'s consumer group on `topic`, its bucket created on first use (with
    /// `consumer.coordination_replicas` replicas, on the topic's connection).
    pub async fn open(bus: &NatsBus, topic: &Topic) -> Result<Self, NatsError> {
        let config = &bus.shared.config;
        let group = &config.consumer.group;
        if group.is_empty() {
            return Err(NatsError::Configuration(
                "handled versions are kept per consumer group: set consumer.group".into(),
            ));
        }
        let connection = bus.shared.connection(topic).await?;
        let bucket = handled_bucket(group);
        let kv = crate::broker::guarded(
            &connection.violations,
            || format!("opening the KV bucket `{bucket}` of handled versions"),
            crate::broker::ensure_bucket(
                &connection.client,
                &connection.jetstream,
                &bucket,
                std::time::Duration::ZERO,
                config.consumer.coordination_replicas,
            ),
        )
        .await?;
        Ok(Self {
            kv,
            topic: topic.clone(),
            bucket,
        })
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Forgets every aggregate's version on this store's topic, before rebuilding what the
    /// group builds from the topic's start (`NatsBus::reset_group`): otherwise the replay is
    /// skipped as handled. Returns how many aggregates it forgot.
    pub async fn forget_all(&self) -> Result<u64, NatsError> {
        use futures::StreamExt;
        let prefix = format!("{}.", self.topic);
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| NatsError::api(format!("listing the keys of `{}`", self.bucket), e))?;
        let mut forgotten = 0;
        while let Some(key) = keys.next().await {
            let key = key
                .map_err(|e| NatsError::api(format!("listing the keys of `{}`", self.bucket), e))?;
            if key.starts_with(&prefix) {
                self.kv
                    .purge(&key)
                    .await
                    .map_err(|e| NatsError::api(format!("purging `{key}`"), e))?;
                forgotten += 1;
            }
        }
        Ok(forgotten)
    }

    fn key(&self, aggregate: &AggregateId) -> String {
        key(&self.topic, aggregate)
    }
}

/// `<topic>.<aggregate>`, the aggregate's characters outside `[A-Za-z0-9_-]` written as `=XX`
/// (hex): KV keys allow fewer characters than aggregate IDs, and a `.` would split the key.
fn key(topic: &Topic, aggregate: &AggregateId) -> String {
    let mut key = String::with_capacity(topic.as_str().len() + 1 + aggregate.as_str().len());
    key.push_str(topic.as_str());
    key.push('.');
    for byte in aggregate.as_str().bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            key.push(byte as char);
        } else {
            key.push_str(&format!("={byte:02X}"));
        }
    }
    key
}

#[async_trait]
impl HandledVersions for NatsHandledVersions {
    async fn last_handled(&self, aggregate: &AggregateId) -> Result<Option<u64>, HandlerError> {
        let key = self.key(aggregate);
        let value = self.kv.get(&key).await.map_err(|e| {
            HandlerError::retryable(format!("reading `{key}` of `{}`: {e}", self.bucket))
        })?;
        match value {
            None => Ok(None),
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .map(Some)
                .ok_or_else(|| {
                    HandlerError::permanent(format!(
                        "`{key}` of `{}` holds {bytes:?}, not a version",
                        self.bucket
                    ))
                }),
        }
    }

    async fn record_handled(
        &self,
        aggregate: &AggregateId,
        version: u64,
    ) -> Result<(), HandlerError> {
        let key = self.key(aggregate);
        self.kv
            .put(&key, version.to_string().into())
            .await
            .map(|_revision| ())
            .map_err(|e| {
                HandlerError::retryable(format!("writing `{key}` of `{}`: {e}", self.bucket))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_and_distinct() {
        let topic = Topic::new("orders.eu").unwrap();
        let ids = ["a", "a.b", "a=2Eb", "x/y:z@w+1~2#3", "A-_9"];
        let keys: Vec<String> = ids
            .iter()
            .map(|id| key(&topic, &AggregateId::new(*id).unwrap()))
            .collect();
        assert_eq!(keys[1], "orders.eu.a=2Eb");
        assert_eq!(keys[2], "orders.eu.a=3D2Eb");
        assert_eq!(keys[3], "orders.eu.x=2Fy=3Az=40w=2B1=7E2=233");
        assert_eq!(keys[4], "orders.eu.A-_9");
        let distinct: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        for key in &keys {
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
                "{key}"
            );
        }
    }
}
