//! Messages, acks and limits for the publisher's unit tests.

use super::*;

pub(super) fn ack(payload: &str, status: Option<StatusCode>) -> async_nats::Message {
    async_nats::Message {
        subject: Subject::from("_INBOX.abc.42"),
        reply: None,
        payload: Bytes::from(payload.to_owned()),
        headers: None,
        status,
        description: status.map(|_| "test".to_owned()),
        length: payload.len(),
    }
}

pub(super) fn topic() -> Topic {
    Topic::new("orders").unwrap()
}

pub(super) fn message() -> Message {
    publish(None, 0, None)
}

fn publish(chain: Option<u64>, record_len: usize, envelope: Option<Envelope>) -> Message {
    publish_in(&message::Spares::default(), chain, record_len, envelope)
}

/// A publish made in one of `spares` when there is one.
pub(super) fn publish_in(
    spares: &message::Spares,
    chain: Option<u64>,
    record_len: usize,
    envelope: Option<Envelope>,
) -> Message {
    let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
    Message(Publish::create(
        spares,
        topic(),
        chain,
        record_len,
        Arc::new(PublishMetrics::new(&topic())),
        envelope,
        None,
        tracing::Span::none(),
        permit,
    ))
}

/// Event `version` of aggregate `chain`, `len` bytes as a record.
pub(super) fn event(chain: u64, version: u64, len: usize) -> Message {
    let envelope = Envelope::builder(format!("a{chain}"), "T", version)
        .build()
        .unwrap();
    publish(Some(chain), len, Some(envelope))
}

pub(super) fn version(m: &Message) -> (u64, u64) {
    (
        m.chain.unwrap(),
        m.held().envelope.as_ref().unwrap().event_version(),
    )
}

pub(super) fn limits(max_events: usize, max_bytes: usize, max_in_flight: usize) -> BatchConfig {
    BatchConfig {
        max_events,
        max_bytes,
        linger: Duration::ZERO,
        max_in_flight,
    }
}
