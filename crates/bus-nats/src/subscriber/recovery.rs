//! Restarting delivery in order after an unclean stop.

use crate::NatsError;

/// After an unclean stop, messages the dead process held are redelivered only after AckWait,
/// while newer ones are delivered at once, which would break per-aggregate order. So when the
/// consumer has unacknowledged messages at start, delivery is restarted at its ack floor + 1:
/// by the consumer reset API on servers 2.14+, by recreating the consumer on older ones.
pub(crate) async fn recover_order(
    connection: &crate::TopicConnection,
    stream: &str,
    want: &async_nats::jetstream::consumer::pull::Config,
    mut consumer: async_nats::jetstream::consumer::PullConsumer,
) -> Result<(), NatsError> {
    let name = want.durable_name.clone().unwrap_or_default();
    let info = consumer
        .info()
        .await
        .map_err(|e| NatsError::api(format!("reading consumer `{name}`"), e))?
        .clone();
    if info.num_ack_pending == 0 {
        return Ok(());
    }
    let floor = info.ack_floor.stream_sequence;
    tracing::warn!(
        consumer = %name,
        unacknowledged = info.num_ack_pending,
        ack_floor = floor,
        "consumer has unacknowledged messages from an earlier run; restarting delivery at the ack floor"
    );
    let version = connection.client.server_info().version;
    if server_at_least(&version, (2, 14)) {
        let subject = format!("$JS.API.CONSUMER.RESET.{stream}.{name}");
        let reply = connection
            .client
            .request(subject, bytes::Bytes::new())
            .await
            .map_err(|e| NatsError::api(format!("resetting consumer `{name}`"), e))?;
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
        if let Some(error) = body.get("error") {
            return Err(NatsError::Configuration(format!(
                "resetting consumer `{name}` failed: {error}"
            )));
        }
        return Ok(());
    }
    // Servers before 2.14: delete and recreate, starting after the ack floor.
    let stream_handle = connection
        .jetstream
        .get_stream(stream)
        .await
        .map_err(|e| NatsError::api(format!("looking up stream `{stream}`"), e))?;
    stream_handle
        .delete_consumer(&name)
        .await
        .map_err(|e| NatsError::api(format!("deleting consumer `{name}`"), e))?;
    let mut config = want.clone();
    config.deliver_policy = async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
        start_sequence: floor + 1,
    };
    stream_handle
        .create_consumer(config)
        .await
        .map_err(|e| NatsError::api(format!("recreating consumer `{name}`"), e))?;
    Ok(())
}

/// Whether a server version string like `2.15.1` is at least `(major, minor)`.
pub(crate) fn server_at_least(version: &str, wanted: (u32, u32)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_compare() {
        assert!(server_at_least("2.15.1", (2, 14)));
        assert!(server_at_least("2.14.0", (2, 14)));
        assert!(!server_at_least("2.9.10", (2, 14)));
        assert!(!server_at_least("2.10.22", (2, 14)));
    }
}
