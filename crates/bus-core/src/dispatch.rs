//! What a transport hands a subscription's handler for one stored message, and under which
//! ordering key: the same for every transport.

use std::sync::Arc;

use bytes::Bytes;

use crate::{wire, Envelope, RawKey, RawMessage, Topic};

/// A stored message ready for a subscription's handler.
#[derive(Debug, Clone)]
pub enum Prepared {
    /// For an envelope handler.
    Envelope(Envelope),
    /// For a raw handler.
    Raw(RawMessage),
}

/// Why a stored message cannot reach the handler; the transport dead-letters it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unhandleable {
    /// It is not an envelope (the text says why), for an envelope handler.
    Undecodable(String),
    /// A raw subscription's key function found no ordering key in it.
    NoKey,
}

impl std::fmt::Display for Unhandleable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhandleable::Undecodable(why) => write!(f, "not an envelope: {why}"),
            Unhandleable::NoKey => f.write_str("no ordering key could be extracted"),
        }
    }
}

/// Decodes a stored message (its subject, headers and payload) for a subscription's handler
/// and picks its ordering key (shared: an envelope's key is its aggregate ID's own string): the envelope's aggregate ID for an envelope handler (`raw_key`
/// `None`), what `raw_key` extracts for a raw one. A message that cannot reach the handler is
/// keyed by its subject: such messages stay in order with each other and hold up no aggregate.
/// The headers are only copied for a raw handler.
pub fn prepare<'a>(
    topic: &Topic,
    raw_key: Option<&RawKey>,
    subject: &str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    payload: &Bytes,
) -> (Arc<str>, Result<Prepared, Unhandleable>) {
    match raw_key {
        None => keyed(wire::decode(headers, payload.clone()), subject),
        Some(key) => {
            let raw = RawMessage {
                topic: topic.clone(),
                subject: subject.to_owned(),
                headers: headers.map(|(n, v)| (n.to_owned(), v.to_owned())).collect(),
                payload: payload.clone(),
            };
            match key.key_of(&raw) {
                Some(k) => (k.into(), Ok(Prepared::Raw(raw))),
                None => (subject.into(), Err(Unhandleable::NoKey)),
            }
        }
    }
}

/// [`prepare`] of one record of a record batch, as [`wire::split_batch`] gives it, for an
/// envelope handler (a raw handler gets [`wire::header_pairs`] of
/// [`wire::RecordView::header_block`] and its payload through [`prepare`]); the aggregate ID
/// is shared with earlier records' through `ids` ([`wire::RecordView::decode_with`]).
#[inline]
pub fn prepare_record(
    subject: &str,
    record: wire::RecordView<'_>,
    ids: &mut crate::AggregateIds,
) -> (Arc<str>, Result<Prepared, Unhandleable>) {
    keyed(record.decode_with(ids), subject)
}

#[inline]
fn keyed(
    decoded: Result<crate::Envelope, crate::DecodeError>,
    subject: &str,
) -> (Arc<str>, Result<Prepared, Unhandleable>) {
    match decoded {
        Ok(e) => (e.aggregate_id().shared(), Ok(Prepared::Envelope(e))),
        Err(err) => (
            subject.into(),
            Err(Unhandleable::Undecodable(err.to_string())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_keyed_by_aggregate_and_the_rest_by_subject() {
        let topic = Topic::new("t").unwrap();
        let e = Envelope::builder("a-1", "T", 3).build().unwrap();
        let mut headers = Vec::new();
        wire::encode_headers(&e, |n, v| headers.push((n.to_owned(), v.to_owned())));
        let pairs = || headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        let (key, prepared) = prepare(&topic, None, "t.2", pairs(), e.payload());
        assert_eq!(&*key, "a-1");
        assert!(matches!(prepared, Ok(Prepared::Envelope(d)) if d.event_version() == 3));
        let (key, prepared) = prepare(&topic, None, "t.2", std::iter::empty(), &Bytes::new());
        assert_eq!(&*key, "t.2");
        assert!(matches!(prepared, Err(Unhandleable::Undecodable(_))));
        let by_header = RawKey::header("K");
        let (key, prepared) = prepare(&topic, Some(&by_header), "t", pairs(), e.payload());
        assert_eq!((&*key, prepared.unwrap_err()), ("t", Unhandleable::NoKey));
        let (key, prepared) = prepare(&topic, Some(&RawKey::Subject), "t", pairs(), e.payload());
        assert_eq!(&*key, "t");
        assert!(matches!(prepared, Ok(Prepared::Raw(m)) if m.headers.len() == headers.len()));
    }

    #[test]
    fn records_are_keyed_by_aggregate_and_the_undecodable_by_subject() {
        let e = Envelope::builder("a-1", "T", 3).build().unwrap();
        let mut body = Vec::new();
        wire::encode_record(&e, &mut body);
        // A record whose header block is not an envelope's.
        body.extend_from_slice(&6u32.to_be_bytes());
        body.extend_from_slice(b"X: 1\r\n");
        body.extend_from_slice(&0u32.to_be_bytes());
        let mut ids = crate::AggregateIds::default();
        let (_, prepared) = wire::split_batch("2", &Bytes::from(body), |record| {
            prepare_record("t.2", record, &mut ids)
        })
        .unwrap();
        let (key, prepared_first) = &prepared[0];
        assert_eq!(&**key, "a-1");
        assert!(matches!(prepared_first, Ok(Prepared::Envelope(d)) if *d == e));
        let (key, prepared_second) = &prepared[1];
        assert_eq!(&**key, "t.2");
        assert!(matches!(prepared_second, Err(Unhandleable::Undecodable(_))));
    }
}
