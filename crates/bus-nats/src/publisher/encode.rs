//! What a publish looks like on the wire: an envelope's headers, a batch's body, their sizes.

use super::*;

/// `f` of a batched publish's envelope.
fn with_envelope<R>(m: &Message, f: impl FnOnce(&Envelope) -> R) -> R {
    f(m.held()
        .envelope
        .as_ref()
        .expect("only envelopes are batched, and only until settled"))
}

/// A batch's headers: a single event's headers for one event, `Bus-Batch: <n>` for more. Its
/// `Nats-Msg-Id` is the first event's ID and the number of events: the same on every send of
/// the batch. Built for each send: cheaper than keeping a map and cloning it.
pub(super) fn batch_headers(messages: &[Message]) -> HeaderMap {
    if let [only] = messages {
        return with_envelope(only, envelope_headers);
    }
    let mut headers = HeaderMap::new();
    headers.insert(wire::BATCH, messages.len().to_string());
    headers.insert(
        "Nats-Msg-Id",
        with_envelope(&messages[0], |e| {
            format!("{}+{}", e.event_id(), messages.len())
        }),
    );
    headers
}

/// A batch's body: the event's payload for one event, the records in order for more.
pub(super) fn batch_body(messages: &[Message]) -> Bytes {
    if let [only] = messages {
        return with_envelope(only, |e| e.payload().clone());
    }
    let mut body = Vec::with_capacity(messages.iter().map(|m| m.record_len).sum());
    for m in messages {
        with_envelope(m, |e| wire::encode_record(e, &mut body));
    }
    Bytes::from(body)
}

/// Bytes of a header block as it travels: `NATS/1.0\r\n`, each `name: value\r\n`, then
/// `\r\n`; an empty map sends no block. The server counts it against `max_payload`.
pub(crate) fn header_len(headers: &HeaderMap) -> usize {
    if headers.is_empty() {
        return 0;
    }
    let lines: usize = headers
        .iter()
        .map(|(n, vs)| {
            let n: &str = n.as_ref();
            vs.iter()
                .map(|v| n.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    b"NATS/1.0\r\n".len() + lines + b"\r\n".len()
}

/// The bytes `envelope` takes on the wire, header block included: what the server compares
/// with its `max_payload` (1 MiB by default). A publish over it fails at once with
/// `PublishErrorKind::PayloadTooLarge`.
pub fn message_size(envelope: &Envelope) -> usize {
    header_len(&envelope_headers(envelope)) + envelope.payload().len()
}

pub(crate) fn envelope_headers(envelope: &Envelope) -> HeaderMap {
    let mut headers = HeaderMap::new();
    wire::encode_headers(envelope, |name, value| headers.insert(name, value));
    // The broker's de-duplication key: a retried publish of the same event is stored once.
    headers.insert("Nats-Msg-Id", envelope.event_id().as_str());
    headers
}
