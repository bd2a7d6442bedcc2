//! The wire format: how an [`Envelope`] travels as message headers plus a body.
//!
//! The payload is the message body, untouched. Metadata travels in headers with these names
//! (documented for other languages in `docs/wire-format.md`):
//!
//! | header | value | required |
//! |---|---|---|
//! | `Bus-Event` | `<aggregate ID> <event version> <event type> <timestamp> <event ID>` | yes |
//! | `Bus-Content-Type` | media type of the body | no (default `application/octet-stream`) |
//! | `Bus-Trace-Id`, `Bus-Correlation-Id`, `Bus-Tenant-Id` | text | no |
//!
//! In `Bus-Event` the five fields are separated by single spaces (none of them can contain one):
//! the event version is a decimal integer ≥ 1 and the timestamp is microseconds since the Unix
//! epoch, in decimal. One header instead of five keeps each message small: the broker scans
//! header blocks on every publish and stores them with every message.
//!
//! Every other header is a user header, carried as it is. Header names starting with `Bus-` or
//! `Nats-` are reserved and refused as user headers. Header names are matched without regard to
//! ASCII case when decoding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::codec::ContentType;
use crate::envelope::Envelope;
use crate::error::{DecodeError, ValidationError};
use crate::names::{AggregateId, EventId, EventType};

/// Header carrying the required metadata: aggregate ID, event version, event type, timestamp
/// (microseconds since the Unix epoch) and event ID, separated by single spaces.
pub const EVENT: &str = "Bus-Event";
/// Header carrying the payload's media type.
pub const CONTENT_TYPE: &str = "Bus-Content-Type";
/// Header carrying the trace ID.
pub const TRACE_ID: &str = "Bus-Trace-Id";
/// Header carrying the correlation ID.
pub const CORRELATION_ID: &str = "Bus-Correlation-Id";
/// Header carrying the tenant ID.
pub const TENANT_ID: &str = "Bus-Tenant-Id";

/// Prefixes of header names that user headers may not use.
pub const RESERVED_PREFIXES: [&str; 2] = ["Bus-", "Nats-"];

fn is_reserved(name: &str) -> bool {
    RESERVED_PREFIXES.iter().any(|prefix| {
        name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix)
    })
}

/// Checks a header value: no CR, LF or other control characters.
pub(crate) fn check_header_value(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if let Some(bad) = value.chars().find(|c| c.is_control()) {
        return Err(ValidationError::new(
            field,
            value,
            format!("contains control character {bad:?}, which cannot travel in a header"),
        ));
    }
    Ok(())
}

/// Checks a user header's name and value.
pub(crate) fn check_user_header(name: &str, value: &str) -> Result<(), ValidationError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        return Err(ValidationError::new(
            "header name",
            name,
            "must be non-empty printable ASCII without ':' or spaces",
        ));
    }
    if is_reserved(name) {
        return Err(ValidationError::new(
            "header name",
            name,
            "starts with a reserved prefix (`Bus-` or `Nats-`)",
        ));
    }
    check_header_value("header value", value)
}

fn micros_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// Calls `put(name, value)` for every header of `envelope`, required ones first.
pub fn encode_headers(envelope: &Envelope, mut put: impl FnMut(&str, &str)) {
    use std::fmt::Write as _;
    let mut event = String::with_capacity(
        envelope.aggregate_id.as_str().len()
            + envelope.event_type.as_str().len()
            + envelope.event_id.as_str().len()
            + 44,
    );
    let _ = write!(
        event,
        "{} {} {} {} {}",
        envelope.aggregate_id.as_str(),
        envelope.event_version.get(),
        envelope.event_type.as_str(),
        micros_since_epoch(envelope.timestamp),
        envelope.event_id.as_str()
    );
    put(EVENT, &event);
    if envelope.content_type != ContentType::Bytes {
        put(CONTENT_TYPE, envelope.content_type.as_str());
    }
    for (name, value) in [
        (TRACE_ID, &envelope.trace_id),
        (CORRELATION_ID, &envelope.correlation_id),
        (TENANT_ID, &envelope.tenant_id),
    ] {
        if let Some(value) = value {
            put(name, value);
        }
    }
    for (name, value) in &envelope.headers {
        put(name, value);
    }
}

/// Reads an envelope from its headers and body.
///
/// Unknown headers that are not reserved become user headers; unknown reserved ones (such as
/// the broker's own `Nats-Msg-Id`) are ignored.
pub fn decode<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    payload: Bytes,
) -> Result<Envelope, DecodeError> {
    let mut aggregate_id = None;
    let mut event_type = None;
    let mut event_version = None;
    let mut event_id = None;
    let mut timestamp = None;
    let mut content_type = ContentType::Bytes;
    let mut trace_id = None;
    let mut correlation_id = None;
    let mut tenant_id = None;
    let mut user = std::collections::BTreeMap::new();

    for (name, value) in headers {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        if is(EVENT) {
            let invalid = |reason: &str| DecodeError::InvalidHeader {
                name: EVENT,
                value: value.to_owned(),
                reason: reason.to_owned(),
            };
            let mut fields = value.split(' ');
            let (Some(aggregate), Some(version), Some(kind), Some(micros), Some(id), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return Err(invalid(
                    "expected `<aggregate ID> <event version> <event type> <timestamp> <event ID>` separated by single spaces",
                ));
            };
            aggregate_id = Some(AggregateId::new(aggregate)?);
            event_version = Some(
                version
                    .parse::<u64>()
                    .ok()
                    .and_then(std::num::NonZeroU64::new)
                    .ok_or_else(|| {
                        invalid("the event version must be a decimal integer greater than 0")
                    })?,
            );
            event_type = Some(EventType::new(kind)?);
            let micros = micros.parse::<u64>().map_err(|_| {
                invalid("the timestamp must be microseconds since the Unix epoch, in decimal")
            })?;
            timestamp = Some(UNIX_EPOCH + Duration::from_micros(micros));
            event_id = Some(EventId::new(id)?);
        } else if is(CONTENT_TYPE) {
            content_type = ContentType::parse(value);
        } else if is(TRACE_ID) {
            trace_id = Some(value.to_owned());
        } else if is(CORRELATION_ID) {
            correlation_id = Some(value.to_owned());
        } else if is(TENANT_ID) {
            tenant_id = Some(value.to_owned());
        } else if !is_reserved(name) {
            user.insert(name.to_owned(), value.to_owned());
        }
    }

    let (
        Some(aggregate_id),
        Some(event_type),
        Some(event_version),
        Some(event_id),
        Some(timestamp),
    ) = (aggregate_id, event_type, event_version, event_id, timestamp)
    else {
        return Err(DecodeError::MissingHeader(EVENT));
    };
    Ok(Envelope {
        aggregate_id,
        event_type,
        event_version,
        event_id,
        timestamp,
        trace_id,
        correlation_id,
        tenant_id,
        content_type,
        headers: user,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Codec;
    use proptest::prelude::*;

    fn round_trip(env: &Envelope) -> Envelope {
        let mut headers = Vec::new();
        encode_headers(env, |n, v| headers.push((n.to_owned(), v.to_owned())));
        decode(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            env.payload().clone(),
        )
        .unwrap()
    }

    #[test]
    fn missing_required_header_is_named() {
        let err = decode([(CONTENT_TYPE, "application/json")], Bytes::new()).unwrap_err();
        assert_eq!(err, DecodeError::MissingHeader(EVENT));
        assert_eq!(err.to_string(), "header `Bus-Event` is missing");
    }

    #[test]
    fn bad_fields_are_named() {
        let err = decode([(EVENT, "a 0 T 1 id")], Bytes::new()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("header `Bus-Event` value `a 0 T 1 id` is invalid"),
            "{text}"
        );
        assert!(text.contains("event version"), "{text}");
        for short in ["", "a 1 T 1", "a 1 T 1 id extra", "a  1 T 1 id"] {
            assert!(
                matches!(
                    decode([(EVENT, short)], Bytes::new()),
                    Err(DecodeError::InvalidHeader { .. }) | Err(DecodeError::Invalid(_))
                ),
                "`{short}` must be refused"
            );
        }
        let err = decode([(EVENT, "a 1 T soon id")], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("timestamp"), "{err}");
    }

    #[test]
    fn one_header_carries_the_required_fields() {
        let env = Envelope::builder("acc-1", "Opened", 7).build().unwrap();
        let mut headers = Vec::new();
        encode_headers(&env, |n, v| headers.push((n.to_owned(), v.to_owned())));
        assert_eq!(headers.len(), 1, "{headers:?}");
        let (name, value) = &headers[0];
        assert_eq!(name, EVENT);
        let fields: Vec<&str> = value.split(' ').collect();
        assert_eq!(fields[0], "acc-1");
        assert_eq!(fields[1], "7");
        assert_eq!(fields[2], "Opened");
        assert_eq!(fields[4], env.event_id().as_str());
    }

    #[test]
    fn broker_headers_are_not_user_headers() {
        let env = Envelope::builder("a", "T", 3).build().unwrap();
        let mut headers = Vec::new();
        encode_headers(&env, |n, v| headers.push((n.to_owned(), v.to_owned())));
        headers.push(("Nats-Msg-Id".into(), "x".into()));
        let back = decode(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            Bytes::new(),
        )
        .unwrap();
        assert!(back.headers().is_empty());
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(
            aggregate in "[A-Za-z0-9:/#_-]{1,64}",
            event_type in "[A-Za-z][A-Za-z0-9._]{0,20}",
            version in 1u64..,
            micros in 0u64..4_000_000_000_000_000,
            trace in proptest::option::of("[ -~]{0,30}"),
            tenant in proptest::option::of("[a-z0-9]{1,10}"),
            user in proptest::collection::btree_map("X-[A-Za-z0-9-]{1,10}", "[ -~]{0,20}", 0..4),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
            json in any::<bool>(),
        ) {
            let mut builder = Envelope::builder(&aggregate, &event_type, version)
                .timestamp(UNIX_EPOCH + Duration::from_micros(micros));
            if let Some(t) = &trace { builder = builder.trace_id(t.clone()); }
            if let Some(t) = &tenant { builder = builder.tenant_id(t.clone()); }
            for (k, v) in &user { builder = builder.header(k.clone(), v.clone()); }
            builder = if json {
                builder.typed_payload(&payload, Codec::Json).unwrap()
            } else {
                builder.payload(payload.clone())
            };
            let env = builder.build().unwrap();
            let back = round_trip(&env);
            prop_assert_eq!(&back, &env);
            if json {
                prop_assert_eq!(back.decode_payload::<Vec<u8>>().unwrap(), payload);
            }
        }

        #[test]
        fn msgpack_payloads_round_trip(values in proptest::collection::vec((any::<i64>(), ".{0,12}"), 0..20)) {
            let env = Envelope::builder("a", "T", 1)
                .typed_payload(&values, Codec::MessagePack).unwrap()
                .build().unwrap();
            let back = round_trip(&env);
            prop_assert_eq!(back.decode_payload::<Vec<(i64, String)>>().unwrap(), values);
        }

        #[test]
        fn decode_never_panics(
            headers in proptest::collection::vec(("Bus-[A-Za-z-]{1,14}|[A-Za-z-]{1,8}", ".{0,20}"), 0..8),
            payload in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let _ = decode(headers.iter().map(|(n, v)| (n.as_str(), v.as_str())), payload.into());
        }
    }
}
